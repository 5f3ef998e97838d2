//! Upstream providers and model routes (flags, environment and `sluice.toml`), their
//! timeouts and retries, and the per-provider concurrency limit and circuit breaker.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret, duration};

pub const OPENAI_DEFAULT_URL: &str = "https://api.openai.com/v1";
pub const ANTHROPIC_DEFAULT_URL: &str = "https://api.anthropic.com/v1";

/// Default of `BodyLimits::max_event_bytes` (`SLUICE_UPSTREAM_MAX_EVENT_BYTES`): far above
/// any real chunk, a whole inline image included.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 8 << 20;

/// Per-generation time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From sending the request to the first token (response head included).
    pub first_token: Duration,
    /// Longest silence allowed between two events once tokens flow.
    pub idle: Duration,
    /// Longest a whole generation may run.
    pub total: Duration,
}

/// Retries of one provider before its first token.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries per provider, the first included; 1 disables retries.
    pub max_attempts: u32,
    pub base: Duration,
    pub factor: f64,
    /// Cap of one backoff; a `Retry-After` longer than this is not waited for.
    pub max: Duration,
}

// Headings of `sluice --help`, the same as the sections of `.env.example`.
const TIMEOUTS: &str = "Upstream timeouts and retries";
const LIMITS: &str = "Upstream concurrency limits and circuit breakers";
const DEMO: &str = "Built-in demo provider";

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Upstream providers")]
pub struct UpstreamArgs {
    /// Providers and model routes file; `./sluice.toml` is read when it exists.
    #[arg(long, env = "SLUICE_CONFIG", value_name = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
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
    /// Upstream TCP/TLS connect timeout (ms).
    #[arg(
        long,
        env = "SLUICE_CONNECT_TIMEOUT_MS",
        value_name = "SLUICE_CONNECT_TIMEOUT_MS",
        value_parser = duration::millis,
        default_value = "5000",
        help_heading = TIMEOUTS
    )]
    pub connect_timeout_ms: Duration,
    /// From request to first token (ms).
    #[arg(
        long,
        env = "SLUICE_FIRST_TOKEN_TIMEOUT_MS",
        value_name = "SLUICE_FIRST_TOKEN_TIMEOUT_MS",
        value_parser = duration::millis,
        default_value = "60000",
        help_heading = TIMEOUTS
    )]
    pub first_token_timeout_ms: Duration,
    /// Longest silence between two tokens (ms).
    #[arg(
        long,
        env = "SLUICE_IDLE_TIMEOUT_MS",
        value_name = "SLUICE_IDLE_TIMEOUT_MS",
        value_parser = duration::millis,
        default_value = "60000",
        help_heading = TIMEOUTS
    )]
    pub idle_timeout_ms: Duration,
    /// Longest a generation may run (s).
    #[arg(
        long,
        env = "SLUICE_MAX_GENERATION_SECS",
        value_name = "SLUICE_MAX_GENERATION_SECS",
        value_parser = duration::secs,
        default_value = "600",
        help_heading = TIMEOUTS
    )]
    pub max_generation_secs: Duration,
    /// Longest line, and most data of one event, an upstream stream may send (bytes); past
    /// it the stream fails as `upstream_malformed`.
    #[arg(
        long,
        env = "SLUICE_UPSTREAM_MAX_EVENT_BYTES",
        value_name = "SLUICE_UPSTREAM_MAX_EVENT_BYTES",
        default_value_t = DEFAULT_MAX_EVENT_BYTES,
        help_heading = TIMEOUTS
    )]
    pub upstream_max_event_bytes: usize,
    /// Tries per provider before the first token, the first included.
    #[arg(
        long,
        env = "SLUICE_RETRY_ATTEMPTS",
        value_name = "SLUICE_RETRY_ATTEMPTS",
        default_value_t = 3,
        help_heading = TIMEOUTS
    )]
    pub retry_attempts: u32,
    /// First retry backoff (ms).
    #[arg(
        long,
        env = "SLUICE_RETRY_BASE_MS",
        value_name = "SLUICE_RETRY_BASE_MS",
        value_parser = duration::millis,
        default_value = "1000",
        help_heading = TIMEOUTS
    )]
    pub retry_base_ms: Duration,
    /// Backoff growth per retry.
    #[arg(
        long,
        env = "SLUICE_RETRY_FACTOR",
        value_name = "SLUICE_RETRY_FACTOR",
        default_value_t = 2.0,
        help_heading = TIMEOUTS
    )]
    pub retry_factor: f64,
    /// Longest single backoff, and longest Retry-After honoured (ms).
    #[arg(
        long,
        env = "SLUICE_RETRY_MAX_MS",
        value_name = "SLUICE_RETRY_MAX_MS",
        value_parser = duration::millis,
        default_value = "10000",
        help_heading = TIMEOUTS
    )]
    pub retry_max_ms: Duration,
    /// Most upstream calls at once per provider, across the cluster with REDIS_URL; 0 = no
    /// limit (the demo provider has none).
    #[arg(
        long,
        env = "SLUICE_PROVIDER_CONCURRENCY",
        value_name = "SLUICE_PROVIDER_CONCURRENCY",
        default_value_t = 0,
        help_heading = LIMITS
    )]
    pub provider_concurrency: usize,
    /// How long a request waits for a provider slot before 503 (ms).
    #[arg(
        long,
        env = "SLUICE_PROVIDER_QUEUE_MS",
        value_name = "SLUICE_PROVIDER_QUEUE_MS",
        value_parser = duration::millis,
        default_value = "5000",
        help_heading = LIMITS
    )]
    pub provider_queue_ms: Duration,
    /// Consecutive failures that open a provider's circuit.
    #[arg(
        long,
        env = "SLUICE_BREAKER_FAILURES",
        value_name = "SLUICE_BREAKER_FAILURES",
        default_value_t = 5,
        help_heading = LIMITS
    )]
    pub breaker_failures: u32,
    /// How long an open circuit fails fast before letting a trial request through (s).
    #[arg(
        long,
        env = "SLUICE_BREAKER_OPEN_SECS",
        value_name = "SLUICE_BREAKER_OPEN_SECS",
        value_parser = duration::secs,
        default_value = "30",
        help_heading = LIMITS
    )]
    pub breaker_open_secs: Duration,
    /// Successes in half-open state that close the circuit again.
    #[arg(
        long,
        env = "SLUICE_BREAKER_SUCCESSES",
        value_name = "SLUICE_BREAKER_SUCCESSES",
        default_value_t = 3,
        help_heading = LIMITS
    )]
    pub breaker_successes: u32,
    /// Demo provider: delay before its first token (ms).
    #[arg(
        long,
        env = "SLUICE_DEMO_FIRST_TOKEN_MS",
        value_name = "SLUICE_DEMO_FIRST_TOKEN_MS",
        value_parser = duration::millis,
        default_value = "300",
        help_heading = DEMO
    )]
    pub demo_first_token_ms: Duration,
    /// Demo provider: delay between tokens (ms).
    #[arg(
        long,
        env = "SLUICE_DEMO_TOKEN_MS",
        value_name = "SLUICE_DEMO_TOKEN_MS",
        value_parser = duration::millis,
        default_value = "40",
        help_heading = DEMO
    )]
    pub demo_token_ms: Duration,
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
    /// Upstream calls at once per provider; 0 = no limit.
    pub provider_concurrency: usize,
    /// How long a call waits for a provider slot.
    pub provider_queue: Duration,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    pub breaker_successes: u32,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
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
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            providers: Vec::new(),
            models: Vec::new(),
            demo: DemoConfig {
                first_token: Duration::from_millis(300),
                between_tokens: Duration::from_millis(40),
            },
            provider_concurrency: 0,
            provider_queue: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(30),
            breaker_successes: 3,
        }
    }
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
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) providers: Vec<ProviderConfig>,
    #[serde(default)]
    pub(super) models: Vec<ModelRoute>,
}

