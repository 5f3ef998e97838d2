//! Recorded provider streams the mock plays instead of its token text: tool calls,
//! reasoning, logprobs, several choices, Anthropic tool_use and thinking blocks.
//!
//! Each scenario is a fixture in `tests/fixtures/` written in its provider's wire format
//! byte for byte, played event by event; the mock changes nothing in it (ids, `created`
//! and `model` stay as recorded), so a test can compare what reaches a client with the
//! file itself.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use bytes::Bytes;
use serde_json::{Map, Value};

/// Which endpoint a request came in on, since each scenario belongs to one dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    fn endpoint(self) -> &'static str {
        match self {
            Api::OpenAi => "/v1/chat/completions (OpenAI)",
            Api::Anthropic => "/v1/messages (Anthropic)",
        }
    }
}

/// A recorded reply the mock can play (the `scenario` knob).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// OpenAI: one function call, `finish_reason: "tool_calls"`.
    ToolCall,
    /// OpenAI: two function calls in one reply.
    ParallelToolCalls,
    /// OpenAI-compatible (DeepSeek): `reasoning_content` deltas, then content, with
    /// `completion_tokens_details.reasoning_tokens` in usage.
    Reasoning,
    /// OpenAI: content with `logprobs.content[]` entries and their `top_logprobs`.
    Logprobs,
    /// OpenAI: two choices (`n: 2`), their chunks interleaved.
    N,
    /// Anthropic: a text block, then two `tool_use` blocks streamed as `input_json_delta`s.
    ToolUse,
    /// Anthropic: a `thinking` block (`thinking_delta`s, a `signature_delta`), then text.
    Thinking,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::ToolCall,
        Scenario::ParallelToolCalls,
        Scenario::Reasoning,
        Scenario::Logprobs,
        Scenario::N,
        Scenario::ToolUse,
        Scenario::Thinking,
    ];

    /// The name accepted by [`FromStr`] and the `scenario` knob.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::ToolCall => "tool_call",
            Scenario::ParallelToolCalls => "parallel_tool_calls",
            Scenario::Reasoning => "reasoning",
            Scenario::Logprobs => "logprobs",
            Scenario::N => "n",
            Scenario::ToolUse => "tool_use",
            Scenario::Thinking => "thinking",
        }
    }

    pub(crate) fn api(self) -> Api {
        match self {
            Scenario::ToolUse | Scenario::Thinking => Api::Anthropic,
            _ => Api::OpenAi,
        }
    }

    /// The scenario if it belongs to `api`, else the error a request asking for it gets.
    pub(crate) fn on(self, api: Api) -> Result<Self, String> {
        if self.api() == api {
            return Ok(self);
        }
        let here: Vec<&str> = Self::ALL
            .iter()
            .filter(|s| s.api() == api)
            .map(|s| s.as_str())
            .collect();
        Err(format!(
            "mock scenario {:?} is played by {}, not {}, which plays {}",
            self.as_str(),
            self.api().endpoint(),
            api.endpoint(),
            here.join(", ")
        ))
    }

    /// What to play for `req`: a tool scenario whose conversation ends in a tool result
    /// answers it in plain text, so a client can run a whole function-calling loop.
    pub(crate) fn fixture(self, req: &Value) -> &'static Fixture {
        let fixture = self.pick(req);
        tracing::debug!("mock: scenario {self} plays {}", fixture.file);
        fixture
    }

    fn pick(self, req: &Value) -> &'static Fixture {
        let answer = matches!(
            self,
            Scenario::ToolCall | Scenario::ParallelToolCalls | Scenario::ToolUse
        ) && ends_in_tool_result(self.api(), req);
        match (self, answer) {
            (Scenario::ToolCall, false) => &OPENAI_TOOL_CALL,
            (Scenario::ToolCall, true) => &OPENAI_TOOL_CALL_FINAL,
            (Scenario::ParallelToolCalls, false) => &OPENAI_PARALLEL_TOOL_CALLS,
            (Scenario::ParallelToolCalls, true) => &OPENAI_PARALLEL_TOOL_CALLS_FINAL,
            (Scenario::Reasoning, _) => &OPENAI_REASONING,
            (Scenario::Logprobs, _) => &OPENAI_LOGPROBS,
            (Scenario::N, _) => &OPENAI_N,
            (Scenario::ToolUse, false) => &ANTHROPIC_TOOL_USE,
            (Scenario::ToolUse, true) => &ANTHROPIC_TOOL_USE_FINAL,
            (Scenario::Thinking, _) => &ANTHROPIC_THINKING,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|sc| sc.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown mock scenario {s:?}; expected {} (OpenAI), {} (Anthropic) or none",
                    names[..5].join(", "),
                    names[5..].join(", ")
                )
            })
    }
}

