//! sluice-load: the load client of `scripts/bench.sh`.
//!
//! It sends OpenAI chat completion requests to one loopback endpoint — the mock upstream
//! directly, or sluice in front of it, so every figure has a baseline from the same run —
//! and reports in one JSON object, which the binary prints on stdout. Requests carry a `"mock"` object, which sluice
//! forwards untouched, so the mock produces the same reply either way.
//!
//! Scenarios:
//! - `stream`: `--concurrency` workers, each a keep-alive connection running streamed
//!   replies back to back: time to first token, gaps between tokens, streams and tokens per
//!   second.
//! - `json`: the same with `"stream": false`: completions per second and latency.
//! - `hold`: `--streams` long replies open at once for `--hold-secs`: how many stay healthy
//!   (a token at least every `--healthy-gap-ms`), the gap distribution, and the memory of
//!   the watched processes.
//! - `fanout`: `--subscribers` clients follow one chat session, spread over `--instances`,
//!   while `--generations` replies run: the delay from the mock sending a token to the last
//!   subscriber receiving it (the mock must run with `--stamp`).
//!
//! Every run is bounded in time and in requests.

mod client;
mod fanout;
mod hold;
mod load;
mod procstat;

use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use client::Target;
use procstat::Watched;

pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Stream,
    Json,
    Hold,
    Fanout,
}

/// Load-client options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Stream)]
    pub scenario: Scenario,
    /// The chat completions endpoint; the host must be 127.0.0.1.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/chat/completions")]
    pub url: String,
    /// A second endpoint measured in rounds alternating with `--url`, reported under
    /// `baseline` (stream, json).
    #[arg(long)]
    pub baseline_url: Option<String>,
    /// Length of one round when alternating, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub round_secs: f64,
    /// Requests in flight at once (stream, json).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Measured time after the warm-up, in seconds (stream, json).
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Time before measuring starts, in seconds (stream, json).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Most requests sent in all, warm-up included (stream, json).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_requests: u64,
    /// Tokens per reply (stream, json; hold sizes its replies to outlast the run).
    #[arg(long, default_value_t = 64)]
    pub tokens: u64,
    /// Upstream delay before the first token, in ms.
    #[arg(long, default_value_t = 0)]
    pub first_token_ms: u64,
    /// Upstream delay between tokens, in ms.
    #[arg(long, default_value_t = 0)]
    pub token_ms: u64,
    /// Have the mock stamp every token with when the request reached it and when the token
    /// left it, and report the time to the mock and back without the mock's own waits
    /// (stream).
    #[arg(long)]
    pub stamp: bool,
    /// Streams held open at once (hold).
    #[arg(long, default_value_t = 5_000)]
    pub streams: usize,
    /// How long the streams are held once all are open, in seconds (hold).
    #[arg(long, default_value_t = 30.0)]
    pub hold_secs: f64,
    /// New streams per second while opening them (hold).
    #[arg(long, default_value_t = 2_000)]
    pub ramp_per_sec: u64,
    /// Longest silence of a healthy stream, in ms (hold).
    #[arg(long, default_value_t = 1_000)]
    pub healthy_gap_ms: u64,
    /// Base URLs of the sluice instances, comma-separated (fanout): the session is created
    /// and its replies started on the first; subscribers are spread round-robin over all.
    /// Default: the host of `--url`.
    #[arg(long, value_delimiter = ',')]
    pub instances: Vec<String>,
    /// Clients following the session (fanout).
    #[arg(long, default_value_t = 1_000)]
    pub subscribers: usize,
    /// Replies started one after the other while the subscribers follow (fanout).
    #[arg(long, default_value_t = 3)]
    pub generations: usize,
    /// A process whose CPU time and memory are reported, as NAME=PID; repeatable.
    #[arg(long = "watch", value_parser = procstat::parse_watch)]
    pub watch: Vec<Watched>,
    /// Copied into the report, to tell runs apart.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// Runs one scenario and returns its report.
pub async fn run(args: BenchArgs) -> Result<Value, BenchError> {
    let target = Target::parse(&args.url)?;
    let baseline = args
        .baseline_url
        .as_deref()
        .map(Target::parse)
        .transpose()?;
    let instances = if args.instances.is_empty() {
        vec![target.clone()]
    } else {
        args.instances
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<Vec<_>, _>>()?
    };
    if args.concurrency == 0 || args.streams == 0 || args.subscribers == 0 {
        return Err("--concurrency, --streams and --subscribers must be at least 1".into());
    }
    // A single-threaded runtime of its own: the client shares a core with the mock, and
    // one thread that never hands work to another is the cheapest way to drive thousands
    // of connections there.
    let report = tokio::task::spawn_blocking(move || -> Result<Value, BenchError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut procs = args.watch.clone();
            procs.push(Watched {
                name: "client".into(),
                pid: None,
            });
            let mut report = match args.scenario {
                Scenario::Stream | Scenario::Json => {
                    load::run(&args, &target, baseline.as_ref(), &procs).await?
                }
                Scenario::Hold => hold::run(&args, &target, &procs).await?,
                Scenario::Fanout => {
                    fanout::run(&args, &instances, baseline.as_ref(), &procs).await?
                }
            };
            if let Value::Object(m) = &mut report {
                m.insert("label".into(), json!(args.label));
                m.insert("url".into(), json!(args.url));
            }
            Ok(report)
        })
    })
    .await??;
    Ok(report)
}

/// The request body: a short conversation, and the mock's knobs for this reply.
fn request_body(
    stream: bool,
    tokens: u64,
    first_token_ms: u64,
    token_ms: u64,
    stamp: bool,
) -> Result<Bytes, BenchError> {
    let mut body = json!({
        "model": "mock",
        "messages": [
            {"role": "system", "content": "You are a benchmark."},
            {"role": "user", "content": "Say something, one token at a time."}
        ],
        "stream": stream,
        "mock": {"tokens": tokens, "first_token_ms": first_token_ms, "token_ms": token_ms},
    });
    if stamp {
        body["mock"]["stamp"] = json!(true);
    }
    if stream {
        // sluice always asks its upstream for usage; asking directly too makes the mock
        // send the same events on both paths.
        body["stream_options"] = json!({"include_usage": true});
    }
    Ok(Bytes::from(serde_json::to_vec(&body)?))
}

/// A latency histogram in microseconds, up to an hour.
fn histogram() -> Result<Histogram<u64>, BenchError> {
    Ok(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Percentiles in milliseconds.
fn summary(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    if h.is_empty() {
        return json!({"n": 0});
    }
    json!({
        "n": h.len(),
        "p50": ms(0.5),
        "p90": ms(0.9),
        "p99": ms(0.99),
        "p999": ms(0.999),
        "max": h.max() as f64 / 1000.0,
        "mean": h.mean() / 1000.0,
    })
}
