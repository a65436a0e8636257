package linearizability

import (
	"fmt"
	"hash/fnv"
	"slices"
	"strings"

	"github.com/anishathalye/porcupine"
)

// Kind is the operation of a call.
type Kind uint8

// The operations of API v1 on one key.
const (
	Begin Kind = iota + 1
	Complete
	Renew
	Release
	Get
	Delete
)

func (k Kind) String() string {
	switch k {
	case Begin:
		return "begin"
	case Complete:
		return "complete"
	case Renew:
		return "renew"
	case Release:
		return "release"
	case Get:
		return "get"
	case Delete:
		return "delete"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// NoLease is the Input.Lease of a call that sends a token no begin ever issued.
const NoLease = -1

// Input is what a client asked. Lease tokens are random, so the model names a lease by the ID
// of the begin call that acquired it: a client that got a 201 remembers (ID, token) and later
// sends the token with Lease set to that ID.
type Input struct {
	Kind Kind
	Key  string
	// ID is unique per call in a history. A begin's ID names the lease it acquires.
	ID int
	// Lease is, for complete, renew and release, the ID of the begin whose token is sent, or
	// NoLease.
	Lease int
	// Fingerprint is a begin's fingerprint.
	Fingerprint string
	// Response is a complete's response, in canonical form (see CanonicalResponse).
	Response string
	// WaitMS is a begin's wait_ms; a waiting begin is still one operation.
	WaitMS int64
}

// Output is what the client observed.
type Output struct {
	// Unknown: the client never learned the outcome (timeout, broken connection, 5xx). The call
	// may or may not have taken effect.
	Unknown bool
	// Status is the HTTP status.
	Status int
	// Problem is the problem name of an error ("in-progress", "lease-lost", ...).
	Problem string
	// The record in a 200 or 201 body.
	Key         string
	State       string // "in_progress" or "completed"
	Fingerprint string
	Fence       uint64 // lease.fence of an in-progress record
	TokenShown  bool   // lease.token was in the body
	Response    string // the stored response, canonical, of a completed record
	HasResponse bool
}

type phase uint8

const (
	absent phase = iota
	inProgress
	completed
)

// State is the model's state of one key.
type State struct {
	phase phase
	// holder is the lease (the ID of the begin that acquired it) of an in-progress record, and
	// the lease that completed a completed record.
	holder int
	// fence of the current lease; 0 while unknown (acquired by a begin whose outcome is unknown).
	fence uint64
	fp    string
	resp  string
	// maxFence is the largest fence any lease on this key has shown; every new lease must show
	// a larger one.
	maxFence uint64
}

func (s State) String() string {
	switch s.phase {
	case inProgress:
		return fmt.Sprintf("in_progress(lease #%d, fence %d, fp %q)", s.holder, s.fence, s.fp)
	case completed:
		return fmt.Sprintf("completed(by #%d, fp %q, %s)", s.holder, s.fp, short(s.resp))
	}
	return fmt.Sprintf("absent (max fence %d)", s.maxFence)
}

// Model is the sequential specification of one key under API v1 (CONTRACT.md), with leases that
// never expire during a run (the tests use long leases and TTLs and do not model time).
var Model = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		var order []string
		for _, op := range history {
			k := op.Input.(Input).Key
			if _, ok := byKey[k]; !ok {
				order = append(order, k)
			}
			byKey[k] = append(byKey[k], op)
		}
		out := make([][]porcupine.Operation, 0, len(order))
		for _, k := range order {
			out = append(out, byKey[k])
		}
		return out
	},
	Init: func() any { return State{} },
	Step: func(state, input, output any) (bool, any) {
		return step(state.(State), input.(Input), output.(Output))
	},
	Hash: func(state any) uint64 {
		s := state.(State)
		h := fnv.New64a()
		fmt.Fprintf(h, "%d|%d|%d|%s|%s|%d", s.phase, s.holder, s.fence, s.fp, s.resp, s.maxFence)
		return h.Sum64()
	},
	DescribeOperation: func(input, output any) string {
		return describe(input.(Input), output.(Output))
	},
	DescribeState: func(state any) string { return state.(State).String() },
}

