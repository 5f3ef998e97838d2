//! The stream hub's hot path: one generation's event published and read by every
//! subscriber. `cargo bench --bench hub`.
#![allow(clippy::expect_used)]

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice::hub::{Event, EventKind, Hub};

/// A token event's payload as the chat service publishes it.
const TOKEN: &[u8] = br#"{"text":" token"}"#;

/// A generation id as sluice makes them (a UUIDv7, simple form).
const GENERATION: &str = "01936f0e2b7a7c3e9a4b5d6e7f801234";

fn hub() -> Hub {
    Hub::new(16_384, Duration::from_secs(600))
}

/// Encoding an event and appending it to the log, with nobody listening.
fn encode(c: &mut Criterion) {
    let hub = hub();
    let ch = hub.create(GENERATION, "session", "owner");
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hub_token_event", |b| {
        b.iter(|| black_box(ch.publish(EventKind::Token, black_box(TOKEN))))
    });
    g.bench_function("hub_token_event_json", |b| {
        #[derive(serde::Serialize)]
        struct TokenData<'a> {
            text: &'a str,
        }
        b.iter(|| {
            black_box(ch.publish_json(
                EventKind::Token,
                &TokenData {
                    text: black_box(" token"),
                },
            ))
        })
    });
    g.finish();
}

/// One token published, then read by each of `n` subscribers.
fn publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub_publish");
    for n in [1usize, 10, 100, 1000] {
        g.throughput(Throughput::Elements(n as u64));
        // The reads alone: every subscriber finds the event at once, no task switch.
        g.bench_with_input(BenchmarkId::new("read_inline", n), &n, |b, &n| {
            let hub = hub();
            let ch = hub.create(GENERATION, "session", "owner");
            let mut subs: Vec<_> = (0..n).map(|_| ch.subscribe(None)).collect();
            let mut out: Vec<Event> = Vec::with_capacity(64);
            b.iter(|| {
                ch.publish(EventKind::Token, TOKEN);
                for s in &mut subs {
                    assert!(s.now_batch(&mut out));
                    black_box(&out);
                }
            })
        });
        // As in the server: each subscriber a task waiting on the channel, woken by the
        // publish, on one thread.
        g.bench_with_input(BenchmarkId::new("wake_tasks", n), &n, |b, &n| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let local = tokio::task::LocalSet::new();
            let hub = hub();
            let ch = hub.create(GENERATION, "session", "owner");
            let read = Rc::new(Cell::new(0u64));
            for _ in 0..n {
                let mut sub = ch.subscribe(None);
                let read = read.clone();
                local.spawn_local(async move {
                    let mut out: Vec<Event> = Vec::with_capacity(64);
                    while sub.next_batch(&mut out).await.is_ok() {
                        read.set(read.get() + out.len() as u64);
                        black_box(&out);
                    }
                });
            }
            let mut want = 0u64;
            b.iter(|| {
                ch.publish(EventKind::Token, TOKEN);
                want += n as u64;
                local.block_on(&rt, async {
                    while read.get() < want {
                        tokio::task::yield_now().await;
                    }
                });
            })
        });
    }
    g.finish();
}

criterion_group!(benches, encode, publish);
criterion_main!(benches);
