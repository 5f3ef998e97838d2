//! Relayed chunks as Anthropic's stream events, and the message they add up to.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::request::block_type;
use crate::domain::{Chunk, FinishReason, Usage};

/// One event of Anthropic's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    MessageStart {
        id: String,
        model: String,
    },
    BlockStart {
        index: u32,
        block: Value,
    },
    TextDelta {
        index: u32,
        text: String,
    },
    ThinkingDelta {
        index: u32,
        thinking: String,
    },
    SignatureDelta {
        index: u32,
        signature: String,
    },
    InputJsonDelta {
        index: u32,
        partial_json: String,
    },
    BlockStop {
        index: u32,
    },
    MessageDelta {
        stop_reason: &'static str,
        usage: Usage,
    },
    MessageStop,
    Ping,
    Error {
        kind: &'static str,
        message: String,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::BlockStart { .. } => "content_block_start",
            Event::TextDelta { .. }
            | Event::ThinkingDelta { .. }
            | Event::SignatureDelta { .. }
            | Event::InputJsonDelta { .. } => "content_block_delta",
            Event::BlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Ping => "ping",
            Event::Error { .. } => "error",
        }
    }

    /// The event's `data` JSON, as Anthropic sends it.
    pub fn json(&self) -> Value {
        let delta = |index: &u32, delta: Value| json!({"type": "content_block_delta", "index": index, "delta": delta});
        match self {
            Event::MessageStart { id, model } => json!({
                "type": "message_start",
                "message": {
                    "id": id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": usage_json(Usage::default()),
                },
            }),
            Event::BlockStart { index, block } => {
                json!({"type": "content_block_start", "index": index, "content_block": block})
            }
            Event::TextDelta { index, text } => {
                delta(index, json!({"type": "text_delta", "text": text}))
            }
            Event::ThinkingDelta { index, thinking } => delta(
                index,
                json!({"type": "thinking_delta", "thinking": thinking}),
            ),
            Event::SignatureDelta { index, signature } => delta(
                index,
                json!({"type": "signature_delta", "signature": signature}),
            ),
            Event::InputJsonDelta {
                index,
                partial_json,
            } => delta(
                index,
                json!({"type": "input_json_delta", "partial_json": partial_json}),
            ),
            Event::BlockStop { index } => json!({"type": "content_block_stop", "index": index}),
            Event::MessageDelta { stop_reason, usage } => json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": usage_json(*usage),
            }),
            Event::MessageStop => json!({"type": "message_stop"}),
            Event::Ping => json!({"type": "ping"}),
            Event::Error { kind, message } => error_body(kind, message),
        }
    }

    /// `event: <type>\ndata: <json>\n\n`.
    pub fn sse(&self) -> Bytes {
        let name = self.name();
        let json = serde_json::to_vec(&self.json()).unwrap_or_default();
        let mut buf = Vec::with_capacity(name.len() + json.len() + 16);
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\ndata: ");
        buf.extend_from_slice(&json);
        buf.extend_from_slice(b"\n\n");
        Bytes::from(buf)
    }
}

/// Anthropic's usage: `input_tokens` leaves out what was read from the prompt cache.
fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens.saturating_sub(u.cached_tokens),
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
    })
}

/// Anthropic's error body.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

fn stop_reason(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
        FinishReason::ContentFilter => "refusal",
        FinishReason::Other(s) if s == "function_call" => "tool_use",
        FinishReason::Other(_) => "end_turn",
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Thinking,
    Tool,
}

/// Turns relayed chunks into Anthropic's content blocks: one block open at a time, opened
/// when a different kind of content arrives, numbered from 0 in the order they open.
#[derive(Debug, Default)]
pub struct Encoder {
    open: Option<(u32, Kind)>,
    next: u32,
    /// Block index of each tool call, by the call's index in the chunks.
    tools: Vec<(u64, u32)>,
    stop: Option<&'static str>,
    usage: Usage,
}

