package main

import (
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
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

// connCap is a listener that keeps at most cap(slots) connections open at once. It hands net/http
// the accepted connection itself and learns of its states from the server's ConnState hook
// (connState), where x/net's netutil.LimitListener wraps every connection: with the wrapper a
// replay on bbolt cost 2 to 3% more server CPU (scripts/ab.sh, both orders).
//
// When every slot is taken, Accept still takes the next connection from the kernel's queue (it
// holds one descriptor beyond the limit while it waits, out of the fdReserve), then makes room
// for it by ending the connection that has been idle longest, if it has been idle for at least
// minIdleToEvict: a keep-alive connection waiting for its client's next request. Before, a few
// clients holding idle keep-alive connections took every slot for up to the server's
// IdleTimeout, and then nothing was served, not even /healthz. A connection that is reading or
// serving a request is never ended, nor one that went idle a moment ago (a busy client about to
// send its next request). When no idle connection qualifies, a new connection that has not sent
// its first request's headers within minNewToEvict is ended instead, as the header timeout would
// end it later. While no connection qualifies, the new one waits.
//
// The connection is ended as net/http's own IdleTimeout ends it: with a read deadline in the
// past, not with Close. net/http waits for the next request (or the rest of the first one's
// headers) in a read; the deadline makes that read fail, and net/http closes the connection
// without running anything. If the request's headers had already arrived, net/http sets the
// whole request's deadline right after reading them (Go 1.26: readRequest), which replaces ours,
// and serves and answers it as usual; only a deadline of ours that lands after that and before
// net/http reports the connection active (its hook waits for l.mu) stays, and then a body still
// to come fails to arrive: 400, with nothing run (the body is read whole before any store call,
// and a request without one is not affected: net/http's background read clears the deadline).
// So a request is either not run at all, and its client sees a closed connection, which HTTP
// allows (RFC 9112, section 9.6) and clients retry on a keep-alive one (on a new one, Go's
// Transport does not); or run and answered. Closing the connection
// instead could close it under a request that net/http had read but not yet reported active:
// the handler ran (a begin took its lease) and its answer was lost (a review's find: thousands
// of such requests in 8 s with busy keep-alive clients at the limit).
type connCap struct {
	net.Listener
	slots     chan struct{} // one per open connection
	done      chan struct{}
	closeOnce sync.Once
	logger    *zap.Logger
	now       func() time.Time
	idleNote  chan struct{} // a connection went idle while Accept waits

	mu       sync.Mutex
	conns    map[net.Conn]*trackedConn // every connection net/http reported and did not close
	idle     trackedConn               // sentinel of the idle list, ordered from the oldest idle
	fresh    trackedConn               // sentinel of the list of new connections, oldest first
	waiters  int                       // Accepts waiting for room
	ending   *trackedConn              // the connection given a past deadline, until it closes or endWait passes
	endingAt time.Time
	reached  uint64    // times a new connection found every slot taken
	evicted  uint64    // connections ended to make room
	lastWarn time.Time // of the last warning that the limit was reached
}

// trackedConn is a connection's state as its ConnState hook last reported it.
type trackedConn struct {
	conn       net.Conn
	state      http.ConnState
	opened     time.Time    // when net/http reported it new
	idleSince  time.Time    // when it last went idle
	prev, next *trackedConn // in connCap.idle or connCap.fresh (prev is nil when in neither)
}

const (
	// minIdleToEvict is how long a connection must have been idle to be ended to make room: a
	// busy client sends its next request well within it.
	minIdleToEvict = 250 * time.Millisecond
	// minNewToEvict is how long a new connection may take to send its first request's headers
	// before it may be ended to make room, when no idle one can be: a client sends them at once,
	// and one that trickles them in holds its slot up to the header timeout (5 s) otherwise (a
	// security audit's find: eight such clients, reconnecting, kept /healthz from an answer at
	// IDEMSVC_MAX_CONNS=8).
	minNewToEvict = time.Second
	// endWait is how long a connection given a past deadline may take to close before another
	// is tried (net/http sets its idle deadline just after reporting StateIdle, so a deadline
	// set in between would be lost; minIdleToEvict makes that all but impossible). Not shorter:
	// on a loaded machine net/http's goroutine took over 100 ms to see the deadline and close,
	// and a second connection was ended for the one slot (TestConnCapClosesIdleForNew failed so
	// while other tests ran).
	endWait = 500 * time.Millisecond
	// roomPoll is how often a waiting Accept looks again for a connection idle long enough.
	roomPoll = 25 * time.Millisecond
)

// capWarnEvery is how often, at most, connCap warns again that the limit was reached.
const capWarnEvery = time.Minute

func newConnCap(l net.Listener, n int, logger *zap.Logger) *connCap {
	if logger == nil {
		logger = zap.NewNop()
	}
	c := &connCap{
		Listener: l,
		slots:    make(chan struct{}, n),
		done:     make(chan struct{}),
		logger:   logger,
		now:      time.Now,
		idleNote: make(chan struct{}, 1),
		conns:    make(map[net.Conn]*trackedConn),
	}
	c.idle.prev, c.idle.next = &c.idle, &c.idle
	c.fresh.prev, c.fresh.next = &c.fresh, &c.fresh
	return c
}

func (l *connCap) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
		c, err := l.Listener.Accept()
		if err != nil {
			<-l.slots
			return nil, err
		}
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	default:
	}
	// Every slot is taken: wait for a connection, then make room for it (unless one was freed
	// meanwhile).
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	select {
	case l.slots <- struct{}{}:
		return c, nil
	default:
	}
	if err := l.makeRoom(); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// makeRoom takes a slot for a connection accepted while every slot was taken, ending an idle