// step applies in to s and reports whether out is a legal output of it.
func step(s State, in Input, out Output) (bool, State) {
	if out.Unknown {
		return true, apply(s, in)
	}
	switch in.Kind {
	case Begin:
		switch {
		case s.phase != absent && s.fp != "" && s.fp != in.Fingerprint:
			return out.is(422, "fingerprint-mismatch"), s
		case s.phase == completed:
			return out.Status == 200 && out.record(in.Key, "completed", s.fp, false) &&
				out.HasResponse && out.Response == s.resp, s
		case s.phase == inProgress:
			return out.is(409, "in-progress"), s
		}
		// absent: this begin acquires, with a fence larger than every earlier one.
		ok := out.Status == 201 && out.record(in.Key, "in_progress", in.Fingerprint, true) &&
			out.Fence > s.maxFence
		return ok, State{phase: inProgress, holder: in.ID, fence: out.Fence, fp: in.Fingerprint,
			maxFence: max(s.maxFence, out.Fence)}

	case Complete:
		switch {
		case s.phase == absent:
			return out.is(404, "not-found"), s
		case s.phase == completed:
			if s.holder == in.Lease && s.resp == in.Response { // the same complete again
				return out.completedRecord(in.Key, s), s
			}
			return out.is(409, "already-completed"), s
		case s.holder != in.Lease:
			return out.is(409, "lease-lost"), s
		}
		next := s
		next.phase, next.resp, next.fence = completed, in.Response, 0
		return out.completedRecord(in.Key, next), next

	case Renew:
		if s.phase == absent {
			return out.is(404, "not-found"), s
		}
		if s.phase != inProgress || s.holder != in.Lease {
			return out.is(409, "lease-lost"), s
		}
		return out.inProgressRecord(in.Key, s, true)

	case Release:
		switch {
		case s.phase == absent:
			return out.Status == 204, s
		case s.phase == completed:
			return out.is(409, "already-completed"), s
		case s.holder != in.Lease:
			return out.is(409, "lease-lost"), s
		}
		return out.Status == 204, State{maxFence: s.maxFence}

	case Get:
		switch s.phase {
		case absent:
			return out.is(404, "not-found"), s
		case completed:
			return out.completedRecord(in.Key, s), s
		}
		return out.inProgressRecord(in.Key, s, false)

	case Delete:
		return out.Status == 204, State{maxFence: s.maxFence}
	}
	return false, s
}

// apply is step for a call whose outcome is unknown: it takes effect as the rules say, and
// nothing it would have answered is checked.
func apply(s State, in Input) State {
	switch in.Kind {
	case Begin:
		if s.phase == absent {
			return State{phase: inProgress, holder: in.ID, fp: in.Fingerprint, maxFence: s.maxFence}
		}
	case Complete:
		if s.phase == inProgress && s.holder == in.Lease {
			s.phase, s.resp, s.fence = completed, in.Response, 0
		}
	case Release:
		if s.phase == inProgress && s.holder == in.Lease {
			return State{maxFence: s.maxFence}
		}
	case Delete:
		return State{maxFence: s.maxFence}
	}
	return s
}

func (o Output) is(status int, problem string) bool {
	return o.Status == status && o.Problem == problem
}

// record reports whether the body is the record of key in state with fingerprint fp, showing
// the lease token exactly when withToken.
func (o Output) record(key, state, fp string, withToken bool) bool {
	return o.Key == key && o.State == state && o.Fingerprint == fp && o.TokenShown == withToken
}

func (o Output) completedRecord(key string, s State) bool {
	return o.Status == 200 && o.record(key, "completed", s.fp, false) && o.HasResponse &&
		o.Response == s.resp
}

// inProgressRecord checks a 200 with the in-progress record of s. When s's fence is not known
// yet (its begin's outcome is unknown) the observed fence becomes the known one.
func (o Output) inProgressRecord(key string, s State, withToken bool) (bool, State) {
	if o.Status != 200 || !o.record(key, "in_progress", s.fp, withToken) || o.HasResponse {
		return false, s
	}
	if s.fence == 0 {
		if o.Fence <= s.maxFence {
			return false, s
		}
		s.fence, s.maxFence = o.Fence, o.Fence
		return true, s
	}
	return o.Fence == s.fence, s
}

// CanonicalResponse is the form in which the model compares stored responses: status, headers
// with sorted names, and the exact body bytes.
func CanonicalResponse(status int, headers map[string][]string, body []byte) string {
	names := make([]string, 0, len(headers))
	for name := range headers {
		names = append(names, name)
	}
	slices.Sort(names)
	var b strings.Builder
	fmt.Fprintf(&b, "%d", status)
	for _, name := range names {
		fmt.Fprintf(&b, " %s=%q", name, headers[name])
	}
	fmt.Fprintf(&b, " body=%q", body)
	return b.String()
}

func describe(in Input, out Output) string {
	var call string
	switch in.Kind {
	case Begin:
		call = fmt.Sprintf("#%d begin(%s, fp %q", in.ID, in.Key, in.Fingerprint)
		if in.WaitMS > 0 {
			call += fmt.Sprintf(", wait %dms", in.WaitMS)
		}
		call += ")"
	case Complete:
		call = fmt.Sprintf("#%d complete(%s, lease #%d, %s)", in.ID, in.Key, in.Lease, short(in.Response))
	case Renew, Release:
		call = fmt.Sprintf("#%d %s(%s, lease #%d)", in.ID, in.Kind, in.Key, in.Lease)
	default:
		call = fmt.Sprintf("#%d %s(%s)", in.ID, in.Kind, in.Key)
	}
	return call + " -> " + out.String()
}

func (o Output) String() string {
	if o.Unknown {
		return "unknown"
	}
	s := fmt.Sprint(o.Status)
	if o.Problem != "" {
		s += " " + o.Problem
	}
	if o.State != "" {
		s += " " + o.State
		if o.State == "in_progress" {
			s += fmt.Sprintf(" fence %d", o.Fence)
		}
		if o.TokenShown {
			s += " +token"
		}
		if o.HasResponse {
			s += " " + short(o.Response)
		}
	}
	return s
}

func short(s string) string {
	if len(s) > 40 {
		return s[:37] + "..."
	}
	return s
}
