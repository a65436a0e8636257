package redis

import (
	"context"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	neturl "net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// rueidisDriver runs the scripts through rueidis, whose automatic pipelining lets many
// goroutines share a few connections: it was chosen over go-redis by measurement (twice the
// begin+complete pairs/s with 64 goroutines; see BenchmarkBeginComplete and the package doc).
//
// Pub/sub (the hub's watchers, watch.go) has a client of its own, sub, whose connections send no
// keepalive PING: rueidis panics, and the process ends, when a PING on a connection in pub/sub
// mode is answered with an error it does not expect there, and Redis answers PING with MISCONF
// while it refuses writes after a failed save (TestMisconfWithWatchers). The kernel's TCP
// keepalive watches those connections instead, and a watcher polls anyway (keys.BeginWait).
type rueidisDriver struct {
	readLua, casLua, beginLua, delLua, touchLua *rueidis.Lua
	main, sub                                   lazyClient
	// minReplicas is Options.MinReplicas; sources the writing scripts' text and SHA-1 by their
	// Lua, for the writes that go with a WAIT on a connection of their own (see exec).
	minReplicas int
	sources     map[*rueidis.Lua]scriptSource
}

// scriptSource is a script's text and the SHA-1 that EVALSHA names it by.
type scriptSource struct{ text, sha string }

func newScriptSource(text string) scriptSource {
	sum := sha1.Sum([]byte(text))
	return scriptSource{text, hex.EncodeToString(sum[:])}
}

// lazyClient connects a rueidis client on first use.
type lazyClient struct {
	opt rueidis.ClientOption

	mu      sync.Mutex
	c       rueidis.Client // nil until the first successful connection
	dialing *dialRun       // the connection attempt in flight, if any
	dialErr error          // the last failed attempt, reported as is for redialPause
	dialAt  time.Time
	closed  bool
}

type dialRun struct {
	done chan struct{}
	c    rueidis.Client
	err  error
}

// redialPause is how long a failed connection attempt is reported again without a new one,
// so that an outage makes operations fail at once instead of each waiting for a dial.
const redialPause = 100 * time.Millisecond

// subKeepAlive is the TCP keepalive of the pub/sub connections, which send no PING.
var subKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 5 * time.Second, Interval: 5 * time.Second, Count: 3}

var errClosed = errors.New("redis: store closed")

// sentinelRefresh is how often a client on Redis Sentinel asks a Sentinel for the master, besides
// following its +switch-master events: a client that missed the event (its Sentinel was the one
// down, say) would otherwise stay on a demoted master, whose writes answer READONLY (503), until
// a restart.
const sentinelRefresh = 2 * time.Second

func newRueidisDriver(url string, timeout time.Duration, files TLSFiles, sentinel SentinelAuth) (*rueidisDriver, error) {
	if err := checkURLShape(url); err != nil {
		return nil, err
	}
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		return nil, redactURLError(err, url)
	}
	if err := files.apply(opt.TLSConfig); err != nil {
		return nil, err
	}
	if opt.Sentinel.MasterSet == "" && sentinel != (SentinelAuth{}) {
		return nil, errors.New("Sentinel credentials are given, but the URL names no master_set")
	}
	if opt.Sentinel.MasterSet != "" {
		// The URL's addresses are the Sentinels'; its credentials and database the master's.
		// The Sentinels get their own credentials (none by default), the same timeouts, and
		// no keepalive setting of the pub/sub client's (their connections may PING).
		opt.Sentinel.Username, opt.Sentinel.Password = sentinel.Username, sentinel.Password
		opt.Sentinel.Dialer.Timeout = timeout
		opt.Sentinel.TopologyRefreshInterval = sentinelRefresh
	}
	opt.Dialer.Timeout = timeout
	// Notice a Redis that stopped answering within a few operation timeouts, not the default 10s.
	opt.ConnWriteTimeout = max(2*timeout, time.Second)
	// The store fails fast and the caller retries; a retry here would only hide an outage.
	opt.DisableRetry = true
	opt.DisableCache = true
	opt.MaxFlushDelay = flushDelay
	opt.PipelineMultiplex = pipelineMultiplex
	sub := opt
	sub.MaxFlushDelay = 0 // the pub/sub client's few commands are not worth delaying
	// A negative KeepAlive turns rueidis's keepalive PING off (and Go's default TCP keepalive,
	// which KeepAliveConfig turns back on).
	sub.Dialer.KeepAlive, sub.Dialer.KeepAliveConfig = -1, subKeepAlive
	d := &rueidisDriver{
		readLua:  rueidis.NewLuaScriptReadOnly(readScript),
		casLua:   rueidis.NewLuaScript(casScript),
		beginLua: rueidis.NewLuaScript(beginScript),
		delLua:   rueidis.NewLuaScript(delScript),
		touchLua: rueidis.NewLuaScript(touchScript),
		main:     lazyClient{opt: opt},
		sub:      lazyClient{opt: sub},
	}
	d.sources = map[*rueidis.Lua]scriptSource{d.casLua: newScriptSource(casScript), d.beginLua: newScriptSource(beginScript),
		d.delLua: newScriptSource(delScript), d.touchLua: newScriptSource(touchScript)}
	return d, nil
}

