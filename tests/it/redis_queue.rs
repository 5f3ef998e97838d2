//! The Redis Streams task queue against a real Redis (`SLUICE_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Each test works under its own key prefix and deletes its keys,
//! so runs sharing one Redis never see each other.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::need::redis_url;
use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sluice::queue::redis::RedisQueue;
use sluice::queue::{QueueError, TaskQueue};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};

/// Long enough that nothing is reclaimed in tests that are not about reclaiming.
const NO_RECLAIM: Duration = Duration::from_secs(600);

/// A prefix of its own for one test; its keys are deleted when it drops, even after a failure.
struct Prefix {
    url: String,
    name: String,
}

impl Prefix {
    fn new() -> Self {
        Self::at(redis_url())
    }

    fn at(url: String) -> Self {
        Self {
            url,
            name: format!("sluice-test-{}", uuid::Uuid::new_v4()),
        }
    }

    fn stream(&self) -> String {
        format!("{}:tasks", self.name)
    }

    async fn queue(&self, reclaim_idle: Duration) -> RedisQueue {
        RedisQueue::connect(&self.url, &self.name, reclaim_idle)
            .await
            .unwrap()
    }

    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn xlen(&self) -> u64 {
        redis::cmd("XLEN")
            .arg(self.stream())
            .query_async(&mut self.raw().await)
            .await
            .unwrap()
    }

    /// Entries delivered and not acknowledged, over the whole group.
    async fn pending(&self) -> u64 {
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(self.stream())
            .arg("workers")
            .query_async(&mut self.raw().await)
            .await
            .unwrap();
        match summary {
            redis::Value::Array(items) => redis::from_redis_value_ref(&items[0]).unwrap(),
            other => panic!("unexpected XPENDING reply {other:?}"),
        }
    }

