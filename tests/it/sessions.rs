//! Chat sessions against both stores: CRUD, ownership, the hub's fan-out and resume, and the
//! final state of every reply.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::Duration;

use common::db::{Backend, TestDb};
use common::env::TestEnv;
use common::reasoning::{EVENTS, REASONING_TOKENS, answer, reasoning_upstream, thinking};
use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice::config::{AuthMode, ProviderConfig};
use sluice_mock::{Fault, MockConfig, MockServer, full_reply, token_text};

crate::backend_tests!(
    sqlite, postgres;
    other_keys_see_nothing,
    three_subscribers_get_every_token_in_order,
    resume_mid_stream_yields_exactly_the_rest,
    resume_after_the_end_yields_the_rest_and_done,
    a_client_that_reads_nothing_is_told_it_lagged,
    disconnecting_the_only_client_still_completes_the_reply,
    cancel_keeps_the_partial_reply,
    upstream_failure_leaves_a_failed_reply,
    one_generation_at_a_time,
    history_survives_a_restart,
    a_reasoning_model_streams_its_thinking_before_the_answer,
    a_cancelled_reply_keeps_the_thinking_so_far,
    the_thinking_is_saved_while_it_streams,
    an_agents_model_that_stalls_before_its_first_token_falls_back,
);