// flushDelay is rueidis's MaxFlushDelay: while other commands are waiting for replies, its
// writer waits until this long after its last flush before it flushes again, so that the commands
// of concurrent requests share a write. Without it, on this project's 2-core VM at 64
// connections, every command was a write system call of its own (idemsvc's writes per HTTP
// request, counted in /proc/PID/io: 1.88 for pairs, 1.90 for replays, one of them the HTTP
// answer); with 100 µs, 1.29 and 1.25. Alternately with the code before (scripts/ab.sh, both
// orders, 12 rounds of pairs and 6 of replays), pairs/s 1.11 times, replays/s 1.16, and the
// server's CPU per request 0.88 and 0.85 (medians). 20 µs, tried before, was too short to catch a
// second command, and measured as noise. A lone caller is not delayed: rueidis waits only when
// more than one command is outstanding (1 connection: p50 267 µs with the delay, 273 without).
const flushDelay = 100 * time.Microsecond

// pipelineMultiplex is rueidis's PipelineMultiplex: -1 pipelines every command to a node over one
// connection. rueidis's default for a single node or a Sentinel-managed master is one connection
// with one P, two with two or three (idemsvc runs with at least two, even when pinned to one CPU),
// four with four or more; a cluster already has one per node.
// Each connection has its own writer and reader goroutines and flushes on its own, so two split
// the commands of concurrent requests into two smaller writes and reads. Alternately with two
// (scripts/ab.sh against Redis, 64 connections, 4 rounds each order), pairs/s 1.04 and 1.05 times
// (1 ÷ 0.95), replays/s 1.04, and the server's CPU per request 0.95, 0.96 and 0.95 (medians).
// Redis runs one command at a time whatever the number of connections. The price is
// head-of-line blocking: a large record (a stored body of up to IDEMSVC_MAX_BODY_BYTES) that is
// being sent or received delays every command behind it, where with two connections it delayed
// about half of them. With 4 clients replaying 1 MB records beside 32 making small pairs (two
// runs each, loopback), the small pairs made 0.95 times as many (1,450 and 1,448 a second
// against 1,537 and 1,498), p50 11.0 and 11.0 ms against 9.9 and 10.3, p99 23.3 and 23.3
// against 24.8 and 24.2. Most stored responses are small, so one connection it is; blocking
// commands go to rueidis's separate pool (the Store sends none).
const pipelineMultiplex = -1

// client returns the connected client for commands and scripts.
func (d *rueidisDriver) client(ctx context.Context) (rueidis.Client, error) { return d.main.get(ctx) }

// subClient returns the connected client for pub/sub, whose connections send no PING.
func (d *rueidisDriver) subClient(ctx context.Context) (rueidis.Client, error) {
	return d.sub.get(ctx)
}

