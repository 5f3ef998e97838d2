//! The store: embedded SQLite, or PostgreSQL directly or through a transaction pooler.

use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, Secret, duration};

/// What sits between sluice and PostgreSQL (`SLUICE_DB_POOLER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum DbPooler {
    /// A direct connection: sluice sends its statement timeout as a startup option.
    #[default]
    None,
    /// PgBouncer, any pool mode: no startup options (it refuses them).
    Pgbouncer,
}

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Store")]
pub struct StoreArgs {
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
        value_parser = duration::millis,
        default_value = "5000"
    )]
    pub db_acquire_timeout_ms: Duration,
    /// Connections older than this are replaced (s), so failovers and config changes are picked up.
    #[arg(
        long,
        env = "SLUICE_DB_MAX_LIFETIME_SECS",
        value_name = "SLUICE_DB_MAX_LIFETIME_SECS",
        value_parser = duration::secs,
        default_value = "1800"
    )]
    pub db_max_lifetime_secs: Duration,
    /// Longest a PostgreSQL statement may take, answer included (ms); the connection of one
    /// that takes longer is dropped, so a hung database cannot hold the pool.
    #[arg(
        long,
        env = "SLUICE_DB_QUERY_TIMEOUT_MS",
        value_name = "SLUICE_DB_QUERY_TIMEOUT_MS",
        value_parser = duration::millis,
        default_value = "30000"
    )]
    pub db_query_timeout_ms: Duration,
    /// After the database is found down, requests fail at once for this long (ms) before one
    /// tries it again.
    #[arg(
        long,
        env = "SLUICE_DB_BREAKER_OPEN_MS",
        value_name = "SLUICE_DB_BREAKER_OPEN_MS",
        value_parser = duration::millis,
        default_value = "2000"
    )]
    pub db_breaker_open_ms: Duration,
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
    pub fn from_args(args: &StoreArgs) -> Self {
        Self {
            database_url: args.database_url.clone().map(Secret::new),
            data_dir: args.data_dir.clone(),
            pool_size: args.db_pool_size,
            acquire_timeout: args.db_acquire_timeout_ms,
            max_lifetime: args.db_max_lifetime_secs,
            query_timeout: args.db_query_timeout_ms,
            breaker_open: args.db_breaker_open_ms,
            pooler: args.db_pooler,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    "must be a postgres:// or postgresql:// URL",
                ));
            }
        }
        if self.pool_size == 0 {
            return Err(ConfigError::new(
                "SLUICE_DB_POOL_SIZE",
                "must be at least 1",
            ));
        }
        for (name, d) in [
            ("SLUICE_DB_QUERY_TIMEOUT_MS", self.query_timeout),
            ("SLUICE_DB_BREAKER_OPEN_MS", self.breaker_open),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(name, "must be greater than 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_store_setting_at_fault() {
        assert!(StoreConfig::default().validate().is_ok());
        type Break = fn(&mut StoreConfig);
        let cases: [(&str, Break); 4] = [
            ("DATABASE_URL", |c| {
                c.database_url = Some(Secret::new("mysql://localhost/sluice"))
            }),
            ("SLUICE_DB_POOL_SIZE", |c| c.pool_size = 0),
            ("SLUICE_DB_QUERY_TIMEOUT_MS", |c| {
                c.query_timeout = Duration::ZERO
            }),
            ("SLUICE_DB_BREAKER_OPEN_MS", |c| {
                c.breaker_open = Duration::ZERO
            }),
        ];
        for (setting, break_it) in cases {
            let mut c = StoreConfig::default();
            break_it(&mut c);
            assert_eq!(c.validate().unwrap_err().setting, setting);
        }
        let pg = StoreConfig {
            database_url: Some(Secret::new("postgresql://postgres@127.0.0.1/sluice")),
            ..StoreConfig::default()
        };
        assert!(pg.validate().is_ok());
    }
}
