package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// response is what a worker needs from an answer. body is reused by the next request of the
// same worker: copy what must outlive it.
type response struct {
	status   int
	replayed bool // Idempotent-Replayed: true
	body     []byte
}

// client sends one request at a time on one keep-alive connection.
type client interface {
	do(method string, path, body []byte, resp *response) error
	close()
}

// newClient returns the client of one worker: the raw HTTP/1.1 client (default, far less CPU
// per request than net/http's) or net/http's, with a transport of its own limited to one
// connection.
func newClient(kind string, u *url.URL, token string, timeout time.Duration) (client, error) {
	switch kind {
	case "raw":
		if u.Scheme != "http" {
			return nil, fmt.Errorf("-client raw speaks plain http only, not %q (use -client std)", u.Scheme)
		}
		c := &rawClient{addr: u.Host, timeout: timeout}
		c.head = []byte(" HTTP/1.1\r\nHost: " + u.Host + "\r\nUser-Agent: idembench\r\n")
		if token != "" {
			c.head = append(c.head, "Authorization: Bearer "+token+"\r\n"...)
		}
		return c, nil
	case "std":
		tr := &http.Transport{
			MaxConnsPerHost:     1,
			MaxIdleConnsPerHost: 1,
			DisableCompression:  true,
			IdleConnTimeout:     time.Minute,
		}
		c := &stdClient{
			hc:   &http.Client{Transport: tr, Timeout: timeout},
			base: u.Scheme + "://" + u.Host,
		}
		if token != "" {
			c.auth = "Bearer " + token
		}
		return c, nil
	}
	return nil, fmt.Errorf("unknown -client %q (want raw or std)", kind)
}

// rawClient writes requests and parses responses by hand on one net.Conn: no per-request
// allocation, so that on a small machine the generator leaves the CPU to the server.
type rawClient struct {
	addr    string
	timeout time.Duration
	head    []byte // " HTTP/1.1\r\nHost: ...\r\n[Authorization]"
	conn    net.Conn
	br      *bufio.Reader
	wbuf    []byte
	// deadline is the connection's current deadline. It is moved forward only when a quarter
	// of the timeout has passed, not on every request: each move costs a timer update.
	deadline time.Time
}

var errMalformed = errors.New("malformed HTTP response")

func (c *rawClient) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
		c.deadline = time.Time{}
	}
}

func (c *rawClient) dial() error {
	conn, err := net.DialTimeout("tcp", c.addr, c.timeout)
	if err != nil {
		return err
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	c.conn = conn
	if c.br == nil {
		c.br = bufio.NewReaderSize(conn, 16<<10)
	} else {
		c.br.Reset(conn)
	}
	return nil
}

func (c *rawClient) do(method string, path, body []byte, resp *response) error {
	if c.conn == nil {
		if err := c.dial(); err != nil {
			return err
		}
	}
	if c.timeout > 0 {
		if now := time.Now(); c.deadline.Sub(now) < c.timeout*3/4 {
			c.deadline = now.Add(c.timeout)
			c.conn.SetDeadline(c.deadline)
		}
	}
	b := c.wbuf[:0]
	b = append(b, method...)
	b = append(b, ' ')
	b = append(b, path...)
	b = append(b, c.head...)
	if body != nil {
		b = append(b, "Content-Type: application/json\r\nContent-Length: "...)
		b = strconv.AppendInt(b, int64(len(body)), 10)
		b = append(b, "\r\n\r\n"...)
		b = append(b, body...)
	} else {
		b = append(b, "\r\n"...)
	}
	c.wbuf = b
	if _, err := c.conn.Write(b); err != nil {
		c.close()
		return err
	}
	if err := c.read(method, resp); err != nil {
		c.close()
		return err
	}
	return nil
}

// read parses one response: status line, headers, and a body framed by Content-Length, chunked
// transfer coding, or (without either) the end of the connection.
func (c *rawClient) read(method string, resp *response) error {
	line, err := c.br.ReadSlice('\n')
	if err != nil {
		return err
	}
	// "HTTP/1.1 201 Created\r\n"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return fmt.Errorf("%w: status line %q", errMalformed, line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return fmt.Errorf("%w: status line %q", errMalformed, line)
	}
	resp.status, resp.replayed = status, false
	length, chunked, closeAfter := int64(-1), false, false
	for {
		line, err = c.br.ReadSlice('\n')
		if err != nil {
			return err
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			break
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return fmt.Errorf("%w: header %q", errMalformed, line)
		}
		name, value := line[:colon], bytes.TrimSpace(line[colon+1:])
		switch {
		case asciiEqualFold(name, "Content-Length"):
			n, err := strconv.ParseInt(string(value), 10, 64)
			if err != nil || n < 0 {
				return fmt.Errorf("%w: Content-Length %q", errMalformed, value)
			}
			length = n
		case asciiEqualFold(name, "Transfer-Encoding"):
			chunked = asciiEqualFold(value, "chunked")
		case asciiEqualFold(name, "Connection"):
			closeAfter = asciiEqualFold(value, "close")
		case asciiEqualFold(name, "Idempotent-Replayed"):
			resp.replayed = asciiEqualFold(value, "true")
		}
	}
	resp.body = resp.body[:0]
	switch {
	case method == "HEAD" || status == 204 || status == 304 || status < 200:
	case chunked:
		if err := c.readChunked(resp); err != nil {
			return err
		}
	case length >= 0:
		if int64(cap(resp.body)) < length {
			resp.body = make([]byte, 0, length)
		}
		resp.body = resp.body[:length]
		if _, err := io.ReadFull(c.br, resp.body); err != nil {
			return err
		}
	default:
		b := bytes.NewBuffer(resp.body)
		if _, err := b.ReadFrom(c.br); err != nil {
			return err
		}
		resp.body = b.Bytes()
		closeAfter = true
	}
	if closeAfter {
		c.close()
	}
	return nil
}

func (c *rawClient) readChunked(resp *response) error {
	for {
		line, err := c.br.ReadSlice('\n')
		if err != nil {
			return err
		}
		line = bytes.TrimRight(line, "\r\n")
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i]
		}
		n, err := strconv.ParseInt(string(bytes.TrimSpace(line)), 16, 64)
		if err != nil || n < 0 {
			return fmt.Errorf("%w: chunk size %q", errMalformed, line)
		}
		if n == 0 {
			for { // trailers, then the empty line
				line, err = c.br.ReadSlice('\n')
				if err != nil {
					return err
				}
				if len(bytes.TrimRight(line, "\r\n")) == 0 {
					return nil
				}
			}
		}
		start := len(resp.body)
		resp.body = append(resp.body, make([]byte, n)...)
		if _, err := io.ReadFull(c.br, resp.body[start:]); err != nil {
			return err
		}
		if _, err := c.br.Discard(2); err != nil { // CRLF after the data
			return err
		}
	}
}

func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range len(b) {
		x, y := b[i], s[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// stdClient uses net/http: the cross-check of rawClient, and the client for https.
type stdClient struct {
	hc   *http.Client
	base string
	auth string
}

func (c *stdClient) close() { c.hc.CloseIdleConnections() }

func (c *stdClient) do(method string, path, body []byte, resp *response) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, c.base+string(path), rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.auth != "" {
		req.Header.Set("Authorization", c.auth)
	}
	res, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	resp.status = res.StatusCode
	resp.replayed = res.Header.Get("Idempotent-Replayed") == "true"
	b := bytes.NewBuffer(resp.body[:0])
	_, err = b.ReadFrom(res.Body)
	resp.body = b.Bytes()
	return err
}