// get returns the connected client. Until the first connection succeeds it starts one attempt
// at a time in the background and waits for it as long as ctx allows. Once connected, rueidis
// reconnects by itself.
func (l *lazyClient) get(ctx context.Context) (rueidis.Client, error) {
	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		return nil, errClosed
	case l.c != nil:
		c := l.c
		l.mu.Unlock()
		return c, nil
	case l.dialing == nil && l.dialErr != nil && time.Since(l.dialAt) < redialPause:
		err := l.dialErr
		l.mu.Unlock()
		return nil, err
	}
	run := l.dialing
	if run == nil {
		run = &dialRun{done: make(chan struct{})}
		l.dialing = run
		go l.dial(run)
	}
	l.mu.Unlock()
	select {
	case <-run.done:
		return run.c, run.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (l *lazyClient) dial(run *dialRun) {
	defer close(run.done)
	c, err := rueidis.NewClient(l.opt)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.dialing = nil
	switch {
	case err != nil:
		l.dialErr, l.dialAt = err, time.Now()
		run.err = err
	case l.closed:
		c.Close()
		run.err = errClosed
	default:
		l.c, l.dialErr = c, nil
		run.c = c
	}
}

func (l *lazyClient) close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	c, run := l.c, l.dialing
	l.mu.Unlock()
	if run != nil {
		<-run.done // it sees closed and closes what it connected
	}
	if c != nil {
		c.Close()
	}
}

func (d *rueidisDriver) read(ctx context.Context, key string) (reply, error) {
	c, err := d.client(ctx)
	if err != nil {
		return reply{}, err
	}
	arr, err := d.readLua.Exec(ctx, c, []string{key}, nil).ToArray()
	if err != nil {
		return reply{}, err
	}
	if len(arr) != 3 {
		return reply{}, errors.New("redis: read script returned a bad reply")
	}
	var r reply
	if err := r.setTime(arr[1], arr[2]); err != nil {
		return reply{}, err
	}
	return r, r.setValue(arr[0])
}

func (d *rueidisDriver) cas(ctx context.Context, keys [2]string, args []string) (reply, error) {
	return d.write(ctx, d.casLua, keys, args)
}

func (d *rueidisDriver) begin(ctx context.Context, keys [2]string, args []string) (reply, error) {
	return d.write(ctx, d.beginLua, keys, args)
}

// write runs casScript or beginScript: {1, fence, sec, usec} or {0, value or nil, sec, usec}.
func (d *rueidisDriver) write(ctx context.Context, lua *rueidis.Lua, keys [2]string, args []string) (reply, error) {
	c, err := d.client(ctx)
	if err != nil {
		return reply{}, err
	}
	arr, err := d.exec(ctx, c, lua, keys[:], args)
	if err != nil {
		return reply{}, err
	}
	if len(arr) != 4 {
		return reply{}, errors.New("redis: write script returned a bad reply")
	}
	var r reply
	if err := r.setTime(arr[2], arr[3]); err != nil {
		return reply{}, err
	}
	ok, err := arr[0].AsInt64()
	if err != nil {
		return reply{}, err
	}
	if ok == 1 {
		r.wrote = true
		r.fence, err = arr[1].ToString()
		return r, err
	}
	return r, r.setValue(arr[1])
}

// exec runs a writing script, whose reply's first element is 1 when it wrote. With minReplicas
// it runs it on a connection of its own and, when it wrote, a WAIT after it on that connection
// (WAIT counts the replicas that have the connection's writes): a write that fewer replicas
// acknowledged within the operation's time fails with errNotReplicated. It may be on the
// master, but it is not answered, so a failover cannot lose an answered write
// (Options.MinReplicas).
func (d *rueidisDriver) exec(ctx context.Context, c rueidis.Client, lua *rueidis.Lua, keys, args []string) ([]rueidis.RedisMessage, error) {
	if d.minReplicas <= 0 {
		return lua.Exec(ctx, c, keys, args).ToArray()
	}
	src := d.sources[lua]
	var arr []rueidis.RedisMessage
	err := c.Dedicated(func(dc rueidis.DedicatedClient) error {
		res := dc.Do(ctx, dc.B().Evalsha().Sha1(src.sha).Numkeys(int64(len(keys))).Key(keys...).Arg(args...).Build())
		if err := res.Error(); err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT") {
			res = dc.Do(ctx, dc.B().Eval().Script(src.text).Numkeys(int64(len(keys))).Key(keys...).Arg(args...).Build())
		}
		var err error
		if arr, err = res.ToArray(); err != nil {
			return err
		}
		if len(arr) == 0 {
			return errors.New("redis: write script returned an empty reply")
		}
		if wrote, err := arr[0].AsInt64(); err != nil || wrote != 1 {
			return err // nothing written: nothing to wait for
		}
		ms := int64(1000) // without a deadline (op always sets one)
		if deadline, ok := ctx.Deadline(); ok {
			ms = max(time.Until(deadline).Milliseconds()*9/10, 1) // its answer before the deadline
		}
		n, err := dc.Do(ctx, dc.B().Wait().Numreplicas(int64(d.minReplicas)).Timeout(ms).Build()).AsInt64()
		if err != nil {
			return err
		}
		if n < int64(d.minReplicas) {
			return fmt.Errorf("%w: %d of %d replicas acknowledged it in time", errNotReplicated, n, d.minReplicas)
		}
		return nil
	})
	return arr, err
}