impl Encoder {
    /// The events of one chunk.
    pub fn chunk(&mut self, c: &Chunk, out: &mut Vec<Event>) {
        if let Some(r) = c.reasoning() {
            let index = self.ensure(Kind::Thinking, out);
            out.push(Event::ThinkingDelta {
                index,
                thinking: r.to_owned(),
            });
        }
        // Tool calls and signed thinking need the chunk's JSON; plain text does not.
        let payload = c.payload();
        let has = |needle: &[u8]| memchr::memmem::find(payload, needle).is_some();
        if c.is_token() && (has(b"\"tool_calls\"") || has(b"\"thinking_blocks\"")) {
            if let Ok(v) = serde_json::from_slice::<Value>(payload) {
                if let Some(delta) = first_delta(&v) {
                    self.json_delta(delta, out);
                }
            }
        }
        if let Some(t) = c.content() {
            let index = self.ensure(Kind::Text, out);
            out.push(Event::TextDelta {
                index,
                text: t.to_owned(),
            });
        }
        if let Some(f) = c.finish() {
            self.stop.get_or_insert(stop_reason(f));
        }
        if let Some(u) = c.usage() {
            self.usage = u;
        }
    }

    /// The end of the reply: the open block closed, the stop reason and usage, the stop.
    pub fn end(&mut self, out: &mut Vec<Event>) {
        self.close(out);
        out.push(Event::MessageDelta {
            stop_reason: self.stop.unwrap_or("end_turn"),
            usage: self.usage,
        });
        out.push(Event::MessageStop);
    }

    fn json_delta(&mut self, delta: &Value, out: &mut Vec<Event>) {
        if let Some(Value::Array(entries)) = delta.get("thinking_blocks") {
            for e in entries {
                self.thinking_entry(e, out);
            }
        }
        if let Some(Value::Array(calls)) = delta.get("tool_calls") {
            for call in calls {
                self.tool_call(call, out);
            }
        }
    }

    /// A whole thinking block as the Anthropic provider relays it at the block's end: its
    /// text already streamed as reasoning, so only the signature is new.
    fn thinking_entry(&mut self, e: &Value, out: &mut Vec<Event>) {
        match block_type(e) {
            "thinking" => {
                let streamed = matches!(self.open, Some((_, Kind::Thinking)));
                let index = self.ensure(Kind::Thinking, out);
                if !streamed {
                    if let Some(t) = e.get("thinking").and_then(Value::as_str) {
                        if !t.is_empty() {
                            out.push(Event::ThinkingDelta {
                                index,
                                thinking: t.to_owned(),
                            });
                        }
                    }
                }
                if let Some(s) = e.get("signature").and_then(Value::as_str) {
                    out.push(Event::SignatureDelta {
                        index,
                        signature: s.to_owned(),
                    });
                }
                self.close(out);
            }
            "redacted_thinking" => {
                self.close(out);
                let index = self.take_index();
                let data = e.get("data").and_then(Value::as_str).unwrap_or_default();
                out.push(Event::BlockStart {
                    index,
                    block: json!({"type": "redacted_thinking", "data": data}),
                });
                out.push(Event::BlockStop { index });
            }
            _ => {}
        }
    }

