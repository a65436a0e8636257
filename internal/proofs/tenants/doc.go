// Package tenants proves tenant isolation over HTTP (CONTRACT.md, Auth): two tenants with the
// same key strings, where every endpoint called as one tenant on the other's keys answers
// exactly as for a key that does not exist, each tenant's own records live independently, and
// no body field, path spelling or header names another tenant.
//
// The package has no code outside its tests.
package tenants