// settle returns once Options.MinReplicas replicas have what the master holds for the key
// (an answer taken from a record that a write reported unavailable may have left unreplicated):
// touchScript rewrites the key's fence counter (or record) unchanged, and exec WAITs for it.
func (d *rueidisDriver) settle(ctx context.Context, keys [2]string) error {
	if d.minReplicas <= 0 {
		return nil
	}
	c, err := d.client(ctx)
	if err != nil {
		return err
	}
	_, err = d.exec(ctx, c, d.touchLua, keys[:], nil)
	return err
}

// errNotReplicated is a write that fewer replicas than Options.MinReplicas acknowledged: its
// outcome is unknown (503), as a timeout's.
var errNotReplicated = errors.New("redis: write not acknowledged by enough replicas")

func (r *reply) setTime(sec, usec rueidis.RedisMessage) error {
	var err1, err2 error
	r.sec, err1 = sec.AsInt64()
	r.usec, err2 = usec.AsInt64()
	return errors.Join(err1, err2)
}

func (r *reply) setValue(m rueidis.RedisMessage) error {
	if m.IsNil() {
		return nil
	}
	v, err := m.ToString()
	r.val, r.exists = v, err == nil
	return err
}

func (d *rueidisDriver) time(ctx context.Context) (sec, usec int64, err error) {
	c, err := d.client(ctx)
	if err != nil {
		return 0, 0, err
	}
	arr, err := c.Do(ctx, c.B().Time().Build()).ToArray()
	if err != nil {
		return 0, 0, err
	}
	if len(arr) != 2 {
		return 0, 0, errors.New("redis: TIME returned a bad reply")
	}
	var r reply
	err = r.setTime(arr[0], arr[1])
	return r.sec, r.usec, err
}

// del runs delScript: {1 or 0, sec, usec}.
func (d *rueidisDriver) del(ctx context.Context, key, channel, notAfter string) (reply, error) {
	c, err := d.client(ctx)
	if err != nil {
		return reply{}, err
	}
	arr, err := d.exec(ctx, c, d.delLua, []string{key}, []string{channel, notAfter})
	if err != nil {
		return reply{}, err
	}
	if len(arr) != 3 {
		return reply{}, errors.New("redis: delete script returned a bad reply")
	}
	var r reply
	if err := r.setTime(arr[1], arr[2]); err != nil {
		return reply{}, err
	}
	n, err := arr[0].AsInt64()
	r.wrote = n == 1
	return r, err
}

func (d *rueidisDriver) ping(ctx context.Context) error {
	c, err := d.client(ctx)
	if err != nil {
		return err
	}
	return c.Do(ctx, c.B().Ping().Build()).Error()
}

func (d *rueidisDriver) info(ctx context.Context, section string) (string, error) {
	c, err := d.client(ctx)
	if err != nil {
		return "", err
	}
	return infoEvery(ctx, c, section)
}

