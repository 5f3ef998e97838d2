//! The store contract, run against every backend (`sqlite::*`, `postgres::*` and
//! `pgbouncer::*`, PostgreSQL through PgBouncer in transaction mode), and the `migrate` /
//! `keys` commands through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashSet;
use std::process::Output;
use std::sync::Arc;

use common::db::{Backend, TestDb, fresh};
use sluice::domain::Role;
use sluice::store::cli::{generate_key, hash_key};
use sluice::store::postgres::PgStore;
use sluice::store::sqlite::SqliteStore;
use sluice::store::{
    Agent, ApiKey, KnowledgeDoc, MessageStatus, MessageUpdate, Scene, Session, SessionCursor,
    Store, StoreError, StoredMessage, StoredResponse, Task, TaskStatus, UsageRecord, User, new_id,
    now_millis,
};

crate::backend_tests!(
    migrations_apply_on_an_empty_database_and_are_idempotent,
    a_database_of_the_first_schema_keeps_its_rows_through_the_reasoning_columns,
    concurrent_first_starts_migrate_once,
    ping_and_backend_name,
    users_are_ensured_once,
    keys_are_found_by_hash_listed_and_revoked,
    a_duplicate_key_hash_is_a_conflict,
    a_conflict_keeps_the_database_error_as_its_source,
    sessions_crud_is_scoped_to_the_owner,
    sessions_page_newest_first_with_a_cursor,
    messages_round_trip_in_order_and_update,
    deleting_a_session_deletes_its_messages,
    interrupt_streaming_marks_only_streaming_messages,
    usage_is_recorded,
    knowledge_full_text_search_follows_writes,
    concurrent_writes_and_reads_all_succeed,
    agents_crud_with_unique_names_and_json_fallbacks,
    scenes_crud_with_unique_names,
    knowledge_search_ranks_titles_first_and_takes_any_text,
    tasks_are_scoped_claimed_and_finished_once,
    a_task_finishes_once_under_racing_workers,
    cancel_moves_only_the_owners_unfinished_tasks,
    queued_tasks_keep_their_creation_order,
    keys_cli_prints_a_key_once_and_revokes,
    migrate_cli_is_idempotent,
    a_session_runs_one_generation_until_released_or_expired,
    a_session_is_free_once_its_generations_reply_has_ended,
    racing_claims_of_a_session_let_exactly_one_through,
    start_up_interrupts_only_replies_no_other_instance_holds,
    responses_are_scoped_settled_once_and_failed_at_restart,
);

/// A key made as `sluice keys create` makes it.
async fn new_key(
    store: &dyn Store,
    user_id: &str,
    name: &str,
    key_hash: &[u8; 32],
    prefix: &str,
    admin: bool,
) -> Result<ApiKey, StoreError> {
    let key = ApiKey::new(user_id, name, prefix, admin, now_millis());
    store.create_api_key(&key, key_hash).await.map(|()| key)
}

/// A session made as the chat service makes it.
/// A user's id, made (or found) by name.
async fn user(store: &dyn Store, name: &str) -> String {
    store
        .ensure_user(&User::new(name, now_millis()))
        .await
        .unwrap()
        .id
}

/// A new session of the user `name`; its id.
async fn session_of(store: &dyn Store, name: &str) -> String {
    let owner = user(store, name).await;
    new_session(store, &owner, None, None).await.id
}

async fn new_session(
    store: &dyn Store,
    user_id: &str,
    agent: Option<&str>,
    title: Option<&str>,
) -> Session {
    let s = Session::new(user_id, agent, title, now_millis());
    store.create_session(&s).await.unwrap();
    s
}

async fn open(db: &TestDb) -> Arc<dyn Store> {
    sluice::store::open(&db.config).await.unwrap()
}

/// Migrations this open applied, through the concrete backend.
async fn open_and_report(db: &TestDb) -> Vec<String> {
    match db.backend {
        Backend::Sqlite => SqliteStore::open(&db.config)
            .await
            .unwrap()
            .applied_migrations()
            .to_vec(),
        Backend::Postgres | Backend::PgBouncer => {
            PgStore::connect(db.database_url().unwrap(), &db.config)
                .await
                .unwrap()
                .applied_migrations()
                .to_vec()
        }
    }
}

