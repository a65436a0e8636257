package idemclient

import (
	"bufio"
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestDocsNameNoUnknownIdemsvcVariable: idemsvc refuses to start when an IDEMSVC_* variable it
// does not know is set, so a variable that the client's docs or examples tell users to export
// (a token, say) must not have that prefix: exported in the shell that also runs idemsvc, it
// would stop the service. Every IDEMSVC_* name in the client's docs and examples must be one of
// idemsvc's own, as its -h lists them.
func TestDocsNameNoUnknownIdemsvcVariable(t *testing.T) {
	t.Parallel()
	out, err := exec.Command(idemsvcBinary(t), "-h").CombinedOutput()
	if err != nil {
		t.Fatalf("idemsvc -h: %v\n%s", err, out)
	}
	var known []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 0 && strings.HasPrefix(f[0], "IDEMSVC_") {
			known = append(known, f[0])
		}
	}
	if len(known) < 5 {
		t.Fatalf("idemsvc -h lists %q; want its configuration variables\n%s", known, out)
	}

	name := regexp.MustCompile(`IDEMSVC_[A-Z0-9_]+`)
	checked := 0
	err = filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		// What users read and copy: docs, the package's code and examples. Tests other than the
		// examples are not, and this harness names test-only variables.
		user := strings.HasSuffix(path, ".md") ||
			strings.HasSuffix(path, ".go") && (!strings.HasSuffix(path, "_test.go") || strings.HasPrefix(filepath.Base(path), "example"))
		if !user {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		checked++
		for _, v := range name.FindAllString(string(b), -1) {
			if !slices.Contains(known, v) {
				t.Errorf("%s names %s, which idemsvc does not know: a user who exports it stops idemsvc from starting", path, v)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 5 {
		t.Fatalf("checked %d files, want the README, the package's files and the examples", checked)
	}
}

// TestTokenVariableLeavesIdemsvcRunning runs idemsvc in an environment where the client's token
// variable is exported, as in a shell that runs both: it starts and serves. The old name,
// IDEMSVC_TOKEN, stopped it.
func TestTokenVariableLeavesIdemsvcRunning(t *testing.T) {
	t.Parallel()
	t.Run("IDEMCLIENT_TOKEN", func(t *testing.T) {
		t.Parallel()
		url := startIdemsvc(t, "IDEMCLIENT_TOKEN=s3cret-of-the-client")
		c := newTestClient(t, url, WithToken("s3cret-of-the-client"))
		if err := c.Ready(t.Context()); err != nil {
			t.Fatalf("Ready = %v", err)
		}
	})
	t.Run("IDEMSVC_TOKEN", func(t *testing.T) {
		t.Parallel()
		cmd := exec.Command(idemsvcBinary(t))
		cmd.Env = idemsvcEnv("IDEMSVC_ADDR=127.0.0.1:0", "IDEMSVC_DATA_DIR="+t.TempDir(), "IDEMSVC_TOKEN=s3cret-of-the-client")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			var ee *exec.ExitError
			if !errors.As(err, &ee) || !strings.Contains(out.String(), "IDEMSVC_TOKEN") {
				t.Fatalf("idemsvc with IDEMSVC_TOKEN set: %v, output %q; want a refusal naming it", err, out.String())
			}
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Signal(os.Interrupt)
			<-done
			t.Fatal("idemsvc started with IDEMSVC_TOKEN set; the reason for IDEMCLIENT_TOKEN is gone")
		}
	})
}
