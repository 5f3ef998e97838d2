//! The PostgreSQL store's hot statements (a message written, a session's messages read, a
//! key looked up) sent as named prepared statements, as tokio-postgres's `query` does,
//! against unnamed ones with their parameter types, as the store sends them; directly and
//! through PgBouncer in transaction mode (unnamed only: named ones break there). And the
//! store's own calls both ways. Needs the test server (`SLUICE_TEST_DATABASE_URL`, default
//! postgres://postgres@127.0.0.1:5432/test) and pgbouncer. `cargo bench --bench store`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "../tests/it/common/pgbouncer.rs"]
mod pgbouncer;

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::config::{DbPooler, StoreConfig};
use sluice::domain::Role;
use sluice::store::postgres::PgStore;
use sluice::store::{
    ApiKey, KeyStore, MessageStatus, Session, SessionStore, StoredMessage, User, new_id, now_millis,
};
use tokio::runtime::Runtime;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

const INSERT: &str = "WITH m AS (
        INSERT INTO messages (id, session_id, role, content, status, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        RETURNING session_id, updated_at
    )
    UPDATE sessions SET updated_at = m.updated_at FROM m WHERE sessions.id = m.session_id";
const LIST: &str = "SELECT id, session_id, role, content, status, generation_id, model,
        prompt_tokens, completion_tokens, error, created_at, updated_at, reasoning
    FROM messages WHERE session_id = $1 ORDER BY created_at, id";
const KEY: &str = "SELECT id, user_id, name, prefix, is_admin, created_at, revoked_at
    FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL";

fn server() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `url` naming `db` as its database (the URL has no query part).
fn on_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a URL with a database");
    format!("{base}/{db}")
}

async fn client(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

/// A database of its own, migrated, with one user, key, session and 20 messages in it.
struct Fixture {
    admin: Client,
    name: String,
    direct: String,
    bounced: String,
    session: String,
    key_hash: Vec<u8>,
    _bouncer: pgbouncer::PgBouncer,
}

impl Fixture {
    async fn new() -> Self {
        let server = server();
        let admin = client(&server).await;
        let name = format!("sluice_bench_{:016x}", rand::random::<u64>());
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0"))
            .await
            .unwrap();
        let bouncer = pgbouncer::PgBouncer::start(&server);
        let direct = on_database(&server, &name);
        let store = PgStore::connect(&direct, &StoreConfig::default())
            .await
            .unwrap();
        let user = store
            .ensure_user(&User::new("bench", now_millis()))
            .await
            .unwrap();
        let key_hash = vec![7u8; 32];
        let key = ApiKey::new(&user.id, "bench", "sk-bench", false, now_millis());
        store.create_api_key(&key, &[7; 32]).await.unwrap();
        let session = Session::new(&user.id, None, None, now_millis());
        store.create_session(&session).await.unwrap();
        let session = session.id;
        for i in 0..20 {
            store.insert_message(&message(&session, i)).await.unwrap();
        }
        Self {
            admin,
            bounced: bouncer.url(&name),
            direct,
            name,
            session,
            key_hash,
            _bouncer: bouncer,
        }
    }
}

fn message(session: &str, i: i64) -> StoredMessage {
    let now = now_millis() + i;
    StoredMessage {
        id: new_id(),
        session_id: session.to_owned(),
        role: Role::Assistant,
        content: "a reply of a few words, as a stream leaves it".into(),
        reasoning: None,
        status: MessageStatus::Complete,
        generation_id: None,
        model: None,
        prompt_tokens: None,
        completion_tokens: None,
        error: None,
        created_at: now,
        updated_at: now,
    }
}

/// The three statements once each, named (prepared, executed, closed) or unnamed.
async fn round(c: &Client, session: &str, key_hash: &[u8], named: bool) {
    let (id, now) = (new_id(), now_millis());
    let insert: [&(dyn ToSql + Sync); 7] = [
        &id,
        &session,
        &"assistant",
        &"a reply",
        &"complete",
        &now,
        &now,
    ];
    if named {
        c.execute(INSERT, &insert).await.unwrap();
        black_box(c.query(LIST, &[&session]).await.unwrap());
        black_box(c.query_opt(KEY, &[&key_hash]).await.unwrap());
    } else {
        let types = [
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::INT8,
            Type::INT8,
        ];
        let typed: Vec<_> = insert.iter().copied().zip(types).collect();
        c.execute_typed(INSERT, &typed).await.unwrap();
        black_box(
            c.query_typed(LIST, &[(&session, Type::TEXT)])
                .await
                .unwrap(),
        );
        black_box(
            c.query_typed_opt(KEY, &[(&key_hash, Type::BYTEA)])
                .await
                .unwrap(),
        );
    }
    // The list stays 20 long, so every round reads the same.
    c.execute_typed("DELETE FROM messages WHERE id = $1", &[(&id, Type::TEXT)])
        .await
        .unwrap();
}

/// The store's calls for the same three, through its pool; `direct` deletes the message
/// again, as in `round`.
async fn store_round(s: &PgStore, direct: &Client, session: &str, key_hash: &[u8; 32]) {
    let m = message(session, 0);
    s.insert_message(&m).await.unwrap();
    black_box(s.list_messages(session).await.unwrap());
    black_box(s.find_api_key(key_hash).await.unwrap());
    direct
        .execute_typed("DELETE FROM messages WHERE id = $1", &[(&m.id, Type::TEXT)])
        .await
        .unwrap();
}

fn statements(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let f = rt.block_on(Fixture::new());
    let key: [u8; 32] = f.key_hash.clone().try_into().unwrap();
    let direct = rt.block_on(client(&f.direct));
    let bounced = rt.block_on(client(&f.bounced));

    // Each round leaves a dead row behind: a vacuum before each case, so none reads
    // through the ones of the cases before it.
    let vacuum = || {
        rt.block_on(direct.batch_execute("VACUUM messages"))
            .unwrap()
    };
    let mut g = c.benchmark_group("store_statements");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    for (label, conn, named) in [
        ("direct_named", &direct, true),
        ("direct_unnamed", &direct, false),
        ("pgbouncer_unnamed", &bounced, false),
    ] {
        vacuum();
        g.bench_function(label, |b| {
            b.iter(|| rt.block_on(round(conn, &f.session, &f.key_hash, named)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("store_calls");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    for (label, url, pooler) in [
        ("direct", &f.direct, DbPooler::None),
        ("pgbouncer", &f.bounced, DbPooler::Pgbouncer),
    ] {
        let cfg = StoreConfig {
            pooler,
            ..StoreConfig::default()
        };
        let store = rt.block_on(PgStore::connect(url, &cfg)).unwrap();
        vacuum();
        g.bench_function(label, |b| {
            b.iter(|| rt.block_on(store_round(&store, &direct, &f.session, &key)))
        });
    }
    g.finish();

    drop((direct, bounced));
    rt.block_on(
        f.admin
            .batch_execute(&format!("DROP DATABASE \"{}\" WITH (FORCE)", f.name)),
    )
    .unwrap();
}

criterion_group!(benches, statements);
criterion_main!(benches);
