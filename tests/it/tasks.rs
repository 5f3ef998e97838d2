//! Prompt jobs: agents, scenes, knowledge and the task queue, against the embedded queue
//! and Redis, SQLite and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::Duration;

use common::db::{Backend, TestDb};
use common::env::TestEnv;
use common::reasoning::{answer, reasoning_upstream, thinking};
use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice::config::{AuthMode, ProviderConfig, RedisConfig, Secret};
use sluice_mock::{Fault, MockConfig, MockServer, full_reply};

crate::backend_tests!(
    sqlite, postgres;
    scene_run_result_by_poll_and_by_sse,
    workers_bound_upstream_concurrency,
    cancel_stops_a_running_task_and_its_upstream,
    knowledge_ranks_titles_first_and_reaches_the_prompt,
    restart_completes_queued_tasks,
    a_reasoning_task_keeps_its_thinking_with_the_result,
    a_task_whose_model_stalls_before_its_first_token_falls_back,
);

struct Env {
    mock: MockServer,
    server: TestServer,
    _db: TestDb,
    admin: String,
    user: String,
}

async fn env(
    b: Backend,
    mock_cfg: MockConfig,
    tweak: impl FnOnce(&mut sluice::config::Config) + Send,
) -> Env {
    let e = TestEnv::builder()
        .mock(mock_cfg)
        .backend(b)
        .keys_required()
        .config(tweak)
        .admin_key()
        .user_key()
        .start()
        .await;
    Env {
        mock: e.mock,
        server: e.server,
        _db: e.db.unwrap(),
        admin: e.admin.unwrap(),
        user: e.user.unwrap(),
    }
}

impl Env {
    async fn call(
        &self,
        key: &str,
        m: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = client()
            .request(m, format!("{}{path}", self.server.url))
            .bearer_auth(key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let v = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, v)
    }

