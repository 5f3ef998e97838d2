//! Anthropic's Messages API, translated to and from OpenAI's Chat Completions format: the
//! docs/anthropic-provider.md says what maps to what.

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::sse::{self, BodyLimits, ClientOptions};
use super::{EventStream, Provider, UpstreamError};
use crate::config::Secret;
use crate::domain::{ChatRequest, Chunk, ChunkEncoder, FinishReason, Message, Role, Usage};

/// The API version sluice speaks; Anthropic requires it on every request.
const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; used when the client sets none (and, with thinking on,
/// as the room left for the answer on top of the thinking budget).
const DEFAULT_MAX_TOKENS: u32 = 4096;
/// With thinking on, Anthropic accepts `top_p` only from here to 1.
const THINKING_MIN_TOP_P: f64 = 0.95;

pub struct Anthropic {
    name: String,
    client: reqwest::Client,
    endpoint: String,
    api_key: Option<Secret>,
    limits: BodyLimits,
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
            limits: opts.limits.clone(),
        })
    }
}

#[derive(Serialize, Debug)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<WireMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Value>,
    stream: bool,
}

/// One turn: Anthropic's content blocks (`text`, `image`, `document`, `tool_use`,
/// `tool_result`, `thinking`, `redacted_thinking`).
#[derive(Serialize, Debug, PartialEq)]
struct WireMessage {
    role: &'static str,
    content: Vec<Value>,
}

/// Budgets for OpenAI's `reasoning_effort`: from Anthropic's minimum, 1024, to one that with
/// the default answer room stays under the smallest output limit of thinking models (32k).
const THINKING_BUDGETS: [(&str, u32); 5] = [
    ("minimal", 1024),
    ("low", 2048),
    ("medium", 8192),
    ("high", 16384),
    ("xhigh", 24576),
];

/// Builds the Messages API body. `Err` says, naming the field, what of the request has no
/// Anthropic form (or is malformed in a way only the translation notices).
fn to_wire<'a>(req: &'a ChatRequest, model: &'a str) -> Result<Body<'a>, String> {
    let extra = &req.extra;
    let (system, turns) = conversation(&req.messages)?;
    let tools = tools(extra)?;
    // Anthropic takes a tool choice only with tools, as OpenAI does.
    let tool_choice = if tools.is_empty() {
        None
    } else {
        tool_choice(extra)?
    };
    let forced = tool_choice
        .as_ref()
        .is_some_and(|c| matches!(block_type(c), "any" | "tool"));
    let mut messages = merge(turns);
    let thinking = match thinking(req)? {
        Thinking::Off => None,
        Thinking::Explicit(t) => Some(t),
        // Anthropic refuses thinking with a forced tool, and in a tool loop whose last
        // assistant turn carries no signed thinking: the answer goes without it then.
        Thinking::Effort(budget) => (!forced && !unthinking_tool_turn(&messages))
            .then(|| json!({"type": "enabled", "budget_tokens": budget})),
    };
    let thinking_on = thinking
        .as_ref()
        .is_some_and(|t| t.get("type").and_then(Value::as_str) != Some("disabled"));
    if !thinking_on {
        // Without thinking, Anthropic refuses thinking blocks in a final assistant turn.
        messages = without_thinking(messages);
    }
    let budget = thinking
        .as_ref()
        .filter(|_| thinking_on)
        .and_then(|t| t.get("budget_tokens"))
        .and_then(Value::as_u64)
        .and_then(|b| u32::try_from(b).ok());
    // The thinking budget counts toward `max_tokens` and must stay below it: a client limit
    // too small for the budget becomes the room left for the answer.
    let max_tokens = match (budget, max_tokens(req)?) {
        (Some(b), Some(m)) if m <= b => b.saturating_add(m),
        (Some(b), None) => b.saturating_add(DEFAULT_MAX_TOKENS),
        (_, m) => m.unwrap_or(DEFAULT_MAX_TOKENS),
    };
    // With thinking on, Anthropic refuses a changed temperature or top_k and a top_p
    // below 0.95. Its temperature ends at 1 where OpenAI's ends at 2.
    let (temperature, top_p, top_k) = if thinking_on {
        (
            None,
            req.params.top_p.map(|p| p.max(THINKING_MIN_TOP_P)),
            None,
        )
    } else {
        (
            req.params.temperature.map(|t| t.clamp(0.0, 1.0)),
            req.params.top_p,
            top_k(extra)?,
        )
    };
    Ok(Body {
        model,
        max_tokens,
        system,
        messages,
        tools,
        tool_choice,
        thinking,
        temperature,
        top_p,
        top_k,
        stop_sequences: req
            .params
            .stop
            .as_ref()
            .map(|s| s.to_vec())
            .unwrap_or_default(),
        metadata: metadata(extra),
        stream: true,
    })
}

type Blocks = Vec<Value>;
/// A message as Anthropic's role and blocks, before turns of a role are merged.
type Turn = (&'static str, Blocks);

/// The system prompt (every system and developer message, in order) and each other
/// message as a turn.
fn conversation(messages: &[Message]) -> Result<(Option<String>, Vec<Turn>), String> {
    let mut system = Vec::new();
    let mut turns = Vec::with_capacity(messages.len());
    // The last legacy `function_call` (name, id), which the next `function` message answers.
    let mut pending: Option<(String, String)> = None;
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer => {
                let text = system_text(m, i)?;
                if !text.is_empty() {
                    system.push(text);
                }
            }
            Role::User => turns.push((
                "user",
                content_blocks(m.get("content"), &format!("messages[{i}].content"))?,
            )),
            Role::Assistant => turns.push(("assistant", assistant_blocks(m, i, &mut pending)?)),
            Role::Tool => turns.push(("user", vec![tool_result(m, i)?])),
            Role::Function => turns.push(("user", vec![function_result(m, i, &mut pending)?])),
        }
    }
    Ok(((!system.is_empty()).then(|| system.join("\n\n")), turns))
}

/// Anthropic wants alternating, non-empty turns, and a turn answering `tool_use` to start
/// with the tool results.
fn merge(turns: impl IntoIterator<Item = Turn>) -> Vec<WireMessage> {
    let mut out: Vec<WireMessage> = Vec::new();
    for (role, blocks) in turns {
        if blocks.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => out.push(WireMessage {
                role,
                content: blocks,
            }),
        }
    }
    for m in out.iter_mut().filter(|m| m.role == "user") {
        m.content.sort_by_key(|b| block_type(b) != "tool_result");
    }
    out
}

fn without_thinking(messages: Vec<WireMessage>) -> Vec<WireMessage> {
    merge(messages.into_iter().map(|m| {
        (
            m.role,
            m.content.into_iter().filter(|b| !is_thinking(b)).collect(),
        )
    }))
}

/// Whether the last assistant turn calls a tool without a thinking block before it.
fn unthinking_tool_turn(messages: &[WireMessage]) -> bool {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "assistant")
        .is_some_and(|m| {
            m.content.iter().any(|b| block_type(b) == "tool_use")
                && !m.content.first().is_some_and(is_thinking)
        })
}

fn block_type(b: &Value) -> &str {
    b.get("type").and_then(Value::as_str).unwrap_or_default()
}

fn is_thinking(b: &Value) -> bool {
    matches!(block_type(b), "thinking" | "redacted_thinking")
}

fn system_text(m: &Message, i: usize) -> Result<String, String> {
    if let Some(Value::Array(parts)) = m.get("content") {
        if let Some(j) = parts.iter().position(|p| block_type(p) != "text") {
            return Err(format!(
                "messages[{i}].content[{j}]: a {} message takes text parts only",
                m.role.as_str()
            ));
        }
    }
    Ok(m.text())
}

/// A message's `content` (a string or content parts) as blocks; empty text is left out,
/// as Anthropic refuses empty text blocks.
fn content_blocks(content: Option<&Value>, at: &str) -> Result<Blocks, String> {
    match content {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(text_block(s).into_iter().collect()),
        Some(Value::Array(parts)) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                blocks.extend(part_block(part, &format!("{at}[{j}]"))?);
            }
            Ok(blocks)
        }
        Some(_) => Err(format!(
            "{at}: must be a string or an array of content parts"
        )),
    }
}

fn text_block(text: &str) -> Option<Value> {
    (!text.is_empty()).then(|| json!({"type": "text", "text": text}))
}

fn part_block(part: &Value, at: &str) -> Result<Option<Value>, String> {
    let text = |field: &str| {
        part.get(field)
            .and_then(Value::as_str)
            .map(text_block)
            .ok_or_else(|| format!("{at}.{field}: must be a string"))
    };
    match block_type(part) {
        "text" => text("text"),
        "refusal" => text("refusal"),
        "image_url" => {
            let url = match part.get("image_url") {
                Some(Value::String(url)) => Some(url.as_str()),
                Some(obj) => obj.get("url").and_then(Value::as_str),
                None => None,
            }
            .ok_or_else(|| format!("{at}.image_url.url: must be a string"))?;
            Ok(Some(
                json!({"type": "image", "source": image_source(url, at)?}),
            ))
        }
        "file" => document_block(part.get("file"), at).map(Some),
        "" => Err(format!("{at}.type: missing")),
        other => Err(format!(
            "{at}: content parts of type '{other}' have no Anthropic equivalent"
        )),
    }
}

