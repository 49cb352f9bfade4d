//! Configuration: the TOML file's shape, its defaults, and every check made before a port is bound.
//!
//! Every field has a default except the API key, which is never in the file: the file names an
//! environment variable (`api_key_env`) or a file (`api_key_file`) that holds it. Loading reports
//! the first problem as one line that names the file, the line, the key at fault, the bad value and
//! an example of a good one ([`report`]); values are read with clear errors (`fields.rs`). Nothing
//! from a place that could hold a secret (the key, the names of the variables and the file that
//! hold secrets, a line of the file) ever appears in a message. The environment is read through a
//! closure so tests never call `set_var`.
//!
//! Why one long module: it is the schema, one struct per TOML table with its defaults beside it,
//! and `Config::validate` reads the whole file's rules in one place (several rules span tables).
//! Reading values (`fields.rs`), the wording of errors ([`report`]) and the secrets
//! ([`secrets`]) are split out; half the file is its tests.

mod fields;
pub mod report;
pub mod secret_file;
pub mod secrets;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use http::{HeaderValue, Uri};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use self::secret_file::SecretName;
use crate::run::status::{MAX_TERMINAL_STATUSES, OTHER_STATUS};
use crate::upstream::credentials::ApiKey;

/// Where the gateway looks for its configuration first when `--config` is not given (relative to
/// the working directory).
pub const DEFAULT_CONFIG_PATH: &str = "config/gateway.toml";
/// Where it looks next: the packaged configuration.
pub const PACKAGED_CONFIG_PATH: &str = "/etc/plextera-gateway/gateway.toml";
/// The environment variable that holds the key when the file names none.
pub const DEFAULT_API_KEY_ENV: &str = "PLEXTERA_API_KEY";
/// `server.secrets_check_interval`'s default.
pub const DEFAULT_SECRETS_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The range `server.secrets_check_interval` may take.
const SECRETS_CHECK_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
/// Most client connections, and most upstream calls in flight, a config may ask for.
const MAX_CONNECTIONS: usize = 1_000_000;
/// Most runtime worker threads a config may ask for.
const MAX_WORKER_THREADS: usize = 1024;
/// Most concurrent HTTP/2 streams per connection a config may ask for.
const MAX_STREAMS: usize = 10_000;
/// The run states Plextera documents as final: a run in one of them never changes again.
pub const DEFAULT_TERMINAL_STATUSES: [&str; 3] = ["COMPLETED", "FAILED", "CLOSED"];

/// The whole configuration file. Unknown keys are errors, so a typo never silently means "default".
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub watch: WatchConfig,
    pub webhook: WebhookConfig,
    pub telemetry: TelemetryConfig,
}

/// `[server]`: the two listeners and how they stop.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public listener: serves the runs path only.
    #[serde(deserialize_with = "fields::socket_addr")]
    pub listen: SocketAddr,
    /// Admin listener: `/healthz`, `/readyz` and `/metrics`; keep it off the public network.
    #[serde(deserialize_with = "fields::socket_addr")]
    pub admin_listen: SocketAddr,
    /// After SIGTERM/SIGINT, how long to keep accepting requests while reporting not ready, so load
    /// balancers stop routing here first (Kubernetes: a few seconds).
    #[serde(with = "fields::duration")]
    pub shutdown_delay: Duration,
    /// How long in-flight requests may take to finish after that.
    #[serde(with = "fields::duration")]
    pub shutdown_grace: Duration,
    /// Browser origins allowed by CORS (`"*"` for any); empty sends no CORS headers at all.
    pub cors_allowed_origins: Vec<String>,
    /// Runtime worker threads; unset means one per CPU available to the process.
    pub worker_threads: Option<NonZeroUsize>,
    /// Most client connections open at once on the public port. When all are taken, a newcomer
    /// closes an idle one (see `server::Acceptor`); with none idle, it waits in the kernel's accept
    /// queue until one closes.
    pub max_connections: NonZeroUsize,
    /// A connection must complete a request head within this long of opening, and of its last
    /// answer, whatever its protocol; otherwise it is closed (slowloris, silent and idle
    /// connections, HTTP/1 and HTTP/2 alike).
    #[serde(with = "fields::duration")]
    pub header_read_timeout: Duration,
    /// A response that makes no progress for this long (the client stopped reading, or stopped
    /// granting HTTP/2 flow-control window) closes its connection.
    #[serde(with = "fields::duration")]
    pub write_timeout: Duration,
    /// Most concurrent HTTP/2 streams per client connection; also the most upstream calls one
    /// connection's requests may have in flight, reset streams included.
    pub http2_max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is probed with PING (idle or not, so a peer that vanished
    /// mid-request is noticed); `0s` never.
    #[serde(with = "fields::duration")]
    pub http2_keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    #[serde(with = "fields::duration")]
    pub http2_keepalive_timeout: Duration,
    /// Name of an environment variable holding comma-separated client tokens; when set, every
    /// request needs `Authorization: Bearer <one of them>`.
    #[serde(deserialize_with = "fields::env_var_name")]
    pub client_tokens_env: Option<String>,
    /// A file holding the client tokens instead (one per line, or comma-separated); re-read when
    /// it changes. Set only one of the two.
    #[serde(deserialize_with = "fields::secret_path")]
    pub client_tokens_file: Option<PathBuf>,
    /// How often the files holding secrets (`*_file` keys) are read again to pick up a rotation;
    /// SIGHUP reads them at once.
    #[serde(with = "fields::duration")]
    pub secrets_check_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            shutdown_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(10),
            cors_allowed_origins: Vec::new(),
            worker_threads: None,
            max_connections: NonZeroUsize::new(10_000).expect("non-zero"),
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            http2_max_concurrent_streams: 100,
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(20),
            client_tokens_env: None,
            client_tokens_file: None,
            secrets_check_interval: DEFAULT_SECRETS_CHECK_INTERVAL,
        }
    }
}

