//! The `stream` and `json` scenarios: workers running requests back to back.
//!
//! With `--baseline-url`, the measured time is cut into rounds that alternate between the
//! baseline and `--url`, so both see the same machine: a compile or a noisy neighbour
//! during the run lands on both sides alike instead of on whichever ran second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::client::{Conn, EventKind, SseScan, Target, stamp, unix_ns};
use super::procstat::{self, CpuSnapshot, Watched};
use super::{BenchArgs, BenchError, Scenario, histogram, micros, request_body, summary};

/// How long requests still running at the end of the measured time may take to finish
/// before they are abandoned.
const DRAIN: Duration = Duration::from_secs(30);

/// Largest non-streamed body read; a chat completion of 64 tokens is about 1 KiB.
const MAX_JSON_BODY: usize = 1 << 20;

/// Which side runs when.
struct Schedule {
    /// Requests sent from here on are measured.
    measure: Instant,
    /// No request is sent from here on.
    end: Instant,
    round: Duration,
    sides: usize,
}

impl Schedule {
    /// The side whose round `t` falls in; `None` outside the measured time.
    fn side_at(&self, t: Instant) -> Option<usize> {
        if t < self.measure || t >= self.end {
            return None;
        }
        let k = (t - self.measure).as_secs_f64() / self.round.as_secs_f64();
        Some(k as usize % self.sides)
    }

    /// Measured seconds of each side.
    fn seconds(&self) -> Vec<f64> {
        let mut secs = vec![0.0; self.sides];
        let mut t = self.measure;
        let mut k = 0;
        while t < self.end {
            let next = (t + self.round).min(self.end);
            secs[k % self.sides] += (next - t).as_secs_f64();
            t = next;
            k += 1;
        }
        secs
    }
}

struct Totals {
    ttft: Histogram<u64>,
    gap: Histogram<u64>,
    total: Histogram<u64>,
    /// With `--stamp`: from sending the request to its arrival at the mock...
    to_mock: Histogram<u64>,
    /// ... from a token leaving the mock to its arrival here...
    from_mock: Histogram<u64>,
    /// ... and both for the first token: the time to first token minus the mock's wait.
    first_token_path: Histogram<u64>,
    /// Measured requests sent.
    sent: u64,
    /// Replies that ended as expected within the side's rounds.
    completed: u64,
    /// Tokens that arrived within the side's rounds.
    tokens: u64,
    failures: BTreeMap<String, u64>,
}

impl Totals {
    fn new() -> Result<Self, BenchError> {
        Ok(Self {
            ttft: histogram()?,
            gap: histogram()?,
            total: histogram()?,
            to_mock: histogram()?,
            from_mock: histogram()?,
            first_token_path: histogram()?,
            sent: 0,
            completed: 0,
            tokens: 0,
            failures: BTreeMap::new(),
        })
    }
}

struct Side {
    target: Target,
    totals: Mutex<Totals>,
}

struct Shared {
    schedule: Schedule,
    sides: Vec<Side>,
    /// Requests sent so far, against `--max-requests`.
    issued: AtomicU64,
}