/// A `data:` URL becomes a base64 source, an http(s) URL a URL source Anthropic fetches.
fn image_source(url: &str, at: &str) -> Result<Value, String> {
    if let Some(rest) = strip_prefix_ignore_case(url, "data:") {
        let (media_type, data) = base64_data(rest).ok_or_else(|| {
            format!("{at}.image_url.url: a data URL must be base64, data:<type>;base64,<data>")
        })?;
        return Ok(json!({"type": "base64", "media_type": media_type, "data": data}));
    }
    if strip_prefix_ignore_case(url, "https://").is_some()
        || strip_prefix_ignore_case(url, "http://").is_some()
    {
        return Ok(json!({"type": "url", "url": url}));
    }
    Err(format!(
        "{at}.image_url.url: must be an https URL or a base64 data URL"
    ))
}

/// OpenAI's `file` part with a base64 PDF as `file_data` is Anthropic's PDF document.
fn document_block(file: Option<&Value>, at: &str) -> Result<Value, String> {
    let data_url = file
        .and_then(|f| f.get("file_data"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!("{at}.file.file_data: must be a data URL (uploaded file ids are OpenAI's own)")
        })?;
    match strip_prefix_ignore_case(data_url, "data:").and_then(base64_data) {
        Some((media_type, data)) if media_type == "application/pdf" => Ok(json!({
            "type": "document",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        })),
        _ => Err(format!(
            "{at}.file.file_data: Anthropic takes files as PDFs, data:application/pdf;base64,<data>"
        )),
    }
}

/// `<type>[;param]*;base64,<data>` (after `data:`) as its lowercased media type and data.
fn base64_data(rest: &str) -> Option<(String, &str)> {
    let (head, data) = rest.split_once(',')?;
    let mut params = head.split(';');
    let media_type = params.next()?.trim();
    if media_type.is_empty() || !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return None;
    }
    Some((media_type.to_ascii_lowercase(), data))
}

fn strip_prefix_ignore_case<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let (head, rest) = (s.get(..prefix.len())?, s.get(prefix.len()..)?);
    head.eq_ignore_ascii_case(prefix).then_some(rest)
}

/// Signed thinking blocks first (as Anthropic requires), then the text, then a
/// `tool_use` block per call.
fn assistant_blocks(
    m: &Message,
    i: usize,
    pending: &mut Option<(String, String)>,
) -> Result<Blocks, String> {
    let mut blocks = thinking_blocks(m);
    blocks.extend(content_blocks(
        m.get("content"),
        &format!("messages[{i}].content"),
    )?);
    if let Some(calls) = m.get("tool_calls") {
        let calls = calls
            .as_array()
            .ok_or_else(|| format!("messages[{i}].tool_calls: must be an array"))?;
        for (k, call) in calls.iter().enumerate() {
            blocks.push(tool_use(call, &format!("messages[{i}].tool_calls[{k}]"))?);
        }
    }
    if let Some(call) = m.get("function_call") {
        let at = format!("messages[{i}].function_call");
        let name = non_empty_str(call.get("name"), &format!("{at}.name"))?;
        // A legacy call has no id; this one is unique in the conversation.
        let id = tool_id(&format!("call_{i}_{name}"));
        blocks.push(json!({
            "type": "tool_use",
            "id": id,
            "name": name,
            "input": arguments(call.get("arguments"), &format!("{at}.arguments"))?,
        }));
        *pending = Some((name.to_owned(), id));
    }
    Ok(blocks)
}

/// The `thinking_blocks` of a reply sluice translated, sent back so a tool loop keeps its
/// signed reasoning; unsigned entries would fail Anthropic's check and are left out.
fn thinking_blocks(m: &Message) -> Blocks {
    let Some(Value::Array(entries)) = m.get("thinking_blocks") else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|b| match block_type(b) {
            "thinking" => {
                let signature = b
                    .get("signature")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())?;
                let thinking = b
                    .get("thinking")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                Some(json!({"type": "thinking", "thinking": thinking, "signature": signature}))
            }
            "redacted_thinking" => {
                let data = b.get("data").and_then(Value::as_str)?;
                Some(json!({"type": "redacted_thinking", "data": data}))
            }
            _ => None,
        })
        .collect()
}

fn tool_use(call: &Value, at: &str) -> Result<Value, String> {
    match call.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "function" => {}
        Some(other) => {
            return Err(format!(
                "{at}.type: {other} calls have no Anthropic equivalent; only function calls do"
            ));
        }
    }
    let id = non_empty_str(call.get("id"), &format!("{at}.id"))?;
    let function = call
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| format!("{at}.function: must be an object"))?;
    let name = non_empty_str(function.get("name"), &format!("{at}.function.name"))?;
    Ok(json!({
        "type": "tool_use",
        "id": tool_id(id),
        "name": name,
        "input": arguments(function.get("arguments"), &format!("{at}.function.arguments"))?,
    }))
}

/// `arguments` as the object `input` must be (empty: none). Anything else is refused, not
/// replaced: the model would read a call it never made.
fn arguments(args: Option<&Value>, at: &str) -> Result<Value, String> {
    let text = match args {
        None | Some(Value::Null) => return Ok(json!({})),
        Some(obj @ Value::Object(_)) => return Ok(obj.clone()),
        Some(Value::String(s)) => s,
        Some(_) => return Err(format!("{at}: must be a string holding a JSON object")),
    };
    if text.trim().is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(obj @ Value::Object(_)) => Ok(obj),
        Ok(_) => Err(format!("{at}: must be a JSON object, not {text}")),
        Err(e) => Err(format!("{at}: not valid JSON ({e})")),
    }
}

fn tool_result(m: &Message, i: usize) -> Result<Value, String> {
    let id = non_empty_str(
        m.get("tool_call_id"),
        &format!("messages[{i}].tool_call_id"),
    )?;
    result_block(&tool_id(id), m, i)
}

fn function_result(
    m: &Message,
    i: usize,
    pending: &mut Option<(String, String)>,
) -> Result<Value, String> {
    let name = m.get("name").and_then(Value::as_str);
    match pending.take() {
        Some((called, id)) if name.is_none_or(|n| n == called) => result_block(&id, m, i),
        _ => Err(format!(
            "messages[{i}]: a function result{} must follow the assistant's function_call",
            name.map(|n| format!(" for '{n}'")).unwrap_or_default()
        )),
    }
}

fn result_block(id: &str, m: &Message, i: usize) -> Result<Value, String> {
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    let content = match m.get("content") {
        Some(Value::String(s)) if !s.is_empty() => Some(Value::String(s.clone())),
        Some(parts @ Value::Array(_)) => {
            let blocks = content_blocks(Some(parts), &format!("messages[{i}].content"))?;
            (!blocks.is_empty()).then_some(Value::Array(blocks))
        }
        _ => None,
    };
    if let (Some(content), Some(obj)) = (content, block.as_object_mut()) {
        obj.insert("content".into(), content);
    }
    Ok(block)
}

/// Anthropic takes tool ids of letters, digits, `_` and `-`; other providers' ids (say
/// `functions.get_weather:0`) are mapped the same way in the call and in its result.
fn tool_id(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn non_empty_str<'v>(v: Option<&'v Value>, at: &str) -> Result<&'v str, String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{at}: must be a non-empty string"))
}

fn present<'m>(extra: &'m Map<String, Value>, field: &str) -> Option<&'m Value> {
    extra.get(field).filter(|v| !v.is_null())
}

/// OpenAI's `tools` (or the legacy `functions`) as Anthropic tools.
fn tools(extra: &Map<String, Value>) -> Result<Vec<Value>, String> {
    if let Some(list) = present(extra, "tools") {
        let list = list.as_array().ok_or("tools: must be an array")?;
        return list
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let at = format!("tools[{k}]");
                match t.get("type").and_then(Value::as_str) {
                    Some("function") => {}
                    Some(other) => {
                        return Err(format!(
                            "{at}.type: '{other}' tools have no Anthropic equivalent; only function tools do"
                        ));
                    }
                    None => return Err(format!("{at}.type: must be \"function\"")),
                }
                let f = t
                    .get("function")
                    .filter(|f| f.is_object())
                    .ok_or_else(|| format!("{at}.function: must be an object"))?;
                function_tool(f, &format!("{at}.function"))
            })
            .collect();
    }
    match present(extra, "functions") {
        None => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(k, f)| function_tool(f, &format!("functions[{k}]")))
            .collect(),
        Some(_) => Err("functions: must be an array".into()),
    }
}