// infoEvery runs INFO section on Redis, or on every node of a Redis Cluster: there a command
// without a key goes to any one node, and a maxmemory-policy or version read on one says nothing
// of the others (a key's own node is the one that evicts it). It returns the replies joined,
// those of nodes that fail a check first, so that infoField reads the one that matters. A node
// that cannot be reached is left out while another answers (its keys fail by themselves).
func infoEvery(ctx context.Context, c rueidis.Client, section string) (string, error) {
	if c.Mode() != rueidis.ClientModeCluster {
		return c.Do(ctx, c.B().Info().Section(section).Build()).ToString()
	}
	// All nodes at once, each within a third of the time left: a node that does not answer (a
	// partition, a frozen process) must not use up the time of the whole check, which would
	// fail every Ping that reads the policy, on every replica, until the cluster fails it over.
	nodes := slices.Collect(maps.Values(c.Nodes()))
	nctx, cancel := shareOf(ctx, 3)
	defer cancel()
	type answer struct {
		info string
		err  error
	}
	answers := atOnce(nctx, len(nodes), func(i int) answer {
		info, err := nodes[i].Do(nctx, nodes[i].B().Info().Section(section).Build()).ToString()
		return answer{info, err}
	}, func(err error) answer { return answer{err: err} })
	var bad, good []string
	var lastErr error
	for _, a := range answers {
		s, err := a.info, a.err
		if err != nil {
			if _, reply := rueidis.IsRedisErr(err); reply {
				return "", err
			}
			lastErr = err
			continue
		}
		if mayEvict(infoField(s, "maxmemory_policy")) || checkVersion(s) != nil {
			bad = append(bad, s)
		} else {
			good = append(good, s)
		}
	}
	if len(bad)+len(good) == 0 {
		return "", lastErr
	}
	return strings.Join(append(bad, good...), "\r\n"), nil
}

// shareOf returns ctx bounded to 1/n of the time it has left (all of it, without a deadline).
func shareOf(ctx context.Context, n int) (context.Context, context.CancelFunc) {
	if d, ok := ctx.Deadline(); ok {
		return context.WithTimeout(ctx, time.Until(d)/time.Duration(n))
	}
	return context.WithCancel(ctx)
}

// slots returns the ranges of hash slots that CLUSTER SLOTS reports, on Redis Cluster; nothing
// on a single Redis.
func (d *rueidisDriver) slots(ctx context.Context) ([][2]uint16, error) {
	c, err := d.client(ctx)
	if err != nil {
		return nil, err
	}
	if c.Mode() != rueidis.ClientModeCluster {
		return nil, nil
	}
	entries, err := c.Do(ctx, c.B().ClusterSlots().Build()).ToArray()
	if err != nil {
		return nil, err
	}
	ranges := make([][2]uint16, 0, len(entries))
	for _, e := range entries {
		fields, err := e.ToArray()
		if err != nil || len(fields) < 2 {
			return nil, fmt.Errorf("CLUSTER SLOTS: an entry that is not [start, end, ...]: %v", err)
		}
		lo, err1 := fields[0].AsInt64()
		hi, err2 := fields[1].AsInt64()
		if err := errors.Join(err1, err2); err != nil || lo < 0 || hi < lo || hi > 16383 {
			return nil, fmt.Errorf("CLUSTER SLOTS: a range that is not one of slots: %d-%d %v", lo, hi, err)
		}
		ranges = append(ranges, [2]uint16{uint16(lo), uint16(hi)})
	}
	return ranges, nil
}

// tryAgain reports whether err is Redis Cluster's TRYAGAIN: a script's keys (a record and its
// fence counter) are in a slot being migrated and not all on one side yet. The script did not
// run, so the operation may run it again once the migration has moved them.
func tryAgain(err error) bool {
	var re *rueidis.RedisError
	return errors.As(err, &re) && re.IsTryAgain()
}

// marker runs SET key candidate NX GET: it stores candidate when key is absent (created) and
// returns the value key holds afterwards.
func (d *rueidisDriver) marker(ctx context.Context, key, candidate string) (current string, created bool, err error) {
	c, err := d.client(ctx)
	if err != nil {
		return "", false, err
	}
	old, err := c.Do(ctx, c.B().Set().Key(key).Value(candidate).Nx().Get().Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return candidate, true, nil
	}
	return old, false, err
}