    fn tool_call(&mut self, call: &Value, out: &mut Vec<Event>) {
        let at = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let function = call.get("function");
        let index = match self.tools.iter().find(|(i, _)| *i == at) {
            Some(&(_, index)) => index,
            None => {
                self.close(out);
                let index = self.take_index();
                let id = call
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("toolu_{index}"), str::to_owned);
                let name = function
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                out.push(Event::BlockStart {
                    index,
                    block: json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                });
                self.open = Some((index, Kind::Tool));
                self.tools.push((at, index));
                index
            }
        };
        if let Some(args) = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        {
            out.push(Event::InputJsonDelta {
                index,
                partial_json: args.to_owned(),
            });
        }
    }

    /// The open block's index if it is of `kind`, else a new block of `kind`.
    fn ensure(&mut self, kind: Kind, out: &mut Vec<Event>) -> u32 {
        if let Some((index, k)) = self.open {
            if k == kind {
                return index;
            }
        }
        self.close(out);
        let index = self.take_index();
        let block = match kind {
            Kind::Text => json!({"type": "text", "text": ""}),
            Kind::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            Kind::Tool => json!({"type": "tool_use", "id": "", "name": "", "input": {}}),
        };
        out.push(Event::BlockStart { index, block });
        self.open = Some((index, kind));
        index
    }

    fn take_index(&mut self) -> u32 {
        let index = self.next;
        self.next = index.saturating_add(1);
        index
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((index, _)) = self.open.take() {
            out.push(Event::BlockStop { index });
        }
    }
}

/// The delta of the first choice (index 0) of a chunk's JSON.
fn first_delta(v: &Value) -> Option<&Value> {
    v.get("choices")?
        .as_array()?
        .iter()
        .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)?
        .get("delta")
}

/// A non-streamed reply: the stream's events added up, as the SDKs add them up.
#[derive(Debug, Default)]
pub struct MessageBuilder {
    id: String,
    model: String,
    content: Vec<Value>,
    /// The streamed JSON of each `tool_use` block's input, by block index.
    inputs: Vec<(u32, String)>,
    stop_reason: Option<&'static str>,
    usage: Usage,
}

impl MessageBuilder {
    pub fn apply(&mut self, ev: &Event) {
        fn block<'c>(content: &'c mut [Value], index: &u32) -> Option<&'c mut Map<String, Value>> {
            usize::try_from(*index)
                .ok()
                .and_then(|i| content.get_mut(i))
                .and_then(Value::as_object_mut)
        }
        let append = |b: Option<&mut Map<String, Value>>, field: &str, s: &str| {
            if let Some(Value::String(t)) = b.and_then(|b| b.get_mut(field)) {
                t.push_str(s);
            }
        };
        match ev {
            Event::MessageStart { id, model } => {
                self.id.clone_from(id);
                self.model.clone_from(model);
            }
            Event::BlockStart { block, .. } => self.content.push(block.clone()),
            Event::TextDelta { index, text } => {
                append(block(&mut self.content, index), "text", text);
            }
            Event::ThinkingDelta { index, thinking } => {
                append(block(&mut self.content, index), "thinking", thinking);
            }
            Event::SignatureDelta { index, signature } => {
                if let Some(b) = block(&mut self.content, index) {
                    b.insert("signature".into(), signature.as_str().into());
                }
            }
            Event::InputJsonDelta {
                index,
                partial_json,
            } => match self.inputs.iter_mut().find(|(i, _)| i == index) {
                Some((_, buf)) => buf.push_str(partial_json),
                None => self.inputs.push((*index, partial_json.clone())),
            },
            Event::MessageDelta { stop_reason, usage } => {
                self.stop_reason = Some(stop_reason);
                self.usage = *usage;
            }
            Event::BlockStop { .. } | Event::MessageStop | Event::Ping | Event::Error { .. } => {}
        }
    }

    /// The `message` object. A tool input that is not a JSON object (an upstream's broken
    /// arguments) is kept as the text it was, under `input._raw`, rather than lost.
    pub fn finish(mut self) -> Value {
        for (index, json) in std::mem::take(&mut self.inputs) {
            let input = match serde_json::from_str::<Value>(&json) {
                Ok(obj @ Value::Object(_)) => obj,
                _ => json!({ "_raw": json }),
            };
            if let Some(b) = usize::try_from(index)
                .ok()
                .and_then(|i| self.content.get_mut(i))
                .and_then(Value::as_object_mut)
            {
                b.insert("input".into(), input);
            }
        }
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.content,
            "stop_reason": self.stop_reason.unwrap_or("end_turn"),
            "stop_sequence": null,
            "usage": usage_json(self.usage),
        })
    }
}
