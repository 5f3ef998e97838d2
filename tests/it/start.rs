//! The real binary started while PostgreSQL or Redis is away: it answers liveness, fails
//! readiness naming what it waits for, becomes ready once the dependency answers, tells
//! systemd `READY=1` only then, gives up after `SLUICE_START_WAIT_SECS`, and stops on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::db::{self, Backend, TestDb};
use common::proxy::Proxy;
use common::*;
use serde_json::{Value, json};
use sluice_mock::{MockConfig, MockServer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const PG: &str = "127.0.0.1:5432";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc {
    child: Child,
    url: String,
    /// Every line of stdout and stderr, as they come.
    lines: tokio::sync::mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

async fn spawn(envs: &[(&str, String)]) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_ADDR", format!("127.0.0.1:{port}"))
        .env("SLUICE_LOG", "info")
        .env("SLUICE_RATE_CHAT_PER_MIN", "0")
        .env("SLUICE_RATE_API_PER_MIN", "0")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, lines) = tokio::sync::mpsc::channel(4096);
    let out = BufReader::new(child.stdout.take().unwrap()).lines();
    let err = BufReader::new(child.stderr.take().unwrap()).lines();
    for mut r in [
        Box::new(out) as Box<dyn LineSource>,
        Box::new(err) as Box<dyn LineSource>,
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(line) = r.next().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
    }
    Proc {
        child,
        url: format!("http://127.0.0.1:{port}"),
        lines,
        _dir: dir,
    }
}

/// stdout and stderr read alike.
trait LineSource: Send {
    fn next(&mut self) -> futures::future::BoxFuture<'_, Option<String>>;
}

impl<R: tokio::io::AsyncBufRead + Unpin + Send> LineSource for tokio::io::Lines<R> {
    fn next(&mut self) -> futures::future::BoxFuture<'_, Option<String>> {
        Box::pin(async move { self.next_line().await.ok().flatten() })
    }
}

impl Proc {
    /// Waits for a line containing `needle`; returns it.
    async fn wait_line(&mut self, needle: &str) -> String {
        tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return line;
                }
            }
            panic!("output ended before '{needle}'");
        })
        .await
        .unwrap_or_else(|_| panic!("no '{needle}' line"))
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let st = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(st.success());
    }

    async fn exit_code(&mut self) -> i32 {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("sluice did not exit")
            .unwrap()
            .code()
            .expect("exited by signal")
    }

    /// GET `path` until `pred` holds on its status and JSON body.
    async fn until(&self, path: &str, pred: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let mut last = (0, Value::Null);
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(r) = client().get(&url).send().await {
                    let status = r.status().as_u16();
                    let body = r.json::<Value>().await.unwrap_or(Value::Null);
                    if pred(status, &body) {
                        return (status, body);
                    }
                    last = (status, body);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{path} never matched; last: {last:?}"))
    }
}

/// A PostgreSQL schema of this test's own, reached through `proxy`.
fn pg_through(db: &TestDb, proxy: &Proxy) -> String {
    db.database_url()
        .unwrap()
        .replacen(PG, &proxy.addr.to_string(), 1)
}

fn redis_env(proxy: &Proxy) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", format!("redis://{}/", proxy.addr)),
        (
            "SLUICE_REDIS_PREFIX",
            format!("sluice-test-{}", sluice::store::new_id()),
        ),
    ]
}