/// `None` means "explicitly no scenario", so a request can opt out of a process-wide one.
pub(crate) fn parse(s: &str) -> Result<Option<Scenario>, String> {
    match s.trim() {
        "" | "none" => Ok(None),
        other => other.parse().map(Some),
    }
}

/// OpenAI: the last message is a `tool` message. Anthropic: the last user message carries a
/// `tool_result` block.
fn ends_in_tool_result(api: Api, req: &Value) -> bool {
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return false;
    };
    let role = |m: &Value| m.get("role").and_then(Value::as_str).map(str::to_owned);
    match api {
        Api::OpenAi => messages
            .last()
            .is_some_and(|m| role(m).as_deref() == Some("tool")),
        Api::Anthropic => messages
            .iter()
            .rev()
            .find(|m| role(m).as_deref() == Some("user"))
            .and_then(|m| m.get("content"))
            .and_then(Value::as_array)
            .is_some_and(|parts| {
                parts
                    .iter()
                    .any(|p| p.get("type").and_then(Value::as_str) == Some("tool_result"))
            }),
    }
}

/// A recorded stream, and for OpenAI the recorded non-streamed reply beside it
/// (`name.json`): the mock serves both as recorded rather than adding the chunks up itself.
macro_rules! fixture {
    ($name:ident, $file:literal, Api::OpenAi) => {
        static $name: LazyLock<Fixture> = LazyLock::new(|| {
            Fixture::load(
                concat!($file, ".sse"),
                include_str!(concat!("../../../tests/fixtures/", $file, ".sse")),
                Api::OpenAi,
                Some(include_str!(concat!(
                    "../../../tests/fixtures/",
                    $file,
                    ".json"
                ))),
            )
        });
    };
    ($name:ident, $file:literal, Api::Anthropic) => {
        static $name: LazyLock<Fixture> = LazyLock::new(|| {
            Fixture::load(
                concat!($file, ".sse"),
                include_str!(concat!("../../../tests/fixtures/", $file, ".sse")),
                Api::Anthropic,
                None,
            )
        });
    };
}

fixture!(OPENAI_TOOL_CALL, "openai_tool_call", Api::OpenAi);
fixture!(
    OPENAI_TOOL_CALL_FINAL,
    "openai_tool_call_final",
    Api::OpenAi
);
fixture!(
    OPENAI_PARALLEL_TOOL_CALLS,
    "openai_parallel_tool_calls",
    Api::OpenAi
);
fixture!(
    OPENAI_PARALLEL_TOOL_CALLS_FINAL,
    "openai_parallel_tool_calls_final",
    Api::OpenAi
);
fixture!(OPENAI_REASONING, "openai_reasoning", Api::OpenAi);
fixture!(OPENAI_LOGPROBS, "openai_logprobs", Api::OpenAi);
fixture!(OPENAI_N, "openai_n", Api::OpenAi);
fixture!(ANTHROPIC_TOOL_USE, "anthropic_tool_use", Api::Anthropic);
fixture!(
    ANTHROPIC_TOOL_USE_FINAL,
    "anthropic_tool_use_final",
    Api::Anthropic
);
fixture!(ANTHROPIC_THINKING, "anthropic_thinking", Api::Anthropic);

