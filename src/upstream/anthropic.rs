//! Anthropic's Messages API, translated to the same upstream events as OpenAI's.

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::sse::{self, ClientOptions};
use super::{EventStream, Provider, UpstreamError};
use crate::chat::{ChatRequest, ChunkEncoder, FinishReason, Role, Usage};
use crate::config::Secret;

/// The API version sluice speaks; Anthropic requires it on every request.
const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; used when the client sets none.
const DEFAULT_MAX_TOKENS: u32 = 4096;

pub struct Anthropic {
    name: String,
    client: reqwest::Client,
    endpoint: String,
    api_key: Option<Secret>,
}

impl Anthropic {
    pub fn new(
        name: String,
        base_url: &str,
        api_key: Option<Secret>,
        opts: &ClientOptions,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            name,
            client: sse::client(opts)?,
            endpoint: format!("{}/messages", base_url.trim_end_matches('/')),
            api_key,
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<WireMessage>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<String>,
}

#[derive(Serialize, Debug, PartialEq)]
struct WireMessage {
    role: &'static str,
    content: String,
}

/// Anthropic takes the system prompt as a separate field and only user/assistant turns.
fn to_wire<'a>(req: &'a ChatRequest, model: &'a str) -> Body<'a> {
    let mut system = Vec::new();
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        match m.role {
            Role::System | Role::Developer => system.push(m.text()),
            Role::Assistant => messages.push(WireMessage {
                role: "assistant",
                content: m.text(),
            }),
            Role::User | Role::Tool | Role::Function => messages.push(WireMessage {
                role: "user",
                content: m.text(),
            }),
        }
    }
    Body {
        model,
        max_tokens: req.params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        stream: true,
        temperature: req.params.temperature,
        top_p: req.params.top_p,
        stop_sequences: req
            .params
            .stop
            .as_ref()
            .map(|s| s.to_vec())
            .unwrap_or_default(),
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, req: &ChatRequest, model: &str) -> Result<EventStream, UpstreamError> {
        let body = to_wire(req, model);
        let mut rb = self
            .client
            .post(&self.endpoint)
            .header("anthropic-version", API_VERSION)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(key) = &self.api_key {
            rb = rb.header("x-api-key", key.expose());
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| sse::send_error(&self.name, e))?;
        if !resp.status().is_success() {
            return Err(sse::status_error(&self.name, resp).await);
        }
        Ok(translate(
            self.name.clone(),
            ChunkEncoder::new(
                &format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
                crate::chat::chunk::unix_now(),
                model,
            ),
            sse::events(self.name.clone(), resp),
        ))
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Wire {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockDelta {
        delta: BlockDelta,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<OutputUsage>,
    },
    MessageStop,
    Error {
        error: Value,
    },
    /// ping, content_block_start, content_block_stop and event types added later.
    #[serde(other)]
    Ignored,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<InputUsage>,
}

#[derive(Deserialize)]
struct InputUsage {
    #[serde(default)]
    input_tokens: u32,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    /// Tool-input JSON and thinking deltas are not part of the relayed text.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct OutputUsage {
    #[serde(default)]
    output_tokens: u32,
}

fn finish_reason(stop_reason: &str) -> FinishReason {
    match stop_reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

/// Translates Anthropic's typed events (`message_start`, `content_block_delta`,
/// `message_delta`, `message_stop`, `error`, `ping`) into upstream events.
pub fn translate<S>(provider: String, enc: ChunkEncoder, events: S) -> EventStream
where
    S: Stream<Item = Result<eventsource_stream::Event, UpstreamError>> + Send + 'static,
{
    Box::pin(async_stream::stream! {
        futures::pin_mut!(events);
        let mut prompt_tokens = 0;
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            if ev.data.trim().is_empty() {
                continue;
            }
            let wire: Wire = match serde_json::from_str(&ev.data) {
                Ok(w) => w,
                Err(e) => {
                    yield Err(UpstreamError::Malformed {
                        provider: provider.clone(),
                        message: format!("{} event is not valid JSON: {e}", ev.event),
                    });
                    return;
                }
            };
            match wire {
                Wire::MessageStart { message } => {
                    prompt_tokens = message.usage.map(|u| u.input_tokens).unwrap_or(0);
                    yield Ok(enc.role());
                }
                Wire::ContentBlockDelta { delta: BlockDelta::TextDelta { text } } => {
                    if !text.is_empty() {
                        yield Ok(enc.content(&text));
                    }
                }
                Wire::ContentBlockDelta { delta: BlockDelta::Other } | Wire::Ignored => {}
                Wire::MessageDelta { delta, usage } => {
                    if let Some(reason) = delta.stop_reason {
                        yield Ok(enc.finish(&finish_reason(&reason)));
                    }
                    if let Some(u) = usage {
                        yield Ok(enc.usage(Usage {
                            prompt_tokens,
                            completion_tokens: u.output_tokens,
                            ..Usage::default()
                        }));
                    }
                }
                Wire::MessageStop => return,
                Wire::Error { error } => {
                    let message = error
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .unwrap_or_else(|| error.to_string());
                    let code = error.get("type").and_then(Value::as_str).map(str::to_owned);
                    yield Err(UpstreamError::InBand { provider: provider.clone(), message, code });
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{GenParams, Message};
    use bytes::Bytes;

    /// A stream recorded from the Messages API (ids shortened).
    const FIXTURE: &str = include_str!("../../tests/fixtures/anthropic_stream.txt");

    async fn run(raw: &str, piece: usize) -> Vec<Result<crate::chat::Chunk, UpstreamError>> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = raw
            .as_bytes()
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        translate(
            "a".into(),
            ChunkEncoder::new("chatcmpl-test", 0, "claude"),
            sse::decode("a".into(), futures::stream::iter(chunks)),
        )
        .collect()
        .await
    }

    #[tokio::test]
    async fn recorded_stream_translates_at_every_split() {
        let whole = run(FIXTURE, usize::MAX).await;
        let text: String = whole
            .iter()
            .filter_map(|e| e.as_ref().ok().and_then(|c| c.content()))
            .collect();
        assert_eq!(text, "Hello! How can I help you today? Ça va — 世界 🦀");
        assert!(whole.iter().any(|c| {
            c.as_ref()
                .is_ok_and(|c| c.finish() == Some(&FinishReason::Stop))
        }));
        assert!(whole.iter().any(|c| c.as_ref().is_ok_and(|c| c.usage()
            == Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 15,
                ..Usage::default()
            }))));
        for piece in [1, 2, 3, 5, 13] {
            assert_eq!(
                format!("{:?}", run(FIXTURE, piece).await),
                format!("{whole:?}"),
                "piece {piece}"
            );
        }
    }

    #[tokio::test]
    async fn error_event_is_in_band_error() {
        let raw = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        match run(raw, 9).await.as_slice() {
            [Err(UpstreamError::InBand { message, code, .. })] => {
                assert_eq!(message, "Overloaded");
                assert_eq!(code.as_deref(), Some("overloaded_error"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn system_messages_move_to_the_system_field() {
        let req = ChatRequest {
            model: "m".into(),
            messages: vec![
                Message::new(Role::System, "be brief"),
                Message::new(Role::User, "hi"),
                Message::new(Role::Assistant, "hello"),
                Message::new(Role::User, "bye"),
            ],
            params: GenParams::default(),
            extra: Default::default(),
        };
        let body = to_wire(&req, "claude");
        assert_eq!(body.system.as_deref(), Some("be brief"));
        assert_eq!(body.messages.len(), 3);
        assert_eq!(body.messages[0].role, "user");
        assert_eq!(body.max_tokens, DEFAULT_MAX_TOKENS);
    }
}
