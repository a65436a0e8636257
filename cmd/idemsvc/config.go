package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kelseyhightower/envconfig"
	"go.uber.org/zap/zapcore"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis"
)

// envPrefix is the prefix of every configuration variable.
const envPrefix = "IDEMSVC"

// maxConfigDuration bounds IDEMSVC_MAX_LEASE, IDEMSVC_MAX_TTL and IDEMSVC_MAX_WAIT.
const maxConfigDuration = 10 * 365 * 24 * time.Hour

// Config is the service's configuration, read from IDEMSVC_* variables (CONTRACT.md). The names
// come from the field names (split_words), not from envconfig tags: with a tag, envconfig also
// reads the bare name (ADDR, TOKENS, DATA_DIR, ...) when the prefixed one is unset, so that a
// stray TOKENS in the environment would have turned authentication on.
type Config struct {
	Addr     string `split_words:"true" default:":8080" desc:"listen address, host:port or :port"`
	Backend  string `split_words:"true" default:"bolt" desc:"store: bolt (embedded file) or redis"`
	DataDir  string `split_words:"true" default:"./data" desc:"directory of the bolt data file"`
	RedisURL string `split_words:"true" desc:"redis://, rediss:// (TLS) or unix:/// URL, for IDEMSVC_BACKEND=redis"`
	// The TLS files of a rediss:// URL (redis.TLSFiles). Named so that split_words gives
	// REDIS_TLS_CA_FILE (an envconfig tag would also read the bare name).
	RedisTlsCaFile   string `split_words:"true" desc:"PEM file of the CA that signed Redis's certificate (rediss://), when the system does not trust it"`
	RedisTlsCertFile string `split_words:"true" desc:"PEM file of the client certificate Redis requires (rediss://, tls-auth-clients yes); read at every connection"`
	RedisTlsKeyFile  string `split_words:"true" desc:"PEM file of that client certificate's key"`
	// The Sentinels' own credentials, for a URL with master_set (redis.SentinelAuth).
	RedisSentinelUsername string `split_words:"true" desc:"user on the Sentinels (URL with master_set), when they have ACL users"`
	RedisSentinelPassword string `split_words:"true" desc:"password of the Sentinels (URL with master_set), when they require one"`
	// RedisAllowEviction serves a Redis whose maxmemory-policy may evict (see redis.Options).
	RedisAllowEviction bool `split_words:"true" default:"false" desc:"serve a Redis whose maxmemory-policy is not noeviction (evicted records run again)"`
	// RedisMinReplicas acknowledges a write only once that many replicas have it (redis.Options).
	RedisMinReplicas int           `split_words:"true" default:"0" desc:"acknowledge a Redis write only once this many replicas have it (WAIT); 0: when the master has it"`
	Tokens           string        `split_words:"true" desc:"tenant:token,tenant:token; unset runs open as tenant 'default'; set but empty refuses to start"`
	DefaultLease     time.Duration `split_words:"true" default:"30s" desc:"lease when lease_ms is absent"`
	MaxLease         time.Duration `split_words:"true" default:"1h" desc:"upper bound of lease_ms"`
	DefaultTTL       time.Duration `split_words:"true" default:"24h" desc:"retention when ttl_ms is absent"`
	MaxTTL           time.Duration `split_words:"true" default:"720h" desc:"upper bound of ttl_ms"`
	MaxWait          time.Duration `split_words:"true" default:"30s" desc:"upper bound of wait_ms"`
	MaxBodyBytes     int           `split_words:"true" default:"1048576" desc:"largest stored response body, in bytes (at most 64 MiB)"`
	SweepInterval    time.Duration `split_words:"true" default:"1m" desc:"how often expired records are removed"`
	// BoltCheckpointInterval is bolt.Options.CheckpointInterval.
	BoltCheckpointInterval time.Duration `split_words:"true" default:"100ms" desc:"bolt: how often the write-ahead log is carried into the data file (writes since are also held in memory)"`
	LogLevel               string        `split_words:"true" default:"info" desc:"debug, info, warn or error"`
	ShutdownTimeout        time.Duration `split_words:"true" default:"15s" desc:"how long in-flight requests may take to finish at shutdown"`
	DrainDelay             time.Duration `split_words:"true" default:"0s" desc:"at SIGTERM, how long /readyz answers 503 while requests are still served, before shutdown begins"`
	MaxConns               int           `split_words:"true" default:"0" desc:"most connections open at once (0, or at least 4); 0: min(10000, RLIMIT_NOFILE - 256), or half of RLIMIT_NOFILE when that is 512 or less"`
	MaxWaiters             int           `split_words:"true" default:"1000" desc:"most begins waiting for a holder (wait_ms) at once; half per tenant with several"`

	// tokensSet says whether IDEMSVC_TOKENS is in the environment at all: set but naming no
	// token (a templating slip such as IDEMSVC_TOKENS=" ") refuses to start, where unset runs
	// open.
	tokensSet bool `ignored:"true"`

	// Ready, when set, is called with the listening address once the service accepts
	// connections (tests listen on 127.0.0.1:0 and need the port).
	Ready func(addr string) `ignored:"true"`
}

