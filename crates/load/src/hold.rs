//! The `hold` scenario: many long streams open at once.
//!
//! Streams are opened at `--ramp-per-sec`; the hold starts when every stream has had its
//! first token (or the opening time limit passed) and lasts `--hold-secs`. A stream is
//! healthy when, over the whole hold, it never went longer than `--healthy-gap-ms` without
//! a token and neither failed nor ended.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Conn, EventKind, SseScan, Target};
use super::procstat::{self, CpuSnapshot, Watched};
use super::{BenchArgs, BenchError, histogram, micros, request_body, summary};

/// How long stream tasks get to report after the hold ends.
const COLLECT: Duration = Duration::from_secs(30);

struct Ctx {
    /// Streams that received their first token.
    opened: AtomicUsize,
    /// Streams that failed before their first token.
    lost: AtomicUsize,
    /// When the hold began; tokens before it only count as the stream being open.
    start: OnceLock<Instant>,
    /// When the hold ended; set before `stop` fires.
    end: OnceLock<Instant>,
    stop: CancellationToken,
    /// Gaps between consecutive tokens, both within the hold, of every stream.
    gaps: Mutex<Histogram<u64>>,
}

enum Outcome {
    /// Longest silence within the hold.
    Held(Duration),
    Failed(String),
}

pub async fn run(
    args: &BenchArgs,
    target: &Target,
    procs: &[Watched],
) -> Result<Value, BenchError> {
    let n = args.streams;
    let token_ms = args.token_ms.max(1);
    let ramp = Duration::from_secs_f64(n as f64 / args.ramp_per_sec.max(1) as f64);
    let open_limit = ramp * 2 + Duration::from_secs(30);
    let hold = Duration::from_secs_f64(args.hold_secs);
    // Long enough that no reply ends on its own before the hold does.
    let lifetime = open_limit + hold + Duration::from_secs(30);
    let tokens = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX) / token_ms + 1;
    let body = request_body(true, tokens, args.first_token_ms, token_ms, false)?;
    let healthy_gap = Duration::from_millis(args.healthy_gap_ms);
    let ctx = Arc::new(Ctx {
        opened: AtomicUsize::new(0),
        lost: AtomicUsize::new(0),
        start: OnceLock::new(),
        end: OnceLock::new(),
        stop: CancellationToken::new(),
        gaps: Mutex::new(histogram()?),
    });

    let idle_rss: Vec<Option<u64>> = procs.iter().map(Watched::rss_kib).collect();
    let mut tasks = JoinSet::new();
    let ramp_start = Instant::now();
    for i in 0..n {
        let due = ramp_start + ramp.mul_f64(i as f64 / n as f64);
        if due > Instant::now() + Duration::from_millis(1) {
            tokio::time::sleep_until(due).await;
        }
        tasks.spawn(one_stream(ctx.clone(), target.clone(), body.clone()));
    }
    let open_deadline = ramp_start + open_limit;
    while ctx.opened.load(Ordering::Relaxed) + ctx.lost.load(Ordering::Relaxed) < n
        && Instant::now() < open_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_secs = ramp_start.elapsed().as_secs_f64();
    let opened = ctx.opened.load(Ordering::Relaxed);

    let start = Instant::now();
    let _ = ctx.start.set(start);
    let cpu_from = CpuSnapshot::take(procs);
    let end = start + hold;
    let mid = start + hold / 2;
    let mut rss_mid: Vec<Option<u64>> = vec![None; procs.len()];
    let mut rss_max: Vec<Option<u64>> = vec![None; procs.len()];
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    loop {
        every_second.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        for (i, p) in procs.iter().enumerate() {
            let rss = p.rss_kib();
            rss_max[i] = rss_max[i].max(rss);
            if rss_mid[i].is_none() && now >= mid {
                rss_mid[i] = rss;
            }
        }
    }
    tokio::time::sleep_until(end).await;
    let cpu_to = CpuSnapshot::take(procs);
    let _ = ctx.end.set(end);
    ctx.stop.cancel();

    let mut silences = histogram()?;
    let mut healthy = 0u64;
    let mut slow = 0u64;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let collected = tokio::time::timeout(COLLECT, async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Outcome::Held(silence)) => {
                    silences.saturating_record(micros(silence));
                    if silence <= healthy_gap {
                        healthy += 1;
                    } else {
                        slow += 1;
                    }
                }
                Ok(Outcome::Failed(why)) => *failures.entry(why).or_default() += 1,
                Err(e) => *failures.entry(format!("task: {e}")).or_default() += 1,
            }
        }
    })
    .await
    .is_ok();
    let missing = tasks.len();
    tasks.abort_all();
    if missing > 0 {
        failures.insert("did not report".into(), missing as u64);
    }
    let gaps = summary(&ctx.gaps.lock());
    let failed: u64 = failures.values().sum();
    Ok(json!({
        "scenario": "hold",
        "streams": n,
        "first_token_ms": args.first_token_ms,
        "token_ms": token_ms,
        "hold_s": hold.as_secs_f64(),
        "healthy_gap_ms": args.healthy_gap_ms,
        "opened": opened,
        "open_s": open_secs,
        "healthy": healthy,
        "slow": slow,
        "failed": failed,
        "failures": failures,
        "collected": collected,
        "gap_ms": gaps,
        "longest_silence_ms": summary(&silences),
        "core_busy_pct": procstat::core_busy(&cpu_from, &cpu_to),
        "procs": procstat::report(procs, &cpu_from, &cpu_to, |i| {
            let idle = idle_rss.get(i).copied().flatten();
            let during = rss_mid.get(i).copied().flatten();
            json!({
                "rss_idle_kib": idle,
                "rss_hold_kib": during,
                "rss_max_kib": rss_max.get(i).copied().flatten(),
                "rss_per_stream_kib": idle.zip(during).map(|(a, b)| (b as f64 - a as f64) / n as f64),
            })
        }),
    }))
}

