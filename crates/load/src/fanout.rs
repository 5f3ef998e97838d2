//! The `fanout` scenario: one chat session's generations watched by many subscribers.
//!
//! A session is created on the first instance, `--subscribers` clients follow it
//! (`GET /api/sessions/{id}/stream`), spread round-robin over `--instances`, and then
//! `--generations` replies are started one after the other on the first instance
//! (`POST /api/sessions/{id}/messages`). The mock upstream runs with `--stamp`, so every
//! token's text ends in the Unix time at which the mock sent it; each subscriber notes when
//! the token reached it, on the same clock. Per token, the delay to the *last* subscriber
//! is what a watcher of a shared generation waits at worst. With several instances (a
//! cluster sharing a Redis bus), subscribers on the other instances receive the tokens
//! through the bus.
//!
//! With `--baseline-url` (the mock's chat completions endpoint), the same number of tokens
//! is first read straight from the mock by one client: the delay of the loopback and the
//! client alone, the floor of every figure above.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Conn, EventKind, SseScan, Target, stamp, unix_ns};
use super::procstat::{self, CpuSnapshot, Watched};
use super::{BenchArgs, BenchError, histogram, request_body, summary};

/// Longest wait for all subscribers to be following before the first reply starts.
const SUBSCRIBE_LIMIT: Duration = Duration::from_secs(60);

/// Slack, past the reply's own length, for every subscriber to see its end.
const REPLY_SLACK: Duration = Duration::from_secs(30);

/// How often a reply start refused with 409 (the previous one is still being stored) is
/// tried again.
const START_TRIES: usize = 100;

/// What the subscribers share with the driver.
struct Ctx {
    /// Subscribers whose stream is open (response head received).
    following: AtomicUsize,
    /// Subscribers that failed before or while following.
    lost: AtomicUsize,
    /// Final events (`done`, `error`, `interrupted`) seen, over all subscribers.
    ends: AtomicUsize,
    progress: Notify,
    stop: CancellationToken,
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    /// (when the mock sent the token, its delay to this subscriber), in ns.
    tokens: Vec<(u64, u64)>,
    ends: usize,
    errors: usize,
    failure: Option<String>,
}

pub async fn run(
    args: &BenchArgs,
    instances: &[Target],
    baseline: Option<&Target>,
    procs: &[Watched],
) -> Result<Value, BenchError> {
    let first = instances
        .first()
        .ok_or("fanout needs at least one instance (--instances)")?;
    let generations = args.generations.max(1);
    let expected_tokens = args.tokens * generations as u64;
    let reply_len = Duration::from_millis(args.first_token_ms + args.tokens * args.token_ms);

    // One reply is enough for the reference: its delay barely varies.
    let direct = match baseline {
        Some(b) => Some(direct(args, b, 1, procs).await?),
        None => None,
    };

    let session = create_session(first).await?;
    let ctx = Arc::new(Ctx {
        following: AtomicUsize::new(0),
        lost: AtomicUsize::new(0),
        ends: AtomicUsize::new(0),
        progress: Notify::new(),
        stop: CancellationToken::new(),
    });
    let n = args.subscribers;
    let ramp = Duration::from_secs_f64(n as f64 / args.ramp_per_sec.max(1) as f64);
    let mut subs = JoinSet::new();
    let open_start = Instant::now();
    for i in 0..n {
        let due = open_start + ramp.mul_f64(i as f64 / n as f64);
        if due > Instant::now() + Duration::from_millis(1) {
            tokio::time::sleep_until(due).await;
        }
        let target = instances[i % instances.len()].at(&format!("/api/sessions/{session}/stream"));
        subs.spawn(subscriber(ctx.clone(), target, generations));
    }
    let deadline = open_start + ramp + SUBSCRIBE_LIMIT;
    wait_until(&ctx, deadline, |c| {
        c.following.load(Ordering::Relaxed) + c.lost.load(Ordering::Relaxed) >= n
    })
    .await;
    let open_s = open_start.elapsed().as_secs_f64();
    let following = ctx.following.load(Ordering::Relaxed);

    // Replies one after the other; CPU is counted while they run.
    let cpu_from = CpuSnapshot::take(procs);
    let mut started = 0usize;
    let mut start_failures: Vec<String> = Vec::new();
    for g in 0..generations {
        match start_reply(first, &session, g).await {
            Ok(()) => started += 1,
            Err(e) => {
                start_failures.push(e.to_string());
                break;
            }
        }
        let want = following * started;
        let deadline = Instant::now() + reply_len + REPLY_SLACK;
        wait_until(&ctx, deadline, |c| c.ends.load(Ordering::Relaxed) >= want).await;
    }
    let cpu_to = CpuSnapshot::take(procs);
    ctx.stop.cancel();

    let mut seen = Vec::with_capacity(n);
    let mut failures: HashMap<String, u64> = HashMap::new();
    while let Some(r) = subs.join_next().await {
        match r {
            Ok(s) => seen.push(s),
            Err(e) => *failures.entry(format!("task: {e}")).or_default() += 1,
        }
    }

    // Per token: how many subscribers got it, the first and the last delay.
    let mut per_token: HashMap<u64, (u64, u64, u64)> = HashMap::new();
    let mut all = histogram()?;
    let mut complete = 0u64;
    let mut errors = 0u64;
    for s in &seen {
        if let Some(f) = &s.failure {
            *failures.entry(f.clone()).or_default() += 1;
        }
        errors += s.errors as u64;
        if s.tokens.len() as u64 == expected_tokens && s.ends == generations && s.errors == 0 {
            complete += 1;
        }
        for &(sent, delay) in &s.tokens {
            let us = (delay / 1000).max(1);
            all.saturating_record(us);
            let e = per_token.entry(sent).or_insert((0, u64::MAX, 0));
            e.0 += 1;
            e.1 = e.1.min(us);
            e.2 = e.2.max(us);
        }
    }
    let mut last = histogram()?;
    let mut first_h = histogram()?;
    let mut spread = histogram()?;
    let mut short = 0u64;
    for &(count, min, max) in per_token.values() {
        last.saturating_record(max);
        first_h.saturating_record(min);
        spread.saturating_record(max - min + 1);
        short += u64::from(count < following as u64);
    }
    let mut report = json!({
        "scenario": "fanout",
        "instances": instances.iter().map(|t| t.authority.clone()).collect::<Vec<_>>(),
        "session": session,
        "subscribers": n,
        "following": following,
        "open_s": open_s,
        "generations": generations,
        "generations_started": started,
        "start_failures": start_failures,
        "tokens_per_generation": args.tokens,
        "token_ms": args.token_ms,
        "tokens_seen": per_token.len(),
        "tokens_not_delivered_to_all": short,
        "complete_subscribers": complete,
        "error_events": errors,
        "failed": n as u64 - complete,
        "failures": failures,
        "last_delay_ms": summary(&last),
        "first_delay_ms": summary(&first_h),
        "spread_ms": summary(&spread),
        "delay_ms": summary(&all),
        "core_busy_pct": procstat::core_busy(&cpu_from, &cpu_to),
        "procs": procstat::report(procs, &cpu_from, &cpu_to, |_| json!({})),
    });
    if let (Value::Object(m), Some(d)) = (&mut report, direct) {
        m.insert("baseline".into(), d);
    }
    Ok(report)
}

