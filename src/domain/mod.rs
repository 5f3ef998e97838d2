//! Chat domain types shared by every transport, every upstream and every service.
//!
//! Nothing here knows about HTTP frameworks, storage or a particular provider's wire format,
//! and nothing here names another module of the crate: the OpenAI-compatible API, the
//! session API and the upstream adapters all translate to and from these types, which keeps
//! one relay path for all of them.

pub mod chunk;

use serde::{Deserialize, Serialize};

/// Counts streamed tokens against a caller's quota as they are produced.
#[async_trait::async_trait]
pub trait TokenMeter: Send + Sync {
    async fn add_tokens(&self, key_id: &str, n: u64);

    /// [`add_tokens`](Self::add_tokens) from where nothing can wait (a reply dropped
    /// mid-stream): the count is sent in the background.
    fn add_tokens_later(self: std::sync::Arc<Self>, key_id: String, n: u64);
}

/// How many tokens are counted at once: often enough to stop a runaway stream, rarely
/// enough that the relay does not wait on the quota store per token.
pub const METER_EVERY: u64 = 16;
use serde_json::{Map, Value};

/// One message of a conversation, kept as the client sent it: OpenAI-compatible upstreams
/// receive every field unchanged (`tool_calls`, `tool_call_id`, `name`, content parts,
/// `audio`, fields sluice does not know). sluice itself reads the role and the text, and
/// providers with another format read the rest through [`Message::get`].
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    fields: Map<String, Value>,
}

impl Message {
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        let mut fields = Map::new();
        fields.insert("role".into(), role.as_str().into());
        fields.insert("content".into(), Value::String(text.into()));
        Self { role, fields }
    }

    /// The message's text: `content` itself, or the `text` of every text part joined.
    pub fn text(&self) -> String {
        match self.fields.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        }
    }

    /// Any field of the message as sent (`content`, `tool_calls`, `tool_call_id`, `name`…).
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.fields.get(field).filter(|v| !v.is_null())
    }
}

impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.fields.serialize(s)
    }
}

/// Checks what sluice relies on — a known role, and fields of the right JSON type where
/// they are present — field by field, so an error names its field (`messages[1].content`).
/// Everything else is the upstream's to judge.
impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Message, A::Error> {
                let mut fields = Map::new();
                let mut role = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value = match key.as_str() {
                        "role" => {
                            let r = map.next_value::<Checked<RoleField>>()?;
                            role = Role::parse(r.0.as_str().unwrap_or_default());
                            r.0
                        }
                        "content" => map.next_value::<Checked<ContentField>>()?.0,
                        "tool_calls" => map.next_value::<Checked<ArrayField>>()?.0,
                        "tool_call_id" | "name" => map.next_value::<Checked<StringField>>()?.0,
                        _ => map.next_value::<Value>()?,
                    };
                    fields.insert(key, value);
                }
                let role = role.ok_or_else(|| serde::de::Error::missing_field("role"))?;
                Ok(Message { role, fields })
            }
        }
        d.deserialize_map(V)
    }
}

/// A field's JSON value, checked by `C` as it is read.
struct Checked<C>(Value, std::marker::PhantomData<C>);

trait Check {
    fn check(v: &Value) -> Result<(), String>;
}

impl<'de, C: Check> Deserialize<'de> for Checked<C> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        C::check(&v).map_err(serde::de::Error::custom)?;
        Ok(Checked(v, std::marker::PhantomData))
    }
}

struct RoleField;
impl Check for RoleField {
    fn check(v: &Value) -> Result<(), String> {
        match v.as_str() {
            Some(r) if Role::parse(r).is_some() => Ok(()),
            Some(r) => Err(format!(
                "'{r}' is not one of system, developer, user, assistant, tool, function"
            )),
            None => Err("must be a string".into()),
        }
    }
}

struct ContentField;
impl Check for ContentField {
    fn check(v: &Value) -> Result<(), String> {
        match v {
            Value::Null | Value::String(_) => Ok(()),
            Value::Array(parts) => match parts.iter().position(|p| !p.is_object()) {
                Some(i) => Err(format!("part {i} is not an object")),
                None => Ok(()),
            },
            _ => Err("must be a string, an array of content parts or null".into()),
        }
    }
}

struct ArrayField;
impl Check for ArrayField {
    fn check(v: &Value) -> Result<(), String> {
        match v {
            Value::Null | Value::Array(_) => Ok(()),
            _ => Err("must be an array".into()),
        }
    }
}

struct StringField;
impl Check for StringField {
    fn check(v: &Value) -> Result<(), String> {
        match v {
            Value::Null | Value::String(_) => Ok(()),
            _ => Err("must be a string".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for a system message.
    Developer,
    User,
    Assistant,
    Tool,
    /// The legacy role of a function's result (before `tool`).
    Function,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function => "function",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            "function" => Role::Function,
            _ => return None,
        })
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
    /// Anthropic's `thinking` object, from a client of the Messages API: the Anthropic
    /// provider sends it as it is; never serialized, so no OpenAI-compatible upstream sees
    /// it (they get the `reasoning_effort` the dialect derives from it).
    #[serde(skip)]
    pub thinking: Option<Value>,
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
    /// Of the completion tokens, those spent reasoning (`completion_tokens_details`).
    #[serde(default)]
    pub reasoning_tokens: u32,
    /// Of the prompt tokens, those served from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: u32,
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

pub use chunk::{Chunk, ChunkEncoder};
