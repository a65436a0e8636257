package redis

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
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
			strings.Count(tc.do(t, i, "CLUSTER", "NODES"), " connected") < len(tc.nodes) {
			if time.Now().After(deadline) {
				t.Fatal("the test cluster did not come up")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return tc
}

// do runs a command on node i alone and returns its reply as text (an integer in decimal);
// it fails the test on an error, so it is for the test's own goroutine (run is for others).
// (redistest.Server.Do would send a command without a key to any node of the cluster.)
func (tc *testCluster) do(t *testing.T, i int, args ...string) string {
	t.Helper()
	v, err := tc.run(i, args...)
	if err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	return v
}

// run is do without the test: it returns the error.
func (tc *testCluster) run(i int, args ...string) (string, error) {
	c, err := rueidis.NewClient(rueidis.ClientOption{
		InitAddress: []string{fmt.Sprintf("127.0.0.1:%d", tc.nodes[i].Port())}, DisableCache: true, ForceSingleClient: true,
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	r := c.Do(context.Background(), c.B().Arbitrary(args...).Build())
	if n, err := r.AsInt64(); err == nil {
		return strconv.FormatInt(n, 10), nil
	}
	return r.ToString()
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

// slotOf is the hash slot of a Redis key: of its hash tag, when it has one.
func slotOf(key string) uint16 {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	return hashSlot(key)
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
	go func() { // the migration ends (no key to move: the key is new), on the target first
		defer close(done)
		time.Sleep(100 * time.Millisecond) // of the ~550 ms that the operation's tries last
		for _, i := range []int{1, 0, 2} {
			if _, err := tc.run(i, "CLUSTER", "SETSLOT", slot, "NODE", tc.ids[1]); err != nil {
				t.Errorf("ending the migration on node %d: %v", i, err)
			}
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
	conformanceOn(t, urls)
}

// TestClusterDataLossOnAnyNode: a loss of any master's data is noticed (FLUSHALL on each in turn):
// there is a data marker in every range of slots, where one marker on one node noticed only
// that node's loss. Nothing is reported while the data stays.
func TestClusterDataLossOnAnyNode(t *testing.T) {
	tc := startCluster(t)
	var mu sync.Mutex
	var found []string
	s := openOn(t, tc.nodes[0].URL(), Options{OnDataLoss: func(f string) { mu.Lock(); found = append(found, f); mu.Unlock() }})
	reports := func() int { mu.Lock(); defer mu.Unlock(); return len(found) }
	ping := func() {
		t.Helper()
		makeDue(s)
		if err := s.Ping(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	ping()
	if n := len(s.markers); n != len(clusterSlots) {
		t.Fatalf("%d data markers on a cluster of %d masters", n, len(clusterSlots))
	}
	for k := range s.markers {
		if got, want := strconv.Itoa(int(slotOf(k))), tc.do(t, 0, "CLUSTER", "KEYSLOT", k); got != want {
			t.Errorf("slot of %s: %s, Redis says %s", k, got, want)
		}
		if sl := slotOf(k); !slices.ContainsFunc(clusterSlots, func(r [2]uint16) bool { return sl >= r[0] && sl <= r[1] }) {
			t.Fatalf("marker %s in slot %d, outside the cluster's ranges", k, sl)
		}
	}
	ping()
	if n := reports(); n != 0 {
		t.Fatalf("%d losses reported while the data stayed: %v", n, found)
	}
	for i := range tc.nodes {
		tc.do(t, i, "FLUSHALL")
		ping()
		if n := reports(); n != i+1 {
			t.Fatalf("after FLUSHALL on node %d of %d: %d losses reported, want %d: %v", i+1, len(tc.nodes), n, i+1, found)
		}
		ping()
		if n := reports(); n != i+1 {
			t.Fatalf("one loss reported twice: %v", found)
		}
	}
}

func TestMarkerTag(t *testing.T) {
	for _, r := range [][2]uint16{{0, 16383}, {0, 0}, {16383, 16383}, {8000, 8000}, {100, 110}} {
		tag, ok := markerTag(r[0], r[1])
		if sl := hashSlot(tag); !ok || sl < r[0] || sl > r[1] {
			t.Errorf("markerTag(%d, %d) = %q (slot %d), %v", r[0], r[1], tag, sl, ok)
		}
	}
	// hashSlot agrees with Redis's CLUSTER KEYSLOT (the documentation's example, and two
	// values that TestClusterDataLossOnAnyNode also asks a node for).
	for key, want := range map[string]uint16{"somekey": 11058, "foo": 12182, "bar": 5061} {
		if got := hashSlot(key); got != want {
			t.Errorf("hashSlot(%q) = %d, want %d", key, got, want)
		}
	}
}

// TestMarkerTagManyRanges: a cluster whose slots were moved one by one reports thousands of
// ranges in CLUSTER SLOTS; checkMarker computes a tag for each at every check (once a second,
// within Ping's timeout), so a tag must not cost a search of ~16,384 hashes per range. The
// tags stay those of the first "%marker-N" in the range, as the markers already put.
func TestMarkerTagManyRanges(t *testing.T) {
	start := time.Now()
	for sl := range 16384 {
		tag, ok := markerTag(uint16(sl), uint16(sl))
		if !ok || hashSlot(tag) != uint16(sl) {
			t.Fatalf("markerTag(%d, %d) = %q, %v", sl, sl, tag, ok)
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("markerTag for %d one-slot ranges of 16384 took %v: a check on such a cluster "+
				"outlasts Ping's 2 s timeout", sl+1, time.Since(start))
		}
	}
	// The first tag in a range, as a search from "%marker" up finds it.
	for _, r := range [][2]uint16{{0, 16383}, {0, 5460}, {5461, 10922}, {10923, 16383}, {0, 1499}, {100, 110}} {
		want := ""
		for i := 0; want == ""; i++ {
			if tag := markerTagName(i); hashSlot(tag) >= r[0] && hashSlot(tag) <= r[1] {
				want = tag
			}
		}
		if got, _ := markerTag(r[0], r[1]); got != want {
			t.Errorf("markerTag(%d, %d) = %q, want %q", r[0], r[1], got, want)
		}
	}
}

// TestClusterAskWithACL: while a slot is being migrated, a key already moved to the importing
// node is reached with ASK, which the client follows with ASKING: the ACL the Store asks for on
// a cluster must allow it, or the client bounces between MOVED and ASK until the operation's
// timeout, and every such key answers 503 for the whole migration.
func TestClusterAskWithACL(t *testing.T) {
	tc := startCluster(t)
	for i := range tc.nodes {
		tc.do(t, i, append([]string{"ACL", "SETUSER", "idem", "reset", "on", ">pw"},
			strings.Fields(ACL("")+" "+clusterACL)...)...)
	}
	s := openOn(t, tc.nodes[0].UserURL("idem", "pw"), Options{})
	key := keyOn(t, s, clusterSlots[0][0], clusterSlots[0][1])
	r, err := s.Begin(t.Context(), "t", key, testReq)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Complete(t.Context(), "t", key, keys.CompleteRequest{Token: r.Record.Lease.Token, Response: testResp}); err != nil {
		t.Fatal(err)
	}
	n := s.names("t", key)
	slot := strconv.Itoa(int(slotOf(n.rec)))
	tc.do(t, 1, "CLUSTER", "SETSLOT", slot, "IMPORTING", tc.ids[0])
	tc.do(t, 0, "CLUSTER", "SETSLOT", slot, "MIGRATING", tc.ids[1])
	tc.do(t, 0, "MIGRATE", "127.0.0.1", strconv.Itoa(tc.nodes[1].Port()), "", "0", "5000", "KEYS", n.rec, n.fence)
	start := time.Now()
	rec, err := s.Get(t.Context(), "t", key)
	if err != nil || rec.State != keys.StateCompleted {
		t.Fatalf("Get of a key moved to the importing node = %v, %v after %v; want it completed", rec.State, err, time.Since(start))
	}
	for i := range tc.nodes {
		tc.do(t, i, "CLUSTER", "SETSLOT", slot, "NODE", tc.ids[1])
	}
}

// TestClusterFrozenNodeKeepsReady: a node that does not answer (frozen here; a partition looks
// the same until the cluster fails it over) delays the policy's read and the data markers' check
// by its share of their time only, and the other nodes' markers are still compared. INFO used to
// go to the nodes one after the other, and the marker GETs to wait for every node: the frozen
// one used up the whole time of every Ping that read the policy, on every replica (/readyz 503
// once a second while the other nodes served), and no loss elsewhere was noticed. Only Ping's
// last step, a PING to any one node, still fails when it meets that node.
func TestClusterFrozenNodeKeepsReady(t *testing.T) {
	tc := startCluster(t)
	var mu sync.Mutex
	var found []string
	s := openOn(t, tc.nodes[0].URL(), Options{Timeout: time.Second,
		OnDataLoss: func(f string) { mu.Lock(); found = append(found, f); mu.Unlock() }})
	makeDue(s)
	if err := s.Ping(t.Context()); err != nil {
		t.Fatal(err)
	}
	tc.nodes[2].Signal(syscall.SIGSTOP)
	defer tc.nodes[2].Signal(syscall.SIGCONT)
	for i := range 4 {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		start := time.Now()
		info, err := s.d.info(ctx, "memory")
		took := time.Since(start)
		cancel()
		if err != nil || infoField(info, "maxmemory_policy") == "" || took > 700*time.Millisecond {
			t.Fatalf("INFO %d with one node of three frozen: %v after %v (policy %q); want the others' within a third of 1 s",
				i+1, err, took, infoField(info, "maxmemory_policy"))
		}
	}
	tc.do(t, 0, "FLUSHALL")
	passed := 0
	for range 6 {
		makeDue(s)
		if err := s.Ping(t.Context()); err == nil {
			passed++
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(found) != 1 {
		t.Errorf("a FLUSHALL of one node while another was frozen: %d losses reported, want 1: %v", len(found), found)
	}
	if passed == 0 {
		t.Error("no Ping that read the policy passed with one node of three frozen")
	}
}