/// `{name, description, input_schema}`; a function without parameters takes an empty
/// object, as Anthropic requires a schema. `strict` has no equivalent and is left out.
fn function_tool(f: &Value, at: &str) -> Result<Value, String> {
    let name = non_empty_str(f.get("name"), &format!("{at}.name"))?;
    let mut tool = Map::new();
    tool.insert("name".into(), name.into());
    if let Some(d) = f.get("description").and_then(Value::as_str) {
        tool.insert("description".into(), d.into());
    }
    let schema = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return Err(format!("{at}.parameters: must be a JSON Schema object")),
    };
    tool.insert("input_schema".into(), schema);
    Ok(Value::Object(tool))
}

/// `tool_choice` (or the legacy `function_call`), and `parallel_tool_calls: false` as
/// `disable_parallel_tool_use`.
fn tool_choice(extra: &Map<String, Value>) -> Result<Option<Value>, String> {
    let (field, choice, expected) = match present(extra, "tool_choice") {
        Some(c) => (
            "tool_choice",
            Some(c),
            r#"auto, required, none or {"type":"function","function":{"name":…}}"#,
        ),
        None => (
            "function_call",
            present(extra, "function_call"),
            r#"auto, none or {"name":…}"#,
        ),
    };
    let mut out = match choice {
        None => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" if field == "tool_choice" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            other => return Err(format!("{field}: '{other}' is not one of {expected}")),
        }),
        Some(obj) => {
            let name = if field == "tool_choice" {
                obj.get("function").and_then(|f| f.get("name"))
            } else {
                obj.get("name")
            };
            let name = name
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| format!("{field}: must be one of {expected}"))?;
            Some(json!({"type": "tool", "name": name}))
        }
    };
    if extra.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let choice = out.get_or_insert_with(|| json!({"type": "auto"}));
        if block_type(choice) != "none" {
            if let Some(obj) = choice.as_object_mut() {
                obj.insert("disable_parallel_tool_use".into(), true.into());
            }
        }
    }
    Ok(out)
}

enum Thinking {
    Off,
    /// From `reasoning_effort`: a budget sluice chose.
    Effort(u32),
    /// Anthropic's own `thinking` object, sent as the client wrote it.
    Explicit(Value),
}

fn thinking(req: &ChatRequest) -> Result<Thinking, String> {
    let extra = &req.extra;
    // A Messages API client's own `thinking` comes in the parameters, not the extras.
    match req
        .params
        .thinking
        .as_ref()
        .or_else(|| present(extra, "thinking"))
    {
        None => {}
        Some(t @ Value::Object(_)) => return Ok(Thinking::Explicit(t.clone())),
        Some(_) => {
            return Err(
                "thinking: must be an object, e.g. {\"type\":\"enabled\",\"budget_tokens\":2048}"
                    .into(),
            );
        }
    }
    let effort = match present(extra, "reasoning_effort") {
        None => return Ok(Thinking::Off),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err("reasoning_effort: must be a string".into()),
    };
    if effort == "none" {
        return Ok(Thinking::Off);
    }
    THINKING_BUDGETS
        .iter()
        .find(|(name, _)| *name == effort)
        .map(|&(_, budget)| Thinking::Effort(budget))
        .ok_or_else(|| {
            format!(
                "reasoning_effort: '{effort}' is not one of none, minimal, low, medium, high, xhigh"
            )
        })
}

/// `max_completion_tokens` (OpenAI's newer name) wins over `max_tokens`.
fn max_tokens(req: &ChatRequest) -> Result<Option<u32>, String> {
    match present(&req.extra, "max_completion_tokens") {
        None => Ok(req.params.max_tokens),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| "max_completion_tokens: must be a positive integer".into()),
    }
}

fn top_k(extra: &Map<String, Value>) -> Result<Option<u64>, String> {
    match present(extra, "top_k") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| "top_k: must be a non-negative integer".into()),
    }
}

/// The end user, for Anthropic's abuse detection: `metadata.user_id`, else OpenAI's
/// `safety_identifier` or `user`.
fn metadata(extra: &Map<String, Value>) -> Option<Value> {
    let user = extra
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
        .or_else(|| extra.get("safety_identifier").and_then(Value::as_str))
        .or_else(|| extra.get("user").and_then(Value::as_str))
        .filter(|u| !u.is_empty())?;
    Some(json!({"user_id": user}))
}

#[async_trait]
impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, req: &ChatRequest, model: &str) -> Result<EventStream, UpstreamError> {
        let body = to_wire(req, model).map_err(|message| UpstreamError::Untranslatable {
            provider: self.name.clone(),
            message,
        })?;
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
                crate::domain::chunk::unix_now(),
                model,
            ),
            sse::events(self.name.clone(), self.limits.clone(), resp),
        ))
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Wire {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        #[serde(default)]
        index: u64,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        #[serde(default)]
        index: u64,
        delta: BlockDelta,
    },
    ContentBlockStop {
        #[serde(default)]
        index: u64,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Error {
        error: Value,
    },
    /// `ping`, and event types added later.
    #[serde(other)]
    Ignored,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
        #[serde(default)]
        signature: Option<String>,
    },
    RedactedThinking {
        #[serde(default)]
        data: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Option<Value>,
    },
    /// Server tool calls and their results, and block types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    SignatureDelta {
        signature: String,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    /// Citations, and delta types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Token counts: all of them in `message_start`, the cumulative ones in `message_delta`.
#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Deserialize)]
struct OutputDetails {
    #[serde(default)]
    thinking_tokens: Option<u32>,
}

#[derive(Default)]
struct Counts {
    seen: bool,
    input: u32,
    cache_read: u32,
    cache_creation: u32,
    output: u32,
    thinking: u32,
}

impl Counts {
    fn add(&mut self, u: WireUsage) {
        self.seen = true;
        let set = |slot: &mut u32, v: Option<u32>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut self.input, u.input_tokens);
        set(&mut self.cache_read, u.cache_read_input_tokens);
        set(&mut self.cache_creation, u.cache_creation_input_tokens);
        set(&mut self.output, u.output_tokens);
        set(
            &mut self.thinking,
            u.output_tokens_details.and_then(|d| d.thinking_tokens),
        );
    }

    /// Anthropic's `input_tokens` leaves out what was read from or written to the prompt
    /// cache; OpenAI's `prompt_tokens` counts the whole prompt, the cache reads among it.
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self
                .input
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_creation),
            completion_tokens: self.output,
            reasoning_tokens: self.thinking,
            cached_tokens: self.cache_read,
        }
    }
}

fn finish_reason(stop_reason: &str) -> FinishReason {
    match stop_reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        // A paused turn (a long server-tool run) is unfinished: sent back, it continues.
        "max_tokens" | "model_context_window_exceeded" | "pause_turn" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

/// A content block between its start and its stop.
enum Open {
    /// A `tool_use` block: the OpenAI index of its call.
    Tool(u32),
    /// `at` counts thinking blocks (of both kinds) from 0, as `thinking_blocks` indexes.
    Thinking {
        at: u32,
        text: String,
        signature: String,
    },
    Redacted {
        at: u32,
        data: String,
    },
    Other,
}

enum Flow {
    More,
    Done,
}

/// The delta of a chunk carrying one `thinking_blocks` entry.
#[derive(Serialize)]
struct ThinkingDelta<'a> {
    thinking_blocks: [ThinkingEntry<'a>; 1],
}

/// A thinking block as LiteLLM's `thinking_blocks` carry it, with the `index` OpenAI's
/// stream helpers need to merge list entries.
#[derive(Serialize)]
struct ThinkingEntry<'a> {
    index: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
}

/// The reply's state between events.
struct Translator {
    provider: String,
    enc: ChunkEncoder,
    /// Open content blocks by Anthropic's index (a handful at most).
    open: Vec<(u64, Open)>,
    tool_calls: u32,
    thoughts: u32,
    counts: Counts,
    finished: bool,
    usage_sent: bool,
}

impl Translator {
    fn new(provider: String, enc: ChunkEncoder) -> Self {
        Self {
            provider,
            enc,
            open: Vec::new(),
            tool_calls: 0,
            thoughts: 0,
            counts: Counts::default(),
            finished: false,
            usage_sent: false,
        }
    }

