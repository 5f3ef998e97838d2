//! Anthropic's Messages API: requests in, events and messages out.
//!
//! A request becomes a [`ChatRequest`] in OpenAI's chat shape, which every provider kind
//! reads; the relayed [`Chunk`]s become Anthropic's stream events through one [`Encoder`],
//! and a non-streamed reply is those same events folded into a message ([`MessageBuilder`]),
//! so both forms always agree. docs/anthropic-messages.md has the mapping.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::domain::{ChatRequest, Chunk, FinishReason, GenParams, Message, Stop, Usage};

/// A `/v1/messages` body as sluice relays it.
#[derive(Debug)]
pub struct Request {
    pub chat: ChatRequest,
    pub stream: bool,
}

/// Translates a request body. `Err` names the field at fault (`messages[1].content[0].source`).
pub fn to_chat(mut body: Map<String, Value>) -> Result<Request, String> {
    let model = match body.remove("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m,
        None | Some(Value::Null) => return Err("model: required".into()),
        Some(_) => return Err("model: must be a non-empty string".into()),
    };
    let max_tokens = match body.remove("max_tokens") {
        None | Some(Value::Null) => return Err("max_tokens: required".into()),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("max_tokens: must be a positive integer")?,
    };
    let stream = match body.remove("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err("stream: must be a boolean".into()),
    };
    let mut messages = Vec::new();
    if let Some(system) = present(body.remove("system")) {
        let text = system_text(&system)?;
        if !text.is_empty() {
            messages.push(message(json!({"role": "system", "content": text}))?);
        }
    }
    let turns = match present(body.remove("messages")) {
        Some(Value::Array(turns)) if !turns.is_empty() => turns,
        Some(Value::Array(_)) => return Err("messages: must contain at least one message".into()),
        None => return Err("messages: required".into()),
        Some(_) => return Err("messages: must be an array".into()),
    };
    for (i, turn) in turns.iter().enumerate() {
        turn_messages(turn, i, &mut messages)?;
    }
    let mut params = GenParams {
        max_tokens: Some(max_tokens),
        temperature: number(body.remove("temperature"), "temperature", 1.0)?,
        top_p: number(body.remove("top_p"), "top_p", 1.0)?,
        ..Default::default()
    };
    if let Some(stops) = present(body.remove("stop_sequences")) {
        let stops = stops
            .as_array()
            .ok_or("stop_sequences: must be an array of strings")?
            .iter()
            .enumerate()
            .map(|(k, s)| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("stop_sequences[{k}]: must be a string"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !stops.is_empty() {
            params.stop = Some(Stop::Many(stops));
        }
    }
    // Fields sluice does not know stay as they are (an SDK's `extra_body`, say); the ones
    // it translates are taken out above and below.
    let mut extra = body;
    if let Some(k) = present(extra.remove("top_k")) {
        if k.as_u64().is_none() {
            return Err("top_k: must be a non-negative integer".into());
        }
        extra.insert("top_k".into(), k);
    }
    if let Some(tools) = present(extra.remove("tools")) {
        let tools = tools_of(&tools)?;
        if !tools.is_empty() {
            extra.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = present(extra.remove("tool_choice")) {
        tool_choice(&choice, &mut extra)?;
    }
    if let Some(thinking) = present(extra.remove("thinking")) {
        params.thinking = Some(thinking_of(&thinking, &mut extra)?);
    }
    if let Some(meta) = present(extra.remove("metadata")) {
        let user = meta
            .as_object()
            .ok_or("metadata: must be an object")?
            .get("user_id");
        match user {
            None | Some(Value::Null) => {}
            Some(Value::String(u)) => {
                // OpenAI's field for the end user; the Anthropic provider reads it back.
                extra.insert("user".into(), Value::String(u.clone()));
            }
            Some(_) => return Err("metadata.user_id: must be a string".into()),
        }
    }
    Ok(Request {
        chat: ChatRequest {
            model,
            messages,
            params,
            extra,
        },
        stream,
    })
}

fn present(v: Option<Value>) -> Option<Value> {
    v.filter(|v| !v.is_null())
}

fn number(v: Option<Value>, field: &str, max: f64) -> Result<Option<f64>, String> {
    match present(v) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|n| (0.0..=max).contains(n))
            .map(Some)
            .ok_or_else(|| format!("{field}: must be a number between 0 and {max}")),
    }
}

fn message(v: Value) -> Result<Message, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

fn block_type(b: &Value) -> &str {
    b.get("type").and_then(Value::as_str).unwrap_or_default()
}

/// `system`: a string, or text blocks joined.
fn system_text(system: &Value) -> Result<String, String> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = Vec::with_capacity(blocks.len());
            for (k, b) in blocks.iter().enumerate() {
                text.push(text_of(b, &format!("system[{k}]"))?);
            }
            Ok(text.join("\n\n"))
        }
        _ => Err("system: must be a string or an array of text blocks".into()),
    }
}

