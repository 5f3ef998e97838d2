//! Upstream LLM providers: one trait, one file per provider kind, and the router that picks
//! a provider for a model, retries before the first token and falls back along the model's
//! provider chain.

pub mod anthropic;
pub mod breaker;
pub mod demo;
pub mod openai;
mod router;
pub mod sse;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use std::sync::Arc;

use crate::chat::{ChatRequest, Chunk};
use crate::config::{ConfigError, ProviderKind, UpstreamConfig};

pub use router::{ModelInfo, ModelMatch, Relay, RetryPolicy, Target, Timeouts, Upstreams};

/// A live generation from one upstream, already past the response head.
pub type EventStream = BoxStream<'static, Result<Chunk, UpstreamError>>;

/// One configured upstream (an account at a provider, or the built-in demo).
#[async_trait]
pub trait Provider: Send + Sync {
    /// The configured name, used in logs, metrics and error messages.
    fn name(&self) -> &str;

    /// Sends `req` with `model` as the upstream's model name and waits for the response
    /// head. `Ok` means the upstream accepted the request and is about to stream; every
    /// failure after that arrives in the stream.
    async fn open(&self, req: &ChatRequest, model: &str) -> Result<EventStream, UpstreamError>;
}

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    FirstToken,
    Idle,
    Total,
}

impl TimeoutKind {
    pub fn code(self) -> &'static str {
        match self {
            Self::FirstToken => "first_token_timeout",
            Self::Idle => "idle_timeout",
            Self::Total => "total_timeout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP/TLS connection could not be made, or broke before a response head arrived.
    #[error("upstream {provider} unreachable: {message}")]
    Connect { provider: String, message: String },
    /// The upstream answered with a non-success status.
    #[error("upstream {provider} returned {status}: {message}")]
    Status {
        provider: String,
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("upstream {provider}: {}", timeout_message(*.kind))]
    Timeout { provider: String, kind: TimeoutKind },
    /// The connection broke mid-stream.
    #[error("upstream {provider} stream broke: {message}")]
    Transport { provider: String, message: String },
    /// The upstream sent something that is not valid for its protocol.
    #[error("upstream {provider} sent a malformed event: {message}")]
    Malformed { provider: String, message: String },
    /// The upstream reported an error inside the stream.
    #[error("upstream {provider} reported an error: {message}")]
    InBand {
        provider: String,
        message: String,
        code: Option<String>,
    },
    /// The request has no form in the provider's API (a content part or tool it lacks), or
    /// is malformed in a way only translating it shows; another provider may still take it.
    #[error("upstream {provider} cannot take this request: {message}")]
    Untranslatable { provider: String, message: String },
    /// No configured provider serves the model.
    #[error("model '{0}' is not served by any configured provider")]
    UnknownModel(String),
    /// The provider's concurrency limit stayed full for the whole queue wait.
    #[error("upstream {provider} is at its concurrency limit; retry shortly")]
    Busy { provider: String },
    /// The provider's circuit is open after repeated failures.
    #[error("upstream {provider} is failing; its circuit is open")]
    CircuitOpen { provider: String, retry_after: u64 },
}

fn timeout_message(kind: TimeoutKind) -> &'static str {
    match kind {
        TimeoutKind::FirstToken => "no token before the first-token timeout",
        TimeoutKind::Idle => "no token within the idle timeout",
        TimeoutKind::Total => "generation exceeded the total time limit",
    }
}

impl UpstreamError {
    /// Whether trying the same provider again may succeed (before the first token only).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// Whether the model's next provider may succeed where this one failed. Errors caused by
    /// the request itself (400, 413, 422) would fail everywhere, so they do not fall back.
    pub fn may_fall_back(&self) -> bool {
        match self {
            Self::Status { status, .. } => !matches!(status, 400 | 413 | 422),
            Self::UnknownModel(_) => false,
            _ => true,
        }
    }

    /// A stable machine-readable code for clients and metrics.
    pub fn code(&self) -> &str {
        match self {
            Self::Connect { .. } => "upstream_unreachable",
            Self::Status { status: 429, .. } => "upstream_rate_limited",
            Self::Status { status, .. } if *status >= 500 => "upstream_error",
            Self::Status { .. } => "upstream_rejected",
            Self::Timeout { kind, .. } => kind.code(),
            Self::Transport { .. } => "upstream_disconnected",
            Self::Malformed { .. } => "upstream_malformed",
            Self::InBand { .. } => "upstream_error",
            Self::Untranslatable { .. } => "untranslatable_request",
            Self::UnknownModel(_) => "model_not_found",
            Self::Busy { .. } => "upstream_busy",
            Self::CircuitOpen { .. } => "circuit_open",
        }
    }

