//! Configuration: flags, environment (`SLUICE_*` and the conventional provider variables),
//! an optional `.env` file and an optional `sluice.toml` for providers and model routes.
//! Everything is validated here, before any port is bound, and each error names the
//! setting at fault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::upstream::{RetryPolicy, Timeouts};

/// A credential. Its `Debug` output is redacted so a key never reaches a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {message}")]
pub struct ConfigError {
    /// The flag, variable or file key at fault, as the user wrote it.
    pub setting: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

/// Whether requests need an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum AuthMode {
    /// `off` when listening on a loopback address, `required` otherwise.
    #[default]
    Auto,
    Required,
    /// Everything belongs to one local user; a key that is sent is still checked.
    Off,
}

/// What sits between sluice and PostgreSQL (`SLUICE_DB_POOLER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum DbPooler {
    /// A direct connection: sluice sends its statement timeout as a startup option.
    #[default]
    None,
    /// PgBouncer, any pool mode: no startup options (it refuses them).
    Pgbouncer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `sluice serve` flags; every one can also be set by the environment variable it names.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "SLUICE_ADDR",
        value_name = "SLUICE_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub addr: String,
    /// Port to listen on; overrides the port of --addr (the convention of most PaaS hosts).
    #[arg(long, env = "PORT", value_name = "PORT")]
    pub port: Option<u16>,
    /// Providers and model routes file; `./sluice.toml` is read when it exists.
    #[arg(long, env = "SLUICE_CONFIG", value_name = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name of this instance in health output and logs (default: random).
    #[arg(long, env = "SLUICE_SERVER_ID", value_name = "SLUICE_SERVER_ID")]
    pub server_id: Option<String>,
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_name = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(
        long,
        env = "SLUICE_LOG",
        value_name = "SLUICE_LOG",
        default_value = "info"
    )]
    pub log: String,
    /// Lets the HTTP, WebSocket and database libraries log at debug and trace, where they
    /// write frames, bodies and statements (prompts, replies, keys); for debugging only.
    #[arg(long, env = "SLUICE_LOG_WIRE", value_name = "SLUICE_LOG_WIRE", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub log_wire: bool,
    /// On SIGTERM, how long running streams may take to finish before they are cut.
    #[arg(
        long,
        env = "SLUICE_DRAIN_SECS",
        value_name = "SLUICE_DRAIN_SECS",
        default_value_t = 30
    )]
    pub drain_secs: u64,
    /// At start, how long to wait for PostgreSQL and Redis to answer before giving up
    /// (0: give up at the first failure).
    #[arg(
        long,
        env = "SLUICE_START_WAIT_SECS",
        value_name = "SLUICE_START_WAIT_SECS",
        default_value_t = 300
    )]
    pub start_wait_secs: u64,
    /// Largest request body accepted (bytes).
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", value_name = "SLUICE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Interval of `: ping` comments on SSE streams (ms).
    #[arg(
        long,
        env = "SLUICE_PING_MS",
        value_name = "SLUICE_PING_MS",
        default_value_t = 15_000
    )]
    pub ping_ms: u64,
    /// Upstream TCP/TLS connect timeout (ms).
    #[arg(
        long,
        env = "SLUICE_CONNECT_TIMEOUT_MS",
        value_name = "SLUICE_CONNECT_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub connect_timeout_ms: u64,
    /// From request to first token (ms).
    #[arg(
        long,
        env = "SLUICE_FIRST_TOKEN_TIMEOUT_MS",
        value_name = "SLUICE_FIRST_TOKEN_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub first_token_timeout_ms: u64,
    /// Longest silence between two tokens (ms).
    #[arg(
        long,
        env = "SLUICE_IDLE_TIMEOUT_MS",
        value_name = "SLUICE_IDLE_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub idle_timeout_ms: u64,
    /// Longest a generation may run (s).
    #[arg(
        long,
        env = "SLUICE_MAX_GENERATION_SECS",
        value_name = "SLUICE_MAX_GENERATION_SECS",
        default_value_t = 600
    )]
    pub max_generation_secs: u64,
    /// Longest line, and most data of one event, an upstream stream may send (bytes); past
    /// it the stream fails as `upstream_malformed`.
    #[arg(
        long,
        env = "SLUICE_UPSTREAM_MAX_EVENT_BYTES",
        value_name = "SLUICE_UPSTREAM_MAX_EVENT_BYTES",
        default_value_t = crate::upstream::sse::DEFAULT_MAX_EVENT_BYTES
    )]
    pub upstream_max_event_bytes: usize,
    /// Tries per provider before the first token, the first included.
    #[arg(
        long,
        env = "SLUICE_RETRY_ATTEMPTS",
        value_name = "SLUICE_RETRY_ATTEMPTS",
        default_value_t = 3
    )]
    pub retry_attempts: u32,
    /// First retry backoff (ms).
    #[arg(
        long,
        env = "SLUICE_RETRY_BASE_MS",
        value_name = "SLUICE_RETRY_BASE_MS",
        default_value_t = 1_000
    )]
    pub retry_base_ms: u64,
    /// Backoff growth per retry.
    #[arg(
        long,
        env = "SLUICE_RETRY_FACTOR",
        value_name = "SLUICE_RETRY_FACTOR",
        default_value_t = 2.0
    )]
    pub retry_factor: f64,
    /// Longest single backoff, and longest Retry-After honoured (ms).
    #[arg(
        long,
        env = "SLUICE_RETRY_MAX_MS",
        value_name = "SLUICE_RETRY_MAX_MS",
        default_value_t = 10_000
    )]
    pub retry_max_ms: u64,
    /// Adds an `openai` provider serving any model.
    #[arg(
        long,
        env = "OPENAI_API_KEY",
        value_name = "OPENAI_API_KEY",
        hide_env_values = true
    )]
    pub openai_api_key: Option<String>,
    /// Base URL of the `openai` provider; setting it alone (e.g. a local Ollama or vLLM)
    /// also adds the provider, with no key.
    #[arg(long, env = "OPENAI_BASE_URL", value_name = "OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,
    /// Adds an `anthropic` provider serving `claude-*` models.
    #[arg(
        long,
        env = "ANTHROPIC_API_KEY",
        value_name = "ANTHROPIC_API_KEY",
        hide_env_values = true
    )]
    pub anthropic_api_key: Option<String>,
    #[arg(long, env = "ANTHROPIC_BASE_URL", value_name = "ANTHROPIC_BASE_URL")]
    pub anthropic_base_url: Option<String>,
    /// Browser origins allowed to call the API and open WebSockets, comma-separated
    /// (e.g. https://chat.example.com). The server's own origin is always allowed.
    #[arg(
        long,
        env = "SLUICE_CORS_ORIGINS",
        value_name = "SLUICE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Host names served besides loopback ones when keys are not required, comma-separated
    /// (e.g. sluice.lan). Any other `Host` gets 403, so a web page cannot reach a keyless
    /// local server through a name it points at 127.0.0.1 (DNS rebinding).
    #[arg(
        long,
        env = "SLUICE_ALLOWED_HOSTS",
        value_name = "SLUICE_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// Secret signing WebSocket tokens (POST /api/ws-token); set the same on every instance
    /// of a cluster. Default: random per process.
    #[arg(
        long,
        env = "SLUICE_WS_TOKEN_SECRET",
        value_name = "SLUICE_WS_TOKEN_SECRET",
        hide_env_values = true
    )]
    pub ws_token_secret: Option<String>,
    /// WebSocket server ping interval (ms).
    #[arg(
        long,
        env = "SLUICE_WS_PING_MS",
        value_name = "SLUICE_WS_PING_MS",
        default_value_t = 25_000
    )]
    pub ws_ping_ms: u64,
    /// A WebSocket peer silent for this long is closed (ms).
    #[arg(
        long,
        env = "SLUICE_WS_IDLE_TIMEOUT_MS",
        value_name = "SLUICE_WS_IDLE_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub ws_idle_timeout_ms: u64,
    /// Outgoing WebSocket event frames queued per connection.
    #[arg(
        long,
        env = "SLUICE_WS_QUEUE",
        value_name = "SLUICE_WS_QUEUE",
        default_value_t = 1024
    )]
    pub ws_queue: usize,
    /// A WebSocket client whose full queue takes no frame for this long counts as not
    /// reading and is closed with 1008 (ms).
    #[arg(
        long,
        env = "SLUICE_WS_SEND_TIMEOUT_MS",
        value_name = "SLUICE_WS_SEND_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub ws_send_timeout_ms: u64,
    /// API keys: auto (off on a loopback address, required otherwise), required, off.
    #[arg(long, env = "SLUICE_AUTH", value_name = "SLUICE_AUTH", value_enum, default_value_t = AuthMode::Auto)]
    pub auth: AuthMode,
    /// Model of sessions and tasks whose agent names none. Default: chosen from the first
    /// provider (see the README), `demo` without one.
    #[arg(
        long,
        env = "SLUICE_DEFAULT_MODEL",
        value_name = "SLUICE_DEFAULT_MODEL"
    )]
    pub default_model: Option<String>,
    /// Conversation text sent upstream per generation (characters); oldest messages go first.
    #[arg(
        long,
        env = "SLUICE_HISTORY_MAX_CHARS",
        value_name = "SLUICE_HISTORY_MAX_CHARS",
        default_value_t = 32_000
    )]
    pub history_max_chars: usize,
    /// Longest user message accepted (characters).
    #[arg(
        long,
        env = "SLUICE_MAX_MESSAGE_CHARS",
        value_name = "SLUICE_MAX_MESSAGE_CHARS",
        default_value_t = 100_000
    )]
    pub max_message_chars: usize,
    /// How long a finished generation stays resumable with Last-Event-ID (s).
    #[arg(
        long,
        env = "SLUICE_REPLAY_TTL",
        value_name = "SLUICE_REPLAY_TTL",
        default_value_t = 600
    )]
    pub replay_ttl_secs: u64,
    /// Events kept per generation for replay; a subscriber further behind is told `lagged`.
    #[arg(
        long,
        env = "SLUICE_REPLAY_MAX_EVENTS",
        value_name = "SLUICE_REPLAY_MAX_EVENTS",
        default_value_t = 16_384
    )]
    pub replay_max_events: usize,
    /// Redis for the cluster mode (task queue, cross-instance streams), e.g.
    /// redis://127.0.0.1:6379. Unset: everything stays in process.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several deployments (or test runs) share one Redis.
    #[arg(
        long,
        env = "SLUICE_REDIS_PREFIX",
        value_name = "SLUICE_REDIS_PREFIX",
        default_value = "sluice"
    )]
    pub redis_prefix: String,
    /// Peers whose X-Forwarded-For / X-Real-IP is believed (CIDRs, comma-separated), e.g.
    /// the nginx in front: 127.0.0.1/32. Other peers are identified by their own address.
    #[arg(
        long,
        env = "SLUICE_TRUSTED_PROXIES",
        value_name = "SLUICE_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Requests per minute per API key (else per client IP) on chat routes; 0 = no limit.
    #[arg(
        long,
        env = "SLUICE_RATE_CHAT_PER_MIN",
        value_name = "SLUICE_RATE_CHAT_PER_MIN",
        default_value_t = 1_200
    )]
    pub rate_chat_per_min: u32,
    /// Same for the other /api and /v1 routes.
    #[arg(
        long,
        env = "SLUICE_RATE_API_PER_MIN",
        value_name = "SLUICE_RATE_API_PER_MIN",
        default_value_t = 12_000
    )]
    pub rate_api_per_min: u32,
    /// Same for /api/admin routes.
    #[arg(
        long,
        env = "SLUICE_RATE_ADMIN_PER_MIN",
        value_name = "SLUICE_RATE_ADMIN_PER_MIN",
        default_value_t = 120
    )]
    pub rate_admin_per_min: u32,
    /// Requests a client may make at once above its rate before being limited.
    #[arg(
        long,
        env = "SLUICE_RATE_BURST",
        value_name = "SLUICE_RATE_BURST",
        default_value_t = 100
    )]
    pub rate_burst: u32,
    /// Cluster-wide requests per minute per key, counted in Redis; 0 = no quota.
    #[arg(
        long,
        env = "SLUICE_QUOTA_RPM",
        value_name = "SLUICE_QUOTA_RPM",
        default_value_t = 0
    )]
    pub quota_rpm: u64,
    /// Cluster-wide streamed tokens per minute per key, counted in Redis; 0 = no quota.
    #[arg(
        long,
        env = "SLUICE_QUOTA_TPM",
        value_name = "SLUICE_QUOTA_TPM",
        default_value_t = 0
    )]
    pub quota_tpm: u64,
    /// When Redis cannot be reached: true lets requests through (logged), false refuses them.
    #[arg(long, env = "SLUICE_QUOTA_FAIL_OPEN", value_name = "SLUICE_QUOTA_FAIL_OPEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub quota_fail_open: bool,
    /// Most client streams (SSE responses, running generations) on this instance.
    #[arg(
        long,
        env = "SLUICE_MAX_STREAMS",
        value_name = "SLUICE_MAX_STREAMS",
        default_value_t = 20_000
    )]
    pub max_streams: usize,
    /// Most client streams per API key on this instance.
    #[arg(
        long,
        env = "SLUICE_MAX_STREAMS_PER_KEY",
        value_name = "SLUICE_MAX_STREAMS_PER_KEY",
        default_value_t = 2_000
    )]
    pub max_streams_per_key: usize,
    /// Most upstream calls at once per provider, across the cluster with REDIS_URL; 0 = no
    /// limit (the demo provider has none).
    #[arg(
        long,
        env = "SLUICE_PROVIDER_CONCURRENCY",
        value_name = "SLUICE_PROVIDER_CONCURRENCY",
        default_value_t = 0
    )]
    pub provider_concurrency: usize,
    /// How long a request waits for a provider slot before 503 (ms).
    #[arg(
        long,
        env = "SLUICE_PROVIDER_QUEUE_MS",
        value_name = "SLUICE_PROVIDER_QUEUE_MS",
        default_value_t = 5_000
    )]
    pub provider_queue_ms: u64,
    /// Consecutive failures that open a provider's circuit.
    #[arg(
        long,
        env = "SLUICE_BREAKER_FAILURES",
        value_name = "SLUICE_BREAKER_FAILURES",
        default_value_t = 5
    )]
    pub breaker_failures: u32,
    /// How long an open circuit fails fast before letting a trial request through (s).
    #[arg(
        long,
        env = "SLUICE_BREAKER_OPEN_SECS",
        value_name = "SLUICE_BREAKER_OPEN_SECS",
        default_value_t = 30
    )]
    pub breaker_open_secs: u64,
    /// Successes in half-open state that close the circuit again.
    #[arg(
        long,
        env = "SLUICE_BREAKER_SUCCESSES",
        value_name = "SLUICE_BREAKER_SUCCESSES",
        default_value_t = 3
    )]
    pub breaker_successes: u32,
    /// Largest request head accepted (bytes); larger gets 431.
    #[arg(
        long,
        env = "SLUICE_MAX_HEADER_BYTES",
        value_name = "SLUICE_MAX_HEADER_BYTES",
        default_value_t = 16_384
    )]
    pub max_header_bytes: usize,
    /// How long a client may take to send its request head (ms), against slow-header attacks.
    #[arg(
        long,
        env = "SLUICE_HEADER_TIMEOUT_MS",
        value_name = "SLUICE_HEADER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_timeout_ms: u64,
    /// How long a client may take to send a request body after its head (ms); 0 = no limit.
    #[arg(
        long,
        env = "SLUICE_BODY_TIMEOUT_MS",
        value_name = "SLUICE_BODY_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub body_timeout_ms: u64,
    /// Whether browsers may send credentials (cookies) cross-origin; refused with a `*` origin.
    #[arg(long, env = "SLUICE_CORS_CREDENTIALS", value_name = "SLUICE_CORS_CREDENTIALS", default_value_t = false, action = clap::ArgAction::Set)]
    pub cors_credentials: bool,
    /// Replies kept in the in-process response cache.
    #[arg(
        long,
        env = "SLUICE_CACHE_MAX_ENTRIES",
        value_name = "SLUICE_CACHE_MAX_ENTRIES",
        default_value_t = 10_000
    )]
    pub cache_max_entries: u64,
    /// How long a cached reply is served (s); 0 turns the response cache off.
    #[arg(
        long,
        env = "SLUICE_CACHE_TTL_SECS",
        value_name = "SLUICE_CACHE_TTL_SECS",
        default_value_t = 3_600
    )]
    pub cache_ttl_secs: u64,
    /// Task workers per instance: the most upstream calls tasks make at once here.
    #[arg(
        long,
        env = "SLUICE_TASK_WORKERS",
        value_name = "SLUICE_TASK_WORKERS",
        default_value_t = 32
    )]
    pub task_workers: usize,
    /// Most tasks waiting in the embedded queue; beyond it new tasks get 503.
    #[arg(
        long,
        env = "SLUICE_TASK_QUEUE_MAX",
        value_name = "SLUICE_TASK_QUEUE_MAX",
        default_value_t = 10_000
    )]
    pub task_queue_max: usize,
    /// A task delivered to a worker that has not finished it after this long is given to
    /// another worker (Redis queue; covers crashed instances) (ms).
    #[arg(
        long,
        env = "SLUICE_TASK_RECLAIM_MS",
        value_name = "SLUICE_TASK_RECLAIM_MS",
        default_value_t = 60_000
    )]
    pub task_reclaim_ms: u64,
    /// Whether task creation answers 202 at once (true) or waits for the result (false);
    /// `?sync=` on a request overrides it.
    #[arg(long, env = "SLUICE_TASKS_ASYNC_DEFAULT", value_name = "SLUICE_TASKS_ASYNC_DEFAULT", default_value_t = true, action = clap::ArgAction::Set)]
    pub tasks_async_default: bool,
    /// PostgreSQL URL; unset uses the embedded SQLite store under SLUICE_DATA_DIR.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Directory of the embedded store (created on first start).
    #[arg(
        long,
        env = "SLUICE_DATA_DIR",
        value_name = "SLUICE_DATA_DIR",
        default_value = "data"
    )]
    pub data_dir: PathBuf,
    /// Most PostgreSQL connections this instance holds.
    #[arg(
        long,
        env = "SLUICE_DB_POOL_SIZE",
        value_name = "SLUICE_DB_POOL_SIZE",
        default_value_t = 16
    )]
    pub db_pool_size: u32,
    /// How long a query waits for a pooled connection before failing (ms).
    #[arg(
        long,
        env = "SLUICE_DB_ACQUIRE_TIMEOUT_MS",
        value_name = "SLUICE_DB_ACQUIRE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub db_acquire_timeout_ms: u64,
    /// Connections older than this are replaced (s), so failovers and config changes are picked up.
    #[arg(
        long,
        env = "SLUICE_DB_MAX_LIFETIME_SECS",
        value_name = "SLUICE_DB_MAX_LIFETIME_SECS",
        default_value_t = 1_800
    )]
    pub db_max_lifetime_secs: u64,
    /// Longest a PostgreSQL statement may take, answer included (ms); the connection of one
    /// that takes longer is dropped, so a hung database cannot hold the pool.
    #[arg(
        long,
        env = "SLUICE_DB_QUERY_TIMEOUT_MS",
        value_name = "SLUICE_DB_QUERY_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub db_query_timeout_ms: u64,
    /// After the database is found down, requests fail at once for this long (ms) before one
    /// tries it again.
    #[arg(
        long,
        env = "SLUICE_DB_BREAKER_OPEN_MS",
        value_name = "SLUICE_DB_BREAKER_OPEN_MS",
        default_value_t = 2_000
    )]
    pub db_breaker_open_ms: u64,
    /// What DATABASE_URL points at: PostgreSQL itself (none), or PgBouncer (or another
    /// pooler) that forwards no startup options, so the server-side statement timeout and
    /// schema must come from role or database settings.
    #[arg(
        long,
        env = "SLUICE_DB_POOLER",
        value_name = "SLUICE_DB_POOLER",
        value_enum,
        default_value_t = DbPooler::None
    )]
    pub db_pooler: DbPooler,
    /// Demo provider: delay before its first token (ms).
    #[arg(
        long,
        env = "SLUICE_DEMO_FIRST_TOKEN_MS",
        value_name = "SLUICE_DEMO_FIRST_TOKEN_MS",
        default_value_t = 300
    )]
    pub demo_first_token_ms: u64,
    /// Demo provider: delay between tokens (ms).
    #[arg(
        long,
        env = "SLUICE_DEMO_TOKEN_MS",
        value_name = "SLUICE_DEMO_TOKEN_MS",
        default_value_t = 40
    )]
    pub demo_token_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub chat: ChatConfig,
    pub redis: Option<RedisConfig>,
    pub tasks: TaskConfig,
    pub cache: CacheConfig,
    pub guards: GuardConfig,
}