async fn chat_works(p: &Proc, mock: &MockServer) {
    let resp = post(
        &format!("{}/v1/chat/completions", p.url),
        &body(true, json!({"tokens": 3})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(read_stream(resp).await.done);
    assert!(mock.stats().last_request.is_some());
}

/// While waiting: liveness 200 "starting", readiness 503 naming `dependency`, and any
/// other route a JSON 503 `starting` with Retry-After.
async fn assert_waiting_for(p: &Proc, dependency: &str) {
    let (_, ready) = p
        .until("/health/ready", |s, b| {
            s == 503 && b["waiting_for"] == dependency && b["error"].is_string()
        })
        .await;
    assert_eq!(ready["ready"], false, "{ready}");
    let (status, live) = p.until("/health", |_, _| true).await;
    assert_eq!(status, 200);
    assert_eq!(live["status"], "starting", "{live}");
    let r = client()
        .get(format!("{}/v1/models", p.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "starting", "{v}");
}

#[tokio::test]
async fn postgres_away_at_start_is_waited_for_then_served() {
    crate::require!(Postgres);
    let mock = mock(MockConfig::default()).await;
    let db = db::fresh(Backend::Postgres).await;
    let mut proxy = Proxy::start(PG.parse().unwrap()).await;
    proxy.stop();
    let mut p = spawn(&[
        ("DATABASE_URL", pg_through(&db, &proxy)),
        ("OPENAI_BASE_URL", mock.url()),
    ])
    .await;
    assert_waiting_for(&p, "PostgreSQL").await;
    p.wait_line("waiting for a dependency").await;

    proxy.resume().await;
    p.wait_line("listening on").await;
    let (_, ready) = p.until("/health/ready", |s, _| s == 200).await;
    assert_eq!(ready["ready"], true, "{ready}");
    chat_works(&p, &mock).await;
    p.signal("-TERM");
    assert_eq!(p.exit_code().await, 0);
}

#[tokio::test]
async fn redis_blackholed_at_start_is_waited_for_then_served() {
    crate::require!(Redis);
    let mock = mock(MockConfig::default()).await;
    let mut proxy = Proxy::start(common::need::redis_addr()).await;
    proxy.blackhole();
    let mut envs = redis_env(&proxy);
    envs.push(("OPENAI_BASE_URL", mock.url()));
    let mut p = spawn(&envs).await;
    // A blackhole answers nothing: the probe gives up on its own.
    assert_waiting_for(&p, "Redis").await;

    proxy.resume().await;
    p.wait_line("listening on").await;
    let (_, ready) = p.until("/health/ready", |s, _| s == 200).await;
    assert_eq!(ready["redis"]["ok"], true, "{ready}");
    chat_works(&p, &mock).await;
    p.signal("-TERM");
    assert_eq!(p.exit_code().await, 0);
}

#[tokio::test]
async fn the_wait_runs_out_with_a_message_naming_the_dependency_and_the_setting() {
    crate::require!(Redis);
    let mut proxy = Proxy::start(common::need::redis_addr()).await;
    proxy.stop();
    let mut envs = redis_env(&proxy);
    envs.push(("SLUICE_START_WAIT_SECS", "2".into()));
    let started = std::time::Instant::now();
    let mut p = spawn(&envs).await;
    let line = p
        .wait_line("did not answer within 2 s (SLUICE_START_WAIT_SECS)")
        .await;
    assert!(line.contains("Redis"), "{line}");
    assert!(line.to_lowercase().contains("refused"), "{line}");
    assert_eq!(p.exit_code().await, 1);
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn no_wait_fails_at_once_as_before() {
    crate::require!(Postgres);
    let mut proxy = Proxy::start(PG.parse().unwrap()).await;
    proxy.stop();
    let db = db::fresh(Backend::Postgres).await;
    let started = std::time::Instant::now();
    let mut p = spawn(&[
        ("DATABASE_URL", pg_through(&db, &proxy)),
        ("SLUICE_START_WAIT_SECS", "0".into()),
    ])
    .await;
    p.wait_line("store unavailable").await;
    assert_eq!(p.exit_code().await, 1);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn sigterm_during_the_wait_exits_promptly_and_cleanly() {
    crate::require!(Postgres);
    let db = db::fresh(Backend::Postgres).await;
    let mut proxy = Proxy::start(PG.parse().unwrap()).await;
    proxy.stop();
    let mut p = spawn(&[("DATABASE_URL", pg_through(&db, &proxy))]).await;
    assert_waiting_for(&p, "PostgreSQL").await;
    let sent = std::time::Instant::now();
    p.signal("-TERM");
    assert_eq!(p.exit_code().await, 0);
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "{:?}",
        sent.elapsed()
    );
}

/// systemd hears `STATUS=waiting for …` and watchdog pings while the dependency is away,
/// and `READY=1` only once it answers.
#[tokio::test]
async fn ready_reaches_systemd_only_once_the_dependency_answers() {
    crate::require!(Postgres);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
    let db = db::fresh(Backend::Postgres).await;
    let mut proxy = Proxy::start(PG.parse().unwrap()).await;
    proxy.stop();
    let p = spawn(&[
        ("DATABASE_URL", pg_through(&db, &proxy)),
        ("NOTIFY_SOCKET", path.to_string_lossy().into_owned()),
        ("WATCHDOG_USEC", "200000".into()),
    ])
    .await;
    let mut buf = vec![0u8; 4096];
    let mut next = async || {
        let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let (mut status, mut pings) = (None, 0);
    while status.is_none() || pings < 2 {
        let m = next().await;
        assert!(!m.contains("READY=1"), "ready while waiting: {m}");
        if m == "WATCHDOG=1\n" {
            pings += 1;
        } else if m.starts_with("STATUS=waiting for PostgreSQL: ") {
            status = Some(m);
        }
    }
    assert_waiting_for(&p, "PostgreSQL").await;

    proxy.resume().await;
    loop {
        let m = next().await;
        if m.starts_with("READY=1\n") {
            assert!(m.contains("STATUS=serving on"), "{m}");
            break;
        }
    }
    let (_, ready) = p.until("/health/ready", |s, _| s == 200).await;
    assert_eq!(ready["ready"], true);
}