/// `[upstream]`: where Plextera is and how the gateway talks to it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Scheme and host of the Plextera API (a path prefix is kept); `http` or `https`.
    pub base_url: String,
    /// Name of the environment variable holding the key (default `PLEXTERA_API_KEY`).
    #[serde(deserialize_with = "fields::env_var_name")]
    pub api_key_env: Option<String>,
    /// A file holding the key, instead of an environment variable (surrounding whitespace is trimmed).
    #[serde(deserialize_with = "fields::secret_path")]
    pub api_key_file: Option<PathBuf>,
    /// Bound on one whole upstream exchange: connect, head and body. Past it the client gets 504.
    #[serde(with = "fields::duration")]
    pub request_timeout: Duration,
    /// Largest upstream body the gateway reads; a larger one is abandoned with a 502.
    #[serde(deserialize_with = "fields::size", serialize_with = "fields::serialize_size")]
    pub max_body_size: ByteSize,
    /// Extra CA certificates (PEM) trusted for an `https` upstream, besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Upper bound on upstream calls per second (fractions allowed); unset means no bound.
    pub max_requests_per_second: Option<f64>,
    /// Upper bound on upstream calls in flight at once; unset, the binary bounds them by what the
    /// open-file limit leaves (see `main.rs`), the library by nothing.
    pub max_concurrent_requests: Option<NonZeroUsize>,
    /// How long a call may wait for the budget above before the client gets a 429.
    #[serde(with = "fields::duration")]
    pub queue_timeout: Duration,
    /// An upstream connection unused this long is closed.
    #[serde(with = "fields::duration")]
    pub pool_idle_timeout: Duration,
    /// Idle HTTP/1.1 upstream connections kept at most (0: none kept).
    pub pool_max_idle: usize,
    /// An upstream connection this old takes no new request, so DNS changes are picked up.
    #[serde(with = "fields::duration")]
    pub pool_max_connection_age: Duration,
    /// A PING on the upstream HTTP/2 connection this often, idle too; `0s` turns it off.
    #[serde(with = "fields::duration")]
    pub http2_keepalive_interval: Duration,
    /// A PING unanswered this long closes the upstream HTTP/2 connection.
    #[serde(with = "fields::duration")]
    pub http2_keepalive_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.plextera.com".to_owned(),
            api_key_env: None,
            api_key_file: None,
            request_timeout: Duration::from_secs(10),
            max_body_size: ByteSize::mib(8),
            ca_file: None,
            max_requests_per_second: None,
            max_concurrent_requests: None,
            queue_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: 128,
            pool_max_connection_age: Duration::from_secs(300),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// `[cache]`: what is kept, for how long, within how much memory.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a terminal run is served from memory (also the clients' `max-age`).
    #[serde(with = "fields::duration")]
    pub ttl: Duration,
    /// Bound on the cached body bytes; least valuable runs are evicted past it.
    #[serde(deserialize_with = "fields::size", serialize_with = "fields::serialize_size")]
    pub max_size: ByteSize,
    /// Run statuses that mean the run has ended; only runs in one of them are cached.
    pub terminal_statuses: Vec<String>,
    /// How long an upstream 404 is remembered; `0s` (the default) never remembers one.
    #[serde(with = "fields::duration")]
    pub not_found_ttl: Duration,
    /// `[cache.shared]`: a Redis tier shared by replicas; absent means this process alone.
    pub shared: Option<SharedCacheConfig>,
}

/// `[watch]`: clients held on a run still going (long-poll and Server-Sent Events), and the one
/// upstream watcher per run that serves them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Longest hold a client may ask for (`?wait=` or `Prefer: wait=`); longer asks are capped.
    #[serde(with = "fields::duration")]
    pub max_wait: Duration,
    /// How often a run's watcher asks upstream while its run changes.
    #[serde(with = "fields::duration")]
    pub poll_interval: Duration,
    /// The watcher's interval grows (×1.5) while nothing changes, up to this.
    #[serde(with = "fields::duration")]
    pub max_poll_interval: Duration,
    /// Most clients held at once, long-polls and streams together; beyond, 503 `TOO_MANY_WAITERS`.
    pub max_held: usize,
    /// The `retry:` an event stream tells browsers to wait before reconnecting.
    #[serde(with = "fields::duration")]
    pub sse_retry: Duration,
    /// A comment line this often on an event stream, so proxies keep it open and a client that
    /// left is noticed; shorter than `server.write_timeout`.
    #[serde(with = "fields::duration")]
    pub sse_keepalive: Duration,
    /// An event stream is closed after about this long (jittered), so clients reconnect with
    /// `Last-Event-ID` and connections spread over replicas.
    #[serde(with = "fields::duration")]
    pub max_stream_duration: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            max_poll_interval: Duration::from_secs(10),
            max_held: 10_000,
            sse_retry: Duration::from_secs(3),
            sse_keepalive: Duration::from_secs(15),
            max_stream_duration: Duration::from_secs(5 * 60),
        }
    }
}

/// `[webhook]`: Plextera's signed run events, on a port of their own. Off unless `listen` is set.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where events are received: the only route on that port, so it alone faces the internet.
    #[serde(default, deserialize_with = "fields::optional_socket_addr")]
    pub listen: Option<SocketAddr>,
    /// The path events are posted to.
    pub path: String,
    /// Name of an environment variable holding one or more comma-separated signing secrets (two
    /// while one is rotated, so no event is refused meanwhile).
    #[serde(deserialize_with = "fields::env_var_name")]
    pub secrets_env: Option<String>,
    /// A file holding the signing secrets instead (one per line, or comma-separated); re-read
    /// when it changes. Set only one of the two.
    #[serde(deserialize_with = "fields::secret_path")]
    pub secrets_file: Option<PathBuf>,
    /// How far an event's signed timestamp may be from now, either way.
    #[serde(with = "fields::duration")]
    pub tolerance: Duration,
    /// Largest event body read; larger is 413.
    #[serde(deserialize_with = "fields::size", serialize_with = "fields::serialize_size")]
    pub max_body_size: ByteSize,
    /// The watchers' interval while events flow: their polls become a slow safety net.
    #[serde(with = "fields::duration")]
    pub safety_poll_interval: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            listen: None,
            path: "/webhooks/plextera".to_owned(),
            secrets_env: None,
            secrets_file: None,
            tolerance: Duration::from_secs(5 * 60),
            max_body_size: ByteSize::mib(1),
            safety_poll_interval: Duration::from_secs(30),
        }
    }
}

/// `[telemetry]`: the access log's volume, and span export over OTLP.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector (`http://otel-collector:4318`): spans go to `<it>/v1/traces`, as
    /// protobuf. Off when unset.
    pub otlp_endpoint: Option<String>,
    /// Extra CA certificates (PEM) trusted for an `https` collector, besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// The share of traces started here that are sampled, 0 to 1; a client's trace keeps its own
    /// decision (its `traceparent`'s sampled flag).
    pub sample_ratio: f64,
    /// Which requests get an access log line: `all`, `errors_or_slow` or `off`.
    pub access_log: AccessLogMode,
    /// With `access_log = "errors_or_slow"`: a request answered in this long or longer is logged.
    #[serde(with = "fields::duration")]
    pub slow_request_threshold: Duration,
}

/// `telemetry.access_log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogMode {
    /// A line for every request.
    All,
    /// A line for errors (status 5xx or 429, or an error code of the gateway's own) and for
    /// requests answered in `slow_request_threshold` or longer (held long-polls and event
    /// streams excepted: their time is the client's wait).
    ErrorsOrSlow,
    /// No access log.
    Off,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            ca_file: None,
            sample_ratio: 1.0,
            access_log: AccessLogMode::All,
            slow_request_threshold: Duration::from_secs(1),
        }
    }
}

impl TelemetryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.otlp_endpoint {
            // Credentials first, and never echoed: a value that may hold one is not repeated,
            // whatever else is wrong with it.
            if holds_userinfo_or_query(endpoint) {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    "must hold no credentials and no query: the base URL of the collector \
                     (send its headers with OTEL_EXPORTER_OTLP_HEADERS)",
                ));
            }
            let url = endpoint.parse::<Uri>().ok();
            let http = url.as_ref().is_some_and(|url| {
                matches!(url.scheme_str(), Some("http" | "https")) && url.host().is_some()
            });
            if !http {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    format_args!(
                        "is {}: it must be an http:// or https:// URL",
                        report::shown(endpoint)
                    ),
                ));
            }
        }
        if !(self.sample_ratio.is_finite() && (0.0..=1.0).contains(&self.sample_ratio)) {
            return Err(invalid(
                "telemetry.sample_ratio",
                format_args!("is {}: use a number from 0 to 1", self.sample_ratio),
            ));
        }
        if self.slow_request_threshold.is_zero() {
            return Err(invalid(
                "telemetry.slow_request_threshold",
                "is 0s: it must be more than 0s",
            ));
        }
        Ok(())
    }
}

