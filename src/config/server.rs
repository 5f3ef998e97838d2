//! Listening, identity, drain and the HTTP surface browsers see.

use std::net::SocketAddr;
use std::time::Duration;

use super::{ConfigError, Secret, duration, websocket};

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Server")]
pub struct ServerArgs {
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
    /// Name of this instance in health output and logs (default: random).
    #[arg(long, env = "SLUICE_SERVER_ID", value_name = "SLUICE_SERVER_ID")]
    pub server_id: Option<String>,
    /// On SIGTERM, how long running streams may take to finish before they are cut.
    #[arg(
        long,
        env = "SLUICE_DRAIN_SECS",
        value_name = "SLUICE_DRAIN_SECS",
        value_parser = duration::secs,
        default_value = "30"
    )]
    pub drain_secs: Duration,
    /// At start, how long to wait for PostgreSQL and Redis to answer before giving up
    /// (0: give up at the first failure).
    #[arg(
        long,
        env = "SLUICE_START_WAIT_SECS",
        value_name = "SLUICE_START_WAIT_SECS",
        value_parser = duration::secs,
        default_value = "300"
    )]
    pub start_wait_secs: Duration,
    /// Largest request body accepted (bytes).
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", value_name = "SLUICE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Interval of `: ping` comments on SSE streams (ms).
    #[arg(
        long,
        env = "SLUICE_PING_MS",
        value_name = "SLUICE_PING_MS",
        value_parser = duration::millis,
        default_value = "15000"
    )]
    pub ping_ms: Duration,
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
    pub ws: super::WsSettings,
    pub server_id: String,
    pub drain: Duration,
    /// How long a start waits for its dependencies; zero fails at the first refusal.
    pub start_wait: Duration,
    pub max_body_bytes: usize,
    pub ping_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            ws_token_secret: None,
            ws: super::WsSettings::default(),
            server_id: new_server_id(),
            drain: Duration::from_secs(30),
            start_wait: Duration::from_secs(300),
            max_body_bytes: 1024 * 1024,
            ping_interval: Duration::from_secs(15),
        }
    }
}

fn new_server_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("sluice-{}", &id[..8])
}

impl ServerConfig {
    pub fn from_args(args: &ServerArgs, ws: &websocket::WsArgs) -> Result<Self, ConfigError> {
        let mut addr: SocketAddr = args.addr.parse().map_err(|_| {
            ConfigError::new(
                "SLUICE_ADDR",
                format!("'{}' is not an address like 127.0.0.1:8080", args.addr),
            )
        })?;
        if let Some(port) = args.port {
            addr.set_port(port);
        }
        Ok(Self {
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
            ws_token_secret: ws.ws_token_secret.clone().map(Secret::new),
            ws: ws.settings(),
            server_id: args.server_id.clone().unwrap_or_else(new_server_id),
            drain: args.drain_secs,
            start_wait: args.start_wait_secs,
            max_body_bytes: args.max_body_bytes,
            ping_interval: args.ping_ms,
        })
    }

    /// Checks the server's own settings, its WebSocket ones included.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ping_interval < Duration::from_millis(10) {
            return Err(ConfigError::new("SLUICE_PING_MS", "must be at least 10"));
        }
        for o in &self.cors_origins {
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
        for h in &self.allowed_hosts {
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
        websocket::validate(&self.ws, self.ws_token_secret.as_ref())?;
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "SLUICE_MAX_BODY_BYTES",
                "must be at least 1024",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_server_setting_at_fault() {
        assert!(ServerConfig::default().validate().is_ok());
        type Break = fn(&mut ServerConfig);
        let cases: [(&str, Break); 5] = [
            ("SLUICE_PING_MS", |c| {
                c.ping_interval = Duration::from_millis(9)
            }),
            ("SLUICE_CORS_ORIGINS", |c| {
                c.cors_origins = vec!["https://x.example/path".into()]
            }),
            ("SLUICE_ALLOWED_HOSTS", |c| {
                c.allowed_hosts = vec!["sluice.lan:8080".into()]
            }),
            ("SLUICE_MAX_BODY_BYTES", |c| c.max_body_bytes = 1023),
            ("SLUICE_WS_TOKEN_SECRET", |c| {
                c.ws_token_secret = Some(Secret::new("short"))
            }),
        ];
        for (setting, break_it) in cases {
            let mut c = ServerConfig::default();
            break_it(&mut c);
            assert_eq!(c.validate().unwrap_err().setting, setting);
        }
    }
}
