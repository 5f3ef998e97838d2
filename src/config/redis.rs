//! Redis, which turns on the cluster mode (shared queue, cross-instance streams, quotas).

use super::{ConfigError, Secret};

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Redis (cluster mode)")]
pub struct RedisArgs {
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
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Secret,
    /// Every key starts with `<prefix>:`.
    pub prefix: String,
}

impl RedisConfig {
    /// `None` without REDIS_URL: the prefix alone turns nothing on.
    pub fn from_args(args: &RedisArgs) -> Option<Self> {
        args.redis_url.clone().map(|url| Self {
            url: Secret::new(url),
            prefix: args.redis_prefix.clone(),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let u = self.url.expose();
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            return Err(ConfigError::new(
                "REDIS_URL",
                "must be a redis:// or rediss:// URL",
            ));
        }
        if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "SLUICE_REDIS_PREFIX",
                "must be non-empty, without spaces",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(url: &str, prefix: &str) -> RedisConfig {
        RedisConfig {
            url: Secret::new(url),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn validate_names_the_redis_setting_at_fault() {
        assert!(redis("redis://127.0.0.1:6379", "sluice").validate().is_ok());
        assert!(
            redis("rediss://cache.example:6380", "a-b")
                .validate()
                .is_ok()
        );
        let e = redis("http://127.0.0.1:6379", "sluice")
            .validate()
            .unwrap_err();
        assert_eq!(e.setting, "REDIS_URL");
        for prefix in ["", "two words"] {
            let e = redis("redis://x", prefix).validate().unwrap_err();
            assert_eq!(e.setting, "SLUICE_REDIS_PREFIX");
        }
    }
}