// gets runs GET on every key at once (see atOnce: on Redis Cluster a node that does not
// answer delays only its own keys, and none beyond ctx).
func (d *rueidisDriver) gets(ctx context.Context, keys []string) []gotValue {
	failed := func(err error) gotValue { return gotValue{err: err} }
	c, err := d.client(ctx)
	if err != nil {
		got := make([]gotValue, len(keys))
		for i := range got {
			got[i] = failed(err)
		}
		return got
	}
	return atOnce(ctx, len(keys), func(i int) gotValue {
		var g gotValue
		g.value, g.ok, g.err = getValue(c.Do(ctx, c.B().Get().Key(keys[i]).Build()))
		return g
	}, failed)
}

// atOnce runs call(0) ... call(n-1) each in a goroutine of its own and returns their answers,
// once all are in or ctx is done: those not in by then are late(ctx's error). rueidis does not
// always return at ctx's end (a command to a node that stopped answering waits for the
// connection to be dialled again, bounded by the dial timeout only), so the check does not wait
// for it; the goroutine ends with that call.
func atOnce[T any](ctx context.Context, n int, call func(i int) T, late func(error) T) []T {
	type indexed struct {
		i int
		v T
	}
	in := make(chan indexed, n) // buffered: a late call's goroutine does not block
	for i := range n {
		go func() { in <- indexed{i, call(i)} }()
	}
	answers := make([]T, n)
	got := make([]bool, n)
	for left := n; left > 0; left-- {
		select {
		case a := <-in:
			answers[a.i], got[a.i] = a.v, true
		case <-ctx.Done():
			for i := range answers {
				if !got[i] {
					answers[i] = late(ctx.Err())
				}
			}
			return answers
		}
	}
	return answers
}

// getValue is a GET's reply: the value, and whether the key exists.
func getValue(r rueidis.RedisResult) (string, bool, error) {
	v, err := r.ToString()
	if rueidis.IsRedisNil(err) {
		return "", false, nil
	}
	return v, err == nil, err
}

// unavailable: every error that is not a Redis error reply is the connection's (dial, I/O,
// closed, timeout); of the replies, those that say the server cannot serve now.
func (d *rueidisDriver) unavailable(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	if !ok {
		return !errors.Is(err, errClosed)
	}
	return transientReply(re.Error())
}

func (d *rueidisDriver) denied(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	return ok && deniedByACL(re.Error())
}

func (d *rueidisDriver) close() {
	d.main.close()
	d.sub.close()
}

// transientReply reports whether a Redis error reply means the server cannot serve now
// (loading, a replica, failing over, out of memory, busy with a script, refusing writes since a
// save failed, refusing our credentials or, inside a script, a command or channel) rather than a
// bug in the request.
func transientReply(msg string) bool {
	if deniedInScript(msg) {
		return true
	}
	code, _, _ := strings.Cut(msg, " ")
	switch code {
	case "LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "OOM", "MISCONF",
		"NOREPLICAS", "MOVED", "ASK", "NOAUTH", "WRONGPASS", "NOPERM":
		return true
	}
	return false
}

// deniedInScript reports whether a Redis error reply is the ACL refusing a command or a channel
// to a script. Redis 7.0 sends it with the code ERR, not NOPERM ("ERR ... The user executing the
// script can't run this command or subcommand", "... can't publish to the channel mentioned in
// the command"; later versions say "ACL failure in script"): an operator took a permission away
// after the checks passed (an audit's find: every complete and delete answered 500, with an
// error line each).
func deniedInScript(msg string) bool {
	return strings.Contains(msg, "user executing the script") || strings.Contains(msg, "ACL failure in script")
}

// deniedByACL reports whether a Redis error reply is the ACL refusing something: NOPERM (a
// command, key or channel of our own), or a refusal inside a script.
func deniedByACL(msg string) bool {
	return strings.HasPrefix(msg, "NOPERM") || deniedInScript(msg)
}