/// Rate, quota, concurrency and input limits.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests per minute per key or IP; 0 = off.
    pub rate_chat_per_min: u32,
    pub rate_api_per_min: u32,
    pub rate_admin_per_min: u32,
    pub rate_burst: u32,
    pub quota_rpm: u64,
    pub quota_tpm: u64,
    pub quota_fail_open: bool,
    pub max_streams: usize,
    pub max_streams_per_key: usize,
    /// Upstream calls at once per provider; 0 = no limit.
    pub provider_concurrency: usize,
    pub provider_queue: Duration,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    pub breaker_successes: u32,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    /// Time to receive a request body once its head is in; zero = no limit.
    pub body_timeout: Duration,
    pub cors_credentials: bool,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            rate_chat_per_min: 1_200,
            rate_api_per_min: 12_000,
            rate_admin_per_min: 120,
            rate_burst: 100,
            quota_rpm: 0,
            quota_tpm: 0,
            quota_fail_open: true,
            max_streams: 20_000,
            max_streams_per_key: 2_000,
            provider_concurrency: 0,
            provider_queue: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(30),
            breaker_successes: 3,
            max_header_bytes: 16_384,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            cors_credentials: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_entries: u64,
    /// Zero turns the cache off.
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            ttl: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Secret,
    /// Every key starts with `<prefix>:`.
    pub prefix: String,
}