    async fn scene(&self, name: &str, template: &str) {
        let (s, v) = self
            .call(
                &self.admin,
                reqwest::Method::POST,
                "/api/scenes",
                Some(json!({"name": name, "agent": "default", "template": template})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }

    /// Task events until a final one.
    async fn task_events(&self, id: &str, last: Option<&str>) -> Vec<(String, String, Value)> {
        let mut r = client()
            .get(format!("{}/api/tasks/{id}/events", self.server.url))
            .bearer_auth(&self.user);
        if let Some(l) = last {
            r = r.header("last-event-id", l);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut out = Vec::new();
        let mut s = resp.bytes_stream().eventsource();
        while let Some(ev) = tokio::time::timeout(WAIT, s.next()).await.expect("stalled") {
            let ev = ev.unwrap();
            let data: Value = serde_json::from_str(&ev.data).unwrap();
            let last = matches!(ev.event.as_str(), "succeeded" | "failed" | "cancelled");
            out.push((ev.id, ev.event, data));
            if last {
                break;
            }
        }
        out
    }
}

async fn scene_run_result_by_poll_and_by_sse(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 40,
            token_delay: Duration::from_millis(5),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    e.scene("brief", "Write about {{topic}} for {{who}}.").await;
    let (s, v) = e
        .call(
            &e.user,
            reqwest::Method::POST,
            "/api/scenes/brief/run",
            Some(json!({"variables": {"topic": "tides", "who": "kids"}})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_owned();
    assert_eq!(v["status_url"], format!("/api/tasks/{id}"));
    assert_eq!(v["events_url"], format!("/api/tasks/{id}/events"));

    let events = e.task_events(&id, None).await;
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"queued"));
    assert!(kinds.contains(&"running"));
    assert!(kinds.contains(&"progress"));
    assert_eq!(kinds.last(), Some(&"succeeded"));
    let (_, _, last) = events.last().unwrap();
    assert_eq!(last["result"], full_reply(40));
    let progress: Vec<i64> = events
        .iter()
        .filter(|(_, k, _)| k == "progress")
        .map(|(_, _, d)| d["tokens"].as_i64().unwrap())
        .collect();
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    assert_eq!(*progress.last().unwrap(), 40);

    // Resume after an event: exactly the rest.
    let rest = e.task_events(&id, Some(&events[1].0)).await;
    assert_eq!(
        rest.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        events[2..].iter().map(|r| r.0.clone()).collect::<Vec<_>>()
    );

    let (s, t) = e
        .call(
            &e.user,
            reqwest::Method::GET,
            &format!("/api/tasks/{id}"),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(t["status"], "succeeded");
    assert_eq!(t["result"], full_reply(40));
    assert_eq!(t["progress"]["tokens"], 40);
    assert!(t["started_at"].is_i64() && t["finished_at"].is_i64());
    let sent = e.mock.stats().last_request.unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "Write about tides for kids."
    );
    e.server.shutdown().await;
}

/// A finished task's stream ends for good: a reconnect holding its last event gets 204,
/// which tells a browser's `EventSource` to stop reconnecting; the first request on a
/// finished task still gets its events.
#[tokio::test]
async fn a_finished_tasks_events_end_with_204_on_reconnect() {
    let e = env(
        Backend::Sqlite,
        MockConfig {
            tokens: 5,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let (s, v) = e
        .call(
            &e.user,
            reqwest::Method::POST,
            "/api/tasks?sync=false",
            Some(json!({"messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_owned();
    let events = e.task_events(&id, None).await;
    let (last_id, kind, _) = events.last().unwrap();
    assert_eq!(kind, "succeeded");

    let get = |last: Option<&str>, query: Option<&str>| {
        let mut url = format!("{}/api/tasks/{id}/events", e.server.url);
        if let Some(q) = query {
            url = format!("{url}?last_event_id={q}");
        }
        let mut r = client().get(url).bearer_auth(&e.user);
        if let Some(l) = last {
            r = r.header("last-event-id", l);
        }
        r.send()
    };
    for (header, query) in [
        (Some(last_id.as_str()), None),
        (None, Some(last_id.as_str())),
    ] {
        let r = get(header, query).await.unwrap();
        assert_eq!(r.status(), 204, "header {header:?}, query {query:?}");
        assert!(r.bytes().await.unwrap().is_empty());
    }
    // Anything the client has not seen yet is still sent, and then the stream closes.
    let rest = e.task_events(&id, Some(&events[0].0)).await;
    assert_eq!(rest.len(), events.len() - 1);
    assert_eq!(rest.last().unwrap().0, *last_id);
    let again = e.task_events(&id, None).await;
    assert_eq!(again.last().unwrap().1, "succeeded");
    e.server.shutdown().await;
}

/// An agent whose model's provider accepts the request and then never sends a token: past
/// the first-token timeout, the task is answered by the agent's fallback model.
async fn a_task_whose_model_stalls_before_its_first_token_falls_back(b: Backend) {
    let stalled = mock(MockConfig {
        fault: Some(Fault::StallFirst),
        ..Default::default()
    })
    .await;
    let e = env(
        b,
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
    let (s, v) = e
        .call(
            &e.admin,
            reqwest::Method::POST,
            "/api/agents",
            Some(json!({"name": "stalling", "model": "slow-model", "fallback_models": ["mock-model"]})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = e
        .call(
            &e.user,
            reqwest::Method::POST,
            "/api/tasks?sync=true",
            Some(json!({"agent": "stalling", "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], full_reply(5));
    assert_eq!(stalled.stats().chat_requests, 1);
    e.server.shutdown().await;
}

async fn workers_bound_upstream_concurrency(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 3,
            token_delay: Duration::from_millis(5),
            ..Default::default()
        },
        |c| c.tasks.workers = 4,
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..200 {
        let (s, v) = e
            .call(
                &e.user,
                reqwest::Method::POST,
                "/api/tasks",
                Some(json!({"messages": [{"role": "user", "content": format!("n{i}")}]})),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        ids.push(v["task_id"].as_str().unwrap().to_owned());
    }
    wait_stats(&e.mock, Duration::from_secs(60), |s| {
        s.completed_streams == 200
    })
    .await;
    let stats = e.mock.stats();
    assert!(
        stats.max_active_streams <= 4,
        "{} upstream calls at once",
        stats.max_active_streams
    );
    assert_eq!(stats.chat_requests, 200);
    for id in &ids {
        let events = e.task_events(id, None).await;
        assert_eq!(events.last().unwrap().1, "succeeded");
    }
    e.server.shutdown().await;
}

async fn cancel_stops_a_running_task_and_its_upstream(b: Backend) {
    let e = env(
        b,
        MockConfig {
            fault: Some(Fault::Endless),
            token_delay: Duration::from_millis(5),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let (_, v) = e
        .call(
            &e.user,
            reqwest::Method::POST,
            "/api/tasks",
            Some(json!({"messages": [{"role": "user", "content": "forever"}]})),
        )
        .await;
    let id = v["task_id"].as_str().unwrap().to_owned();
    wait_stats(&e.mock, WAIT, |s| s.active_streams == 1).await;
    let (s, v) = e
        .call(
            &e.user,
            reqwest::Method::DELETE,
            &format!("/api/tasks/{id}"),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["cancelled"], true);
    wait_stats(&e.mock, Duration::from_secs(2), |s| s.active_streams == 0).await;
    let events = e.task_events(&id, None).await;
    assert_eq!(events.last().unwrap().1, "cancelled");
    let (_, t) = e
        .call(
            &e.user,
            reqwest::Method::GET,
            &format!("/api/tasks/{id}"),
            None,
        )
        .await;
    assert_eq!(t["status"], "cancelled");
    e.server.shutdown().await;
}

async fn knowledge_ranks_titles_first_and_reaches_the_prompt(b: Backend) {
    let e = env(
        b,
        MockConfig {
            tokens: 2,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    for (title, content) in [
        (
            "Garden care",
            "Water the tomatoes weekly. Aurora borealis photos are unrelated.",
        ),
        (
            "Aurora borealis",
            "Northern lights appear when solar wind meets the magnetosphere.",
        ),
        ("Kitchen tips", "Sharpen knives often."),
    ] {
        let (s, _) = e
            .call(
                &e.admin,
                reqwest::Method::POST,
                "/api/knowledge",
                Some(json!({"title": title, "content": content, "tags": ["t"]})),
            )
            .await;
        assert_eq!(s, 201);
    }
    let (s, _) = e
        .call(
            &e.user,
            reqwest::Method::POST,
            "/api/knowledge",
            Some(json!({"title": "x", "content": "y"})),
        )
        .await;
    assert_eq!(s, 403, "writes need an admin key");
    let (s, v) = e
        .call(
            &e.user,
            reqwest::Method::GET,
            "/api/knowledge/search?q=aurora%20borealis&limit=5",
            None,
        )
        .await;
    assert_eq!(s, 200);
    let hits = v["data"].as_array().unwrap();
    assert_eq!(hits[0]["title"], "Aurora borealis", "{v}");
    assert!(hits.len() >= 2);
    assert!(!hits[0]["snippet"].as_str().unwrap().is_empty());

    let (s, v) = e
        .call(&e.admin, reqwest::Method::POST, "/api/agents", Some(json!({"name": "scholar", "model": "mock-model", "system_prompt": "Be precise.", "knowledge": true})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = e
        .call(
            &e.user,
            reqwest::Method::POST,
            "/api/agents",
            Some(json!({"name": "nope", "model": "m"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, v) = e
        .call(&e.user, reqwest::Method::POST, "/api/tasks?sync=true", Some(json!({"agent": "scholar", "messages": [{"role": "user", "content": "tell me about the aurora borealis"}]})))
        .await;
    assert_eq!(s, 200, "{v}");
    let sent = e.mock.stats().last_request.unwrap();
    assert_eq!(sent["messages"][0]["role"], "system");
    let system = sent["messages"][0]["content"].as_str().unwrap();
    assert!(system.starts_with("Be precise."), "{system}");
    assert!(system.contains("Aurora borealis"), "{system}");
    assert!(!system.contains("Kitchen tips"), "{system}");
    e.server.shutdown().await;
}

async fn restart_completes_queued_tasks(b: Backend) {
    // One worker and an upstream too slow to finish anything before the restart.
    let slow = mock(MockConfig {
        tokens: 2,
        first_token_delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let db = common::db::fresh(b).await;
    let mut cfg = config_for(&slow);
    cfg.store = db.config.clone();
    cfg.chat.auth = AuthMode::Required;
    cfg.chat.default_model = "mock-model".into();
    cfg.tasks.workers = 1;
    cfg.server.drain = Duration::from_millis(100);
    let first = TestServer::start(cfg.clone()).await;
    let user = api_key(&first, "alice", false).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = client()
            .post(format!("{}/api/tasks", first.url))
            .bearer_auth(&user)
            .json(&json!({"messages": [{"role": "user", "content": format!("t{i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        ids.push(
            r.json::<Value>().await.unwrap()["task_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    wait_stats(&slow, WAIT, |s| s.active_streams == 1).await;
    first.shutdown().await;

    let fast = mock(MockConfig {
        tokens: 3,
        ..Default::default()
    })
    .await;
    let mut cfg2 = config_for(&fast);
    cfg2.store = db.config.clone();
    cfg2.chat.auth = AuthMode::Required;
    cfg2.chat.default_model = "mock-model".into();
    let second = TestServer::start(cfg2).await;
    for id in &ids {
        let r = client()
            .get(format!("{}/api/tasks/{id}/events", second.url))
            .bearer_auth(&user)
            .send()
            .await
            .unwrap();
        let mut s = r.bytes_stream().eventsource();
        let mut last = None;
        while let Some(ev) = tokio::time::timeout(WAIT, s.next()).await.unwrap() {
            let ev = ev.unwrap();
            if matches!(ev.event.as_str(), "succeeded" | "failed" | "cancelled") {
                last = Some(ev);
                break;
            }
        }
        let last = last.unwrap();
        assert_eq!(last.event, "succeeded", "{}", last.data);
    }
    assert_eq!(
        fast.stats().chat_requests,
        3,
        "each task ran once after the restart"
    );
    second.shutdown().await;
    drop(db);
}

/// The thinking streams as `reasoning` events while the task runs, and is kept with the
/// result: in the task, in `succeeded`, and after a restart.
async fn a_reasoning_task_keeps_its_thinking_with_the_result(b: Backend) {
    let upstream = reasoning_upstream(Duration::ZERO).await;
    let providers = vec![ProviderConfig::openai("reasoner", &upstream, None)];
    let e = env(b, MockConfig::default(), |c| {
        c.upstream.providers = providers.clone()
    })
    .await;
    let (s, v) = e
        .call(
            &e.user,
            reqwest::Method::POST,
            "/api/tasks",
            Some(json!({"messages": [{"role": "user", "content": "What is the answer?"}]})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_owned();
    let events = e.task_events(&id, None).await;
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    let thinking_at: Vec<usize> = (0..kinds.len())
        .filter(|&i| kinds[i] == "reasoning")
        .collect();
    assert_eq!(thinking_at.len(), 3, "{kinds:?}");
    assert!(
        kinds[..thinking_at[0]].contains(&"running"),
        "thinking comes while running: {kinds:?}"
    );
    let streamed: String = events
        .iter()
        .filter(|(_, k, _)| k == "reasoning")
        .map(|(_, _, d)| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, thinking());
    let (_, last_kind, last) = events.last().unwrap();
    assert_eq!(last_kind, "succeeded");
    assert_eq!(last["result"], answer());
    assert_eq!(last["reasoning"], thinking());
    let (_, t) = e
        .call(
            &e.user,
            reqwest::Method::GET,
            &format!("/api/tasks/{id}"),
            None,
        )
        .await;
    assert_eq!(
        (&t["result"], &t["reasoning"]),
        (&json!(answer()), &json!(thinking()))
    );

    // After a restart the task is known from the store only, its thinking with it.
    let Env {
        server,
        _db: db,
        user,
        ..
    } = e;
    server.shutdown().await;
    let mut cfg = base_config();
    cfg.store = db.config.clone();
    cfg.chat.auth = AuthMode::Required;
    cfg.upstream.providers = providers;
    let again = TestServer::start(cfg).await;
    let r = client()
        .get(format!("{}/api/tasks/{id}/events", again.url))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream().eventsource();
    let ev = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("stalled")
        .unwrap()
        .unwrap();
    assert_eq!(ev.event, "succeeded");
    let data: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(data, json!({"result": answer(), "reasoning": thinking()}));
    again.shutdown().await;
    drop(db);
}

/// Redis queue: a worker that took a task and died before acknowledging it — its task is
/// reclaimed by another worker and completed exactly once.
#[tokio::test]
async fn redis_queue_reclaims_a_dead_workers_task_exactly_once() {
    crate::require!(Postgres, Redis);
    use sluice::queue::TaskQueue;
    let prefix = format!("sluice-test-{}", uuid::Uuid::new_v4().simple());
    let redis_url = common::need::redis_url();
    let mock = mock(MockConfig {
        tokens: 4,
        ..Default::default()
    })
    .await;
    let db = common::db::fresh(Backend::Postgres).await;
    let mut cfg = config_for(&mock);
    cfg.store = db.config.clone();
    cfg.chat.auth = AuthMode::Required;
    cfg.chat.default_model = "mock-model".into();
    cfg.redis = Some(RedisConfig {
        url: Secret::new(redis_url.clone()),
        prefix: prefix.clone(),
    });
    cfg.tasks.reclaim_idle = Duration::from_millis(300);

    // A task queued while no instance runs, taken by a worker that then dies.
    let store = sluice::store::open(&db.config).await.unwrap();
    sluice::chat::agent::ensure_default_agent(store.as_ref(), "mock-model")
        .await
        .unwrap();
    let alice = store
        .ensure_user(&sluice::store::User::new(
            "alice",
            sluice::store::now_millis(),
        ))
        .await
        .unwrap();
    let now = sluice::store::now_millis();
    let id = sluice::store::new_id();
    store
        .create_task(&sluice::store::Task {
            id: id.clone(),
            user_id: alice.id.clone(),
            key_id: None,
            agent: "default".into(),
            scene: None,
            input: json!({"messages": [{"role": "user", "content": "x"}]}).to_string(),
            status: sluice::store::TaskStatus::Queued,
            result: None,
            reasoning: None,
            error: None,
            progress_tokens: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        })
        .await
        .unwrap();
    let queue =
        sluice::queue::redis::RedisQueue::connect(&redis_url, &prefix, Duration::from_millis(300))
            .await
            .unwrap();
    queue.push(&id).await.unwrap();
    let taken = queue
        .pop("dead-worker", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.task_id, id);
    drop(taken);

    // A live instance reclaims it once it has been idle long enough.
    let server = TestServer::start(cfg).await;
    let user = api_key(&server, "alice", false).await;
    let r = client()
        .get(format!("{}/api/tasks/{id}/events", server.url))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream().eventsource();
    let mut kinds = Vec::new();
    while let Some(ev) = tokio::time::timeout(WAIT, s.next()).await.unwrap() {
        let ev = ev.unwrap();
        let last = matches!(ev.event.as_str(), "succeeded" | "failed" | "cancelled");
        kinds.push(ev.event);
        if last {
            break;
        }
    }
    assert_eq!(
        kinds.iter().filter(|k| *k == "succeeded").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(mock.stats().chat_requests, 1, "the task ran exactly once");
    let t = store.get_task(None, &id).await.unwrap().unwrap();
    assert_eq!(t.status, sluice::store::TaskStatus::Succeeded);
    assert_eq!(t.result.as_deref(), Some(full_reply(4).as_str()));
    server.shutdown().await;
    assert_eq!(queue.depth().await.unwrap(), 0, "acknowledged and removed");
    drop(db);
}
