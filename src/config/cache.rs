//! The in-process response cache.

use std::time::Duration;

use super::duration;

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Response cache")]
pub struct CacheArgs {
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
        value_parser = duration::secs,
        default_value = "3600"
    )]
    pub cache_ttl_secs: Duration,
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

impl CacheConfig {
    /// Every value is meaningful (a zero TTL is "off"), so there is nothing to validate.
    pub fn from_args(args: &CacheArgs) -> Self {
        Self {
            max_entries: args.cache_max_entries,
            ttl: args.cache_ttl_secs,
        }
    }
}