// checkURLShape refuses a URL that names no server: rueidis.ParseURL reads "redis:pw@host:6379"
// (no "//") as localhost:6379, database 0, without a password, which would connect to some other
// Redis instead of failing. Its error never quotes the URL, which may hold a password.
func checkURLShape(raw string) error {
	u, err := neturl.Parse(raw)
	if err != nil {
		// url.Parse's error quotes a piece of the URL: of a password holding '/', '#', '?' or a
		// '%' not followed by two hex digits, a piece of the password ("invalid port \":pass\"").
		return errors.New("invalid URL: it does not parse" + encodeHint)
	}
	// A password holding '#', '/' or '?' unencoded ends the host there: what follows, password
	// included, becomes the fragment, the path or a parameter ("redis://u:4242#pw@host" is the
	// server u, port 4242), and is shown as such.
	if u.Fragment != "" || strings.Contains(raw, "#") {
		return errors.New("invalid URL: it holds '#'" + encodeHint)
	}
	if u.Scheme != "unix" && u.Opaque == "" && !dbPath(u.Path) {
		return errors.New("invalid URL: the path is not /db (a number)" + encodeHint)
	}
	// rueidis reads more parameters, but the store sets what they would (timeouts, retries,
	// the client cache), or does not work with them: a parameter it ignored, or one with a
	// password in it, used to be taken silently.
	q := u.Query()
	for name := range q {
		if !urlParam(u, name) {
			shown := "a parameter"
			if len(name) <= 32 && !strings.ContainsFunc(name, func(r rune) bool { return (r < 'a' || r > 'z') && r != '_' }) {
				shown = "the parameter " + name
			}
			return fmt.Errorf("invalid URL: %s is not one idemsvc reads (db, client_name, master_set and addr, and with rediss:// skip_verify)%s", shown, encodeHint)
		}
	}
	if err := checkSentinelParams(u, q); err != nil {
		return err
	}
	if u.Scheme == "unix" {
		if u.Path == "" || u.Host != "" {
			// unix://var/run/redis.sock is the host var and the socket /run/redis.sock.
			return errors.New("invalid URL: a unix URL is unix:///absolute/path/to/redis.sock (three slashes), with the database as ?db=N")
		}
		return nil
	}
	if u.Opaque != "" || u.Host == "" {
		return errors.New("invalid URL: it names no server; the form is redis://[user:password@]host:port[/db], or rediss:// for TLS")
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("invalid URL: the port %q is not a number from 1 to 65535", p)
		}
	}
	return nil
}

// encodeHint ends the errors of a URL that a password holding a reserved character breaks.
const encodeHint = "; a user name or password holding @ : / ? # or % must be percent-encoded (%40 %3A %2F %3F %23 %25)"

// dbPath reports whether path is one rueidis reads as a database: "" or "/N".
func dbPath(path string) bool {
	rest, ok := strings.CutPrefix(path, "/")
	return path == "" || ok && rest != "" && !strings.ContainsFunc(rest, func(r rune) bool { return r < '0' || r > '9' })
}

// urlParam reports whether name is a query parameter of u that the store reads: db, client_name,
// master_set and addr (Redis Sentinel), and with rediss:// skip_verify.
func urlParam(u *neturl.URL, name string) bool {
	return name == "db" || name == "client_name" || name == "master_set" || name == "addr" ||
		name == "skip_verify" && u.Scheme == "rediss"
}

// checkSentinelParams checks the parameters of Redis Sentinel: master_set, once and not empty,
// names the master that the Sentinels at the URL's host (and at each addr=host:port) monitor.
// Without master_set, rueidis would take addr for more nodes of one Redis (a cluster's), which
// idemsvc does not read. Sentinel is refused with rediss:// (rueidis would talk to the Sentinels
// in clear, and verify the master's certificate against the first Sentinel's host name) and with
// unix:// (the Sentinels report TCP addresses).
func checkSentinelParams(u *neturl.URL, q neturl.Values) error {
	sets, addrs := q["master_set"], q["addr"]
	if len(sets) == 0 {
		if len(addrs) > 0 {
			return errors.New("invalid URL: addr (another Sentinel's address) goes with master_set (Redis Sentinel) only; " +
				"idemsvc reads no other address for one Redis, and finds a cluster's nodes from the one in the URL")
		}
		return nil
	}
	switch {
	case len(sets) > 1 || sets[0] == "":
		return errors.New("invalid URL: master_set must be given once, with the name of the master the Sentinels monitor")
	case u.Scheme != "redis":
		return errors.New("invalid URL: master_set (Redis Sentinel) needs redis://: idemsvc does not support Sentinel with TLS or a unix socket")
	}
	for _, a := range addrs {
		host, port, err := net.SplitHostPort(a)
		n, perr := strconv.Atoi(port)
		if err != nil || host == "" || perr != nil || n < 1 || n > 65535 || strings.ContainsAny(a, "@/") {
			return errors.New("invalid URL: each addr is a Sentinel's host:port, with a port from 1 to 65535" + encodeHint)
		}
	}
	return nil
}

