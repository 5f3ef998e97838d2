//! Several real `sluice` processes sharing PostgreSQL and Redis, and nginx in front: live
//! fan-out and resume across instances, a lost owner, a Redis restart, and draining.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::db::{self, Backend, TestDb};
use common::reasoning::{EVENTS, answer, reasoning_upstream, thinking};
use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_mock::{MockConfig, MockServer, full_reply};
use tokio::process::{Child, Command};

/// Longer than `WAIT`: a lease must expire, or a Redis come back.
const SLOW_WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One event as a client sees it.
#[derive(Debug, Clone, PartialEq)]
struct Ev {
    id: String,
    event: String,
    data: Value,
}

impl From<eventsource_stream::Event> for Ev {
    fn from(e: eventsource_stream::Event) -> Self {
        Self {
            data: serde_json::from_str(&e.data).unwrap_or(Value::Null),
            id: e.id,
            event: e.event,
        }
    }
}

/// A callback for `read_until_final` that signals each token, and the signals.
fn token_signal() -> (
    impl FnMut(&Ev) + Send + 'static,
    tokio::sync::mpsc::Receiver<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let seen = move |e: &Ev| {
        if e.event == "token" {
            let _ = tx.try_send(());
        }
    };
    (seen, rx)
}

async fn wait_tokens(rx: &mut tokio::sync::mpsc::Receiver<()>, n: usize) {
    for _ in 0..n {
        rx.recv().await.unwrap();
    }
}

struct Instance {
    port: u16,
    child: Option<Child>,
}

impl Instance {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// N instances of the real binary on one PostgreSQL schema and one Redis key prefix.
struct Cluster {
    _db: TestDb,
    env: Vec<(String, String)>,
    instances: Vec<Instance>,
    dir: tempfile::TempDir,
    nginx: Option<(Child, u16)>,
}

impl Cluster {
    async fn start(n: usize, mock: &MockServer, redis_url: &str) -> Self {
        Self::start_on(n, &mock.url(), redis_url).await
    }

    /// In front of the OpenAI-compatible upstream at `upstream` (its `…/v1` URL).
    async fn start_on(n: usize, upstream: &str, redis_url: &str) -> Self {
        let db = db::fresh(Backend::Postgres).await;
        let prefix = format!("sluice-test-{}", sluice::store::new_id());
        let env = vec![
            ("DATABASE_URL".into(), db.database_url().unwrap().to_owned()),
            ("REDIS_URL".into(), redis_url.to_owned()),
            ("SLUICE_REDIS_PREFIX".into(), prefix),
            ("OPENAI_BASE_URL".into(), upstream.to_owned()),
            ("SLUICE_DEFAULT_MODEL".into(), "mock-model".into()),
            ("SLUICE_DRAIN_SECS".into(), "30".into()),
            ("SLUICE_RATE_CHAT_PER_MIN".into(), "0".into()),
            ("SLUICE_RATE_API_PER_MIN".into(), "0".into()),
            ("SLUICE_LOG".into(), "info".into()),
        ];
        let mut c = Self {
            _db: db,
            env,
            instances: (0..n)
                .map(|_| Instance {
                    port: free_port(),
                    child: None,
                })
                .collect(),
            dir: tempfile::tempdir().unwrap(),
            nginx: None,
        };
        for i in 0..n {
            c.start_instance(i).await;
        }
        c
    }

    fn url(&self, i: usize) -> String {
        self.instances[i].url()
    }