// loadConfig reads the configuration from the environment. An unknown IDEMSVC_* variable or a
// bad value is an error that names the variable.
func loadConfig(environ []string) (Config, error) {
	var cfg Config
	known := knownVars()
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, envPrefix+"_") && !slices.Contains(known, name) && !testVar(name) {
			return cfg, fmt.Errorf("unknown variable %s (known: %s)", name, strings.Join(known, ", "))
		}
	}
	if err := envconfig.Process(envPrefix, &cfg); err != nil {
		return cfg, err
	}
	// envconfig reads the process environment, and so does this.
	_, cfg.tokensSet = os.LookupEnv(envPrefix + "_TOKENS")
	return cfg, cfg.validate()
}

// testVar reports whether name is one of the variables of the project's tests and benchmarks
// (IDEMSVC_TEST_*, IDEMSVC_PROOFS, IDEMSVC_SOAK_*, IDEMSVC_SCALE*), which the README names and
// the service does not read: a developer who exported one could not start the service.
func testVar(name string) bool {
	rest := strings.TrimPrefix(name, envPrefix+"_")
	return strings.HasPrefix(rest, "TEST_") || rest == "PROOFS" || strings.HasPrefix(rest, "SOAK_") ||
		rest == "SCALE" || strings.HasPrefix(rest, "SCALE_")
}

// knownVars lists every IDEMSVC_* variable that Config reads.
func knownVars() []string {
	return []string{
		"IDEMSVC_ADDR", "IDEMSVC_BACKEND", "IDEMSVC_DATA_DIR", "IDEMSVC_REDIS_URL", "IDEMSVC_REDIS_ALLOW_EVICTION", "IDEMSVC_REDIS_MIN_REPLICAS",
		"IDEMSVC_REDIS_TLS_CA_FILE", "IDEMSVC_REDIS_TLS_CERT_FILE", "IDEMSVC_REDIS_TLS_KEY_FILE",
		"IDEMSVC_REDIS_SENTINEL_USERNAME", "IDEMSVC_REDIS_SENTINEL_PASSWORD", "IDEMSVC_TOKENS",
		"IDEMSVC_DEFAULT_LEASE", "IDEMSVC_MAX_LEASE", "IDEMSVC_DEFAULT_TTL", "IDEMSVC_MAX_TTL",
		"IDEMSVC_MAX_WAIT", "IDEMSVC_MAX_BODY_BYTES", "IDEMSVC_SWEEP_INTERVAL", "IDEMSVC_LOG_LEVEL",
		"IDEMSVC_SHUTDOWN_TIMEOUT", "IDEMSVC_DRAIN_DELAY", "IDEMSVC_MAX_CONNS", "IDEMSVC_MAX_WAITERS",
		"IDEMSVC_BOLT_CHECKPOINT_INTERVAL",
	}
}

