//! Configuration: flags, environment (`SLUICE_*` and the conventional provider variables),
//! an optional `.env` file and an optional `sluice.toml` for providers and model routes.
//! One file per subsystem holds its flags, its settings and their checks; everything is
//! validated here, before any port is bound, and each error names the setting at fault.

mod cache;
mod chat;
pub mod duration;
mod guards;
mod log;
mod redis;
mod server;
mod store;
mod tasks;
mod upstream;
mod websocket;

pub use self::cache::{CacheArgs, CacheConfig};
pub use self::chat::{AuthMode, ChatArgs, ChatConfig};
pub use self::guards::{GuardArgs, GuardConfig};
pub use self::log::{LogArgs, LogConfig, LogFormat};
pub use self::redis::{RedisArgs, RedisConfig};
pub use self::server::{ServerArgs, ServerConfig};
pub use self::store::{DbPooler, StoreArgs, StoreConfig};
pub use self::tasks::{TaskArgs, TaskConfig};
pub use self::upstream::{
    ANTHROPIC_DEFAULT_URL, DEFAULT_MAX_EVENT_BYTES, DemoConfig, ModelRoute, OPENAI_DEFAULT_URL,
    ProviderConfig, ProviderKind, RetryPolicy, Timeouts, UpstreamArgs, UpstreamConfig,
};
pub use self::websocket::{WsArgs, WsSettings};

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

/// `sluice serve` flags, one group per subsystem (each a heading of `sluice --help`);
/// every flag can also be set by the environment variable it names.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub websocket: WsArgs,
    #[command(flatten)]
    pub guards: GuardArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub tasks: TaskArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

/// The settings of every subsystem. `Default` is the embedded defaults (loopback, demo
/// provider), which tests and embedders start from.
#[derive(Debug, Clone, Default)]
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

impl Config {
    /// Whether requests without a key are served (as the local user).
    pub fn auth_required(&self) -> bool {
        match self.chat.auth {
            AuthMode::Required => true,
            AuthMode::Off => false,
            AuthMode::Auto => !self.server.addr.ip().is_loopback(),
        }
    }

    /// Resolves flags/env and the optional file into a validated configuration.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let server = ServerConfig::from_args(&args.server, &args.websocket)?;
        let upstream = UpstreamConfig::from_args(&args.upstream)?;
        let config = Config {
            server,
            log: LogConfig::from_args(&args.log),
            upstream,
            store: StoreConfig::from_args(&args.store),
            chat: ChatConfig::from_args(&args.chat),
            redis: RedisConfig::from_args(&args.redis),
            guards: GuardConfig::from_args(&args.guards)?,
            cache: CacheConfig::from_args(&args.cache),
            tasks: TaskConfig::from_args(&args.tasks),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without a network: each group its own
    /// settings, then the few rules that span two groups.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.guards.validate()?;
        self.store.validate()?;
        self.chat.validate()?;
        if let Some(r) = &self.redis {
            r.validate()?;
        }
        self.upstream.validate()?;
        if self.guards.cors_credentials && self.server.cors_origins.iter().any(|o| o == "*") {
            return Err(ConfigError::new(
                "SLUICE_CORS_ORIGINS",
                "'*' cannot be combined with SLUICE_CORS_CREDENTIALS=true: list the origins that may send credentials",
            ));
        }
        // With a shared queue an instance may serve the API only and leave tasks to others.
        if self.tasks.workers == 0 && self.redis.is_none() {
            return Err(ConfigError::new(
                "SLUICE_TASK_WORKERS",
                "must be at least 1 without REDIS_URL (nothing else would run tasks)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::upstream::FileConfig;
    use super::*;
    use clap::Parser;
    use std::time::Duration;

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
        assert_eq!(c.upstream.provider_concurrency, 0);
        assert!(g.max_streams >= 10_000, "{}", g.max_streams);
        // One key may be shared by an app's or a team's users.
        assert!(g.max_streams_per_key >= 1_000, "{}", g.max_streams_per_key);
        assert!(g.rate_chat_per_min >= 1_000, "{}", g.rate_chat_per_min);
        assert!(c.tasks.workers >= 32, "{}", c.tasks.workers);
        // The flags' defaults and `Default` (what tests and embedders start from) agree.
        let d = Config::default();
        assert_eq!(
            c.upstream.provider_concurrency,
            d.upstream.provider_concurrency
        );
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
    fn every_flag_default_is_the_default_of_its_settings() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("sluice.toml");
        std::fs::write(&empty, "").unwrap();
        let c = parse(&["--config", empty.to_str().unwrap(), "--server-id", "a"]).unwrap();
        let mut d = Config::default();
        d.server.server_id = "a".into();
        // Debug covers every field (secrets redacted), so a default changed on one side shows.
        let groups = |c: &Config| {
            [
                format!("{:?}", c.server),
                format!("{:?}", c.log),
                format!("{:?}", c.upstream),
                format!("{:?}", c.store),
                format!("{:?}", c.chat),
                format!("{:?}", c.redis),
                format!("{:?}", c.tasks),
                format!("{:?}", c.cache),
                format!("{:?}", c.guards),
            ]
        };
        for (flags, default) in groups(&c).iter().zip(groups(&d).iter()) {
            assert_eq!(flags, default);
        }
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
        let f: FileConfig = toml::from_str(include_str!("../../sluice.toml.example")).unwrap();
        assert_eq!(f.providers.len(), 3);
        assert_eq!(f.models[0].targets.len(), 3);
    }

    #[test]
    fn rules_across_groups_are_checked_after_each_group() {
        let mut c = Config::default();
        c.guards.cors_credentials = true;
        c.server.cors_origins = vec!["*".into()];
        assert_eq!(c.validate().unwrap_err().setting, "SLUICE_CORS_ORIGINS");
        c.server.cors_origins = vec!["https://chat.example.com".into()];
        assert!(c.validate().is_ok());

        c.tasks.workers = 0;
        assert_eq!(c.validate().unwrap_err().setting, "SLUICE_TASK_WORKERS");
        c.redis = Some(RedisConfig {
            url: Secret::new("redis://127.0.0.1:6379"),
            prefix: "sluice".into(),
        });
        assert!(c.validate().is_ok(), "another instance may run the tasks");
    }

    #[test]
    fn every_flag_sits_under_its_subsystem_heading() {
        let cmd = <Cli as clap::CommandFactory>::command();
        let mut n = 0;
        for a in cmd.get_arguments() {
            assert!(
                a.get_help_heading().is_some(),
                "--{} has no heading",
                a.get_id()
            );
            n += 1;
        }
        assert!(n >= 70, "{n}");
    }

    #[test]
    fn every_duration_flag_goes_through_the_one_parser() {
        let cmd = <Cli as clap::CommandFactory>::command();
        let mut n = 0;
        for a in cmd.get_arguments() {
            let env = a
                .get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default();
            let named_as_duration =
                env.ends_with("_MS") || env.ends_with("_SECS") || env == "SLUICE_REPLAY_TTL";
            let parses_duration =
                a.get_value_parser().type_id() == std::any::TypeId::of::<Duration>();
            assert_eq!(named_as_duration, parses_duration, "{env}");
            n += usize::from(named_as_duration);
        }
        assert_eq!(n, 25);
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?}").contains("very"));
    }
}
