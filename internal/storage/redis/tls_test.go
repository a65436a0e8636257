package redis

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// TLS and unix sockets, on redis-servers of the tests' own (a CA, a server certificate for
// 127.0.0.1 and localhost, a client certificate, all made here).

// testCerts are PEM files in a test's directory.
type testCerts struct{ ca, serverCert, serverKey, clientCert, clientKey string }

func makeCerts(t *testing.T) testCerts {
	t.Helper()
	dir := t.TempDir()
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey := newKey()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "idemsvc test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(name string, serial int64, usage x509.ExtKeyUsage) (string, string) {
		k := newKey()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return write(name+".crt", "CERTIFICATE", der), write(name+".key", "PRIVATE KEY", kder)
	}
	c := testCerts{ca: write("ca.crt", "CERTIFICATE", caDER)}
	c.serverCert, c.serverKey = leaf("server", 2, x509.ExtKeyUsageServerAuth)
	c.clientCert, c.clientKey = leaf("client", 3, x509.ExtKeyUsageClientAuth)
	return c
}

// startOwnServer starts redis-server with args (no persistence) and kills it when the test
// ends; ready says whether it serves yet, and nil error with ok false means it never will (no
// TLS in this build): the test is skipped then.
func startOwnServer(t *testing.T, ready func() (ok bool, err error), args ...string) {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server is not installed: this test needs a server of its own")
	}
	args = append([]string{"--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", t.TempDir(),
		"--daemonize", "no", "--loglevel", "warning"}, args...)
	cmd := exec.Command("redis-server", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok, err := ready()
		switch {
		case ok:
			return
		case err == nil:
			t.Skipf("redis-server lacks TLS support: it accepts on its TLS port without a handshake; its output: %s", out.String())
		}
		select {
		case <-exited:
			if strings.Contains(out.String(), "TLS") || strings.Contains(out.String(), "tls") {
				t.Skipf("redis-server lacks TLS support: %s", out.String())
			}
			t.Fatalf("redis-server %v exited: %s", args, out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server %v did not start: %v; its output: %s", args, err, out.String())
		}
	}
}