pub async fn run(
    args: &BenchArgs,
    target: &Target,
    baseline: Option<&Target>,
    procs: &[Watched],
) -> Result<Value, BenchError> {
    let stream = args.scenario == Scenario::Stream;
    let body = request_body(
        stream,
        args.tokens,
        args.first_token_ms,
        args.token_ms,
        stream && args.stamp,
    )?;
    let mut sides = vec![Side {
        target: target.clone(),
        totals: Mutex::new(Totals::new()?),
    }];
    if let Some(b) = baseline {
        sides.push(Side {
            target: b.clone(),
            totals: Mutex::new(Totals::new()?),
        });
    }
    let start = Instant::now();
    let measure = start + Duration::from_secs_f64(args.warmup_secs);
    let end = measure + Duration::from_secs_f64(args.duration_secs);
    let round = if sides.len() > 1 {
        Duration::from_secs_f64(args.round_secs.max(0.1))
    } else {
        end - measure + Duration::from_secs(1)
    };
    let shared = Arc::new(Shared {
        schedule: Schedule {
            measure,
            end,
            round,
            sides: sides.len(),
        },
        sides,
        issued: AtomicU64::new(0),
    });
    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency {
        let (shared, body) = (shared.clone(), body.clone());
        let max = args.max_requests;
        let tokens = args.tokens;
        let stamped = stream && args.stamp;
        workers.spawn(async move {
            worker(&shared, body, max, stream.then_some(tokens), stamped).await;
        });
    }

    // CPU time is charged to the side whose round it was spent in.
    let n_sides = shared.sides.len();
    let mut cpu: Vec<Vec<f64>> = vec![vec![0.0; procs.len()]; n_sides];
    // Busy percent of each core times seconds, per side.
    let mut core_busy: Vec<Vec<f64>> = vec![Vec::new(); n_sides];
    tokio::time::sleep_until(measure).await;
    let mut from = CpuSnapshot::take(procs);
    let mut boundary = measure;
    let mut k = 0;
    while boundary < end {
        boundary = (boundary + round).min(end);
        tokio::time::sleep_until(boundary).await;
        let to = CpuSnapshot::take(procs);
        for (acc, d) in cpu[k % n_sides].iter_mut().zip(to.since(&from)) {
            *acc += d.unwrap_or(0.0);
        }
        let busy = procstat::core_busy(&from, &to);
        let span = (to.at() - from.at()).as_secs_f64();
        let side = &mut core_busy[k % n_sides];
        side.resize(busy.len(), 0.0);
        for (acc, b) in side.iter_mut().zip(busy) {
            *acc += b * span;
        }
        from = to;
        k += 1;
    }
    let drained = tokio::time::timeout(DRAIN, async {
        while workers.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    workers.abort_all();

    let secs = shared.schedule.seconds();
    let reports: Vec<Value> = shared
        .sides
        .iter()
        .enumerate()
        .map(|(i, side)| {
            let t = side.totals.lock();
            let failed: u64 = t.failures.values().sum();
            let s = secs[i];
            json!({
                "scenario": if stream { "stream" } else { "json" },
                "url_of_side": format!("http://{}{}", side.target.authority, side.target.path),
                "concurrency": args.concurrency,
                "tokens_per_reply": args.tokens,
                "first_token_ms": args.first_token_ms,
                "token_ms": args.token_ms,
                "duration_s": s,
                "round_s": round.as_secs_f64().min(args.duration_secs),
                "sent": t.sent,
                "completed": t.completed,
                "failed": failed,
                "failures": t.failures,
                "drained": drained,
                "replies_per_s": t.completed as f64 / s,
                "tokens_per_s": t.tokens as f64 / s,
                "ttft_ms": summary(&t.ttft),
                "gap_ms": summary(&t.gap),
                "total_ms": summary(&t.total),
                "to_mock_ms": summary(&t.to_mock),
                "from_mock_ms": summary(&t.from_mock),
                "first_token_path_ms": summary(&t.first_token_path),
                "procs": procstat::usage(procs, &cpu[i], s),
                "core_busy_pct": core_busy[i].iter().map(|b| b / s).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut reports = reports.into_iter();
    let mut report = reports.next().unwrap_or(Value::Null);
    if let (Value::Object(m), Some(b)) = (&mut report, reports.next()) {
        m.insert("baseline".into(), b);
    }
    Ok(report)
}

/// What one streamed reply looked like.
#[derive(Default)]
struct Reply {
    ttft: Option<u64>,
    /// Gaps between consecutive tokens, in µs; reused from reply to reply.
    gaps: Vec<u64>,
    /// With stamps: request to mock, and first token from mock, in µs.
    to_mock: Option<u64>,
    first_from_mock: Option<u64>,
    /// Every token's time from the mock, in µs; reused.
    from_mock: Vec<u64>,
    tokens: u64,
    /// Tokens that arrived within rounds of the side the reply came from.
    tokens_in_rounds: u64,
    done: bool,
    error_event: bool,
}

async fn worker(
    shared: &Shared,
    body: Bytes,
    max_requests: u64,
    expect_tokens: Option<u64>,
    stamped: bool,
) {
    let schedule = &shared.schedule;
    let mut conns: Vec<Option<Conn>> = shared.sides.iter().map(|_| None).collect();
    let mut reply = Reply::default();
    let mut scan = SseScan::default();
    let mut warmups = 0usize;
    loop {
        let now = Instant::now();
        if now >= schedule.end || shared.issued.fetch_add(1, Ordering::Relaxed) >= max_requests {
            return;
        }
        // Warm-up goes to every side in turn, so each has its connections (and sluice its
        // upstream pool) ready when measuring starts.
        let side_idx = schedule.side_at(now).unwrap_or_else(|| {
            warmups += 1;
            warmups % shared.sides.len()
        });
        let side = &shared.sides[side_idx];
        let fail = |why: String| *side.totals.lock().failures.entry(why).or_default() += 1;
        let mut c = match conns[side_idx].take() {
            Some(c) if c.is_reusable() => c,
            _ => match Conn::open(side.target.addr).await {
                Ok(c) => c,
                Err(e) => {
                    fail(format!("connect: {e}"));
                    // Bounded by the end of the run; no tight loop against a dead server.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let req = match side.target.request(body.clone()) {
            Ok(r) => r,
            Err(e) => {
                fail(format!("request: {e}"));
                return;
            }
        };
        let sent = Instant::now();
        let sent_unix = stamped.then(unix_ns);
        let measured = schedule.side_at(sent) == Some(side_idx);
        let resp = match c.send(req).await {
            Ok(r) => r,
            Err(e) => {
                fail(format!("send: {e}"));
                continue;
            }
        };
        let status = resp.status();
        let mut resp_body = resp.into_body();
        if !status.is_success() {
            let _ = c.read_all(&mut resp_body, 4096).await;
            fail(format!("status {}", status.as_u16()));
            conns[side_idx] = Some(c);
            continue;
        }
        let outcome = match expect_tokens {
            Some(expected) => read_stream(
                &mut c,
                &mut resp_body,
                &mut scan,
                &mut reply,
                (sent, sent_unix),
                (schedule, side_idx),
            )
            .await
            .map(|()| check_stream(&reply, expected)),
            None => c
                .read_all(&mut resp_body, MAX_JSON_BODY)
                .await
                .map(|b| check_json(&b)),
        };
        let finished = Instant::now();
        let mut t = side.totals.lock();
        t.sent += u64::from(measured);
        t.tokens += reply.tokens_in_rounds;
        match outcome {
            Ok(Ok(())) => {
                t.completed += u64::from(schedule.side_at(finished) == Some(side_idx));
                if measured {
                    t.total.saturating_record(micros(finished - sent));
                    if let Some(v) = reply.ttft {
                        t.ttft.saturating_record(v);
                    }
                    for &g in &reply.gaps {
                        t.gap.saturating_record(g);
                    }
                    for &g in &reply.from_mock {
                        t.from_mock.saturating_record(g);
                    }
                    if let (Some(a), Some(b)) = (reply.to_mock, reply.first_from_mock) {
                        t.to_mock.saturating_record(a);
                        t.first_token_path.saturating_record(a + b);
                    }
                }
            }
            // Failures count whenever they happen: none is expected, warm-up included.
            Ok(Err(why)) => *t.failures.entry(why).or_default() += 1,
            Err(e) => *t.failures.entry(format!("read: {e}")).or_default() += 1,
        }
        drop(t);
        conns[side_idx] = Some(c);
    }
}

async fn read_stream(
    conn: &mut Conn,
    body: &mut hyper::body::Incoming,
    scan: &mut SseScan,
    reply: &mut Reply,
    (sent, sent_unix): (Instant, Option<u128>),
    (schedule, side): (&Schedule, usize),
) -> Result<(), BenchError> {
    *reply = Reply {
        gaps: std::mem::take(&mut reply.gaps),
        from_mock: std::mem::take(&mut reply.from_mock),
        ..Reply::default()
    };
    reply.gaps.clear();
    reply.from_mock.clear();
    let mut last = sent;
    while let Some(data) = conn.next_data(body).await? {
        // One timestamp per read: events that arrive together arrived at the same time.
        let now = Instant::now();
        let now_unix = if sent_unix.is_some() { unix_ns() } else { 0 };
        let in_round = schedule.side_at(now) == Some(side);
        scan.feed(&data, |kind, event| match kind {
            EventKind::Token => {
                let stamped = sent_unix.and_then(|s| Some((s, stamp(event)?)));
                if let Some((_, (_, left))) = stamped {
                    reply
                        .from_mock
                        .push(ns_to_micros(now_unix.saturating_sub(left)));
                }
                if reply.tokens == 0 {
                    reply.ttft = Some(micros(now - sent));
                    if let Some((s, (arrived, left))) = stamped {
                        reply.to_mock = Some(ns_to_micros(arrived.saturating_sub(s)));
                        reply.first_from_mock = Some(ns_to_micros(now_unix.saturating_sub(left)));
                    }
                } else {
                    reply.gaps.push(micros(now - last));
                }
                last = now;
                reply.tokens += 1;
                reply.tokens_in_rounds += u64::from(in_round);
            }
            EventKind::Done => reply.done = true,
            EventKind::Error => reply.error_event = true,
            EventKind::Other => {}
        });
    }
    Ok(())
}

fn ns_to_micros(ns: u128) -> u64 {
    u64::try_from(ns / 1000).unwrap_or(u64::MAX).max(1)
}

fn check_stream(reply: &Reply, expected: u64) -> Result<(), String> {
    if reply.error_event {
        Err("in-band error event".into())
    } else if !reply.done {
        Err("no [DONE]".into())
    } else if reply.tokens != expected {
        Err(format!("{} tokens instead of {expected}", reply.tokens))
    } else {
        Ok(())
    }
}

fn check_json(body: &[u8]) -> Result<(), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("completion is not JSON: {e}"))?;
    match v["choices"][0]["message"]["content"].as_str() {
        Some(text) if !text.is_empty() => Ok(()),
        _ => Err("completion has no text".into()),
    }
}