#[derive(Debug, Clone)]
pub struct TaskConfig {
    pub workers: usize,
    pub queue_max: usize,
    pub reclaim_idle: Duration,
    pub async_default: bool,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            workers: 32,
            queue_max: 10_000,
            reclaim_idle: Duration::from_secs(60),
            async_default: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatConfig {
    pub auth: AuthMode,
    /// Empty: chosen from the configured providers (`Upstreams::default_model`).
    pub default_model: String,
    pub history_max_chars: usize,
    pub max_message_chars: usize,
    pub replay_ttl: Duration,
    pub replay_max_events: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            auth: AuthMode::Auto,
            default_model: String::new(),
            history_max_chars: 32_000,
            max_message_chars: 100_000,
            replay_ttl: Duration::from_secs(600),
            replay_max_events: 16_384,
        }
    }
}

impl Config {
    /// Whether requests without a key are served (as the local user).
    pub fn auth_required(&self) -> bool {
        match self.chat.auth {
            AuthMode::Required => true,
            AuthMode::Off => false,
            AuthMode::Auto => !self.server.addr.ip().is_loopback(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// PostgreSQL when set; otherwise SQLite in `data_dir`.
    pub database_url: Option<Secret>,
    pub data_dir: PathBuf,
    pub pool_size: u32,
    pub acquire_timeout: Duration,
    pub max_lifetime: Duration,
    /// Longest a PostgreSQL statement may take, answer included; a connection that
    /// exceeds it is dropped, as it may be hung.
    pub query_timeout: Duration,
    /// How long the store fails fast after it was found down, before a trial.
    pub breaker_open: Duration,
    pub pooler: DbPooler,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            database_url: None,
            data_dir: PathBuf::from("data"),
            pool_size: 16,
            acquire_timeout: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(1800),
            query_timeout: Duration::from_secs(30),
            breaker_open: Duration::from_secs(2),
            pooler: DbPooler::None,
        }
    }
}

impl StoreConfig {
    pub fn from_args(args: &ServeArgs) -> Self {
        Self {
            database_url: args.database_url.clone().map(Secret::new),
            data_dir: args.data_dir.clone(),
            pool_size: args.db_pool_size,
            acquire_timeout: Duration::from_millis(args.db_acquire_timeout_ms),
            max_lifetime: Duration::from_secs(args.db_max_lifetime_secs),
            query_timeout: Duration::from_millis(args.db_query_timeout_ms),
            breaker_open: Duration::from_millis(args.db_breaker_open_ms),
            pooler: args.db_pooler,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Origins allowed for CORS and WebSocket upgrades, besides the server's own.
    pub cors_origins: Vec<String>,
    /// Host names served besides loopback ones when keys are not required; lower case,
    /// without port.
    pub allowed_hosts: Vec<String>,
    pub ws_token_secret: Option<Secret>,
    pub ws: crate::transport::ws::WsSettings,
    pub server_id: String,
    pub drain: Duration,
    /// How long a start waits for its dependencies; zero fails at the first refusal.
    pub start_wait: Duration,
    pub max_body_bytes: usize,
    pub ping_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
    /// Whether the wire libraries may log below WARN (see `SLUICE_LOG_WIRE`).
    pub wire: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    /// Longest line, and most data of one event, in an upstream stream (bytes).
    pub max_event_bytes: usize,
    /// Real providers, in order of preference for models they both serve.
    pub providers: Vec<ProviderConfig>,
    /// Model aliases with a fallback chain.
    pub models: Vec<ModelRoute>,
    pub demo: DemoConfig,
}

#[derive(Debug, Clone, Copy)]
pub struct DemoConfig {
    pub first_token: Duration,
    pub between_tokens: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Demo,
}

/// One `[[providers]]` entry of `sluice.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// One base URL (`https://api.openai.com/v1`); or use `base_urls` for several.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Several base URLs of the same API; requests rotate over them.
    #[serde(default)]
    pub base_urls: Vec<String>,
    #[serde(default, skip_deserializing)]
    pub api_key: Option<Secret>,
    /// Environment variable holding the key, so keys stay out of the file.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Models this provider serves (`claude-*` matches a prefix); empty serves any model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Speak HTTP/2 without TLS (h2c) to this upstream: many streams per connection.
    #[serde(default)]
    pub http2: bool,
}

impl ProviderConfig {
    pub fn openai(name: &str, base_url: &str, api_key: Option<Secret>) -> Self {
        Self {
            name: name.to_owned(),
            kind: ProviderKind::Openai,
            base_url: Some(base_url.to_owned()),
            base_urls: Vec::new(),
            api_key,
            api_key_env: None,
            models: Vec::new(),
            http2: false,
        }
    }