func (c Config) validate() error {
	var errs []error
	bad := func(name, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s_%s: %s", envPrefix, name, fmt.Sprintf(format, args...)))
	}
	if err := checkAddr(c.Addr); err != nil {
		bad("ADDR", "%v", err)
	}
	switch c.Backend {
	case "bolt":
		if c.DataDir == "" {
			bad("DATA_DIR", "must not be empty")
		}
	case "redis":
		if c.RedisURL == "" {
			bad("REDIS_URL", "is required when IDEMSVC_BACKEND=redis")
		}
		tlsFiles := c.RedisTlsCaFile != "" || c.RedisTlsCertFile != "" || c.RedisTlsKeyFile != ""
		if tlsFiles && !strings.HasPrefix(c.RedisURL, "rediss://") {
			bad("REDIS_URL", "must be rediss:// when IDEMSVC_REDIS_TLS_CA_FILE, _CERT_FILE or _KEY_FILE is set")
		}
		if (c.RedisTlsCertFile == "") != (c.RedisTlsKeyFile == "") {
			bad("REDIS_TLS_CERT_FILE", "and IDEMSVC_REDIS_TLS_KEY_FILE go together")
		}
		if (c.RedisSentinelUsername != "" || c.RedisSentinelPassword != "") && !strings.Contains(c.RedisURL, "master_set=") {
			bad("REDIS_URL", "must name a master_set (Redis Sentinel) when IDEMSVC_REDIS_SENTINEL_USERNAME or _PASSWORD is set")
		}
	default:
		bad("BACKEND", "%q is neither bolt nor redis", c.Backend)
	}
	if _, err := c.tokens(); err != nil {
		bad("TOKENS", "%v", err)
	}
	positive := []struct {
		name string
		d    time.Duration
	}{
		{"DEFAULT_LEASE", c.DefaultLease}, {"MAX_LEASE", c.MaxLease}, {"DEFAULT_TTL", c.DefaultTTL},
		{"MAX_TTL", c.MaxTTL}, {"SWEEP_INTERVAL", c.SweepInterval}, {"SHUTDOWN_TIMEOUT", c.ShutdownTimeout},
		{"BOLT_CHECKPOINT_INTERVAL", c.BoltCheckpointInterval},
	}
	for _, p := range positive {
		if p.d < time.Millisecond {
			bad(p.name, "must be at least 1ms, not %s", p.d)
		}
	}
	if c.MaxWait < 0 {
		bad("MAX_WAIT", "must not be negative")
	}
	if c.DrainDelay < 0 || c.DrainDelay > 10*time.Minute {
		bad("DRAIN_DELAY", "must be between 0 and 10m, not %s", c.DrainDelay)
	}
	// Records keep their times in Unix nanoseconds, which end in 2262: a bound far beyond any
	// retention or lease a key needs keeps every time a request can ask for well inside.
	for _, p := range []struct {
		name string
		d    time.Duration
	}{{"MAX_LEASE", c.MaxLease}, {"MAX_TTL", c.MaxTTL}, {"MAX_WAIT", c.MaxWait}} {
		if p.d > maxConfigDuration {
			bad(p.name, "must be at most %s (10 years), not %s", maxConfigDuration, p.d)
		}
	}
	if c.DefaultLease > c.MaxLease {
		bad("DEFAULT_LEASE", "%s is above IDEMSVC_MAX_LEASE %s", c.DefaultLease, c.MaxLease)
	}
	if c.DefaultTTL > c.MaxTTL {
		bad("DEFAULT_TTL", "%s is above IDEMSVC_MAX_TTL %s", c.DefaultTTL, c.MaxTTL)
	}
	if c.MaxBodyBytes < 1 || c.MaxBodyBytes > 64<<20 {
		bad("MAX_BODY_BYTES", "must be between 1 and %d", 64<<20)
	}
	if c.RedisMinReplicas < 0 || c.RedisMinReplicas > 100 {
		bad("REDIS_MIN_REPLICAS", "is %d; it must be from 0 to 100", c.RedisMinReplicas)
	}
	if c.MaxWaiters < 1 {
		bad("MAX_WAITERS", "must be at least 1")
	}
	if c.MaxConns < 0 || (c.MaxConns > 0 && c.MaxConns < 4) {
		bad("MAX_CONNS", "must be 0 (the default) or at least 4: a waiting begin holds a connection, and the holder's complete needs another")
	}
	if lvl, err := zapcore.ParseLevel(c.LogLevel); err != nil || c.LogLevel == "" || lvl > zapcore.ErrorLevel {
		// zap also reads "" (info), and dpanic, panic and fatal, which would hide every
		// warning and error the service logs (a Redis that lost data among them).
		bad("LOG_LEVEL", "%q is not debug, info, warn or error", c.LogLevel)
	}
	return errors.Join(errs...)
}

// checkAddr refuses a listen address that net.Listen would read as something else than meant:
// empty (a random port on every interface, where the health check probes :8080) or without a
// port ("8080", which is a host name).
func checkAddr(addr string) error {
	if addr == "" {
		return errors.New("must not be empty (:8080 listens on port 8080 of every interface)")
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port or :port (%v)", addr, err)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || port != strconv.FormatUint(n, 10) {
		return fmt.Errorf("%q: the port %q is not a number from 0 to 65535", addr, port)
	}
	return nil
}

// tokenSlip says what is wrong with a token that no request could send, or that is most likely
// a slip in IDEMSVC_TOKENS: a control character, a space or tab inside it ("a:tok1 tok2"), or a
// ';' followed by a tenant's ':' ("a:tok1;b:tok2" for "a:tok1,b:tok2"). "" for any other: tokens
// made by password generators (with !, #, : and the like) worked, and still do.
func tokenSlip(token string) string {
	switch {
	case strings.ContainsFunc(token, func(r rune) bool { return r < 0x20 || r == 0x7f }):
		return "holds a control character, which no request can send"
	case strings.ContainsAny(token, " \t"):
		return "holds a space"
	}
	if _, after, ok := strings.Cut(token, ";"); ok && strings.Contains(after, ":") {
		return "holds ';' and then ':', as in a:token;b:token (separate entries with commas)"
	}
	return ""
}