/// Names of the tables and indexes in the test's database (its schema, for PostgreSQL).
async fn schema_objects(db: &TestDb) -> HashSet<String> {
    match db.backend {
        Backend::Sqlite => {
            let c = sqlite_conn(db);
            let mut stmt = c
                .prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")
                .unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
        Backend::Postgres | Backend::PgBouncer => {
            let c = db.pg_client().await;
            c.query(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()
                 UNION ALL
                 SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
        }
    }
}

fn sqlite_conn(db: &TestDb) -> rusqlite::Connection {
    let path = db.config.data_dir.join(sluice::store::sqlite::DB_FILE);
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    c
}

async fn migrations_apply_on_an_empty_database_and_are_idempotent(backend: Backend) {
    let db = fresh(backend).await;
    assert_eq!(
        open_and_report(&db).await,
        [
            "V1__init",
            "V2__reasoning",
            "V3__running_generation",
            "V4__responses"
        ]
    );
    let objects = schema_objects(&db).await;
    for name in [
        "refinery_schema_history",
        "users",
        "api_keys",
        "sessions",
        "messages",
        "usage_records",
        "agents",
        "scenes",
        "tasks",
        "knowledge_docs",
        "sessions_user_updated",
        "messages_session_created",
        "agents_provider_active",
        "usage_records_user_created",
        "usage_records_key_created",
        "tasks_user_created",
        "tasks_status_created",
        "responses",
        "responses_unfinished",
    ] {
        assert!(objects.contains(name), "{name} missing from {objects:?}");
    }
    match backend {
        Backend::Sqlite => assert!(objects.contains("knowledge_fts")),
        Backend::Postgres | Backend::PgBouncer => {
            assert!(objects.contains("knowledge_docs_search"))
        }
    }

    // Data written before a restart is there after it, and nothing is applied twice.
    let alice = open(&db)
        .await
        .ensure_user(&User::new("alice", now_millis()))
        .await
        .unwrap();
    assert!(open_and_report(&db).await.is_empty());
    let again = open(&db)
        .await
        .ensure_user(&User::new("alice", now_millis()))
        .await
        .unwrap();
    assert_eq!(alice, again);
}

/// The migrations as shipped, to put a database at an earlier version.
mod shipped {
    pub mod sqlite {
        refinery::embed_migrations!("migrations/sqlite");
    }
    pub mod postgres {
        refinery::embed_migrations!("migrations/postgres");
    }
}

/// Rows written before reasoning was stored read back with none, and take it afterwards.
async fn a_database_of_the_first_schema_keeps_its_rows_through_the_reasoning_columns(
    backend: Backend,
) {
    let db = fresh(backend).await;
    let v1 = refinery::Target::Version(1);
    let rows = "INSERT INTO users (id, name, created_at) VALUES ('u1', 'alice', 1);
        INSERT INTO sessions (id, user_id, title, created_at, updated_at)
            VALUES ('s1', 'u1', 't', 1, 1);
        INSERT INTO messages (id, session_id, role, content, status, created_at, updated_at)
            VALUES ('m1', 's1', 'assistant', 'old reply', 'complete', 2, 2);
        INSERT INTO usage_records (id, user_id, provider, model, prompt_tokens,
                completion_tokens, created_at)
            VALUES ('r1', 'u1', 'p', 'm', 3, 4, 5);
        INSERT INTO tasks (id, user_id, agent, input, status, result, created_at)
            VALUES ('t1', 'u1', 'default', '{}', 'succeeded', 'old result', 6);";
    match backend {
        Backend::Sqlite => {
            std::fs::create_dir_all(&db.config.data_dir).unwrap();
            let mut c = sqlite_conn(&db);
            shipped::sqlite::migrations::runner()
                .set_target(v1)
                .run(&mut c)
                .unwrap();
            c.execute_batch(rows).unwrap();
        }
        Backend::Postgres | Backend::PgBouncer => {
            let mut c = db.pg_client().await;
            shipped::postgres::migrations::runner()
                .set_target(v1)
                .run_async(&mut c)
                .await
                .unwrap();
            c.batch_execute(rows).await.unwrap();
        }
    }
    assert_eq!(
        open_and_report(&db).await,
        ["V2__reasoning", "V3__running_generation", "V4__responses"]
    );
    let store = open(&db).await;
    let m = store.list_messages("s1").await.unwrap().pop().unwrap();
    assert_eq!((m.content.as_str(), m.reasoning), ("old reply", None));
    let usage = store.usage_summary(0, 10).await.unwrap();
    assert_eq!(
        (usage[0].completion_tokens, usage[0].reasoning_tokens),
        (4, 0)
    );
    let t = store.get_task(None, "t1").await.unwrap().unwrap();
    assert_eq!(
        (t.result.as_deref(), t.reasoning),
        (Some("old result"), None)
    );
    let update = MessageUpdate {
        content: "new reply".into(),
        reasoning: Some("new thoughts".into()),
        status: MessageStatus::Complete,
        prompt_tokens: None,
        completion_tokens: None,
        error: None,
    };
    store
        .update_message("m1", &update, now_millis())
        .await
        .unwrap();
    let m = store.list_messages("s1").await.unwrap().pop().unwrap();
    assert_eq!(m.reasoning.as_deref(), Some("new thoughts"));
}

async fn concurrent_first_starts_migrate_once(backend: Backend) {
    let db = fresh(backend).await;
    let opens = (0..16).map(|_| sluice::store::open(&db.config));
    for store in futures::future::join_all(opens).await {
        store.unwrap().ping().await.unwrap();
    }
    assert!(open_and_report(&db).await.is_empty());
}

async fn ping_and_backend_name(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    store.ping().await.unwrap();
    let expected = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres | Backend::PgBouncer => "postgres",
    };
    assert_eq!(store.backend(), expected);
}

async fn users_are_ensured_once(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let a = store
        .ensure_user(&User::new("alice", now_millis()))
        .await
        .unwrap();
    let b = store
        .ensure_user(&User::new("bob", now_millis()))
        .await
        .unwrap();
    assert_eq!(a.name, "alice");
    assert_ne!(a.id, b.id);
    assert_eq!(
        store
            .ensure_user(&User::new("alice", now_millis()))
            .await
            .unwrap(),
        a
    );
    // Racing first requests of one user, each with its own new record, end with one user.
    let carols: Vec<User> = (0..8).map(|_| User::new("carol", now_millis())).collect();
    let racers = carols.iter().map(|c| store.ensure_user(c));
    let ids: HashSet<String> = futures::future::join_all(racers)
        .await
        .into_iter()
        .map(|u| u.unwrap().id)
        .collect();
    assert_eq!(ids.len(), 1);
}

async fn keys_are_found_by_hash_listed_and_revoked(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = store
        .ensure_user(&User::new("alice", now_millis()))
        .await
        .unwrap();
    let bob = store
        .ensure_user(&User::new("bob", now_millis()))
        .await
        .unwrap();
    let (ka, kb) = (generate_key(), generate_key());
    let a = new_key(
        &*store,
        &alice.id,
        "alice",
        &hash_key(&ka),
        &ka[..14],
        false,
    )
    .await
    .unwrap();
    let b = new_key(&*store, &bob.id, "bob", &hash_key(&kb), &kb[..14], true)
        .await
        .unwrap();
    assert_eq!(
        (a.user_id.as_str(), a.is_admin, a.revoked_at),
        (alice.id.as_str(), false, None)
    );
    assert_eq!(
        store.find_api_key(&hash_key(&ka)).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        store.find_api_key(&hash_key(&kb)).await.unwrap(),
        Some(b.clone())
    );
    assert_eq!(
        store
            .find_api_key(&hash_key("sk-sluice-nope"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.list_api_keys().await.unwrap(), [a.clone(), b.clone()]);

    // By name, then by id; revoking what is already revoked counts nothing.
    assert_eq!(
        store.revoke_api_key("alice", now_millis()).await.unwrap(),
        1
    );
    assert_eq!(store.find_api_key(&hash_key(&ka)).await.unwrap(), None);
    assert_eq!(
        store.revoke_api_key("alice", now_millis()).await.unwrap(),
        0
    );
    assert_eq!(store.revoke_api_key(&b.id, now_millis()).await.unwrap(), 1);
    assert_eq!(store.find_api_key(&hash_key(&kb)).await.unwrap(), None);
    assert_eq!(
        store.revoke_api_key("nobody", now_millis()).await.unwrap(),
        0
    );
    let listed = store.list_api_keys().await.unwrap();
    assert_eq!(listed.len(), 2, "revoked keys are still listed");
    assert!(listed.iter().all(|k| k.revoked_at.is_some()));

    // Several keys may share a name; revoking the name revokes every active one.
    let (k1, k2) = (generate_key(), generate_key());
    for k in [&k1, &k2] {
        new_key(&*store, &alice.id, "alice", &hash_key(k), &k[..14], false)
            .await
            .unwrap();
    }
    assert_eq!(
        store.revoke_api_key("alice", now_millis()).await.unwrap(),
        2
    );

    let err = new_key(
        &*store,
        "no-such-user",
        "x",
        &hash_key(&generate_key()),
        "sk-sluice-xxxx",
        false,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

async fn a_duplicate_key_hash_is_a_conflict(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let user = store
        .ensure_user(&User::new("alice", now_millis()))
        .await
        .unwrap();
    let hash = hash_key(&generate_key());
    new_key(&*store, &user.id, "one", &hash, "sk-sluice-aaaa", false)
        .await
        .unwrap();
    let err = new_key(&*store, &user.id, "two", &hash, "sk-sluice-aaaa", false)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.list_api_keys().await.unwrap().len(), 1);
}

async fn a_conflict_keeps_the_database_error_as_its_source(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let user = store
        .ensure_user(&User::new("alice", now_millis()))
        .await
        .unwrap();
    let hash = hash_key(&generate_key());
    new_key(&*store, &user.id, "one", &hash, "sk-sluice-aaaa", false)
        .await
        .unwrap();
    let err = new_key(&*store, &user.id, "two", &hash, "sk-sluice-aaaa", false)
        .await
        .unwrap_err();
    // The message is unchanged; the driver's error is kept behind it.
    assert!(err.to_string().starts_with("conflict: "), "{err}");
    let source = std::error::Error::source(&err).expect("a source");
    assert!(
        source.is::<rusqlite::Error>() || source.is::<tokio_postgres::Error>(),
        "{source:?}"
    );
}

async fn sessions_crud_is_scoped_to_the_owner(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let bob = user(&*store, "bob").await;

    let s = new_session(&*store, &alice, Some("helper"), Some("first chat")).await;
    assert_eq!(
        (s.agent.as_deref(), s.title.as_deref()),
        (Some("helper"), Some("first chat"))
    );
    assert_eq!(s.created_at, s.updated_at);
    assert_eq!(
        store.get_session(&alice, &s.id).await.unwrap(),
        Some(s.clone())
    );
    let bare = new_session(&*store, &alice, None, None).await;
    assert_eq!((&bare.agent, &bare.title), (&None, &None));

    // Bob sees, renames and deletes nothing of Alice's.
    assert_eq!(store.get_session(&bob, &s.id).await.unwrap(), None);
    assert!(
        store
            .list_sessions(&bob, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .update_session_title(&bob, &s.id, Some("mine"))
            .await
            .unwrap(),
        None
    );
    assert!(!store.delete_session(&bob, &s.id).await.unwrap());
    assert_eq!(
        store.get_session(&alice, &s.id).await.unwrap(),
        Some(s.clone())
    );

    let renamed = store
        .update_session_title(&alice, &s.id, Some("renamed"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renamed.title.as_deref(), Some("renamed"));
    assert_eq!(
        store.get_session(&alice, &s.id).await.unwrap(),
        Some(renamed)
    );
    let untitled = store
        .update_session_title(&alice, &s.id, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(untitled.title, None);
    assert_eq!(
        store
            .update_session_title(&alice, "nope", Some("x"))
            .await
            .unwrap(),
        None
    );

    assert!(store.delete_session(&alice, &s.id).await.unwrap());
    assert_eq!(store.get_session(&alice, &s.id).await.unwrap(), None);
    assert!(!store.delete_session(&alice, &s.id).await.unwrap());
    let left = store.list_sessions(&alice, None, 10).await.unwrap();
    assert_eq!(left, [bare]);
}

fn message(session_id: &str, role: Role, content: &str, at: i64) -> StoredMessage {
    StoredMessage {
        id: new_id(),
        session_id: session_id.to_owned(),
        role,
        content: content.to_owned(),
        reasoning: None,
        status: MessageStatus::Complete,
        generation_id: None,
        model: None,
        prompt_tokens: None,
        completion_tokens: None,
        error: None,
        created_at: at,
        updated_at: at,
    }
}

async fn sessions_page_newest_first_with_a_cursor(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let bob = user(&*store, "bob").await;
    let mut ids = Vec::new();
    for _ in 0..25 {
        ids.push(new_session(&*store, &alice, None, None).await.id);
    }
    for _ in 0..3 {
        new_session(&*store, &bob, None, None).await;
    }
    // Activity reorders: a message moves its session up. Many sessions share a
    // millisecond, so the id tie-break is exercised too.
    let later = now_millis() + 60_000;
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 4 == 0) {
        let m = message(id, Role::User, "hi", later + i as i64 % 3);
        store.insert_message(&m).await.unwrap();
    }

    let mut pages = Vec::new();
    let mut after: Option<SessionCursor> = None;
    loop {
        let page = store
            .list_sessions(&alice, after.as_ref(), 10)
            .await
            .unwrap();
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        after = Some(SessionCursor {
            updated_at: last.updated_at,
            id: last.id.clone(),
        });
        pages.push(page);
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    let listed: Vec<_> = pages.into_iter().flatten().collect();
    assert!(listed.iter().all(|s| s.user_id == alice));
    let seen: HashSet<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(seen.len(), 25, "every session exactly once");
    assert_eq!(seen, ids.iter().map(String::as_str).collect());
    for pair in listed.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            (a.updated_at, &a.id) > (b.updated_at, &b.id),
            "not newest first: {a:?} before {b:?}"
        );
    }
    assert!(
        listed[..7].iter().all(|s| s.updated_at >= later),
        "touched sessions come first"
    );
    assert!(
        store
            .list_sessions(&alice, None, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn messages_round_trip_in_order_and_update(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let s = new_session(&*store, &alice, None, None).await;
    let t = s.created_at + 10;

    let system = message(&s.id, Role::System, "be brief", t);
    let user = message(
        &s.id,
        Role::User,
        "line one\nline two\r\ndata: not an event ✓ 日本語",
        t + 1,
    );
    let assistant = StoredMessage {
        status: MessageStatus::Streaming,
        generation_id: Some(new_id()),
        model: Some("demo".into()),
        ..message(&s.id, Role::Assistant, "", t + 2)
    };
    // Inserted out of order: the list is ordered by time, not by insertion.
    for m in [&user, &assistant, &system] {
        store.insert_message(m).await.unwrap();
    }
    let listed = store.list_messages(&s.id).await.unwrap();
    assert_eq!(listed, [system.clone(), user.clone(), assistant.clone()]);
    let session = store.get_session(&alice, &s.id).await.unwrap().unwrap();
    assert_eq!(
        session.updated_at, t,
        "the session's time is the last inserted message's"
    );

    let done = MessageUpdate {
        content: "Hello there".into(),
        reasoning: Some("They greeted me; greet back.\n✓".into()),
        status: MessageStatus::Complete,
        prompt_tokens: Some(12),
        completion_tokens: Some(3),
        error: None,
    };
    store
        .update_message(&assistant.id, &done, now_millis())
        .await
        .unwrap();
    let got = store.list_messages(&s.id).await.unwrap().pop().unwrap();
    assert_eq!(
        (
            got.content.as_str(),
            got.status,
            got.prompt_tokens,
            got.completion_tokens
        ),
        ("Hello there", MessageStatus::Complete, Some(12), Some(3))
    );
    assert_eq!(
        got.reasoning.as_deref(),
        Some("They greeted me; greet back.\n✓")
    );
    assert_eq!(got.generation_id, assistant.generation_id);
    assert_eq!(got.model.as_deref(), Some("demo"));
    assert_eq!(got.created_at, assistant.created_at);

    let failed = MessageUpdate {
        content: "Hel".into(),
        reasoning: None,
        status: MessageStatus::Failed,
        prompt_tokens: Some(12),
        completion_tokens: None,
        error: Some("upstream returned 500".into()),
    };
    store
        .update_message(&assistant.id, &failed, now_millis())
        .await
        .unwrap();
    let got = store.list_messages(&s.id).await.unwrap().pop().unwrap();
    assert_eq!(
        (
            got.content.as_str(),
            got.status,
            got.completion_tokens,
            got.error.as_deref()
        ),
        (
            "Hel",
            MessageStatus::Failed,
            None,
            Some("upstream returned 500")
        )
    );
    assert_eq!(
        got.reasoning, None,
        "an update states the reasoning as well"
    );

    let err = store
        .update_message("no-such-message", &done, now_millis())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store
        .insert_message(&message("no-such-session", Role::User, "x", t))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store.insert_message(&user).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "same id twice: {err:?}"
    );
    assert!(
        store
            .list_messages("no-such-session")
            .await
            .unwrap()
            .is_empty()
    );
}

async fn deleting_a_session_deletes_its_messages(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let gone = new_session(&*store, &alice, None, None).await;
    let kept = new_session(&*store, &alice, None, None).await;
    for i in 0..3 {
        store
            .insert_message(&message(&gone.id, Role::User, "bye", gone.created_at + i))
            .await
            .unwrap();
    }
    store
        .insert_message(&message(&kept.id, Role::User, "stay", kept.created_at))
        .await
        .unwrap();
    assert!(store.delete_session(&alice, &gone.id).await.unwrap());
    assert!(store.list_messages(&gone.id).await.unwrap().is_empty());
    assert_eq!(store.list_messages(&kept.id).await.unwrap().len(), 1);
    let orphans: i64 = match backend {
        Backend::Sqlite => sqlite_conn(&db)
            .query_row(
                "SELECT count(*) FROM messages WHERE session_id = ?1",
                [&gone.id],
                |r| r.get(0),
            )
            .unwrap(),
        Backend::Postgres | Backend::PgBouncer => db
            .pg_client()
            .await
            .query_one(
                "SELECT count(*) FROM messages WHERE session_id = $1",
                &[&gone.id],
            )
            .await
            .unwrap()
            .get(0),
    };
    assert_eq!(orphans, 0);
}

async fn interrupt_streaming_marks_only_streaming_messages(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let mut expected = Vec::new();
    for status in [
        MessageStatus::Streaming,
        MessageStatus::Complete,
        MessageStatus::Cancelled,
        MessageStatus::Streaming,
    ] {
        let s = new_session(&*store, &alice, None, None).await;
        let m = StoredMessage {
            status,
            ..message(&s.id, Role::Assistant, "partial", s.created_at)
        };
        store.insert_message(&m).await.unwrap();
        let after = match status {
            MessageStatus::Streaming => MessageStatus::Interrupted,
            other => other,
        };
        expected.push((s.id, after));
    }
    assert_eq!(store.interrupt_streaming(now_millis()).await.unwrap(), 2);
    for (session, status) in &expected {
        let m = store.list_messages(session).await.unwrap().pop().unwrap();
        assert_eq!(m.status, *status);
        assert_eq!(m.content, "partial", "the partial answer is kept");
    }
    assert_eq!(store.interrupt_streaming(now_millis()).await.unwrap(), 0);
}

async fn usage_is_recorded(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let record = |key_id: Option<&str>, session_id: Option<&str>| UsageRecord {
        id: new_id(),
        user_id: alice.clone(),
        key_id: key_id.map(str::to_owned),
        session_id: session_id.map(str::to_owned),
        provider: "demo".into(),
        model: "demo".into(),
        prompt_tokens: 10,
        completion_tokens: 20,
        reasoning_tokens: 7,
        created_at: now_millis(),
    };
    store.record_usage(&record(None, None)).await.unwrap();
    // Usage is a ledger: it may name sessions and keys that no longer exist.
    store
        .record_usage(&record(Some("gone-key"), Some("gone-session")))
        .await
        .unwrap();
    let total: i64 = match backend {
        Backend::Sqlite => sqlite_conn(&db)
            .query_row(
                "SELECT sum(prompt_tokens + completion_tokens) FROM usage_records WHERE user_id = ?1",
                [&alice],
                |r| r.get(0),
            )
            .unwrap(),
        Backend::Postgres | Backend::PgBouncer => db
            .pg_client()
            .await
            .query_one(
                "SELECT sum(prompt_tokens + completion_tokens)::BIGINT FROM usage_records WHERE user_id = $1",
                &[&alice],
            )
            .await
            .unwrap()
            .get(0),
    };
    assert_eq!(total, 60);
    let rows = store
        .usage_summary(now_millis() - 60_000, now_millis() + 1)
        .await
        .unwrap();
    let summed: Vec<(Option<&str>, i64, i64, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.key_id.as_deref(),
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
                r.reasoning_tokens,
            )
        })
        .collect();
    let mut expected = vec![(None, 1, 10, 20, 7), (Some("gone-key"), 1, 10, 20, 7)];
    // NULL sorts first on SQLite and last on PostgreSQL.
    if backend.is_postgres() {
        expected.reverse();
    }
    assert_eq!(summed, expected);
}

/// The schema's search machinery (no store methods yet): a write is searchable at once,
/// stemming applies, an update re-indexes, a delete unindexes, titles outrank body text.
async fn knowledge_full_text_search_follows_writes(backend: Backend) {
    let db = fresh(backend).await;
    drop(open(&db).await);
    let docs = [
        (
            "d1",
            "Resuming streams",
            "[\"sse\"]",
            "Clients reconnect with Last-Event-ID.",
        ),
        (
            "d2",
            "Rate limits",
            "[\"ops\"]",
            "Limits apply per key while streaming tokens.",
        ),
        ("d3", "Unrelated", "[]", "Nothing to see here."),
    ];
    match backend {
        Backend::Sqlite => {
            let c = sqlite_conn(&db);
            for (id, title, tags, content) in docs {
                c.execute(
                    "INSERT INTO knowledge_docs (id, title, tags, content, created_at) VALUES (?1, ?2, ?3, ?4, 0)",
                    [id, title, tags, content],
                )
                .unwrap();
            }
            let search = |q: &str| -> Vec<String> {
                let mut stmt = c
                    .prepare(
                        "SELECT d.id FROM knowledge_fts JOIN knowledge_docs d ON d.doc_no = knowledge_fts.rowid
                         WHERE knowledge_fts MATCH ?1 ORDER BY bm25(knowledge_fts, 10.0, 5.0, 1.0)",
                    )
                    .unwrap();
                stmt.query_map([q], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            };
            assert_eq!(search("stream"), ["d1", "d2"]);
            assert_eq!(search("sse"), ["d1"]);
            c.execute(
                "UPDATE knowledge_docs SET content = 'All about backpressure.' WHERE id = 'd3'",
                [],
            )
            .unwrap();
            assert_eq!(search("backpressure"), ["d3"]);
            c.execute("DELETE FROM knowledge_docs WHERE id = 'd1'", [])
                .unwrap();
            assert_eq!(search("stream"), ["d2"]);
        }
        Backend::Postgres | Backend::PgBouncer => {
            let c = db.pg_client().await;
            for (id, title, tags, content) in docs {
                c.execute(
                    "INSERT INTO knowledge_docs (id, title, tags, content, created_at) VALUES ($1, $2, $3, $4, 0)",
                    &[&id, &title, &tags, &content],
                )
                .await
                .unwrap();
            }
            let search = async |q: &str| -> Vec<String> {
                c.query(
                    "SELECT id FROM knowledge_docs, websearch_to_tsquery('english', $1) q
                     WHERE search @@ q ORDER BY ts_rank(search, q) DESC",
                    &[&q],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
            };
            assert_eq!(search("stream").await, ["d1", "d2"]);
            assert_eq!(search("sse").await, ["d1"]);
            c.execute(
                "UPDATE knowledge_docs SET content = 'All about backpressure.' WHERE id = 'd3'",
                &[],
            )
            .await
            .unwrap();
            assert_eq!(search("backpressure").await, ["d3"]);
            c.execute("DELETE FROM knowledge_docs WHERE id = 'd1'", &[])
                .await
                .unwrap();
            assert_eq!(search("stream").await, ["d2"]);
        }
    }
}

async fn concurrent_writes_and_reads_all_succeed(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let s = new_session(&*store, &alice, None, None).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let (store, alice, session) = (store.clone(), alice.clone(), s.id.clone());
        tasks.spawn(async move {
            if i % 2 == 0 {
                let m = message(&session, Role::User, "x", now_millis());
                store.insert_message(&m).await.map(drop)
            } else {
                store.list_sessions(&alice, None, 10).await?;
                store.list_messages(&session).await.map(drop)
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    assert_eq!(store.list_messages(&s.id).await.unwrap().len(), 32);
}

fn agent(name: &str, at: i64) -> Agent {
    Agent {
        id: new_id(),
        name: name.into(),
        provider: None,
        model: "demo".into(),
        system_prompt: None,
        temperature: None,
        max_tokens: None,
        fallback_models: Vec::new(),
        knowledge: false,
        is_active: true,
        created_at: at,
        updated_at: at,
    }
}

async fn agents_crud_with_unique_names_and_json_fallbacks(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let t = now_millis();
    let writer = Agent {
        provider: Some("openai".into()),
        system_prompt: Some("You write.".into()),
        temperature: Some(0.7),
        max_tokens: Some(512),
        fallback_models: vec!["m2".into(), "m3 \"quoted\" [x]".into(), "ünï".into()],
        knowledge: true,
        ..agent("writer", t)
    };
    let alpha = agent("alpha", t + 1);
    assert_eq!(store.get_agent("writer").await.unwrap(), None);
    assert!(store.list_agents().await.unwrap().is_empty());
    store.create_agent(&writer).await.unwrap();
    store.create_agent(&alpha).await.unwrap();
    assert_eq!(
        store.get_agent("writer").await.unwrap(),
        Some(writer.clone())
    );
    assert_eq!(store.get_agent("alpha").await.unwrap(), Some(alpha.clone()));
    assert_eq!(
        store.list_agents().await.unwrap(),
        [alpha.clone(), writer.clone()],
        "by name"
    );

    // A taken name is a conflict, whatever the id.
    let err = store.create_agent(&agent("writer", t)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    let edited = Agent {
        provider: None,
        model: "demo-2".into(),
        system_prompt: None,
        temperature: None,
        max_tokens: Some(64),
        fallback_models: vec!["m4".into()],
        knowledge: false,
        is_active: false,
        updated_at: t + 10,
        ..writer.clone()
    };
    assert!(store.update_agent(&edited).await.unwrap());
    assert_eq!(
        store.get_agent("writer").await.unwrap(),
        Some(edited.clone())
    );
    // The stored id and creation time stay, whatever the caller passes.
    let renumbered = Agent {
        id: new_id(),
        created_at: 0,
        ..edited.clone()
    };
    assert!(store.update_agent(&renumbered).await.unwrap());
    assert_eq!(store.get_agent("writer").await.unwrap(), Some(edited));
    assert!(!store.update_agent(&agent("nobody", t)).await.unwrap());
    assert_eq!(store.get_agent("nobody").await.unwrap(), None);

    assert!(store.delete_agent("writer").await.unwrap());
    assert!(!store.delete_agent("writer").await.unwrap());
    assert_eq!(store.get_agent("writer").await.unwrap(), None);
    assert_eq!(store.list_agents().await.unwrap(), [alpha]);
    // The name is free again.
    store.create_agent(&writer).await.unwrap();
}

async fn scenes_crud_with_unique_names(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let t = now_millis();
    let scene = |name: &str| Scene {
        id: new_id(),
        name: name.into(),
        agent: "default".into(),
        template: "Summarise {{ text }} in {{lang}}.".into(),
        created_at: t,
        updated_at: t,
    };
    let (summary, answer) = (scene("summary"), scene("answer"));
    store.create_scene(&summary).await.unwrap();
    store.create_scene(&answer).await.unwrap();
    assert_eq!(
        store.get_scene("summary").await.unwrap(),
        Some(summary.clone())
    );
    assert_eq!(store.get_scene("nope").await.unwrap(), None);
    assert_eq!(
        store.list_scenes().await.unwrap(),
        [answer.clone(), summary.clone()]
    );
    let err = store.create_scene(&scene("summary")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    let edited = Scene {
        agent: "writer".into(),
        template: "Shorter: {{text}}".into(),
        updated_at: t + 5,
        ..summary.clone()
    };
    assert!(store.update_scene(&edited).await.unwrap());
    assert_eq!(store.get_scene("summary").await.unwrap(), Some(edited));
    assert!(!store.update_scene(&scene("nope")).await.unwrap());

    assert!(store.delete_scene("summary").await.unwrap());
    assert!(!store.delete_scene("summary").await.unwrap());
    assert_eq!(store.list_scenes().await.unwrap(), [answer]);
}

async fn knowledge_search_ranks_titles_first_and_takes_any_text(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let doc = |id: &str, title: &str, tags: &[&str], content: &str| KnowledgeDoc {
        id: id.into(),
        title: title.into(),
        content: content.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        created_at: now_millis(),
    };
    // The body-text document mentions the words more often than the titled one.
    let docs = [
        doc(
            "body",
            "Resuming streams",
            &["sse"],
            "When rate limits hit, clients back off. Rate limits are counted per key, \
             and a client over its rate limits waits before it reconnects with Last-Event-ID.",
        ),
        doc(
            "title",
            "Rate limits",
            &["ops", "quota"],
            "Each key gets a budget of requests per minute.",
        ),
        doc("other", "Unrelated", &[], "Nothing to see here."),
    ];
    for d in &docs {
        store.add_knowledge(d).await.unwrap();
    }
    let err = store.add_knowledge(&docs[0]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "same id twice: {err:?}"
    );

    let ids = |hits: &[sluice::store::KnowledgeHit]| {
        hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>()
    };
    for q in [
        "rate limits",
        "Rate LIMITS?",
        "How do I deal with rate limits?",
    ] {
        let hits = store.search_knowledge(q, 10).await.unwrap();
        assert_eq!(ids(&hits), ["title", "body"], "{q}");
        assert!(hits[0].score > hits[1].score, "{hits:?}");
        assert_eq!(hits[0].title, "Rate limits");
        assert_eq!(hits[0].tags, ["ops", "quota"]);
        for h in &hits {
            assert!(!h.snippet.trim().is_empty(), "{h:?}");
            assert!(h.snippet.len() < 400, "a short excerpt: {h:?}");
        }
        assert!(
            hits[1].snippet.to_lowercase().contains("rate"),
            "around the match: {:?}",
            hits[1].snippet
        );
    }
    // Stemming, and tags are searched.
    assert_eq!(
        ids(&store.search_knowledge("limit", 10).await.unwrap())[0],
        "title"
    );
    assert_eq!(
        ids(&store.search_knowledge("quota", 10).await.unwrap()),
        ["title"]
    );
    assert_eq!(
        ids(&store.search_knowledge("streaming", 10).await.unwrap()),
        ["body"]
    );
    assert!(
        store
            .search_knowledge("zebra", 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The limit holds.
    assert_eq!(
        ids(&store.search_knowledge("rate limits", 1).await.unwrap()),
        ["title"]
    );
    assert!(store.search_knowledge("rate", 0).await.unwrap().is_empty());

    // User text is never search syntax: none of these may fail.
    let long = "rate limits ".repeat(2000);
    for q in [
        "\"",
        "\"rate",
        "rate\"limits",
        "rate*",
        "*",
        "-rate",
        "- - -",
        "title:rate",
        "{title}: rate",
        ":",
        "rate AND",
        "AND",
        "OR NOT AND",
        "NEAR(rate limits, 2)",
        "rate limits\"); DROP TABLE knowledge_docs; --",
        "'rate' & !limits | (x <-> y)",
        "(",
        ")",
        "'",
        "''",
        "\\",
        "^rate",
        "rate + limits",
        "«»—…",
        "😀 émoji ünïcode 中文",
        "",
        "   \t\n",
        "the a of",
        long.as_str(),
    ] {
        let hits = store
            .search_knowledge(q, 5)
            .await
            .unwrap_or_else(|e| panic!("{q:?}: {e}"));
        assert!(hits.len() <= 5);
    }
    assert_eq!(
        ids(&store
            .search_knowledge("\"rate* -limits:\"", 10)
            .await
            .unwrap()),
        ["title", "body"],
        "the words of a would-be query still match"
    );
    assert_eq!(store.search_knowledge("", 10).await.unwrap(), []);

    // A document with no body text still has a snippet.
    store
        .add_knowledge(&doc("bare", "Backpressure", &[], ""))
        .await
        .unwrap();
    let hits = store.search_knowledge("backpressure", 10).await.unwrap();
    assert_eq!(ids(&hits), ["bare"]);
    assert!(!hits[0].snippet.is_empty());
}

fn task(user_id: &str, created_at: i64) -> Task {
    Task {
        id: new_id(),
        user_id: user_id.into(),
        key_id: None,
        agent: "default".into(),
        scene: None,
        input: r#"{"messages":[{"role":"user","content":"hi"}]}"#.into(),
        status: TaskStatus::Queued,
        result: None,
        reasoning: None,
        error: None,
        progress_tokens: 0,
        created_at,
        started_at: None,
        finished_at: None,
    }
}

async fn tasks_are_scoped_claimed_and_finished_once(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let bob = user(&*store, "bob").await;
    let t = now_millis();
    let t1 = Task {
        key_id: Some("key-1".into()),
        scene: Some("summary".into()),
        ..task(&alice, t)
    };
    store.create_task(&t1).await.unwrap();
    let err = store.create_task(&t1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = store
        .create_task(&task("no-such-user", t))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    assert_eq!(
        store.get_task(Some(&alice), &t1.id).await.unwrap(),
        Some(t1.clone())
    );
    assert_eq!(store.get_task(Some(&bob), &t1.id).await.unwrap(), None);
    assert_eq!(
        store.get_task(None, &t1.id).await.unwrap(),
        Some(t1.clone())
    );
    assert_eq!(store.get_task(None, "no-such-task").await.unwrap(), None);

    // queued → running.
    let claimed = store.claim_task(&t1.id, t + 1).await.unwrap().unwrap();
    assert_eq!(
        claimed,
        Task {
            status: TaskStatus::Running,
            started_at: Some(t + 1),
            ..t1.clone()
        }
    );
    store.set_task_progress(&t1.id, 42).await.unwrap();
    let got = store.get_task(None, &t1.id).await.unwrap().unwrap();
    assert_eq!(got.progress_tokens, 42);

    // A task left running (its worker died) is claimed again.
    let reclaimed = store.claim_task(&t1.id, t + 2).await.unwrap().unwrap();
    assert_eq!(
        (
            reclaimed.status,
            reclaimed.started_at,
            reclaimed.progress_tokens
        ),
        (TaskStatus::Running, Some(t + 2), 42)
    );

    assert!(
        store
            .finish_task(
                &t1.id,
                TaskStatus::Succeeded,
                Some("done"),
                Some("thought it through"),
                None,
                t + 3
            )
            .await
            .unwrap()
    );
    let done = store.get_task(Some(&alice), &t1.id).await.unwrap().unwrap();
    assert_eq!(
        done,
        Task {
            status: TaskStatus::Succeeded,
            result: Some("done".into()),
            reasoning: Some("thought it through".into()),
            progress_tokens: 42,
            started_at: Some(t + 2),
            finished_at: Some(t + 3),
            ..t1.clone()
        }
    );
    // Exactly once: a second finish changes nothing.
    assert!(
        !store
            .finish_task(&t1.id, TaskStatus::Failed, None, None, Some("late"), t + 4)
            .await
            .unwrap()
    );
    // A final task is never claimed or updated again.
    assert_eq!(store.claim_task(&t1.id, t + 5).await.unwrap(), None);
    store.set_task_progress(&t1.id, 99).await.unwrap();
    assert_eq!(store.get_task(None, &t1.id).await.unwrap(), Some(done));
    assert_eq!(store.claim_task("no-such-task", t).await.unwrap(), None);
    assert!(
        !store
            .finish_task("no-such-task", TaskStatus::Failed, None, None, None, t)
            .await
            .unwrap()
    );

    // Only a running task finishes.
    let t2 = task(&alice, t);
    store.create_task(&t2).await.unwrap();
    assert!(
        !store
            .finish_task(&t2.id, TaskStatus::Succeeded, Some("x"), None, None, t)
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_task(None, &t2.id).await.unwrap(),
        Some(t2.clone())
    );
    store.claim_task(&t2.id, t).await.unwrap().unwrap();
    let err = store
        .finish_task(&t2.id, TaskStatus::Queued, None, None, None, t)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Backend(_)),
        "not a final status: {err:?}"
    );
    assert!(
        store
            .finish_task(&t2.id, TaskStatus::Failed, None, None, Some("boom"), t + 1)
            .await
            .unwrap()
    );
    let failed = store.get_task(None, &t2.id).await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.result, failed.error.as_deref()),
        (TaskStatus::Failed, None, Some("boom"))
    );
}

async fn a_task_finishes_once_under_racing_workers(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let t = task(&alice, now_millis());
    store.create_task(&t).await.unwrap();
    store
        .claim_task(&t.id, t.created_at)
        .await
        .unwrap()
        .unwrap();
    let racers = (0..8).map(|i| {
        let (store, id) = (store.clone(), t.id.clone());
        async move {
            let result = format!("worker {i}");
            store
                .finish_task(
                    &id,
                    TaskStatus::Succeeded,
                    Some(&result),
                    None,
                    None,
                    now_millis(),
                )
                .await
                .unwrap()
        }
    });
    let won = futures::future::join_all(racers).await;
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    let winner = won.iter().position(|w| *w).unwrap();
    let got = store.get_task(None, &t.id).await.unwrap().unwrap();
    assert_eq!(got.result, Some(format!("worker {winner}")));
}

async fn cancel_moves_only_the_owners_unfinished_tasks(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let bob = user(&*store, "bob").await;
    let t = now_millis();
    let (queued, running, failed) = (task(&alice, t), task(&alice, t + 1), task(&alice, t + 2));
    for x in [&queued, &running, &failed] {
        store.create_task(x).await.unwrap();
    }
    store.claim_task(&running.id, t + 3).await.unwrap().unwrap();
    store.claim_task(&failed.id, t + 3).await.unwrap().unwrap();
    assert!(
        store
            .finish_task(
                &failed.id,
                TaskStatus::Failed,
                None,
                None,
                Some("boom"),
                t + 4
            )
            .await
            .unwrap()
    );
    let failed = store.get_task(None, &failed.id).await.unwrap().unwrap();

    // Another user's task is not found, and not touched.
    assert_eq!(
        store.cancel_task(&bob, &queued.id, t + 5).await.unwrap(),
        None
    );
    assert_eq!(
        store.get_task(None, &queued.id).await.unwrap(),
        Some(queued.clone())
    );
    assert_eq!(
        store
            .cancel_task(&alice, "no-such-task", t + 5)
            .await
            .unwrap(),
        None
    );

    assert_eq!(
        store.cancel_task(&alice, &queued.id, t + 5).await.unwrap(),
        Some(TaskStatus::Queued)
    );
    let got = store.get_task(None, &queued.id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.finished_at, got.started_at),
        (TaskStatus::Cancelled, Some(t + 5), None)
    );
    assert_eq!(
        store.claim_task(&queued.id, t + 6).await.unwrap(),
        None,
        "never runs"
    );

    assert_eq!(
        store.cancel_task(&alice, &running.id, t + 6).await.unwrap(),
        Some(TaskStatus::Running)
    );
    let got = store.get_task(None, &running.id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.finished_at),
        (TaskStatus::Cancelled, Some(t + 6))
    );
    // The worker finishing afterwards loses.
    assert!(
        !store
            .finish_task(
                &running.id,
                TaskStatus::Succeeded,
                Some("late"),
                None,
                None,
                t + 7
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_task(None, &running.id).await.unwrap(),
        Some(got.clone())
    );

    // A final task answers with its status and stays as it is.
    assert_eq!(
        store.cancel_task(&alice, &failed.id, t + 8).await.unwrap(),
        Some(TaskStatus::Failed)
    );
    assert_eq!(
        store.get_task(None, &failed.id).await.unwrap(),
        Some(failed)
    );
    assert_eq!(
        store.cancel_task(&alice, &running.id, t + 9).await.unwrap(),
        Some(TaskStatus::Cancelled)
    );
    assert_eq!(store.get_task(None, &running.id).await.unwrap(), Some(got));
}

async fn queued_tasks_keep_their_creation_order(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let bob = user(&*store, "bob").await;
    let t = now_millis();
    assert_eq!(store.count_queued_tasks().await.unwrap(), 0);
    assert!(store.list_unfinished_tasks().await.unwrap().is_empty());
    // Created out of order, two of them in the same millisecond (the id decides).
    let tie_b = Task {
        id: "tie-b".into(),
        ..task(&bob, t + 20)
    };
    let tie_a = Task {
        id: "tie-a".into(),
        ..task(&alice, t + 20)
    };
    let (late, early) = (task(&alice, t + 30), task(&bob, t + 10));
    for x in [&late, &tie_b, &early, &tie_a] {
        store.create_task(x).await.unwrap();
    }
    let order = [&early, &tie_a, &tie_b, &late];
    let ids = |ts: Vec<Task>| ts.into_iter().map(|x| x.id).collect::<Vec<_>>();
    let expected = order.iter().map(|x| x.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(store.list_unfinished_tasks().await.unwrap()), expected);
    assert_eq!(store.count_queued_tasks().await.unwrap(), 4);
    for (i, x) in order.iter().enumerate() {
        assert_eq!(
            store.task_position(&x.id).await.unwrap(),
            Some(i as u64 + 1),
            "{}",
            x.id
        );
    }
    assert_eq!(store.task_position("no-such-task").await.unwrap(), None);

    // A running task is unfinished but no longer in the queue.
    store.claim_task(&early.id, t + 40).await.unwrap().unwrap();
    assert_eq!(store.task_position(&early.id).await.unwrap(), None);
    assert_eq!(store.task_position(&tie_a.id).await.unwrap(), Some(1));
    assert_eq!(store.task_position(&late.id).await.unwrap(), Some(3));
    assert_eq!(store.count_queued_tasks().await.unwrap(), 3);
    assert_eq!(ids(store.list_unfinished_tasks().await.unwrap()), expected);

    // Final tasks leave both.
    assert!(
        store
            .finish_task(
                &early.id,
                TaskStatus::Succeeded,
                Some("ok"),
                None,
                None,
                t + 50
            )
            .await
            .unwrap()
    );
    store
        .cancel_task(&bob, &tie_b.id, t + 50)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.task_position(&tie_b.id).await.unwrap(), None);
    assert_eq!(store.task_position(&late.id).await.unwrap(), Some(2));
    assert_eq!(store.count_queued_tasks().await.unwrap(), 2);
    assert_eq!(
        ids(store.list_unfinished_tasks().await.unwrap()),
        [tie_a.id.clone(), late.id.clone()]
    );
}

/// Runs the real binary against the test's store, in an empty working directory so that no
/// `.env` file or `DATABASE_URL` of the developer's leaks in.
async fn sluice(db: &TestDb, args: &[&str]) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_DATA_DIR", &db.config.data_dir)
        .current_dir(cwd.path());
    if let Some(url) = db.database_url() {
        cmd.env("DATABASE_URL", url);
    }
    if db.config.pooler == sluice::config::DbPooler::Pgbouncer {
        cmd.env("SLUICE_DB_POOLER", "pgbouncer");
    }
    cmd.output().await.unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn keys_cli_prints_a_key_once_and_revokes(backend: Backend) {
    let db = fresh(backend).await;

    let out = sluice(&db, &["keys", "create", "--name", "alice"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is the key alone: {stdout:?}");
    let key = lines[0].to_owned();
    assert!(key.starts_with("sk-sluice-") && key.len() == 50, "{key}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("will not be shown again"), "{stderr}");
    assert!(!stderr.contains(&key));

    let out = sluice(&db, &["keys", "create", "--name", "ops", "--admin"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let admin_key = text(&out.stdout).trim().to_owned();
    assert_ne!(admin_key, key);

    let out = sluice(&db, &["keys", "list"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = text(&out.stdout);
    assert!(list.starts_with("ID"), "{list}");
    assert!(list.contains("alice") && list.contains("ops"), "{list}");
    assert!(list.contains(&key[..14]), "the prefix is shown: {list}");
    assert!(
        !list.contains(&key) && !list.contains(&admin_key),
        "never a key: {list}"
    );
    assert!(!text(&out.stderr).contains(&key[14..]));

    // What the server would do with the key: find it by its hash.
    let store = open(&db).await;
    let found = store.find_api_key(&hash_key(&key)).await.unwrap().unwrap();
    assert_eq!((found.name.as_str(), found.is_admin), ("alice", false));
    let found = store
        .find_api_key(&hash_key(&admin_key))
        .await
        .unwrap()
        .unwrap();
    assert!(found.is_admin);
    if backend == Backend::Sqlite {
        // Only the hash is stored: the key is in no file of the database.
        for entry in std::fs::read_dir(&db.config.data_dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()));
        }
    }

    let out = sluice(&db, &["keys", "revoke", "alice"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "revoked 1 key");
    assert_eq!(store.find_api_key(&hash_key(&key)).await.unwrap(), None);
    assert!(
        store
            .find_api_key(&hash_key(&admin_key))
            .await
            .unwrap()
            .is_some()
    );

    let out = sluice(&db, &["keys", "revoke", "alice"]).await;
    assert!(!out.status.success(), "revoking nothing fails");
    assert!(
        text(&out.stderr).contains("no active key"),
        "{}",
        text(&out.stderr)
    );
    let out = sluice(&db, &["keys", "revoke", "no-such-key"]).await;
    assert!(!out.status.success());

    let out = sluice(&db, &["keys", "create", "--name", ""]).await;
    assert!(!out.status.success(), "an empty name is refused");
}

async fn migrate_cli_is_idempotent(backend: Backend) {
    let db = fresh(backend).await;
    let out = sluice(&db, &["migrate"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout);
    assert!(
        first.contains(
            "applied 4 migration(s): V1__init, V2__reasoning, V3__running_generation, V4__responses"
        ),
        "{first}"
    );
    let out = sluice(&db, &["migrate"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = text(&out.stdout);
    assert!(second.contains("up to date"), "{second}");
    if let Some(url) = db.database_url() {
        assert!(!first.contains(url) && !second.contains(url));
    }
    open(&db).await.ping().await.unwrap();
}

/// A streaming reply of generation `g` in session `s`.
fn streaming_reply(s: &str, g: &str) -> StoredMessage {
    StoredMessage {
        status: MessageStatus::Streaming,
        generation_id: Some(g.to_owned()),
        ..message(s, Role::Assistant, "partial", now_millis())
    }
}

async fn a_session_runs_one_generation_until_released_or_expired(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let s = new_session(&*store, &alice, None, None).await.id;
    let now = now_millis();
    let until = now + 60_000;

    assert_eq!(
        store
            .claim_generation(&s, "g1", "a", now, until)
            .await
            .unwrap(),
        None
    );
    // Held: refused on any instance, naming the holder.
    for server in ["b", "a"] {
        assert_eq!(
            store
                .claim_generation(&s, "g2", server, now, until)
                .await
                .unwrap(),
            Some("g1".to_owned())
        );
    }
    // Another generation's release leaves the hold alone.
    assert!(!store.release_generation(&s, "g2").await.unwrap());
    assert_eq!(
        store
            .claim_generation(&s, "g2", "b", now, until)
            .await
            .unwrap(),
        Some("g1".to_owned())
    );
    // Released by its own generation: free.
    assert!(store.release_generation(&s, "g1").await.unwrap());
    assert!(!store.release_generation(&s, "g1").await.unwrap(), "once");
    assert_eq!(
        store
            .claim_generation(&s, "g2", "b", now, until)
            .await
            .unwrap(),
        None
    );
    // Past its expiry, a hold nobody released (its instance died) gives way.
    assert_eq!(
        store
            .claim_generation(&s, "g3", "a", until - 1, until + 60_000)
            .await
            .unwrap(),
        Some("g2".to_owned())
    );
    assert_eq!(
        store
            .claim_generation(&s, "g3", "a", until + 1, until + 60_000)
            .await
            .unwrap(),
        None
    );
    // Sessions hold their own slots; a missing one is not found.
    let other = new_session(&*store, &alice, None, None).await.id;
    assert_eq!(
        store
            .claim_generation(&other, "g4", "a", now, until)
            .await
            .unwrap(),
        None
    );
    assert!(matches!(
        store.claim_generation("nope", "g5", "a", now, until).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn a_session_is_free_once_its_generations_reply_has_ended(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let s = session_of(&*store, "alice").await;
    let now = now_millis();
    let until = now + 60_000;
    assert_eq!(
        store
            .claim_generation(&s, "g1", "a", now, until)
            .await
            .unwrap(),
        None
    );
    let reply = streaming_reply(&s, "g1");
    store.insert_message(&reply).await.unwrap();
    assert_eq!(
        store
            .claim_generation(&s, "g2", "b", now, until)
            .await
            .unwrap(),
        Some("g1".to_owned()),
        "held while its reply streams"
    );
    // Its final state stored (by its instance, a retried write, or whoever ended it) but
    // the release lost: the session is free all the same.
    let update = MessageUpdate {
        content: "partial".into(),
        reasoning: None,
        status: MessageStatus::Interrupted,
        prompt_tokens: None,
        completion_tokens: None,
        error: None,
    };
    store
        .update_message(&reply.id, &update, now_millis())
        .await
        .unwrap();
    assert_eq!(
        store
            .claim_generation(&s, "g2", "b", now, until)
            .await
            .unwrap(),
        None
    );
}

async fn racing_claims_of_a_session_let_exactly_one_through(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let s = session_of(&*store, "alice").await;
    let now = now_millis();
    let claims = (0..16).map(|i| {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            store
                .claim_generation(
                    &s,
                    &format!("g{i}"),
                    &format!("server{}", i % 2),
                    now,
                    now + 60_000,
                )
                .await
                .unwrap()
        })
    });
    let results = futures::future::join_all(claims).await;
    let won = results
        .iter()
        .filter(|r| r.as_ref().unwrap().is_none())
        .count();
    assert_eq!(won, 1, "{results:?}");
}

async fn start_up_interrupts_only_replies_no_other_instance_holds(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let alice = user(&*store, "alice").await;
    let now = now_millis();
    let until = now + 60_000;
    // (server holding the reply's session, hold expiry, reply still streaming after?)
    let cases = [
        (Some("other"), until, true),    // another instance's live reply
        (Some("me"), until, false),      // this instance's, from before its restart
        (Some("other"), now - 1, false), // another instance's, its hold lapsed
        (None, until, false),            // nobody holds it
    ];
    let mut replies = Vec::new();
    for (server, expires, _) in cases {
        let s = new_session(&*store, &alice, None, None).await.id;
        let g = new_id();
        if let Some(server) = server {
            assert_eq!(
                store
                    .claim_generation(&s, &g, server, now - 10, expires)
                    .await
                    .unwrap(),
                None
            );
        }
        let reply = streaming_reply(&s, &g);
        store.insert_message(&reply).await.unwrap();
        replies.push(reply);
    }
    // A hold naming a later generation of that session protects no older reply.
    let s = new_session(&*store, &alice, None, None).await.id;
    let stale = streaming_reply(&s, "old");
    store.insert_message(&stale).await.unwrap();
    assert_eq!(
        store
            .claim_generation(&s, "new", "other", now, until)
            .await
            .unwrap(),
        None
    );

    assert_eq!(store.interrupt_streaming_of("me", now).await.unwrap(), 4);
    for (reply, (_, _, streaming)) in replies.iter().zip(cases) {
        let m = store
            .list_messages(&reply.session_id)
            .await
            .unwrap()
            .pop()
            .unwrap();
        let want = if streaming {
            MessageStatus::Streaming
        } else {
            MessageStatus::Interrupted
        };
        assert_eq!(m.status, want, "{reply:?}");
    }
    let m = store.list_messages(&s).await.unwrap().pop().unwrap();
    assert_eq!(m.status, MessageStatus::Interrupted);
    assert_eq!(store.interrupt_streaming_of("me", now).await.unwrap(), 0);
}

/// Twenty clients creating and listing sessions at once through a sluice whose
/// DATABASE_URL is PgBouncer in transaction mode, with more pooled connections (16) than
/// PgBouncer has server connections (3): no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_create_and_list_sessions_through_pgbouncer() {
    crate::require!(Postgres, PgBouncer);
    let db = fresh(Backend::PgBouncer).await;
    let mut cfg = common::base_config();
    cfg.store = db.config.clone();
    cfg.store.pool_size = 16;
    let server = common::TestServer::start(cfg).await;
    let clients = (0..20).map(|i| {
        let url = server.url.clone();
        async move {
            let c = common::client();
            let mut failed = Vec::new();
            for j in 0..10 {
                let r = c
                    .post(format!("{url}/api/sessions"))
                    .json(&serde_json::json!({"title": format!("client {i}, session {j}")}))
                    .send()
                    .await
                    .unwrap();
                if r.status() != 201 {
                    failed.push(format!("POST {}: {}", r.status(), r.text().await.unwrap()));
                }
                let r = c.get(format!("{url}/api/sessions")).send().await.unwrap();
                if r.status() != 200 {
                    failed.push(format!("GET {}: {}", r.status(), r.text().await.unwrap()));
                }
            }
            failed
        }
    });
    let failed: Vec<String> = futures::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 400 requests failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let c = db.pg_client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    server.shutdown().await;
}

fn stored_response(id: &str, user: &str, status: &str, server: Option<&str>) -> StoredResponse {
    StoredResponse {
        id: id.into(),
        user_id: user.into(),
        status: status.into(),
        body: format!(r#"{{"id":"{id}","status":"{status}"}}"#),
        input_items: r#"[{"type":"message","role":"user","content":"hi\u0000"}]"#.into(),
        server: server.map(str::to_owned),
        cancel_at: None,
        created_at: 1,
        updated_at: 1,
    }
}

/// A stored response is its owner's alone, settles exactly once, takes a cancel request
/// only while unfinished, and a restart fails the unfinished ones of the instance named.
async fn responses_are_scoped_settled_once_and_failed_at_restart(backend: Backend) {
    let db = fresh(backend).await;
    let store = open(&db).await;
    let (alice, bob) = (user(&*store, "alice").await, user(&*store, "bob").await);
    let r = stored_response("resp_1", &alice, "in_progress", Some("a"));
    store.insert_response(&r).await.unwrap();
    assert_eq!(store.get_response(&alice, "resp_1").await.unwrap(), Some(r));
    assert_eq!(store.get_response(&bob, "resp_1").await.unwrap(), None);
    assert!(
        !store
            .request_response_cancel(&bob, "resp_1", 5)
            .await
            .unwrap()
    );
    assert!(
        store
            .request_response_cancel(&alice, "resp_1", 5)
            .await
            .unwrap()
    );
    let got = store.get_response(&alice, "resp_1").await.unwrap().unwrap();
    assert_eq!(got.cancel_at, Some(5));

    assert!(
        store
            .finish_response("resp_1", "cancelled", "{}", 9)
            .await
            .unwrap()
    );
    assert!(
        !store
            .finish_response("resp_1", "completed", "{}", 10)
            .await
            .unwrap()
    );
    let got = store.get_response(&alice, "resp_1").await.unwrap().unwrap();
    assert_eq!(
        (got.status.as_str(), got.body.as_str()),
        ("cancelled", "{}")
    );
    assert_eq!((got.server, got.updated_at), (None, 9));
    assert!(
        !store
            .request_response_cancel(&alice, "resp_1", 11)
            .await
            .unwrap()
    );

    for (id, server) in [("resp_a", "a"), ("resp_b", "b")] {
        let r = stored_response(id, &alice, "queued", Some(server));
        store.insert_response(&r).await.unwrap();
    }
    assert_eq!(
        store
            .fail_unfinished_responses(Some("a"), 20)
            .await
            .unwrap(),
        1
    );
    let status = |id: &'static str| {
        let (store, alice) = (store.clone(), alice.clone());
        async move {
            store
                .get_response(&alice, id)
                .await
                .unwrap()
                .unwrap()
                .status
        }
    };
    assert_eq!(status("resp_a").await, "failed");
    assert_eq!(status("resp_b").await, "queued");
    assert_eq!(store.fail_unfinished_responses(None, 21).await.unwrap(), 1);
    assert_eq!(status("resp_b").await, "failed");

    assert!(!store.delete_response(&bob, "resp_a").await.unwrap());
    assert!(store.delete_response(&alice, "resp_a").await.unwrap());
    assert_eq!(store.get_response(&alice, "resp_a").await.unwrap(), None);
}