    async fn start_instance(&mut self, i: usize) {
        let port = self.instances[i].port;
        let log = std::fs::File::create(self.dir.path().join(format!("{port}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SLUICE_ADDR", format!("127.0.0.1:{port}"))
            .env("SLUICE_SERVER_ID", format!("sluice-{port}"))
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.instances[i].child = Some(cmd.spawn().unwrap());
        self.wait_ready(i, WAIT).await;
    }

    /// Polls `/health/ready` until it answers 200.
    async fn wait_ready(&self, i: usize, within: Duration) {
        let url = format!("{}/health/ready", self.url(i));
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = client().get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("instance {i} not ready: {}", self.log(i));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, i: usize) -> String {
        let port = self.instances[i].port;
        std::fs::read_to_string(self.dir.path().join(format!("{port}.log"))).unwrap_or_default()
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.instances[i].child.as_ref().unwrap().id().unwrap();
        let st = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    async fn exit_code(&mut self, i: usize, within: Duration) -> Option<i32> {
        let mut child = self.instances[i].child.take().unwrap();
        tokio::time::timeout(within, child.wait())
            .await
            .expect("instance did not exit")
            .unwrap()
            .code()
    }

    /// nginx in front, with the shipped `nginx/sluice.conf` rendered for these ports.
    async fn start_nginx(&mut self) -> String {
        let port = free_port();
        let ports: Vec<String> = self.instances.iter().map(|i| i.port.to_string()).collect();
        let dir = self.dir.path().join("nginx");
        let out = std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
            .arg("nginx-conf")
            .arg(&dir)
            .env("CLUSTER_PORTS", ports.join(" "))
            .env("CLUSTER_NGINX_PORT", port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster.sh nginx-conf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nginx = which_nginx();
        let child = Command::new(nginx)
            .args(["-p"])
            .arg(&dir)
            .args(["-c"])
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.nginx = Some((child, port));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        while client()
            .get(format!("{url}/health"))
            .send()
            .await
            .map_or(true, |r| r.status() != 200)
        {
            assert!(Instant::now() < deadline, "nginx did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        url
    }
}

impl Drop for Cluster {
    /// nginx's master is asked to stop (SIGKILL would leave its workers behind); the
    /// instances die with their `Child` handles.
    fn drop(&mut self) {
        if let Some(pid) = self.nginx.as_ref().and_then(|(c, _)| c.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

fn which_nginx() -> String {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"] {
        if std::path::Path::new(p).exists() {
            return p.to_owned();
        }
    }
    panic!("nginx is not installed; scripts/test.sh installs it");
}

async fn post_message(base: &str, session: &str, sse: bool) -> reqwest::Response {
    let mut req = client()
        .post(format!("{base}/api/sessions/{session}/messages"))
        .json(&json!({"content": "tell me about tides"}));
    if sse {
        req = req.header("accept", "text/event-stream");
    }
    let r = req.send().await.unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    r
}

async fn watch(base: &str, session: &str, last_event_id: Option<&str>) -> reqwest::Response {
    let mut req = client().get(format!("{base}/api/sessions/{session}/stream"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r
}

/// Reads events until one ends a generation (or the stream ends), passing each to `seen`.
async fn read_until_final(
    resp: reqwest::Response,
    within: Duration,
    mut seen: impl FnMut(&Ev),
) -> Vec<Ev> {
    let mut out = Vec::new();
    let mut events = resp.bytes_stream().eventsource();
    let _ = tokio::time::timeout(within, async {
        while let Some(Ok(e)) = events.next().await {
            let ev = Ev::from(e);
            seen(&ev);
            let last = matches!(
                ev.event.as_str(),
                "done" | "error" | "interrupted" | "reconnect"
            );
            out.push(ev);
            if last {
                break;
            }
        }
    })
    .await;
    out
}

fn text_of(events: &[Ev]) -> String {
    events
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| e.data["text"].as_str().unwrap().to_owned())
        .collect()
}

async fn messages(base: &str, session: &str) -> Vec<Value> {
    let v = get_json(&format!("{base}/api/sessions/{session}/messages")).await;
    v["data"].as_array().cloned().unwrap_or_default()
}

fn last_assistant(messages: &[Value]) -> Value {
    messages
        .iter()
        .rev()
        .find(|m| m["role"] == "assistant")
        .cloned()
        .unwrap_or(Value::Null)
}

async fn redis_cmd(url: &str, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

#[tokio::test]
async fn a_generation_on_one_instance_is_watched_live_and_resumed_on_the_others() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 40,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let c = Cluster::start(3, &mock, &common::need::redis_url()).await;
    let s = create_session(&c.url(0), None).await;

    // B and C follow the session before anything runs on A.
    let b = tokio::spawn(read_until_final(
        watch(&c.url(1), &s, None).await,
        WAIT,
        |_| {},
    ));
    let cc = tokio::spawn(read_until_final(
        watch(&c.url(2), &s, None).await,
        WAIT,
        |_| {},
    ));
    let a = read_until_final(post_message(&c.url(0), &s, true).await, WAIT, |_| {}).await;
    let (b, cc) = (b.await.unwrap(), cc.await.unwrap());

    assert_eq!(a.last().unwrap().event, "done", "{a:?}");
    assert_eq!(text_of(&a), full_reply(40));
    assert_eq!(a, b, "B saw another sequence than A");
    assert_eq!(a, cc, "C saw another sequence than A");

    // Resume on C with an id A handed out: exactly the rest.
    let from = &a[5];
    let rest = read_until_final(watch(&c.url(2), &s, Some(&from.id)).await, WAIT, |_| {}).await;
    assert_eq!(rest, a[6..].to_vec());

    // The reply is stored once, complete, whichever instance is asked.
    for i in 0..3 {
        let m = last_assistant(&messages(&c.url(i), &s).await);
        assert_eq!(m["status"], "complete");
        assert_eq!(m["content"], full_reply(40));
    }
}

/// A reasoning model's thinking crosses instances as its tokens do: a watcher elsewhere
/// gets the same sequence, resumes from a `reasoning` event there, and reads it stored.
#[tokio::test]
async fn thinking_reaches_watchers_on_other_instances() {
    crate::require!(Postgres, Redis);
    let upstream = reasoning_upstream(Duration::from_millis(20)).await;
    let c = Cluster::start_on(2, &upstream, &common::need::redis_url()).await;
    let s = create_session(&c.url(0), None).await;
    let b = tokio::spawn(read_until_final(
        watch(&c.url(1), &s, None).await,
        WAIT,
        |_| {},
    ));
    let a = read_until_final(post_message(&c.url(0), &s, true).await, WAIT, |_| {}).await;
    let b = b.await.unwrap();
    let kinds: Vec<&str> = a.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, EVENTS);
    assert_eq!(a, b, "the other instance saw another sequence");
    let thought: String = a
        .iter()
        .filter(|e| e.event == "reasoning")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(thought, thinking());
    assert_eq!(text_of(&a), answer());

    let rest = read_until_final(watch(&c.url(1), &s, Some(&a[1].id)).await, WAIT, |_| {}).await;
    assert_eq!(rest, a[2..].to_vec());
    let m = last_assistant(&messages(&c.url(1), &s).await);
    assert_eq!(m["reasoning"], thinking());
}

#[tokio::test]
async fn a_watcher_joining_mid_stream_elsewhere_gets_it_from_the_start() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 60,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let c = Cluster::start(2, &mock, &common::need::redis_url()).await;
    let s = create_session(&c.url(0), None).await;
    let (seen, mut tokens) = token_signal();
    let a = tokio::spawn({
        let url = c.url(0);
        let s = s.clone();
        async move { read_until_final(post_message(&url, &s, true).await, WAIT, seen).await }
    });
    wait_tokens(&mut tokens, 10).await;
    let b = read_until_final(watch(&c.url(1), &s, None).await, WAIT, |_| {}).await;
    let a = a.await.unwrap();
    assert_eq!(text_of(&b), full_reply(60));
    assert_eq!(a, b);

    // One generation at a time per session holds across instances.
    post_message(&c.url(0), &s, false).await;
    let r = client()
        .post(format!("{}/api/sessions/{s}/messages", c.url(1)))
        .json(&json!({"content": "and now?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "generation_running", "{v}");
}

#[tokio::test]
async fn watchers_elsewhere_get_interrupted_when_the_owner_is_killed() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 2000,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let c = Cluster::start(2, &mock, &common::need::redis_url()).await;
    let s = create_session(&c.url(0), None).await;
    let (seen, mut tokens) = token_signal();
    let b = tokio::spawn(read_until_final(
        watch(&c.url(1), &s, None).await,
        SLOW_WAIT,
        seen,
    ));
    post_message(&c.url(0), &s, false).await;
    wait_tokens(&mut tokens, 5).await;
    c.signal(0, "-KILL");
    let killed = Instant::now();
    let b = b.await.unwrap();
    let last = b.last().unwrap();
    assert_eq!(
        last.event,
        "interrupted",
        "{:?}",
        &b[b.len().saturating_sub(3)..]
    );
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "interrupted only after {:?}",
        killed.elapsed()
    );
    // The session is not left streaming: the reply is stored with what was produced.
    let m = last_assistant(&messages(&c.url(1), &s).await);
    assert_eq!(m["status"], "interrupted");
    assert_eq!(m["content"].as_str().unwrap(), text_of(&b));
    // Nor blocked: the user who presses Retry as soon as they see it gets a new reply.
    let (status, body) = try_post(&c.url(1), &s).await;
    assert_eq!(status, 202, "still blocked after `interrupted`: {body}");
}

/// A reply whose instance is killed while the model thinks is stored, by the instance that
/// ends it, with the thinking streamed so far.
#[tokio::test]
async fn a_lost_owners_reply_keeps_the_thinking_so_far() {
    crate::require!(Postgres, Redis);
    let upstream = reasoning_upstream(Duration::from_millis(500)).await;
    let c = Cluster::start_on(2, &upstream, &common::need::redis_url()).await;
    let s = create_session(&c.url(0), None).await;
    let (tx, mut thought) = tokio::sync::mpsc::channel(8);
    let b = tokio::spawn(read_until_final(
        watch(&c.url(1), &s, None).await,
        SLOW_WAIT,
        move |e: &Ev| {
            if e.event == "reasoning" {
                let _ = tx.try_send(());
            }
        },
    ));
    post_message(&c.url(0), &s, false).await;
    tokio::time::timeout(WAIT, thought.recv()).await.unwrap();
    c.signal(0, "-KILL");
    let b = b.await.unwrap();
    assert_eq!(b.last().unwrap().event, "interrupted", "{b:?}");
    let streamed: String = b
        .iter()
        .filter(|e| e.event == "reasoning")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert!(!streamed.is_empty() && thinking().starts_with(&streamed));
    let m = last_assistant(&messages(&c.url(1), &s).await);
    assert_eq!(m["status"], "interrupted");
    assert_eq!(m["reasoning"].as_str().unwrap(), streamed);
    assert_eq!(m["content"].as_str().unwrap(), text_of(&b));
}

/// A Redis server of the test's own, so it can be restarted without disturbing others.
struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    async fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server");
        let r = Self { port, child };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(c) = redis::Client::open(r.url()) {
                if let Ok(Ok(mut conn)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    c.get_multiplexed_async_connection(),
                )
                .await
                {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok()
                    {
                        return r;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn kill(mut self) -> u16 {
        self.child.kill().await.unwrap();
        self.port
    }
}

/// Events from a watcher's channel up to and with `done`; each must come within `within`.
async fn until_done(rx: &mut tokio::sync::mpsc::Receiver<Ev>, within: Duration) -> Vec<Ev> {
    let mut out = Vec::new();
    loop {
        let e = tokio::time::timeout(within, rx.recv())
            .await
            .unwrap()
            .unwrap();
        let end = e.event == "done";
        out.push(e);
        if end {
            return out;
        }
    }
}

async fn numsub(url: &str, channel: &str) -> i64 {
    match redis_cmd(url, &["PUBSUB", "NUMSUB", channel]).await {
        redis::Value::Array(v) => match v.get(1) {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

#[tokio::test]
async fn after_a_redis_restart_instances_resubscribe_and_fan_out_again() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 120,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let redis = OwnRedis::start(free_port()).await;
    let redis_url = redis.url();
    let c = Cluster::start(2, &mock, &redis_url).await;
    let prefix = c
        .env
        .iter()
        .find(|(k, _)| k == "SLUICE_REDIS_PREFIX")
        .unwrap()
        .1
        .clone();
    let s = create_session(&c.url(0), None).await;
    let channel = format!("{prefix}:ch:{s}");

    // B watches the session over one long-lived stream.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Ev>(1024);
    let watcher = tokio::spawn({
        let url = c.url(1);
        let s = s.clone();
        async move {
            let resp = watch(&url, &s, None).await;
            let mut events = resp.bytes_stream().eventsource();
            while let Some(Ok(e)) = events.next().await {
                if tx.send(Ev::from(e)).await.is_err() {
                    break;
                }
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    while numsub(&redis_url, &channel).await != 1 {
        assert!(Instant::now() < deadline, "B never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Redis goes away mid-stream and comes back empty.
    post_message(&c.url(0), &s, false).await;
    let mut first: Vec<Ev> = Vec::new();
    while first.iter().filter(|e| e.event == "token").count() < 10 {
        first.push(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let port = redis.kill().await;
    // Meanwhile readiness says why, and the instance itself carries on.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = client()
            .get(format!("{}/health/ready", c.url(1)))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        if status == 503 && v["bus"]["ok"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never showed the lost bus: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redis = OwnRedis::start(port).await;
    let deadline = Instant::now() + SLOW_WAIT;
    while numsub(&redis_url, &channel).await != 1 {
        assert!(Instant::now() < deadline, "B never re-subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.wait_ready(0, SLOW_WAIT).await;
    c.wait_ready(1, SLOW_WAIT).await;

    // The generation that straddled the restart reaches B whole.
    first.extend(until_done(&mut rx, SLOW_WAIT).await);
    assert_eq!(text_of(&first), full_reply(120), "{first:?}");

    // A new generation fans out again, without restarting anything.
    post_message(&c.url(0), &s, false).await;
    let second = until_done(&mut rx, WAIT).await;
    assert_eq!(second[0].event, "start");
    assert_eq!(text_of(&second), full_reply(120));
    watcher.abort();
    drop(redis);
}

#[tokio::test]
async fn through_nginx_tokens_arrive_one_by_one() {
    crate::require!(Postgres, Redis, Nginx);
    let mock = mock(MockConfig {
        tokens: 30,
        token_delay: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let mut c = Cluster::start(3, &mock, &common::need::redis_url()).await;
    let front = c.start_nginx().await;
    let s = create_session(&front, None).await;
    let started = Instant::now();
    let mut arrivals = Vec::new();
    let events = read_until_final(post_message(&front, &s, true).await, WAIT, |e| {
        if e.event == "token" {
            arrivals.push(started.elapsed());
        }
    })
    .await;
    assert_eq!(text_of(&events), full_reply(30));
    // 30 tokens 50 ms apart take about 1.5 s to produce; unbuffered, the first arrives
    // long before the last.
    let (first, last) = (arrivals[0], *arrivals.last().unwrap());
    assert!(
        last - first > Duration::from_millis(1000),
        "buffered: first {first:?}, last {last:?}"
    );

    // The OpenAI-compatible stream too.
    let started = Instant::now();
    let resp = client()
        .post(format!("{front}/v1/chat/completions"))
        .json(&body(true, json!({"tokens": 30, "token_ms": 50})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut chunks = resp.bytes_stream().eventsource();
    let mut times = Vec::new();
    while let Some(Ok(e)) = chunks.next().await {
        if e.data == "[DONE]" {
            break;
        }
        times.push(started.elapsed());
    }
    assert!(times.len() >= 30);
    assert!(*times.last().unwrap() - times[0] > Duration::from_millis(1000));
}

#[tokio::test]
async fn a_draining_instance_hands_its_clients_to_another_and_finishes_the_reply() {
    crate::require!(Postgres, Redis, Nginx);
    let mock = mock(MockConfig {
        tokens: 150,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let mut c = Cluster::start(3, &mock, &common::need::redis_url()).await;
    let front = c.start_nginx().await;
    let s = create_session(&front, None).await;

    // The session's traffic sticks to one instance: find it.
    let owner = client()
        .get(format!("{front}/api/sessions/{s}"))
        .send()
        .await
        .unwrap()
        .headers()
        .get("x-sluice-instance")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let ports: HashMap<String, usize> = c
        .instances
        .iter()
        .enumerate()
        .map(|(i, inst)| (format!("sluice-{}", inst.port), i))
        .collect();
    let owner = ports[&owner];

    let watcher = watch(&front, &s, None).await;
    post_message(&front, &s, false).await;
    let (seen, mut tokens) = token_signal();
    let first = tokio::spawn(read_until_final(watcher, WAIT, seen));
    wait_tokens(&mut tokens, 10).await;
    c.signal(owner, "-TERM");
    let mut seen = first.await.unwrap();
    assert_eq!(seen.last().unwrap().event, "reconnect", "{seen:?}");
    seen.pop();

    // What EventSource does: reconnect with the last id; nginx sends it elsewhere.
    let last = seen.last().unwrap().id.clone();
    let resumed = watch(&front, &s, Some(&last)).await;
    let answered_by = resumed.headers()["x-sluice-instance"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(ports[&answered_by], owner);
    let rest = read_until_final(resumed, WAIT, |_| {}).await;
    seen.extend(rest);
    assert_eq!(seen.last().unwrap().event, "done");
    let seqs: Vec<u64> = seen
        .iter()
        .map(|e| e.id.rsplit_once('.').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "a gap or a repeat"
    );
    assert_eq!(text_of(&seen), full_reply(150));

    // The draining owner finished the generation, stored it, and exited cleanly.
    assert_eq!(c.exit_code(owner, SLOW_WAIT).await, Some(0));
    let m = last_assistant(&messages(&front, &s).await);
    assert_eq!(m["status"], "complete");
    assert_eq!(m["content"], full_reply(150));
}

/// A client of one session through nginx, as a browser UI behaves: posts a message and
/// reads its stream; when told to reconnect (or cut off), resumes with the last id.
/// Returns every generation's events.
async fn converse(front: String, session: String, generations: usize) -> Vec<Vec<Ev>> {
    let mut all = Vec::new();
    for _ in 0..generations {
        // A 503 (the instance just started draining) or a refused connection: try again.
        let first = tokio::time::timeout(SLOW_WAIT, async {
            loop {
                let r = client()
                    .post(format!("{front}/api/sessions/{session}/messages"))
                    .header("accept", "text/event-stream")
                    .json(&json!({"content": "tell me about tides"}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => return r,
                    Ok(r) => assert!(
                        r.status() == 503 || r.status() == 502,
                        "{}: {:?}",
                        r.status(),
                        r.text().await
                    ),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("no instance accepted the message");
        let mut events = read_until_final(first, SLOW_WAIT, |_| {}).await;
        while events.last().map(|e| e.event.as_str()) != Some("done") {
            assert!(
                matches!(
                    events.last().map(|e| e.event.as_str()),
                    Some("reconnect") | None
                ),
                "{:?}",
                events.last()
            );
            if events.last().is_some_and(|e| e.event == "reconnect") {
                events.pop();
            }
            let last = events.last().expect("nothing before the cut").id.clone();
            let resumed = tokio::time::timeout(SLOW_WAIT, async {
                loop {
                    if let Ok(r) = client()
                        .get(format!("{front}/api/sessions/{session}/stream"))
                        .header("last-event-id", &last)
                        .send()
                        .await
                    {
                        if r.status() == 200 {
                            return r;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("could not resume");
            events.extend(read_until_final(resumed, SLOW_WAIT, |_| {}).await);
        }
        all.push(events);
    }
    all
}

#[tokio::test]
async fn a_rolling_restart_under_load_loses_no_token() {
    crate::require!(Postgres, Redis, Nginx);
    let mock = mock(MockConfig {
        tokens: 100,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let mut c = Cluster::start(3, &mock, &common::need::redis_url()).await;
    let front = c.start_nginx().await;
    let mut clients = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..6 {
        let s = create_session(&front, None).await;
        sessions.push(s.clone());
        clients.push(tokio::spawn(converse(front.clone(), s, 4)));
    }
    wait_stats(&mock, WAIT, |s| s.active_streams >= 6).await;
    for i in 0..3 {
        c.signal(i, "-TERM");
        assert_eq!(c.exit_code(i, SLOW_WAIT).await, Some(0), "{}", c.log(i));
        c.start_instance(i).await;
    }
    for (s, client) in sessions.iter().zip(clients) {
        let generations = client.await.unwrap();
        for events in &generations {
            let seqs: Vec<u64> = events
                .iter()
                .map(|e| e.id.rsplit_once('.').unwrap().1.parse().unwrap())
                .collect();
            assert_eq!(
                seqs,
                (0..seqs.len() as u64).collect::<Vec<_>>(),
                "a gap or a repeat"
            );
            assert_eq!(text_of(events), full_reply(100));
        }
        let stored: Vec<Value> = messages(&front, s)
            .await
            .into_iter()
            .filter(|m| m["role"] == "assistant")
            .collect();
        assert_eq!(stored.len(), 4);
        for m in stored {
            assert_eq!(m["status"], "complete");
            assert_eq!(m["content"], full_reply(100));
        }
    }
}

async fn task_events(base: &str, id: &str) -> Vec<Ev> {
    let r = client()
        .get(format!("{base}/api/tasks/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut out = Vec::new();
    let mut events = r.bytes_stream().eventsource();
    tokio::time::timeout(SLOW_WAIT, async {
        while let Some(Ok(e)) = events.next().await {
            let end = matches!(e.event.as_str(), "succeeded" | "failed" | "cancelled");
            out.push(Ev::from(e));
            if end {
                break;
            }
        }
    })
    .await
    .expect("the task's events never ended");
    out
}

async fn new_task(base: &str) -> String {
    let r = client()
        .post(format!("{base}/api/tasks"))
        .json(&json!({"messages": [{"role": "user", "content": "a long essay"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Instance 0 serves the API only; instance 1 runs every task.
async fn api_and_worker(mock: &MockServer) -> Cluster {
    let mut c = Cluster::start(1, mock, &common::need::redis_url()).await;
    c.instances.push(Instance {
        port: free_port(),
        child: None,
    });
    c.start_instance(1).await;
    // Restart the first as API-only, with the same database and prefix.
    c.signal(0, "-TERM");
    c.exit_code(0, SLOW_WAIT).await;
    c.env.push(("SLUICE_TASK_WORKERS".into(), "0".into()));
    c.start_instance(0).await;
    c.env.pop();
    c
}

#[tokio::test]
async fn a_task_running_on_another_instance_is_followed_from_this_one() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 60,
        token_delay: Duration::from_millis(10),
        ..Default::default()
    })
    .await;
    let c = api_and_worker(&mock).await;

    let id = new_task(&c.url(0)).await;
    let events = task_events(&c.url(0), &id).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert!(kinds.contains(&"running"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"succeeded"));
    assert_eq!(events.last().unwrap().data["result"], full_reply(60));
}

#[tokio::test]
async fn a_task_running_on_another_instance_is_cancelled_from_this_one() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 3000,
        token_delay: Duration::from_millis(10),
        ..Default::default()
    })
    .await;
    let c = api_and_worker(&mock).await;
    let long = mock_long(&c).await;
    let r = client()
        .delete(format!("{}/api/tasks/{long}", c.url(0)))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let events = task_events(&c.url(0), &long).await;
    assert_eq!(events.last().unwrap().event, "cancelled");
    // The worker stops its upstream call, long before the reply's 30 s are up.
    wait_stats(&mock, WAIT, |s| s.active_streams == 0).await;
    let v = get_json(&format!("{}/api/tasks/{long}", c.url(1))).await;
    assert_eq!(v["status"], "cancelled");
}

/// Starts a task and waits until the worker streams it.
async fn mock_long(c: &Cluster) -> String {
    let id = new_task(&c.url(0)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let v = get_json(&format!("{}/api/tasks/{id}", c.url(0))).await;
        if v["status"] == "running" && v["progress"]["tokens"].as_i64().unwrap_or(0) > 0 {
            return id;
        }
        assert!(Instant::now() < deadline, "the task never ran: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A post whose answer is checked by the caller: (status, JSON body).
async fn try_post(base: &str, session: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{base}/api/sessions/{session}/messages"))
        .json(&json!({"content": "and the moon?"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls the session's history until its last reply is no longer streaming.
async fn until_reply_ends(base: &str, session: &str) -> Value {
    let deadline = Instant::now() + SLOW_WAIT;
    loop {
        let m = last_assistant(&messages(base, session).await);
        if m["status"] != "streaming" {
            return m;
        }
        assert!(Instant::now() < deadline, "the reply never ended: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_generation_per_session_holds_while_redis_is_unreachable() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 150,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let redis = OwnRedis::start(free_port()).await;
    let c = Cluster::start(2, &mock, &redis.url()).await;
    let s = create_session(&c.url(0), None).await;
    let _ = redis.kill().await;

    let (status, a) = try_post(&c.url(0), &s).await;
    assert_eq!(status, 202, "{a}");
    let (status, b) = try_post(&c.url(1), &s).await;
    assert_eq!(status, 409, "a second generation started elsewhere: {b}");
    assert_eq!(b["error"]["code"], "generation_running", "{b}");

    // Once it has ended, the session takes the next message on any instance.
    let m = until_reply_ends(&c.url(1), &s).await;
    assert_eq!(m["status"], "complete", "{m}");
    assert_eq!(m["generation_id"], a["generation_id"]);
    let (status, b) = try_post(&c.url(1), &s).await;
    assert_eq!(status, 202, "{b}");
}

#[tokio::test]
async fn an_instance_starting_without_redis_leaves_the_others_live_replies_alone() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 200,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let mut c = Cluster::start(1, &mock, &common::need::redis_url()).await;
    let s = create_session(&c.url(0), None).await;
    let (seen, mut tokens) = token_signal();
    let a = tokio::spawn(read_until_final(
        watch(&c.url(0), &s, None).await,
        SLOW_WAIT,
        seen,
    ));
    post_message(&c.url(0), &s, false).await;
    wait_tokens(&mut tokens, 5).await;

    // B on the same database, without Redis: ready means its start-up is done.
    let saved = c.env.clone();
    c.env.retain(|(k, _)| k != "REDIS_URL");
    c.instances.push(Instance {
        port: free_port(),
        child: None,
    });
    c.start_instance(1).await;
    c.env = saved;
    let m = last_assistant(&messages(&c.url(1), &s).await);
    assert_eq!(
        m["status"], "streaming",
        "A's live reply was ended by B's start: {m}"
    );

    let a = a.await.unwrap();
    assert_eq!(a.last().unwrap().event, "done", "{:?}", a.last());
    let m = until_reply_ends(&c.url(1), &s).await;
    assert_eq!(m["status"], "complete", "{m}");
    assert_eq!(m["content"].as_str().unwrap(), full_reply(200));
}

#[tokio::test]
async fn the_stream_list_of_any_instance_shows_the_whole_cluster() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig {
        tokens: 2000,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let c = Cluster::start(2, &mock, &common::need::redis_url()).await;
    let mut running = Vec::new();
    for i in 0..2 {
        let s = create_session(&c.url(i), None).await;
        let (seen, mut tokens) = token_signal();
        let w = tokio::spawn(read_until_final(
            watch(&c.url(i), &s, None).await,
            SLOW_WAIT,
            seen,
        ));
        let (status, v) = try_post(&c.url(i), &s).await;
        assert_eq!(status, 202, "{v}");
        wait_tokens(&mut tokens, 3).await;
        let instance = format!("sluice-{}", c.instances[i].port);
        running.push((
            v["generation_id"].as_str().unwrap().to_owned(),
            s,
            instance,
            w,
        ));
    }
    for i in 0..2 {
        let list = get_json(&format!("{}/api/admin/streams", c.url(i))).await;
        let data = list["data"].as_array().unwrap();
        for (g, s, instance, _) in &running {
            let row = data
                .iter()
                .find(|r| r["generation_id"] == g.as_str())
                .unwrap_or_else(|| panic!("instance {i} does not list {g}: {list}"));
            assert_eq!(row["session_id"], s.as_str(), "{row}");
            assert_eq!(row["instance"], instance.as_str(), "{row}");
        }
        assert_eq!(data.len(), 2, "each generation once: {list}");
    }
    for (_, _, _, w) in running {
        w.abort();
    }
}

/// The official SDK drops a background response's stream on one instance and resumes it
/// with `starting_after` on another, which also cancels one running on the first.
#[tokio::test]
async fn a_background_response_resumes_and_is_cancelled_on_another_instance() {
    crate::require!(Postgres, Redis, SdkVenv);
    let mock = mock(MockConfig::default()).await;
    let c = Cluster::start(2, &mock, &common::need::redis_url()).await;
    let env = [
        ("SLUICE_BASE_URL", format!("{}/v1", c.url(0))),
        ("SLUICE_OTHER_URL", format!("{}/v1", c.url(1))),
        // Keyless on loopback: both instances act as the same local user.
        ("SLUICE_API_KEY", "unused".to_owned()),
        ("MOCK_BASE_URL", mock.url()),
        ("MOCK_ROOT", format!("http://{}", mock.addr)),
    ];
    crate::sdk::pytest("test_responses_stored.py", &env).await;
}

/// A background response whose instance is killed ends, for its reader on another
/// instance, with `response.failed` right after the last event it got, and reads `failed`.
#[tokio::test]
async fn a_background_response_of_a_lost_instance_ends_as_failed() {
    crate::require!(Postgres, Redis);
    let mock = mock(MockConfig::default()).await;
    let c = Cluster::start(2, &mock, &common::need::redis_url()).await;
    let created: Value = client()
        .post(format!("{}/v1/responses", c.url(0)))
        .json(
            &json!({"model": "mock-model", "input": "Go on", "background": true,
                      "mock": {"tokens": 2000, "token_ms": 20}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let resp = client()
        .get(format!("{}/v1/responses/{id}?stream=true", c.url(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream().eventsource();
    let mut got: Vec<Ev> = Vec::new();
    let mut deltas = 0;
    let mut killed = None;
    let read = async {
        while let Some(e) = events.next().await {
            let e = Ev::from(e.unwrap());
            deltas += usize::from(e.event == "response.output_text.delta");
            let end = e.event.starts_with("response.")
                && ["completed", "failed", "incomplete"]
                    .iter()
                    .any(|k| e.event.ends_with(k));
            got.push(e);
            if deltas == 5 && killed.is_none() {
                c.signal(0, "-KILL");
                killed = Some(Instant::now());
            }
            if end {
                break;
            }
        }
    };
    tokio::time::timeout(SLOW_WAIT, read).await.unwrap();
    let last = got.last().unwrap();
    assert_eq!(last.event, "response.failed", "{:?}", &got[got.len() - 3..]);
    assert_eq!(last.data["response"]["error"]["code"], "server_error");
    assert!(killed.unwrap().elapsed() < Duration::from_secs(10));
    let numbers: Vec<u64> = got
        .iter()
        .map(|e| e.data["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..got.len() as u64).collect::<Vec<_>>());
    let stored: Value = client()
        .get(format!("{}/v1/responses/{id}", c.url(1)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["status"], "failed", "{stored}");
}