/// One recorded reply, split into its SSE events.
pub(crate) struct Fixture {
    pub(crate) file: &'static str,
    /// The file as recorded, which tests compare replies with.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) text: &'static str,
    /// Which dialect the recording speaks, which tests check its events against.
    #[cfg_attr(not(test), allow(dead_code))]
    api: Api,
    events: Vec<Recorded>,
    /// The recorded non-streamed reply (OpenAI's `chat.completion`).
    whole: Option<&'static str>,
}

/// One SSE event of a fixture, borrowed from the embedded file.
pub(crate) struct Recorded {
    pub(crate) frame: Bytes,
    /// Carries a piece of the reply, so it is paced like a token.
    pub(crate) token: bool,
    /// OpenAI's usage report (no choices), which OpenAI sends only when asked.
    usage_only: bool,
    /// The event's data (an OpenAI chunk or an Anthropic event), to build a whole reply.
    json: Option<Value>,
}

impl Fixture {
    fn load(file: &'static str, text: &'static str, api: Api, whole: Option<&'static str>) -> Self {
        let mut events = Vec::new();
        let mut start = 0;
        for (at, _) in text.match_indices("\n\n") {
            if at < start {
                continue;
            }
            let block = &text[start..at + 2];
            start = at + 2;
            events.push(Recorded::read(block, api));
        }
        if start != text.len() {
            tracing::warn!("mock fixture {file} does not end on an event boundary");
        }
        Self {
            file,
            text,
            api,
            events,
            whole,
        }
    }

    /// The events a streamed request gets, each marked whether it is a token.
    pub(crate) fn stream(&self, include_usage: bool) -> Vec<(Bytes, bool)> {
        self.events
            .iter()
            .filter(|e| include_usage || !e.usage_only)
            .map(|e| (e.frame.clone(), e.token))
            .collect()
    }

    /// Token events, to time a non-streamed reply like the streamed one.
    pub(crate) fn tokens(&self) -> usize {
        self.events.iter().filter(|e| e.token).count()
    }

    /// The non-streamed reply: OpenAI's recorded `chat.completion`, or Anthropic's
    /// `message` rebuilt from the events as the Anthropic SDKs do.
    pub(crate) fn whole(&self) -> Value {
        match self.whole {
            Some(text) => serde_json::from_str(text).unwrap_or_else(|e| {
                tracing::warn!("mock fixture {}: its recorded reply: {e}", self.file);
                Value::Null
            }),
            None => anthropic_message(self.events.iter().filter_map(|e| e.json.as_ref())),
        }
    }
}

impl Recorded {
    fn read(block: &'static str, api: Api) -> Self {
        let data = block
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .unwrap_or_default();
        // `[DONE]` and anything else that is not a JSON object is played but not read.
        let json = serde_json::from_str::<Value>(data)
            .ok()
            .filter(Value::is_object);
        let (token, usage_only) = match (&json, api) {
            (None, _) => (false, false),
            (Some(v), Api::OpenAi) => (openai_token(v), openai_usage_only(v)),
            (Some(v), Api::Anthropic) => (
                v.get("type").and_then(Value::as_str) == Some("content_block_delta"),
                false,
            ),
        };
        Recorded {
            frame: Bytes::from_static(block.as_bytes()),
            token,
            usage_only,
            json,
        }
    }
}

/// Whether a chunk carries a piece of the reply, as sluice counts tokens: some choice's
/// delta has text, reasoning, or any other non-null field but `role`.
fn openai_token(chunk: &Value) -> bool {
    let choices = chunk.get("choices").and_then(Value::as_array);
    choices.into_iter().flatten().any(|c| {
        let Some(delta) = c.get("delta").and_then(Value::as_object) else {
            return false;
        };
        delta.iter().any(|(k, v)| match (k.as_str(), v) {
            ("role", _) | (_, Value::Null) => false,
            ("content" | "reasoning_content" | "reasoning", Value::String(t)) => !t.is_empty(),
            ("content" | "reasoning_content" | "reasoning", _) => false,
            _ => true,
        })
    })
}

