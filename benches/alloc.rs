//! Heap allocations per relayed token, counted by a global allocator that counts.
//! `cargo bench --bench alloc`.
//!
//! Every figure is marginal: the same work is done for a short and a long reply, and the
//! difference in allocations is divided by the difference in tokens, so what a request
//! costs once (parsing it, opening the upstream call, storing the message) drops out.
//!
//! - Pieces of the relay path, alone: upstream SSE parse (the hand-written `SseParser`,
//!   and eventsource-stream for comparison), `chat.completion.chunk` encode, hub publish.
//! - The whole path in one process: the mock upstream, sluice and a client on one thread.
//!   A reply read straight from the mock counts the mock's and the client's allocations;
//!   the same reply through sluice counts sluice's on top: the difference is sluice's.
//! - The heap an open, idle stream holds, direct and through sluice (see [`held`]).
//!
//! Prints a table and writes `target/bench/alloc.json`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::alloc::System;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice::config::{Config, ProviderConfig};
use sluice::domain::ChunkEncoder;
use sluice::hub::{EventKind, Hub};
use sluice::upstream::openai;
use sluice_mock::{MockConfig, token_text};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Tokens of the short and the long reply.
const SHORT: usize = 100;
const LONG: usize = 600;

/// Rounds of each measurement; the lowest count is kept (a round can only gain
/// allocations from outside noise: a timer wheel growing, a pool filling).
const ROUNDS: usize = 3;

fn count(f: impl FnOnce()) -> usize {
    let r = Region::new(GLOBAL);
    f();
    r.change().allocations
}

/// Allocations per token of `f(tokens)`, marginal between a short and a long run.
fn per_token(mut f: impl FnMut(usize)) -> f64 {
    let best =
        |f: &mut dyn FnMut(usize), n: usize| (0..ROUNDS).map(|_| count(|| f(n))).min().unwrap_or(0);
    f(SHORT); // warm-up
    let short = best(&mut f, SHORT);
    let long = best(&mut f, LONG);
    (long as f64 - short as f64) / (LONG - SHORT) as f64
}

/// An OpenAI stream of `tokens` tokens, one network read per event.
fn upstream_body(tokens: usize) -> Vec<Bytes> {
    let enc = ChunkEncoder::new("chatcmpl-bench", 1, "m");
    let mut out = vec![enc.role().frame().clone()];
    out.extend((0..tokens).map(|i| enc.content(&token_text(i)).frame().clone()));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

fn pieces(rt: &tokio::runtime::Runtime) -> Vec<(&'static str, f64)> {
    let (short, long) = (upstream_body(SHORT), upstream_body(LONG));
    let body = |n: usize| if n == SHORT { &short } else { &long };
    let mut rows = Vec::new();
    rows.push((
        "upstream parse + translate, SseParser (relay path)",
        per_token(|n| {
            let chunks = body(n).clone().into_iter().map(Ok::<_, std::io::Error>);
            let events = openai::translate_body("p".into(), futures::stream::iter(chunks));
            rt.block_on(events.count());
        }),
    ));
    rows.push((
        "upstream parse + translate, eventsource-stream",
        per_token(|n| {
            use eventsource_stream::Eventsource;
            let chunks = body(n).clone().into_iter().map(Ok::<_, std::io::Error>);
            let events = futures::stream::iter(chunks).eventsource().map(|r| {
                r.map_err(|e| sluice::upstream::UpstreamError::Malformed {
                    provider: "p".into(),
                    message: e.to_string(),
                })
            });
            rt.block_on(openai::translate("p".into(), events).count());
        }),
    ));
    let enc = ChunkEncoder::new("chatcmpl-bench", 1, "gpt-4o-mini");
    let words: Vec<String> = (0..LONG).map(token_text).collect();
    rows.push((
        "chat.completion.chunk encode (/v1)",
        per_token(|n| {
            for w in &words[..n] {
                std::hint::black_box(enc.content(w));
            }
        }),
    ));
    #[derive(serde::Serialize)]
    struct TokenData<'a> {
        text: &'a str,
    }
    let texts: Vec<String> = (0..LONG).map(token_text).collect();
    rows.push((
        "hub publish of a token event (sessions), no subscriber",
        per_token(|n| {
            let hub = Hub::new(16_384, Duration::from_secs(600));
            let ch = hub.create("01936f0e2b7a7c3e9a4b5d6e7f801234", "s", "o");
            for t in &texts[..n] {
                ch.publish_json(EventKind::Token, &TokenData { text: t });
            }
        }),
    ));
    rows
}

