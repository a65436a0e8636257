package redis

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/redis/rueidis"
)

// Watching across replicas. casScript and delScript PUBLISH on the key's channel when a record is
// completed, released, deleted or taken over. Each Store keeps one dedicated pub/sub connection
// and multiplexes all its watchers onto it: a channel is SUBSCRIBEd when its first watcher comes
// and stays subscribed for a short while after its last watcher leaves, so that BeginWait's loop
// (watch, begin, wait, stop, watch again) costs no subscription round trips after the first.
//
// The hub never sends UNSUBSCRIBE, and never hands a pub/sub connection back to rueidis's pool
// (which would UNSUBSCRIBE to reuse it): rueidis panics, ending the process, when Redis answers
// the PING it sends after an UNSUBSCRIBE with an error it does not expect (MISCONF, which Redis
// answers to PING while it refuses writes after a failed save: TestMisconfWithWatchers). A
// channel without watchers for linger stays subscribed, its messages ignored, until the
// connection is closed and a new one opened: at once when no channel has a watcher, or, past
// maxIdleChannels, even if some do (they are woken, as when a connection breaks).
//
// Delivery is best effort, and that is enough: keys.BeginWait polls at least every 250ms, so a
// lost message costs at most that much latency. When the pub/sub connection breaks, every watcher
// is woken (messages may have been lost meanwhile) and the next Watch connects again; but after
// a connection that could not be opened, or broke within subRedialPause of opening (Redis at
// maxclients, say), not for subRedialPause: every waiter would otherwise dial and begin again in
// a tight loop.
//
// Behind Redis Sentinel the connection follows the master: the janitor closes it, within about
// a second, once the client has switched to a new master (followMaster).
//
// On Redis Cluster a PUBLISH is broadcast to every node over the cluster bus: correct, but its
// cost grows with the cluster. SPUBLISH/SSUBSCRIBE (Redis 7) would keep it on the key's shard.

const (
	// subscribeWait bounds how long Watch waits for SUBSCRIBE to be confirmed. A watch that
	// returns unconfirmed still works by the waiter's poll.
	subscribeWait = 250 * time.Millisecond
	// linger is how long a channel stays subscribed without watchers.
	linger = 5 * time.Second
	// subRedialPause is how long after a failed or broken pub/sub connection Watch does not
	// try another: its watchers poll meanwhile.
	subRedialPause = 250 * time.Millisecond
	// maxIdleChannels is how many channels without watchers may stay subscribed before the
	// connection is replaced even though some channels have watchers.
	maxIdleChannels = 1024
)

// errSubPaused: the pub/sub connection failed less than subRedialPause ago.
var errSubPaused = errors.New("redis: pub/sub connection failed just now; polling")

type hub struct {
	client func(context.Context) (rueidis.Client, error)

	mu      sync.Mutex
	topics  map[string]*topic
	conn    *subConn // nil when not connected
	dialing *subDial // the connection attempt in flight, if any
	closed  bool
	// failedAt is when the last pub/sub connection failed to open or broke.
	failedAt time.Time

	stop chan struct{}
	wg   sync.WaitGroup
}

type topic struct {
	watchers map[chan struct{}]struct{}
	// on is the connection where SUBSCRIBE was confirmed; nil when not subscribed.
	on *subConn
	// busy is closed when the SUBSCRIBE in flight ends; nil when none. One at a time per
	// channel.
	busy chan struct{}
	idle time.Time // when the last watcher left
}

type subConn struct {
	dc     rueidis.DedicatedClient
	cancel func()
	opened time.Time
	// behind Sentinel: the client, and the master's address when the connection was opened
	// (see followMaster); nil and "" otherwise.
	sentinel rueidis.Client
	master   string
}

type subDial struct {
	done chan struct{}
	conn *subConn
	err  error
}

func newHub(client func(context.Context) (rueidis.Client, error)) *hub {
	h := &hub{client: client, topics: make(map[string]*topic), stop: make(chan struct{})}
	h.wg.Add(1)
	go h.janitor()
	return h
}

// watch registers a watcher of channel and makes sure the channel is subscribed (waiting up to
// subscribeWait for the confirmation, so that a change published after watch returns is seen).
func (h *hub) watch(channel string) (<-chan struct{}, func()) {
	ch := make(chan struct{})
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		close(ch)
		return ch, func() {}
	}
	t := h.topics[channel]
	if t == nil {
		t = &topic{watchers: make(map[chan struct{}]struct{})}
		h.topics[channel] = t
	}
	t.watchers[ch] = struct{}{}
	stop := func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if _, ok := t.watchers[ch]; ok {
			delete(t.watchers, ch)
			if len(t.watchers) == 0 {
				t.idle = time.Now()
			}
		}
	}
	deadline := time.Now().Add(subscribeWait)
	for {
		if t.on != nil && t.on == h.conn {
			break
		}
		if busy := t.busy; busy != nil {
			h.mu.Unlock()
			timer := time.NewTimer(time.Until(deadline))
			select {
			case <-busy:
				timer.Stop()
				h.mu.Lock()
				continue
			case <-timer.C:
				return ch, stop
			}
		}
		busy := make(chan struct{})
		t.busy = busy
		h.mu.Unlock()
		conn, err := h.connection(deadline)
		if err == nil {
			ctx, cancel := context.WithDeadline(context.Background(), deadline)
			err = conn.dc.Do(ctx, conn.dc.B().Subscribe().Channel(channel).Build()).Error()
			cancel()
		}
		h.mu.Lock()
		if err == nil && h.conn == conn {
			t.on = conn
		}
		t.busy = nil
		close(busy)
		break
	}
	h.mu.Unlock()
	return ch, stop
}