    fn event(
        &mut self,
        name: &str,
        data: &str,
        out: &mut Vec<Chunk>,
    ) -> Result<Flow, UpstreamError> {
        let wire: Wire = serde_json::from_str(data)
            .map_err(|e| self.malformed(format!("{name} event is not valid JSON: {e}")))?;
        match wire {
            Wire::MessageStart { message } => {
                if let Some(u) = message.usage {
                    self.counts.add(u);
                }
                out.push(self.enc.role());
            }
            Wire::ContentBlockStart {
                index,
                content_block,
            } => {
                let open = self.start(content_block, out);
                self.open.retain(|(i, _)| *i != index);
                self.open.push((index, open));
            }
            Wire::ContentBlockDelta { index, delta } => self.delta(index, delta, out)?,
            Wire::ContentBlockStop { index } => {
                if let Some(at) = self.open.iter().position(|(i, _)| *i == index) {
                    let (_, block) = self.open.swap_remove(at);
                    self.stop(block, out);
                }
            }
            Wire::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    self.counts.add(u);
                }
                if let Some(reason) = delta.stop_reason {
                    if !self.finished {
                        self.finished = true;
                        out.push(self.enc.finish(&finish_reason(&reason)));
                    }
                }
            }
            Wire::MessageStop => {
                self.end(out);
                return Ok(Flow::Done);
            }
            Wire::Error { error } => {
                let message = error
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| error.to_string());
                let code = error.get("type").and_then(Value::as_str).map(str::to_owned);
                return Err(UpstreamError::InBand {
                    provider: self.provider.clone(),
                    message,
                    code,
                });
            }
            Wire::Ignored => {}
        }
        Ok(Flow::More)
    }

    fn start(&mut self, block: StartBlock, out: &mut Vec<Chunk>) -> Open {
        match block {
            StartBlock::Text { text } => {
                if !text.is_empty() {
                    out.push(self.enc.content(&text));
                }
                Open::Other
            }
            StartBlock::Thinking {
                thinking,
                signature,
            } => {
                if !thinking.is_empty() {
                    out.push(self.enc.reasoning(&thinking));
                }
                Open::Thinking {
                    at: self.next_thought(),
                    text: thinking,
                    signature: signature.unwrap_or_default(),
                }
            }
            StartBlock::RedactedThinking { data } => Open::Redacted {
                at: self.next_thought(),
                data,
            },
            StartBlock::ToolUse { id, name, input } => {
                // OpenAI numbers a reply's calls from 0; Anthropic's index counts every block.
                let i = self.tool_calls;
                self.tool_calls = i.saturating_add(1);
                out.push(self.enc.tool_call(i, &id, &name));
                // Streamed input arrives as deltas; a whole one only from other servers.
                if let Some(input) = input.filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
                {
                    out.push(self.enc.tool_arguments(i, &input.to_string()));
                }
                Open::Tool(i)
            }
            StartBlock::Other => Open::Other,
        }
    }

    fn delta(
        &mut self,
        index: u64,
        delta: BlockDelta,
        out: &mut Vec<Chunk>,
    ) -> Result<(), UpstreamError> {
        match delta {
            BlockDelta::TextDelta { text } => {
                if !text.is_empty() {
                    out.push(self.enc.content(&text));
                }
            }
            BlockDelta::ThinkingDelta { thinking } => {
                if !thinking.is_empty() {
                    out.push(self.enc.reasoning(&thinking));
                }
                if let Some(Open::Thinking { text, .. }) = self.block(index) {
                    text.push_str(&thinking);
                }
            }
            BlockDelta::SignatureDelta { signature } => {
                if let Some(Open::Thinking { signature: s, .. }) = self.block(index) {
                    s.push_str(&signature);
                }
            }
            BlockDelta::InputJsonDelta { partial_json } => {
                let Some(&mut Open::Tool(i)) = self.block(index) else {
                    return Err(self.malformed(format!(
                        "input_json_delta for content block {index}, which is not an open tool_use block"
                    )));
                };
                if !partial_json.is_empty() {
                    out.push(self.enc.tool_arguments(i, &partial_json));
                }
            }
            BlockDelta::Other => {}
        }
        Ok(())
    }

    /// A finished thinking block goes out whole, signed, as a `thinking_blocks` entry: sent
    /// back, it lets a tool loop keep thinking on.
    fn stop(&mut self, block: Open, out: &mut Vec<Chunk>) {
        let entry = match &block {
            Open::Thinking {
                at,
                text,
                signature,
            } if !signature.is_empty() => ThinkingEntry {
                index: *at,
                kind: "thinking",
                thinking: Some(text),
                signature: Some(signature),
                data: None,
            },
            Open::Redacted { at, data } => ThinkingEntry {
                index: *at,
                kind: "redacted_thinking",
                thinking: None,
                signature: None,
                data: Some(data),
            },
            _ => return,
        };
        out.push(self.thinking_chunk(entry));
    }

    /// Usage goes last, after the finish, as OpenAI sends it; once, even if the upstream
    /// ends without `message_stop`.
    fn end(&mut self, out: &mut Vec<Chunk>) {
        if self.counts.seen && !self.usage_sent {
            self.usage_sent = true;
            out.push(self.enc.usage(self.counts.usage()));
        }
    }

    fn next_thought(&mut self) -> u32 {
        let at = self.thoughts;
        self.thoughts = at.saturating_add(1);
        at
    }

    fn block(&mut self, index: u64) -> Option<&mut Open> {
        self.open
            .iter_mut()
            .find(|(i, _)| *i == index)
            .map(|(_, b)| b)
    }

    /// A chunk carrying one `thinking_blocks` entry.
    fn thinking_chunk(&self, entry: ThinkingEntry<'_>) -> Chunk {
        self.enc.delta(&ThinkingDelta {
            thinking_blocks: [entry],
        })
    }

    fn malformed(&self, message: String) -> UpstreamError {
        UpstreamError::Malformed {
            provider: self.provider.clone(),
            message,
        }
    }
}

