package idemclient

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The tests in this module that need the real idemsvc run its binary: this module cannot import
// the server (it is another module, and internal). The binary is $IDEMCLIENT_TEST_IDEMSVC when
// set, else one built once from the repository this module lives in (../../cmd/idemsvc). Outside
// that repository, with no binary given, those tests skip, or fail when
// IDEMSVC_TEST_REQUIRE_BACKENDS=1 (as .ci/run sets).

// idemsvcBuild is the binary built for this test run, removed by TestMain.
var idemsvcBuild struct {
	once      sync.Once
	dir, path string
	err       error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if idemsvcBuild.dir != "" {
		_ = os.RemoveAll(idemsvcBuild.dir)
	}
	os.Exit(code)
}

// idemsvcBinary returns the path of an idemsvc binary, or skips t when there is none.
func idemsvcBinary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("IDEMCLIENT_TEST_IDEMSVC"); p != "" {
		return p
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "cmd", "idemsvc")); err != nil {
		msg := "no idemsvc to test against: set IDEMCLIENT_TEST_IDEMSVC to an idemsvc binary, or run the tests in the idemsvc repository"
		if os.Getenv("IDEMSVC_TEST_REQUIRE_BACKENDS") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	b := &idemsvcBuild
	b.once.Do(func() {
		if b.dir, b.err = os.MkdirTemp("", "idemclient-test-"); b.err != nil {
			return
		}
		b.path = filepath.Join(b.dir, "idemsvc")
		cmd := exec.Command("go", "build", "-o", b.path, "./cmd/idemsvc")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build ./cmd/idemsvc in %s: %v\n%s", root, err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// idemsvcEnv returns the environment of an idemsvc started by a test: this process's without
// its IDEMSVC_* variables (idemsvc refuses unknown ones, and a developer's own settings must not
// leak in), then vars.
func idemsvcEnv(vars ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "IDEMSVC_") {
			env = append(env, kv)
		}
	}
	return append(env, vars...)
}

// startIdemsvc starts the real idemsvc on 127.0.0.1 (a free port), with a bbolt store in a temp
// dir, open mode and the configuration vars ("IDEMSVC_MAX_LEASE=10s", ...), waits until it
// listens and returns its base URL. It stops the server when t ends, and shows its log when t
// failed.
func startIdemsvc(t testing.TB, vars ...string) string {
	t.Helper()
	bin := idemsvcBinary(t)
	cmd := exec.Command(bin)
	cmd.Env = idemsvcEnv(append([]string{"IDEMSVC_ADDR=127.0.0.1:0", "IDEMSVC_DATA_DIR=" + t.TempDir()}, vars...)...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		pw.CloseWithError(io.EOF)
		exited <- err
	}()

	var logMu sync.Mutex
	var log []string
	addr := make(chan string, 1)
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			line := sc.Text()
			logMu.Lock()
			if len(log) < 200 {
				log = append(log, line)
			}
			logMu.Unlock()
			var entry struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &entry) == nil && entry.Msg == "listening" && entry.Addr != "" {
				select {
				case addr <- entry.Addr:
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	showLog := func() {
		logMu.Lock()
		defer logMu.Unlock()
		t.Logf("idemsvc log:\n%s", strings.Join(log, "\n"))
	}

	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			t.Errorf("idemsvc (pid %d) did not stop within 20s of SIGINT; killed", cmd.Process.Pid)
		}
		<-scanned
		if t.Failed() {
			showLog()
		}
	}
	t.Cleanup(stop)

	select {
	case a := <-addr:
		return "http://" + a
	case err := <-exited:
		stopped = true
		<-scanned
		showLog()
		t.Fatalf("idemsvc exited before it listened: %v", err)
	case <-time.After(30 * time.Second):
		stop()
		showLog()
		t.Fatal("idemsvc did not listen within 30s")
	}
	panic("unreachable")
}
