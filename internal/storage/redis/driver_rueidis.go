package redis

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"
)

// rueidisDriver runs the scripts through rueidis, whose automatic pipelining lets many
// goroutines share a few connections: it was chosen over go-redis by measurement (twice the
// begin+complete pairs/s with 64 goroutines; see BenchmarkBeginComplete and the package doc).
type rueidisDriver struct {
	opt                     rueidis.ClientOption
	readLua, casLua, delLua *rueidis.Lua

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

var errClosed = errors.New("redis: store closed")

func newRueidisDriver(url string, timeout time.Duration) (*rueidisDriver, error) {
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		return nil, err
	}
	opt.Dialer.Timeout = timeout
	// Notice a Redis that stopped answering within a few operation timeouts, not the default 10s.
	opt.ConnWriteTimeout = max(2*timeout, time.Second)
	// The store fails fast and the caller retries; a retry here would only hide an outage.
	opt.DisableRetry = true
	opt.DisableCache = true
	return &rueidisDriver{
		opt:     opt,
		readLua: rueidis.NewLuaScriptReadOnly(readScript),
		casLua:  rueidis.NewLuaScript(casScript),
		delLua:  rueidis.NewLuaScript(delScript),
	}, nil
}

// client returns the connected client. Until the first connection succeeds it starts one
// attempt at a time in the background and waits for it as long as ctx allows. Once connected,
// rueidis reconnects by itself.
func (d *rueidisDriver) client(ctx context.Context) (rueidis.Client, error) {
	d.mu.Lock()
	switch {
	case d.closed:
		d.mu.Unlock()
		return nil, errClosed
	case d.c != nil:
		c := d.c
		d.mu.Unlock()
		return c, nil
	case d.dialing == nil && d.dialErr != nil && time.Since(d.dialAt) < redialPause:
		err := d.dialErr
		d.mu.Unlock()
		return nil, err
	}
	run := d.dialing
	if run == nil {
		run = &dialRun{done: make(chan struct{})}
		d.dialing = run
		go d.dial(run)
	}
	d.mu.Unlock()
	select {
	case <-run.done:
		return run.c, run.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (d *rueidisDriver) dial(run *dialRun) {
	defer close(run.done)
	c, err := rueidis.NewClient(d.opt)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dialing = nil
	switch {
	case err != nil:
		d.dialErr, d.dialAt = err, time.Now()
		run.err = err
	case d.closed:
		c.Close()
		run.err = errClosed
	default:
		d.c, d.dialErr = c, nil
		run.c = c
	}
}

func (d *rueidisDriver) read(ctx context.Context, key string) (string, bool, int64, int64, error) {
	c, err := d.client(ctx)
	if err != nil {
		return "", false, 0, 0, err
	}
	arr, err := d.readLua.Exec(ctx, c, []string{key}, nil).ToArray()
	if err != nil {
		return "", false, 0, 0, err
	}
	if len(arr) != 3 {
		return "", false, 0, 0, errors.New("redis: read script returned a bad reply")
	}
	sec, err1 := arr[1].AsInt64()
	usec, err2 := arr[2].AsInt64()
	if err := errors.Join(err1, err2); err != nil {
		return "", false, 0, 0, err
	}
	if arr[0].IsNil() {
		return "", false, sec, usec, nil
	}
	val, err := arr[0].ToString()
	return val, err == nil, sec, usec, err
}

func (d *rueidisDriver) cas(ctx context.Context, keys [2]string, args []string) (bool, string, error) {
	c, err := d.client(ctx)
	if err != nil {
		return false, "", err
	}
	arr, err := d.casLua.Exec(ctx, c, keys[:], args).ToArray()
	if err != nil {
		return false, "", err
	}
	if len(arr) == 0 {
		return false, "", errors.New("redis: write script returned a bad reply")
	}
	if ok, err := arr[0].AsInt64(); err != nil || ok != 1 {
		return false, "", err
	}
	if len(arr) != 2 {
		return false, "", errors.New("redis: write script returned a bad reply")
	}
	fence, err := arr[1].ToString()
	return err == nil, fence, err
}

func (d *rueidisDriver) del(ctx context.Context, key, channel string) error {
	c, err := d.client(ctx)
	if err != nil {
		return err
	}
	return d.delLua.Exec(ctx, c, []string{key}, []string{channel}).Error()
}

func (d *rueidisDriver) ping(ctx context.Context) error {
	c, err := d.client(ctx)
	if err != nil {
		return err
	}
	return c.Do(ctx, c.B().Ping().Build()).Error()
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

func (d *rueidisDriver) close() {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return
	}
	d.closed = true
	c, run := d.c, d.dialing
	d.mu.Unlock()
	if run != nil {
		<-run.done // it sees closed and closes what it connected
	}
	if c != nil {
		c.Close()
	}
}

// transientReply reports whether a Redis error reply means the server cannot serve now
// (loading, a replica, failing over, out of memory, busy with a script, refusing our credentials)
// rather than a bug in the request.
func transientReply(msg string) bool {
	code, _, _ := strings.Cut(msg, " ")
	switch code {
	case "LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "OOM",
		"NOREPLICAS", "MOVED", "ASK", "NOAUTH", "WRONGPASS", "NOPERM":
		return true
	}
	return false
}
