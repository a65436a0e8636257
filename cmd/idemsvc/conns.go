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
// for it by closing the connection that has been idle longest: a keep-alive connection that has
// finished its last request (http.StateIdle). Before, a few clients holding idle keep-alive
// connections took every slot for up to the server's IdleTimeout, and then nothing was served,
// not even /healthz. A connection that is reading a request's headers (StateNew) or serving one
// (StateActive) is never closed: while all are, the new connection waits for one to close or to
// go idle. HTTP lets a server close an idle connection at any time (RFC 9112, section 9.6); its
// client opens another.
//
// A connection may turn active between our choice and our Close. net/http's Server.Shutdown
// (closeIdleConns) has the same race and closes idle connections anyway, under its lock, if
// their state still reads idle. So do we, a little more strictly: connState takes mu for every
// transition, and we close under mu only the connection at the head of the idle list, so that
// none is closed after StateActive was reported for it; a closed one is marked (evicted) and
// never listed as idle again. What remains is a request whose first bytes are on the way, or
// read but not yet reported (net/http reports StateActive once it has read the headers): the
// window every server that closes idle keep-alive connections has, and that clients handle
// (net/http's Transport resends on a new connection a request it wrote to a connection the
// server closed, if it is idempotent or carries an Idempotency-Key header). Closing the oldest
// idle first makes it least likely. Close waits until concurrent reads of the connection
// return (internal/poll), which it wakes at once, and nothing calls connState while reading, so
// closing under mu cannot deadlock; it happens only when the limit is reached.
type connCap struct {
	net.Listener
	slots     chan struct{} // one per open connection
	done      chan struct{}
	closeOnce sync.Once
	logger    *zap.Logger
	now       func() time.Time
	idleNote  chan struct{} // a connection went idle (or an evicted one went active) while Accept waits

	mu       sync.Mutex
	conns    map[net.Conn]*trackedConn // every connection net/http reported and did not close
	idle     trackedConn               // sentinel of the idle list, ordered from the oldest idle
	waiters  int                       // Accepts waiting for room
	pending  int                       // evicted connections whose close net/http has not reported
	reached  uint64                    // times a new connection found every slot taken
	evicted  uint64                    // idle connections closed to make room
	lastWarn time.Time                 // of the last warning that the limit was reached
	warned   bool
}

// trackedConn is a connection's state as its ConnState hook last reported it.
type trackedConn struct {
	conn       net.Conn
	state      http.ConnState
	prev, next *trackedConn // in connCap.idle while state is StateIdle and not evicted
	evicted    bool         // closed by makeRoom
	pending    bool         // evicted, and counted in connCap.pending
}

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

// makeRoom takes a slot for a connection accepted while every slot was taken, closing the
// oldest idle connection to free one, and waits until it is free.
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
	for {
		// Close one idle connection at a time: its slot comes back as soon as net/http sees
		// the close (it was waiting for the next request), unless it raced to active.
		l.mu.Lock()
		if l.pending == 0 {
			l.closeOldestIdle()
		}
		l.mu.Unlock()
		select {
		case l.slots <- struct{}{}:
			return nil
		case <-l.idleNote:
		case <-l.done:
			return net.ErrClosed
		}
	}
}

// closeOldestIdle closes the connection that has been idle longest, if any. l.mu is held.
func (l *connCap) closeOldestIdle() {
	e := l.idle.next
	if e == &l.idle {
		return
	}
	unlinkIdle(e)
	e.evicted, e.pending = true, true
	l.pending++
	l.evicted++
	_ = e.conn.Close()
}

// warnReached logs that the limit was reached, the first time and then at most every
// capWarnEvery. l.mu is held.
func (l *connCap) warnReached() {
	now := l.now()
	if l.warned && now.Sub(l.lastWarn) < capWarnEvery {
		return
	}
	l.warned, l.lastWarn = true, now
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
// (or StateHijacked) once at the end. Active and Idle are the hot path: a map lookup and a few
// pointer moves under mu, without allocating.
func (l *connCap) connState(c net.Conn, s http.ConnState) {
	switch s {
	case http.StateActive:
		l.mu.Lock()
		if e := l.conns[c]; e != nil {
			if e.state == http.StateIdle && !e.evicted {
				unlinkIdle(e)
			}
			e.state = s
			if e.pending { // raced: it read a request before the close; it holds its slot a while
				l.settle(e)
			}
		}
		l.mu.Unlock()
	case http.StateIdle:
		l.mu.Lock()
		if e := l.conns[c]; e != nil && e.state != http.StateIdle {
			e.state = s
			if !e.evicted {
				e.prev, e.next = l.idle.prev, &l.idle // at the tail: the most recently idle
				e.prev.next, l.idle.prev = e, e
				if l.waiters > 0 {
					l.note()
				}
			}
		}
		l.mu.Unlock()
	case http.StateNew:
		e := &trackedConn{conn: c, state: s}
		l.mu.Lock()
		l.conns[c] = e
		l.mu.Unlock()
	case http.StateClosed, http.StateHijacked:
		l.mu.Lock()
		if e := l.conns[c]; e != nil {
			if e.state == http.StateIdle && !e.evicted {
				unlinkIdle(e)
			}
			if e.pending {
				l.settle(e)
			}
			delete(l.conns, c)
		}
		l.mu.Unlock()
		<-l.slots
	}
}

// settle ends an evicted connection's wait for its close, and lets a waiting Accept close
// another if it raced to active. l.mu is held.
func (l *connCap) settle(e *trackedConn) {
	e.pending = false
	l.pending--
	if e.state == http.StateActive && l.waiters > 0 {
		l.note()
	}
}

// note wakes a waiting Accept. l.mu is held.
func (l *connCap) note() {
	select {
	case l.idleNote <- struct{}{}:
	default:
	}
}

func unlinkIdle(e *trackedConn) {
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
			Help: "Idle keep-alive connections closed to make room for a new connection at the limit.",
		}, func() float64 { l.mu.Lock(); defer l.mu.Unlock(); return float64(l.evicted) }),
	}
}
