use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::*;
use crate::domain::{ChatRequest, Chunk, ChunkEncoder, FinishReason, Stop, Usage};

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
    let ok = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]});
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
