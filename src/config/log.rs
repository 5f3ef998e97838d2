//! Log format, filter and how much the wire libraries may say.

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
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
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
    /// Whether the wire libraries may log below WARN (see `SLUICE_LOG_WIRE`).
    pub wire: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
            wire: false,
        }
    }
}

impl LogConfig {
    /// Any filter text is accepted here; the tracing subscriber reports a bad one at start.
    pub fn from_args(args: &LogArgs) -> Self {
        Self {
            format: args.log_format,
            filter: args.log.clone(),
            wire: args.log_wire,
        }
    }
}
