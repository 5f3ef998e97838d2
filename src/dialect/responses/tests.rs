#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

use super::*;
use crate::domain::{ChunkEncoder, FinishReason, Usage};

fn builder(body: Value) -> ResponseBuilder {
    let req: CreateResponse = serde_json::from_value(body).unwrap();
    ResponseBuilder::new(shell(&req, "resp_1", 7))
}

/// The events' types and JSON; every event's `sequence_number` and `type` checked against
/// its place and kind.
fn parsed(events: &[ResponseEvent]) -> Vec<(&'static str, Value)> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(e.seq, i as u64);
            assert_eq!(v["sequence_number"], i as u64, "{v}");
            assert_eq!(v["type"], e.kind);
            (e.kind, v)
        })
        .collect()
}

fn kinds(events: &[(&'static str, Value)]) -> Vec<&'static str> {
    events.iter().map(|(k, _)| *k).collect()
}

#[test]
fn text_streams_as_one_message_item() {
    let mut b = builder(json!({"model": "m", "input": "hi", "metadata": {"k": "v"}}));
    let enc = ChunkEncoder::new("c", 1, "m");
    let mut out = Vec::new();
    b.begin(&mut out);
    for c in [
        enc.role(),
        enc.content("Hel"),
        enc.content("lo"),
        enc.finish(&FinishReason::Stop),
    ] {
        b.push(&c, &mut out);
    }
    b.push(
        &enc.usage(Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            reasoning_tokens: 0,
            cached_tokens: 1,
        }),
        &mut out,
    );
    assert!(!b.is_final());
    b.complete(&mut out);
    assert!(b.is_final());
    let ev = parsed(&out);
    assert_eq!(
        kinds(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(ev[0].1["response"]["status"], "in_progress");
    assert_eq!(ev[0].1["response"]["metadata"], json!({"k": "v"}));
    assert_eq!(ev[0].1["response"]["output"], json!([]));
    let id = ev[2].1["item"]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("msg_"));
    assert_eq!(ev[4].1["delta"], "Hel");
    assert_eq!(ev[4].1["item_id"], id.as_str());
    assert_eq!(ev[6].1["text"], "Hello");
    assert_eq!(ev[7].1["part"]["text"], "Hello");
    assert_eq!(
        ev[8].1["item"],
        json!({"id": id, "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]})
    );
    let r = &ev[9].1["response"];
    assert_eq!(r["status"], "completed");
    assert_eq!(r["output"][0], ev[8].1["item"]);
    assert_eq!(
        r["usage"],
        json!({"input_tokens": 3, "input_tokens_details": {"cached_tokens": 1, "cache_write_tokens": 0},
               "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5})
    );
    assert_eq!(b.response(), *r);
}

#[test]
fn reasoning_then_text_then_parallel_calls() {
    let mut b = builder(json!({"model": "m", "input": "hi"}));
    let enc = ChunkEncoder::new("c", 1, "m");
    let mut out = Vec::new();
    b.begin(&mut out);
    for c in [
        enc.reasoning("think"),
        enc.content("ok"),
        enc.tool_call(0, "call_a", "f"),
        enc.tool_arguments(0, "{\"a\":"),
        enc.tool_call(1, "call_b", "g"),
        enc.tool_arguments(1, "{}"),
        enc.tool_arguments(0, "1}"),
        enc.finish(&FinishReason::ToolCalls),
    ] {
        b.push(&c, &mut out);
    }
    b.complete(&mut out);
    let ev = parsed(&out);
    assert_eq!(
        kinds(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(ev[2].1["item"]["type"], "reasoning");
    assert_eq!(
        ev[3].1["part"],
        json!({"type": "reasoning_text", "text": ""})
    );
    assert_eq!(
        ev[7].1["item"]["content"],
        json!([{"type": "reasoning_text", "text": "think"}])
    );
    assert_eq!(ev[8].1["output_index"], 1);
    assert_eq!(ev[14].1["output_index"], 2);
    assert_eq!(ev[16].1["output_index"], 3);
    assert_eq!(ev[18].1["output_index"], 2);
    assert_eq!(ev[19].1["arguments"], "{\"a\":1}");
    let item = &ev[20].1["item"];
    assert_eq!(item["call_id"], "call_a");
    assert_eq!(item["name"], "f");
    assert_eq!(item["arguments"], "{\"a\":1}");
    assert!(item["id"].as_str().unwrap().starts_with("fc_"));
    let output = &ev[23].1["response"]["output"];
    let types: Vec<_> = output
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["reasoning", "message", "function_call", "function_call"]
    );
}

#[test]
fn a_length_finish_is_incomplete_and_a_failure_is_failed() {
    let enc = ChunkEncoder::new("c", 1, "m");
    let mut b = builder(json!({"model": "m", "input": "hi", "max_output_tokens": 1}));
    let mut out = Vec::new();
    b.begin(&mut out);
    b.push(&enc.content("a"), &mut out);
    b.push(&enc.finish(&FinishReason::Length), &mut out);
    b.complete(&mut out);
    let ev = parsed(&out);
    let (kind, last) = ev.last().unwrap();
    assert_eq!(*kind, "response.incomplete");
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(
        last["response"]["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(last["response"]["output"][0]["status"], "incomplete");

    let mut b = builder(json!({"model": "m", "input": "hi"}));
    let mut out = Vec::new();
    b.begin(&mut out);
    b.push(&enc.content("a"), &mut out);
    b.fail("server_error", "upstream went away", &mut out);
    b.complete(&mut out);
    let ev = parsed(&out);
    assert_eq!(
        kinds(&ev)[5..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.failed"
        ]
    );
    let r = &ev.last().unwrap().1["response"];
    assert_eq!(r["status"], "failed");
    assert_eq!(
        r["error"],
        json!({"code": "server_error", "message": "upstream went away"})
    );
}

#[test]
fn cancel_ends_with_status_cancelled() {
    let mut b = builder(json!({"model": "m", "input": "hi", "background": true}));
    let mut out = Vec::new();
    b.begin(&mut out);
    b.push(&ChunkEncoder::new("c", 1, "m").content("a"), &mut out);
    b.cancel(&mut out);
    let ev = parsed(&out);
    let (kind, last) = ev.last().unwrap();
    assert_eq!(*kind, "response.incomplete");
    assert_eq!(last["response"]["status"], "cancelled");
    assert!(b.is_final());
}

#[test]
fn the_shell_echoes_the_request() {
    let req: CreateResponse = serde_json::from_value(json!({"model": "m", "input": "x",
        "instructions": "i", "temperature": 0.3, "tools": [{"type": "function", "name": "f"}],
        "text": {"format": {"type": "json_object"}}, "reasoning": {"effort": "high"}, "store": false}))
    .unwrap();
    let s = shell(&req, "resp_x", 5);
    assert_eq!(s["id"], "resp_x");
    assert_eq!(s["object"], "response");
    assert_eq!(s["created_at"], 5);
    assert_eq!(s["instructions"], "i");
    assert_eq!(s["temperature"], 0.3);
    assert_eq!(s["tool_choice"], "auto");
    assert_eq!(s["parallel_tool_calls"], true);
    assert_eq!(s["tools"][0]["name"], "f");
    assert_eq!(s["text"]["format"]["type"], "json_object");
    assert_eq!(s["reasoning"]["effort"], "high");
    assert_eq!(s["store"], false);
    assert_eq!(s["output"], json!([]));
}