    /// Whether the failure says the provider is unhealthy (counts toward its breaker):
    /// unreachable, 5xx, too slow, broken or garbled. Rate limits and request errors do not.
    pub fn is_provider_failure(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Transport { .. }
            | Self::Malformed { .. }
            | Self::InBand { .. } => true,
            Self::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }

    pub fn provider(&self) -> Option<&str> {
        match self {
            Self::Connect { provider, .. }
            | Self::Status { provider, .. }
            | Self::Timeout { provider, .. }
            | Self::Transport { provider, .. }
            | Self::Malformed { provider, .. }
            | Self::InBand { provider, .. }
            | Self::Untranslatable { provider, .. }
            | Self::Busy { provider }
            | Self::CircuitOpen { provider, .. } => Some(provider),
            Self::UnknownModel(_) => None,
        }
    }
}

/// Builds every configured provider and model route. With no provider configured, the demo
/// provider serves every model name, so a fresh install answers any client out of the box.
pub fn from_config(
    cfg: &UpstreamConfig,
    guards: &crate::config::GuardConfig,
    metrics: Arc<crate::ops::metrics::Metrics>,
) -> Result<Upstreams, ConfigError> {
    let opts = |http2| sse::ClientOptions {
        connect_timeout: cfg.connect_timeout,
        http2_prior_knowledge: http2,
    };
    let client_err = |name: &str, e: reqwest::Error| {
        ConfigError::new(
            format!("provider {name}"),
            format!("cannot build HTTP client: {e}"),
        )
    };
    let mut ups = Upstreams::new(cfg.timeouts, cfg.retry, metrics);
    ups.set_limits(
        guards.provider_concurrency,
        guards.provider_queue,
        breaker::BreakerSettings {
            failures_to_open: guards.breaker_failures,
            open_for: guards.breaker_open,
            successes_to_close: guards.breaker_successes,
        },
    );
    for p in &cfg.providers {
        let provider: Arc<dyn Provider> = match p.kind {
            ProviderKind::Openai => Arc::new(
                openai::OpenAi::new(p.name.clone(), &p.urls(), p.api_key.clone(), &opts(p.http2))
                    .map_err(|e| client_err(&p.name, e))?,
            ),
            ProviderKind::Anthropic => Arc::new(
                anthropic::Anthropic::new(
                    p.name.clone(),
                    p.urls().first().map(String::as_str).unwrap_or_default(),
                    p.api_key.clone(),
                    &opts(p.http2),
                )
                .map_err(|e| client_err(&p.name, e))?,
            ),
            ProviderKind::Demo => Arc::new(demo::Demo::new(
                cfg.demo.first_token,
                cfg.demo.between_tokens,
            )),
        };
        let models = if p.models.is_empty() {
            ModelMatch::Any
        } else {
            ModelMatch::Listed(p.models.clone())
        };
        ups.add_provider(provider, models, &p.name);
    }
    let demo_match = if cfg.providers.is_empty() {
        // The start-up log's providers line says so, with how to add a real one.
        tracing::debug!(
            "no upstream provider configured: the built-in demo provider answers every model"
        );
        ModelMatch::Any
    } else {
        ModelMatch::Listed(vec![demo::Demo::NAME.to_owned()])
    };
    if ups.provider(demo::Demo::NAME).is_none() {
        ups.add_provider(
            Arc::new(demo::Demo::new(
                cfg.demo.first_token,
                cfg.demo.between_tokens,
            )),
            demo_match,
            "sluice-demo",
        );
    }
    ups.list_model(demo::Demo::NAME, "sluice-demo");
    for m in &cfg.models {
        let mut chain = Vec::with_capacity(m.targets.len());
        for t in &m.targets {
            let (name, model) = match t.split_once(':') {
                Some((p, m)) => (p, Some(m.to_owned())),
                None => (t.as_str(), None),
            };
            let provider = ups.provider(name).ok_or_else(|| {
                ConfigError::new("models", format!("'{t}' names unknown provider '{name}'"))
            })?;
            chain.push(Target { provider, model });
        }
        ups.add_alias(m.name.clone(), chain);
    }
    Ok(ups)
}