/// A mock replying `tokens` tokens 1 ms apart, and a sluice in front of it.
struct Pair {
    mock: sluice_mock::MockServer,
    sluice: String,
    stop: CancellationToken,
}

async fn pair(tokens: usize) -> Pair {
    let mock = sluice_mock::spawn(MockConfig {
        tokens,
        token_delay: Duration::from_millis(1),
        ..MockConfig::default()
    })
    .await
    .expect("mock");
    pair_for(mock).await
}

async fn pair_for(mock: sluice_mock::MockServer) -> Pair {
    let mut c = Config::default();
    c.store.data_dir = tempfile::tempdir().unwrap().keep();
    c.guards.rate_chat_per_min = 0;
    c.guards.rate_api_per_min = 0;
    c.guards.rate_admin_per_min = 0;
    c.upstream.provider_concurrency = 1_000;
    c.chat.default_model = "mock".into();
    c.upstream.providers = vec![ProviderConfig::openai("mock", &mock.url(), None)];
    let state = sluice::state::AppState::new(c).await.expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sluice = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = sluice::server::serve(state, listener, async move { s.cancelled().await }).await;
    });
    Pair { mock, sluice, stop }
}

/// Reads a response body to its end; the number of bytes.
async fn drain(resp: reqwest::Response) -> usize {
    assert!(resp.status().is_success(), "{}", resp.status());
    let mut body = resp.bytes_stream();
    let mut n = 0;
    while let Some(c) = body.next().await {
        n += c.unwrap().len();
    }
    n
}

fn whole(rt: &tokio::runtime::Runtime) -> Vec<(&'static str, f64)> {
    sluice::upstream::sse::install_crypto_provider();
    let client = reqwest::Client::new();
    let (short, long) = rt.block_on(async { (pair(SHORT).await, pair(LONG).await) });
    let at = |n: usize| if n == SHORT { &short } else { &long };
    let chat = json!({
        "model": "mock",
        "stream": true,
        "messages": [{"role": "user", "content": "Say something."}],
    });
    let direct = per_token(|n| {
        let url = format!("{}/chat/completions", at(n).mock.url());
        rt.block_on(async { drain(client.post(url).json(&chat).send().await.unwrap()).await });
    });
    let v1 = per_token(|n| {
        let url = format!("{}/v1/chat/completions", at(n).sluice);
        rt.block_on(async { drain(client.post(url).json(&chat).send().await.unwrap()).await });
    });
    let session = per_token(|n| {
        let base = at(n).sluice.clone();
        rt.block_on(async {
            let s: Value = client
                .post(format!("{base}/api/sessions"))
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = s["id"].as_str().unwrap();
            let resp = client
                .post(format!("{base}/api/sessions/{id}/messages"))
                .header("accept", "text/event-stream")
                .json(&json!({"content": "Say something."}))
                .send()
                .await
                .unwrap();
            drain(resp).await
        });
    });
    for p in [short, long] {
        p.stop.cancel();
        drop(p.mock);
    }
    vec![
        ("whole: mock -> client, direct (mock + client)", direct),
        ("whole: mock -> sluice /v1 -> client", v1),
        ("whole: mock -> sluice session stream -> client", session),
        ("  sluice's share, /v1 (through minus direct)", v1 - direct),
        (
            "  sluice's share, session stream (through minus direct)",
            session - direct,
        ),
    ]
}

/// Heap bytes gained in a region. stats_alloc already adds a realloc's growth to
/// `bytes_allocated` (and a shrink to `bytes_deallocated`); `bytes_reallocated` is that
/// same growth again, so adding it would count every realloc twice.
fn heap_growth(c: &stats_alloc::Stats) -> f64 {
    c.bytes_allocated as f64 - c.bytes_deallocated as f64
}