// connection to free one, and waits until it is free.
func (l *connCap) makeRoom() error {
	l.mu.Lock()
	l.reached++
	l.warnReached()
	l.waiters++
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		l.waiters--
		l.mu.Unlock()
	}()
	poll := time.NewTicker(roomPoll)
	defer poll.Stop()
	for {
		l.mu.Lock()
		l.endOldestIdle(time.Now())
		l.mu.Unlock()
		select {
		case l.slots <- struct{}{}:
			return nil
		case <-l.idleNote:
		case <-poll.C:
		case <-l.done:
			return net.ErrClosed
		}
	}
}

// endOldestIdle gives the connection idle the longest a read deadline in the past, if it has
// been idle for minIdleToEvict, or else the new connection that has waited longest for its
// first request's headers, if for minNewToEvict (net/http is reading them: the deadline ends
// the read, and it closes the connection without running anything), and no other is being
// ended: its slot comes back when net/http closes it. l.mu is held.
func (l *connCap) endOldestIdle(now time.Time) {
	if e := l.ending; e != nil {
		if now.Sub(l.endingAt) < endWait {
			return
		}
		// It did not close: it is served after all, or its deadline was lost. An idle one goes
		// back in the idle list (unless the Idle hook has put it there since), a new one is left
		// to its header timeout.
		l.ending = nil
		if e.state == http.StateIdle && e.prev == nil { // a new one served since is linked already
			l.linkIdle(e, now)
		}
	}
	e := l.idle.next
	if e == &l.idle || now.Sub(e.idleSince) < minIdleToEvict {
		if e = l.fresh.next; e == &l.fresh || now.Sub(e.opened) < minNewToEvict {
			return
		}
	}
	unlink(e)
	l.ending, l.endingAt = e, now
	l.evicted++
	_ = e.conn.SetReadDeadline(now)
}

// warnReached logs that the limit was reached, the first time and then at most every
// capWarnEvery. l.mu is held.
func (l *connCap) warnReached() {
	now := l.now()
	if now.Sub(l.lastWarn) < capWarnEvery { // the zero lastWarn is long ago
		return
	}
	l.lastWarn = now
	l.logger.Warn("connection limit reached: new connections wait for a slot, and idle keep-alive connections "+
		"are closed to make room; raise "+envPrefix+"_MAX_CONNS if this is normal load",
		zap.Int("max_conns", cap(l.slots)), zap.String("variable", envPrefix+"_MAX_CONNS"),
		zap.Uint64("times_reached", l.reached), zap.Uint64("idle_closed", l.evicted))
}

