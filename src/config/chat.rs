//! API keys, default model, message and history sizes, and resumable streams.

use std::time::Duration;

use super::{ConfigError, duration};

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

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "API keys and chat sessions")]
pub struct ChatArgs {
    /// API keys: auto (off on a loopback address, required otherwise), required, off.
    #[arg(long, env = "SLUICE_AUTH", value_name = "SLUICE_AUTH", value_enum, default_value_t = AuthMode::Auto)]
    pub auth: AuthMode,
    /// Model of sessions and tasks whose agent names none. Default: chosen from the first
    /// provider (see docs/configuration.md), `demo` without one.
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
        value_parser = duration::secs,
        default_value = "600"
    )]
    pub replay_ttl_secs: Duration,
    /// Events kept per generation for replay; a subscriber further behind is told `lagged`.
    #[arg(
        long,
        env = "SLUICE_REPLAY_MAX_EVENTS",
        value_name = "SLUICE_REPLAY_MAX_EVENTS",
        default_value_t = 16_384
    )]
    pub replay_max_events: usize,
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

impl ChatConfig {
    pub fn from_args(args: &ChatArgs) -> Self {
        Self {
            auth: args.auth,
            default_model: args.default_model.clone().unwrap_or_default(),
            history_max_chars: args.history_max_chars,
            max_message_chars: args.max_message_chars,
            replay_ttl: args.replay_ttl_secs,
            replay_max_events: args.replay_max_events,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.replay_max_events < 16 {
            return Err(ConfigError::new(
                "SLUICE_REPLAY_MAX_EVENTS",
                "must be at least 16",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_chat_setting_at_fault() {
        assert!(ChatConfig::default().validate().is_ok());
        let c = ChatConfig {
            replay_max_events: 15,
            ..ChatConfig::default()
        };
        assert_eq!(
            c.validate().unwrap_err().setting,
            "SLUICE_REPLAY_MAX_EVENTS"
        );
    }
}