/// Whether a URL-ish `value` has a user-info part (`user:token@`) or a query (`?token=…`),
/// judged on the text itself, so that even a value no parser accepts is caught: an `@` or a `?`
/// before the path, with or without a scheme.
fn holds_userinfo_or_query(value: &str) -> bool {
    let rest = value.split_once("://").map_or(value, |(_, rest)| rest);
    let authority = rest.split(['/', '#']).next().unwrap_or_default();
    authority.contains('@') || value.contains('?')
}

/// `[cache.shared]`: Redis (or Valkey, or a managed Redis) behind the in-memory cache.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedCacheConfig {
    /// `redis://host:port/db` or `rediss://…` for TLS. No password here: see `password_env`.
    pub url: String,
    /// Name of the environment variable holding the Redis password, if it needs one.
    #[serde(default, deserialize_with = "fields::env_var_name")]
    pub password_env: Option<String>,
    /// A file holding the Redis password instead; re-read when it changes. Set only one of the two.
    #[serde(default, deserialize_with = "fields::secret_path")]
    pub password_file: Option<PathBuf>,
    /// How long runs are kept in Redis; defaults to `cache.ttl`.
    #[serde(
        default,
        with = "fields::optional_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// Bound on every Redis call; past it the gateway carries on without Redis.
    #[serde(default = "default_shared_timeout", with = "fields::duration")]
    pub timeout: Duration,
    /// Prefix of every key the gateway writes, so several deployments can share one Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a replica waits for another replica that is fetching the same run before it
    /// fetches the run itself.
    #[serde(default = "default_lock_wait", with = "fields::duration")]
    pub lock_wait: Duration,
    /// After repeated Redis failures, how long the gateway stops calling Redis before trying again.
    #[serde(default = "default_circuit_open_for", with = "fields::duration")]
    pub circuit_open_for: Duration,
}

fn default_shared_timeout() -> Duration {
    Duration::from_millis(50)
}

fn default_key_prefix() -> String {
    "plextera-gateway:".to_owned()
}

fn default_lock_wait() -> Duration {
    Duration::from_secs(1)
}

/// `cache.shared.circuit_open_for`'s default.
pub fn default_circuit_open_for() -> Duration {
    Duration::from_secs(5)
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 60 * 60),
            max_size: ByteSize::mib(256),
            terminal_statuses: DEFAULT_TERMINAL_STATUSES.map(str::to_owned).to_vec(),
            not_found_ttl: Duration::ZERO,
            shared: None,
        }
    }
}

/// Why the gateway refuses to start. Each message is one line and never contains a secret, nor
/// the configured name of a place that holds one (a key pasted there would be printed).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error(
        "the API key is missing: {0} is unset (name another variable with upstream.api_key_env, or a file with upstream.api_key_file)"
    )]
    KeyMissing(KeyPlace),
    #[error(
        "the API key in {0} is not usable: a key is one word of visible ASCII (letters, digits and punctuation; no spaces, no control characters)"
    )]
    KeyInvalid(KeyPlace),
    #[error(
        "no client token: the environment variable named by server.client_tokens_env is unset or holds no token"
    )]
    ClientTokensMissing,
    #[error(
        "no Redis password: the environment variable named by cache.shared.password_env is unset or empty"
    )]
    RedisPasswordMissing,
    #[error(
        "no webhook signing secret: the environment variable named by webhook.secrets_env is unset or holds no secret"
    )]
    WebhookSecretsMissing,
    /// A `*_file` secret that cannot be used; `key` is the config key naming the file.
    #[error("the file named by {key} {problem}")]
    SecretFile {
        key: &'static str,
        problem: secret_file::FileProblem,
    },
}

/// Where the key was looked for, as a message may name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPlace {
    /// `PLEXTERA_API_KEY`, named by no one: the gateway's own default, safe to print.
    DefaultVariable,
    /// The variable `upstream.api_key_env` names.
    NamedVariable,
}

impl std::fmt::Display for KeyPlace {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DefaultVariable => write!(formatter, "the environment variable {DEFAULT_API_KEY_ENV}"),
            Self::NamedVariable => {
                formatter.write_str("the environment variable named by upstream.api_key_env")
            }
        }
    }
}

/// A refused value: `key`, what is wrong with it, and an example of a valid one.
fn invalid(key: &str, problem: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid(report::about(key, problem))
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|problem| match problem {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text (the path in a parse error is left empty for `load` to fill).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: PathBuf::new(),
            message: report::describe_toml_error(text, &error),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: relations between values and formats inside strings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |key: &str, value: Duration| {
            if value < Duration::from_millis(1) {
                Err(invalid(
                    key,
                    format_args!("is {value:?}: it must be at least 1ms"),
                ))
            } else {
                Ok(())
            }
        };
        let at_most = |key: &str, value: usize, most: usize| {
            if value > most {
                Err(invalid(key, format_args!("is {value}: at most {most}")))
            } else {
                Ok(())
            }
        };
        let server = &self.server;
        if server.listen == server.admin_listen && server.listen.port() != 0 {
            return Err(invalid(
                "server.admin_listen",
                format_args!("is {}, as server.listen is both: they must differ", server.listen),
            ));
        }
        validate_cors_origins(&server.cors_allowed_origins)?;
        at_most(
            "server.max_connections",
            server.max_connections.get(),
            MAX_CONNECTIONS,
        )?;
        if let Some(threads) = server.worker_threads {
            at_most("server.worker_threads", threads.get(), MAX_WORKER_THREADS)?;
        }
        at_most(
            "server.http2_max_concurrent_streams",
            server.http2_max_concurrent_streams as usize,
            MAX_STREAMS,
        )?;
        positive("server.header_read_timeout", server.header_read_timeout)?;
        positive("server.write_timeout", server.write_timeout)?;
        if server.http2_max_concurrent_streams == 0 {
            return Err(invalid(
                "server.http2_max_concurrent_streams",
                "is 0: it must be at least 1",
            ));
        }
        if !server.http2_keepalive_interval.is_zero() {
            positive("server.http2_keepalive_timeout", server.http2_keepalive_timeout)?;
        }
        let upstream = &self.upstream;
        upstream.runs_url_prefix()?;
        positive("upstream.request_timeout", upstream.request_timeout)?;
        positive("upstream.pool_idle_timeout", upstream.pool_idle_timeout)?;
        positive(
            "upstream.pool_max_connection_age",
            upstream.pool_max_connection_age,
        )?;
        at_most("upstream.pool_max_idle", upstream.pool_max_idle, MAX_CONNECTIONS)?;
        if !upstream.http2_keepalive_interval.is_zero() {
            positive(
                "upstream.http2_keepalive_timeout",
                upstream.http2_keepalive_timeout,
            )?;
        }
        if let Some(concurrent) = upstream.max_concurrent_requests {
            at_most(
                "upstream.max_concurrent_requests",
                concurrent.get(),
                MAX_CONNECTIONS,
            )?;
        }
        if upstream.max_body_size.as_u64() == 0 {
            return Err(invalid("upstream.max_body_size", "is 0: it must be more than 0"));
        }
        for (secret, env_set, file_set) in [
            (
                SecretName::ApiKey,
                upstream.api_key_env.is_some(),
                upstream.api_key_file.is_some(),
            ),
            (
                SecretName::ClientTokens,
                server.client_tokens_env.is_some(),
                server.client_tokens_file.is_some(),
            ),
            (
                SecretName::RedisPassword,
                self.cache
                    .shared
                    .as_ref()
                    .is_some_and(|shared| shared.password_env.is_some()),
                self.cache
                    .shared
                    .as_ref()
                    .is_some_and(|shared| shared.password_file.is_some()),
            ),
            (
                SecretName::WebhookSecrets,
                self.webhook.secrets_env.is_some(),
                self.webhook.secrets_file.is_some(),
            ),
        ] {
            if env_set && file_set {
                return Err(invalid(
                    secret.file_key(),
                    format_args!("set only one of {} and {}", secret.env_key(), secret.file_key()),
                ));
            }
        }
        let (shortest, longest) = SECRETS_CHECK_INTERVAL_RANGE;
        if !(shortest..=longest).contains(&server.secrets_check_interval) {
            return Err(invalid(
                "server.secrets_check_interval",
                format_args!(
                    "is {:?}: it must be from {shortest:?} to {longest:?}",
                    server.secrets_check_interval
                ),
            ));
        }
        if let Some(rate) = upstream.max_requests_per_second
            && !(rate.is_finite() && (0.001..=1_000_000.0).contains(&rate))
        {
            return Err(invalid(
                "upstream.max_requests_per_second",
                format_args!("is {rate}: use a number from 0.001 to 1000000, or leave it out"),
            ));
        }
        if let Some(shared) = &self.cache.shared {
            shared.validate()?;
        }
        let cache = &self.cache;
        positive("cache.ttl", cache.ttl)?;
        if cache.max_size.as_u64() == 0 {
            return Err(invalid("cache.max_size", "is 0: it must be more than 0"));
        }
        if cache.terminal_statuses.len() > MAX_TERMINAL_STATUSES {
            return Err(invalid(
                "cache.terminal_statuses",
                format_args!(
                    "lists {} statuses; at most {MAX_TERMINAL_STATUSES}",
                    cache.terminal_statuses.len()
                ),
            ));
        }
        if let Some(bad) = cache
            .terminal_statuses
            .iter()
            .find(|status| status.is_empty() || status.trim() != status.as_str() || *status == OTHER_STATUS)
        {
            return Err(invalid(
                "cache.terminal_statuses",
                format_args!(
                    "holds {}: a status is a non-empty word other than \"{OTHER_STATUS}\"",
                    report::shown(bad)
                ),
            ));
        }
        self.watch.validate(&self.server)?;
        self.webhook.validate(&self.server)?;
        self.telemetry.validate()
    }
}

