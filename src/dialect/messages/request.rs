//! `/v1/messages` bodies, and their translation to a chat request.

use serde_json::{Map, Value, json};

use crate::domain::{ChatRequest, GenParams, Message, Stop};

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

pub(super) fn block_type(b: &Value) -> &str {
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
