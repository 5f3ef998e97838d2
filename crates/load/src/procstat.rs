//! CPU time and resident memory of processes, from `/proc`.

use std::time::Instant;

use serde_json::{Value, json};

/// `/proc/PID/stat` counts in clock ticks of `USER_HZ`, which Linux fixes at 100 on every
/// architecture it runs this on.
const TICKS_PER_SEC: f64 = 100.0;

/// A process whose use is reported: `--watch NAME=PID`, or the load client itself.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    /// `None` is this process.
    pub pid: Option<u32>,
}

impl Watched {
    fn path(&self, file: &str) -> String {
        match self.pid {
            Some(pid) => format!("/proc/{pid}/{file}"),
            None => format!("/proc/self/{file}"),
        }
    }

    /// utime + stime in seconds, over all threads.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(self.path("stat")).ok()?;
        // The command name may hold spaces and parentheses; the fields after its closing
        // parenthesis are fixed: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some((utime + stime) as f64 / TICKS_PER_SEC)
    }

    /// VmRSS in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(self.path("status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

pub fn parse_watch(s: &str) -> Result<Watched, String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("--watch {s:?}: expected NAME=PID"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("--watch {s:?}: {pid:?} is not a process id"))?;
    Ok(Watched {
        name: name.to_owned(),
        pid: Some(pid),
    })
}

/// CPU time of every watched process, and busy and total time of every core, at one
/// instant.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    at: Instant,
    secs: Vec<Option<f64>>,
    cores: Vec<(u64, u64)>,
}

/// `(busy, total)` ticks of each core from `/proc/stat`: what tells whether something
/// other than the benchmark (a compile, a neighbour) used the cores during a run.
fn cores() -> Vec<(u64, u64)> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle and iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Busy share of each core, in percent, between two snapshots.
pub fn core_busy(from: &CpuSnapshot, to: &CpuSnapshot) -> Vec<f64> {
    to.cores
        .iter()
        .zip(&from.cores)
        .map(|(b, a)| {
            let total = b.1.saturating_sub(a.1);
            if total == 0 {
                0.0
            } else {
                100.0 * b.0.saturating_sub(a.0) as f64 / total as f64
            }
        })
        .collect()
}

impl CpuSnapshot {
    pub fn take(procs: &[Watched]) -> Self {
        Self {
            at: Instant::now(),
            secs: procs.iter().map(Watched::cpu_secs).collect(),
            cores: cores(),
        }
    }

    pub fn at(&self) -> Instant {
        self.at
    }

    /// CPU seconds of each process since `from`.
    pub fn since(&self, from: &CpuSnapshot) -> Vec<Option<f64>> {
        self.secs
            .iter()
            .zip(&from.secs)
            .map(|(b, a)| Some(b.as_ref()? - a.as_ref()?))
            .collect()
    }
}

/// Per process: CPU seconds over `wall` seconds of measuring, and CPU use (100 = one core).
pub fn usage(procs: &[Watched], cpu_secs: &[f64], wall: f64) -> Value {
    let mut out = serde_json::Map::new();
    for (p, &cpu) in procs.iter().zip(cpu_secs) {
        out.insert(
            p.name.clone(),
            json!({
                "pid": p.pid,
                "cpu_s": cpu,
                "cpu_pct": (wall > 0.0).then(|| 100.0 * cpu / wall),
                "rss_kib": p.rss_kib(),
            }),
        );
    }
    Value::Object(out)
}

/// Per process: CPU seconds and CPU use (100 = one core) between two snapshots, and the
/// memory figures gathered by the scenario.
pub fn report(
    procs: &[Watched],
    from: &CpuSnapshot,
    to: &CpuSnapshot,
    extra: impl Fn(usize) -> Value,
) -> Value {
    let wall = to.at.duration_since(from.at).as_secs_f64();
    let cpus = to.since(from);
    let mut out = serde_json::Map::new();
    for (i, p) in procs.iter().enumerate() {
        let cpu = cpus.get(i).copied().flatten();
        let mut v = json!({
            "pid": p.pid,
            "cpu_s": cpu,
            "cpu_pct": cpu.filter(|_| wall > 0.0).map(|c| 100.0 * c / wall),
            "rss_kib": p.rss_kib(),
        });
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra(i)) {
            m.extend(e);
        }
        out.insert(p.name.clone(), v);
    }
    Value::Object(out)
}