// startTLSServer starts a redis-server that speaks TLS only, with the server certificate of c,
// requiring a client certificate signed by c's CA when clientAuth, and returns its port.
func startTLSServer(t *testing.T, c testCerts, clientAuth bool, args ...string) int {
	t.Helper()
	port := redistest.FreePort(t)
	auth := "no"
	if clientAuth {
		auth = "yes"
	}
	cfg := &tls.Config{RootCAs: x509.NewCertPool()}
	caPEM, _ := os.ReadFile(c.ca)
	cfg.RootCAs.AppendCertsFromPEM(caPEM)
	if cert, err := tls.LoadX509KeyPair(c.clientCert, c.clientKey); err == nil {
		cfg.Certificates = []tls.Certificate{cert}
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	ready := func() (bool, error) {
		conn, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err != nil {
			return false, err // not listening yet
		}
		tc := tls.Client(conn, &tls.Config{RootCAs: cfg.RootCAs, Certificates: cfg.Certificates, ServerName: "127.0.0.1"})
		defer tc.Close()
		_ = tc.SetDeadline(time.Now().Add(2 * time.Second))
		if err := tc.Handshake(); err != nil {
			return false, nil // it listens, and does not speak TLS
		}
		fmt.Fprint(tc, "PING\r\n")
		line, err := bufio.NewReader(tc).ReadString('\n')
		return err == nil && strings.HasPrefix(line, "+PONG"), err
	}
	startOwnServer(t, ready, append([]string{"--port", "0", "--tls-port", fmt.Sprint(port),
		"--tls-cert-file", c.serverCert, "--tls-key-file", c.serverKey, "--tls-ca-cert-file", c.ca,
		"--tls-auth-clients", auth}, args...)...)
	return port
}

// TestTLSPrivateCA: a Redis whose certificate a private CA signed is reached with that CA in
// Options.TLS.CAFile (IDEMSVC_REDIS_TLS_CA_FILE); without it the store cannot connect and says
// why. There was no way to give the CA but SSL_CERT_FILE, undocumented, or skip_verify.
func TestTLSPrivateCA(t *testing.T) {
	t.Parallel()
	c := makeCerts(t)
	port := startTLSServer(t, c, false)

	s, err := Open(t.Context(), fmt.Sprintf("rediss://127.0.0.1:%d/0", port), Options{Timeout: time.Second})
	if err != nil {
		t.Fatalf("Open without the CA: %v (an unverified server is unreachable, not an error)", err)
	}
	if err := s.Ping(t.Context()); err == nil || !strings.Contains(err.Error(), "x509") {
		t.Errorf("Ping without the CA: %v, want the certificate refused", err)
	}
	s.Close()

	for _, host := range []string{"127.0.0.1", "localhost"} {
		u := fmt.Sprintf("rediss://%s:%d/2", host, port)
		s, err := Open(t.Context(), u, Options{TLS: TLSFiles{CAFile: c.ca}})
		if err != nil {
			t.Fatalf("Open %s with the CA: %v", u, err)
		}
		if err := s.Ping(t.Context()); err != nil {
			t.Errorf("Ping %s with the CA: %v", u, err)
		}
		if _, err := s.Begin(t.Context(), "t", "tls-"+host, testReq); err != nil {
			t.Errorf("Begin on %s: %v", u, err)
		}
		s.Close()
	}

	if _, err := Open(t.Context(), fmt.Sprintf("redis://127.0.0.1:%d/0", port), Options{TLS: TLSFiles{CAFile: c.ca}}); err == nil {
		t.Error("Open of a redis:// URL with TLS files succeeded; they would be ignored")
	}
}

// TestTLSClientCertificate: a Redis with tls-auth-clients yes (as managed ones may be) is
// reached with Options.TLS's client certificate; without one the handshake is refused.
func TestTLSClientCertificate(t *testing.T) {
	t.Parallel()
	c := makeCerts(t)
	port := startTLSServer(t, c, true)
	u := fmt.Sprintf("rediss://127.0.0.1:%d/0", port)

	s, err := Open(t.Context(), u, Options{Timeout: time.Second, TLS: TLSFiles{CAFile: c.ca}})
	if err != nil {
		t.Fatalf("Open without a client certificate: %v", err)
	}
	if err := s.Ping(t.Context()); err == nil {
		t.Error("Ping without a client certificate succeeded on a Redis that requires one")
	}
	s.Close()

	s, err = Open(t.Context(), u, Options{TLS: TLSFiles{CAFile: c.ca, CertFile: c.clientCert, KeyFile: c.clientKey}})
	if err != nil {
		t.Fatalf("Open with the client certificate: %v", err)
	}
	defer s.Close()
	if err := s.Ping(t.Context()); err != nil {
		t.Fatalf("Ping with the client certificate: %v", err)
	}
	if _, err := s.Begin(t.Context(), "t", "mtls", testReq); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(t.Context(), u, Options{TLS: TLSFiles{CAFile: c.ca, CertFile: c.clientCert}}); err == nil {
		t.Error("Open with a client certificate and no key succeeded")
	}
}

// TestUnixSocket: unix:///path, with the database as ?db=N and a password holding @ : / % #,
// percent-encoded, serves; the password is not shown.
func TestUnixSocket(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "redis.sock")
	const password = "p@ss:w/rd%x#?&"
	ready := func() (bool, error) {
		c, err := net.DialTimeout("unix", sock, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return true, nil
		}
		return false, err
	}
	startOwnServer(t, ready, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--requirepass", password)
	u := "unix://default:p%40ss%3Aw%2Frd%25x%23%3F%26@" + sock + "?db=3"
	if shown := ShownURL(u); strings.Contains(shown, "rd%25") || strings.Contains(shown, "rd%") || !strings.Contains(shown, sock) {
		t.Errorf("ShownURL(%s) = %s", u, shown)
	}
	s, err := Open(t.Context(), u, Options{})
	if err != nil {
		t.Fatalf("Open %s: %v", u, err)
	}
	defer s.Close()
	if _, err := s.Begin(t.Context(), "t", "unix", testReq); err != nil {
		t.Fatal(err)
	}
	opt, err := rueidis.ParseURL(u)
	if err != nil {
		t.Fatal(err)
	}
	opt.DisableCache = true
	c, err := rueidis.NewClient(opt)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n, err := c.Do(t.Context(), c.B().Dbsize().Build()).AsInt64(); err != nil || n == 0 {
		t.Errorf("DBSIZE of database 3: %d, %v; want the record there", n, err)
	}
}
