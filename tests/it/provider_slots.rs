//! `SLUICE_PROVIDER_CONCURRENCY` with Redis is one limit for the whole cluster: slots taken
//! on one instance are missing on the others, an ended stream frees its slot for any of
//! them, a killed instance's slots come back after their lease, and with Redis away each
//! instance keeps its own limit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;
use crate::common::need::redis_url;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use serde_json::{Value, json};
use sluice::config::{Config, RedisConfig, Secret};
use sluice_mock::{MockConfig, MockServer};

fn prefix() -> String {
    format!("sluice-test-{}", sluice::store::new_id())
}

/// An instance in front of `mock` with a provider limit of 2, sharing `prefix` on `redis`.
fn config(mock: &MockServer, redis: &str, prefix: &str, queue: Duration) -> Config {
    let mut c = config_for(mock);
    c.upstream.provider_concurrency = 2;
    c.upstream.provider_queue = queue;
    // Identical requests must each reach the upstream.
    c.cache.ttl = Duration::ZERO;
    c.redis = Some(RedisConfig {
        url: Secret::new(redis.to_owned()),
        prefix: prefix.to_owned(),
    });
    c
}

/// A stream long enough to hold its slot for the whole test.
fn long() -> Value {
    body(true, json!({"tokens": 400, "token_ms": 50}))
}

/// Starts a long stream on `url`; the task reads it until aborted or cut.
async fn hold(url: &str) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    let resp = post(url, &long()).await;
    assert_eq!(resp.status(), 200);
    tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        while let Some(Ok(_)) = body.next().await {}
    })
}

async fn assert_busy(url: &str) {
    let resp = post(url, &long()).await;
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_busy", "{v}");
}

#[tokio::test]
async fn two_instances_share_one_provider_limit() {
    crate::require!(Redis);
    let mock = mock(MockConfig::default()).await;
    let prefix = prefix();
    let a = TestServer::start(config(
        &mock,
        &redis_url(),
        &prefix,
        Duration::from_millis(300),
    ))
    .await;
    let b = TestServer::start(config(&mock, &redis_url(), &prefix, Duration::from_secs(3))).await;

    let first = hold(&a.chat_url()).await;
    let _second = hold(&a.chat_url()).await;
    wait_stats(&mock, WAIT, |s| s.active_streams == 2).await;
    // A's two streams are the whole limit: B has no slot of its own.
    assert_busy(&b.chat_url()).await;
    assert_busy(&a.chat_url()).await;

    // B waits for a slot; one of A's streams ending gives it one.
    let waiting = tokio::spawn({
        let url = b.chat_url();
        async move { post(&url, &long()).await }
    });
    first.abort();
    let resp = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("B got no slot")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let third = tokio::spawn(read_stream(resp));
    wait_stats(&mock, WAIT, |s| s.active_streams == 2).await;
    third.abort();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_killed_instances_slots_come_back_after_their_lease() {
    crate::require!(Redis);
    let mock = mock(MockConfig::default()).await;
    let prefix = prefix();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut killed = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_URL", redis_url())
        .env("SLUICE_REDIS_PREFIX", &prefix)
        .env("OPENAI_BASE_URL", mock.url())
        .env("SLUICE_PROVIDER_CONCURRENCY", "2")
        .env("SLUICE_CACHE_TTL_SECS", "0")
        .env("SLUICE_RATE_CHAT_PER_MIN", "0")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let ready = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(r) = client()
                .get(format!("http://127.0.0.1:{port}/health/ready"))
                .send()
                .await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "the instance to kill never got ready");
    let _streams = [hold(&url).await, hold(&url).await];
    wait_stats(&mock, WAIT, |s| s.active_streams == 2).await;

    killed.start_kill().unwrap();
    killed.wait().await.unwrap();
    let killed_at = Instant::now();
    // Named as `OPENAI_BASE_URL` names it: slots are counted by provider name.
    let mut cfg = config(&mock, &redis_url(), &prefix, Duration::from_millis(200));
    cfg.upstream.providers[0].name = "openai".into();
    let b = TestServer::start(cfg).await;
    // The dead instance's leases still count for a while...
    assert_busy(&b.chat_url()).await;
    // ...and no longer once they ran out.
    let served = tokio::time::timeout(WAIT, async {
        loop {
            let resp = post(&b.chat_url(), &body(true, json!({"tokens": 2}))).await;
            if resp.status() == 200 {
                return read_stream(resp).await;
            }
        }
    })
    .await
    .expect("the killed instance's slots never came back");
    assert!(served.done);
    let after = killed_at.elapsed();
    assert!(after >= Duration::from_secs(2), "freed after {after:?}");
    b.shutdown().await;
}

#[tokio::test]
async fn with_redis_away_each_instance_keeps_its_own_limit() {
    crate::require!(Redis);
    let mock = mock(MockConfig::default()).await;
    let mut proxy = Proxy::start(common::need::redis_addr()).await;
    let s = TestServer::start(config(
        &mock,
        &format!("redis://{}/", proxy.addr),
        &prefix(),
        Duration::from_millis(300),
    ))
    .await;
    proxy.stop();

    let started = Instant::now();
    let _streams = [hold(&s.chat_url()).await, hold(&s.chat_url()).await];
    wait_stats(&mock, WAIT, |st| st.active_streams == 2).await;
    // Streams did not wait on Redis beyond its short timeout.
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_busy(&s.chat_url()).await;
    let metrics = metrics_text(&s.url).await;
    assert!(
        metrics.contains("sluice_provider_slots_shared{provider=\"mock\"} 0"),
        "{metrics}"
    );
    s.shutdown().await;
}