    /// Every key under this prefix, found with SCAN.
    fn keys(&self) -> Vec<String> {
        let Ok(mut conn) = redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
        else {
            return Vec::new();
        };
        let pattern = format!("{}:*", self.name);
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .unwrap_or_default();
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let keys = self.keys();
        if keys.is_empty() {
            return;
        }
        if let Ok(mut conn) =
            redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
        {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

#[tokio::test]
async fn push_pop_ack_is_fifo_and_acked_entries_are_deleted() {
    crate::require!(Redis);
    let prefix = Prefix::new();
    let q = prefix.queue(NO_RECLAIM).await;
    assert_eq!(q.backend(), "redis");
    assert_eq!(q.depth().await.unwrap(), 0);
    for id in ["t1", "t2", "t3"] {
        q.push(id).await.unwrap();
    }
    assert_eq!(q.depth().await.unwrap(), 3);

    let first = q.pop("w1", Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(first.task_id, "t1");
    assert!(!first.receipt.is_empty());
    // In flight still counts until acknowledged.
    assert_eq!(q.depth().await.unwrap(), 3);
    q.ack(&first).await.unwrap();
    assert_eq!(q.depth().await.unwrap(), 2);

    let second = q.pop("w1", Duration::from_secs(1)).await.unwrap().unwrap();
    let third = q.pop("w1", Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(
        (second.task_id.as_str(), third.task_id.as_str()),
        ("t2", "t3")
    );
    q.ack(&second).await.unwrap();
    q.ack(&third).await.unwrap();

    assert_eq!(prefix.xlen().await, 0);
    assert_eq!(prefix.pending().await, 0);
    assert_eq!(q.depth().await.unwrap(), 0);
    assert!(
        q.pop("w1", Duration::from_millis(100))
            .await
            .unwrap()
            .is_none()
    );
    // Nothing outside the prefix: the stream (which carries the group) is the only key.
    assert_eq!(prefix.keys(), vec![prefix.stream()]);
}

#[tokio::test]
async fn pop_returns_none_after_wait_on_an_empty_stream() {
    crate::require!(Redis);
    let prefix = Prefix::new();
    let q = prefix.queue(NO_RECLAIM).await;
    let started = Instant::now();
    assert!(
        q.pop("w1", Duration::from_millis(300))
            .await
            .unwrap()
            .is_none()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(290),
        "returned early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "overslept: {waited:?}");
    // A zero wait looks once and returns at once (BLOCK 0 would mean forever).
    let started = Instant::now();
    assert!(q.pop("w1", Duration::ZERO).await.unwrap().is_none());
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_waiting_pop_gets_a_task_pushed_meanwhile() {
    crate::require!(Redis);
    let prefix = Prefix::new();
    let q = Arc::new(prefix.queue(NO_RECLAIM).await);
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.pop("w1", Duration::from_secs(10)).await })
    };
    // A second instance pushes: the blocked read sits on its own connection, so this is not
    // stuck behind it.
    let other = prefix.queue(NO_RECLAIM).await;
    timeout(Duration::from_secs(2), other.push("late"))
        .await
        .unwrap()
        .unwrap();
    timeout(Duration::from_secs(2), q.push("later"))
        .await
        .unwrap()
        .unwrap();
    let got = timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.task_id, "late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_consumers_never_get_the_same_entry() {
    crate::require!(Redis);
    let prefix = Prefix::new();
    let producer = prefix.queue(NO_RECLAIM).await;
    let ids: Vec<String> = (0..50).map(|i| format!("task-{i}")).collect();
    for id in &ids {
        producer.push(id).await.unwrap();
    }

    let shared = Arc::new(prefix.queue(NO_RECLAIM).await);
    let other_instance = Arc::new(prefix.queue(NO_RECLAIM).await);
    let consumers: Vec<(Arc<RedisQueue>, &str)> = vec![
        (shared.clone(), "instance-a:w0"),
        (shared, "instance-a:w1"),
        (other_instance, "instance-b:w0"),
    ];
    let mut runs = tokio::task::JoinSet::new();
    for (q, name) in consumers {
        runs.spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = q.pop(name, Duration::from_millis(300)).await.unwrap() {
                q.ack(&d).await.unwrap();
                got.push(d.task_id);
            }
            got
        });
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    while let Some(got) = runs.join_next().await {
        for id in got.unwrap() {
            total += 1;
            assert!(seen.insert(id.clone()), "{id} delivered twice");
        }
    }
    assert_eq!(total, 50);
    assert_eq!(seen, ids.into_iter().collect::<HashSet<_>>());
    assert_eq!(prefix.xlen().await, 0);
    assert_eq!(prefix.pending().await, 0);
}

#[tokio::test]
async fn a_task_left_unacked_by_a_dead_consumer_is_redelivered_once_after_reclaim_idle() {
    crate::require!(Redis);
    let reclaim_idle = Duration::from_millis(200);
    let prefix = Prefix::new();
    let dying = prefix.queue(reclaim_idle).await;
    let survivor = prefix.queue(reclaim_idle).await;
    dying.push("t1").await.unwrap();

    let lost = dying
        .pop("dead", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    let delivered_at = Instant::now();
    assert_eq!(lost.task_id, "t1");
    // The instance dies with the task in hand.
    drop(dying);

    // Still within reclaim_idle: not redelivered.
    assert!(
        survivor
            .pop("alive", Duration::from_millis(50))
            .await
            .unwrap()
            .is_none()
    );

    // One pop waiting well past reclaim_idle gets it once the idle time is over.
    let back = survivor
        .pop("alive", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let idle = delivered_at.elapsed();
    assert_eq!(back, lost, "same task, same stream entry");
    // `delivered_at` was read just after Redis stamped the delivery; allow for that gap.
    assert!(
        idle >= reclaim_idle - Duration::from_millis(20),
        "reclaimed after only {idle:?}"
    );
    assert!(
        idle < Duration::from_secs(3),
        "reclaimed only after {idle:?}"
    );

    // Exactly once: the new owner holds it and its idle time starts over.
    assert!(
        survivor
            .pop("third", Duration::from_millis(100))
            .await
            .unwrap()
            .is_none()
    );
    survivor.ack(&back).await.unwrap();
    // Acknowledged: nothing comes back even after more than reclaim_idle.
    assert!(
        survivor
            .pop("third", Duration::from_millis(400))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(prefix.xlen().await, 0);
    assert_eq!(prefix.pending().await, 0);
}

#[tokio::test]
async fn a_pending_entry_deleted_meanwhile_is_skipped() {
    crate::require!(Redis);
    let reclaim_idle = Duration::from_millis(100);
    let prefix = Prefix::new();
    let q = prefix.queue(reclaim_idle).await;
    q.push("gone").await.unwrap();
    let d = q
        .pop("dead", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    let _: u64 = redis::cmd("XDEL")
        .arg(prefix.stream())
        .arg(&d.receipt)
        .query_async(&mut prefix.raw().await)
        .await
        .unwrap();

    // Past reclaim_idle, XAUTOCLAIM reports the entry as deleted: nothing is handed out.
    assert!(
        q.pop("alive", Duration::from_millis(400))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(prefix.pending().await, 0);
    q.push("next").await.unwrap();
    let next = q
        .pop("alive", Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.task_id, "next");
    q.ack(&next).await.unwrap();
}

#[tokio::test]
async fn a_lost_stream_and_group_are_recreated_and_nothing_pushed_meanwhile_is_missed() {
    crate::require!(Redis);
    let prefix = Prefix::new();
    let q = prefix.queue(NO_RECLAIM).await;
    // What a Redis restarted without persistence looks like: no stream, no group.
    let _: u64 = redis::cmd("DEL")
        .arg(prefix.stream())
        .query_async(&mut prefix.raw().await)
        .await
        .unwrap();
    // This push recreates the stream without the group.
    q.push("t1").await.unwrap();
    let d = q.pop("w1", Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(d.task_id, "t1");
    q.ack(&d).await.unwrap();
    assert_eq!(prefix.xlen().await, 0);
}

#[tokio::test]
async fn an_entry_without_a_task_id_is_dropped_not_delivered() {
    crate::require!(Redis);
    let prefix = Prefix::new();
    let q = prefix.queue(NO_RECLAIM).await;
    let _: String = redis::cmd("XADD")
        .arg(prefix.stream())
        .arg("*")
        .arg("something")
        .arg("else")
        .query_async(&mut prefix.raw().await)
        .await
        .unwrap();
    q.push("t1").await.unwrap();
    let d = q.pop("w1", Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(d.task_id, "t1");
    q.ack(&d).await.unwrap();
    assert_eq!(prefix.xlen().await, 0);
    assert_eq!(prefix.pending().await, 0);
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable_in_bounded_time() {
    crate::require!(Redis);
    for url in ["redis://127.0.0.1:1", "not a redis url"] {
        let result = timeout(
            Duration::from_secs(10),
            RedisQueue::connect(url, "sluice-test", NO_RECLAIM),
        )
        .await
        .unwrap_or_else(|_| panic!("connect to {url} did not give up"));
        assert!(
            matches!(result, Err(QueueError::Unavailable(_))),
            "{url}: {result:?}"
        );
    }
}

/// A Redis of this test's own, so it can be stopped and started without disturbing others.
async fn private_redis(port: u16) -> Option<Child> {
    let spawned = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("redis-server: {e}"),
    };
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Ready to accept connections") {
                return;
            }
        }
        panic!("redis-server exited before it was ready");
    })
    .await
    .expect("redis-server did not become ready");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Some(child)
}

#[tokio::test]
async fn redis_going_down_is_unavailable_and_coming_back_is_reconnected() {
    crate::require!(Redis);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(mut server) = private_redis(port).await else {
        eprintln!("redis-server not on PATH: skipping the restart test");
        return;
    };
    let prefix = Prefix::at(format!("redis://127.0.0.1:{port}"));
    let q = prefix.queue(NO_RECLAIM).await;
    q.push("before").await.unwrap();
    let d = q
        .pop("w1", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    q.ack(&d).await.unwrap();

    server.kill().await.unwrap();
    let down = Duration::from_secs(10);
    let push = timeout(down, q.push("while-down"))
        .await
        .expect("push hung");
    assert!(matches!(push, Err(QueueError::Unavailable(_))), "{push:?}");
    let pop = timeout(down, q.pop("w1", Duration::from_millis(100)))
        .await
        .expect("pop hung");
    assert!(matches!(pop, Err(QueueError::Unavailable(_))), "{pop:?}");
    let depth = timeout(down, q.depth()).await.expect("depth hung");
    assert!(
        matches!(depth, Err(QueueError::Unavailable(_))),
        "{depth:?}"
    );

    let _server = private_redis(port).await.unwrap();
    // The empty Redis lost stream and group; the queue recreates both.
    q.push("after").await.unwrap();
    let d = q.pop("w1", Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(d.task_id, "after");
    q.ack(&d).await.unwrap();
    assert_eq!(q.depth().await.unwrap(), 0);
}