impl WatchConfig {
    fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        for (key, value) in [
            ("watch.poll_interval", self.poll_interval),
            ("watch.sse_retry", self.sse_retry),
            ("watch.sse_keepalive", self.sse_keepalive),
            ("watch.max_stream_duration", self.max_stream_duration),
        ] {
            if value < Duration::from_millis(1) {
                return Err(invalid(
                    key,
                    format_args!("is {value:?}: it must be at least 1ms"),
                ));
            }
        }
        if self.max_poll_interval < self.poll_interval {
            return Err(invalid(
                "watch.max_poll_interval",
                format_args!(
                    "is {:?}, shorter than watch.poll_interval ({:?}): it must be at least that",
                    self.max_poll_interval, self.poll_interval
                ),
            ));
        }
        if self.sse_keepalive >= server.write_timeout {
            return Err(invalid(
                "watch.sse_keepalive",
                format_args!(
                    "is {:?}: it must be shorter than server.write_timeout ({:?}), or a quiet stream is cut as stalled",
                    self.sse_keepalive, server.write_timeout
                ),
            ));
        }
        if self.max_held > MAX_CONNECTIONS {
            return Err(invalid(
                "watch.max_held",
                format_args!("is {}: at most {MAX_CONNECTIONS}", self.max_held),
            ));
        }
        Ok(())
    }
}

/// The widest `webhook.tolerance`: well inside the 72 h event ids are remembered.
const MAX_WEBHOOK_TOLERANCE: Duration = Duration::from_secs(3600);

impl WebhookConfig {
    /// The signing secrets (comma-separated in the variable `secrets_env` names, blanks around
    /// each ignored), when the listener is on; `env` looks up an environment variable.
    pub fn load_secrets(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Vec<SecretString>>, ConfigError> {
        if self.listen.is_none() {
            return Ok(None);
        }
        if let Some(path) = &self.secrets_file {
            let secrets = read_secret_file(SecretName::WebhookSecrets, path, secret_file::list)?;
            return Ok(Some(secrets.into_iter().map(SecretString::from).collect()));
        }
        let name = self
            .secrets_env
            .as_ref()
            .ok_or(ConfigError::WebhookSecretsMissing)?;
        let value = env(name).ok_or(ConfigError::WebhookSecretsMissing)?;
        let secrets: Vec<SecretString> = value
            .split(',')
            .map(str::trim)
            .filter(|secret| !secret.is_empty())
            .map(SecretString::from)
            .collect();
        if secrets.is_empty() {
            return Err(ConfigError::WebhookSecretsMissing);
        }
        Ok(Some(secrets))
    }

    fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        let Some(listen) = self.listen else {
            return Ok(());
        };
        if self.secrets_env.is_none() && self.secrets_file.is_none() {
            return Err(invalid(
                "webhook.secrets_env",
                "is unset: with webhook.listen set, name the environment variable holding the signing secrets \
                 (or the file, with webhook.secrets_file)",
            ));
        }
        if [server.listen, server.admin_listen].contains(&listen) && listen.port() != 0 {
            return Err(invalid(
                "webhook.listen",
                format_args!("is {listen}, a port the server already listens on: give events their own"),
            ));
        }
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return Err(invalid(
                "webhook.path",
                "must be a path starting with /, without a query",
            ));
        }
        if self.tolerance < Duration::from_secs(1) || self.tolerance > MAX_WEBHOOK_TOLERANCE {
            return Err(invalid(
                "webhook.tolerance",
                "must be from 1s to 1h (a replay must be refused for its age long before its event id is forgotten)",
            ));
        }
        if self.max_body_size.as_u64() == 0 {
            return Err(invalid("webhook.max_body_size", "is 0: it must be more than 0"));
        }
        if self.safety_poll_interval < Duration::from_millis(1) {
            return Err(invalid("webhook.safety_poll_interval", "must be at least 1ms"));
        }
        Ok(())
    }
}

