package redis

import (
	"errors"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// TestMinReplicasRetryWaits: a complete that reached the master while the replica was frozen
// answers 503 (outcome unknown); the same complete again (the documented way to learn the
// outcome), and a begin of the key (a replay), must not answer success from the master's copy
// while the replica lacks it (a review's find: they did, and a failover then lost an answered
// complete, and the key ran again). They settle first: a write of the key, then WAIT.
func TestMinReplicasRetryWaits(t *testing.T) {
	_, replica, s, r := replicated(t)
	ctx := t.Context()
	replica.Signal(syscall.SIGSTOP)
	defer replica.Signal(syscall.SIGCONT)
	req := keys.CompleteRequest{Token: r.Record.Lease.Token, Response: testResp}
	if _, err := s.Complete(ctx, "t", "k", req); !errors.Is(err, keys.ErrUnavailable) {
		t.Fatalf("Complete with the replica frozen = %v, want keys.ErrUnavailable", err)
	}
	if _, err := s.Complete(ctx, "t", "k", req); !errors.Is(err, keys.ErrUnavailable) {
		t.Errorf("the same Complete again, the replica still frozen = %v, want keys.ErrUnavailable (answered, not replicated)", err)
	}
	if res, err := s.Begin(ctx, "t", "k", testReq); !errors.Is(err, keys.ErrUnavailable) {
		t.Errorf("Begin of the key, the replica still frozen = %v, %v, want keys.ErrUnavailable (a replay of a record no replica has)", res.Outcome, err)
	}
	replica.Signal(syscall.SIGCONT)
	waitUntil(t, 10*time.Second, "the replica to catch up", func() bool {
		_, err := s.Complete(ctx, "t", "k", req)
		return err == nil
	})
}

// TestClusterMinReplicas: Redis Cluster with a replica per master. With MinReplicas 1 a
// begin and a complete succeed on every shard (the WAIT goes to the script's node: the
// dedicated cluster connection keeps the first command's slot); with one shard's replica frozen,
// that shard's writes answer keys.ErrUnavailable while the others serve.
func TestClusterMinReplicas(t *testing.T) {
	tc := startCluster(t)
	var replicas []*redistest.Server
	for i := range tc.nodes[:3] {
		bus := redistest.FreePort(t)
		r := redistest.StartServer(t, "--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
			"--cluster-port", strconv.Itoa(bus))
		replicas = append(replicas, r)
		rc := &testCluster{nodes: []*redistest.Server{r}}
		rc.do(t, 0, "CLUSTER", "MEET", "127.0.0.1", strconv.Itoa(tc.nodes[0].Port()), strconv.Itoa(tc.bus[0]))
		waitUntil(t, 10*time.Second, "the replica to know its master", func() bool {
			_, err := rc.run(0, "CLUSTER", "REPLICATE", tc.ids[i])
			return err == nil
		})
	}
	for i := range tc.nodes[:3] {
		waitUntil(t, 15*time.Second, "the replicas to sync", func() bool {
			info, err := tc.run(i, "INFO", "replication")
			return err == nil && strings.Contains(info, "connected_slaves:1") && strings.Contains(info, "state=online")
		})
	}
	s := openOn(t, tc.nodes[0].URL(), Options{MinReplicas: 1, Timeout: time.Second})
	ctx := t.Context()
	shardKey := func(i int) string { return keyOn(t, s, clusterSlots[i][0], clusterSlots[i][1]) }
	for i := range 3 {
		k := shardKey(i)
		var r keys.BeginResult
		waitUntil(t, 10*time.Second, "a begin on shard "+strconv.Itoa(i), func() bool {
			var err error
			r, err = s.Begin(ctx, "t", k, testReq)
			return err == nil
		})
		if _, err := s.Complete(ctx, "t", k, keys.CompleteRequest{Token: r.Record.Lease.Token, Response: testResp}); err != nil {
			t.Fatalf("Complete on shard %d with MinReplicas 1: %v", i, err)
		}
	}
	replicas[2].Signal(syscall.SIGSTOP)
	defer replicas[2].Signal(syscall.SIGCONT)
	for i := range 3 {
		k := shardKey(i) + "b"
		for sl := slotOf(s.names("t", k).rec); sl < clusterSlots[i][0] || sl > clusterSlots[i][1]; sl = slotOf(s.names("t", k).rec) {
			k += "x"
		}
		_, err := s.Begin(ctx, "t", k, testReq)
		if i == 2 && !errors.Is(err, keys.ErrUnavailable) {
			t.Errorf("Begin on the shard whose replica is frozen = %v, want keys.ErrUnavailable", err)
		}
		if i != 2 && err != nil {
			t.Errorf("Begin on shard %d, another shard's replica frozen: %v", i, err)
		}
	}
}

// TestMinReplicasDeleteAgain: a delete that reached the master while the replica was frozen
// answers 503, and so does the same delete again, on any connection, while the replica lacks the
// first: the record is gone from the master, but not from what a failover would keep.
func TestMinReplicasDeleteAgain(t *testing.T) {
	master, replica, s, _ := replicated(t)
	ctx := t.Context()
	replica.Signal(syscall.SIGSTOP)
	defer replica.Signal(syscall.SIGCONT)
	if err := s.Delete(ctx, "t", "k"); !errors.Is(err, keys.ErrUnavailable) {
		t.Fatalf("Delete with the replica frozen = %v, want keys.ErrUnavailable", err)
	}
	// Again, through another Store (other connections: a WAIT counts the replicas that have its
	// own connection's writes, and the delete script's PUBLISH is one, so it covers the first).
	other := openOn(t, master.URL(), Options{MinReplicas: 1, Timeout: time.Second})
	for i, st := range []*Store{s, other, other} {
		if err := st.Delete(ctx, "t", "k"); !errors.Is(err, keys.ErrUnavailable) {
			t.Errorf("Delete again (%d), the replica still frozen = %v, want keys.ErrUnavailable", i, err)
		}
	}
}

// TestMinReplicas: with Options.MinReplicas a write is answered once a replica has it; while the
// replica does not answer (frozen), every write fails with keys.ErrUnavailable within the
// operation's time (its outcome unknown), reads go on, and writes resume with the replica. A
// write that finds nothing to write (a begin of a key in progress) does not wait.
func TestMinReplicas(t *testing.T) {
	t.Parallel()
	master, replica, s, r := replicated(t)
	ctx := t.Context()
	if _, err := s.Complete(ctx, "t", "k", keys.CompleteRequest{Token: r.Record.Lease.Token, Response: testResp}); err != nil {
		t.Fatal(err)
	}
	held, err := s.Begin(ctx, "t", "held", testReq)
	if err != nil {
		t.Fatal(err)
	}
	replica.Signal(syscall.SIGSTOP)
	defer replica.Signal(syscall.SIGCONT)
	start := time.Now()
	if _, err := s.Begin(ctx, "t", "k2", testReq); !errors.Is(err, keys.ErrUnavailable) {
		t.Errorf("Begin with the replica frozen = %v, want keys.ErrUnavailable", err)
	}
	if took := time.Since(start); took > 1500*time.Millisecond {
		t.Errorf("Begin with the replica frozen took %v, beyond the 1 s timeout", took)
	}
	if _, err := s.Begin(ctx, "t", "held", testReq); !errors.Is(err, keys.ErrInProgress) {
		t.Errorf("Begin of a held key with the replica frozen = %v, want keys.ErrInProgress (nothing written)", err)
	}
	if rec, err := s.Get(ctx, "t", "k"); err != nil || rec.State != keys.StateCompleted {
		t.Errorf("Get with the replica frozen = %v, %v", rec.State, err)
	}
	replica.Signal(syscall.SIGCONT)
	waitUntil(t, 10*time.Second, "writes to resume", func() bool {
		_, err := s.Complete(ctx, "t", "held", keys.CompleteRequest{Token: held.Record.Lease.Token, Response: testResp})
		return err == nil
	})
	// Without MinReplicas the frozen replica changes nothing.
	plain := openOn(t, master.URL(), Options{Timeout: time.Second})
	replica.Signal(syscall.SIGSTOP)
	if _, err := plain.Begin(ctx, "t", "k3", testReq); err != nil {
		t.Errorf("Begin without MinReplicas, the replica frozen: %v", err)
	}
}

// replicated starts a master and its replica, and a Store on the master with MinReplicas 1 and a
// 1 s timeout; it returns once a begin of key "k" was answered (the replica in sync), and that
// begin.
func replicated(t *testing.T) (master, replica *redistest.Server, s *Store, k keys.BeginResult) {
	t.Helper()
	master = redistest.StartServer(t)
	replica = redistest.StartServer(t, "--replicaof", "127.0.0.1", strconv.Itoa(master.Port()))
	s = openOn(t, master.URL(), Options{MinReplicas: 1, Timeout: time.Second})
	waitUntil(t, 10*time.Second, "the replica to sync", func() bool {
		var err error
		k, err = s.Begin(t.Context(), "t", "k", testReq)
		return err == nil
	})
	return master, replica, s, k
}
