package crash

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// The harness can run this test binary as a server that is broken on purpose, to show that the
// proof notices. These variables are not IDEMSVC_* ones: the real binary never sees them.
const (
	childEnv    = "CRASHPROOF_CHILD"
	childDirEnv = "CRASHPROOF_DATA_DIR"
	// childEarlyAck serves a bolt store whose complete answers at once and writes 100 ms later.
	childEarlyAck = "early-ack"
)

// runChild serves dir like idemsvc does, over a store broken as mode says, until killed.
func runChild(mode, dir string) int {
	if mode != childEarlyAck {
		fmt.Fprintf(os.Stderr, "unknown %s %q\n", childEnv, mode)
		return 2
	}
	store, err := bolt.OpenDir(dir, bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	srv := server.New(&earlyAckStore{Store: store, delay: 100 * time.Millisecond}, server.Options{Limits: keys.DefaultLimits()})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "{\"level\":\"info\",\"msg\":\"listening\",\"addr\":%q}\n", ln.Addr().String())
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 5 * time.Second}
	err = hs.Serve(ln) // until SIGKILL, or SIGTERM's default action
	fmt.Fprintln(os.Stderr, err)
	return 1
}

// earlyAckStore acknowledges a complete before writing it: it answers with the completed record
// at once and runs the real complete after delay. A kill in between loses an acknowledged write.
type earlyAckStore struct {
	*bolt.Store
	delay time.Duration
}

func (s *earlyAckStore) Complete(ctx context.Context, tenant, key string, req keys.CompleteRequest) (keys.Record, error) {
	rec, err := s.Store.Get(ctx, tenant, key)
	if err != nil {
		return keys.Record{}, err
	}
	go func() {
		time.Sleep(s.delay)
		_, _ = s.Store.Complete(context.Background(), tenant, key, req)
	}()
	resp := req.Response
	rec.State, rec.Response, rec.CompletedAt = keys.StateCompleted, &resp, time.Now()
	return rec, nil
}
