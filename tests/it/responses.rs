//! `POST /v1/responses` over raw HTTP in front of the mock upstream: every streamed event
//! in order and in shape, numbered from 0 without a gap; the non-streamed object; 4xx
//! answers naming the field; a client that leaves cancels the upstream call.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::Duration;

use common::env::TestEnv;
use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_mock::full_reply;

fn url(server: &TestServer) -> String {
    format!("{}/v1/responses", server.url)
}

fn request(stream: bool, mock: Value) -> Value {
    json!({"model": "mock-model", "stream": stream, "input": "hello there", "mock": mock})
}

/// Every event of a streamed response: its `event:` name and its JSON, the two checked to
/// agree and the sequence numbers checked to run 0, 1, 2… to the end.
async fn events(resp: reqwest::Response) -> Vec<(String, Value)> {
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(ev) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        let ev = ev.unwrap();
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(v["type"], ev.event.as_str(), "{v}");
        assert_eq!(v["sequence_number"], out.len(), "{v}");
        out.push((ev.event, v));
    }
    out
}

fn kinds(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(k, _)| k.as_str()).collect()
}

#[tokio::test]
async fn text_streams_event_by_event() {
    let (_mock, server) = mock_and_server().await;
    let ev = events(post(&url(&server), &request(true, json!({"tokens": 4}))).await).await;
    let mut want = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    want.extend(["response.output_text.delta"; 4]);
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(kinds(&ev), want);

    let created = &ev[0].1["response"];
    assert!(created["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(created["object"], "response");
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["model"], "mock-model");
    assert_eq!(created["output"], json!([]));
    assert_eq!(ev[1].1["response"]["id"], created["id"]);

    let item = &ev[2].1;
    assert_eq!(item["output_index"], 0);
    let id = item["item"]["id"].as_str().unwrap();
    assert!(id.starts_with("msg_"));
    assert_eq!(
        item["item"],
        json!({"id": id, "type": "message", "role": "assistant", "status": "in_progress", "content": []})
    );
    assert_eq!(
        ev[3].1["part"],
        json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
    );
    let mut text = String::new();
    for (_, d) in &ev[4..8] {
        assert_eq!(d["item_id"], id);
        assert_eq!(
            (d["output_index"].as_u64(), d["content_index"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(d["logprobs"], json!([]));
        text.push_str(d["delta"].as_str().unwrap());
    }
    assert_eq!(text, full_reply(4));
    assert_eq!(ev[8].1["text"], text.as_str());
    assert_eq!(ev[9].1["part"]["text"], text.as_str());
    let done = &ev[10].1["item"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["content"][0]["text"], text.as_str());

    let r = &ev[11].1["response"];
    assert_eq!(r["id"], created["id"]);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["output"], json!([done]));
    let usage = &r["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(usage["output_tokens"], 4);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + 4)
    );
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 0);
    server.shutdown().await;
}

#[tokio::test]
async fn parallel_tool_calls_are_function_call_items() {
    let (_mock, server) = mock_and_server().await;
    let body = json!({"model": "mock-model", "stream": true, "input": "weather in Paris and Tokyo?",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "mock": {"scenario": "parallel_tool_calls"}});
    let ev = events(post(&url(&server), &body).await).await;
    let k = kinds(&ev);
    assert_eq!(
        k[..3],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added"
        ]
    );
    assert_eq!(k.last(), Some(&"response.completed"));
    // Each call: added, its argument fragments, then (at the end) done events.
    let added: Vec<&Value> = ev
        .iter()
        .filter(|(k, _)| k == "response.output_item.added")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(added.len(), 2);
    for (i, a) in added.iter().enumerate() {
        assert_eq!(a["output_index"], i);
        let item = &a["item"];
        assert_eq!(item["type"], "function_call");
        assert_eq!(item["status"], "in_progress");
        assert_eq!(item["name"], "get_weather");
        assert_eq!(item["arguments"], "");
        assert!(item["id"].as_str().unwrap().starts_with("fc_"));
        assert!(item["call_id"].as_str().unwrap().starts_with("call_"));
        let id = &item["id"];
        let args: String = ev
            .iter()
            .filter(|(k, v)| k == "response.function_call_arguments.delta" && v["item_id"] == *id)
            .map(|(_, v)| {
                assert_eq!(v["output_index"], i);
                v["delta"].as_str().unwrap().to_owned()
            })
            .collect();
        let args_done = ev
            .iter()
            .find(|(k, v)| k == "response.function_call_arguments.done" && v["item_id"] == *id)
            .unwrap();
        assert_eq!(args_done.1["arguments"], args.as_str());
        assert!(serde_json::from_str::<Value>(&args).unwrap().is_object());
        let done = ev
            .iter()
            .position(|(k, v)| k == "response.output_item.done" && v["item"]["id"] == *id)
            .unwrap();
        assert_eq!(ev[done].1["item"]["arguments"], args.as_str());
        assert_eq!(ev[done].1["item"]["status"], "completed");
        assert!(
            ev.iter()
                .position(|(k, v)| k.ends_with("arguments.done") && v["item_id"] == *id)
                .unwrap()
                < done
        );
    }
    assert_ne!(added[0]["item"]["call_id"], added[1]["item"]["call_id"]);
    let output = &ev.last().unwrap().1["response"]["output"];
    assert_eq!(output.as_array().unwrap().len(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn reasoning_is_a_reasoning_item_before_the_message() {
    let (_mock, server) = mock_and_server().await;
    let ev = events(
        post(
            &url(&server),
            &request(true, json!({"scenario": "reasoning"})),
        )
        .await,
    )
    .await;
    let k = kinds(&ev);
    let first_text = k
        .iter()
        .position(|k| *k == "response.output_text.delta")
        .unwrap();
    assert_eq!(
        k[..5],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
        ]
    );
    assert_eq!(
        k[first_text - 5..=first_text],
        [
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
        ]
    );
    let rs = &ev[2].1["item"];
    assert_eq!(rs["type"], "reasoning");
    assert!(rs["id"].as_str().unwrap().starts_with("rs_"));
    assert_eq!(rs["summary"], json!([]));
    assert_eq!(
        ev[3].1["part"],
        json!({"type": "reasoning_text", "text": ""})
    );
    let thought: String = ev
        .iter()
        .filter(|(k, _)| k == "response.reasoning_text.delta")
        .map(|(_, v)| v["delta"].as_str().unwrap().to_owned())
        .collect();
    assert!(!thought.is_empty());
    let r = &ev.last().unwrap().1["response"];
    assert_eq!(r["status"], "completed");
    assert_eq!(r["output"][0]["type"], "reasoning");
    assert_eq!(
        r["output"][0]["content"],
        json!([{"type": "reasoning_text", "text": thought}])
    );
    assert_eq!(r["output"][1]["type"], "message");
    assert!(
        r["usage"]["output_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_non_streamed_response_is_the_object_the_stream_ends_with() {
    let (_mock, server) = mock_and_server().await;
    let resp = post(&url(&server), &request(false, json!({"tokens": 5}))).await;
    assert_eq!(resp.status(), 200);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["output"][0]["content"][0]["text"], full_reply(5));
    assert_eq!(r["usage"]["output_tokens"], 5);

    let streamed = events(post(&url(&server), &request(true, json!({"tokens": 5}))).await).await;
    let last = streamed.last().unwrap().1["response"].clone();
    // Ids and times differ between two responses; nothing else may.
    let blank = |mut v: Value| {
        for f in ["id", "created_at", "completed_at"] {
            v[f] = Value::Null;
        }
        v["output"][0]["id"] = Value::Null;
        v
    };
    assert_eq!(blank(r), blank(last));
    server.shutdown().await;
}

/// What the upstream receives: the chat translation of the request's fields.
#[tokio::test]
async fn the_upstream_gets_the_chat_translation() {
    let (mock, server) = mock_and_server().await;
    let body = json!({"model": "mock-model", "input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"}],
        "instructions": "be brief", "max_output_tokens": 50, "temperature": 0.2,
        "text": {"format": {"type": "json_object"}}, "reasoning": {"effort": "low"},
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "tool_choice": "required", "store": false, "metadata": {"a": "b"}, "include": ["x"],
        "mock": {"tokens": 2}});
    let resp = post(&url(&server), &body).await;
    assert_eq!(resp.status(), 200);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["store"], false);
    assert_eq!(r["metadata"], json!({"a": "b"}));
    assert_eq!(r["instructions"], "be brief");
    let got: Value = client()
        .get(format!("http://{}/_mock/requests/last", mock.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        got["messages"],
        json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ])
    );
    assert_eq!(got["max_tokens"], 50);
    assert_eq!(got["temperature"], 0.2);
    assert_eq!(got["response_format"], json!({"type": "json_object"}));
    assert_eq!(got["reasoning_effort"], "low");
    assert_eq!(got["tool_choice"], "required");
    assert_eq!(
        got["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    );
    for gone in [
        "input",
        "instructions",
        "store",
        "metadata",
        "include",
        "max_output_tokens",
        "text",
        "reasoning",
    ] {
        assert!(
            got.get(gone).is_none(),
            "{gone} reached the upstream: {got}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_4xx_naming_the_field() {
    let (mock, server) = mock_and_server().await;
    for (body, status, field) in [
        (
            json!({"model": "mock-model", "input": "x", "tools": [{"type": "web_search"}]}),
            422,
            "tools[0].type",
        ),
        (
            json!({"model": "mock-model", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}),
            422,
            "input[0].content[0].file_id",
        ),
        (
            json!({"model": "mock-model", "input": [{"type": "function_call_output", "output": "x"}]}),
            422,
            "input[0].call_id",
        ),
        (
            json!({"model": "mock-model", "input": "x", "tool_choice": "maybe"}),
            422,
            "tool_choice",
        ),
        (
            json!({"model": "mock-model", "input": "x", "background": true, "store": false}),
            422,
            "background",
        ),
        (
            json!({"model": "mock-model", "input": "x", "previous_response_id": "resp_1"}),
            404,
            "previous_response_id",
        ),
        (json!({"model": "mock-model", "input": 5}), 422, "input"),
        (
            json!({"model": "mock-model", "input": "x", "max_output_tokens": "many"}),
            422,
            "max_output_tokens",
        ),
        (json!({"input": "x"}), 422, "model"),
    ] {
        let resp = post(&url(&server), &body).await;
        assert_eq!(resp.status(), status, "{body}");
        let v: Value = resp.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    assert_eq!(
        mock.stats().chat_requests,
        0,
        "no bad request reached the upstream"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_call() {
    let (mock, server) = mock_and_server().await;
    let resp = post(
        &url(&server),
        &request(true, json!({"fault": "endless", "token_ms": 5})),
    )
    .await;
    let mut stream = resp.bytes_stream().eventsource();
    for _ in 0..6 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(mock.stats().active_streams, 1);
    drop(stream);
    let s = wait_stats(&mock, Duration::from_secs(1), |s| s.active_streams == 0).await;
    assert_eq!(s.aborted_streams, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn an_upstream_failure_mid_stream_ends_with_response_failed() {
    let (_mock, server) = mock_and_server().await;
    let ev = events(
        post(
            &url(&server),
            &request(true, json!({"tokens": 6, "fault": "reset_mid"})),
        )
        .await,
    )
    .await;
    let (kind, last) = ev.last().unwrap();
    assert_eq!(kind, "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["code"], "server_error");
    assert!(
        last["response"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream")
    );
    // The message item the failure cut short was closed first.
    assert_eq!(ev[ev.len() - 2].0, "response.output_item.done");
    assert_eq!(ev[ev.len() - 2].1["item"]["status"], "incomplete");
    server.shutdown().await;
}

/// A stream still running when the server stops serving ends as a response that failed,
/// its open item closed, rather than being cut mid-event.
#[tokio::test]
async fn a_stream_running_at_shutdown_ends_with_response_failed() {
    let (mock, server) = mock_and_server().await;
    let resp = post(
        &url(&server),
        &request(true, json!({"fault": "endless", "token_ms": 20})),
    )
    .await;
    let reader = tokio::spawn(events(resp));
    wait_stats(&mock, WAIT, |s| s.active_streams == 1).await;
    server.state.lifecycle.stop();
    let ev = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    let (kind, last) = ev.last().unwrap();
    assert_eq!(kind, "response.failed");
    assert_eq!(last["response"]["error"]["code"], "server_error");
    assert!(
        last["response"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down")
    );
    assert_eq!(ev[ev.len() - 2].0, "response.output_item.done");
    wait_stats(&mock, Duration::from_secs(2), |s| s.active_streams == 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn pings_keep_the_stream_alive_before_the_first_token() {
    let mock = mock(sluice_mock::MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.server.ping_interval = Duration::from_millis(50);
    let server = TestServer::start(cfg).await;
    let resp = post(
        &url(&server),
        &request(true, json!({"tokens": 2, "first_token_ms": 600})),
    )
    .await;
    let mut raw = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(WAIT, bytes.next()).await.unwrap() {
        raw.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let created = raw.find("event: response.created\n").expect("created");
    let first_ping = raw.find(": ping\n\n").expect("a ping comment");
    let first_token = raw
        .find("event: response.output_text.delta\n")
        .expect("a token");
    assert!(created < first_ping && first_ping < first_token, "{raw}");
    assert!(raw.ends_with("\n\n") && !raw.contains("[DONE]"));
    assert!(raw.contains("event: response.completed\n"));
    server.shutdown().await;
}

/// An Anthropic model's thinking, through sluice's Anthropic provider, is a `reasoning`
/// item before the message, its text streamed as `response.reasoning_text.delta`; asking
/// for `reasoning.effort` turns thinking on upstream.
#[tokio::test]
async fn anthropic_thinking_is_a_reasoning_item_before_the_message() {
    let (mock, server) = claude_server("thinking").await;
    let body = json!({"model": "claude-test", "stream": true, "input": "17 × 23?",
                      "reasoning": {"effort": "low"}});
    let ev = events(post(&url(&server), &body).await).await;
    let items: Vec<&str> = ev
        .iter()
        .filter(|(k, _)| k == "response.output_item.done")
        .map(|(_, v)| v["item"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(items, ["reasoning", "message"]);
    let thought: String = ev
        .iter()
        .filter(|(k, _)| k == "response.reasoning_text.delta")
        .map(|(_, v)| v["delta"].as_str().unwrap())
        .collect();
    assert!(!thought.is_empty());
    let done = &ev.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], thought);
    let sent = get_json(&format!("http://{}/_mock/requests/last", mock.addr)).await;
    assert_eq!(sent["thinking"]["type"], "enabled", "{sent}");
    server.shutdown().await;
}

/// The response cache serves both dialects as it serves `/v1/chat/completions`: a second
/// deterministic request (temperature 0) is answered without an upstream call, with the
/// same text, and metered as a hit.
#[tokio::test]
async fn the_reply_cache_serves_responses_and_messages() {
    let (mock, server) = mock_and_server().await;
    let responses = json!({"model": "mock-model", "input": "cache me", "temperature": 0});
    let messages = json!({"model": "mock-model", "max_tokens": 64, "temperature": 0,
                          "messages": [{"role": "user", "content": "cache me too"}]});
    let text = |route: &str, v: &Value| -> String {
        match route {
            "responses" => v["output"][0]["content"][0]["text"]
                .as_str()
                .unwrap()
                .into(),
            _ => v["content"][0]["text"].as_str().unwrap().into(),
        }
    };
    for (route, body) in [("responses", &responses), ("messages", &messages)] {
        let before = mock.stats().chat_requests;
        let mut seen = Vec::new();
        for _ in 0..2 {
            let r = client()
                .post(format!("{}/v1/{route}", server.url))
                .json(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{route}");
            seen.push(text(route, &r.json().await.unwrap()));
        }
        assert_eq!(
            mock.stats().chat_requests - before,
            1,
            "{route}: one upstream call"
        );
        assert_eq!(seen[0], seen[1], "{route}");
        assert_eq!(
            seen[0],
            full_reply(sluice_mock::MockConfig::default().tokens),
            "{route}"
        );
    }
    let metrics = metrics_text(&server.url).await;
    assert!(
        metrics.contains("sluice_cache_requests_total{result=\"hit\"} 2"),
        "{metrics}"
    );
    server.shutdown().await;
}

/// A background response streamed again from a point its replay log no longer holds gets
/// the API's `error` event (code `lagged`) instead of a stream with a hole; from a point it
/// holds, exactly the rest.
#[tokio::test]
async fn resuming_before_what_the_log_holds_is_an_error_event() {
    let e = TestEnv::builder()
        .config(|c| c.chat.replay_max_events = 16)
        .start()
        .await;
    let body = json!({"model": "mock-model", "input": "hi", "background": true,
                      "stream": true, "mock": {"tokens": 40}});
    let all = events(post(&url(&e.server), &body).await).await;
    assert_eq!(all.last().unwrap().0, "response.completed");
    let id = all[0].1["response"]["id"].as_str().unwrap().to_owned();
    let again = |after: Option<usize>| {
        let q = after.map_or(String::new(), |n| format!("&starting_after={n}"));
        client()
            .get(format!("{}/{id}?stream=true{q}", url(&e.server)))
            .send()
    };
    let resp = again(None).await.unwrap();
    let mut stream = resp.bytes_stream().eventsource();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.event, "error");
    let err: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "lagged");
    assert!(err["message"].as_str().unwrap().contains("starting_after"));
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the error"
    );

    let from = all.len() - 6;
    let resp = again(Some(from)).await.unwrap();
    let mut stream = resp.bytes_stream().eventsource();
    let mut rest = Vec::new();
    while let Some(ev) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        let ev = ev.unwrap();
        rest.push((ev.event, serde_json::from_str::<Value>(&ev.data).unwrap()));
    }
    assert_eq!(rest, all[from + 1..].to_vec());
    e.server.shutdown().await;
}