async fn one_stream(ctx: Arc<Ctx>, target: Target, body: Bytes) -> Outcome {
    let mut first = None;
    let outcome = stream(&ctx, &target, body, &mut first).await;
    if first.is_none() {
        ctx.lost.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

/// Opens one stream and reads it until it fails or the hold ends.
async fn stream(ctx: &Ctx, target: &Target, body: Bytes, first: &mut Option<Instant>) -> Outcome {
    let failed = |what: &str, e: BenchError| Outcome::Failed(format!("{what}: {e}"));
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    let opening = async {
        let mut conn = Conn::open(target.addr)
            .await
            .map_err(|e| failed("connect", e))?;
        let req = target.request(body).map_err(|e| failed("request", e))?;
        let resp = conn.send(req).await.map_err(|e| failed("send", e))?;
        if !resp.status().is_success() {
            return Err(Outcome::Failed(format!(
                "status {}",
                resp.status().as_u16()
            )));
        }
        Ok((conn, resp.into_body()))
    };
    let (mut conn, mut body) = tokio::select! {
        biased;
        () = &mut stopped => return Outcome::Failed("not open when the hold ended".into()),
        r = opening => match r {
            Ok(open) => open,
            Err(outcome) => return outcome,
        },
    };
    let mut scan = SseScan::default();
    let mut last: Option<Instant> = None;
    let mut longest = Duration::ZERO;
    let mut error_event = false;
    let mut done = false;
    loop {
        let data = tokio::select! {
            biased;
            () = &mut stopped => {
                let (Some(&start), Some(&end)) = (ctx.start.get(), ctx.end.get()) else {
                    return Outcome::Failed("stopped before the hold".into());
                };
                if first.is_none_or(|t| t > start) {
                    return Outcome::Failed("not open when the hold began".into());
                }
                // The silence from the last token to the end of the hold counts too.
                let from = last.map_or(start, |l| l.max(start));
                return Outcome::Held(longest.max(end.saturating_duration_since(from)));
            }
            d = conn.next_data(&mut body) => match d {
                Ok(Some(data)) => data,
                Ok(None) => return Outcome::Failed("ended before the hold did".into()),
                Err(e) => return failed("read", e),
            },
        };
        let now = Instant::now();
        let start = ctx.start.get().copied();
        scan.feed(&data, |kind, _| match kind {
            EventKind::Token => {
                if first.is_none() {
                    *first = Some(now);
                    ctx.opened.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(start) = start.filter(|s| now >= *s) {
                    longest = longest.max(now - last.map_or(start, |l| l.max(start)));
                    if let Some(l) = last.filter(|l| *l >= start) {
                        ctx.gaps.lock().saturating_record(micros(now - l));
                    }
                }
                last = Some(now);
            }
            EventKind::Error => error_event = true,
            EventKind::Done => done = true,
            EventKind::Other => {}
        });
        if error_event {
            return Outcome::Failed("in-band error event".into());
        }
        if done {
            return Outcome::Failed("ended before the hold did".into());
        }
    }
}
