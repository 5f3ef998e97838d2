//! The store under faults: a PostgreSQL that hangs or refuses (through a TCP proxy the
//! test controls), and text the database would refuse.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::db::{Backend, TestDb, fresh};
use common::proxy::Proxy;
use common::{TestServer, api_key, client, config_for, mock};
use serde_json::{Value, json};
use sluice::config::{AuthMode, Secret};
use sluice::domain::Role;
use sluice::store::{
    Agent, ApiKey, KnowledgeDoc, MessageStatus, MessageUpdate, Session, Store, StoreError,
    StoredMessage, Task, TaskStatus, UsageRecord, User, new_id, now_millis,
};
use sluice_mock::MockConfig;

crate::backend_tests!(
    nul_in_any_stored_text_becomes_the_replacement_character,
    client_text_with_nul_is_refused_naming_the_field,
);

/// A PostgreSQL store of a fresh schema, reached through a proxy the test controls.
async fn pg_behind_proxy(
    tune: impl FnOnce(&mut sluice::config::StoreConfig),
) -> (TestDb, Proxy, Arc<dyn Store>) {
    let db = fresh(Backend::Postgres).await;
    let target: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(target).await;
    let mut config = db.config.clone();
    let url = db
        .database_url()
        .unwrap()
        .replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(
        url,
        db.database_url().unwrap(),
        "the test server URL names 127.0.0.1:5432"
    );
    config.database_url = Some(Secret::new(url));
    tune(&mut config);
    let store = sluice::store::open(&config).await.unwrap();
    (db, proxy, store)
}

/// Polls `ping` until it succeeds; the time it took.
async fn recovers_within(store: &dyn Store, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(Ok(())) = tokio::time::timeout(limit, store.ping()).await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "the store did not recover within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_does_not_wedge_the_pool() {
    crate::require!(Postgres);
    let (_db, mut proxy, store) = pg_behind_proxy(|c| {
        c.pool_size = 3;
        c.acquire_timeout = Duration::from_millis(700);
        c.query_timeout = Duration::from_millis(700);
        c.breaker_open = Duration::from_millis(300);
    })
    .await;
    // A few open connections, each then hung mid-use.
    let pings: Vec<_> = (0..3).map(|_| store.ping()).collect();
    for r in futures::future::join_all(pings).await {
        r.unwrap();
    }
    proxy.blackhole();
    // Hung queries, hung handshakes and hung connects: every call still ends, in time.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            async move {
                let start = Instant::now();
                let r = if i % 2 == 0 {
                    store.ping().await
                } else {
                    store.list_agents().await.map(|_| ())
                };
                (r, start.elapsed())
            }
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(calls))
        .await
        .expect("calls to a hung database must time out");
    for (r, took) in results {
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(took < Duration::from_secs(3), "a call took {took:?}");
    }
    // The database answers again: the hung connections are dropped and new ones made.
    proxy.resume().await;
    let took = recovers_within(store.as_ref(), Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    for _ in 0..10 {
        store.ping().await.unwrap();
    }
    let pool = store.pool_state().unwrap();
    assert!(pool.open <= 3, "{pool:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_database_fails_fast_and_recovers_by_itself() {
    crate::require!(Postgres);
    let (_db, mut proxy, store) = pg_behind_proxy(|c| {
        c.pool_size = 2;
        c.acquire_timeout = Duration::from_secs(3);
        c.breaker_open = Duration::from_millis(500);
    })
    .await;
    store.ping().await.unwrap();
    proxy.stop();
    // The first calls find out; they need not wait the whole acquire timeout either.
    let start = Instant::now();
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // Known down: every call fails in milliseconds.
    for _ in 0..20 {
        let start = Instant::now();
        let err = store.list_agents().await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "failing took {:?}",
            start.elapsed()
        );
    }
    // Back: a trial after the open period finds it, with no restart.
    proxy.resume().await;
    let took = recovers_within(store.as_ref(), Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(4), "{took:?}");
    store.list_agents().await.unwrap();
}

