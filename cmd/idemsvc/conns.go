package main

import (
	"fmt"
	"net"
	"net/http"
	"sync"
)

const (
	// fdReserve is how many file descriptors the connection limit leaves free by default: for
	// the store (the bbolt file, Redis's connections), the health check's connection, logs.
	fdReserve = 256
	// maxDefaultConns caps the default connection limit, however high RLIMIT_NOFILE is.
	maxDefaultConns = 10000
)

// connLimit returns the most connections the service keeps open at once, and RLIMIT_NOFILE's
// soft limit it was derived from (0 when unknown). Each connection holds a file descriptor:
// without a limit, a client holding enough idle connections used them all ("accept4: too many
// open files"), so that no one else was served and the store could open nothing.
func connLimit(maxConns int) (limit int, nofile uint64, err error) {
	nofile, err = openFileLimit()
	if err != nil {
		return 0, 0, fmt.Errorf("reading RLIMIT_NOFILE: %w", err)
	}
	limit, err = connLimitFor(maxConns, nofile)
	return limit, nofile, err
}

// connLimitFor is connLimit for a given soft RLIMIT_NOFILE (0: unknown). maxConns 0 picks the
// default, min(10000, nofile-256) (half of nofile when that is at most 512); a maxConns above
// that bound leaves too few descriptors, and is an error.
func connLimitFor(maxConns int, nofile uint64) (int, error) {
	highest := uint64(maxDefaultConns) // nofile unknown
	if nofile > 0 {
		highest = nofile / 2
		if nofile > 2*fdReserve {
			highest = nofile - fdReserve
		}
	}
	if maxConns == 0 {
		return int(max(1, min(highest, maxDefaultConns))), nil
	}
	if nofile > 0 && uint64(maxConns) > highest {
		return 0, fmt.Errorf("%s_MAX_CONNS %d leaves too few of the process's %d file descriptors (RLIMIT_NOFILE) "+
			"for the store and health checks: set it to at most %d, or raise the limit (ulimit -n)",
			envPrefix, maxConns, nofile, highest)
	}
	return maxConns, nil
}

// connCap is a listener that keeps at most cap(slots) connections open at once: past that,
// Accept waits for one to close, and new connections wait in the kernel's accept queue. It
// hands net/http the accepted connection itself and learns of its end from the server's
// ConnState hook (connState), where x/net's netutil.LimitListener wraps every connection: with
// the wrapper a replay on bbolt cost 2 to 3% more server CPU (scripts/ab.sh, both orders).
type connCap struct {
	net.Listener
	slots     chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

func newConnCap(l net.Listener, n int) *connCap {
	return &connCap{Listener: l, slots: make(chan struct{}, n), done: make(chan struct{})}
}

func (l *connCap) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return c, nil
}

func (l *connCap) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// connState frees a connection's slot when it ends; it is the http.Server's ConnState, which
// net/http calls with StateClosed (or StateHijacked) once for every connection it accepted.
func (l *connCap) connState(_ net.Conn, s http.ConnState) {
	if s == http.StateClosed || s == http.StateHijacked {
		<-l.slots
	}
}