impl UpstreamConfig {
    /// The absolute URL that a run id is appended to, e.g. `https://api.plextera.com/api/public/v1/workflow-runs/`.
    ///
    /// Errors never repeat the URL: a key pasted into it (as a password, a path or a query) would
    /// be printed.
    pub fn runs_url_prefix(&self) -> Result<String, ConfigError> {
        const KEY: &str = "upstream.base_url";
        if self.base_url.contains('@') {
            return Err(invalid(
                KEY,
                "must not hold credentials (user:password@): the key goes in the variable named by \
                 upstream.api_key_env or the file named by upstream.api_key_file (the value given is not shown)",
            ));
        }
        let uri: Uri = self
            .base_url
            .parse()
            .map_err(|_| invalid(KEY, "is not a URL (the value given is not shown)"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(invalid(KEY, "must start with http:// or https://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid(KEY, "has no host"));
        }
        if !has_valid_port(uri.authority().map_or("", |authority| authority.as_str())) {
            return Err(invalid(
                KEY,
                "has a port that is not a number from 1 to 65535 (the value given is not shown)",
            ));
        }
        if uri.query().is_some() {
            return Err(invalid(KEY, "must not have a query string"));
        }
        let base = self.base_url.trim_end_matches('/');
        Ok(format!("{base}/api/public/v1/workflow-runs/"))
    }

    /// `scheme://host[:port]` of the upstream, which is all that logs name of it (a path prefix
    /// is left out).
    pub fn origin(&self) -> Result<String, ConfigError> {
        let uri: Uri = self
            .runs_url_prefix()?
            .parse()
            .map_err(|_| invalid("upstream.base_url", "is not a URL (the value given is not shown)"))?;
        Ok(format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map_or("", |authority| authority.as_str())
        ))
    }

    /// Resolves the key from the file or the environment variable named in the config.
    /// `env` looks up an environment variable (`std::env::var` in production).
    pub fn load_api_key(&self, env: impl Fn(&str) -> Option<String>) -> Result<ApiKey, ConfigError> {
        if let Some(path) = &self.api_key_file {
            return read_secret_file(SecretName::ApiKey, path, secret_file::api_key);
        }
        let (name, place) = match &self.api_key_env {
            Some(name) => (name.as_str(), KeyPlace::NamedVariable),
            None => (DEFAULT_API_KEY_ENV, KeyPlace::DefaultVariable),
        };
        let value = env(name)
            .filter(|value| !value.trim().is_empty())
            .ok_or(ConfigError::KeyMissing(place))?;
        ApiKey::new(value.trim()).ok_or(ConfigError::KeyInvalid(place))
    }
}

impl SharedCacheConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let Ok(url) = self.url.parse::<Uri>() else {
            return Err(invalid("cache.shared.url", "is not a URL"));
        };
        if !matches!(url.scheme_str(), Some("redis" | "rediss")) {
            return Err(invalid(
                "cache.shared.url",
                "must start with redis:// or rediss://",
            ));
        }
        if url
            .authority()
            .is_some_and(|authority| authority.as_str().contains('@'))
        {
            return Err(invalid(
                "cache.shared.url",
                "must not hold credentials: put the password in the variable named by password_env",
            ));
        }
        if self.timeout.is_zero() {
            return Err(invalid("cache.shared.timeout", "is 0s: it must be more than 0s"));
        }
        if self.circuit_open_for.is_zero() {
            return Err(invalid(
                "cache.shared.circuit_open_for",
                "is 0s: it must be more than 0s",
            ));
        }
        if self.ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err(invalid("cache.shared.ttl", "is 0s: it must be more than 0s"));
        }
        Ok(())
    }

    /// The password from the file named by `password_file` or the variable named by
    /// `password_env`, if either is named.
    pub fn load_password(&self, env: impl Fn(&str) -> Option<String>) -> Result<Option<String>, ConfigError> {
        if let Some(path) = &self.password_file {
            return read_secret_file(SecretName::RedisPassword, path, secret_file::password).map(Some);
        }
        let Some(name) = &self.password_env else {
            return Ok(None);
        };
        env(name)
            .filter(|password| !password.is_empty())
            .map(Some)
            .ok_or(ConfigError::RedisPasswordMissing)
    }
}

impl ServerConfig {
    /// The client tokens in the file named by `client_tokens_file` or the variable named by
    /// `client_tokens_env`, or `None` when client authentication is off.
    pub fn load_client_tokens(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        if let Some(path) = &self.client_tokens_file {
            return read_secret_file(SecretName::ClientTokens, path, secret_file::list).map(Some);
        }
        let Some(name) = &self.client_tokens_env else {
            return Ok(None);
        };
        let value = env(name).ok_or(ConfigError::ClientTokensMissing)?;
        let tokens: Vec<String> = value
            .split(',')
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(str::to_owned)
            .collect();
        if tokens.is_empty() {
            return Err(ConfigError::ClientTokensMissing);
        }
        Ok(Some(tokens))
    }
}

/// Reads the secret file `path` and checks it with `parse`; a problem names `secret`'s config key.
fn read_secret_file<T>(
    secret: SecretName,
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, secret_file::FileProblem>,
) -> Result<T, ConfigError> {
    secret_file::read(path)
        .and_then(|text| parse(&text))
        .map_err(|problem| ConfigError::SecretFile {
            key: secret.file_key(),
            problem,
        })
}

/// Whether the port in `authority` (`host`, `host:port`, `[v6]:port`), if there is one, is a
/// number from 1 to 65535. (`http::Uri` reports a port that is not a number as no port at all.)
fn has_valid_port(authority: &str) -> bool {
    let after_host = match authority.rfind(']') {
        Some(end) => &authority[end + 1..],
        None => authority,
    };
    match after_host.rsplit_once(':') {
        None => true,
        Some((_, port)) => port.parse::<u16>().is_ok_and(|port| port > 0),
    }
}