const NUL_TEXT: &str = "a\0b";
const CLEANED: &str = "a\u{FFFD}b";

/// Text with NUL never fails a write, on either backend, and reads back the same on both:
/// each NUL as U+FFFD.
async fn nul_in_any_stored_text_becomes_the_replacement_character(backend: Backend) {
    let db = fresh(backend).await;
    let store = sluice::store::open(&db.config).await.unwrap();
    let user = store
        .ensure_user(&User::new(NUL_TEXT, now_millis()))
        .await
        .unwrap();
    assert_eq!(user.name, CLEANED);
    let key = ApiKey::new(&user.id, NUL_TEXT, "sk-x", false, now_millis());
    store.create_api_key(&key, &[7; 32]).await.unwrap();
    assert_eq!(store.list_api_keys().await.unwrap()[0].name, CLEANED);
    assert_eq!(
        store.revoke_api_key(NUL_TEXT, now_millis()).await.unwrap(),
        1,
        "{key:?}"
    );

    let session = Session::new(&user.id, None, Some(NUL_TEXT), now_millis());
    store.create_session(&session).await.unwrap();
    let got = store
        .get_session(&user.id, &session.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.title.as_deref(), Some(CLEANED));
    let renamed = store
        .update_session_title(&user.id, &session.id, Some("r\0"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renamed.title.as_deref(), Some("r\u{FFFD}"));
    assert!(
        store
            .get_session(&user.id, "no\0such")
            .await
            .unwrap()
            .is_none()
    );

    let now = now_millis();
    let m = StoredMessage {
        id: new_id(),
        session_id: session.id.clone(),
        role: Role::Assistant,
        content: NUL_TEXT.into(),
        reasoning: Some(NUL_TEXT.into()),
        status: MessageStatus::Streaming,
        generation_id: Some(new_id()),
        model: Some(NUL_TEXT.into()),
        prompt_tokens: None,
        completion_tokens: None,
        error: None,
        created_at: now,
        updated_at: now,
    };
    store.insert_message(&m).await.unwrap();
    let stored = &store.list_messages(&session.id).await.unwrap()[0];
    assert_eq!(stored.content, CLEANED);
    assert_eq!(stored.reasoning.as_deref(), Some(CLEANED));
    // A provider's reply is the usual source: it cannot be refused, only stored.
    store
        .update_message(
            &m.id,
            &MessageUpdate {
                content: "reply\0".into(),
                reasoning: Some("think\0".into()),
                status: MessageStatus::Failed,
                prompt_tokens: Some(1),
                completion_tokens: Some(2),
                error: Some("err\0".into()),
            },
            now_millis(),
        )
        .await
        .unwrap();
    let stored = &store.list_messages(&session.id).await.unwrap()[0];
    assert_eq!(stored.content, "reply\u{FFFD}");
    assert_eq!(stored.reasoning.as_deref(), Some("think\u{FFFD}"));
    assert_eq!(stored.error.as_deref(), Some("err\u{FFFD}"));

    store
        .record_usage(&UsageRecord {
            id: new_id(),
            user_id: user.id.clone(),
            key_id: None,
            session_id: Some(session.id.clone()),
            provider: NUL_TEXT.into(),
            model: NUL_TEXT.into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            reasoning_tokens: 0,
            created_at: now,
        })
        .await
        .unwrap();

    let agent = Agent {
        id: new_id(),
        name: NUL_TEXT.into(),
        provider: None,
        model: NUL_TEXT.into(),
        system_prompt: Some(NUL_TEXT.into()),
        temperature: None,
        max_tokens: None,
        fallback_models: vec![NUL_TEXT.into()],
        knowledge: false,
        is_active: true,
        created_at: now,
        updated_at: now,
    };
    store.create_agent(&agent).await.unwrap();
    let a = store.get_agent(NUL_TEXT).await.unwrap().unwrap();
    assert_eq!(a.name, CLEANED);
    assert_eq!(a.system_prompt.as_deref(), Some(CLEANED));
    assert_eq!(a.fallback_models, vec![CLEANED.to_owned()]);

    store
        .add_knowledge(&KnowledgeDoc {
            id: new_id(),
            title: NUL_TEXT.into(),
            content: "body\0 text".into(),
            tags: vec![NUL_TEXT.into()],
            created_at: now,
        })
        .await
        .unwrap();
    store.search_knowledge("body\0", 5).await.unwrap();

    let task = Task {
        id: new_id(),
        user_id: user.id.clone(),
        key_id: None,
        agent: NUL_TEXT.into(),
        scene: None,
        input: "{\"messages\":[]}\0".into(),
        status: TaskStatus::Queued,
        result: None,
        reasoning: None,
        error: None,
        progress_tokens: 0,
        created_at: now,
        started_at: None,
        finished_at: None,
    };
    store.create_task(&task).await.unwrap();
    store.claim_task(&task.id, now).await.unwrap().unwrap();
    assert!(
        store
            .finish_task(
                &task.id,
                TaskStatus::Succeeded,
                Some(NUL_TEXT),
                Some(NUL_TEXT),
                None,
                now
            )
            .await
            .unwrap()
    );
    let t = store.get_task(None, &task.id).await.unwrap().unwrap();
    assert_eq!(t.result.as_deref(), Some(CLEANED));
    assert_eq!(t.reasoning.as_deref(), Some(CLEANED));
    assert_eq!(t.agent, CLEANED);
}

/// Text a client sends with NUL is refused with a 422 that names the field, on every path
/// that stores it, on both backends alike.
async fn client_text_with_nul_is_refused_naming_the_field(backend: Backend) {
    let db = fresh(backend).await;
    let m = mock(MockConfig::default()).await;
    let mut cfg = config_for(&m);
    cfg.store = db.config.clone();
    cfg.chat.auth = AuthMode::Required;
    cfg.chat.default_model = "mock-model".into();
    let server = TestServer::start(cfg).await;
    let key = api_key(&server, "admin", true).await;
    let send = |method: reqwest::Method, path: &str, body: Value| {
        client()
            .request(method, format!("{}{path}", server.url))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let refused = |r: reqwest::Response, field: &'static str| async move {
        assert_eq!(r.status(), 422, "{field}");
        let v: Value = r.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.starts_with(&format!("{field}: ")), "{field}: {v}");
        assert!(msg.contains("NUL"), "{v}");
    };
    use reqwest::Method;
    refused(
        send(Method::POST, "/api/sessions", json!({"title": "a\0b"}))
            .await
            .unwrap(),
        "title",
    )
    .await;
    let r = send(Method::POST, "/api/sessions", json!({"title": "ok"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    refused(
        send(
            Method::PATCH,
            &format!("/api/sessions/{id}"),
            json!({"title": "\0"}),
        )
        .await
        .unwrap(),
        "title",
    )
    .await;
    refused(
        send(
            Method::POST,
            &format!("/api/sessions/{id}/messages"),
            json!({"content": "hi\0"}),
        )
        .await
        .unwrap(),
        "content",
    )
    .await;
    refused(
        send(
            Method::POST,
            "/api/tasks",
            json!({"messages": [{"role": "user", "content": "x\0"}]}),
        )
        .await
        .unwrap(),
        "messages[0].content",
    )
    .await;
    refused(
        send(
            Method::POST,
            "/api/agents",
            json!({"name": "n", "model": "mock-model", "system_prompt": "p\0"}),
        )
        .await
        .unwrap(),
        "system_prompt",
    )
    .await;
    // A literal backslash-u in text is not a NUL, and is stored as sent.
    let r = send(
        Method::PATCH,
        &format!("/api/sessions/{id}"),
        json!({"title": "\\u0000"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["title"], "\\u0000");
    // Nothing with a NUL got in, and nothing failed with a 500.
    let r = client()
        .get(format!("{}/api/sessions/{id}/messages", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // `/v1` stores no text: the request goes to the provider as the client wrote it.
    let r = send(
        Method::POST,
        "/v1/chat/completions",
        json!({"model": "mock-model", "messages": [{"role": "user", "content": "a\0b"}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let sent: Value = serde_json::from_slice(&m.last_request_body().unwrap()).unwrap();
    assert_eq!(sent["messages"][0]["content"], "a\0b");
    server.shutdown().await;
}

const REPLY_TOKENS: usize = 30;

/// A server on PostgreSQL behind `proxy`, its mock upstream streaming a reply of
/// `REPLY_TOKENS` over about 1.5 s, and a data dir that outlives it.
async fn chat_server(
    db: &TestDb,
    proxy: &Proxy,
    data_dir: &std::path::Path,
) -> (TestServer, String) {
    let m = mock(MockConfig {
        tokens: REPLY_TOKENS,
        token_delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let mut cfg = config_for(&m);
    cfg.store = db.config.clone();
    cfg.store.database_url = Some(Secret::new(
        db.database_url()
            .unwrap()
            .replace("127.0.0.1:5432", &proxy.addr.to_string()),
    ));
    cfg.store.data_dir = data_dir.to_owned();
    cfg.store.acquire_timeout = Duration::from_millis(500);
    cfg.store.breaker_open = Duration::from_millis(300);
    cfg.server.drain = Duration::from_millis(300);
    cfg.chat.auth = AuthMode::Required;
    cfg.chat.default_model = "mock-model".into();
    let server = TestServer::start(cfg).await;
    // The mock lives as long as the process; the server holds its URL only.
    std::mem::forget(m);
    let key = api_key(&server, "alice", false).await;
    (server, key)
}

/// Starts a reply, cuts the database off after its first tokens, and reads the reply to
/// its end; the assistant message id.
async fn reply_while_the_database_goes_away(
    server: &TestServer,
    key: &str,
    proxy: &mut Proxy,
) -> (String, String) {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    let r = client()
        .post(format!("{}/api/sessions", server.url))
        .bearer_auth(key)
        .json(&json!({"title": "t"}))
        .send()
        .await
        .unwrap();
    let session = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = client()
        .post(format!("{}/api/sessions/{session}/messages", server.url))
        .bearer_auth(key)
        .header("accept", "text/event-stream")
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut events = r.bytes_stream().eventsource();
    let mut message_id = None;
    let mut tokens = 0;
    let mut ending = None;
    while let Some(ev) = tokio::time::timeout(common::WAIT, events.next())
        .await
        .unwrap()
    {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap_or_default();
        match ev.event.as_str() {
            "start" => message_id = data["message_id"].as_str().map(str::to_owned),
            "token" => {
                tokens += 1;
                if tokens == 3 {
                    proxy.stop();
                }
            }
            "done" | "error" | "interrupted" => {
                ending = Some(ev.event.clone());
                break;
            }
            _ => {}
        }
    }
    assert_eq!(ending.as_deref(), Some("done"));
    assert_eq!(tokens, REPLY_TOKENS);
    (session, message_id.unwrap())
}

/// Polls the store (directly, not through the proxy) until the message is final.
async fn stored_reply(db: &TestDb, session: &str, limit: Duration) -> sluice::store::StoredMessage {
    let store = sluice::store::open(&db.config).await.unwrap();
    let start = Instant::now();
    loop {
        let msgs = store.list_messages(session).await.unwrap();
        if let Some(m) = msgs.iter().find(|m| m.role == Role::Assistant)
            && m.status != MessageStatus::Streaming
            && m.status != MessageStatus::Interrupted
        {
            return m.clone();
        }
        assert!(
            start.elapsed() < limit,
            "the reply was not stored in {limit:?}: {msgs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_ends_while_the_database_is_away_is_stored_when_it_is_back() {
    crate::require!(Postgres);
    let db = fresh(Backend::Postgres).await;
    let mut proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let data = tempfile::tempdir().unwrap();
    let (server, key) = chat_server(&db, &proxy, data.path()).await;
    let (session, message_id) = reply_while_the_database_goes_away(&server, &key, &mut proxy).await;
    proxy.resume().await;
    let m = stored_reply(&db, &session, Duration::from_secs(8)).await;
    assert_eq!(m.id, message_id);
    assert_eq!(m.status, MessageStatus::Complete);
    assert_eq!(m.content, sluice_mock::full_reply(REPLY_TOKENS));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_not_stored_before_shutdown_is_stored_by_the_next_start() {
    crate::require!(Postgres);
    let db = fresh(Backend::Postgres).await;
    let mut proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let data = tempfile::tempdir().unwrap();
    let (server, key) = chat_server(&db, &proxy, data.path()).await;
    let (session, message_id) = reply_while_the_database_goes_away(&server, &key, &mut proxy).await;
    // The process stops while the database is still away.
    server.shutdown().await;
    proxy.resume().await;
    let (server, _) = chat_server(&db, &proxy, data.path()).await;
    let m = stored_reply(&db, &session, Duration::from_secs(2)).await;
    assert_eq!(m.id, message_id);
    assert_eq!(m.status, MessageStatus::Complete);
    assert_eq!(m.content, sluice_mock::full_reply(REPLY_TOKENS));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_while_the_database_is_away_keeps_its_result() {
    crate::require!(Postgres);
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    let db = fresh(Backend::Postgres).await;
    let mut proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let data = tempfile::tempdir().unwrap();
    let (server, key) = chat_server(&db, &proxy, data.path()).await;
    let r = client()
        .post(format!("{}/api/tasks", server.url))
        .bearer_auth(&key)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = client()
        .get(format!("{}/api/tasks/{id}/events", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut events = r.bytes_stream().eventsource();
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(common::WAIT, events.next())
        .await
        .expect("the task's events stalled")
    {
        let ev = ev.unwrap();
        match ev.event.as_str() {
            // Part-way through the reply: the database goes away until it has ended.
            "progress" => proxy.stop(),
            "succeeded" | "failed" | "cancelled" => {
                last = Some(ev.event);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(last.as_deref(), Some("succeeded"));
    proxy.resume().await;
    let store = sluice::store::open(&db.config).await.unwrap();
    let start = Instant::now();
    let task = loop {
        let t = store.get_task(None, &id).await.unwrap().unwrap();
        if t.status.is_final() {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(8), "{t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(task.status, TaskStatus::Succeeded);
    assert_eq!(
        task.result.as_deref(),
        Some(sluice_mock::full_reply(REPLY_TOKENS).as_str())
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_their_503_in_milliseconds_while_the_database_is_down() {
    crate::require!(Postgres);
    let db = fresh(Backend::Postgres).await;
    let mut proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let data = tempfile::tempdir().unwrap();
    let (server, key) = chat_server(&db, &proxy, data.path()).await;
    let list = || {
        client()
            .get(format!("{}/api/sessions", server.url))
            .bearer_auth(&key)
            .send()
    };
    assert_eq!(list().await.unwrap().status(), 200);
    proxy.stop();
    // The first request finds the database down.
    assert_eq!(list().await.unwrap().status(), 503);
    for _ in 0..10 {
        let start = Instant::now();
        let r = list().await.unwrap();
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
        assert!(
            start.elapsed() < Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
    }
    proxy.resume().await;
    let start = Instant::now();
    while list().await.unwrap().status() != 200 {
        assert!(start.elapsed() < Duration::from_secs(5), "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}
