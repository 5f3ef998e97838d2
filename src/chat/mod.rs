//! Chat domain types shared by every transport and every upstream.
//!
//! Nothing here knows about HTTP frameworks or wire formats of a particular provider: the
//! OpenAI-compatible API, the session API and the upstream adapters all translate to and
//! from these types, which keeps one relay path for all of them.

pub mod agent;
pub mod flight;
pub mod service;

use serde::{Deserialize, Serialize};

/// Counts streamed tokens against a caller's quota as they are produced.
#[async_trait::async_trait]
pub trait TokenMeter: Send + Sync {
    async fn add_tokens(&self, key_id: &str, n: u64);
}

/// How many tokens are counted at once: often enough to stop a runaway stream, rarely
/// enough that the relay does not wait on the quota store per token.
pub const METER_EVERY: u64 = 16;
use serde_json::{Map, Value};

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Content,
}

impl Message {
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: Content::Text(text.into()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for a system message; kept so requests round-trip unchanged.
    Developer,
    User,
    Assistant,
    Tool,
}

/// OpenAI accepts a plain string or an array of typed parts. Parts are kept as JSON so an
/// OpenAI-compatible upstream receives them unchanged (images included); providers that
/// only take text use [`Content::text`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl Content {
    /// The text of the message: the string itself, or the `text` of every text part joined.
    pub fn text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// A completion request as sluice understands it, independent of where it came from.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// The model name the client asked for (an alias or a provider's model name).
    pub model: String,
    pub messages: Vec<Message>,
    pub params: GenParams,
    /// Fields sluice does not interpret; forwarded verbatim to OpenAI-compatible upstreams
    /// so provider-specific options (an SDK's `extra_body`) keep working.
    pub extra: Map<String, Value>,
}

/// Sampling parameters every provider kind understands in some form.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GenParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// Token accounting reported by the upstream.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Usage {
    pub fn total(&self) -> u32 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Why a generation ended, in OpenAI's vocabulary (the one most clients already parse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
    #[serde(untagged)]
    Other(String),
}

impl FinishReason {
    pub fn parse(s: &str) -> Self {
        match s {
            "stop" => Self::Stop,
            "length" => Self::Length,
            "tool_calls" => Self::ToolCalls,
            "content_filter" => Self::ContentFilter,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
            Self::Other(s) => s,
        }
    }
}

/// What an upstream produces while generating. Providers translate their wire events to
/// these; everything downstream of the provider sees only this.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamEvent {
    /// A piece of the reply text. Never empty: providers drop empty deltas.
    Token(String),
    Usage(Usage),
    Finish(FinishReason),
}
