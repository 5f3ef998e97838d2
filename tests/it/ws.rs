//! The WebSocket transport with a real tokio-tungstenite client against the real server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::Duration;

use common::reasoning::{EVENTS, REASONING_TOKENS, answer, reasoning_upstream, thinking};
use common::*;
use eventsource_stream::Eventsource;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice::config::{AuthMode, ProviderConfig};
use sluice_mock::{MockConfig, MockServer, full_reply};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use common::ws::{Ws, next_json, send};

struct Env {
    mock: MockServer,
    server: TestServer,
    key: String,
}

async fn env(mock_cfg: MockConfig, tweak: impl FnOnce(&mut sluice::config::Config)) -> Env {
    let mock = mock(mock_cfg).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    cfg.chat.default_model = "mock-model".into();
    tweak(&mut cfg);
    let server = TestServer::start(cfg).await;
    let key = api_key(&server, "alice", false).await;
    Env { mock, server, key }
}

/// A session's SSE stream read up to its `done`, each event as `{id, event, data}` (the
/// stream is handed back open: closing it ends the session feed).
async fn sse_until_done(sse: reqwest::Response) -> (Vec<Value>, impl futures::Stream + Unpin) {
    let mut events = Vec::new();
    let mut stream = sse.bytes_stream().eventsource();
    while let Some(ev) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        let last = ev.event == "done";
        events.push(json!({"id": ev.id, "event": ev.event, "data": data}));
        if last {
            break;
        }
    }
    (events, stream)
}

/// WebSocket events in the shape [`sse_until_done`] gives.
fn as_sse<'a>(events: impl Iterator<Item = &'a Value>) -> Vec<Value> {
    events
        .map(|v| json!({"id": v["id"], "event": v["event"], "data": v["data"]}))
        .collect()
}

impl Env {
    fn ws_url(&self) -> String {
        format!("{}/ws", self.server.url.replace("http://", "ws://"))
    }

    async fn connect_as(&self, key: &str) -> Ws {
        let mut req = self.ws_url().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        tokio_tungstenite::connect_async(req).await.unwrap().0
    }

    async fn connect(&self) -> Ws {
        self.connect_as(&self.key).await
    }