// connection returns the pub/sub connection. When there is none it starts one attempt at a time
// in the background, and waits for it until deadline.
func (h *hub) connection(deadline time.Time) (*subConn, error) {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil, errClosed
	}
	if conn := h.conn; conn != nil {
		h.mu.Unlock()
		return conn, nil
	}
	run := h.dialing
	if run == nil && time.Since(h.failedAt) < subRedialPause {
		h.mu.Unlock()
		return nil, errSubPaused
	}
	if run == nil {
		run = &subDial{done: make(chan struct{})}
		h.dialing = run
		h.wg.Add(1)
		go h.dial(run)
	}
	h.mu.Unlock()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-run.done:
		return run.conn, run.err
	case <-timer.C:
		return nil, context.DeadlineExceeded
	}
}

func (h *hub) dial(run *subDial) {
	defer h.wg.Done()
	defer close(run.done)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := h.client(ctx)
	var conn *subConn
	var lost <-chan error
	if err == nil {
		var master string
		if c.Mode() == rueidis.ClientModeSentinel {
			master = masterAddr(c) // before Dedicate: a switch in between costs a reconnection
		}
		dc, _ := c.Dedicate() // closed, never released: see above
		conn = &subConn{dc: dc, cancel: dc.Close, opened: time.Now(), master: master}
		if master != "" {
			conn.sentinel = c
		}
		lost = dc.SetPubSubHooks(rueidis.PubSubHooks{OnMessage: h.message})
	}
	h.mu.Lock()
	h.dialing = nil
	if err == nil && h.closed {
		err = errClosed
	}
	if err != nil {
		h.failedAt = time.Now()
		h.mu.Unlock()
		if conn != nil {
			conn.cancel()
		}
		run.err = err
		return
	}
	h.conn = conn
	h.wg.Add(1)
	h.mu.Unlock()
	run.conn = conn
	go func() {
		defer h.wg.Done()
		for range lost { // one error at most, then closed: the hooks will not be called again
		}
		h.lost(conn)
	}()
}

// message wakes the watchers of the channel. The subscription stays for the next watchers.
func (h *hub) message(m rueidis.PubSubMessage) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if t := h.topics[m.Channel]; t != nil {
		t.wakeAll()
	}
}

func (t *topic) wakeAll() {
	for ch := range t.watchers {
		close(ch)
		delete(t.watchers, ch)
	}
	t.idle = time.Now()
}

// lost forgets a broken connection and wakes every watcher: what was published while it broke
// is unknown.
func (h *hub) lost(conn *subConn) {
	conn.cancel()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn == conn {
		h.conn = nil
		if time.Since(conn.opened) < subRedialPause { // broke at once: do not loop on it
			h.failedAt = time.Now()
		}
	}
	for _, t := range h.topics {
		if t.on == conn {
			t.on = nil
		}
		t.wakeAll()
	}
}

// janitor drops the channels that have had no watcher for linger (see above).
func (h *hub) janitor() {
	defer h.wg.Done()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-tick.C:
		}
		h.sweep(time.Now().Add(-linger))
		h.followMaster()
	}
}

// masterAddr is the address of the master that a client behind Sentinel sends commands to.
func masterAddr(c rueidis.Client) string {
	for addr := range c.Nodes() { // behind Sentinel, the master alone
		return addr
	}
	return ""
}

// followMaster closes the pub/sub connection behind Sentinel when the client has switched to
// another master since it was opened, so that the next Watch subscribes on the new one. The
// connection does not break by itself when its server is demoted (a forced failover): the old
// master goes on serving as a master until Sentinel reconfigures it, up to some 10 s later, or
// for as long as a partition cuts it off, and never sees the new master's PUBLISH meanwhile. Its
// watchers are woken (they would have waited for a message that never comes) and watch again.
func (h *hub) followMaster() {
	h.mu.Lock()
	conn := h.conn
	h.mu.Unlock()
	if conn == nil || conn.sentinel == nil || masterAddr(conn.sentinel) == conn.master {
		return
	}
	h.mu.Lock()
	if h.conn == conn {
		h.conn = nil
		for _, t := range h.topics {
			if t.on == conn {
				t.on = nil
			}
		}
	}
	h.mu.Unlock()
	conn.cancel() // its lost channel then wakes the watchers
}

// sweep forgets the channels idle since before idleBefore that are not subscribed, and closes
// the connection, so that Redis forgets those that are, when no channel has a watcher or more
// than maxIdleChannels are idle.
func (h *hub) sweep(idleBefore time.Time) {
	h.mu.Lock()
	conn := h.conn
	idle, watched := 0, false
	for name, t := range h.topics {
		switch {
		case len(t.watchers) > 0 || t.busy != nil:
			watched = true
		case t.idle.After(idleBefore):
		case t.on == nil || t.on != conn:
			delete(h.topics, name)
		default:
			idle++
		}
	}
	if conn == nil || idle == 0 || (watched && idle <= maxIdleChannels) {
		h.mu.Unlock()
		return
	}
	h.conn = nil
	for name, t := range h.topics {
		if t.on == conn {
			t.on = nil
		}
		if len(t.watchers) == 0 && t.busy == nil {
			delete(h.topics, name)
		}
	}
	h.mu.Unlock()
	conn.cancel() // its lost channel then wakes the watchers, if any
}

// close wakes every watcher, drops the connection and waits for the hub's goroutines.
func (h *hub) close() {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	h.closed = true
	conn := h.conn
	h.conn = nil
	for _, t := range h.topics {
		t.wakeAll()
	}
	h.mu.Unlock()
	close(h.stop)
	if conn != nil {
		conn.cancel()
	}
	h.wg.Wait()
}
