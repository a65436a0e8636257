package redis

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// TestOneConnectionForCommands: the commands of many concurrent operations share one connection
// to Redis (pipelineMultiplex), so that they share its writes and reads. With rueidis's default
// they went over two with GOMAXPROCS 2 or 3, and four with more.
func TestOneConnectionForCommands(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	s := openOn(t, srv.URL(), Options{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 64 {
		wg.Go(func() {
			for i := range 20 {
				key := "k" + strconv.Itoa(g) + "-" + strconv.Itoa(i)
				if _, err := s.Begin(t.Context(), "t", key, keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
					errs <- fmt.Errorf("begin %s: %w", key, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	admin, err := rueidis.NewClient(rueidis.ClientOption{
		InitAddress: []string{fmt.Sprintf("127.0.0.1:%d", srv.Port())}, DisableCache: true, PipelineMultiplex: -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	self, err := admin.Do(ctx, admin.B().ClientId().Build()).AsInt64()
	if err != nil {
		t.Fatal(err)
	}
	list, err := admin.Do(ctx, admin.B().ClientList().Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	// The connections whose last command was one of the Store's scripts. The Store has one
	// more, idle, on which rueidis asked whether Redis is a cluster (CLUSTER SLOTS).
	var scripts, all []string
	for line := range strings.Lines(strings.TrimSpace(list)) {
		if strings.Contains(line, "id="+strconv.FormatInt(self, 10)+" ") {
			continue
		}
		all = append(all, strings.TrimSpace(line))
		if strings.Contains(line, " cmd=evalsha ") || strings.Contains(line, " cmd=eval ") {
			scripts = append(scripts, line)
		}
	}
	if len(scripts) != 1 {
		t.Errorf("the Store ran its scripts over %d connections, want 1:\n%s", len(scripts), strings.Join(all, "\n"))
	}
}