    /// All base URLs, `base_url` first.
    pub fn urls(&self) -> Vec<String> {
        self.base_url
            .iter()
            .chain(self.base_urls.iter())
            .cloned()
            .collect()
    }
}

/// One `[[models]]` entry: an alias served by a chain of providers, tried in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRoute {
    pub name: String,
    /// `"provider"` or `"provider:upstream-model"`.
    pub targets: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    providers: Vec<ProviderConfig>,
    #[serde(default)]
    models: Vec<ModelRoute>,
}

pub const OPENAI_DEFAULT_URL: &str = "https://api.openai.com/v1";
pub const ANTHROPIC_DEFAULT_URL: &str = "https://api.anthropic.com/v1";

impl Default for Config {
    /// The embedded defaults: loopback, demo provider. Used by tests as a starting point.
    fn default() -> Self {
        Self {
            server: ServerConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
                cors_origins: Vec::new(),
                allowed_hosts: Vec::new(),
                ws_token_secret: None,
                ws: crate::transport::ws::WsSettings::default(),
                server_id: new_server_id(),
                drain: Duration::from_secs(30),
                start_wait: Duration::from_secs(300),
                max_body_bytes: 1024 * 1024,
                ping_interval: Duration::from_secs(15),
            },
            log: LogConfig {
                format: LogFormat::Text,
                filter: "info".into(),
                wire: false,
            },
            upstream: UpstreamConfig {
                connect_timeout: Duration::from_secs(5),
                timeouts: Timeouts {
                    first_token: Duration::from_secs(60),
                    idle: Duration::from_secs(60),
                    total: Duration::from_secs(600),
                },
                retry: RetryPolicy {
                    max_attempts: 3,
                    base: Duration::from_secs(1),
                    factor: 2.0,
                    max: Duration::from_secs(10),
                },
                max_event_bytes: crate::upstream::sse::DEFAULT_MAX_EVENT_BYTES,
                providers: Vec::new(),
                models: Vec::new(),
                demo: DemoConfig {
                    first_token: Duration::from_millis(300),
                    between_tokens: Duration::from_millis(40),
                },
            },
            store: StoreConfig::default(),
            chat: ChatConfig::default(),
            redis: None,
            tasks: TaskConfig::default(),
            cache: CacheConfig::default(),
            guards: GuardConfig::default(),
        }
    }
}

