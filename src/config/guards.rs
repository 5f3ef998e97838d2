//! What protects the server from its clients: rate limits, quotas, stream caps and the
//! limits on a request's head and body.

use std::time::Duration;

use super::{ConfigError, duration};

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Guards: rate limits, quotas, input limits")]
pub struct GuardArgs {
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
        value_parser = duration::millis,
        default_value = "10000"
    )]
    pub header_timeout_ms: Duration,
    /// How long a client may take to send a request body after its head (ms); 0 = no limit.
    #[arg(
        long,
        env = "SLUICE_BODY_TIMEOUT_MS",
        value_name = "SLUICE_BODY_TIMEOUT_MS",
        value_parser = duration::millis,
        default_value = "30000"
    )]
    pub body_timeout_ms: Duration,
    /// Whether browsers may send credentials (cookies) cross-origin; refused with a `*` origin.
    #[arg(long, env = "SLUICE_CORS_CREDENTIALS", value_name = "SLUICE_CORS_CREDENTIALS", default_value_t = false, action = clap::ArgAction::Set)]
    pub cors_credentials: bool,
}

/// Rate, quota, stream and input limits.
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
            max_header_bytes: 16_384,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            cors_credentials: false,
        }
    }
}

impl GuardConfig {
    pub fn from_args(args: &GuardArgs) -> Result<Self, ConfigError> {
        Ok(Self {
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
            max_header_bytes: args.max_header_bytes,
            header_timeout: args.header_timeout_ms,
            body_timeout: args.body_timeout_ms,
            cors_credentials: args.cors_credentials,
        })
    }

    /// Whether credentials may go with a `*` origin is checked by `Config::validate`, as
    /// the origins are the server's.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_streams == 0 || self.max_streams_per_key == 0 {
            return Err(ConfigError::new(
                "SLUICE_MAX_STREAMS",
                "SLUICE_MAX_STREAMS and SLUICE_MAX_STREAMS_PER_KEY must be at least 1",
            ));
        }
        if self.max_header_bytes < 1024 {
            return Err(ConfigError::new(
                "SLUICE_MAX_HEADER_BYTES",
                "must be at least 1024",
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_guard_setting_at_fault() {
        assert!(GuardConfig::default().validate().is_ok());
        type Break = fn(&mut GuardConfig);
        let cases: [(&str, Break); 3] = [
            ("SLUICE_MAX_STREAMS", |c| c.max_streams = 0),
            ("SLUICE_MAX_STREAMS", |c| c.max_streams_per_key = 0),
            ("SLUICE_MAX_HEADER_BYTES", |c| c.max_header_bytes = 1023),
        ];
        for (setting, break_it) in cases {
            let mut c = GuardConfig::default();
            break_it(&mut c);
            assert_eq!(c.validate().unwrap_err().setting, setting);
        }
    }

    #[test]
    fn trusted_proxies_take_addresses_and_cidrs() {
        let nets = parse_cidrs(&["127.0.0.1".into(), " 10.0.0.0/8 ".into(), "".into()]).unwrap();
        assert_eq!(nets.len(), 2);
        let e = parse_cidrs(&["nginx".into()]).unwrap_err();
        assert_eq!(e.setting, "SLUICE_TRUSTED_PROXIES");
    }
}