/// A `text` block's text.
fn text_of(b: &Value, at: &str) -> Result<String, String> {
    match block_type(b) {
        "text" => b
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("{at}.text: must be a string")),
        "" => Err(format!("{at}.type: required")),
        other => Err(format!("{at}.type: must be \"text\", not '{other}'")),
    }
}

/// One Anthropic turn as chat messages: a user turn's `tool_result` blocks become `tool`
/// messages first (Anthropic puts them first), then the rest of the turn.
fn turn_messages(turn: &Value, i: usize, out: &mut Vec<Message>) -> Result<(), String> {
    let at = format!("messages[{i}]");
    let role = match turn.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant")) => r,
        Some(other) => {
            return Err(format!(
                "{at}.role: must be \"user\" or \"assistant\", not '{other}'"
            ));
        }
        None => return Err(format!("{at}.role: required, \"user\" or \"assistant\"")),
    };
    let blocks = match turn.get("content") {
        Some(Value::String(s)) => {
            out.push(message(json!({"role": role, "content": s}))?);
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(format!(
                "{at}.content: must be a string or an array of content blocks"
            ));
        }
    };
    if role == "user" {
        user_blocks(blocks, &at, out)
    } else {
        assistant_blocks(blocks, &at, out)
    }
}

fn user_blocks(blocks: &[Value], at: &str, out: &mut Vec<Message>) -> Result<(), String> {
    let mut parts = Vec::with_capacity(blocks.len());
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        if !b.is_object() {
            return Err(format!("{at}: must be a content block object"));
        }
        match block_type(b) {
            "tool_result" => out.push(tool_result(b, &at)?),
            _ => parts.push(user_part(b, &at)?),
        }
    }
    if !parts.is_empty() {
        out.push(message(json!({"role": "user", "content": parts}))?);
    }
    Ok(())
}

/// A user content block as an OpenAI content part.
fn user_part(b: &Value, at: &str) -> Result<Value, String> {
    match block_type(b) {
        "text" => Ok(json!({"type": "text", "text": text_of(b, at)?})),
        "image" => Ok(json!({"type": "image_url", "image_url": {"url": image_url(b, at)?}})),
        "document" => document(b, at),
        "" => Err(format!("{at}.type: required")),
        other => Err(format!(
            "{at}.type: '{other}' blocks are not supported in a user turn; use text, image, document or tool_result"
        )),
    }
}

/// An image's source as a URL: base64 data becomes a `data:` URL.
fn image_url(b: &Value, at: &str) -> Result<String, String> {
    let source = b
        .get("source")
        .filter(|s| s.is_object())
        .ok_or_else(|| format!("{at}.source: must be an object"))?;
    match block_type(source) {
        "base64" => {
            let media = str_field(source, "media_type", &format!("{at}.source"))?;
            let data = str_field(source, "data", &format!("{at}.source"))?;
            Ok(format!("data:{media};base64,{data}"))
        }
        "url" => Ok(str_field(source, "url", &format!("{at}.source"))?.to_owned()),
        other => Err(format!(
            "{at}.source.type: must be \"base64\" or \"url\", not '{other}'"
        )),
    }
}

/// A base64 PDF as OpenAI's `file` part (which the Anthropic provider turns back into a
/// document block).
fn document(b: &Value, at: &str) -> Result<Value, String> {
    let source = b.get("source").filter(|s| s.is_object());
    match source.map(block_type) {
        Some("base64") => {
            let source = source.unwrap_or(&Value::Null);
            let media = str_field(source, "media_type", &format!("{at}.source"))?;
            let data = str_field(source, "data", &format!("{at}.source"))?;
            Ok(
                json!({"type": "file", "file": {"file_data": format!("data:{media};base64,{data}")}}),
            )
        }
        _ => Err(format!(
            "{at}.source: only base64 documents are supported, {{\"type\":\"base64\",\"media_type\":\"application/pdf\",\"data\":…}}"
        )),
    }
}