fn new_server_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("sluice-{}", &id[..8])
}

impl Config {
    /// Resolves flags/env and the optional file into a validated configuration.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut addr: SocketAddr = args.addr.parse().map_err(|_| {
            ConfigError::new(
                "SLUICE_ADDR",
                format!("'{}' is not an address like 127.0.0.1:8080", args.addr),
            )
        })?;
        if let Some(port) = args.port {
            addr.set_port(port);
        }
        let file = load_file(args.config.as_deref())?;

        let mut providers = file.providers;
        if args.openai_api_key.is_some() || args.openai_base_url.is_some() {
            if providers.iter().any(|p| p.name == "openai") {
                return Err(ConfigError::new(
                    "OPENAI_API_KEY",
                    "sluice.toml already defines a provider named 'openai'; set its key with api_key_env instead",
                ));
            }
            providers.push(ProviderConfig::openai(
                "openai",
                args.openai_base_url
                    .as_deref()
                    .unwrap_or(OPENAI_DEFAULT_URL),
                args.openai_api_key.clone().map(Secret::new),
            ));
        }
        if let Some(key) = &args.anthropic_api_key {
            if providers.iter().any(|p| p.name == "anthropic") {
                return Err(ConfigError::new(
                    "ANTHROPIC_API_KEY",
                    "sluice.toml already defines a provider named 'anthropic'; set its key with api_key_env instead",
                ));
            }
            providers.push(ProviderConfig {
                name: "anthropic".into(),
                kind: ProviderKind::Anthropic,
                base_url: Some(
                    args.anthropic_base_url
                        .clone()
                        .unwrap_or_else(|| ANTHROPIC_DEFAULT_URL.into()),
                ),
                base_urls: Vec::new(),
                api_key: Some(Secret::new(key.clone())),
                api_key_env: None,
                // Only Claude models, so an OpenAI provider keeps serving everything else.
                models: vec!["claude-*".into()],
                http2: false,
            });
        }
        for (i, p) in providers.iter_mut().enumerate() {
            if let Some(var) = &p.api_key_env {
                let key = std::env::var(var).map_err(|_| {
                    ConfigError::new(
                        format!("providers[{i}].api_key_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?;
                p.api_key = Some(Secret::new(key));
            }
        }
        let config = Config {
            server: ServerConfig {
                addr,
                cors_origins: args
                    .cors_origins
                    .iter()
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect(),
                allowed_hosts: args
                    .allowed_hosts
                    .iter()
                    .map(|h| {
                        let h = h.trim().trim_start_matches('[').trim_end_matches(']');
                        h.to_ascii_lowercase()
                    })
                    .filter(|h| !h.is_empty())
                    .collect(),
                ws_token_secret: args.ws_token_secret.clone().map(Secret::new),
                ws: crate::transport::ws::WsSettings {
                    ping_every: Duration::from_millis(args.ws_ping_ms),
                    idle_timeout: Duration::from_millis(args.ws_idle_timeout_ms),
                    max_message: 64 * 1024,
                    queue: args.ws_queue,
                    send_timeout: Duration::from_millis(args.ws_send_timeout_ms),
                },
                server_id: args.server_id.clone().unwrap_or_else(new_server_id),
                drain: Duration::from_secs(args.drain_secs),
                start_wait: Duration::from_secs(args.start_wait_secs),
                max_body_bytes: args.max_body_bytes,
                ping_interval: Duration::from_millis(args.ping_ms),
            },
            log: LogConfig {
                format: args.log_format,
                filter: args.log.clone(),
                wire: args.log_wire,
            },
            upstream: UpstreamConfig {
                connect_timeout: Duration::from_millis(args.connect_timeout_ms),
                timeouts: Timeouts {
                    first_token: Duration::from_millis(args.first_token_timeout_ms),
                    idle: Duration::from_millis(args.idle_timeout_ms),
                    total: Duration::from_secs(args.max_generation_secs),
                },
                retry: RetryPolicy {
                    max_attempts: args.retry_attempts,
                    base: Duration::from_millis(args.retry_base_ms),
                    factor: args.retry_factor,
                    max: Duration::from_millis(args.retry_max_ms),
                },
                max_event_bytes: args.upstream_max_event_bytes,
                providers,
                models: file.models,
                demo: DemoConfig {
                    first_token: Duration::from_millis(args.demo_first_token_ms),
                    between_tokens: Duration::from_millis(args.demo_token_ms),
                },
            },
            store: StoreConfig::from_args(args),
            chat: ChatConfig {
                auth: args.auth,
                default_model: args.default_model.clone().unwrap_or_default(),
                history_max_chars: args.history_max_chars,
                max_message_chars: args.max_message_chars,
                replay_ttl: Duration::from_secs(args.replay_ttl_secs),
                replay_max_events: args.replay_max_events,
            },
            redis: args.redis_url.clone().map(|url| RedisConfig {
                url: Secret::new(url),
                prefix: args.redis_prefix.clone(),
            }),
            guards: GuardConfig {
                trusted_proxies: parse_cidrs(&args.trusted_proxies)?,
                rate_chat_per_min: args.rate_chat_per_min,
                rate_api_per_min: args.rate_api_per_min,
                rate_admin_per_min: args.rate_admin_per_min,
                rate_burst: args.rate_burst,
                quota_rpm: args.quota_rpm,
                quota_tpm: args.quota_tpm,
                quota_fail_open: args.quota_fail_open,
                max_streams: args.max_streams,
                max_streams_per_key: args.max_streams_per_key,
                provider_concurrency: args.provider_concurrency,
                provider_queue: Duration::from_millis(args.provider_queue_ms),
                breaker_failures: args.breaker_failures,
                breaker_open: Duration::from_secs(args.breaker_open_secs),
                breaker_successes: args.breaker_successes,
                max_header_bytes: args.max_header_bytes,
                header_timeout: Duration::from_millis(args.header_timeout_ms),
                body_timeout: Duration::from_millis(args.body_timeout_ms),
                cors_credentials: args.cors_credentials,
            },
            cache: CacheConfig {
                max_entries: args.cache_max_entries,
                ttl: Duration::from_secs(args.cache_ttl_secs),
            },
            tasks: TaskConfig {
                workers: args.task_workers,
                queue_max: args.task_queue_max,
                reclaim_idle: Duration::from_millis(args.task_reclaim_ms),
                async_default: args.tasks_async_default,
            },
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without a network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.ping_interval < Duration::from_millis(10) {
            return Err(ConfigError::new("SLUICE_PING_MS", "must be at least 10"));
        }
        for o in &s.cors_origins {
            let ok = o == "*"
                || reqwest::Url::parse(o).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.host().is_some()
                        && u.path() == "/"
                        && u.query().is_none()
                });
            if !ok {
                return Err(ConfigError::new(
                    "SLUICE_CORS_ORIGINS",
                    format!("'{o}' is not an origin like https://chat.example.com (or *)"),
                ));
            }
        }
        for h in &s.allowed_hosts {
            let name = h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
            if h.is_empty() || !(name || h.parse::<std::net::IpAddr>().is_ok()) {
                return Err(ConfigError::new(
                    "SLUICE_ALLOWED_HOSTS",
                    format!("'{h}' is not a host name like sluice.lan (no scheme, no port)"),
                ));
            }
        }
        if self.guards.cors_credentials && s.cors_origins.iter().any(|o| o == "*") {
            return Err(ConfigError::new(
                "SLUICE_CORS_ORIGINS",
                "'*' cannot be combined with SLUICE_CORS_CREDENTIALS=true: list the origins that may send credentials",
            ));
        }
        let g = &self.guards;
        if g.max_streams == 0 || g.max_streams_per_key == 0 {
            return Err(ConfigError::new(
                "SLUICE_MAX_STREAMS",
                "SLUICE_MAX_STREAMS and SLUICE_MAX_STREAMS_PER_KEY must be at least 1",
            ));
        }
        if g.breaker_failures == 0 || g.breaker_successes == 0 {
            return Err(ConfigError::new(
                "SLUICE_BREAKER_FAILURES",
                "SLUICE_BREAKER_FAILURES and SLUICE_BREAKER_SUCCESSES must be at least 1",
            ));
        }
        if g.max_header_bytes < 1024 {
            return Err(ConfigError::new(
                "SLUICE_MAX_HEADER_BYTES",
                "must be at least 1024",
            ));
        }
        if s.ws.ping_every < Duration::from_millis(10) || s.ws.idle_timeout <= s.ws.ping_every {
            return Err(ConfigError::new(
                "SLUICE_WS_IDLE_TIMEOUT_MS",
                "must be longer than SLUICE_WS_PING_MS (at least 10)",
            ));
        }
        if s.ws.send_timeout < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "SLUICE_WS_SEND_TIMEOUT_MS",
                "must be at least 10",
            ));
        }
        if s.ws_token_secret
            .as_ref()
            .is_some_and(|k| k.expose().len() < 16)
        {
            return Err(ConfigError::new(
                "SLUICE_WS_TOKEN_SECRET",
                "must be at least 16 characters",
            ));
        }
        if s.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "SLUICE_MAX_BODY_BYTES",
                "must be at least 1024",
            ));
        }
        if let Some(url) = &self.store.database_url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    "must be a postgres:// or postgresql:// URL",
                ));
            }
        }
        if self.chat.replay_max_events < 16 {
            return Err(ConfigError::new(
                "SLUICE_REPLAY_MAX_EVENTS",
                "must be at least 16",
            ));
        }
        if let Some(r) = &self.redis {
            let u = r.url.expose();
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    "must be a redis:// or rediss:// URL",
                ));
            }
            if r.prefix.is_empty() || r.prefix.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    "SLUICE_REDIS_PREFIX",
                    "must be non-empty, without spaces",
                ));
            }
        }
        // With a shared queue an instance may serve the API only and leave tasks to others.
        if self.tasks.workers == 0 && self.redis.is_none() {
            return Err(ConfigError::new(
                "SLUICE_TASK_WORKERS",
                "must be at least 1 without REDIS_URL (nothing else would run tasks)",
            ));
        }
        if self.store.pool_size == 0 {
            return Err(ConfigError::new(
                "SLUICE_DB_POOL_SIZE",
                "must be at least 1",
            ));
        }
        for (name, d) in [
            ("SLUICE_DB_QUERY_TIMEOUT_MS", self.store.query_timeout),
            ("SLUICE_DB_BREAKER_OPEN_MS", self.store.breaker_open),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(name, "must be greater than 0"));
            }
        }
        let u = &self.upstream;
        for (name, d) in [
            ("SLUICE_CONNECT_TIMEOUT_MS", u.connect_timeout),
            ("SLUICE_FIRST_TOKEN_TIMEOUT_MS", u.timeouts.first_token),
            ("SLUICE_IDLE_TIMEOUT_MS", u.timeouts.idle),
            ("SLUICE_MAX_GENERATION_SECS", u.timeouts.total),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(name, "must be greater than 0"));
            }
        }
        if u.max_event_bytes < 1024 {
            return Err(ConfigError::new(
                "SLUICE_UPSTREAM_MAX_EVENT_BYTES",
                "must be at least 1024",
            ));
        }
        if u.retry.max_attempts == 0 {
            return Err(ConfigError::new(
                "SLUICE_RETRY_ATTEMPTS",
                "must be at least 1 (1 means no retries)",
            ));
        }
        if !(u.retry.factor.is_finite() && u.retry.factor >= 1.0) {
            return Err(ConfigError::new(
                "SLUICE_RETRY_FACTOR",
                "must be a number of at least 1.0",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in u.providers.iter().enumerate() {
            let at = |field: &str| format!("providers[{i}].{field}");
            if p.name.is_empty() || p.name.contains(':') {
                return Err(ConfigError::new(
                    at("name"),
                    "must be non-empty and must not contain ':'",
                ));
            }
            if p.name == "demo" && p.kind != ProviderKind::Demo {
                return Err(ConfigError::new(
                    at("name"),
                    "'demo' is the built-in demo provider",
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("provider '{}' is defined twice", p.name),
                ));
            }
            let urls = p.urls();
            if p.kind != ProviderKind::Demo && urls.is_empty() {
                return Err(ConfigError::new(at("base_url"), "is required"));
            }
            for url in &urls {
                match reqwest::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                    _ => {
                        return Err(ConfigError::new(
                            if p.name == "openai" && p.api_key_env.is_none() {
                                "OPENAI_BASE_URL".to_owned()
                            } else {
                                at("base_url")
                            },
                            format!("'{url}' is not an http(s) URL"),
                        ));
                    }
                }
            }
            if p.kind == ProviderKind::Anthropic && urls.len() > 1 {
                return Err(ConfigError::new(
                    at("base_urls"),
                    "anthropic providers take one base_url",
                ));
            }
        }
        for (i, m) in u.models.iter().enumerate() {
            if m.targets.is_empty() {
                return Err(ConfigError::new(
                    format!("models[{i}].targets"),
                    "needs at least one provider",
                ));
            }
            for t in &m.targets {
                let provider = t.split_once(':').map(|(p, _)| p).unwrap_or(t);
                if provider != "demo" && !names.contains(provider) {
                    return Err(ConfigError::new(
                        format!("models[{i}].targets"),
                        format!("'{t}' names unknown provider '{provider}'"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn parse_cidrs(items: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError::new(
                        "SLUICE_TRUSTED_PROXIES",
                        format!("'{s}' is not an address or CIDR like 10.0.0.0/8"),
                    )
                })
        })
        .collect()
}

fn load_file(path: Option<&std::path::Path>) -> Result<FileConfig, ConfigError> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from("sluice.toml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileConfig::default());
        }
        Err(e) => {
            return Err(ConfigError::new(
                "SLUICE_CONFIG",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    };
    toml::from_str(&text).map_err(|e| {
        ConfigError::new(
            path.display().to_string(),
            e.to_string().trim().replace('\n', " "),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied()))
            .map_err(|e| ConfigError::new("cli", e.to_string()))?;
        Config::from_args(&cli.serve)
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&["--config", "/nonexistent/none.toml"]);
        assert!(c.is_err(), "an explicit missing file is an error");
        let c = parse(&[]).unwrap();
        assert_eq!(c.server.addr.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn defaults_do_not_cap_a_server_of_a_thousand_users() {
        let c = parse(&[]).unwrap();
        let g = &c.guards;
        // 0 = no limit: the cap protects an upstream account, so it is opt-in.
        assert_eq!(g.provider_concurrency, 0);
        assert!(g.max_streams >= 10_000, "{}", g.max_streams);
        // One key may be shared by an app's or a team's users.
        assert!(g.max_streams_per_key >= 1_000, "{}", g.max_streams_per_key);
        assert!(g.rate_chat_per_min >= 1_000, "{}", g.rate_chat_per_min);
        assert!(c.tasks.workers >= 32, "{}", c.tasks.workers);
        // The flags' defaults and `Default` (what tests and embedders start from) agree.
        let d = Config::default();
        assert_eq!(g.provider_concurrency, d.guards.provider_concurrency);
        assert_eq!(g.max_streams, d.guards.max_streams);
        assert_eq!(g.max_streams_per_key, d.guards.max_streams_per_key);
        assert_eq!(g.rate_chat_per_min, d.guards.rate_chat_per_min);
        assert_eq!(g.rate_api_per_min, d.guards.rate_api_per_min);
        assert_eq!(g.rate_admin_per_min, d.guards.rate_admin_per_min);
        assert_eq!(g.rate_burst, d.guards.rate_burst);
        assert_eq!(c.tasks.workers, d.tasks.workers);
        assert_eq!(c.tasks.queue_max, d.tasks.queue_max);
        assert_eq!(c.store.pool_size, d.store.pool_size);
        assert_eq!(c.chat.replay_max_events, d.chat.replay_max_events);
        assert_eq!(c.server.max_body_bytes, d.server.max_body_bytes);
        assert_eq!(c.upstream.max_event_bytes, d.upstream.max_event_bytes);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = parse(&["--addr", "nope"]).unwrap_err();
        assert_eq!(e.setting, "SLUICE_ADDR");
        let e = parse(&["--retry-attempts", "0"]).unwrap_err();
        assert_eq!(e.setting, "SLUICE_RETRY_ATTEMPTS");
        let e = parse(&["--openai-base-url", "ftp://x"]).unwrap_err();
        assert_eq!(e.setting, "OPENAI_BASE_URL");
        let e = parse(&["--upstream-max-event-bytes", "100"]).unwrap_err();
        assert_eq!(e.setting, "SLUICE_UPSTREAM_MAX_EVENT_BYTES");
        let e = Cli::try_parse_from(["sluice", "--drain-secs", "soon"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("SLUICE_DRAIN_SECS"), "{e}");
    }

    #[test]
    fn port_overrides_addr() {
        let c = parse(&["--addr", "0.0.0.0:1", "--port", "9000"]).unwrap();
        assert_eq!(c.server.addr.to_string(), "0.0.0.0:9000");
    }

    #[test]
    fn file_providers_and_routes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            r#"
[[providers]]
name = "local"
kind = "openai"
base_urls = ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
models = ["llama"]

[[models]]
name = "smart"
targets = ["local:llama", "demo"]
"#,
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.upstream.providers[0].urls().len(), 2);
        assert_eq!(c.upstream.models[0].targets.len(), 2);

        std::fs::write(&path, "[[models]]\nname = \"x\"\ntargets = [\"nowhere\"]\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert_eq!(e.setting, "models[0].targets");

        std::fs::write(&path, "[[providers]]\nname = 1\n").unwrap();
        let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.setting.ends_with("sluice.toml"), "{e}");
    }

    #[test]
    fn shipped_example_file_parses() {
        let f: FileConfig = toml::from_str(include_str!("../sluice.toml.example")).unwrap();
        assert_eq!(f.providers.len(), 3);
        assert_eq!(f.models[0].targets.len(), 3);
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?}").contains("very"));
    }
}