fn validate_cors_origins(origins: &[String]) -> Result<(), ConfigError> {
    const KEY: &str = "server.cors_allowed_origins";
    if origins.len() > 1 && origins.iter().any(|origin| origin == "*") {
        return Err(invalid(KEY, "\"*\" cannot be combined with other origins"));
    }
    for origin in origins.iter().filter(|origin| *origin != "*") {
        let parsed: Option<Uri> = origin.parse().ok();
        let is_origin = parsed.is_some_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|host| !host.is_empty())
                && uri.path_and_query().is_none_or(|path| path.as_str() == "/")
        }) && !origin.ends_with('/')
            && HeaderValue::from_str(origin).is_ok();
        if !is_origin {
            return Err(invalid(
                KEY,
                format_args!(
                    "holds {}: an origin is scheme://host[:port], no path",
                    report::shown(origin)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(text: &str) -> String {
        Config::parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let config = Config::parse("").expect("empty config is valid");
        assert_eq!(config.server.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(
            config.server.admin_listen,
            "127.0.0.1:9090".parse().expect("addr")
        );
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.upstream.base_url, "https://api.plextera.com");
        assert_eq!(config.upstream.request_timeout, Duration::from_secs(10));
        assert_eq!(config.upstream.max_body_size, ByteSize::mib(8));
        assert_eq!(config.cache.ttl, Duration::from_secs(86_400));
        assert_eq!(config.cache.max_size.as_u64(), 256 * 1024 * 1024);
        assert_eq!(config.cache.terminal_statuses, ["COMPLETED", "FAILED", "CLOSED"]);
        assert_eq!(config.cache.not_found_ttl, Duration::ZERO);
        assert_eq!(config.upstream.max_requests_per_second, None);
        assert_eq!(config.upstream.max_concurrent_requests, None);
        assert_eq!(config.upstream.queue_timeout, Duration::from_secs(1));
    }

    #[test]
    fn the_budget_is_read_and_checked() {
        let config = Config::parse(
            "[upstream]\nmax_requests_per_second = 2.5\nmax_concurrent_requests = 4\nqueue_timeout = \"3s\"\n",
        )
        .expect("valid");
        assert_eq!(config.upstream.max_requests_per_second, Some(2.5));
        assert_eq!(config.upstream.max_concurrent_requests, NonZeroUsize::new(4));
        assert_eq!(config.upstream.queue_timeout, Duration::from_secs(3));
        for bad in [
            "max_requests_per_second = 0",
            "max_requests_per_second = -1",
            "max_concurrent_requests = 0",
        ] {
            let message = parse_error(&format!("[upstream]\n{bad}\n"));
            assert!(message.contains("max_"), "{bad}: {message}");
        }
    }

    #[test]
    fn durations_and_sizes_are_human_strings() {
        let config = Config::parse(
            "[server]\nshutdown_grace = \"1m 30s\"\n[upstream]\nrequest_timeout = \"250ms\"\n\
             [cache]\nttl = \"2h\"\nmax_size = \"64KiB\"\n",
        )
        .expect("valid config");
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(90));
        assert_eq!(config.upstream.request_timeout, Duration::from_millis(250));
        assert_eq!(config.cache.ttl, Duration::from_secs(7200));
        assert_eq!(config.cache.max_size.as_u64(), 64 * 1024);
    }

    #[test]
    fn the_shipped_config_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        Config::load(&path).expect("config/gateway.toml loads");
    }

    #[test]
    fn unknown_field_names_the_line_and_the_field() {
        let message = parse_error("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n");
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("lisen"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
    }

    #[test]
    fn bad_values_are_rejected_with_one_line_each() {
        let cases = [
            ("[server]\nlisten = \"nowhere\"\n", "line 2"),
            ("[upstream]\nrequest_timeout = \"ten seconds\"\n", "line 2"),
            ("[cache]\nmax_size = \"lots\"\n", "line 2"),
            (
                "[upstream]\nbase_url = \"ftp://example.com\"\n",
                "http:// or https://",
            ),
            ("[upstream]\nbase_url = \"https://x.test/?a=1\"\n", "query"),
            ("[upstream]\nrequest_timeout = \"0s\"\n", "request_timeout"),
            ("[cache]\nttl = \"0s\"\n", "cache.ttl"),
            ("[cache]\nmax_size = 0\n", "cache.max_size"),
            ("[cache]\nterminal_statuses = [\"\"]\n", "terminal_statuses"),
            ("[cache]\nterminal_statuses = [\"other\"]\n", "terminal_statuses"),
            (
                "[server]\ncors_allowed_origins = [\"https://a.test/path\"]\n",
                "cors",
            ),
            (
                "[server]\ncors_allowed_origins = [\"*\", \"https://a.test\"]\n",
                "cors",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:7000\"\nadmin_listen = \"127.0.0.1:7000\"\n",
                "both",
            ),
            (
                "[upstream]\napi_key_env = \"A\"\napi_key_file = \"/k\"\n",
                "only one",
            ),
            ("[server\n", "line 1"),
        ];
        for (text, expected) in cases {
            let message = parse_error(text);
            assert!(message.contains(expected), "{text:?} gave {message:?}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
    }

    #[test]
    fn cors_accepts_origins_and_the_wildcard() {
        Config::parse("[server]\ncors_allowed_origins = [\"https://app.test\", \"http://localhost:3000\"]\n")
            .expect("origins are valid");
        Config::parse("[server]\ncors_allowed_origins = [\"*\"]\n").expect("wildcard is valid");
    }

    #[test]
    fn base_url_path_prefix_is_kept_and_trailing_slash_dropped() {
        let config = Config::parse("[upstream]\nbase_url = \"http://proxy.internal:8443/plextera/\"\n")
            .expect("valid");
        assert_eq!(
            config.upstream.runs_url_prefix().expect("prefix"),
            "http://proxy.internal:8443/plextera/api/public/v1/workflow-runs/"
        );
    }

    #[test]
    fn key_comes_from_the_named_environment_variable() {
        let config = Config::parse("[upstream]\napi_key_env = \"MY_KEY\"\n").expect("valid");
        let key = config
            .upstream
            .load_api_key(|name| (name == "MY_KEY").then(|| " secret-value\n".to_owned()))
            .expect("key found");
        assert_eq!(key.expose(), "secret-value");
    }

    #[test]
    fn missing_key_names_the_variable_not_the_value() {
        let config = Config::default();
        let message = config
            .upstream
            .load_api_key(|_| None)
            .expect_err("no key")
            .to_string();
        assert!(message.contains("PLEXTERA_API_KEY"), "{message}");
    }

    #[test]
    fn invalid_key_is_reported_without_its_value() {
        let config = Config::default();
        let message = config
            .upstream
            .load_api_key(|_| Some("bad\u{7f}key-value".to_owned()))
            .expect_err("control characters are not a header value")
            .to_string();
        assert!(message.contains("PLEXTERA_API_KEY"), "{message}");
        assert!(!message.contains("key-value"), "{message}");
    }

    #[test]
    fn the_shared_tier_is_optional_and_checked() {
        assert_eq!(Config::default().cache.shared, None);
        let config = Config::parse("[cache.shared]\nurl = \"redis://redis:6379/0\"\n").expect("valid");
        let shared = config.cache.shared.expect("configured");
        assert_eq!(shared.timeout, Duration::from_millis(50));
        assert_eq!(shared.key_prefix, "plextera-gateway:");
        assert_eq!(shared.ttl, None);
        for (text, expected) in [
            ("url = \"http://redis:6379\"", "redis://"),
            ("url = \"redis://user:secret@redis:6379\"", "credentials"),
            ("url = \"redis://redis\"\ntimeout = \"0s\"", "timeout"),
            ("url = \"redis://redis\"\nttl = \"0s\"", "ttl"),
            (
                "url = \"redis://redis\"\nport = 1",
                "unknown key in [cache.shared]",
            ),
        ] {
            let message = parse_error(&format!("[cache.shared]\n{text}\n"));
            assert!(message.contains(expected), "{text}: {message}");
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn client_tokens_are_read_from_the_named_variable() {
        let config = Config::parse("[server]\nclient_tokens_env = \"TOKENS\"\n").expect("valid");
        let tokens = config
            .server
            .load_client_tokens(|name| (name == "TOKENS").then(|| " a , b,,c ".to_owned()))
            .expect("tokens");
        assert_eq!(tokens, Some(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]));
        for value in [None, Some(" , ".to_owned())] {
            let message = config
                .server
                .load_client_tokens(|_| value.clone())
                .expect_err("no token")
                .to_string();
            assert!(message.contains("server.client_tokens_env"), "{message}");
            assert!(
                !message.contains("TOKENS"),
                "a configured name is not repeated: {message}"
            );
        }
        assert_eq!(
            Config::default()
                .server
                .load_client_tokens(|_| None)
                .expect("off"),
            None
        );
    }

    #[test]
    fn key_file_is_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("gw-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("key");
        std::fs::write(&path, "file-secret\n").expect("write key");
        let mut config = Config::default();
        config.upstream.api_key_file = Some(path.clone());
        let key = config.upstream.load_api_key(|_| None).expect("key read");
        assert_eq!(key.expose(), "file-secret");

        config.upstream.api_key_file = Some(dir.join("absent"));
        let message = config
            .upstream
            .load_api_key(|_| None)
            .expect_err("no file")
            .to_string();
        assert!(message.contains("upstream.api_key_file"), "{message}");
        assert!(message.contains("No such file"), "{message}");
        assert!(
            !message.contains("absent"),
            "the configured path is not repeated: {message}"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_secret_from_both_a_variable_and_a_file_is_refused_naming_both_keys() {
        for (section, env, file) in [
            ("upstream", "api_key_env", "api_key_file"),
            ("server", "client_tokens_env", "client_tokens_file"),
            ("cache.shared", "password_env", "password_file"),
            ("webhook", "secrets_env", "secrets_file"),
        ] {
            let url = if section == "cache.shared" {
                "url = \"redis://r\"\n"
            } else {
                ""
            };
            let text = format!("[{section}]\n{url}{env} = \"SOME_VAR\"\n{file} = \"/run/secrets/x\"\n");
            let message = parse_error(&text);
            assert!(
                message.contains(&format!("{section}.{env}"))
                    && message.contains(&format!("{section}.{file}")),
                "{message}"
            );
            assert!(!message.contains('\n'), "one line: {message}");
        }
    }

    #[test]
    fn the_secrets_check_interval_is_bounded() {
        assert_eq!(
            Config::default().server.secrets_check_interval,
            Duration::from_secs(5)
        );
        for bad in ["\"10ms\"", "\"2h\""] {
            let message = parse_error(&format!("[server]\nsecrets_check_interval = {bad}\n"));
            assert!(message.contains("server.secrets_check_interval"), "{message}");
        }
        Config::parse("[server]\nsecrets_check_interval = \"100ms\"\n").expect("the shortest");
    }

    #[test]
    fn secrets_are_read_from_their_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let mut config = Config::default();
        config.server.client_tokens_file = Some(write("tokens", "a\nb,c\n"));
        let mut shared = Config::parse("[cache.shared]\nurl = \"redis://r\"\n")
            .expect("valid")
            .cache
            .shared
            .expect("shared");
        shared.password_file = Some(write("password", "pw\n"));
        config.webhook.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.webhook.secrets_file = Some(write("hooks", "whsec_1\nwhsec_2\n"));
        let env = |_: &str| None;
        assert_eq!(
            config.server.load_client_tokens(env).expect("tokens"),
            Some(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()])
        );
        assert_eq!(
            shared.load_password(env).expect("password").as_deref(),
            Some("pw")
        );
        assert_eq!(
            config
                .webhook
                .load_secrets(env)
                .expect("secrets")
                .map(|s| s.len()),
            Some(2)
        );
        std::fs::write(dir.path().join("tokens"), " \n").expect("blank");
        let message = config
            .server
            .load_client_tokens(env)
            .expect_err("blank")
            .to_string();
        assert!(message.contains("server.client_tokens_file"), "{message}");
    }

    #[test]
    fn the_effective_config_prints_as_toml_that_reads_back_the_same() {
        let shipped =
            Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH)).expect("shipped");
        let everything = Config::parse(
            "[server]\nworker_threads = 3\nclient_tokens_file = \"/t\"\nsecrets_check_interval = \"1m 30s\"\n\
             [upstream]\napi_key_file = \"/k\"\nmax_requests_per_second = 2.5\nmax_body_size = 1000\n\
             max_concurrent_requests = 7\nca_file = \"/ca.pem\"\n\
             [cache]\nmax_size = \"3GiB\"\nttl = \"36h\"\nnot_found_ttl = \"250ms\"\n\
             [cache.shared]\nurl = \"rediss://r:6380/1\"\npassword_file = \"/p\"\nttl = \"2h\"\n\
             [webhook]\nlisten = \"127.0.0.1:8443\"\nsecrets_file = \"/w\"\nmax_body_size = \"512KiB\"\n",
        )
        .expect("valid");
        for config in [Config::default(), shipped, everything] {
            let text = toml::to_string(&config).expect("prints");
            assert_eq!(Config::parse(&text).expect(&text), config, "{text}");
        }
    }

    /// Strings a key might look like, put where a name or a path belongs.
    const PASTED_KEYS: [&str; 3] = ["sk-live-Zx9/Qw+e==", "PKLIVE0123456789", "k\"ey\\with<&>"];

    #[test]
    fn a_key_put_where_a_name_or_path_belongs_is_never_printed() {
        for pasted in PASTED_KEYS {
            let toml_string = toml::Value::String(pasted.to_owned()).to_string();
            for (section, field) in [
                ("upstream", "api_key_env"),
                ("upstream", "api_key_file"),
                ("upstream", "api_key"),
                ("upstream", "key"),
                ("server", "client_tokens_env"),
                ("cache.shared", "password_env"),
            ] {
                let url = if section == "cache.shared" {
                    "url = \"redis://r\"\n"
                } else {
                    ""
                };
                let text = format!("[{section}]\n{url}{field} = {toml_string}\n");
                // Only the default key variable is set: whatever names another place, it is empty.
                let env = |name: &str| (name == DEFAULT_API_KEY_ENV).then(|| "real-key".to_owned());
                let outcome = Config::parse(&text).and_then(|config| {
                    config.upstream.load_api_key(env)?;
                    config.server.load_client_tokens(env)?;
                    if let Some(shared) = &config.cache.shared {
                        shared.load_password(env)?;
                    }
                    Ok(())
                });
                let message = outcome.expect_err("refused").to_string();
                assert!(
                    !message.contains(pasted),
                    "{field} = {pasted:?} printed: {message}"
                );
                assert!(message.contains(field), "{field}: {message}");
                assert!(!message.contains('\n'), "one line: {message}");
            }
        }
        // Not a string at all: the value is not described either.
        let message = parse_error("[upstream]\napi_key_env = 987654321\n");
        assert!(!message.contains("987654321"), "{message}");
        // An unknown key that looks like a secret says where secrets go.
        let message = parse_error("[upstream]\napi_key = \"sk-live-x\"\n");
        assert!(message.contains("api_key_env"), "{message}");
        assert!(!message.contains("sk-live-x"), "{message}");
        // A long value of the wrong type or variant, which serde's messages quote, is bounded too.
        let long = "sk_live_0123456789abcdefghijklmnopqrstuvwxyz";
        for line in [
            format!("[telemetry]\naccess_log = \"{long}\"\n"),
            format!("[telemetry]\nsample_ratio = \"{long}\"\n"),
            format!("[server]\nmax_connections = \"{long}\"\n"),
        ] {
            let message = parse_error(&line);
            assert!(!message.contains("0123456789abcdef"), "{message}");
            assert!(message.contains("(44 characters)"), "{message}");
        }
    }

    #[test]
    fn each_bad_value_is_named_with_its_key_and_an_example_of_a_good_one() {
        let cases = [
            (
                "[server]\nlisten = \"localhost:8080\"\n",
                [
                    "line 2",
                    "server.listen",
                    "\"localhost:8080\"",
                    "e.g. listen = \"0.0.0.0:8080\"",
                ],
            ),
            (
                "[upstream]\nrequest_timeout = \"ten seconds\"\n",
                [
                    "line 2",
                    "upstream.request_timeout",
                    "\"ten seconds\"",
                    "e.g. request_timeout = \"10s\"",
                ],
            ),
            (
                "[cache]\nmax_size = \"lots\"\n",
                [
                    "line 2",
                    "cache.max_size",
                    "\"lots\"",
                    "e.g. max_size = \"256MiB\"",
                ],
            ),
            (
                "[server]\nmax_connections = 0\n",
                [
                    "line 2",
                    "server.max_connections",
                    "0",
                    "e.g. max_connections = 10000",
                ],
            ),
            (
                "[server]\nworker_threads = \"two\"\n",
                [
                    "line 2",
                    "server.worker_threads",
                    "two",
                    "e.g. worker_threads = 2",
                ],
            ),
            (
                "[server]\nheader_read_timeout = \"0s\"\n",
                [
                    "server.header_read_timeout",
                    "0s",
                    "at least 1ms",
                    "e.g. header_read_timeout = \"10s\"",
                ],
            ),
            (
                "[cache.shared]\nurl = \"redis://r\"\ntimeout = \"soon\"\n",
                [
                    "line 3",
                    "cache.shared.timeout",
                    "\"soon\"",
                    "e.g. timeout = \"50ms\"",
                ],
            ),
            (
                "[upstream]\nmax_requests_per_second = -1\n",
                [
                    "upstream.max_requests_per_second",
                    "-1",
                    "0.001",
                    "e.g. max_requests_per_second = 10",
                ],
            ),
        ];
        for (text, expected) in cases {
            let message = parse_error(text);
            for part in expected {
                assert!(
                    message.contains(part),
                    "{text:?}: {part:?} missing from {message:?}"
                );
            }
            assert!(!message.contains('\n'), "one line: {message}");
        }
    }

    #[test]
    fn unknown_duplicate_and_missing_keys_are_named_only_when_safe() {
        let typo = parse_error("[server]\nlisen = \"127.0.0.1:1\"\n");
        assert!(
            typo.contains("`lisen`") && typo.contains("did you mean `listen`"),
            "{typo}"
        );
        let pasted = parse_error("sk_live_Zx9Qw3 = 1\n");
        assert!(!pasted.contains("sk_live_Zx9Qw3"), "{pasted}");
        assert!(
            pasted.contains("at the top level") && pasted.contains("server, upstream, cache"),
            "{pasted}"
        );
        let twice = parse_error("[server]\nlisten = \"0.0.0.0:1\"\nlisten = \"0.0.0.0:2\"\n");
        assert!(
            twice.contains("line 3") && twice.contains("`listen` is set twice"),
            "{twice}"
        );
        let missing = parse_error("[cache.shared]\ntimeout = \"1s\"\n");
        assert!(
            missing.contains("cache.shared.url") && missing.contains("e.g. url = \"redis://redis:6379/0\""),
            "{missing}"
        );
    }

    #[test]
    fn a_base_url_port_must_be_a_port_and_is_never_repeated() {
        for base_url in [
            "https://api.plextera.com:sk_live_S3cr3tK3y",
            "https://api.plextera.com:99999",
            "https://api.plextera.com:0",
            "http://[::1]:notaport",
        ] {
            let message = parse_error(&format!("[upstream]\nbase_url = \"{base_url}\"\n"));
            assert!(message.contains("port"), "{base_url}: {message}");
            assert!(
                !message.contains("S3cr3t") && !message.contains("99999"),
                "{message}"
            );
        }
        for base_url in [
            "https://api.plextera.com:8443",
            "http://[::1]:9000",
            "https://api.plextera.com",
        ] {
            Config::parse(&format!("[upstream]\nbase_url = \"{base_url}\"\n")).expect(base_url);
        }
    }

    #[test]
    fn the_webhook_listener_is_off_by_default_and_checked_when_on() {
        assert_eq!(Config::default().webhook.listen, None);
        let on = "[webhook]\nlisten = \"127.0.0.1:8443\"\nsecrets_env = \"HOOK_SECRETS\"\n";
        let config = Config::parse(on).expect("valid");
        assert_eq!(config.webhook.path, "/webhooks/plextera");
        assert_eq!(config.webhook.tolerance, Duration::from_secs(300));
        for (text, key) in [
            ("[webhook]\nlisten = \"127.0.0.1:8443\"\n", "webhook.secrets_env"),
            (
                "[webhook]\nlisten = \"0.0.0.0:8080\"\nsecrets_env = \"S\"\n",
                "webhook.listen",
            ),
            (
                "[webhook]\nlisten = \"127.0.0.1:8443\"\nsecrets_env = \"S\"\npath = \"hooks\"\n",
                "webhook.path",
            ),
            (
                "[webhook]\nlisten = \"127.0.0.1:8443\"\nsecrets_env = \"S\"\ntolerance = \"0s\"\n",
                "webhook.tolerance",
            ),
            (
                "[webhook]\nlisten = \"127.0.0.1:8443\"\nsecrets_env = \"S\"\ntolerance = \"2h\"\n",
                "webhook.tolerance",
            ),
        ] {
            let error = Config::parse(text).expect_err(text).to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn telemetry_values_are_checked_with_one_line_naming_the_key() {
        let config = Config::parse(
            "[telemetry]\notlp_endpoint = \"http://otel-collector:4318\"\nsample_ratio = 0.25\n\
             access_log = \"errors_or_slow\"\nslow_request_threshold = \"250ms\"\n",
        )
        .expect("valid telemetry");
        assert_eq!(config.telemetry.access_log, AccessLogMode::ErrorsOrSlow);
        assert_eq!(
            config.telemetry.slow_request_threshold,
            Duration::from_millis(250)
        );
        assert_eq!(Config::default().telemetry.access_log, AccessLogMode::All);
        assert_eq!(Config::default().telemetry.otlp_endpoint, None);
        for (text, key) in [
            (
                "otlp_endpoint = \"otel-collector:4318\"",
                "telemetry.otlp_endpoint",
            ),
            ("otlp_endpoint = \"grpc://otel:4317\"", "telemetry.otlp_endpoint"),
            (
                "otlp_endpoint = \"http://user:pw@otel:4318\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"grpc://u:pw@c:4317\"",
                "telemetry.otlp_endpoint",
            ),
            ("otlp_endpoint = \"u:pw@c:4317\"", "telemetry.otlp_endpoint"),
            ("otlp_endpoint = \"grpc://c?pw=1\"", "telemetry.otlp_endpoint"),
            (
                "otlp_endpoint = \"http://c:4318/x?pw=1\"",
                "telemetry.otlp_endpoint",
            ),
            ("sample_ratio = 1.5", "telemetry.sample_ratio"),
            ("sample_ratio = -0.1", "telemetry.sample_ratio"),
            ("access_log = \"some\"", "access_log"),
            (
                "slow_request_threshold = \"0s\"",
                "telemetry.slow_request_threshold",
            ),
        ] {
            let message = parse_error(&format!("[telemetry]\n{text}\n"));
            assert!(message.contains(key), "{text}: {message}");
            assert!(!message.contains('\n'), "{text}: {message}");
            assert!(!message.contains("pw"), "{text}: {message}");
        }
    }

    #[test]
    fn values_beyond_what_the_gateway_can_hold_are_refused_not_panicked_on() {
        for (text, key) in [
            (
                "[server]\nmax_connections = 2305843009213693952\n",
                "server.max_connections",
            ),
            ("[server]\nworker_threads = 100000\n", "server.worker_threads"),
            (
                "[server]\nhttp2_max_concurrent_streams = 4000000000\n",
                "server.http2_max_concurrent_streams",
            ),
            (
                "[upstream]\nmax_concurrent_requests = 4611686018427387904\n",
                "upstream.max_concurrent_requests",
            ),
            (
                "[server]\nheader_read_timeout = \"1ns\"\n",
                "server.header_read_timeout",
            ),
        ] {
            let message = parse_error(text);
            assert!(message.contains(key), "{text:?}: {message}");
        }
    }

    #[test]
    fn every_key_has_an_example_and_every_example_is_valid() {
        for (key, example) in report::EXAMPLES {
            let (section, field) = key.rsplit_once('.').expect("a dotted key");
            let url = if section == "cache.shared" && field != "url" {
                "url = \"redis://r\"\n"
            } else {
                ""
            };
            let text = format!("[{section}]\n{url}{field} = {example}\n");
            if let Err(error) = Config::parse(&text) {
                // A valid example may still need another key beside it (e.g. only one key source).
                assert!(!error.to_string().contains("line"), "{key} = {example}: {error}");
            }
        }
        // Every key the shipped file lists, set or commented out, has an example.
        let shipped =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH))
                .expect("config/gateway.toml");
        let mut section = String::new();
        for line in shipped.lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(name) = line.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
                section = name.to_owned();
            } else if let Some((field, _)) = line.split_once(" = ")
                && field.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                let key = format!("{section}.{field}");
                assert!(
                    report::example(&key).is_some(),
                    "{key} has no example in report::EXAMPLES"
                );
            }
        }
    }
}