fn str_field<'v>(v: &'v Value, field: &str, at: &str) -> Result<&'v str, String> {
    v.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{at}.{field}: must be a non-empty string"))
}

/// A `tool_result` block as a `tool` message. Chat Completions has no error flag on a
/// tool's result, so an error says so in its text.
fn tool_result(b: &Value, at: &str) -> Result<Message, String> {
    let id = str_field(b, "tool_use_id", at)?;
    let mut text = match b.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (k, p) in parts.iter().enumerate() {
                let at = format!("{at}.content[{k}]");
                match block_type(p) {
                    "text" => texts.push(text_of(p, &at)?),
                    other => {
                        return Err(format!(
                            "{at}.type: a tool result takes text blocks only here, not '{other}'"
                        ));
                    }
                }
            }
            texts.join("\n")
        }
        Some(_) => {
            return Err(format!(
                "{at}.content: must be a string or an array of text blocks"
            ));
        }
    };
    if b.get("is_error") == Some(&Value::Bool(true)) {
        text = format!("Error: {text}");
    }
    message(json!({"role": "tool", "tool_call_id": id, "content": text}))
}

/// An assistant turn as one assistant message: text as `content`, `tool_use` blocks as
/// `tool_calls`, thinking blocks as `thinking_blocks` (what the Anthropic provider reads
/// back, signatures included, so a thinking tool loop keeps its reasoning).
fn assistant_blocks(blocks: &[Value], at: &str, out: &mut Vec<Message>) -> Result<(), String> {
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut thinking = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        match block_type(b) {
            "text" => text.push_str(&text_of(b, &at)?),
            "tool_use" => {
                let id = str_field(b, "id", &at)?;
                let name = str_field(b, "name", &at)?;
                let input = match b.get("input") {
                    None | Some(Value::Null) => json!({}),
                    Some(obj @ Value::Object(_)) => obj.clone(),
                    Some(_) => return Err(format!("{at}.input: must be an object")),
                };
                calls.push(json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": input.to_string()},
                }));
            }
            "thinking" => {
                let signature = b.get("signature").and_then(Value::as_str).unwrap_or("");
                let text = b.get("thinking").and_then(Value::as_str).unwrap_or("");
                thinking
                    .push(json!({"type": "thinking", "thinking": text, "signature": signature}));
            }
            "redacted_thinking" => {
                let data = str_field(b, "data", &at)?;
                thinking.push(json!({"type": "redacted_thinking", "data": data}));
            }
            "" => return Err(format!("{at}.type: required")),
            other => {
                return Err(format!(
                    "{at}.type: '{other}' blocks are not supported in an assistant turn; use text, tool_use, thinking or redacted_thinking"
                ));
            }
        }
    }
    let mut m = Map::new();
    m.insert("role".into(), "assistant".into());
    m.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        },
    );
    if !calls.is_empty() {
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    if !thinking.is_empty() {
        m.insert("thinking_blocks".into(), Value::Array(thinking));
    }
    out.push(message(Value::Object(m))?);
    Ok(())
}

/// `{name, description, input_schema}` as function tools.
fn tools_of(tools: &Value) -> Result<Vec<Value>, String> {
    let list = tools.as_array().ok_or("tools: must be an array")?;
    list.iter()
        .enumerate()
        .map(|(k, t)| {
            let at = format!("tools[{k}]");
            match t.get("type").and_then(Value::as_str) {
                None | Some("custom") => {}
                Some(other) => {
                    return Err(format!(
                        "{at}.type: Anthropic's server tools ('{other}') are not supported; only client tools with an input_schema are"
                    ));
                }
            }
            let name = str_field(t, "name", &at)?;
            let schema = match t.get("input_schema") {
                Some(s @ Value::Object(_)) => s.clone(),
                _ => return Err(format!("{at}.input_schema: must be a JSON Schema object")),
            };
            let mut f = Map::new();
            f.insert("name".into(), name.into());
            if let Some(d) = t.get("description").and_then(Value::as_str) {
                f.insert("description".into(), d.into());
            }
            f.insert("parameters".into(), schema);
            Ok(json!({"type": "function", "function": f}))
        })
        .collect()
}