/// The heap figure must equal what was really kept: a buffer grown by reallocation,
/// held, counts its capacity once.
fn check_heap_growth() {
    let r = Region::new(GLOBAL);
    let mut kept: Vec<u8> = Vec::with_capacity(1024);
    for _ in 0..64 {
        kept.reserve_exact(1024);
        kept.resize(kept.capacity(), 1);
    }
    let c = r.change();
    let growth = heap_growth(&c);
    assert!(c.reallocations > 0, "the check must exercise realloc");
    assert_eq!(
        growth,
        kept.capacity() as f64,
        "heap growth counts reallocations once: {c:?}"
    );
    drop(std::hint::black_box(kept));
}

/// Streams held open at once for the heap measurement.
const HELD: usize = 200;

/// Heap bytes in use per open stream: `HELD` streams are opened (each has its first
/// token, then the mock waits a second per token) and the heap's growth is divided by
/// `HELD`. Through sluice minus direct is what sluice holds per stream: its client
/// connection, its upstream connection and the relay between them.
fn held(rt: &tokio::runtime::Runtime) -> Vec<(&'static str, f64)> {
    sluice::upstream::sse::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let p = rt.block_on(async {
        let mock = sluice_mock::spawn(MockConfig {
            tokens: 1_000,
            token_delay: Duration::from_secs(1),
            ..MockConfig::default()
        })
        .await
        .expect("mock");
        pair_for(mock).await
    });
    let chat = json!({
        "model": "mock",
        "stream": true,
        "messages": [{"role": "user", "content": "Say something."}],
    });
    let open = |url: String| {
        let (client, chat) = (client.clone(), chat.clone());
        async move {
            let resp = client.post(url).json(&chat).send().await.unwrap();
            assert!(resp.status().is_success());
            let mut body = resp.bytes_stream();
            // Up to the first token: the role chunk and the token may come apart.
            let mut seen = Vec::new();
            const FIRST: &[u8] = b"\"content\":\"Hello";
            while !seen.windows(FIRST.len()).any(|w| w == FIRST) {
                match body.next().await {
                    Some(Ok(c)) => seen.extend_from_slice(&c),
                    _ => break,
                }
            }
            body
        }
    };
    let per = |url: String| -> f64 {
        // Warm-up: pools, lazily built tables.
        rt.block_on(async {
            let s: Vec<_> = futures::future::join_all((0..8).map(|_| open(url.clone()))).await;
            drop(s);
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let r = Region::new(GLOBAL);
        let streams = rt.block_on(async {
            let s: Vec<_> = futures::future::join_all((0..HELD).map(|_| open(url.clone()))).await;
            // Let every task settle after its first token.
            tokio::time::sleep(Duration::from_millis(300)).await;
            s
        });
        let net = heap_growth(&r.change());
        drop(streams);
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
        net / HELD as f64 / 1024.0
    };
    let direct = per(format!("{}/chat/completions", p.mock.url()));
    let through = per(format!("{}/v1/chat/completions", p.sluice));
    p.stop.cancel();
    vec![
        ("heap KiB per open stream: direct (mock + client)", direct),
        ("heap KiB per open stream: through sluice /v1", through),
        (
            "  sluice's heap KiB per open stream (through minus direct)",
            through - direct,
        ),
    ]
}

// The table on stdout is what the bench reports.
#[allow(clippy::print_stdout)]
fn main() {
    check_heap_growth();
    // `cargo bench` passes `--bench`; under `cargo test` only the check above runs.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = pieces(&rt);
    rows.extend(whole(&rt));
    rows.extend(held(&rt));
    println!("\n| allocations per token (heap per stream) | |\n|---|---|");
    for (what, n) in &rows {
        println!("| {what} | {n:.2} |");
    }
    let out: serde_json::Map<String, Value> = rows
        .iter()
        .map(|(k, v)| ((*k).trim().to_owned(), json!((v * 100.0).round() / 100.0)))
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("alloc.json"),
        serde_json::to_vec_pretty(&out).unwrap(),
    );
}