    async fn new_session(&self) -> String {
        let r = client()
            .post(format!("{}/api/sessions", self.server.url))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// Events of `topic` until a final one.
async fn events_until_final(ws: &mut Ws, topic: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let v = next_json(ws).await;
        assert_eq!(v["topic"], topic, "{v}");
        let last = matches!(v["event"].as_str(), Some("done" | "error" | "interrupted"));
        out.push(v);
        if last {
            return out;
        }
    }
}

fn text(events: &[Value]) -> String {
    joined(events, "token")
}

/// The `text` of every `kind` event, in order.
fn joined(events: &[Value], kind: &str) -> String {
    events
        .iter()
        .filter(|e| e["event"] == kind)
        .map(|e| e["data"]["text"].as_str().unwrap())
        .collect()
}

/// A server whose only upstream is a reasoning model.
async fn reasoning_env() -> Env {
    let upstream = reasoning_upstream(Duration::ZERO).await;
    env(MockConfig::default(), |c| {
        c.upstream.providers = vec![ProviderConfig::openai("reasoner", &upstream, None)];
    })
    .await
}

async fn close_code(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("not closed")
        {
            Some(Ok(Message::Close(Some(f)))) => return (f.code, f.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    }
}

/// Queues a prompt job; its id.
async fn start_task(e: &Env) -> String {
    let r = client()
        .post(format!("{}/api/tasks", e.server.url))
        .bearer_auth(&e.key)
        .json(&json!({"messages": [{"role": "user", "content": "work"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn chat_over_ws_streams_token_by_token() {
    let e = env(
        MockConfig {
            tokens: 10,
            token_delay: Duration::from_millis(20),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let s = e.new_session().await;
    let mut ws = e.connect().await;
    send(
        &mut ws,
        json!({"op": "chat", "session_id": s, "content": "hi"}),
    )
    .await;
    let events = events_until_final(&mut ws, &format!("session:{s}")).await;
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events.last().unwrap()["event"], "done");
    assert_eq!(
        events.iter().filter(|e| e["event"] == "token").count(),
        10,
        "one frame per token"
    );
    assert_eq!(text(&events), full_reply(10));
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"op": "pong"}));
    e.server.shutdown().await;
}

#[tokio::test]
async fn sse_and_ws_watchers_see_identical_event_sequences() {
    let e = env(
        MockConfig {
            tokens: 25,
            token_delay: Duration::from_millis(10),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let s = e.new_session().await;
    let mut ws = e.connect().await;
    send(
        &mut ws,
        json!({"op": "subscribe", "topic": format!("session:{s}")}),
    )
    .await;
    let sse = client()
        .get(format!("{}/api/sessions/{s}/stream", e.server.url))
        .bearer_auth(&e.key)
        .send()
        .await
        .unwrap();
    // Both are subscribed before the reply starts (the SSE head has arrived).
    let r = client()
        .post(format!("{}/api/sessions/{s}/messages", e.server.url))
        .bearer_auth(&e.key)
        .json(&json!({"content": "go"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let ws_events = events_until_final(&mut ws, &format!("session:{s}")).await;
    let (sse_events, _stream) = sse_until_done(sse).await;
    assert_eq!(as_sse(ws_events.iter()), sse_events);
    assert_eq!(text(&ws_events), full_reply(25));
    e.server.shutdown().await;
}

#[tokio::test]
async fn resume_over_ws_yields_exactly_the_rest() {
    let e = env(
        MockConfig {
            tokens: 20,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let s = e.new_session().await;
    let topic = format!("session:{s}");
    let mut ws = e.connect().await;
    send(
        &mut ws,
        json!({"op": "chat", "session_id": s, "content": "hi"}),
    )
    .await;
    let all = events_until_final(&mut ws, &topic).await;
    drop(ws);
    let mut ws = e.connect().await;
    let cut = all[6]["id"].as_str().unwrap();
    send(
        &mut ws,
        json!({"op": "subscribe", "topic": topic, "last_event_id": cut}),
    )
    .await;
    let rest = events_until_final(&mut ws, &topic).await;
    assert_eq!(rest, all[7..].to_vec());
    let mut joined = all[..7].to_vec();
    joined.extend(rest);
    assert_eq!(text(&joined), full_reply(20));
    e.server.shutdown().await;
}

#[tokio::test]
async fn errors_keep_the_connection_open() {
    let e = env(MockConfig::default(), |_| {}).await;
    let mut ws = e.connect().await;
    ws.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "bad_request");
    send(&mut ws, json!({"op": "dance"})).await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "error");
    assert_eq!(v["code"], "unknown_op");
    send(&mut ws, json!({"op": "subscribe"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "bad_request");
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["op"], "pong");
    // NUL cannot be stored alike by both backends: refused naming the field, as over HTTP.
    let s = e.new_session().await;
    send(
        &mut ws,
        json!({"op": "chat", "session_id": s, "content": "a\u{0}b"}),
    )
    .await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "error", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("content: must not contain NUL"),
        "{v}"
    );
    e.server.shutdown().await;
}

#[tokio::test]
async fn another_users_topic_is_not_found() {
    let e = env(
        MockConfig {
            tokens: 3,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let s = e.new_session().await;
    let mallory = api_key(&e.server, "mallory", false).await;
    let mut ws = e.connect_as(&mallory).await;
    for op in [
        json!({"op": "subscribe", "topic": format!("session:{s}")}),
        json!({"op": "subscribe", "topic": format!("session:{s}"), "last_event_id": "x.1"}),
        json!({"op": "chat", "session_id": s, "content": "x"}),
        json!({"op": "cancel", "session_id": s}),
        json!({"op": "subscribe", "topic": "task:nope"}),
    ] {
        send(&mut ws, op).await;
        let v = next_json(&mut ws).await;
        assert_eq!(v["op"], "error");
        assert_eq!(v["code"], "not_found", "{v}");
    }
    e.server.shutdown().await;
}

#[tokio::test]
async fn oversized_message_closes_1009_and_binary_closes_1003() {
    let e = env(MockConfig::default(), |_| {}).await;
    let mut ws = e.connect().await;
    let big = json!({"op": "ping", "pad": "x".repeat(70 * 1024)}).to_string();
    ws.send(Message::Text(big.into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, CloseCode::Size);
    let mut ws = e.connect().await;
    ws.send(Message::Binary(Bytes::from_static(b"\x00\x01")))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await.0, CloseCode::Unsupported);
    e.server.shutdown().await;
}

/// The client's Close is answered with its own status code (RFC 6455 §5.5.1) before the
/// server hangs up, so clients report a clean close instead of 1006.
#[tokio::test]
async fn a_client_close_is_answered_with_its_code() {
    let e = env(MockConfig::default(), |_| {}).await;
    for (code, reason) in [(CloseCode::Normal, "done"), (CloseCode::Library(4001), "")] {
        let mut ws = e.connect().await;
        send(&mut ws, json!({"op": "ping"})).await;
        assert_eq!(next_json(&mut ws).await["op"], "pong");
        ws.send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await
        .unwrap();
        let answer = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no answer to the close");
        match answer {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, code),
            other => panic!("the close was not answered: {other:?}"),
        }
        // Then the server hangs up: the end of a completed handshake, not an error.
        let end = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("still open");
        assert!(end.is_none(), "{end:?}");
    }
    e.server.shutdown().await;
}

/// A close the server starts keeps its code and reason, and ends once the client has
/// answered it. At shutdown, every connection learns why it is cut.
#[tokio::test]
async fn server_closes_keep_their_code_and_reason() {
    let e = env(MockConfig::default(), |_| {}).await;
    let mut ws = e.connect().await;
    ws.send(Message::Binary(Bytes::from_static(b"\x00")))
        .await
        .unwrap();
    let (code, reason) = close_code(&mut ws).await;
    assert_eq!(code, CloseCode::Unsupported);
    assert!(reason.contains("binary frames"), "{reason}");
    // Reading on sends our answer; the server hangs up once it has it.
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("still open");
    assert!(end.is_none(), "{end:?}");

    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut ws = e.connect().await;
        // Past the upgrade: the connection is being served.
        send(&mut ws, json!({"op": "ping"})).await;
        assert_eq!(next_json(&mut ws).await["op"], "pong");
        clients.push(ws);
    }
    // The end of the drain, however it ended.
    e.server.state.lifecycle.close_connections();
    for ws in &mut clients {
        let (code, reason) = close_code(ws).await;
        assert_eq!(code, CloseCode::Away);
        assert!(reason.contains("reconnect"), "{reason}");
        // Reading on answers it, so the server need not wait for the answer.
        let end = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("still open");
        assert!(end.is_none(), "{end:?}");
    }
    e.server.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env(MockConfig::default(), |c| {
        c.server.ws.ping_every = Duration::from_millis(100);
        c.server.ws.idle_timeout = Duration::from_millis(400);
    })
    .await;
    // A raw socket: a WebSocket library would answer pings while reading.
    let addr = e.server.url.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n\r\n",
        e.key
    );
    sock.write_all(handshake.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    // Until the server hangs up on us.
    tokio::time::timeout(WAIT, sock.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.1 101"));
    let frames = &got[head_end..];
    assert!(frames.contains(&0x89), "the server pinged");
    let close_at = frames
        .iter()
        .rposition(|b| *b == 0x88)
        .expect("a close frame");
    let code = u16::from_be_bytes([frames[close_at + 2], frames[close_at + 3]]);
    assert_eq!(code, 1001);
    e.server.shutdown().await;
}

/// A client with a small receive buffer, which the test then does not read: the socket
/// fills fast.
async fn paused_client(e: &Env) -> Ws {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = e.server.url.trim_start_matches("http://").parse().unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let mut req = e.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", e.key).parse().unwrap(),
    );
    tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
        .unwrap()
        .0
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_others_are_unaffected() {
    let e = env(
        MockConfig {
            tokens: 60_000,
            ..Default::default()
        },
        |c| {
            c.server.ws.queue = 64;
            c.server.ws.send_timeout = Duration::from_millis(300);
            c.chat.replay_max_events = 200_000;
        },
    )
    .await;
    let s = e.new_session().await;
    let topic = format!("session:{s}");
    let mut paused = paused_client(&e).await;
    send(&mut paused, json!({"op": "subscribe", "topic": topic})).await;

    let mut reader = e.connect().await;
    send(
        &mut reader,
        json!({"op": "chat", "session_id": s, "content": "flood"}),
    )
    .await;
    let mut events = Vec::new();
    while events.len() < 10_000 {
        events.push(next_json(&mut reader).await);
    }
    let mut late = paused_client(&e).await;
    send(&mut late, json!({"op": "subscribe", "topic": topic})).await;
    events.extend(events_until_final(&mut reader, &topic).await);
    assert_eq!(events.last().unwrap()["event"], "done");
    assert_eq!(text(&events).len(), full_reply(60_000).len());

    // The paused client was cut off with a reason once its queue filled.
    let (code, reason) = close_code(&mut paused).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("not reading"), "{reason}");
    // So was the one that joined half-way, its backlog unread.
    let (code, reason) = close_code(&mut late).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("not reading"), "{reason}");
    drop(e.mock);
    e.server.shutdown().await;
}

/// Far more events than a connection's queue holds, whenever a client joins: from the
/// start, half-way through (the running reply is shown from its start), after the end
/// (resuming from its first event and from its middle). A client reading at full speed gets
/// every event once, in order, and is never taken for one that stopped reading.
#[tokio::test]
async fn a_long_reply_is_joined_at_its_start_middle_and_end_exactly_once() {
    const TOKENS: usize = 5_000;
    let e = env(
        MockConfig {
            tokens: TOKENS,
            token_delay: Duration::from_millis(1),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let s = e.new_session().await;
    let topic = format!("session:{s}");
    let mut at_start = e.connect().await;
    send(&mut at_start, json!({"op": "subscribe", "topic": topic})).await;
    let mut chatter = e.connect().await;
    send(
        &mut chatter,
        json!({"op": "chat", "session_id": s, "content": "a long one"}),
    )
    .await;
    let mut all = Vec::new();
    while all.len() < 2_000 {
        let v = next_json(&mut chatter).await;
        assert_ne!(v["event"], "done", "the reply ended too soon");
        all.push(v);
    }
    let mut middle = e.connect().await;
    send(&mut middle, json!({"op": "subscribe", "topic": topic})).await;
    all.extend(events_until_final(&mut chatter, &topic).await);
    assert_eq!(all.last().unwrap()["event"], "done");
    assert_eq!(text(&all), full_reply(TOKENS));

    let mut after_end = e.connect().await;
    let first = all[0]["id"].as_str().unwrap();
    send(
        &mut after_end,
        json!({"op": "subscribe", "topic": topic, "last_event_id": first}),
    )
    .await;
    let half = all.len() / 2;
    let mut from_half = e.connect().await;
    let cut = all[half]["id"].as_str().unwrap();
    send(
        &mut from_half,
        json!({"op": "subscribe", "topic": topic, "last_event_id": cut}),
    )
    .await;

    assert_eq!(events_until_final(&mut at_start, &topic).await, all);
    assert_eq!(events_until_final(&mut middle, &topic).await, all);
    assert_eq!(events_until_final(&mut after_end, &topic).await, all[1..]);
    assert_eq!(
        events_until_final(&mut from_half, &topic).await,
        all[half + 1..]
    );
    e.server.shutdown().await;
}

#[tokio::test]
async fn bad_origin_is_refused_and_tokens_authenticate_browsers() {
    let e = env(MockConfig::default(), |c| {
        c.server.cors_origins = vec!["https://chat.example.com".into()];
    })
    .await;
    let mut req = e.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", e.key).parse().unwrap(),
    );
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }

    // A browser on an allowed origin: no header, a short-lived token instead.
    let t: Value = client()
        .post(format!("{}/api/ws-token", e.server.url))
        .bearer_auth(&e.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = t["token"].as_str().unwrap();
    let mut req = format!("{}?token={token}", e.ws_url())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", "https://chat.example.com".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["op"], "pong");

    let req = format!("{}?token=forged.deadbeef", e.ws_url())
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let req = e.ws_url().into_client_request().unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401 without a key, got {other:?}"),
    }
    e.server.shutdown().await;
}

#[tokio::test]
async fn task_progress_arrives_over_ws_until_succeeded() {
    let e = env(
        MockConfig {
            tokens: 50,
            token_delay: Duration::from_millis(5),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let id = start_task(&e).await;
    let topic = format!("task:{id}");
    let mut ws = e.connect().await;
    send(&mut ws, json!({"op": "subscribe", "topic": topic})).await;
    let mut kinds = Vec::new();
    let result = loop {
        let v = next_json(&mut ws).await;
        assert_eq!(v["topic"], topic.as_str(), "{v}");
        let kind = v["event"].as_str().unwrap().to_owned();
        kinds.push(kind.clone());
        if kind == "succeeded" {
            break v["data"]["result"].clone();
        }
        assert_ne!(kind, "failed", "{v}");
    };
    assert_eq!(kinds[0], "queued");
    assert!(kinds.contains(&"running".to_owned()));
    assert!(kinds.contains(&"progress".to_owned()));
    assert_eq!(result, full_reply(50));
    e.server.shutdown().await;
}

#[tokio::test]
async fn chat_ops_pass_the_same_rate_limit_as_http() {
    let e = env(
        MockConfig {
            tokens: 3,
            ..Default::default()
        },
        |c| {
            c.guards.rate_chat_per_min = 2;
            c.guards.rate_burst = 2;
        },
    )
    .await;
    let mut ws = e.connect().await;
    for _ in 0..2 {
        let s = e.new_session().await;
        send(
            &mut ws,
            json!({"op": "chat", "session_id": s, "content": "hi"}),
        )
        .await;
        let events = events_until_final(&mut ws, &format!("session:{s}")).await;
        assert_eq!(events.last().unwrap()["event"], "done");
    }
    // The key's burst is spent: the third is refused like a third POST would be.
    let s = e.new_session().await;
    send(
        &mut ws,
        json!({"op": "chat", "session_id": s, "content": "hi"}),
    )
    .await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["code"], "rate_limited");
    assert_eq!(v["topic"], format!("session:{s}"));
    let r = client()
        .post(format!("{}/api/sessions/{s}/messages", e.server.url))
        .bearer_auth(&e.key)
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
}

/// The thinking comes as `reasoning` frames before the answer's `token` frames, the same
/// events an SSE watcher gets, and resumes by id like them.
#[tokio::test]
async fn a_reasoning_model_streams_its_thinking_before_the_answer_over_ws() {
    let e = reasoning_env().await;
    let s = e.new_session().await;
    let topic = format!("session:{s}");
    let sse = client()
        .get(format!("{}/api/sessions/{s}/stream", e.server.url))
        .bearer_auth(&e.key)
        .send()
        .await
        .unwrap();
    let mut ws = e.connect().await;
    send(
        &mut ws,
        json!({"op": "chat", "session_id": s, "content": "What is the answer?"}),
    )
    .await;
    let events = events_until_final(&mut ws, &topic).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, EVENTS);
    assert_eq!(joined(&events, "reasoning"), thinking());
    assert_eq!(text(&events), answer());
    assert_eq!(events[7]["data"]["reasoning_tokens"], REASONING_TOKENS);

    let (sse_events, stream) = sse_until_done(sse).await;
    assert_eq!(as_sse(events.iter()), sse_events);
    // Session feeds follow the next reply too: closed here, or shutdown waits for them.
    drop(stream);

    drop(ws);
    let mut ws = e.connect().await;
    send(
        &mut ws,
        json!({"op": "subscribe", "topic": topic, "last_event_id": events[2]["id"]}),
    )
    .await;
    let rest = events_until_final(&mut ws, &topic).await;
    assert_eq!(rest, events[3..].to_vec());
    drop(ws);
    e.server.shutdown().await;
}

/// A task's stream carries the thinking live; its result keeps it.
#[tokio::test]
async fn a_reasoning_task_streams_its_thinking_over_ws() {
    let e = reasoning_env().await;
    let id = start_task(&e).await;
    let topic = format!("task:{id}");
    let mut ws = e.connect().await;
    send(&mut ws, json!({"op": "subscribe", "topic": topic})).await;
    let mut events = Vec::new();
    loop {
        let v = next_json(&mut ws).await;
        assert_eq!(v["topic"], topic.as_str(), "{v}");
        let end = matches!(
            v["event"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        );
        events.push(v);
        if end {
            break;
        }
    }
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let first = kinds.iter().position(|k| *k == "reasoning").unwrap();
    assert_eq!(kinds[first..first + 3], ["reasoning"; 3], "{kinds:?}");
    assert_eq!(joined(&events, "reasoning"), thinking());
    let last = events.last().unwrap();
    assert_eq!(last["event"], "succeeded", "{last}");
    assert_eq!(last["data"]["result"], answer());
    assert_eq!(last["data"]["reasoning"], thinking());
    let task: Value = client()
        .get(format!("{}/api/tasks/{id}", e.server.url))
        .bearer_auth(&e.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(task["result"], answer());
    assert_eq!(task["reasoning"], thinking());
    e.server.shutdown().await;
}

/// The generation id and sequence number of an event id.
fn split_id(id: &str) -> (String, u64) {
    let (g, seq) = id.rsplit_once('.').unwrap();
    (g.to_owned(), seq.parse().unwrap())
}

/// `last_event_id` at or past the end of a generation — up to `u64::MAX`, on a running and
/// on a finished generation — sends nothing at or before it again, and the connection
/// stays up: it carries the session's next reply and answers a ping.
#[tokio::test]
async fn a_resume_id_at_or_past_the_end_replays_nothing_and_the_connection_stays_up() {
    let e = env(
        MockConfig {
            tokens: 40,
            token_delay: Duration::from_millis(30),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let s = e.new_session().await;
    let topic = format!("session:{s}");
    let post = |content: &'static str| {
        client()
            .post(format!("{}/api/sessions/{s}/messages", e.server.url))
            .bearer_auth(&e.key)
            .header("accept", "text/event-stream")
            .json(&json!({ "content": content }))
            .send()
    };
    let mut live = post("first").await.unwrap().bytes_stream().eventsource();
    let start = tokio::time::timeout(WAIT, live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (first, _) = split_id(&start.id);
    let ch = e.server.state.chat.hub().get(&first).unwrap();
    let ids = |end: u64| [u64::MAX, u64::MAX - 1, end, end + 1];
    let mut conns = Vec::new();
    for after in ids(ch.next_seq()) {
        let mut ws = e.connect().await;
        send(
            &mut ws,
            json!({"op": "subscribe", "topic": topic, "last_event_id": format!("{first}.{after}")}),
        )
        .await;
        conns.push((after, ws));
    }
    // Every resume is made (the live stream is the fifth subscriber) while the reply runs.
    let deadline = tokio::time::Instant::now() + WAIT;
    while ch.subscriber_count() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "resumes not made");
        tokio::task::yield_now().await;
    }
    assert!(
        !ch.is_finished(),
        "the reply ended before the resumes were made"
    );
    while let Some(ev) = tokio::time::timeout(WAIT, live.next()).await.unwrap() {
        if ev.unwrap().event == "done" {
            break;
        }
    }
    assert!(ch.is_finished());
    for after in ids(ch.next_seq()) {
        let mut ws = e.connect().await;
        send(
            &mut ws,
            json!({"op": "subscribe", "topic": topic, "last_event_id": format!("{first}.{after}")}),
        )
        .await;
        conns.push((after, ws));
    }
    let (second, _sse) = sse_until_done(post("second").await.unwrap()).await;
    for (after, mut ws) in conns {
        let mut new = Vec::new();
        loop {
            let v = next_json(&mut ws).await;
            assert_eq!(v["topic"], topic.as_str(), "{v}");
            let (g, seq) = split_id(v["id"].as_str().unwrap());
            if g == first {
                assert!(seq > after, "{} replayed after {after}", v["id"]);
                continue;
            }
            let last = v["event"] == "done";
            new.push(v);
            if last {
                break;
            }
        }
        assert_eq!(as_sse(new.iter()), second, "resumed after {after}");
        send(&mut ws, json!({"op": "ping"})).await;
        assert_eq!(next_json(&mut ws).await, json!({"op": "pong"}));
    }
    e.server.shutdown().await;
}

/// A task topic resumed at or past its last event replays nothing, and the connection
/// stays up.
#[tokio::test]
async fn a_task_resumed_past_its_end_replays_nothing() {
    let e = env(
        MockConfig {
            tokens: 5,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let id = start_task(&e).await;
    let topic = format!("task:{id}");
    let mut ws = e.connect().await;
    send(&mut ws, json!({"op": "subscribe", "topic": topic})).await;
    let last = loop {
        let v = next_json(&mut ws).await;
        if v["event"] == "succeeded" {
            break split_id(v["id"].as_str().unwrap()).1;
        }
    };
    let ch = e.server.state.chat.hub().get(&id).unwrap();
    for after in [u64::MAX, u64::MAX - 1, last, last + 1] {
        let mut ws = e.connect().await;
        let resume = |seq: u64| json!({"op": "subscribe", "topic": topic, "last_event_id": format!("{id}.{seq}")});
        send(&mut ws, resume(after)).await;
        send(&mut ws, json!({"op": "ping"})).await;
        assert_eq!(
            next_json(&mut ws).await,
            json!({"op": "pong"}),
            "after {after}"
        );
        // Once that subscription has ended, all it sent is queued; a resume from the
        // last-but-one event then sends exactly the last one, after anything replayed.
        let deadline = tokio::time::Instant::now() + WAIT;
        while ch.subscriber_count() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "still subscribed");
            tokio::task::yield_now().await;
        }
        let v = loop {
            send(&mut ws, resume(last - 1)).await;
            let v = next_json(&mut ws).await;
            if v["code"] != "already_subscribed" {
                break v;
            }
        };
        assert_eq!(v["event"], "succeeded", "replayed after {after}: {v}");
        assert_eq!(split_id(v["id"].as_str().unwrap()).1, last);
    }
    e.server.shutdown().await;
}
