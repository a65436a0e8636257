// Package api holds the OpenAPI 3.0 description of idemsvc's HTTP API, api/openapi.yaml.
//
// The document describes exactly the HTTP contract (CONTRACT.md) and the wire decisions of
// docs/WIRE.md. The server serves it at GET /openapi.yaml, and the server's tests validate
// their traffic against it (see internal/apitest).
package api

import _ "embed"

// Spec is the OpenAPI 3.0.3 document (YAML) of the API. It is read-only: callers must not
// modify it.
//
//go:embed openapi.yaml
var Spec []byte
