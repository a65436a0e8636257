package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// CPU accounting around the measured window. On a shared machine, throughput depends on what
// else runs; the CPU time a server spends per request much less so. These readings let a report
// say both, and how busy each core was.

// userHZ is the unit of utime and stime in /proc/PID/stat: 100 on every Linux we run on.
const userHZ = 100

// cpuSnap is one reading.
type cpuSnap struct {
	server float64   // seconds of CPU of -server-pid; -1 when unknown
	self   float64   // seconds of CPU of this process
	redis  float64   // used_cpu_user+used_cpu_sys of -redis-addr; -1 when unknown
	cores  []coreCPU // per core, from /proc/stat
}

type coreCPU struct{ busy, total uint64 }

func takeCPU(serverPID int, redisAddr string) cpuSnap {
	s := cpuSnap{server: -1, redis: -1}
	if serverPID > 0 {
		s.server = procCPU(serverPID)
	}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		s.self = float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
	}
	if redisAddr != "" {
		s.redis = redisCPU(redisAddr)
	}
	s.cores = procStatCores()
	return s
}

// procCPU returns utime+stime of pid in seconds, or -1.
func procCPU(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	// The command name (field 2) is in parentheses and may hold spaces: split after it.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return -1
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return float64(ut+st) / userHZ
}

// procStatCores reads the per-core lines of /proc/stat.
func procStatCores() []coreCPU {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []coreCPU
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "cpu") || strings.HasPrefix(line, "cpu ") {
			continue
		}
		fields := strings.Fields(line)[1:]
		var c coreCPU
		for i, v := range fields {
			n, _ := strconv.ParseUint(v, 10, 64)
			if i >= 8 { // guest and guest_nice are already in user and nice
				break
			}
			c.total += n
			if i != 3 && i != 4 { // idle, iowait
				c.busy += n
			}
		}
		out = append(out, c)
	}
	return out
}

// redisCPU asks INFO cpu and returns used_cpu_user + used_cpu_sys, or -1.
func redisCPU(addr string) float64 {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return -1
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("*2\r\n$4\r\nINFO\r\n$3\r\ncpu\r\n")); err != nil {
		return -1
	}
	br := bufio.NewReader(conn)
	head, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(head, "$") {
		return -1
	}
	n, err := strconv.Atoi(strings.TrimSpace(head[1:]))
	if err != nil || n < 0 || n > 1<<20 {
		return -1
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(br, body); err != nil {
		return -1
	}
	total, found := 0.0, 0
	for _, line := range strings.Split(string(body), "\r\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && (k == "used_cpu_user" || k == "used_cpu_sys") {
			x, err := strconv.ParseFloat(v, 64)
			if err == nil {
				total += x
				found++
			}
		}
	}
	if found != 2 {
		return -1
	}
	return total
}

// cpuUse is what a run reports: seconds of CPU over the measured window, and per request.
type cpuUse struct {
	ServerSec      float64   `json:"server_sec,omitempty"`
	ServerUSPerReq float64   `json:"server_us_per_req,omitempty"`
	GenSec         float64   `json:"generator_sec"`
	GenUSPerReq    float64   `json:"generator_us_per_req"`
	RedisSec       float64   `json:"redis_sec,omitempty"`
	RedisUSPerReq  float64   `json:"redis_us_per_req,omitempty"`
	CoreBusy       []float64 `json:"core_busy,omitempty"` // fraction of each core busy (every process)
}

func cpuBetween(a, b cpuSnap, requests uint64) cpuUse {
	per := func(sec float64) float64 {
		if requests == 0 {
			return 0
		}
		return sec * 1e6 / float64(requests)
	}
	u := cpuUse{GenSec: b.self - a.self}
	u.GenUSPerReq = per(u.GenSec)
	if a.server >= 0 && b.server >= 0 {
		u.ServerSec = b.server - a.server
		u.ServerUSPerReq = per(u.ServerSec)
	}
	if a.redis >= 0 && b.redis >= 0 {
		u.RedisSec = b.redis - a.redis
		u.RedisUSPerReq = per(u.RedisSec)
	}
	if len(a.cores) == len(b.cores) {
		for i := range a.cores {
			dt := float64(b.cores[i].total - a.cores[i].total)
			if dt > 0 {
				u.CoreBusy = append(u.CoreBusy, float64(b.cores[i].busy-a.cores[i].busy)/dt)
			}
		}
	}
	return u
}