/// Waits until `done` holds or `deadline` passes; woken by subscriber progress, and at
/// least every 50 ms.
async fn wait_until(ctx: &Ctx, deadline: Instant, done: impl Fn(&Ctx) -> bool) {
    while !done(ctx) && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(50), ctx.progress.notified()).await;
    }
}

async fn create_session(first: &Target) -> Result<String, BenchError> {
    let target = first.at("/api/sessions");
    let body = Bytes::from_static(br#"{"title":"fan-out benchmark"}"#);
    let (status, body) = exchange(&target, body).await?;
    if status != 201 {
        return Err(format!(
            "POST /api/sessions: status {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let v: Value = serde_json::from_slice(&body)?;
    v.get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "POST /api/sessions: no id in the answer".into())
}

/// Starts reply `g`; a `409` means the previous reply is still being finished, and is
/// tried again shortly.
async fn start_reply(first: &Target, session: &str, g: usize) -> Result<(), BenchError> {
    let target = first.at(&format!("/api/sessions/{session}/messages"));
    let body = Bytes::from(serde_json::to_vec(
        &json!({"content": format!("Message {g}: say something, one token at a time.")}),
    )?);
    for _ in 0..START_TRIES {
        let (status, answer) = exchange(&target, body.clone()).await?;
        match status {
            202 => return Ok(()),
            409 => tokio::time::sleep(Duration::from_millis(20)).await,
            s => {
                return Err(format!(
                    "POST /api/sessions/{{id}}/messages: status {s}: {}",
                    String::from_utf8_lossy(&answer)
                )
                .into());
            }
        }
    }
    Err("POST /api/sessions/{id}/messages: still 409 after the previous reply ended".into())
}

/// One JSON request on a connection of its own: status and body.
async fn exchange(target: &Target, body: Bytes) -> Result<(u16, Vec<u8>), BenchError> {
    let mut conn = Conn::open(target.addr).await?;
    let resp = conn.send(target.post_json(body)?).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let bytes = conn.read_all(&mut body, 1 << 20).await?;
    Ok((status, bytes))
}

/// Follows the session until `generations` replies ended or the run stops.
async fn subscriber(ctx: Arc<Ctx>, target: Target, generations: usize) -> Seen {
    let mut seen = Seen {
        tokens: Vec::with_capacity(1024),
        ..Seen::default()
    };
    let mut counted = false;
    let outcome = follow(&ctx, &target, generations, &mut seen, &mut counted).await;
    if let Err(e) = outcome {
        seen.failure = Some(e.to_string());
        if !counted {
            ctx.lost.fetch_add(1, Ordering::Relaxed);
            ctx.progress.notify_one();
        }
    }
    seen
}

async fn follow(
    ctx: &Ctx,
    target: &Target,
    generations: usize,
    seen: &mut Seen,
    counted: &mut bool,
) -> Result<(), BenchError> {
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    let mut conn = Conn::open(target.addr).await?;
    let resp = conn.send(target.get_stream()?).await?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status().as_u16()).into());
    }
    let mut body = resp.into_body();
    ctx.following.fetch_add(1, Ordering::Relaxed);
    *counted = true;
    ctx.progress.notify_one();
    let mut scan = SseScan::default();
    while seen.ends < generations {
        let data = tokio::select! {
            biased;
            () = &mut stopped => return Err("stopped before the last reply ended".into()),
            d = conn.next_data(&mut body) => match d? {
                Some(d) => d,
                None => return Err("stream ended".into()),
            },
        };
        // One timestamp per read: events that arrive together arrived at the same time.
        let now = unix_ns();
        let mut ended = 0;
        scan.feed(&data, |_, event| match session_event(event) {
            SessionEvent::Token => {
                if let Some((_, sent)) = stamp(event) {
                    let sent = u64::try_from(sent).unwrap_or(u64::MAX);
                    let delay = u64::try_from(now.saturating_sub(u128::from(sent))).unwrap_or(0);
                    seen.tokens.push((sent, delay));
                }
            }
            SessionEvent::End { error } => {
                ended += 1;
                seen.errors += usize::from(error);
            }
            SessionEvent::Other => {}
        });
        if ended > 0 {
            seen.ends += ended;
            ctx.ends.fetch_add(ended, Ordering::Relaxed);
            ctx.progress.notify_one();
        }
    }
    Ok(())
}