/// OpenAI's usage report: usage and no choices.
fn openai_usage_only(chunk: &Value) -> bool {
    let no_choices = chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty);
    no_choices && chunk.get("usage").is_some_and(|u| !u.is_null())
}

/// The Messages API `message` a streamed reply adds up to: `message_start`'s message, each
/// block from its start event and deltas (tool input parsed from its JSON fragments), and
/// `message_delta`'s stop reason and usage.
fn anthropic_message<'a>(events: impl Iterator<Item = &'a Value>) -> Value {
    let mut message = Map::new();
    let mut blocks: Vec<Map<String, Value>> = Vec::new();
    let mut partial: Vec<String> = Vec::new();
    for ev in events {
        let index = ev
            .get("index")
            .and_then(Value::as_u64)
            .and_then(|i| usize::try_from(i).ok())
            .unwrap_or(0);
        match ev.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(Value::Object(m)) = ev.get("message") {
                    message = m.clone();
                }
            }
            Some("content_block_start") => {
                if blocks.len() <= index {
                    blocks.resize_with(index + 1, Map::new);
                    partial.resize_with(index + 1, String::new);
                }
                if let Some(Value::Object(b)) = ev.get("content_block") {
                    blocks[index] = b.clone();
                }
            }
            Some("content_block_delta") => {
                let (Some(block), Some(delta)) = (blocks.get_mut(index), ev.get("delta")) else {
                    continue;
                };
                let text = |k: &str| delta.get(k).and_then(Value::as_str).unwrap_or_default();
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => append(block, "text", text("text")),
                    Some("thinking_delta") => append(block, "thinking", text("thinking")),
                    Some("signature_delta") => append(block, "signature", text("signature")),
                    Some("input_json_delta") => partial[index].push_str(text("partial_json")),
                    _ => {}
                }
            }
            Some("content_block_stop") => {
                if let (Some(block), Some(json)) = (blocks.get_mut(index), partial.get(index)) {
                    if !json.is_empty() {
                        if let Ok(input) = serde_json::from_str::<Value>(json) {
                            block.insert("input".into(), input);
                        }
                    }
                }
            }
            Some("message_delta") => {
                if let Some(Value::Object(delta)) = ev.get("delta") {
                    for (k, v) in delta {
                        message.insert(k.clone(), v.clone());
                    }
                }
                if let Some(Value::Object(usage)) = ev.get("usage") {
                    if let Some(Value::Object(have)) = message.get_mut("usage") {
                        for (k, v) in usage {
                            have.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    message.insert(
        "content".into(),
        Value::Array(blocks.into_iter().map(Value::Object).collect()),
    );
    Value::Object(message)
}

fn append(block: &mut Map<String, Value>, key: &str, more: &str) {
    match block.get_mut(key) {
        Some(Value::String(s)) => s.push_str(more),
        _ => {
            block.insert(key.into(), more.into());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    fn all() -> Vec<&'static Fixture> {
        vec![
            &OPENAI_TOOL_CALL,
            &OPENAI_TOOL_CALL_FINAL,
            &OPENAI_PARALLEL_TOOL_CALLS,
            &OPENAI_PARALLEL_TOOL_CALLS_FINAL,
            &OPENAI_REASONING,
            &OPENAI_LOGPROBS,
            &OPENAI_N,
            &ANTHROPIC_TOOL_USE,
            &ANTHROPIC_TOOL_USE_FINAL,
            &ANTHROPIC_THINKING,
        ]
    }

    #[test]
    fn fixtures_are_whole_events_that_parse() {
        for f in all() {
            let joined: String = f
                .events
                .iter()
                .map(|e| std::str::from_utf8(&e.frame).unwrap())
                .collect();
            assert_eq!(joined, f.text, "{}", f.file);
            assert!(f.tokens() > 2, "{}", f.file);
            for e in &f.events {
                let text = std::str::from_utf8(&e.frame).unwrap();
                match f.api {
                    Api::OpenAi if text == "data: [DONE]\n\n" => {}
                    Api::OpenAi => assert!(e.json.is_some(), "{}: {text}", f.file),
                    Api::Anthropic => {
                        let json = e.json.as_ref().expect(text);
                        let name = text.strip_prefix("event: ").unwrap();
                        let name = &name[..name.find('\n').unwrap()];
                        assert_eq!(json["type"], name, "{}", f.file);
                    }
                }
            }
            if f.api == Api::OpenAi {
                assert!(f.text.ends_with("data: [DONE]\n\n"), "{}", f.file);
                assert_eq!(f.whole()["object"], "chat.completion", "{}", f.file);
                assert_eq!(f.events.iter().filter(|e| e.usage_only).count(), 1);
            } else {
                assert!(
                    f.text
                        .ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
                );
            }
        }
    }

    #[test]
    fn names_round_trip_and_belong_to_one_dialect() {
        for s in Scenario::ALL {
            assert_eq!(s.as_str().parse::<Scenario>(), Ok(s));
            assert!(s.on(s.api()).is_ok());
        }
        assert_eq!(parse("none"), Ok(None));
        let err = parse("toolcall").unwrap_err();
        assert!(err.contains("\"toolcall\""), "{err}");
        let err = Scenario::ToolUse.on(Api::OpenAi).unwrap_err();
        assert!(
            err.contains("\"tool_use\"") && err.contains("tool_call"),
            "{err}"
        );
    }

    #[test]
    fn tool_results_switch_to_the_answer() {
        let openai = json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": []},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ]});
        assert_eq!(
            Scenario::ToolCall.fixture(&openai).file,
            "openai_tool_call_final.sse"
        );
        assert_eq!(
            Scenario::ParallelToolCalls.fixture(&openai).file,
            "openai_parallel_tool_calls_final.sse"
        );
        assert_eq!(
            Scenario::Reasoning.fixture(&openai).file,
            "openai_reasoning.sse"
        );
        assert_eq!(
            Scenario::ToolCall.fixture(&json!({})).file,
            "openai_tool_call.sse"
        );
        let anthropic = json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}]},
        ]});
        assert_eq!(
            Scenario::ToolUse.fixture(&anthropic).file,
            "anthropic_tool_use_final.sse"
        );
        let plain = json!({"messages": [{"role": "user", "content": "weather?"}]});
        assert_eq!(
            Scenario::ToolUse.fixture(&plain).file,
            "anthropic_tool_use.sse"
        );
    }

    #[test]
    fn whole_replies() {
        let c = OPENAI_PARALLEL_TOOL_CALLS.whole();
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        let calls = c["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[1]["function"]["arguments"],
            "{\"location\":\"Tokyo, Japan\"}"
        );
        assert!(c["usage"]["total_tokens"].is_u64());

        let m = ANTHROPIC_TOOL_USE.whole();
        assert_eq!(m["type"], "message");
        assert_eq!(m["stop_reason"], "tool_use");
        let content = m["content"].as_array().unwrap();
        assert_eq!(content.len(), 3);
        assert_eq!(content[0]["type"], "text");
        assert_eq!(content[1]["input"], json!({"location": "Paris, France"}));
        assert_eq!(content[2]["input"], json!({"location": "Tokyo, Japan"}));
        assert_eq!(m["usage"]["output_tokens"], 118);

        let m = ANTHROPIC_THINKING.whole();
        let content = m["content"].as_array().unwrap();
        assert_eq!(content[0]["type"], "thinking");
        assert!(content[0]["signature"].as_str().unwrap().len() > 100);
        assert_eq!(content[1]["text"], "17 × 23 = **391**");
    }
}