// tokens parses IDEMSVC_TOKENS into tenant → token. Spaces around a tenant or a token are
// not part of it ("acme: secret" is tenant acme, token secret), as a request's token is
// trimmed too. Unset (or empty in a Config not read from the environment) is open mode; set
// but naming no token is an error, so that a templating slip does not turn authentication off.
func (c Config) tokens() (map[string]string, error) {
	out := map[string]string{}
	if strings.TrimSpace(c.Tokens) == "" {
		if c.tokensSet {
			return nil, errors.New("is set but names no tenant:token (it is empty or only spaces); " +
				"list tenant:token pairs, or unset it to run open (every caller is tenant \"default\")")
		}
		return out, nil
	}
	seen := map[string]bool{}
	for i, pair := range strings.Split(c.Tokens, ",") {
		tenant, token, ok := strings.Cut(pair, ":")
		tenant, token = strings.TrimSpace(tenant), strings.TrimSpace(token)
		slip := tokenSlip(token)
		switch {
		case !ok || tenant == "" || token == "":
			return nil, fmt.Errorf("entry %d is not tenant:token", i+1)
		case slip != "":
			return nil, fmt.Errorf("entry %d: the token of tenant %q %s", i+1, tenant, slip)
		case keys.ValidateKey(tenant) != nil:
			return nil, fmt.Errorf("entry %d: tenant %q must be visible ASCII", i+1, tenant)
		case out[tenant] != "":
			return nil, fmt.Errorf("tenant %q appears twice", tenant)
		case seen[token]:
			return nil, fmt.Errorf("entry %d: two tenants share a token", i+1)
		case len(token) < 16:
			return nil, fmt.Errorf("entry %d: the token of tenant %q is shorter than 16 characters", i+1, tenant)
		}
		seen[token] = true
		out[tenant] = token
	}
	return out, nil
}

// limits returns the request limits of this configuration.
func (c Config) limits() keys.Limits {
	l := keys.DefaultLimits()
	l.DefaultLease, l.MaxLease = c.DefaultLease, c.MaxLease
	l.DefaultTTL, l.MaxTTL = c.DefaultTTL, c.MaxTTL
	l.MaxWait = c.MaxWait
	l.MaxBodyBytes = c.MaxBodyBytes
	return l
}

// masked is the configuration as logged at start: tokens replaced by their tenants.
func (c Config) masked() map[string]any {
	tenants := []string{}
	if toks, err := c.tokens(); err == nil {
		for t := range toks {
			tenants = append(tenants, t+":****")
		}
		slices.Sort(tenants)
	}
	sentinelPassword := ""
	if c.RedisSentinelPassword != "" {
		sentinelPassword = "****"
	}
	redisURL := ""
	if c.RedisURL != "" {
		redisURL = redis.ShownURL(c.RedisURL)
	}
	return map[string]any{
		"addr": c.Addr, "backend": c.Backend, "data_dir": c.DataDir, "redis_url": redisURL,
		"tokens": tenants, "default_lease": c.DefaultLease.String(), "max_lease": c.MaxLease.String(),
		"default_ttl": c.DefaultTTL.String(), "max_ttl": c.MaxTTL.String(), "max_wait": c.MaxWait.String(),
		"max_body_bytes": c.MaxBodyBytes, "sweep_interval": c.SweepInterval.String(),
		"bolt_checkpoint_interval": c.BoltCheckpointInterval.String(),
		"log_level":                c.LogLevel, "shutdown_timeout": c.ShutdownTimeout.String(), "drain_delay": c.DrainDelay.String(), "max_conns": c.MaxConns, "max_waiters": c.MaxWaiters,
		"redis_allow_eviction": c.RedisAllowEviction, "redis_min_replicas": c.RedisMinReplicas, "redis_tls_ca_file": c.RedisTlsCaFile,
		"redis_tls_cert_file": c.RedisTlsCertFile, "redis_tls_key_file": c.RedisTlsKeyFile,
		"redis_sentinel_username": c.RedisSentinelUsername, "redis_sentinel_password": sentinelPassword,
	}
}

// usage prints every variable with its default and meaning.
func usage(w io.Writer) {
	fmt.Fprintf(w, `idemsvc: idempotency keys as a service (HTTP API v1).

Usage:
  idemsvc              serve (configured by the environment below)
  idemsvc healthcheck  exit 0 when the local service answers /healthz (for container health checks)
  idemsvc version      print the version
  idemsvc -h           this help

`)
	tw := tabwriter.NewWriter(w, 1, 0, 4, ' ', 0)
	_ = envconfig.Usagef(envPrefix, &Config{}, tw, envconfig.DefaultTableFormat)
	_ = tw.Flush()
}
