package redis

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// The Store on Redis Cluster: three masters of the test's own, started by each test, that
// share the slots as clusterSlots says.

var clusterSlots = [][2]uint16{{0, 5460}, {5461, 10922}, {10923, 16383}}

type testCluster struct {
	nodes []*redistest.Server
	bus   []int // the cluster bus ports
	ids   []string
}

func startCluster(t *testing.T) *testCluster {
	t.Helper()
	tc := &testCluster{}
	for range len(clusterSlots) {
		// The bus port of its own: by default it is the port + 10000, beyond 65535 (and refused)
		// for a quarter of the ports that FreePort may return.
		bus := redistest.FreePort(t)
		tc.nodes = append(tc.nodes, redistest.StartServer(t, "--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
			"--cluster-port", strconv.Itoa(bus)))
		tc.bus = append(tc.bus, bus)
	}
	for i := range tc.nodes {
		tc.ids = append(tc.ids, tc.do(t, i, "CLUSTER", "MYID"))
		if i > 0 {
			tc.do(t, i, "CLUSTER", "MEET", "127.0.0.1", strconv.Itoa(tc.nodes[0].Port()), strconv.Itoa(tc.bus[0]))
		}
	}
	for i, r := range clusterSlots {
		tc.do(t, i, "CLUSTER", "ADDSLOTSRANGE", strconv.Itoa(int(r[0])), strconv.Itoa(int(r[1])))
	}
	deadline := time.Now().Add(10 * time.Second)
	for i := range tc.nodes {
		for !strings.Contains(tc.do(t, i, "CLUSTER", "INFO"), "cluster_state:ok") ||
			strings.Count(tc.do(t, i, "CLUSTER", "NODES"), "connected") < len(tc.nodes) {
			if time.Now().After(deadline) {
				t.Fatal("the test cluster did not come up")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return tc
}

// do runs a command on node i alone and returns its reply as text (redistest.Server.Do would
// send a command without a key to any node of the cluster).
func (tc *testCluster) do(t *testing.T, i int, args ...string) string {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{
		InitAddress: []string{fmt.Sprintf("127.0.0.1:%d", tc.nodes[i].Port())}, DisableCache: true, ForceSingleClient: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := c.Do(context.Background(), c.B().Arbitrary(args...).Build()).ToString()
	if err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	return v
}

// keyOn returns a key of tenant "t" whose Redis keys are in slot range [lo, hi] (s's names).
func keyOn(t *testing.T, s *Store, lo, hi uint16) string {
	for i := 0; ; i++ {
		k := "k" + strconv.Itoa(i)
		if sl := slotOf(s.names("t", k).rec); sl >= lo && sl <= hi {
			return k
		}
	}
}

func slotOf(key string) uint16 {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16
	for _, b := range []byte(key) {
		crc ^= uint16(b) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc % 16384
}

// TestClusterACLWithoutSlots: on Redis Cluster a user with the single-node ACL may not run CLUSTER
// SLOTS; rueidis then treats the node it was given as a single Redis, and every key of another
// node fails with MOVED. Open must say so, not serve half the keys.
func TestClusterACLWithoutSlots(t *testing.T) {
	tc := startCluster(t)
	for i := range tc.nodes {
		tc.do(t, i, append([]string{"ACL", "SETUSER", "idem", "reset", "on", ">pw"}, strings.Fields(ACL(""))...)...)
	}
	url := tc.nodes[0].UserURL("idem", "pw")
	s, err := Open(t.Context(), url, Options{})
	if err == nil {
		defer s.Close()
		_, berr := s.Begin(t.Context(), "t", keyOn(t, s, clusterSlots[1][0], clusterSlots[1][1]), testReq)
		t.Fatalf("Open without +cluster|slots succeeded (a begin of a key on the other node: %v)", berr)
	}
	wantMisconfigured(t, "Open", err, "cluster|slots")

	for i := range tc.nodes {
		tc.do(t, i, "ACL", "SETUSER", "idem", "+cluster|slots", "+cluster|shards")
	}
	s = openOn(t, url, Options{})
	for _, k := range []string{keyOn(t, s, clusterSlots[0][0], clusterSlots[0][1]), keyOn(t, s, clusterSlots[1][0], clusterSlots[1][1])} {
		if r, err := s.Begin(t.Context(), "t", k, testReq); err != nil || r.Outcome != keys.Acquired {
			t.Errorf("Begin %s with +cluster|slots = %v, %v", k, r.Outcome, err)
		}
	}
}

// TestClusterEvictionPolicyOnOneNode: the maxmemory-policy is checked on every node, not on the
// one that a command without a key happens to reach.
func TestClusterEvictionPolicyOnOneNode(t *testing.T) {
	tc := startCluster(t)
	tc.do(t, 1, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
	for i := range 10 {
		s, err := Open(t.Context(), tc.nodes[0].URL(), Options{})
		if err == nil {
			s.Close()
			t.Fatalf("Open %d of 10 succeeded with allkeys-lru on one node of three", i+1)
		}
		wantMisconfigured(t, "Open", err, "allkeys-lru")
	}
	tc.do(t, 1, "CONFIG", "SET", "maxmemory-policy", "noeviction")
	s := openOn(t, tc.nodes[0].URL(), Options{})
	tc.do(t, 1, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
	for range 10 {
		makeDue(s)
		if err := s.Ping(t.Context()); err == nil {
			t.Fatal("Ping passed with allkeys-lru on one node of three")
		}
	}
}

// TestClusterSlotMigrating: while the slot of a key is being migrated, Redis answers a script on
// two keys of it that are not all on one side TRYAGAIN (for a new key: neither is anywhere). The
// Store waits for the migration (within its timeout) instead of failing at once.
func TestClusterSlotMigrating(t *testing.T) {
	tc := startCluster(t)
	s := openOn(t, tc.nodes[0].URL(), Options{})
	key := keyOn(t, s, clusterSlots[0][0], clusterSlots[0][1])
	slot := strconv.Itoa(int(slotOf(s.names("t", key).rec)))
	tc.do(t, 1, "CLUSTER", "SETSLOT", slot, "IMPORTING", tc.ids[0])
	tc.do(t, 0, "CLUSTER", "SETSLOT", slot, "MIGRATING", tc.ids[1])
	done := make(chan struct{})
	go func() { // the migration ends (no key to move: the key is new)
		defer close(done)
		time.Sleep(200 * time.Millisecond)
		for i := range tc.nodes {
			tc.do(t, i, "CLUSTER", "SETSLOT", slot, "NODE", tc.ids[1])
		}
	}()
	r, err := s.Begin(t.Context(), "t", key, testReq)
	<-done
	if err != nil || r.Outcome != keys.Acquired {
		t.Fatalf("Begin of a new key while its slot migrates = %v, %v; want acquired once the migration ends", r.Outcome, err)
	}
	if _, err := s.Complete(t.Context(), "t", key, keys.CompleteRequest{Token: r.Record.Lease.Token, Response: testResp}); err != nil {
		t.Fatal(err)
	}
}

// TestClusterConformance: the conformance suite, one winner among two stores and watchers woken
// across stores, on Redis Cluster, with the two stores given different nodes: every key's
// scripts run on its own node, and pub/sub reaches a watcher subscribed on another.
func TestClusterConformance(t *testing.T) {
	tc := startCluster(t)
	urls := []string{tc.nodes[0].URL(), tc.nodes[1].URL()}
	storagetest.Run(t, storagetest.Factory{
		Open: func(t *testing.T, clock *storagetest.Clock) keys.Store {
			return openTest(t, urls[0], "idemtest-"+keys.NewToken(), clock.Now)
		},
		Reopen: func(t *testing.T, s keys.Store, clock *storagetest.Clock) keys.Store {
			prefix := s.(*Store).prefix
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			return openTest(t, urls[1], prefix, clock.Now)
		},
		ExpiresItself: true,
	})
	t.Run("OneWinnerAcrossStores", func(t *testing.T) {
		prefix := "idemtest-" + keys.NewToken()
		oneWinnerAcrossStores(t, openTest(t, urls[0], prefix, nil), openTest(t, urls[1], prefix, nil))
	})
	t.Run("WatchAcrossStores", func(t *testing.T) {
		prefix := "idemtest-" + keys.NewToken()
		watchAcrossStores(t, openTest(t, urls[0], prefix, nil), openTest(t, urls[1], prefix, nil))
	})
}
