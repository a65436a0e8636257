package server

import (
	"context"
	"errors"
	"net/http"
	"strconv"

	"go.uber.org/zap"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// problemType is one row of the error table: a stable problem name, its status and title.
type problemType struct {
	name   string
	status int
	title  string
	// showDetail: the error's own text is written for the client (it is about their input).
	showDetail bool
}

// problems is the one table from error to status and problem type. Order matters only in that
// the first match wins.
var problems = []struct {
	err error
	problemType
}{
	{keys.ErrInvalidKey, problemType{"invalid-key", http.StatusBadRequest, "Invalid idempotency key", true}},
	{keys.ErrInvalidRequest, problemType{"invalid-request", http.StatusBadRequest, "Invalid request", true}},
	{errUnauthorized, problemType{"unauthorized", http.StatusUnauthorized, "Unauthorized", false}},
	{keys.ErrNotFound, problemType{"not-found", http.StatusNotFound, "Not found", false}},
	// A name of its own: a client with a wrong base URL must not read it as "no record".
	{errRouteNotFound, problemType{"no-such-path", http.StatusNotFound, "No such path", true}},
	{errMethodNotAllowed, problemType{"method-not-allowed", http.StatusMethodNotAllowed, "Method not allowed", false}},
	{keys.ErrInProgress, problemType{"in-progress", http.StatusConflict, "Operation in progress", false}},
	{keys.ErrLeaseLost, problemType{"lease-lost", http.StatusConflict, "Lease lost", false}},
	{keys.ErrAlreadyCompleted, problemType{"already-completed", http.StatusConflict, "Already completed", false}},
	{errPayloadTooLarge, problemType{"payload-too-large", http.StatusRequestEntityTooLarge, "Payload too large", false}},
	{errUnsupportedMedia, problemType{"unsupported-media-type", http.StatusUnsupportedMediaType, "Unsupported media type", false}},
	{keys.ErrFingerprintMismatch, problemType{"fingerprint-mismatch", http.StatusUnprocessableEntity, "Fingerprint mismatch", false}},
	{keys.ErrInvalidResponse, problemType{"invalid-response", http.StatusUnprocessableEntity, "Invalid response", true}},
	{keys.ErrUnavailable, problemType{"unavailable", http.StatusServiceUnavailable, "Store unavailable", false}},
	{errBusy, problemType{"unavailable", http.StatusServiceUnavailable, "Server busy", false}},
	{errBusyAnswering, problemType{"unavailable", http.StatusServiceUnavailable, "Server busy", false}},
	{errShuttingDown, problemType{"unavailable", http.StatusServiceUnavailable, "Shutting down", false}},
	{context.DeadlineExceeded, problemType{"unavailable", http.StatusServiceUnavailable, "Store unavailable", false}},
	{context.Canceled, problemType{"unavailable", http.StatusServiceUnavailable, "Request cancelled", false}},
}

var internalProblem = problemType{"internal", http.StatusInternalServerError, "Internal error", false}

// details are the fixed client-facing texts of the errors whose own text is not shown.
var details = map[string]string{
	"unauthorized":           "A valid bearer token is required.",
	"not-found":              "No such record.",
	"method-not-allowed":     "This method is not allowed on this path.",
	"in-progress":            "Another request holds this key; retry after the Retry-After delay.",
	"lease-lost":             "The token is not the current lease of this key.",
	"already-completed":      "The key is already completed with another response or lease.",
	"payload-too-large":      "The request body is larger than this server accepts.",
	"unsupported-media-type": "Send the body as application/json.",
	"fingerprint-mismatch":   "This key was used with a different request.",
	"unavailable":            "The service cannot serve this request now; retry later.",
	"internal":               "An internal error occurred; it has been logged.",
}

func classify(err error) problemType {
	for _, p := range problems {
		if errors.Is(err, p.err) {
			return p.problemType
		}
	}
	return internalProblem
}

// writeError writes err as an RFC 9457 problem. It logs 5xx with the request id and never sends
// the text of an internal error to the client.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	p := classify(err)
	detail := details[p.name]
	if p.showDetail {
		detail = err.Error()
	}
	switch {
	case p.status == http.StatusInternalServerError:
		s.logger.Error("request failed", zap.String("request_id", requestID(r.Context())),
			zap.String("problem", p.name), zap.Error(err))
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		// The client went away; nobody reads this answer.
		s.logger.Debug("request cancelled by the client", zap.String("request_id", requestID(r.Context())))
	case errors.Is(err, keys.ErrUnavailable):
		// storeHealth logged the outage (the store's wrapper, or /readyz): not every request.
	case errors.Is(err, errShuttingDown):
		// /readyz while draining: the drain is logged once, where it starts.
	case p.status >= 500:
		s.logger.Warn("request failed", zap.String("request_id", requestID(r.Context())),
			zap.String("problem", p.name), zap.Error(err))
	}
	h := w.Header()
	switch p.status {
	case http.StatusUnauthorized:
		h["Www-Authenticate"] = bearerChallenge
	case http.StatusMethodNotAllowed:
		h.Set("Allow", allowed(r))
	}
	setProblem(r.Context(), p.name)
	h["Content-Type"] = problemContentType
	w.WriteHeader(p.status)
	bp := bufPool.Get().(*[]byte)
	buf := appendProblem((*bp)[:0], p, detail, r.URL.EscapedPath())
	_, _ = w.Write(buf)
	if cap(buf) <= 64<<10 {
		*bp = buf
		bufPool.Put(bp)
	}
}

// appendProblem appends the JSON of a problem to b, and a newline: byte for byte what
// json.Encoder writes for problemJSON (the equivalence is tested), without reflection.
func appendProblem(b []byte, p problemType, detail, instance string) []byte {
	b = append(b, `{"type":"urn:idemsvc:problem:`...)
	b = appendJSONStringContent(b, p.name)
	b = append(b, `","title":`...)
	b = appendJSONString(b, p.title)
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(p.status), 10)
	b = append(b, `,"detail":`...)
	b = appendJSONString(b, detail)
	if instance != "" {
		b = append(b, `,"instance":`...)
		b = appendJSONString(b, instance)
	}
	return append(b, '}', '\n')
}