/// Translates Anthropic's typed events into chunks, each as soon as its event arrives.
pub fn translate<S>(provider: String, enc: ChunkEncoder, events: S) -> EventStream
where
    S: Stream<Item = Result<eventsource_stream::Event, UpstreamError>> + Send + 'static,
{
    Box::pin(async_stream::stream! {
        futures::pin_mut!(events);
        let mut reply = Translator::new(provider, enc);
        let mut out = Vec::new();
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
            let flow = reply.event(&ev.event, &ev.data, &mut out);
            for chunk in out.drain(..) {
                yield Ok(chunk);
            }
            match flow {
                Ok(Flow::More) => {}
                Ok(Flow::Done) => return,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            }
        }
        if reply.finished {
            reply.end(&mut out);
            for chunk in out.drain(..) {
                yield Ok(chunk);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::domain::GenParams;
    use crate::domain::chunk::Accumulator;
    use bytes::Bytes;

    /// A stream recorded from the Messages API (ids shortened).
    const FIXTURE: &str = include_str!("../../tests/fixtures/anthropic_stream.txt");
    /// A text block, then two `tool_use` blocks (parallel calls).
    const TOOL_USE: &str = include_str!("../../tests/fixtures/anthropic_tool_use.sse");
    /// The answer after the tool results, with part of the prompt read from the cache.
    const TOOL_USE_FINAL: &str = include_str!("../../tests/fixtures/anthropic_tool_use_final.sse");
    /// A signed thinking block, then text.
    const THINKING: &str = include_str!("../../tests/fixtures/anthropic_thinking.sse");

    async fn run(raw: &str, piece: usize) -> Vec<Result<Chunk, UpstreamError>> {
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

    async fn chunks(raw: &str) -> Vec<Chunk> {
        run(raw, 7)
            .await
            .into_iter()
            .map(|c| c.expect("no error"))
            .collect()
    }

    fn json_of(c: &Chunk) -> Value {
        serde_json::from_slice(c.payload()).unwrap()
    }

    /// What a fixture says, read straight from its `data:` lines: the reference the
    /// translation is checked against, so a re-recorded fixture needs no new numbers.
    #[derive(Default, Debug)]
    struct Said {
        text: String,
        thinking: String,
        signature: String,
        /// (id, name, input JSON) of each tool_use block, in order.
        calls: Vec<(String, String, String)>,
        /// Non-empty `input_json_delta`s.
        fragments: usize,
        /// Block types in order.
        blocks: Vec<String>,
        stop_reason: String,
        usage: Usage,
    }

    fn said(raw: &str) -> Said {
        let mut s = Said::default();
        let mut call_at: HashMap<u64, usize> = HashMap::new();
        for line in raw.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let v: Value = serde_json::from_str(data.trim()).unwrap();
            let index = v["index"].as_u64().unwrap_or(0);
            let count = |u: &Value, k: &str| u[k].as_u64().map(|n| n as u32);
            match v["type"].as_str().unwrap() {
                "message_start" => {
                    let u = &v["message"]["usage"];
                    let read = count(u, "cache_read_input_tokens").unwrap_or(0);
                    let created = count(u, "cache_creation_input_tokens").unwrap_or(0);
                    s.usage.prompt_tokens = count(u, "input_tokens").unwrap() + read + created;
                    s.usage.cached_tokens = read;
                }
                "content_block_start" => {
                    let b = &v["content_block"];
                    s.blocks.push(b["type"].as_str().unwrap().to_owned());
                    if b["type"] == "tool_use" {
                        call_at.insert(index, s.calls.len());
                        s.calls.push((
                            b["id"].as_str().unwrap().to_owned(),
                            b["name"].as_str().unwrap().to_owned(),
                            String::new(),
                        ));
                    }
                }
                "content_block_delta" => {
                    let d = &v["delta"];
                    let text = |k: &str| d[k].as_str().unwrap().to_owned();
                    match d["type"].as_str().unwrap() {
                        "text_delta" => s.text += &text("text"),
                        "thinking_delta" => s.thinking += &text("thinking"),
                        "signature_delta" => s.signature += &text("signature"),
                        "input_json_delta" => {
                            let fragment = text("partial_json");
                            s.fragments += usize::from(!fragment.is_empty());
                            s.calls[call_at[&index]].2 += &fragment;
                        }
                        _ => {}
                    }
                }
                "message_delta" => {
                    s.stop_reason = v["delta"]["stop_reason"].as_str().unwrap().to_owned();
                    s.usage.completion_tokens = count(&v["usage"], "output_tokens").unwrap();
                }
                _ => {}
            }
        }
        s
    }

    fn accumulate(chunks: &[Chunk]) -> Value {
        let mut acc = Accumulator::default();
        for c in chunks {
            acc.add(c);
        }
        acc.finish("unused", 0, "unused")
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

    /// `raw` through SSE decoding and translation, as bytes.
    async fn run_bytes(raw: &[u8], piece: usize) -> Vec<Result<Chunk, UpstreamError>> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = raw
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
    async fn event_types_and_ids_that_are_not_utf8_are_ignored_as_on_openai() {
        // The fixture with a broken `event:` on one event and a broken `id:` (which carries
        // over to every later event) on another.
        let mut raw = Vec::new();
        for (i, line) in FIXTURE.split_inclusive('\n').enumerate() {
            if i == 0 {
                raw.extend_from_slice(b"id: \xC3\x28\n");
            }
            match line.strip_prefix("event: ") {
                Some(_) if i % 3 == 0 => raw.extend_from_slice(b"event: \xFFping\n"),
                _ => raw.extend_from_slice(line.as_bytes()),
            }
        }
        let want = run(FIXTURE, usize::MAX).await;
        assert!(want.iter().all(Result::is_ok));
        for piece in [1, 7, usize::MAX] {
            assert_eq!(run_bytes(&raw, piece).await, want, "pieces of {piece}");
        }
    }

    #[tokio::test]
    async fn every_fixture_translates_the_same_at_every_split() {
        for (name, raw) in [
            ("tool_use", TOOL_USE),
            ("tool_use_final", TOOL_USE_FINAL),
            ("thinking", THINKING),
        ] {
            let whole = run(raw, usize::MAX).await;
            assert!(whole.iter().all(Result::is_ok), "{name}: {whole:?}");
            for piece in 1..=17 {
                assert_eq!(run(raw, piece).await, whole, "{name}, pieces of {piece}");
            }
        }
    }

    /// Role first, then the reply, then the finish, then usage alone: OpenAI's order.
    fn assert_openai_order(name: &str, chunks: &[Chunk]) {
        let n = chunks.len();
        assert!(n >= 4, "{name}: {chunks:?}");
        assert_eq!(
            json_of(&chunks[0])["choices"][0]["delta"]["role"],
            "assistant"
        );
        assert!(chunks[n - 2].finish().is_some(), "{name}");
        assert!(chunks[n - 1].is_usage_only(), "{name}");
        assert!(
            chunks[1..n - 2]
                .iter()
                .all(|c| c.is_token() && c.finish().is_none()),
            "{name}"
        );
    }

    #[tokio::test]
    async fn tool_use_stream_accumulates_into_valid_calls() {
        let want = said(TOOL_USE);
        assert_eq!(
            want.blocks[..3],
            ["text", "tool_use", "tool_use"],
            "the fixture: text, then two tool_use blocks"
        );
        let chunks = chunks(TOOL_USE).await;
        assert_openai_order("tool_use", &chunks);
        // The first delta of each call names it, with empty arguments; no empty fragments.
        let deltas: Vec<Value> = chunks
            .iter()
            .filter_map(|c| {
                json_of(c)["choices"][0]["delta"]["tool_calls"]
                    .get(0)
                    .cloned()
            })
            .collect();
        for (i, (id, name, _)) in want.calls.iter().enumerate() {
            let of_call: Vec<&Value> = deltas.iter().filter(|d| d["index"] == i).collect();
            assert_eq!(of_call[0]["id"], *id);
            assert_eq!(of_call[0]["type"], "function");
            assert_eq!(
                of_call[0]["function"],
                json!({"name": name, "arguments": ""})
            );
            assert!(of_call[1..].iter().all(|d| d.get("id").is_none()
                && !d["function"]["arguments"].as_str().unwrap().is_empty()));
        }
        // One argument delta per non-empty `input_json_delta`, as it arrived.
        assert_eq!(deltas.len(), want.calls.len() + want.fragments);

        let reply = accumulate(&chunks);
        let choice = &reply["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], want.text);
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), want.calls.len());
        for (call, (id, name, input)) in calls.iter().zip(&want.calls) {
            assert_eq!(call["id"], *id);
            assert_eq!(call["type"], "function");
            assert_eq!(call["function"]["name"], *name);
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(args.is_object(), "{args}");
            assert_eq!(args, serde_json::from_str::<Value>(input).unwrap());
        }
        assert_eq!(chunks.last().and_then(Chunk::usage), Some(want.usage));
    }

    #[tokio::test]
    async fn the_answer_after_tool_results_counts_the_whole_prompt() {
        let want = said(TOOL_USE_FINAL);
        let chunks = chunks(TOOL_USE_FINAL).await;
        assert_openai_order("tool_use_final", &chunks);
        let text: String = chunks.iter().filter_map(Chunk::content).collect();
        assert_eq!(text, want.text);
        assert_eq!(
            chunks[chunks.len() - 2].finish(),
            Some(&finish_reason(&want.stop_reason))
        );
        let usage = chunks.last().and_then(Chunk::usage).unwrap();
        assert_eq!(usage, want.usage);
        if usage.cached_tokens > 0 {
            let reply = accumulate(&chunks);
            assert_eq!(
                reply["usage"]["prompt_tokens_details"]["cached_tokens"],
                usage.cached_tokens
            );
        }
    }

    #[tokio::test]
    async fn thinking_streams_as_reasoning_and_its_signed_block_is_kept() {
        let want = said(THINKING);
        assert!(!want.thinking.is_empty() && !want.signature.is_empty() && !want.text.is_empty());
        let chunks = chunks(THINKING).await;
        assert_openai_order("thinking", &chunks);
        let reasoning: String = chunks.iter().filter_map(Chunk::reasoning).collect();
        let text: String = chunks.iter().filter_map(Chunk::content).collect();
        assert_eq!(reasoning, want.thinking);
        assert_eq!(text, want.text);
        let last_reasoning = chunks
            .iter()
            .rposition(|c| c.reasoning().is_some())
            .unwrap();
        let first_text = chunks.iter().position(|c| c.content().is_some()).unwrap();
        assert!(
            last_reasoning < first_text,
            "reasoning streams before the answer"
        );

        // The signed block comes once, whole, framed like every other chunk.
        let kept: Vec<&Chunk> = chunks
            .iter()
            .filter(|c| {
                json_of(c)["choices"][0]["delta"]
                    .get("thinking_blocks")
                    .is_some()
            })
            .collect();
        assert_eq!(kept.len(), 1);
        assert!(
            std::str::from_utf8(kept[0].payload())
                .unwrap()
                .starts_with(concat!(
                    r#"{"id":"chatcmpl-test","object":"chat.completion.chunk","created":0,"#,
                    r#""model":"claude","choices":[{"index":0,"delta":{"thinking_blocks":"#,
                    r#"[{"index":0,"type":"thinking","thinking":"#
                )),
            "{kept:?}"
        );

        let reply = accumulate(&chunks);
        let msg = &reply["choices"][0]["message"];
        assert_eq!(msg["reasoning_content"], want.thinking);
        assert_eq!(msg["content"], want.text);
        assert_eq!(
            msg["thinking_blocks"],
            json!([{"index": 0, "type": "thinking", "thinking": want.thinking, "signature": want.signature}])
        );

        // Sent back in a tool loop, the block comes first in the assistant turn, so thinking
        // stays on for the next answer.
        let mut assistant = msg.clone();
        assistant["tool_calls"] = json!([{"id": "toolu_1", "type": "function",
            "function": {"name": "calc", "arguments": "{\"expr\":\"27*453\"}"}}]);
        let req = request(
            json!([
                {"role": "user", "content": "27 × 453?"},
                assistant,
                {"role": "tool", "tool_call_id": "toolu_1", "content": "12231"},
            ]),
            json!({"reasoning_effort": "low", "tools": [calc_tool()]}),
        );
        let body = wire(&req);
        assert_eq!(
            body["thinking"],
            json!({"type": "enabled", "budget_tokens": 2048})
        );
        assert_eq!(
            body["messages"][1]["content"][0],
            json!({"type": "thinking", "thinking": want.thinking, "signature": want.signature})
        );
        assert_eq!(body["messages"][1]["content"][2]["type"], "tool_use");
    }

    #[tokio::test]
    async fn interleaved_thinking_numbers_calls_and_blocks_from_zero() {
        let raw = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"redacted_thinking\",\"data\":\"EmwKAhgBEgy3va3pzix\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Look it up.\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"c2ln\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_9\",\"name\":\"lookup\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"q\\\": 1}\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":40,\"output_tokens_details\":{\"thinking_tokens\":12}}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let chunks = chunks(raw).await;
        let msg = accumulate(&chunks)["choices"][0]["message"].clone();
        assert_eq!(
            msg["thinking_blocks"],
            json!([
                {"index": 0, "type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
                {"index": 1, "type": "thinking", "thinking": "Look it up.", "signature": "c2ln"},
            ])
        );
        assert_eq!(
            msg["tool_calls"],
            json!([{"id": "toolu_9", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": 1}"}}])
        );
        assert_eq!(
            chunks.last().and_then(Chunk::usage),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 40,
                reasoning_tokens: 12,
                cached_tokens: 0
            })
        );
        // Sent back, both blocks lead the assistant turn in their order.
        let req = request(
            json!([{"role": "user", "content": "q"}, msg, {"role": "tool", "tool_call_id": "toolu_9", "content": "1"}]),
            json!({"reasoning_effort": "medium"}),
        );
        let body = wire(&req);
        let types: Vec<&str> = body["messages"][1]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["redacted_thinking", "thinking", "tool_use"]);
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

    #[tokio::test]
    async fn tool_input_for_a_block_never_started_is_malformed() {
        let raw = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":3,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\"}}\n\n";
        match run(raw, 5).await.as_slice() {
            [Err(UpstreamError::Malformed { message, .. })] => {
                assert!(message.contains("content block 3"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn stop_reasons_in_openai_terms() {
        for (anthropic, openai) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("model_context_window_exceeded", "length"),
            ("pause_turn", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("something_new", "something_new"),
        ] {
            assert_eq!(finish_reason(anthropic).as_str(), openai, "{anthropic}");
        }
    }

    fn request(messages: Value, extra: Value) -> ChatRequest {
        ChatRequest {
            model: "claude".into(),
            messages: serde_json::from_value(messages).unwrap(),
            params: GenParams::default(),
            extra: serde_json::from_value(extra).unwrap(),
        }
    }

    fn wire(req: &ChatRequest) -> Value {
        serde_json::to_value(to_wire(req, "claude").unwrap()).unwrap()
    }

    fn wire_err(req: &ChatRequest) -> String {
        to_wire(req, "claude").unwrap_err()
    }

    fn calc_tool() -> Value {
        json!({"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}})
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
        let body = to_wire(&req, "claude").unwrap();
        assert_eq!(body.system.as_deref(), Some("be brief"));
        assert_eq!(body.messages.len(), 3);
        assert_eq!(body.messages[0].role, "user");
        assert_eq!(body.max_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn a_function_calling_conversation_translates_turn_by_turn() {
        let req = request(
            json!([
                {"role": "system", "content": "You are a travel assistant."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in one sentence."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather and time in Paris? My view, and a postcard:"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/postcard.jpg", "detail": "high"}},
                ]},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "call_weather", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris, France\",\"unit\":\"celsius\"}"}},
                    {"id": "call_time", "type": "function",
                     "function": {"name": "get_time", "arguments": "{\"timezone\":\"Europe/Paris\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_weather", "content": "18 °C, partly cloudy"},
                {"role": "tool", "tool_call_id": "call_time", "content": [{"type": "text", "text": "14:05"}]},
                {"role": "user", "content": "Thanks! Umbrella?"},
            ]),
            json!({"tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                    "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}}, "required": ["location"]}}},
                {"type": "function", "function": {"name": "get_time", "strict": true,
                    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}}},
            ]}),
        );
        let body = wire(&req);
        assert_eq!(
            body["system"],
            "You are a travel assistant.\n\nAnswer in one sentence."
        );
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather and time in Paris? My view, and a postcard:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/postcard.jpg"}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "call_weather", "name": "get_weather",
                     "input": {"location": "Paris, France", "unit": "celsius"}},
                    {"type": "tool_use", "id": "call_time", "name": "get_time",
                     "input": {"timezone": "Europe/Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_weather", "content": "18 °C, partly cloudy"},
                    {"type": "tool_result", "tool_use_id": "call_time", "content": [{"type": "text", "text": "14:05"}]},
                    {"type": "text", "text": "Thanks! Umbrella?"},
                ]},
            ])
        );
        assert_eq!(
            body["tools"],
            json!([
                {"name": "get_weather", "description": "Current weather",
                 "input_schema": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}}, "required": ["location"]}},
                {"name": "get_time", "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}}},
            ])
        );
        assert!(body.get("tool_choice").is_none());
        assert!(body.get("thinking").is_none());
        assert_eq!(body["stream"], true);
    }

    #[test]
    fn tool_results_lead_their_turn_and_ids_fit_anthropic() {
        let req = request(
            json!([
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "functions.lookup:0", "type": "function", "function": {"name": "lookup", "arguments": ""}},
                ]},
                {"role": "user", "content": "(a note sent before the result)"},
                {"role": "tool", "tool_call_id": "functions.lookup:0", "content": ""},
            ]),
            json!({}),
        );
        let body = wire(&req);
        assert_eq!(
            body["messages"][1]["content"],
            json!([{"type": "tool_use", "id": "functions_lookup_0", "name": "lookup", "input": {}}])
        );
        assert_eq!(
            body["messages"][2]["content"],
            json!([
                {"type": "tool_result", "tool_use_id": "functions_lookup_0"},
                {"type": "text", "text": "(a note sent before the result)"},
            ])
        );
    }

    #[test]
    fn tool_choice_and_parallel_calls_map_to_anthropic() {
        let tools = json!([calc_tool()]);
        for (choice, parallel, want) in [
            (json!("auto"), None, json!({"type": "auto"})),
            (json!("required"), None, json!({"type": "any"})),
            (json!("none"), None, json!({"type": "none"})),
            (
                json!({"type": "function", "function": {"name": "calc"}}),
                None,
                json!({"type": "tool", "name": "calc"}),
            ),
            (
                json!(null),
                Some(false),
                json!({"type": "auto", "disable_parallel_tool_use": true}),
            ),
            (
                json!("required"),
                Some(false),
                json!({"type": "any", "disable_parallel_tool_use": true}),
            ),
            (
                json!({"type": "function", "function": {"name": "calc"}}),
                Some(false),
                json!({"type": "tool", "name": "calc", "disable_parallel_tool_use": true}),
            ),
            (json!("none"), Some(false), json!({"type": "none"})),
            (json!("auto"), Some(true), json!({"type": "auto"})),
        ] {
            let mut extra = json!({"tools": tools, "tool_choice": choice});
            if let Some(p) = parallel {
                extra["parallel_tool_calls"] = json!(p);
            }
            let body = wire(&request(json!([{"role": "user", "content": "hi"}]), extra));
            assert_eq!(body["tool_choice"], want, "{choice} {parallel:?}");
        }
        // Without tools there is no choice to make.
        let body = wire(&request(
            json!([{"role": "user", "content": "hi"}]),
            json!({"tool_choice": "auto", "parallel_tool_calls": false}),
        ));
        assert!(body.get("tool_choice").is_none() && body.get("tools").is_none());
        // A function without parameters still gets the schema Anthropic requires.
        let body = wire(&request(
            json!([{"role": "user", "content": "hi"}]),
            json!({"tools": [{"type": "function", "function": {"name": "now"}}]}),
        ));
        assert_eq!(
            body["tools"],
            json!([{"name": "now", "input_schema": {"type": "object", "properties": {}}}])
        );
    }

    #[test]
    fn legacy_functions_translate_like_tools() {
        let req = request(
            json!([
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": null, "function_call": {"name": "calc", "arguments": "{\"expr\":\"2+2\"}"}},
                {"role": "function", "name": "calc", "content": "4"},
            ]),
            json!({"functions": [{"name": "calc", "parameters": {"type": "object"}}], "function_call": {"name": "calc"}}),
        );
        let body = wire(&req);
        assert_eq!(
            body["tools"],
            json!([{"name": "calc", "input_schema": {"type": "object"}}])
        );
        assert_eq!(body["tool_choice"], json!({"type": "tool", "name": "calc"}));
        assert_eq!(
            body["messages"][1]["content"],
            json!([{"type": "tool_use", "id": "call_1_calc", "name": "calc", "input": {"expr": "2+2"}}])
        );
        assert_eq!(
            body["messages"][2]["content"],
            json!([{"type": "tool_result", "tool_use_id": "call_1_calc", "content": "4"}])
        );
    }

    #[test]
    fn reasoning_effort_becomes_a_thinking_budget() {
        let hi = json!([{"role": "user", "content": "hi"}]);
        for (effort, budget) in THINKING_BUDGETS {
            let mut req = request(hi.clone(), json!({"reasoning_effort": effort}));
            req.params.temperature = Some(0.2);
            req.params.top_p = Some(0.5);
            let body = wire(&req);
            assert_eq!(
                body["thinking"],
                json!({"type": "enabled", "budget_tokens": budget})
            );
            // No client limit: the budget plus the usual room for the answer.
            assert_eq!(body["max_tokens"], budget + DEFAULT_MAX_TOKENS);
            // Anthropic refuses sampling changes with thinking on.
            assert!(body.get("temperature").is_none(), "{effort}");
            assert_eq!(body["top_p"], THINKING_MIN_TOP_P);
        }
        // A limit above the budget stands (it counts the thinking, as OpenAI's does)...
        let body = wire(&request(
            hi.clone(),
            json!({"reasoning_effort": "medium", "max_completion_tokens": 10000}),
        ));
        assert_eq!(body["max_tokens"], 10000);
        // ...one at or below it is room for the answer on top of the budget.
        let mut req = request(hi.clone(), json!({"reasoning_effort": "medium"}));
        req.params.max_tokens = Some(500);
        assert_eq!(wire(&req)["max_tokens"], 8192 + 500);
        // "none" is no thinking, and the sampling parameters go as sent (temperature capped
        // at Anthropic's 1).
        let mut req = request(hi.clone(), json!({"reasoning_effort": "none", "top_k": 40}));
        req.params.temperature = Some(1.5);
        let body = wire(&req);
        assert!(body.get("thinking").is_none());
        assert_eq!(body["temperature"], 1.0);
        assert_eq!(body["top_k"], 40);
        // A forced tool and thinking do not go together at Anthropic: the tool wins.
        let body = wire(&request(
            hi.clone(),
            json!({"reasoning_effort": "high", "tools": [calc_tool()], "tool_choice": "required"}),
        ));
        assert!(body.get("thinking").is_none());
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn a_tool_loop_without_signed_thinking_is_answered_without_thinking() {
        let req = request(
            json!([
                {"role": "user", "content": "27 × 453?"},
                {"role": "assistant", "content": "", "reasoning_content": "unsigned",
                 "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "calc", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "12231"},
            ]),
            json!({"reasoning_effort": "high", "tools": [calc_tool()]}),
        );
        let body = wire(&req);
        assert!(body.get("thinking").is_none());
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        // And with thinking off, signed blocks from earlier turns are not sent either.
        let req = request(
            json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a",
                 "thinking_blocks": [{"type": "thinking", "thinking": "t", "signature": "s"}]},
                {"role": "user", "content": "q2"},
            ]),
            json!({}),
        );
        assert_eq!(
            wire(&req)["messages"][1]["content"],
            json!([{"type": "text", "text": "a"}])
        );
    }

    #[test]
    fn an_anthropic_thinking_object_passes_through() {
        let hi = json!([{"role": "user", "content": "hi"}]);
        let mut req = request(
            hi.clone(),
            json!({"thinking": {"type": "enabled", "budget_tokens": 3000}, "reasoning_effort": "low"}),
        );
        req.params.max_tokens = Some(2000);
        req.params.temperature = Some(0.3);
        let body = wire(&req);
        assert_eq!(
            body["thinking"],
            json!({"type": "enabled", "budget_tokens": 3000})
        );
        assert_eq!(body["max_tokens"], 5000);
        assert!(body.get("temperature").is_none());
        let mut req = request(hi, json!({"thinking": {"type": "disabled"}}));
        req.params.temperature = Some(0.3);
        let body = wire(&req);
        assert_eq!(body["thinking"], json!({"type": "disabled"}));
        assert_eq!(body["temperature"], 0.3);
        // A Messages API client's `thinking` rides in the parameters, exact budget and all,
        // beside the coarser `reasoning_effort` made for OpenAI-compatible upstreams.
        let mut req = request(
            json!([{"role": "user", "content": "hi"}]),
            json!({"reasoning_effort": "medium"}),
        );
        req.params.thinking = Some(json!({"type": "enabled", "budget_tokens": 5000}));
        let body = wire(&req);
        assert_eq!(
            body["thinking"],
            json!({"type": "enabled", "budget_tokens": 5000})
        );
    }

    #[test]
    fn limits_stops_and_the_end_user() {
        let mut req = request(
            json!([{"role": "user", "content": "hi"}]),
            json!({"max_completion_tokens": 321, "user": "u-1", "seed": 7}),
        );
        req.params.max_tokens = Some(999);
        req.params.stop = Some(crate::domain::Stop::Many(vec!["END".into(), "\n\n".into()]));
        let body = wire(&req);
        assert_eq!(body["max_tokens"], 321);
        assert_eq!(body["stop_sequences"], json!(["END", "\n\n"]));
        assert_eq!(body["metadata"], json!({"user_id": "u-1"}));
        assert!(body.get("seed").is_none(), "no Anthropic equivalent");
        let req = request(
            json!([{"role": "user", "content": "hi"}]),
            json!({"metadata": {"user_id": "u-2"}, "user": "u-1"}),
        );
        assert_eq!(wire(&req)["metadata"], json!({"user_id": "u-2"}));
    }

    #[test]
    fn pdf_files_become_documents() {
        let req = request(
            json!([{"role": "user", "content": [
                {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}},
                {"type": "text", "text": "Summarise."},
            ]}]),
            json!({}),
        );
        assert_eq!(
            wire(&req)["messages"][0]["content"][0],
            json!({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}})
        );
    }

    #[test]
    fn what_cannot_be_translated_is_refused_naming_the_field() {
        let call = |args: &str| {
            json!([
                {"role": "user", "content": "go"},
                {"role": "assistant", "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "b", "type": "function", "function": {"name": "f", "arguments": args}},
                ]},
            ])
        };
        let err = wire_err(&request(call("{\"city\": \"Par"), json!({})));
        assert!(
            err.starts_with("messages[1].tool_calls[1].function.arguments: not valid JSON"),
            "{err}"
        );
        let err = wire_err(&request(call("[1, 2]"), json!({})));
        assert_eq!(
            err,
            "messages[1].tool_calls[1].function.arguments: must be a JSON object, not [1, 2]"
        );
        for (messages, extra, want) in [
            (
                json!([{"role": "tool", "content": "x"}]),
                json!({}),
                "messages[0].tool_call_id: must be a non-empty string",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]),
                json!({}),
                "messages[0].content[0].image_url.url: must be an https URL or a base64 data URL",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/svg+xml,%3Csvg%3E"}}]}]),
                json!({}),
                "messages[0].content[0].image_url.url: a data URL must be base64, data:<type>;base64,<data>",
            ),
            (
                json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]),
                json!({}),
                "messages[0].content[0]: content parts of type 'input_audio' have no Anthropic equivalent",
            ),
            (
                json!([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
                json!({}),
                "messages[0].content[0]: a system message takes text parts only",
            ),
            (
                json!([{"role": "function", "name": "f", "content": "1"}]),
                json!({}),
                "messages[0]: a function result for 'f' must follow the assistant's function_call",
            ),
            (
                json!([{"role": "user", "content": "hi"}]),
                json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
                "tools[0].type: 'custom' tools have no Anthropic equivalent; only function tools do",
            ),
            (
                json!([{"role": "user", "content": "hi"}]),
                json!({"tools": [calc_tool()], "tool_choice": "sometimes"}),
                r#"tool_choice: 'sometimes' is not one of auto, required, none or {"type":"function","function":{"name":…}}"#,
            ),
            (
                json!([{"role": "user", "content": "hi"}]),
                json!({"reasoning_effort": "max"}),
                "reasoning_effort: 'max' is not one of none, minimal, low, medium, high, xhigh",
            ),
            (
                json!([{"role": "user", "content": "hi"}]),
                json!({"max_completion_tokens": 0}),
                "max_completion_tokens: must be a positive integer",
            ),
        ] {
            assert_eq!(wire_err(&request(messages, extra)), want);
        }
    }

    #[test]
    fn an_untranslatable_request_is_a_request_error_another_provider_may_take() {
        let e = UpstreamError::Untranslatable {
            provider: "claude".into(),
            message: "messages[1].tool_calls[0].function.arguments: not valid JSON".into(),
        };
        assert_eq!(e.code(), "untranslatable_request");
        assert!(!e.is_retryable() && !e.is_provider_failure() && e.may_fall_back());
        assert_eq!(
            crate::error::ApiError::from(e).status(),
            axum::http::StatusCode::BAD_REQUEST
        );
    }
}