func (l *connCap) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// connState tracks a connection's state and frees its slot when it ends; it is the http.Server's
// ConnState, which net/http calls with StateNew for every connection it accepted (before the
// connection's other states), StateActive and StateIdle around each request, and StateClosed
// (or StateHijacked) once at the end. Active and Idle are the hot path: a map lookup, a clock
// read and a few pointer moves under mu, without allocating.
func (l *connCap) connState(c net.Conn, s http.ConnState) {
	switch s {
	case http.StateActive:
		l.mu.Lock()
		if e := l.conns[c]; e != nil {
			if e.prev != nil {
				unlink(e)
			}
			e.state = s
			// The one being ended stays so, active or not, until it closes or endWait passes:
			// net/http reports a connection active also when the read the deadline ended had
			// read some bytes, just before it closes it, so that "active" does not mean "served".
			// Clearing it here ended two or three connections for one slot (reviews' finds, for a
			// new connection and for an idle one trickling its next request). One whose request
			// had arrived and is served after all costs the next eviction up to endWait.
		}
		l.mu.Unlock()
	case http.StateIdle:
		now := time.Now()
		l.mu.Lock()
		if e := l.conns[c]; e != nil && e.state != http.StateIdle {
			if e.prev != nil { // not so from net/http (a new connection turns active first)
				unlink(e)
			}
			e.state = s
			l.linkIdle(e, now)
			if l.waiters > 0 {
				l.note()
			}
		}
		l.mu.Unlock()
	case http.StateNew:
		e := &trackedConn{conn: c, state: s}
		l.mu.Lock()
		e.opened = time.Now() // under mu, so that the list stays in order
		l.conns[c] = e
		linkTail(&l.fresh, e)
		l.mu.Unlock()
	case http.StateClosed, http.StateHijacked:
		l.mu.Lock()
		if e := l.conns[c]; e != nil {
			if e.prev != nil {
				unlink(e)
			}
			if l.ending == e {
				l.ending = nil
			}
			delete(l.conns, c)
		}
		l.mu.Unlock()
		<-l.slots
	}
}

// linkIdle puts e at the tail of the idle list (the most recently idle), idle since now. l.mu is
// held.
func (l *connCap) linkIdle(e *trackedConn, now time.Time) {
	e.idleSince = now
	linkTail(&l.idle, e)
}

// linkTail puts e at the tail of the list of sentinel list.
func linkTail(list, e *trackedConn) {
	e.prev, e.next = list.prev, list
	e.prev.next, list.prev = e, e
}

// note wakes a waiting Accept. l.mu is held.
func (l *connCap) note() {
	select {
	case l.idleNote <- struct{}{}:
	default:
	}
}

// unlink takes e out of the list it is in.
func unlink(e *trackedConn) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

// collectors returns the connection limit's metrics, for the server's registry.
func (l *connCap) collectors() []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "idemsvc_connections_open",
			Help: "Client connections open, each holding one of the " + envPrefix + "_MAX_CONNS slots.",
		}, func() float64 { l.mu.Lock(); defer l.mu.Unlock(); return float64(len(l.conns)) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "idemsvc_connections_max",
			Help: "Most client connections open at once (" + envPrefix + "_MAX_CONNS, or its default).",
		}, func() float64 { return float64(cap(l.slots)) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "idemsvc_connections_limit_reached_total",
			Help: "New connections that found every slot taken (" + envPrefix + "_MAX_CONNS) and waited for one.",
		}, func() float64 { l.mu.Lock(); defer l.mu.Unlock(); return float64(l.reached) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "idemsvc_connections_idle_closed_total",
			Help: "Connections ended to make room for a new connection at the limit: idle keep-alive ones, or, when none is idle long enough, ones that sent no complete request headers within a second.",
		}, func() float64 { l.mu.Lock(); defer l.mu.Unlock(); return float64(l.evicted) }),
	}
}
