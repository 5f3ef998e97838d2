//! WebSocket transport: token secret, keep-alive and per-connection queue.

use std::time::Duration;

use super::{ConfigError, Secret, duration};

/// The WebSocket transport's settings, as resolved from the arguments.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Interval of server pings; also how often silence is checked.
    pub ping_every: Duration,
    /// A peer silent (no frame, no pong) for this long is closed.
    pub idle_timeout: Duration,
    /// Largest text message accepted; larger closes with 1009.
    pub max_message: usize,
    /// Event frames queued per connection; the feeds wait for room.
    pub queue: usize,
    /// A client whose queue stays full this long, taking no frame, is not reading.
    pub send_timeout: Duration,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            ping_every: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_message: 64 * 1024,
            queue: 1024,
            send_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "WebSocket")]
pub struct WsArgs {
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
        value_parser = duration::millis,
        default_value = "25000"
    )]
    pub ws_ping_ms: Duration,
    /// A WebSocket peer silent for this long is closed (ms).
    #[arg(
        long,
        env = "SLUICE_WS_IDLE_TIMEOUT_MS",
        value_name = "SLUICE_WS_IDLE_TIMEOUT_MS",
        value_parser = duration::millis,
        default_value = "60000"
    )]
    pub ws_idle_timeout_ms: Duration,
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
        value_parser = duration::millis,
        default_value = "10000"
    )]
    pub ws_send_timeout_ms: Duration,
}

impl WsArgs {
    pub fn settings(&self) -> WsSettings {
        WsSettings {
            ping_every: self.ws_ping_ms,
            idle_timeout: self.ws_idle_timeout_ms,
            max_message: WsSettings::default().max_message,
            queue: self.ws_queue,
            send_timeout: self.ws_send_timeout_ms,
        }
    }
}

/// The WebSocket settings live in `ServerConfig` (`ws`, `ws_token_secret`), which calls this.
pub fn validate(ws: &WsSettings, token_secret: Option<&Secret>) -> Result<(), ConfigError> {
    if ws.ping_every < Duration::from_millis(10) || ws.idle_timeout <= ws.ping_every {
        return Err(ConfigError::new(
            "SLUICE_WS_IDLE_TIMEOUT_MS",
            "must be longer than SLUICE_WS_PING_MS (at least 10)",
        ));
    }
    if ws.send_timeout < Duration::from_millis(10) {
        return Err(ConfigError::new(
            "SLUICE_WS_SEND_TIMEOUT_MS",
            "must be at least 10",
        ));
    }
    if token_secret.is_some_and(|k| k.expose().len() < 16) {
        return Err(ConfigError::new(
            "SLUICE_WS_TOKEN_SECRET",
            "must be at least 16 characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_websocket_setting_at_fault() {
        let ok = WsSettings::default();
        assert!(validate(&ok, None).is_ok());
        assert!(validate(&ok, Some(&Secret::new("sixteen-chars-ok"))).is_ok());
        let idle = WsSettings {
            idle_timeout: ok.ping_every,
            ..ok.clone()
        };
        assert_eq!(
            validate(&idle, None).unwrap_err().setting,
            "SLUICE_WS_IDLE_TIMEOUT_MS"
        );
        let send = WsSettings {
            send_timeout: Duration::from_millis(9),
            ..ok.clone()
        };
        assert_eq!(
            validate(&send, None).unwrap_err().setting,
            "SLUICE_WS_SEND_TIMEOUT_MS"
        );
        let short = Secret::new("fifteen-chars!!");
        assert_eq!(
            validate(&ok, Some(&short)).unwrap_err().setting,
            "SLUICE_WS_TOKEN_SECRET"
        );
    }
}
