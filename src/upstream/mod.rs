//! Upstream LLM providers: one trait, one file per provider kind, and the router that picks
//! a provider for a model, retries before the first token and falls back along the model's
//! provider chain.

pub mod anthropic;
pub mod demo;
pub mod openai;
mod router;
pub mod slots;
pub mod sse;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use std::sync::Arc;

use crate::config::{ConfigError, ProviderKind, UpstreamConfig};
use crate::domain::{ChatRequest, Chunk};

pub use router::{
    DefaultModel, ModelInfo, ModelMatch, Relay, RetryPolicy, Target, Timeouts, Upstreams,
};

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

    /// The models the upstream itself lists, in its order; `None` when it has no such list.
    async fn list_models(&self) -> Option<Result<Vec<String>, UpstreamError>> {
        None
    }
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

/// OpenAI's model for a key of theirs and no model configured: small, cheap and current.
pub const OPENAI_DEFAULT_MODEL: &str = "gpt-4o-mini";
/// Anthropic's, likewise.
pub const ANTHROPIC_DEFAULT_MODEL: &str = "claude-sonnet-4-5";

/// The default model when `SLUICE_DEFAULT_MODEL` is unset, from the first configured
/// provider: the first model it lists by name; else OpenAI's or Anthropic's own default
/// at their own APIs; else the first model an OpenAI-compatible server lists itself
/// (Ollama, vLLM…); else `demo`.
fn default_rule(cfg: &UpstreamConfig) -> DefaultModel {
    let demo = || DefaultModel::Named(demo::Demo::NAME.to_owned());
    let Some(p) = cfg.providers.first() else {
        return demo();
    };
    if let Some(m) = p.models.iter().find(|m| !m.ends_with('*')) {
        return DefaultModel::Named(m.clone());
    }
    let at_openai = p.urls().first().is_some_and(|u| {
        reqwest::Url::parse(u).is_ok_and(|u| u.host_str() == Some("api.openai.com"))
    });
    match p.kind {
        ProviderKind::Demo => demo(),
        ProviderKind::Anthropic => DefaultModel::Named(ANTHROPIC_DEFAULT_MODEL.to_owned()),
        ProviderKind::Openai if at_openai => DefaultModel::Named(OPENAI_DEFAULT_MODEL.to_owned()),
        ProviderKind::Openai if p.models.is_empty() => DefaultModel::FirstListedBy(p.name.clone()),
        // Only name patterns and no list of its own to pick from.
        ProviderKind::Openai => demo(),
    }
}

/// Builds every configured provider and model route. With no provider configured, the demo
/// provider serves every model name, so a fresh install answers any client out of the box.
pub fn from_config(
    cfg: &UpstreamConfig,
    metrics: Arc<crate::ops::metrics::Metrics>,
) -> Result<Upstreams, ConfigError> {
    let opts = |p: &crate::config::ProviderConfig| sse::ClientOptions {
        connect_timeout: cfg.connect_timeout,
        http2_prior_knowledge: p.http2,
        limits: sse::BodyLimits {
            max_event_bytes: cfg.max_event_bytes,
            oversized: metrics.upstream_oversized(&p.name),
        },
    };
    let client_err = |name: &str, e: reqwest::Error| {
        ConfigError::new(
            format!("provider {name}"),
            format!("cannot build HTTP client: {e}"),
        )
    };
    let mut ups = Upstreams::new(cfg.timeouts, cfg.retry, metrics.clone());
    ups.set_limits(
        cfg.provider_concurrency,
        cfg.provider_queue,
        crate::guard::breaker::BreakerSettings {
            failures_to_open: cfg.breaker_failures,
            open_for: cfg.breaker_open,
            successes_to_close: cfg.breaker_successes,
        },
    );
    for p in &cfg.providers {
        let provider: Arc<dyn Provider> = match p.kind {
            ProviderKind::Openai => Arc::new(
                openai::OpenAi::new(p.name.clone(), &p.urls(), p.api_key.clone(), &opts(p))
                    .map_err(|e| client_err(&p.name, e))?,
            ),
            ProviderKind::Anthropic => Arc::new(
                anthropic::Anthropic::new(
                    p.name.clone(),
                    p.urls().first().map(String::as_str).unwrap_or_default(),
                    p.api_key.clone(),
                    &opts(p),
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
    ups.set_default_rule(default_rule(cfg));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ProviderConfig, Secret};

    async fn default_of(providers: Vec<ProviderConfig>, explicit: &str) -> String {
        let mut cfg = Config::default().upstream;
        cfg.providers = providers;
        let metrics = crate::ops::metrics::Metrics::new();
        let mut ups = from_config(&cfg, metrics).unwrap();
        ups.choose_default_model(explicit).await.to_owned()
    }

    fn anthropic(models: &[&str]) -> ProviderConfig {
        ProviderConfig {
            name: "anthropic".into(),
            kind: ProviderKind::Anthropic,
            base_url: Some(crate::config::ANTHROPIC_DEFAULT_URL.into()),
            base_urls: Vec::new(),
            api_key: Some(Secret::new("k")),
            api_key_env: None,
            models: models.iter().map(|m| m.to_string()).collect(),
            http2: false,
        }
    }

    #[tokio::test]
    async fn the_default_model_follows_the_first_provider() {
        let openai = || {
            ProviderConfig::openai(
                "openai",
                crate::config::OPENAI_DEFAULT_URL,
                Some(Secret::new("k")),
            )
        };
        assert_eq!(default_of(vec![], "").await, "demo");
        assert_eq!(default_of(vec![openai()], "").await, OPENAI_DEFAULT_MODEL);
        assert_eq!(
            default_of(vec![anthropic(&["claude-*"]), openai()], "").await,
            ANTHROPIC_DEFAULT_MODEL
        );
        assert_eq!(
            default_of(vec![anthropic(&["claude-*", "claude-opus-4-1"])], "").await,
            "claude-opus-4-1"
        );
        let mut listed = openai();
        listed.models = vec!["gpt-4.1".into(), "gpt-4.1-mini".into()];
        assert_eq!(default_of(vec![listed], "").await, "gpt-4.1");
        assert_eq!(default_of(vec![openai()], " gpt-5 ").await, "gpt-5");
        // A server that cannot be asked for its list leaves the demo model.
        let nowhere = ProviderConfig::openai("local", "http://127.0.0.1:9/v1", None);
        assert_eq!(default_of(vec![nowhere], "").await, "demo");
    }

    #[tokio::test]
    async fn demo_is_the_demo_beside_a_provider_taking_any_name() {
        let mut cfg = Config::default().upstream;
        cfg.providers = vec![ProviderConfig::openai(
            "openai",
            crate::config::OPENAI_DEFAULT_URL,
            None,
        )];
        let metrics = crate::ops::metrics::Metrics::new();
        let ups = from_config(&cfg, metrics).unwrap();
        let demo = ups.resolve("demo").unwrap();
        assert_eq!(demo[0].provider.name(), "demo");
        assert_eq!(ups.resolve("gpt-4o").unwrap()[0].provider.name(), "openai");
    }
}