/// Property tests: `PROPTEST_CASES` sets how many cases each runs (256 by default).
#[cfg(test)]
mod props {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Block {
        Text(Vec<String>),
        /// Pieces of thinking, and the signature (empty: unsigned).
        Thinking(Vec<String>, String),
        /// id, name, fragments of the input JSON.
        Tool(String, String, Vec<String>),
    }

    /// What the client reads, in order, from the chunks' JSON.
    #[derive(Debug, Clone, PartialEq)]
    enum Piece {
        Text(String),
        Reasoning(String),
        Call(u64, String, String),
        Args(u64, String),
        Signed(String, String),
        Finish(String),
        Usage,
    }

    fn block() -> impl Strategy<Value = Block> {
        let texts = prop::collection::vec("(?s).{0,10}", 0..5);
        prop_oneof![
            texts.clone().prop_map(Block::Text),
            (texts.clone(), "[A-Za-z0-9]{0,6}").prop_map(|(t, s)| Block::Thinking(t, s)),
            ("toolu_[a-z0-9]{1,6}", "[a-z_]{1,8}", texts)
                .prop_map(|(i, n, f)| Block::Tool(i, n, f)),
        ]
    }

    /// The Messages API stream of `blocks`, as (event type, data) with a ping now and then.
    fn events(blocks: &[Block], pings: &[bool]) -> Vec<(String, Value)> {
        let mut ev = vec![(
            "message_start".to_owned(),
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}}),
        )];
        let ping = |ev: &mut Vec<(String, Value)>, k: usize| {
            if pings.get(k % pings.len().max(1)).copied().unwrap_or(false) {
                ev.push(("ping".into(), json!({"type": "ping"})));
            }
        };
        for (j, b) in blocks.iter().enumerate() {
            let (start, deltas): (Value, Vec<Value>) = match b {
                Block::Text(t) => (
                    json!({"type": "text", "text": ""}),
                    t.iter()
                        .map(|t| json!({"type": "text_delta", "text": t}))
                        .collect(),
                ),
                Block::Thinking(t, sig) => (
                    json!({"type": "thinking", "thinking": ""}),
                    t.iter()
                        .map(|t| json!({"type": "thinking_delta", "thinking": t}))
                        .chain(
                            (!sig.is_empty())
                                .then(|| json!({"type": "signature_delta", "signature": sig})),
                        )
                        .collect(),
                ),
                Block::Tool(id, name, f) => (
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    f.iter()
                        .map(|f| json!({"type": "input_json_delta", "partial_json": f}))
                        .collect(),
                ),
            };
            ev.push((
                "content_block_start".into(),
                json!({"type": "content_block_start", "index": j, "content_block": start}),
            ));
            for (k, d) in deltas.into_iter().enumerate() {
                ping(&mut ev, j + k);
                ev.push((
                    "content_block_delta".into(),
                    json!({"type": "content_block_delta", "index": j, "delta": d}),
                ));
            }
            ev.push((
                "content_block_stop".into(),
                json!({"type": "content_block_stop", "index": j}),
            ));
        }
        ev.push((
            "message_delta".into(),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
        ));
        ev.push(("message_stop".into(), json!({"type": "message_stop"})));
        ev
    }

    /// What the client should read of `blocks`.
    fn expected(blocks: &[Block]) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut calls = 0;
        for b in blocks {
            match b {
                Block::Text(t) => {
                    out.extend(t.iter().filter(|t| !t.is_empty()).cloned().map(Piece::Text))
                }
                Block::Thinking(t, sig) => {
                    out.extend(
                        t.iter()
                            .filter(|t| !t.is_empty())
                            .cloned()
                            .map(Piece::Reasoning),
                    );
                    if !sig.is_empty() {
                        out.push(Piece::Signed(t.concat(), sig.clone()));
                    }
                }
                Block::Tool(id, name, f) => {
                    out.push(Piece::Call(calls, id.clone(), name.clone()));
                    out.extend(
                        f.iter()
                            .filter(|f| !f.is_empty())
                            .map(|f| Piece::Args(calls, f.clone())),
                    );
                    calls += 1;
                }
            }
        }
        out.push(Piece::Finish("stop".into()));
        out.push(Piece::Usage);
        out
    }

    fn pieces_of(c: &Chunk) -> Vec<Piece> {
        let v: Value = serde_json::from_slice(c.payload()).unwrap_or_default();
        let choice = &v["choices"][0];
        let delta = &choice["delta"];
        let text = |k: &str| {
            delta[k]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
        };
        let mut out = Vec::new();
        out.extend(text("content").map(Piece::Text));
        out.extend(text("reasoning_content").map(Piece::Reasoning));
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = call["index"].as_u64().unwrap_or(u64::MAX);
            let f = &call["function"];
            match call["id"].as_str() {
                Some(id) => out.push(Piece::Call(
                    i,
                    id.into(),
                    f["name"].as_str().unwrap_or_default().into(),
                )),
                None => out.push(Piece::Args(
                    i,
                    f["arguments"].as_str().unwrap_or_default().into(),
                )),
            }
        }
        for b in delta["thinking_blocks"].as_array().into_iter().flatten() {
            let s = |k: &str| b[k].as_str().unwrap_or_default().to_owned();
            out.push(Piece::Signed(s("thinking"), s("signature")));
        }
        out.extend(
            choice["finish_reason"]
                .as_str()
                .map(|r| Piece::Finish(r.into())),
        );
        if !v["usage"].is_null() {
            out.push(Piece::Usage);
        }
        out
    }

    /// Frames events as Anthropic does (`event:` then `data:`), with the line ends and
    /// extra `id:` lines (any bytes) of `framing`.
    fn frame(events: &[(String, Value)], framing: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut raw = Vec::new();
        for (i, (name, data)) in events.iter().enumerate() {
            let (how, extra) = &framing[i % framing.len()];
            let eol: &[u8] = [&b"\n"[..], b"\r\n", b"\r"][usize::from(how % 3)];
            if how & 4 != 0 {
                raw.extend_from_slice(b"id: ");
                raw.extend_from_slice(extra);
                raw.extend_from_slice(eol);
            }
            raw.extend_from_slice(b"event: ");
            raw.extend_from_slice(if how & 8 != 0 {
                &extra[..]
            } else {
                name.as_bytes()
            });
            raw.extend_from_slice(eol);
            raw.extend_from_slice(b"data: ");
            raw.extend_from_slice(data.to_string().as_bytes());
            raw.extend_from_slice(eol);
            raw.extend_from_slice(eol);
        }
        raw
    }

    fn framing() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        let extra = prop::collection::vec(any::<u8>(), 0..6).prop_map(|b| {
            b.into_iter()
                .filter(|b| !matches!(b, b'\r' | b'\n'))
                .collect::<Vec<u8>>()
        });
        prop::collection::vec((any::<u8>(), extra), 1..8)
    }

    fn run(raw: &[u8], cuts: &[prop::sample::Index]) -> Vec<Result<Chunk, UpstreamError>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(raw.len() + 1)).collect();
        at.extend([0, raw.len()]);
        at.sort_unstable();
        let chunks: Vec<Result<Bytes, std::io::Error>> = at
            .windows(2)
            .map(|w| Ok(Bytes::copy_from_slice(&raw[w[0]..w[1]])))
            .collect();
        futures::executor::block_on(
            translate(
                "a".into(),
                ChunkEncoder::new("chatcmpl-p", 0, "claude"),
                sse::decode("a".into(), futures::stream::iter(chunks)),
            )
            .collect(),
        )
    }

    proptest! {
        #[test]
        fn text_reasoning_and_tool_calls_arrive_in_order(
            blocks in prop::collection::vec(block(), 0..6),
            pings in prop::collection::vec(any::<bool>(), 0..4),
            framing in framing(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let raw = frame(&events(&blocks, &pings), &framing);
            let out = run(&raw, &cuts);
            prop_assert!(out.iter().all(Result::is_ok), "{:?}", out);
            let got: Vec<Piece> = out.iter().flatten().flat_map(pieces_of).collect();
            prop_assert_eq!(got, expected(&blocks));
        }

        /// Cut, garbled or padded streams: never a panic, an error only last, and an event
        /// whose data is not JSON fails the stream (unless it ended before).
        #[test]
        fn a_mutated_stream_never_panics_nor_drops_bad_data_silently(
            blocks in prop::collection::vec(block(), 1..4),
            framing in framing(),
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), 0usize..4, prop::collection::vec(any::<u8>(), 0..4)),
                1..6,
            ),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut raw = frame(&events(&blocks, &[true]), &framing);
            for (at, kind, bytes) in edits {
                let i = at.index(raw.len() + 1);
                match kind {
                    0 => raw.truncate(i),
                    1 => drop(raw.splice(i..i, bytes)),
                    2 => drop(raw.drain(i..(i + bytes.len()).min(raw.len()))),
                    _ => {
                        if let Some(b) = raw.get_mut(i) {
                            *b ^= bytes.first().copied().unwrap_or(0x20) | 1;
                        }
                    }
                }
            }
            let out = run(&raw, &cuts);
            if let Some(i) = out.iter().position(Result::is_err) {
                prop_assert_eq!(i, out.len() - 1, "nothing after an error");
                let code = out[i].as_ref().err().map(UpstreamError::code);
                prop_assert!(matches!(code, Some("upstream_malformed" | "upstream_error")), "{:?}", code);
            }
            // The first event whose data is not JSON, before the stream's own end, fails it.
            let mut p = sse::SseParser::default();
            p.push(&raw);
            let mut bad = false;
            while let Some(ev) = p.next_event() {
                let Ok(data) = std::str::from_utf8(ev.data) else {
                    bad = true;
                    break;
                };
                if data.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(data) {
                    Err(_) => {
                        bad = true;
                        break;
                    }
                    Ok(v) if matches!(v["type"].as_str(), Some("message_stop" | "error")) => break,
                    Ok(_) => {}
                }
            }
            if bad {
                prop_assert!(matches!(out.last(), Some(Err(_))), "{:?}", out.last());
            }
        }
    }
}