// ShownURL is the Redis URL raw as it may be logged: without its password (url.Parse's reading:
// the password ends at the last @, and may hold @), with the values of parameters the store
// does not read hidden ("?password=..."; Open refuses such a URL, after a caller logged it), and
// nothing at all of a URL that does not parse or names no server ("redis:pw@host", where
// Redacted would show pw).
func ShownURL(raw string) string {
	u, err := neturl.Parse(raw)
	switch {
	case err != nil:
		return "(does not parse)"
	case u.Opaque != "":
		return "(names no server)"
	case u.Fragment != "" || strings.Contains(raw, "#") || u.Scheme != "unix" && !dbPath(u.Path):
		// A password holding '#' or '/' unencoded: the rest of it is the fragment or the path.
		return "(not shown: a password in it may be unencoded)"
	}
	q := u.Query()
	for name := range q {
		if !urlParam(u, name) {
			if strings.Contains(name, "@") { // "redis://u:42?pw@host": the name is the password's
				return "(not shown: a password in it may be unencoded)"
			}
			q[name] = []string{"xxxxx"}
		}
	}
	u.RawQuery = q.Encode()
	return u.Redacted()
}

// redactURLError is err without the URL it may quote (url.Parse's errors quote it whole, password
// included) and without the password anywhere: what it says ends up in logs.
func redactURLError(err error, raw string) error {
	var ue *neturl.Error
	if errors.As(err, &ue) {
		err = fmt.Errorf("invalid URL: %w", ue.Err)
	}
	msg := err.Error()
	if u, perr := neturl.Parse(raw); perr == nil {
		if p, ok := u.User.Password(); ok && p != "" {
			msg = strings.ReplaceAll(msg, p, "xxxxx")
		}
		msg = strings.ReplaceAll(msg, raw, u.Redacted())
	} else if i := strings.LastIndex(raw, "@"); i > 0 {
		msg = strings.ReplaceAll(msg, raw[:i], "xxxxx") // scheme and credentials, unparsed
	}
	return errors.New(msg)
}

// apply sets the CA and the client certificate of files on cfg, the TLS configuration of a
// rediss:// URL (nil for another).
func (f TLSFiles) apply(cfg *tls.Config) error {
	if f == (TLSFiles{}) {
		return nil
	}
	if cfg == nil {
		return errors.New("TLS files are given, but the URL is not rediss://")
	}
	if (f.CertFile == "") != (f.KeyFile == "") {
		return errors.New("a TLS client certificate needs both its file and its key's")
	}
	if f.CAFile != "" {
		pem, err := os.ReadFile(f.CAFile)
		if err != nil {
			return fmt.Errorf("TLS CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("TLS CA file %s: no PEM certificate in it", f.CAFile)
		}
		cfg.RootCAs = pool
	}
	if f.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return fmt.Errorf("TLS client certificate: %w", err)
		}
		var last atomic.Pointer[tls.Certificate]
		last.Store(&cert)
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if c, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile); err == nil {
				last.Store(&c) // renewed in place: the next connection presents the new one
			}
			return last.Load(), nil
		}
	}
	return nil
}

// SkipsVerify reports whether the URL turns off the verification of Redis's certificate
// (rediss:// with skip_verify, which rueidis also reads bare or as 1, t, TRUE, ...).
func SkipsVerify(raw string) bool {
	opt, err := rueidis.ParseURL(raw)
	return err == nil && opt.TLSConfig != nil && opt.TLSConfig.InsecureSkipVerify
}