impl UpstreamConfig {
    /// Reads the providers file, adds the providers the environment names and resolves
    /// every `api_key_env`.
    pub fn from_args(args: &UpstreamArgs) -> Result<Self, ConfigError> {
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
        Ok(Self {
            connect_timeout: args.connect_timeout_ms,
            timeouts: Timeouts {
                first_token: args.first_token_timeout_ms,
                idle: args.idle_timeout_ms,
                total: args.max_generation_secs,
            },
            retry: RetryPolicy {
                max_attempts: args.retry_attempts,
                base: args.retry_base_ms,
                factor: args.retry_factor,
                max: args.retry_max_ms,
            },
            max_event_bytes: args.upstream_max_event_bytes,
            providers,
            models: file.models,
            demo: DemoConfig {
                first_token: args.demo_first_token_ms,
                between_tokens: args.demo_token_ms,
            },
            provider_concurrency: args.provider_concurrency,
            provider_queue: args.provider_queue_ms,
            breaker_failures: args.breaker_failures,
            breaker_open: args.breaker_open_secs,
            breaker_successes: args.breaker_successes,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.breaker_failures == 0 || self.breaker_successes == 0 {
            return Err(ConfigError::new(
                "SLUICE_BREAKER_FAILURES",
                "SLUICE_BREAKER_FAILURES and SLUICE_BREAKER_SUCCESSES must be at least 1",
            ));
        }
        for (name, d) in [
            ("SLUICE_CONNECT_TIMEOUT_MS", self.connect_timeout),
            ("SLUICE_FIRST_TOKEN_TIMEOUT_MS", self.timeouts.first_token),
            ("SLUICE_IDLE_TIMEOUT_MS", self.timeouts.idle),
            ("SLUICE_MAX_GENERATION_SECS", self.timeouts.total),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(name, "must be greater than 0"));
            }
        }
        if self.max_event_bytes < 1024 {
            return Err(ConfigError::new(
                "SLUICE_UPSTREAM_MAX_EVENT_BYTES",
                "must be at least 1024",
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::new(
                "SLUICE_RETRY_ATTEMPTS",
                "must be at least 1 (1 means no retries)",
            ));
        }
        if !(self.retry.factor.is_finite() && self.retry.factor >= 1.0) {
            return Err(ConfigError::new(
                "SLUICE_RETRY_FACTOR",
                "must be a number of at least 1.0",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
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
        for (i, m) in self.models.iter().enumerate() {
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

    #[test]
    fn validate_names_the_upstream_setting_at_fault() {
        assert!(UpstreamConfig::default().validate().is_ok());
        type Break = fn(&mut UpstreamConfig);
        let cases: [(&str, Break); 9] = [
            ("SLUICE_BREAKER_FAILURES", |c| c.breaker_failures = 0),
            ("SLUICE_BREAKER_FAILURES", |c| c.breaker_successes = 0),
            ("SLUICE_CONNECT_TIMEOUT_MS", |c| {
                c.connect_timeout = Duration::ZERO
            }),
            ("SLUICE_MAX_GENERATION_SECS", |c| {
                c.timeouts.total = Duration::ZERO
            }),
            ("SLUICE_UPSTREAM_MAX_EVENT_BYTES", |c| {
                c.max_event_bytes = 1023
            }),
            ("SLUICE_RETRY_ATTEMPTS", |c| c.retry.max_attempts = 0),
            ("SLUICE_RETRY_FACTOR", |c| c.retry.factor = f64::NAN),
            ("OPENAI_BASE_URL", |c| {
                c.providers = vec![ProviderConfig::openai("openai", "ftp://x", None)]
            }),
            ("models[0].targets", |c| {
                c.models = vec![ModelRoute {
                    name: "smart".into(),
                    targets: vec!["nowhere:llama".into()],
                }]
            }),
        ];
        for (setting, break_it) in cases {
            let mut c = UpstreamConfig::default();
            break_it(&mut c);
            assert_eq!(c.validate().unwrap_err().setting, setting);
        }
    }

    #[test]
    fn validate_refuses_a_provider_named_twice_or_without_url() {
        let mut c = UpstreamConfig::default();
        let p = ProviderConfig::openai("local", "http://127.0.0.1:1/v1", None);
        c.providers = vec![p.clone(), p.clone()];
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "providers[1].name");
        c.providers = vec![ProviderConfig {
            base_url: None,
            ..p
        }];
        assert_eq!(c.validate().unwrap_err().setting, "providers[0].base_url");
    }
}
