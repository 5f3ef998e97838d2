//! The store under faults: a PostgreSQL that hangs or refuses (through a TCP proxy the
//! test controls), and text the database would refuse.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::db::{Backend, TestDb, fresh};
use common::proxy::Proxy;
use sluice::config::Secret;
use sluice::store::{Store, StoreError};

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