/// A server whose `slow-model` is served by a provider that accepts requests and then
/// never sends a token; an agent on it falls back to `mock-model`.
async fn stalling_agent_env(backend: Backend) -> (Env, MockServer) {
    let stalled = mock(MockConfig {
        fault: Some(Fault::StallFirst),
        ..Default::default()
    })
    .await;
    let e = env_with(
        backend,
        MockConfig {
            tokens: 5,
            ..Default::default()
        },
        |c| {
            c.upstream.timeouts.first_token = Duration::from_millis(300);
            let mut slow = ProviderConfig::openai("slow", &stalled.url(), None);
            slow.models = vec!["slow-model".into()];
            c.upstream.providers.insert(0, slow);
        },
    )
    .await;
    let admin = api_key(&e.server, "root", true).await;
    let r = client()
        .post(e.url("/api/agents"))
        .bearer_auth(&admin)
        .json(
            &json!({"name": "stalling", "model": "slow-model", "fallback_models": ["mock-model"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    (e, stalled)
}

async fn an_agents_model_that_stalls_before_its_first_token_falls_back(b: Backend) {
    let (e, stalled) = stalling_agent_env(b).await;
    let r = e
        .req(reqwest::Method::POST, "/api/sessions")
        .json(&json!({"agent": "stalling"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let s = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = read_until_final(e.chat(&s, "hi").await, 10_000).await;
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    assert_eq!(text(&events), full_reply(5));
    assert_eq!(stalled.stats().chat_requests, 1);
    e.server.shutdown().await;
}

struct Env {
    mock: MockServer,
    server: TestServer,
    db: TestDb,
    key: String,
}

async fn env(backend: Backend, mock_cfg: MockConfig) -> Env {
    env_with(backend, mock_cfg, |_| {}).await
}

async fn env_with(
    backend: Backend,
    mock_cfg: MockConfig,
    tweak: impl FnOnce(&mut sluice::config::Config) + Send,
) -> Env {
    let e = TestEnv::builder()
        .mock(mock_cfg)
        .backend(backend)
        .keys_required()
        .config(tweak)
        .user_key()
        .start()
        .await;
    Env {
        mock: e.mock,
        server: e.server,
        db: e.db.unwrap(),
        key: e.user.unwrap(),
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url)
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        client().request(m, self.url(path)).bearer_auth(&self.key)
    }

    async fn new_session(&self) -> String {
        let r = self
            .req(reqwest::Method::POST, "/api/sessions")
            .json(&json!({"title": "t"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Posts a message and returns its live stream.
    async fn chat(&self, session: &str, content: &str) -> reqwest::Response {
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/api/sessions/{session}/messages"),
            )
            .header("accept", "text/event-stream")
            .json(&json!({"content": content}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        r
    }

    async fn subscribe(&self, session: &str, last_event_id: Option<&str>) -> reqwest::Response {
        let mut r = self.req(
            reqwest::Method::GET,
            &format!("/api/sessions/{session}/stream"),
        );
        if let Some(id) = last_event_id {
            r = r.header("last-event-id", id);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 200);
        r
    }

    async fn messages(&self, session: &str) -> Vec<Value> {
        let r = self
            .req(
                reqwest::Method::GET,
                &format!("/api/sessions/{session}/messages"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["data"]
            .as_array()
            .unwrap()
            .clone()
    }
}

#[derive(Debug, Clone)]
struct Ev {
    id: String,
    event: String,
    data: Value,
}

/// Reads events until a final one (done, error, interrupted) or until `max` events.
async fn read_until_final(resp: reqwest::Response, max: usize) -> Vec<Ev> {
    let mut out = Vec::new();
    let mut events = resp.bytes_stream().eventsource();
    while let Some(ev) = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("stalled")
    {
        let ev = ev.unwrap();
        let e = Ev {
            id: ev.id.clone(),
            event: ev.event.clone(),
            data: serde_json::from_str(&ev.data).unwrap(),
        };
        let last = matches!(e.event.as_str(), "done" | "error" | "interrupted");
        out.push(e);
        if last || out.len() >= max {
            break;
        }
    }
    out
}

fn text(events: &[Ev]) -> String {
    joined(events, "token")
}

/// The `text` of every `kind` event, in order.
fn joined(events: &[Ev], kind: &str) -> String {
    events
        .iter()
        .filter(|e| e.event == kind)
        .map(|e| e.data["text"].as_str().unwrap())
        .collect()
}

/// Sessions whose only upstream is a reasoning model, `pace` between its pieces.
async fn reasoning_env(b: Backend, pace: Duration) -> Env {
    let upstream = reasoning_upstream(pace).await;
    env_with(b, MockConfig::default(), |c| {
        c.upstream.providers = vec![ProviderConfig::openai("reasoner", &upstream, None)];
    })
    .await
}

fn assert_ids_increase(events: &[Ev]) {
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e.id.rsplit_once('.').unwrap().1.parse().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap or duplicate: {seqs:?}"
    );
}

async fn other_keys_see_nothing(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 6,
            token_delay: Duration::from_millis(30),
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    let first = read_until_final(e.chat(&s, "hi").await, 1000).await;
    let some_id = first[2].id.clone();
    let mallory = api_key(&e.server, "mallory", false).await;
    let m = |method: reqwest::Method, path: String| {
        client().request(method, e.url(&path)).bearer_auth(&mallory)
    };
    let cases = vec![
        m(reqwest::Method::GET, format!("/api/sessions/{s}")),
        m(reqwest::Method::PATCH, format!("/api/sessions/{s}")).json(&json!({"title": "x"})),
        m(reqwest::Method::GET, format!("/api/sessions/{s}/messages")),
        m(reqwest::Method::POST, format!("/api/sessions/{s}/messages"))
            .header("accept", "text/event-stream")
            .json(&json!({"content": "x"})),
        m(reqwest::Method::POST, format!("/api/sessions/{s}/messages"))
            .json(&json!({"content": "x"})),
        m(reqwest::Method::GET, format!("/api/sessions/{s}/stream")),
        m(reqwest::Method::GET, format!("/api/sessions/{s}/stream"))
            .header("last-event-id", &some_id),
        m(
            reqwest::Method::GET,
            format!("/api/sessions/{s}/stream?last_event_id={some_id}"),
        ),
        m(reqwest::Method::POST, format!("/api/sessions/{s}/cancel")),
        m(reqwest::Method::DELETE, format!("/api/sessions/{s}")),
    ];
    for req in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "no event stream at all"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }
    let list: Value = m(reqwest::Method::GET, "/api/sessions".into())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    // The owner still sees everything.
    assert_eq!(e.messages(&s).await.len(), 2);
    let no_key = client()
        .get(e.url(&format!("/api/sessions/{s}")))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let v1 = client()
        .post(e.url("/v1/chat/completions"))
        .json(&body(false, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(v1.status(), 401);
    e.server.shutdown().await;
}

async fn three_subscribers_get_every_token_in_order(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 40,
            token_delay: Duration::from_millis(10),
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    // Watchers first, then the generation: all three must see it from its start.
    let w1 = e.subscribe(&s, None).await;
    let w2 = e.subscribe(&s, None).await;
    let poster = e.chat(&s, "hello").await;
    let (a, b2, c) = tokio::join!(
        read_until_final(poster, 10_000),
        read_until_final(w1, 10_000),
        read_until_final(w2, 10_000)
    );
    for events in [&a, &b2, &c] {
        assert_eq!(events[0].event, "start");
        assert_eq!(events.last().unwrap().event, "done");
        assert_eq!(text(events), full_reply(40));
        assert_ids_increase(events);
    }
    let ids = |v: &Vec<Ev>| v.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b2));
    assert_eq!(ids(&a), ids(&c));
    e.server.shutdown().await;
}

async fn resume_mid_stream_yields_exactly_the_rest(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 30,
            token_delay: Duration::from_millis(15),
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    let head = read_until_final(e.chat(&s, "hi").await, 8).await;
    assert_eq!(head.len(), 8);
    // The connection above is dropped mid-stream; resume from its last id.
    let last = head.last().unwrap().id.clone();
    let rest = read_until_final(e.subscribe(&s, Some(&last)).await, 10_000).await;
    assert_eq!(rest.last().unwrap().event, "done");
    let mut all = head.clone();
    all.extend(rest.clone());
    assert_ids_increase(&all);
    assert_eq!(text(&all), full_reply(30));
    // ?last_event_id= works the same for clients that cannot set headers.
    let r = e
        .req(
            reqwest::Method::GET,
            &format!("/api/sessions/{s}/stream?last_event_id={last}"),
        )
        .send()
        .await
        .unwrap();
    let again = read_until_final(r, 10_000).await;
    assert_eq!(
        again.iter().map(|e| &e.id).collect::<Vec<_>>(),
        rest.iter().map(|e| &e.id).collect::<Vec<_>>()
    );
    e.server.shutdown().await;
}

async fn resume_after_the_end_yields_the_rest_and_done(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 12,
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    let all = read_until_final(e.chat(&s, "hi").await, 10_000).await;
    assert_eq!(all.last().unwrap().event, "done");
    let cut = &all[..5];
    let rest = read_until_final(e.subscribe(&s, Some(&cut[4].id)).await, 10_000).await;
    assert_eq!(
        rest.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        all[5..].iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(rest.last().unwrap().event, "done");
    let mut joined = cut.to_vec();
    joined.extend(rest);
    assert_eq!(text(&joined), full_reply(12));
    e.server.shutdown().await;
}

/// The paused client either catches up from the replay log (if the socket buffers held
/// what it missed) or is told it lagged; either way the server holds at most the bounded
/// log, and what the client did receive has no gap.
async fn a_client_that_reads_nothing_is_told_it_lagged(b: Backend) {
    let e = env_with(
        b,
        MockConfig {
            tokens: 10_000,
            ..Default::default()
        },
        |c| {
            c.chat.replay_max_events = 500;
        },
    )
    .await;
    let s = e.new_session().await;
    // Opened, then never read while the whole reply streams.
    let paused = e.subscribe(&s, None).await;
    let done = read_until_final(e.chat(&s, "go").await, 1_000_000).await;
    assert_eq!(done.last().unwrap().event, "done");
    assert_eq!(text(&done).len(), full_reply(10_000).len());
    let channels = e.server.state.chat.hub().channels();
    assert!(
        channels.iter().all(|c| c.retained() <= 500),
        "replay log bounded"
    );
    let events = read_until_final(paused, 1_000_000).await;
    let last = events.last().unwrap();
    if last.event == "error" {
        assert_eq!(last.data["code"], "lagged");
        assert_eq!(last.data["retryable"], true);
        assert_ids_increase(&events[..events.len() - 1]);
        assert!(full_reply(10_000).starts_with(&text(&events)));
    } else {
        assert_eq!(last.event, "done");
        assert_ids_increase(&events);
        assert_eq!(text(&events), full_reply(10_000));
    }
    // The reply is complete in the history whatever the slow client did.
    let msgs = e.messages(&s).await;
    assert_eq!(msgs[1]["status"], "complete");
    assert_eq!(msgs[1]["content"].as_str().unwrap(), full_reply(10_000));
    e.server.shutdown().await;
}

async fn disconnecting_the_only_client_still_completes_the_reply(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 20,
            token_delay: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    let head = read_until_final(e.chat(&s, "hi").await, 3).await;
    assert_eq!(head.len(), 3);
    // Dropped. Watch for the end from another subscription of the same generation.
    let rest = read_until_final(e.subscribe(&s, Some(&head[2].id)).await, 10_000).await;
    assert_eq!(rest.last().unwrap().event, "done");
    let msgs = e.messages(&s).await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["content"], "hi");
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["status"], "complete");
    assert_eq!(msgs[1]["content"], full_reply(20));
    assert_eq!(msgs[1]["completion_tokens"], 20);
    assert_eq!(e.mock.stats().completed_streams, 1);
    e.server.shutdown().await;
}

async fn cancel_keeps_the_partial_reply(b: Backend) {
    let e = env(
        b,
        MockConfig {
            fault: Some(Fault::Endless),
            token_delay: Duration::from_millis(5),
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    let resp = e.chat(&s, "go on forever").await;
    let mut events = resp.bytes_stream().eventsource();
    let mut got = Vec::new();
    while got.len() < 6 {
        let ev = events.next().await.unwrap().unwrap();
        got.push(ev);
    }
    let r = e
        .req(reqwest::Method::POST, &format!("/api/sessions/{s}/cancel"))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["cancelled"], true);
    let mut streamed = String::new();
    for ev in &got {
        if ev.event == "token" {
            streamed.push_str(
                serde_json::from_str::<Value>(&ev.data).unwrap()["text"]
                    .as_str()
                    .unwrap(),
            );
        }
    }
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        let ev = ev.unwrap();
        if ev.event == "token" {
            streamed.push_str(
                serde_json::from_str::<Value>(&ev.data).unwrap()["text"]
                    .as_str()
                    .unwrap(),
            );
        }
        if ev.event == "done" {
            last = Some(serde_json::from_str::<Value>(&ev.data).unwrap());
            break;
        }
    }
    assert_eq!(last.unwrap()["finish_reason"], "cancelled");
    let msgs = e.messages(&s).await;
    assert_eq!(msgs[1]["status"], "cancelled");
    assert_eq!(
        msgs[1]["content"].as_str().unwrap(),
        streamed,
        "the partial text is kept, exactly"
    );
    assert!(!streamed.is_empty());
    // The upstream request is cancelled with it.
    wait_stats(&e.mock, Duration::from_secs(2), |st| st.active_streams == 0).await;
    e.server.shutdown().await;
}

async fn upstream_failure_leaves_a_failed_reply(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 10,
            fault: Some(Fault::ResetMid),
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    let events = read_until_final(e.chat(&s, "hi").await, 10_000).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["code"], "upstream_disconnected");
    assert!(last.data["message"].is_string());
    let msgs = e.messages(&s).await;
    assert_eq!(msgs[1]["status"], "failed");
    assert_eq!(msgs[1]["content"], full_reply(5));
    assert!(msgs[1]["error"].is_string());
    e.server.shutdown().await;
}

async fn one_generation_at_a_time(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 50,
            token_delay: Duration::from_millis(10),
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    let first = e.chat(&s, "one").await;
    let second = e
        .req(
            reqwest::Method::POST,
            &format!("/api/sessions/{s}/messages"),
        )
        .json(&json!({"content": "two"}))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 409);
    assert_eq!(
        second.json::<Value>().await.unwrap()["error"]["code"],
        "generation_running"
    );
    assert_eq!(
        read_until_final(first, 10_000).await.last().unwrap().event,
        "done"
    );
    // Free again as soon as `done` was seen; the history goes upstream.
    let r = e
        .req(
            reqwest::Method::POST,
            &format!("/api/sessions/{s}/messages"),
        )
        .json(&json!({"content": "three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert!(v["generation_id"].is_string());
    let rest = read_until_final(e.subscribe(&s, None).await, 10_000).await;
    assert_eq!(rest.last().unwrap().event, "done");
    let sent = e.mock.stats().last_request.unwrap();
    let roles: Vec<&str> = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(sent["messages"][1]["content"], full_reply(50));
    e.server.shutdown().await;
}

async fn history_survives_a_restart(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 4,
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    read_until_final(e.chat(&s, "remember me").await, 10_000).await;
    let mut cfg = config_for(&e.mock);
    cfg.store = e.db.config.clone();
    cfg.chat.auth = AuthMode::Required;
    let Env {
        server,
        key,
        db,
        mock,
        ..
    } = e;
    server.shutdown().await;
    let again = TestServer::start(cfg).await;
    let r: Value = client()
        .get(format!("{}/api/sessions/{s}/messages", again.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let msgs = r["data"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["content"], "remember me");
    assert_eq!(msgs[1]["content"], full_reply(4));
    assert_eq!(msgs[1]["status"], "complete");
    again.shutdown().await;
    drop((db, mock));
    let _ = token_text(0);
}

async fn a_reasoning_model_streams_its_thinking_before_the_answer(b: Backend) {
    let e = reasoning_env(b, Duration::ZERO).await;
    let s = e.new_session().await;
    let events = read_until_final(e.chat(&s, "What is the answer?").await, 1000).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, EVENTS);
    assert_ids_increase(&events);
    assert_eq!(joined(&events, "reasoning"), thinking());
    assert_eq!(text(&events), answer());
    assert_eq!(events[7].data["reasoning_tokens"], REASONING_TOKENS);

    // Resumed like tokens: after the first piece of thinking, exactly the rest.
    let rest = read_until_final(e.subscribe(&s, Some(&events[1].id)).await, 1000).await;
    assert_eq!(
        rest.iter().map(|e| &e.id).collect::<Vec<_>>(),
        events[2..].iter().map(|e| &e.id).collect::<Vec<_>>()
    );
    assert_eq!(rest[0].event, "reasoning");

    let msgs = e.messages(&s).await;
    assert_eq!(msgs[1]["content"], answer());
    assert_eq!(msgs[1]["reasoning"], thinking());
    assert_eq!(msgs[1]["completion_tokens"], 9);
    assert!(
        msgs[0].get("reasoning").is_none(),
        "no reasoning field without reasoning: {}",
        msgs[0]
    );

    // The usage record keeps the reasoning tokens, and the usage API returns them.
    let admin = api_key(&e.server, "root", true).await;
    let usage: Value = client()
        .get(e.url("/api/admin/usage"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = usage["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{usage}");
    assert_eq!(rows[0]["completion_tokens"], 9);
    assert_eq!(rows[0]["reasoning_tokens"], REASONING_TOKENS);
    e.server.shutdown().await;
}

async fn a_cancelled_reply_keeps_the_thinking_so_far(b: Backend) {
    let e = reasoning_env(b, Duration::from_millis(300)).await;
    let s = e.new_session().await;
    let mut events = e
        .chat(&s, "Think it over")
        .await
        .bytes_stream()
        .eventsource();
    let mut seen = Vec::new();
    let mut cancelled = false;
    while let Some(ev) = tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        let done = ev.event == "done";
        seen.push(Ev {
            id: ev.id,
            event: ev.event,
            data,
        });
        if done {
            break;
        }
        if !cancelled && seen.last().unwrap().event == "reasoning" {
            cancelled = true;
            let r = e
                .req(reqwest::Method::POST, &format!("/api/sessions/{s}/cancel"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    assert_eq!(seen.last().unwrap().data["finish_reason"], "cancelled");
    let streamed = joined(&seen, "reasoning");
    assert!(!streamed.is_empty() && thinking().starts_with(&streamed));
    let msgs = e.messages(&s).await;
    assert_eq!(msgs[1]["status"], "cancelled");
    assert_eq!(
        msgs[1]["reasoning"], streamed,
        "the thinking streamed is kept, exactly"
    );
    assert_eq!(msgs[1]["content"], text(&seen));
    e.server.shutdown().await;
}

/// A reply is saved every 2 s while it streams; the thinking is saved with its text.
async fn the_thinking_is_saved_while_it_streams(b: Backend) {
    // About 4 s in all, its thinking over by 2.1 s: the first save has some of it.
    let e = reasoning_env(b, Duration::from_millis(700)).await;
    let s = e.new_session().await;
    let live = e.chat(&s, "Take your time").await;
    let deadline = std::time::Instant::now() + WAIT;
    let saved = loop {
        let msgs = e.messages(&s).await;
        let reply = msgs[1].clone();
        if reply["reasoning"].is_string() {
            break reply;
        }
        assert_eq!(reply["status"], "streaming", "ended before a save: {reply}");
        assert!(std::time::Instant::now() < deadline, "never saved: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(saved["status"], "streaming", "{saved}");
    let so_far = saved["reasoning"].as_str().unwrap();
    assert!(
        !so_far.is_empty() && thinking().starts_with(so_far),
        "{saved}"
    );
    let events = read_until_final(live, 1000).await;
    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(e.messages(&s).await[1]["reasoning"], thinking());
    e.server.shutdown().await;
}

/// The resume ids at or past the end of a generation whose next event would be `end`.
fn ids_past_the_end(end: u64) -> [u64; 4] {
    [u64::MAX, u64::MAX - 1, end, end + 1]
}

/// The generation id and sequence number of an event id.
fn split_id(id: &str) -> (String, u64) {
    let (g, seq) = id.rsplit_once('.').unwrap();
    (g.to_owned(), seq.parse().unwrap())
}

/// Events until the final one of a generation other than `first`.
async fn read_until_final_of_another(resp: reqwest::Response, first: &str) -> Vec<Ev> {
    let mut out = Vec::new();
    let mut events = resp.bytes_stream().eventsource();
    while let Some(ev) = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("stalled")
    {
        let ev = ev.expect("the stream broke");
        let e = Ev {
            id: ev.id.clone(),
            event: ev.event.clone(),
            data: serde_json::from_str(&ev.data).unwrap(),
        };
        let last = matches!(e.event.as_str(), "done" | "error" | "interrupted")
            && split_id(&e.id).0 != first;
        out.push(e);
        if last {
            return out;
        }
    }
    panic!("the stream ended: {out:?}");
}

/// `Last-Event-ID` at or past the end of a generation — up to `u64::MAX`, as the header or
/// `?last_event_id=`, on a running and on a finished generation — sends nothing at or
/// before it again, and the stream stays up to carry the session's next reply.
#[tokio::test]
async fn a_resume_id_at_or_past_the_end_replays_nothing_and_the_stream_stays_up() {
    let e = env(
        Backend::Sqlite,
        MockConfig {
            tokens: 40,
            token_delay: Duration::from_millis(30),
            ..Default::default()
        },
    )
    .await;
    let s = e.new_session().await;
    let open = |id: String, query: bool| {
        let mut r = e.req(
            reqwest::Method::GET,
            &if query {
                format!("/api/sessions/{s}/stream?last_event_id={id}")
            } else {
                format!("/api/sessions/{s}/stream")
            },
        );
        if !query {
            r = r.header("last-event-id", id);
        }
        async move {
            let r = r.send().await.expect("the server dropped the request");
            assert_eq!(r.status(), 200);
            r
        }
    };
    let mut live = e.chat(&s, "first").await.bytes_stream().eventsource();
    let start = tokio::time::timeout(WAIT, live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (first, _) = split_id(&start.id);
    let ch = e.server.state.chat.hub().get(&first).unwrap();
    let mut streams = Vec::new();
    let running_end = ch.next_seq();
    for after in ids_past_the_end(running_end) {
        for query in [false, true] {
            streams.push((after, open(format!("{first}.{after}"), query).await));
        }
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
    for after in ids_past_the_end(ch.next_seq()) {
        for query in [false, true] {
            streams.push((after, open(format!("{first}.{after}"), query).await));
        }
    }
    let second = read_until_final(e.chat(&s, "second").await, 10_000).await;
    assert_eq!(second.last().unwrap().event, "done");
    for (after, resp) in streams {
        let got = read_until_final_of_another(resp, &first).await;
        let (old, new): (Vec<_>, Vec<_>) = got.iter().partition(|ev| split_id(&ev.id).0 == first);
        for ev in &old {
            assert!(
                split_id(&ev.id).1 > after,
                "{} replayed after {after}",
                ev.id
            );
        }
        let new: Vec<&str> = new.iter().map(|ev| ev.id.as_str()).collect();
        let want: Vec<&str> = second.iter().map(|ev| ev.id.as_str()).collect();
        assert_eq!(new, want, "resumed after {after}");
    }
    e.server.shutdown().await;
}