fn tool_choice(choice: &Value, extra: &mut Map<String, Value>) -> Result<(), String> {
    let openai = match block_type(choice) {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => {
            let name = str_field(choice, "name", "tool_choice")?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(
                "tool_choice.type: must be one of auto, any, none, tool (with a name)".into(),
            );
        }
    };
    extra.insert("tool_choice".into(), openai);
    if choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
        extra.insert("parallel_tool_calls".into(), Value::Bool(false));
    }
    Ok(())
}

/// Anthropic's `thinking`, kept whole for the Anthropic provider, and as the
/// `reasoning_effort` OpenAI-compatible upstreams take: below 4096 tokens of budget `low`,
/// below 16384 `medium`, else `high`; adaptive thinking is `medium`.
fn thinking_of(thinking: &Value, extra: &mut Map<String, Value>) -> Result<Value, String> {
    let effort = match block_type(thinking) {
        "enabled" => {
            let budget = thinking
                .get("budget_tokens")
                .and_then(Value::as_u64)
                .filter(|b| *b >= 1)
                .ok_or("thinking.budget_tokens: must be a positive integer")?;
            Some(match budget {
                0..4096 => "low",
                4096..16384 => "medium",
                _ => "high",
            })
        }
        "adaptive" => Some("medium"),
        "disabled" => None,
        _ => {
            return Err(
                "thinking.type: must be one of enabled (with budget_tokens), adaptive, disabled"
                    .into(),
            );
        }
    };
    if let Some(effort) = effort {
        extra.insert("reasoning_effort".into(), effort.into());
    }
    Ok(thinking.clone())
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ChunkEncoder;

    fn body(v: Value) -> Map<String, Value> {
        let Value::Object(m) = v else {
            panic!("a body is an object")
        };
        m
    }

    fn chat(v: Value) -> ChatRequest {
        to_chat(body(v)).unwrap().chat
    }

    fn err(v: Value) -> String {
        to_chat(body(v)).unwrap_err()
    }

    fn msgs(c: &ChatRequest) -> Value {
        serde_json::to_value(&c.messages).unwrap()
    }

    #[test]
    fn a_conversation_becomes_chat_messages() {
        let c = chat(json!({
            "model": "m", "max_tokens": 100,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a cat"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": true},
                    {"type": "text", "text": "Well?"},
                ]},
            ],
        }));
        assert_eq!(
            msgs(&c),
            json!([
                {"role": "system", "content": "Be brief.\n\nBe kind."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                ]},
                {"role": "assistant", "content": "Let me look.",
                 "tool_calls": [{"id": "toolu_1", "type": "function",
                                 "function": {"name": "look", "arguments": "{\"q\":1}"}}],
                 "thinking_blocks": [{"type": "thinking", "thinking": "hmm", "signature": "sig"}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
                {"role": "user", "content": [{"type": "text", "text": "Well?"}]},
            ])
        );
        assert_eq!(c.params.max_tokens, Some(100));
    }

    #[test]
    fn options_become_chat_options_and_unknown_fields_stay() {
        let c = chat(json!({
            "model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "get_weather", "description": "Weather",
                       "input_schema": {"type": "object", "properties": {}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "thinking": {"type": "enabled", "budget_tokens": 8000},
            "metadata": {"user_id": "u-1"},
            "mock": {"scenario": "reasoning"},
        }));
        assert_eq!(c.params.stop, Some(Stop::Many(vec!["END".into()])));
        assert_eq!(c.params.temperature, Some(0.5));
        assert_eq!(c.params.top_p, Some(0.9));
        assert_eq!(
            c.params.thinking,
            Some(json!({"type": "enabled", "budget_tokens": 8000}))
        );
        assert_eq!(
            Value::Object(c.extra),
            json!({
                "tools": [{"type": "function", "function": {"name": "get_weather",
                    "description": "Weather", "parameters": {"type": "object", "properties": {}}}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": false,
                "top_k": 5,
                "reasoning_effort": "medium",
                "user": "u-1",
                "mock": {"scenario": "reasoning"},
            })
        );
        let any = chat(
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "tool_choice": {"type": "any"}}),
        );
        assert_eq!(any.extra["tool_choice"], "required");
    }

    #[test]
    fn bad_requests_name_their_field() {
        let ok =
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]});
        let with = |k: &str, v: Value| {
            let mut b = ok.clone();
            b[k] = v;
            err(b)
        };
        assert!(err(json!({"model": "m", "messages": []})).starts_with("max_tokens"));
        assert!(with("max_tokens", json!(0)).starts_with("max_tokens"));
        assert!(with("model", json!("")).starts_with("model"));
        assert!(with("messages", json!([])).starts_with("messages"));
        assert!(
            with("messages", json!([{"role": "system", "content": "x"}]))
                .starts_with("messages[0].role")
        );
        assert!(
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}])
            )
            .starts_with("messages[0].content[0].source.type")
        );
        assert!(with("temperature", json!(1.5)).starts_with("temperature"));
        assert!(with("tools", json!([{"name": "x"}])).starts_with("tools[0].input_schema"));
        assert!(with("tool_choice", json!({"type": "tool"})).starts_with("tool_choice.name"));
        assert!(with("thinking", json!({"type": "enabled"})).starts_with("thinking.budget_tokens"));
        assert!(with("stop_sequences", json!([1])).starts_with("stop_sequences[0]"));
    }

    fn events_of(chunks: &[Chunk]) -> Vec<Event> {
        let mut enc = Encoder::default();
        let mut out = vec![Event::MessageStart {
            id: "msg_1".into(),
            model: "m".into(),
        }];
        for c in chunks {
            enc.chunk(c, &mut out);
        }
        enc.end(&mut out);
        out
    }

    fn fold(events: &[Event]) -> Value {
        let mut b = MessageBuilder::default();
        for e in events {
            b.apply(e);
        }
        b.finish()
    }

    #[test]
    fn thinking_text_and_tools_become_blocks_in_order() {
        let enc = ChunkEncoder::new("c", 1, "m");
        let chunks = vec![
            enc.role(),
            enc.reasoning("Let me "),
            enc.reasoning("think."),
            enc.delta(&json!({"thinking_blocks": [{"index": 0, "type": "thinking",
                "thinking": "Let me think.", "signature": "SIG"}]})),
            enc.content("Checking."),
            enc.tool_call(0, "call_1", "get_weather"),
            enc.tool_arguments(0, "{\"city\":"),
            enc.tool_arguments(0, "\"Paris\"}"),
            enc.tool_call(1, "call_2", "get_weather"),
            enc.tool_arguments(1, "{\"city\":\"Tokyo\"}"),
            enc.finish(&FinishReason::ToolCalls),
            enc.usage(Usage {
                prompt_tokens: 20,
                completion_tokens: 7,
                reasoning_tokens: 0,
                cached_tokens: 5,
            }),
        ];
        let events = events_of(&chunks);
        let names: Vec<_> = events.iter().map(Event::name).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(
            events[4].json()["delta"],
            json!({"type": "signature_delta", "signature": "SIG"})
        );
        assert_eq!(
            fold(&events),
            json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                "content": [
                    {"type": "thinking", "thinking": "Let me think.", "signature": "SIG"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Tokyo"}},
                ],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 15, "output_tokens": 7,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5},
            })
        );
    }

    #[test]
    fn a_redacted_block_and_unsigned_reasoning_close_as_they_came() {
        let enc = ChunkEncoder::new("c", 1, "m");
        let chunks = vec![
            enc.delta(
                &json!({"thinking_blocks": [{"index": 0, "type": "redacted_thinking",
                "data": "opaque"}]}),
            ),
            enc.reasoning("hmm"),
            enc.content("Hi"),
        ];
        let m = fold(&events_of(&chunks));
        assert_eq!(
            m["content"],
            json!([
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "thinking", "thinking": "hmm", "signature": ""},
                {"type": "text", "text": "Hi"},
            ])
        );
        assert_eq!(
            m["stop_reason"], "end_turn",
            "no finish reads as the end of the turn"
        );
    }

    #[test]
    fn sse_frames_name_their_event() {
        let e = Event::TextDelta {
            index: 0,
            text: "a\nb".into(),
        };
        assert_eq!(
            e.sse(),
            Bytes::from_static(
                b"event: content_block_delta\ndata: {\"delta\":{\"text\":\"a\\nb\",\"type\":\"text_delta\"},\"index\":0,\"type\":\"content_block_delta\"}\n\n"
            )
        );
        assert_eq!(error_type(401), "authentication_error");
        assert_eq!(error_type(422), "invalid_request_error");
        assert_eq!(error_type(503), "overloaded_error");
        assert_eq!(error_type(502), "api_error");
    }
}