enum SessionEvent {
    Token,
    End { error: bool },
    Other,
}

/// The type of one event of a session stream (`id:`, `event:`, `data:` lines).
fn session_event(event: &[u8]) -> SessionEvent {
    let kind = event
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"event: "));
    match kind {
        Some(b"token") => SessionEvent::Token,
        Some(b"done") => SessionEvent::End { error: false },
        Some(b"error" | b"interrupted") => SessionEvent::End { error: true },
        _ => SessionEvent::Other,
    }
}

/// The reference: the same tokens read straight from the mock by one client.
async fn direct(
    args: &BenchArgs,
    mock: &Target,
    generations: usize,
    procs: &[Watched],
) -> Result<Value, BenchError> {
    let body = request_body(true, args.tokens, args.first_token_ms, args.token_ms, true)?;
    let mut delays: Histogram<u64> = histogram()?;
    let mut tokens = 0u64;
    let mut failures: HashMap<String, u64> = HashMap::new();
    let cpu_from = CpuSnapshot::take(procs);
    let mut conn = Conn::open(mock.addr).await?;
    for _ in 0..generations {
        let resp = conn.send(mock.request(body.clone())?).await?;
        if !resp.status().is_success() {
            *failures
                .entry(format!("status {}", resp.status().as_u16()))
                .or_default() += 1;
            continue;
        }
        let mut body = resp.into_body();
        let mut scan = SseScan::default();
        while let Some(data) = conn.next_data(&mut body).await? {
            let now = unix_ns();
            scan.feed(&data, |kind, event| {
                if kind == EventKind::Token {
                    if let Some((_, sent)) = stamp(event) {
                        let us = u64::try_from(now.saturating_sub(sent) / 1000).unwrap_or(0);
                        delays.saturating_record(us.max(1));
                        tokens += 1;
                    }
                }
            });
        }
    }
    let cpu_to = CpuSnapshot::take(procs);
    let d = summary(&delays);
    Ok(json!({
        "scenario": "fanout",
        "subscribers": 1,
        "generations": generations,
        "tokens_per_generation": args.tokens,
        "token_ms": args.token_ms,
        "tokens_seen": tokens,
        "failed": failures.values().sum::<u64>(),
        "failures": failures,
        "last_delay_ms": d.clone(),
        "first_delay_ms": d.clone(),
        "delay_ms": d,
        "core_busy_pct": procstat::core_busy(&cpu_from, &cpu_to),
        "procs": procstat::report(procs, &cpu_from, &cpu_to, |_| json!({})),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_events_are_told_apart() {
        let token = b"id: g.1\nevent: token\ndata: {\"text\":\"a@1@2 \"}";
        assert!(matches!(session_event(token), SessionEvent::Token));
        assert_eq!(stamp(token), Some((1, 2)));
        assert!(matches!(
            session_event(b"id: g.9\nevent: done\ndata: {}"),
            SessionEvent::End { error: false }
        ));
        assert!(matches!(
            session_event(b"id: g.9\nevent: interrupted\ndata: {}"),
            SessionEvent::End { error: true }
        ));
        assert!(matches!(session_event(b"retry: 2000"), SessionEvent::Other));
        assert!(matches!(session_event(b": ping"), SessionEvent::Other));
    }
}
