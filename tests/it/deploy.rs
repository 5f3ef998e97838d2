//! The deployment files as shipped: nginx/sluice.conf passes `nginx -t`, the systemd units
//! pass `systemd-analyze verify`, scripts/install.sh puts everything where it belongs,
//! scripts/cluster.sh runs instances behind nginx and stops every process it started, and
//! the binary speaks sd_notify to systemd.
//!
//! nginx and systemd-analyze must be installed (scripts/test.sh installs nginx); a missing
//! one fails the test with a message instead of skipping it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::db::{Backend, fresh};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
/// Bound on a whole cluster start or stop; a debug build migrates and connects slowly.
const SCRIPT_WAIT: Duration = Duration::from_secs(120);

fn nginx() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nginx is not installed: scripts/test.sh installs it (apt-get install nginx)");
}

fn systemd_analyze() -> PathBuf {
    for p in ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("systemd-analyze is not installed (apt-get install systemd)");
}

fn free_ports(n: usize) -> Vec<u16> {
    // Held together so the n ports differ; released just before the cluster binds them.
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn script(name: &str) -> String {
    format!("{ROOT}/scripts/{name}")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a script to completion within `SCRIPT_WAIT`.
async fn run(cmd: &mut tokio::process::Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(SCRIPT_WAIT, child.wait_with_output())
        .await
        .expect("script did not finish in time")
        .unwrap()
}

// --- processes, as /proc shows them ------------------------------------------------------------

/// `/proc/<pid>/stat` after the command name: state, ppid, pgrp, session, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Running, as opposed to gone or a zombie nobody has reaped yet.
fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f[0] != "Z")
}

/// Live processes in the session `sid` (a daemonized nginx: its master and workers).
fn session_members(sid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if stat_fields(pid).is_some_and(|f| f[0] != "Z" && f[3] == sid.to_string()) {
            out.push(pid);
        }
    }
    out
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

// --- nginx ---------------------------------------------------------------------------------

/// `scripts/cluster.sh nginx-conf DIR`: the code path `start` uses, rendering only.
async fn render_nginx(dir: &Path, ports: &[u16], nginx_port: u16) {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let out = run(tokio::process::Command::new("bash")
        .arg(script("cluster.sh"))
        .arg("nginx-conf")
        .arg(dir)
        .env("CLUSTER_PORTS", ports.join(" "))
        .env("CLUSTER_NGINX_PORT", nginx_port.to_string()))
    .await;
    assert!(
        out.status.success(),
        "cluster.sh nginx-conf: {}",
        text(&out)
    );
}

fn nginx_t(dir: &Path, conf: &Path) -> Output {
    std::process::Command::new(nginx())
        .arg("-t")
        .arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-e")
        .arg(dir.join("nginx-t.log"))
        .arg("-c")
        .arg(conf)
        .output()
        .unwrap()
}

fn assert_clean_nginx_t(out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("test is successful"),
        "nginx -t: {}",
        text(out)
    );
    assert!(
        !err.contains("[warn]") && !err.contains("[emerg]"),
        "nginx -t warns: {err}"
    );
}

#[tokio::test]
async fn nginx_t_passes_on_the_shipped_config() {
    crate::require!(Nginx);
    let tmp = tempfile::tempdir().unwrap();

    // As scripts/cluster.sh runs it: the shipped file with the cluster's ports put in.
    let rendered = tmp.path().join("rendered");
    render_nginx(&rendered, &[8001, 8002, 8003], free_ports(1)[0]).await;
    assert_clean_nginx_t(&nginx_t(&rendered, &rendered.join("nginx.conf")));

    // Only the upstream servers and the listen port differ from what ships.
    let shipped = std::fs::read_to_string(format!("{ROOT}/nginx/sluice.conf")).unwrap();
    let ours = std::fs::read_to_string(rendered.join("sluice.conf")).unwrap();
    let rest = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| {
                let l = l.trim_start();
                !l.starts_with("server 127.0.0.1:") && !l.starts_with("listen ")
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(rest(&shipped), rest(&ours));
    for port in [8001, 8002, 8003] {
        let line = format!("server 127.0.0.1:{port} ");
        assert_eq!(ours.matches(&line).count(), 2, "{port} in both upstreams");
    }

    // As scripts/install.sh deploys it: the file itself, included in the http context of
    // a main configuration like Debian's (gzip on, mime types).
    let verbatim = tmp.path().join("verbatim");
    std::fs::create_dir_all(verbatim.join("temp")).unwrap();
    let d = verbatim.display();
    let main = format!(
        "pid {d}/nginx.pid;\n\
         events {{ worker_connections 768; }}\n\
         http {{\n\
             access_log off;\n\
             sendfile on;\n\
             tcp_nopush on;\n\
             include /etc/nginx/mime.types;\n\
             default_type application/octet-stream;\n\
             gzip on;\n\
             client_body_temp_path {d}/temp/body;\n\
             proxy_temp_path {d}/temp/proxy;\n\
             fastcgi_temp_path {d}/temp/fastcgi;\n\
             uwsgi_temp_path {d}/temp/uwsgi;\n\
             scgi_temp_path {d}/temp/scgi;\n\
             include {ROOT}/nginx/sluice.conf;\n\
         }}\n"
    );
    std::fs::write(verbatim.join("nginx.conf"), main).unwrap();
    assert_clean_nginx_t(&nginx_t(&verbatim, &verbatim.join("nginx.conf")));
}

// --- systemd -------------------------------------------------------------------------------

/// Both units verified together (the target pulls in instances of the template). verify
/// insists that ExecStart's binary exists, so it checks a copy whose ExecStart is the
/// binary under test instead of /usr/local/bin/sluice; nothing else changes.
#[test]
fn systemd_units_pass_verify() {
    let tmp = tempfile::tempdir().unwrap();
    for unit in ["sluice@.service", "sluice.target"] {
        let shipped = std::fs::read_to_string(format!("{ROOT}/systemd/{unit}")).unwrap();
        let copy = shipped.replace(
            "ExecStart=/usr/local/bin/sluice ",
            &format!("ExecStart={SLUICE} "),
        );
        if unit.ends_with(".service") {
            assert_ne!(copy, shipped, "ExecStart is /usr/local/bin/sluice");
        }
        std::fs::write(tmp.path().join(unit), copy).unwrap();
    }
    let out = std::process::Command::new(systemd_analyze())
        .arg("verify")
        .arg(tmp.path().join("sluice@8001.service"))
        .arg(tmp.path().join("sluice.target"))
        .current_dir(tmp.path())
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    // verify exits 0 on mere warnings (an unknown key, a bad value it ignores): any line
    // about these units is a failure too.
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Vec<&str> = all.lines().filter(|l| l.contains("sluice")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );

    // What the drain needs: systemd waits longer than sluice drains (30 s + 5 s grace).
    let unit = std::fs::read_to_string(format!("{ROOT}/systemd/sluice@.service")).unwrap();
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim_end_matches('s').parse::<u64>().ok())
        .expect("TimeoutStopSec=<n>s");
    let drain = sluice::config::Config::default().server.drain.as_secs();
    assert!(stop > drain + 5, "TimeoutStopSec={stop}s vs drain {drain}s");
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "KillSignal=SIGTERM",
        "PartOf=sluice.target",
        // Behind nginx every request is from loopback: `auto` would let all in as admin.
        "Environment=SLUICE_AUTH=required",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
    // The env file is read after Environment=, so it can still override the default.
    let pos = |prefix: &str| unit.lines().position(|l| l.starts_with(prefix)).unwrap();
    assert!(pos("Environment=SLUICE_AUTH=") < pos("EnvironmentFile="));

    // Starting waits for PostgreSQL and Redis up to SLUICE_START_WAIT_SECS (300 s by
    // default) before READY=1: systemd must wait longer.
    let secs = |section: &str, key: &str| -> u64 {
        let mut current = "";
        for l in unit.lines() {
            if l.starts_with('[') {
                current = l;
            } else if current == section {
                if let Some(v) = l.strip_prefix(&format!("{key}=")) {
                    return v.trim_end_matches('s').parse().unwrap();
                }
            }
        }
        panic!("{key}= in {section}");
    };
    let start_wait = 300;
    let start_timeout = secs("[Service]", "TimeoutStartSec");
    assert!(
        start_timeout > start_wait + 10,
        "TimeoutStartSec={start_timeout}s"
    );
    let restart = secs("[Service]", "RestartSec");
    let interval = secs("[Unit]", "StartLimitIntervalSec");
    let burst = secs("[Unit]", "StartLimitBurst");
    // A config that exits at once: `burst` starts RestartSec apart fit in the interval,
    // so systemd gives up instead of restarting forever.
    assert!(
        (burst - 1) * restart < interval,
        "{burst} starts every {restart}s vs {interval}s"
    );
    // A dependency outage: each start waits the full start wait before failing, so two
    // starts are never within one interval and the limit is never reached.
    assert!(
        start_wait + restart > interval,
        "outage restarts hit the start limit"
    );
}

// --- install.sh --------------------------------------------------------------------------------

async fn install(destdir: &Path, args: &[&str]) -> Output {
    run(tokio::process::Command::new("bash")
        .arg(script("install.sh"))
        .args(args)
        .env("DESTDIR", destdir)
        .env("SLUICE_BIN", SLUICE))
    .await
}

#[tokio::test]
async fn install_sh_into_a_destdir() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    // Debian's stock site, which would shadow sluice's server on port 80.
    std::fs::create_dir_all(dest.join("etc/nginx/sites-enabled")).unwrap();
    std::os::unix::fs::symlink(
        "/etc/nginx/sites-available/default",
        dest.join("etc/nginx/sites-enabled/default"),
    )
    .unwrap();

    // --dry-run tells and touches nothing.
    let out = install(&dest, &["--dry-run"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("/usr/local/bin/sluice"), "{said}");
    assert!(!dest.join("usr").exists() && !dest.join("etc/sluice").exists());
    assert!(dest.join("etc/nginx/sites-enabled/default").is_symlink());

    let out = install(&dest, &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    let installed = [
        ("usr/local/bin/sluice", SLUICE.to_owned(), 0o755),
        (
            "etc/systemd/system/sluice@.service",
            format!("{ROOT}/systemd/sluice@.service"),
            0o644,
        ),
        (
            "etc/systemd/system/sluice.target",
            format!("{ROOT}/systemd/sluice.target"),
            0o644,
        ),
        (
            "etc/nginx/conf.d/sluice.conf",
            format!("{ROOT}/nginx/sluice.conf"),
            0o644,
        ),
        (
            "usr/local/share/doc/sluice/README.md",
            format!("{ROOT}/README.md"),
            0o644,
        ),
    ];
    use std::os::unix::fs::PermissionsExt;
    for (path, source, mode) in &installed {
        let meta = std::fs::metadata(dest.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, *mode, "{path}");
        assert!(
            std::fs::read(dest.join(path)).unwrap() == std::fs::read(source).unwrap(),
            "{path} is a copy of {source}"
        );
    }
    assert!(!dest.join("etc/nginx/sites-enabled/default").exists());

    // The settings: .env.example, made right for instances behind nginx, root-only.
    let env_path = dest.join("etc/sluice/sluice.env");
    let env = std::fs::read_to_string(&env_path).unwrap();
    assert_eq!(
        std::fs::metadata(&env_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for line in [
        "SLUICE_AUTH=required",
        "SLUICE_TRUSTED_PROXIES=127.0.0.1/32",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} in:\n{env}");
    }
    let secret = env
        .lines()
        .find_map(|l| l.strip_prefix("SLUICE_WS_TOKEN_SECRET="))
        .expect("a WebSocket token secret shared by the instances");
    assert!(secret.len() >= 16, "{secret}");

    // Again: nothing changes, and the settings (with their secret) are kept.
    let out = install(&dest, &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&env_path).unwrap(), env);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !said.contains("install.sh: installed ") && !said.contains("install.sh: created "),
        "second run installed again:\n{said}"
    );

    // An operator's edit of the nginx file survives; the new version lands beside it.
    let conf = dest.join("etc/nginx/conf.d/sluice.conf");
    let edited = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("server 127.0.0.1:8003 ", "server 127.0.0.1:8004 ");
    std::fs::write(&conf, &edited).unwrap();
    let out = install(&dest, &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    assert!(dest.join("etc/nginx/conf.d/sluice.conf.dist").exists());
}

/// A kept env file that turns keys off is pointed out: behind nginx, every request would
/// be the local admin.
#[tokio::test]
async fn install_sh_warns_when_the_kept_env_file_turns_keys_off() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    let env_path = dest.join("etc/sluice/sluice.env");
    std::fs::create_dir_all(env_path.parent().unwrap()).unwrap();
    for (line, warned) in [
        ("SLUICE_AUTH=auto", true),
        ("SLUICE_AUTH=off", true),
        ("export SLUICE_AUTH=\"Auto\"", true),
        ("SLUICE_AUTH=required", false),
        ("# SLUICE_AUTH=off", false),
        ("", false),
    ] {
        std::fs::write(&env_path, format!("RUST_LOG=info\n{line}\n")).unwrap();
        let out = install(&dest, &["--dry-run"]).await;
        assert!(out.status.success(), "{}", text(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            said.contains("WARNING") && said.contains("SLUICE_AUTH="),
            warned,
            "{line:?}:\n{said}"
        );
    }
}

// --- cluster.sh ----------------------------------------------------------------------------

/// A cluster run by scripts/cluster.sh; stopped on drop, so a failing test leaves nothing.
struct Cluster {
    dir: PathBuf,
    env: Vec<(String, String)>,
    nginx_port: u16,
    ports: Vec<u16>,
    stopped: bool,
}

impl Cluster {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("bash");
        // Only what the test gives: not whatever the test runner exports.
        cmd.arg(script("cluster.sh"))
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .envs(self.env.iter().cloned());
        cmd
    }

    async fn run(&self, args: &[&str]) {
        let out = run(&mut self.command(args)).await;
        assert!(out.status.success(), "cluster.sh {args:?}: {}", text(&out));
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.nginx_port)
    }

    fn pid(&self, name: &str) -> u32 {
        read_pid(&self.dir.join(format!("{name}.pid")))
    }

    /// Every process of the cluster: the instances, nginx's master and its workers.
    fn processes(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .ports
            .iter()
            .map(|p| self.pid(&p.to_string()))
            .collect();
        pids.extend(session_members(self.pid("nginx")));
        pids
    }

    /// The upstream nginx chose for each logged request whose line contains `needle`.
    fn upstreams_of(&self, needle: &str) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.join("nginx.access.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| l.split("upstream=").nth(1))
            .map(|s| s.split_whitespace().next().unwrap_or_default().to_owned())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = std::process::Command::new("bash")
                .arg(script("cluster.sh"))
                .arg("stop")
                .env_remove("REDIS_URL")
                .env_remove("DATABASE_URL")
                .envs(self.env.iter().cloned())
                .output();
        }
    }
}

async fn get_ok(url: &str) -> Value {
    let r = common::client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {url}");
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sh_runs_instances_behind_nginx_and_stops_them_all() {
    crate::require!(Postgres, Redis, Nginx);
    nginx();
    let db = fresh(Backend::Postgres).await;
    let tmp = tempfile::tempdir().unwrap();
    let free = free_ports(3);
    let (ports, nginx_port) = (free[..2].to_vec(), free[2]);
    let dir = tmp.path().join("cluster");
    let redis = common::need::redis_url();
    let port_list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut cluster = Cluster {
        env: vec![
            ("SLUICE_BIN".into(), SLUICE.into()),
            ("CLUSTER_DIR".into(), dir.display().to_string()),
            ("CLUSTER_PORTS".into(), port_list.join(" ")),
            ("CLUSTER_NGINX_PORT".into(), nginx_port.to_string()),
            ("CLUSTER_READY_SECS".into(), "90".into()),
            ("DATABASE_URL".into(), db.database_url().unwrap().to_owned()),
            ("REDIS_URL".into(), redis),
            (
                "SLUICE_REDIS_PREFIX".into(),
                format!("sluice-deploy-{:016x}", rand::random::<u64>()),
            ),
            ("SLUICE_DRAIN_SECS".into(), "10".into()),
            ("SLUICE_DEMO_FIRST_TOKEN_MS".into(), "100".into()),
            ("SLUICE_DEMO_TOKEN_MS".into(), "40".into()),
        ],
        dir,
        nginx_port,
        ports,
        stopped: false,
    };

    // start returns once every instance and nginx answer.
    cluster.run(&["start"]).await;
    let first = cluster.processes();
    for pid in &first {
        assert!(alive(*pid), "pid {pid} runs");
    }
    assert!(
        session_members(cluster.pid("nginx")).len() >= 2,
        "nginx master and workers"
    );
    for port in &cluster.ports {
        assert!(cluster.dir.join(format!("{port}.log")).exists());
        let health = get_ok(&format!("http://127.0.0.1:{port}/health")).await;
        assert_eq!(health["server_id"], format!("sluice-{port}"));
    }
    let ready = get_ok(&cluster.url("/health/ready")).await;
    assert_eq!(ready["ready"], true, "{ready}");

    // A streamed completion through nginx arrives as SSE, event by event: the first token
    // long before the last, uncompressed though the client accepts gzip.
    let started = Instant::now();
    let resp = common::client()
        .post(cluster.url("/v1/chat/completions"))
        .header("accept-encoding", "gzip")
        .json(&json!({
            "model": "demo",
            "stream": true,
            "messages": [{"role": "user", "content": "hello through nginx"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert!(
        resp.headers().get("content-encoding").is_none(),
        "stream not compressed"
    );
    let mut events = resp.bytes_stream().eventsource();
    let (mut text, mut first_token, mut done, mut chunks) = (String::new(), None, None, 0);
    while let Some(ev) = tokio::time::timeout(common::WAIT, events.next())
        .await
        .expect("stream stalled")
    {
        let ev = ev.unwrap();
        if ev.data == "[DONE]" {
            done = Some(started.elapsed());
            continue;
        }
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            first_token.get_or_insert(started.elapsed());
            text.push_str(t);
            chunks += 1;
        }
    }
    let (first_token, done) = (first_token.expect("tokens"), done.expect("[DONE]"));
    assert!(text.contains("hello through nginx"), "{text}");
    assert!(chunks > 10, "{chunks} token chunks");
    // The demo writes a token every 40 ms; buffered, they would all arrive together.
    assert!(
        done - first_token > Duration::from_millis(300),
        "first token at {first_token:?}, [DONE] at {done:?}"
    );

    // One session's requests land on one instance.
    let r = common::client()
        .post(cluster.url("/api/sessions"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..6 {
        get_ok(&cluster.url(&format!("/api/sessions/{id}/messages"))).await;
    }
    let needle = format!("/api/sessions/{id}/messages");
    let deadline = Instant::now() + common::WAIT;
    let upstreams = loop {
        // nginx logs a request once it has answered it: poll for the lines.
        let u = cluster.upstreams_of(&needle);
        if u.len() == 6 || Instant::now() > deadline {
            break u;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(upstreams.len(), 6, "{upstreams:?}");
    assert!(
        upstreams.iter().all(|u| u == &upstreams[0]),
        "{upstreams:?}"
    );

    // Rolling restart: every instance replaced, nginx serving throughout.
    cluster.run(&["restart"]).await;
    for port in &cluster.ports {
        let pid = cluster.pid(&port.to_string());
        assert!(!first.contains(&pid), "instance {port} is a new process");
        assert!(alive(pid));
    }
    get_ok(&cluster.url("/health/ready")).await;
    let all: Vec<u32> = first.iter().copied().chain(cluster.processes()).collect();

    // Streams through nginx at stop: the instances go first and tell every client to
    // reconnect, so nginx has nothing left to wait for.
    let mut watchers = Vec::new();
    for _ in 0..4 {
        let session = common::create_session(&cluster.url(""), None).await;
        let r = common::client()
            .get(cluster.url(&format!("/api/sessions/{session}/stream")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        watchers.push(tokio::spawn(async move {
            let mut events = r.bytes_stream().eventsource();
            let mut seen = Vec::new();
            while let Ok(Some(Ok(ev))) = tokio::time::timeout(SCRIPT_WAIT, events.next()).await {
                seen.push(ev.event);
            }
            seen
        }));
    }

    // stop leaves no process behind, and no pid file.
    let started = Instant::now();
    cluster.run(&["stop"]).await;
    let took = started.elapsed();
    cluster.stopped = true;
    for w in watchers {
        let seen = w.await.unwrap();
        assert_eq!(
            seen.last().map(String::as_str),
            Some("reconnect"),
            "{seen:?}"
        );
    }
    // nginx alone would have waited 15 s on the open streams before being killed.
    assert!(took < Duration::from_secs(8), "stop took {took:?}");
    eprintln!("cluster.sh stop with 4 streams open through nginx: {took:?}");
    let left: Vec<u32> = all.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "still running: {left:?}");
    let pid_files: Vec<_> = std::fs::read_dir(&cluster.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
        .map(|e| e.file_name())
        .collect();
    assert!(pid_files.is_empty(), "{pid_files:?}");
    assert!(
        common::client()
            .get(cluster.url("/health"))
            .send()
            .await
            .is_err(),
        "nothing listens on the nginx port"
    );
}

/// A local database of a test's own, dropped at the end.
struct Database(String);

impl Drop for Database {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .arg("postgres://postgres@127.0.0.1:5432/postgres")
            .arg("-qc")
            .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0))
            .output();
    }
}

/// A client that opens a connection per request: nginx's reload (which the rolling
/// restart does) closes idle client connections, as HTTP/1.1 lets any server do, and a
/// request that meets such a close is the client's to retry (browsers do). What is
/// measured here is what nginx answers.
fn fresh_connections() -> reqwest::Client {
    let _ = common::client(); // installs the TLS crypto provider
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// What clients saw through nginx: every status, and transport errors.
#[derive(Default)]
struct Seen {
    statuses: std::sync::Mutex<Vec<(String, u16)>>,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Seen {
    fn status(&self, what: &str, r: &reqwest::Response) {
        self.statuses
            .lock()
            .unwrap()
            .push((what.to_owned(), r.status().as_u16()));
    }
    fn error(&self, what: &str, e: impl std::fmt::Display) {
        self.errors.lock().unwrap().push(format!("{what}: {e}"));
    }
}

/// Reads an SSE response to its end or to an event that ends a generation (a session
/// stream stays open for the next one); the last event's name and id.
async fn drain_sse(r: reqwest::Response) -> (Option<String>, Option<String>) {
    let mut events = r.bytes_stream().eventsource();
    let (mut last, mut id) = (None, None);
    while let Ok(Some(Ok(ev))) = tokio::time::timeout(common::WAIT * 3, events.next()).await {
        if !ev.id.is_empty() {
            id = Some(ev.id.clone());
        }
        let end = matches!(
            ev.event.as_str(),
            "done" | "error" | "interrupted" | "reconnect"
        );
        last = Some(ev.event);
        if end {
            break;
        }
    }
    (last, id)
}

/// A browser UI's session: a message streamed as SSE, resumed with Last-Event-ID when told
/// to reconnect; then the next message.
async fn session_client(
    front: String,
    seen: std::sync::Arc<Seen>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let c = fresh_connections();
    let Ok(r) = c
        .post(format!("{front}/api/sessions"))
        .json(&json!({}))
        .send()
        .await
    else {
        return seen.error("new session", "refused");
    };
    seen.status("POST /api/sessions", &r);
    let Ok(v) = r.json::<Value>().await else {
        return;
    };
    let Some(id) = v["id"].as_str().map(str::to_owned) else {
        return;
    };
    while !*stop.borrow() {
        let r = match c
            .post(format!("{front}/api/sessions/{id}/messages"))
            .header("accept", "text/event-stream")
            .json(&json!({"content": "a rolling restart"}))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                seen.error("POST messages", e);
                continue;
            }
        };
        seen.status("POST messages", &r);
        if r.status() != 200 {
            continue;
        }
        let (mut last, mut last_id) = drain_sse(r).await;
        while last.as_deref() != Some("done") {
            let mut req = c.get(format!("{front}/api/sessions/{id}/stream"));
            if let Some(last_id) = &last_id {
                req = req.header("last-event-id", last_id);
            }
            match req.send().await {
                Ok(r) => {
                    seen.status("GET stream", &r);
                    if r.status() != 200 {
                        break;
                    }
                    let (l, i) = drain_sse(r).await;
                    if l.is_none() {
                        seen.error("GET stream", "ended without an event");
                        break;
                    }
                    last = l;
                    last_id = i.or(last_id);
                }
                Err(e) => {
                    seen.error("GET stream", e);
                    break;
                }
            }
        }
    }
}

/// An OpenAI client: streamed completions, one after another.
async fn v1_client(
    front: String,
    seen: std::sync::Arc<Seen>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let c = fresh_connections();
    while !*stop.borrow() {
        match c
            .post(format!("{front}/v1/chat/completions"))
            .json(&json!({
                "model": "demo",
                "stream": true,
                "messages": [{"role": "user", "content": "a rolling restart"}],
            }))
            .send()
            .await
        {
            Ok(r) => {
                seen.status("POST /v1/chat/completions", &r);
                drain_sse(r).await;
            }
            Err(e) => seen.error("POST /v1/chat/completions", e),
        }
    }
}

/// Started with neither REDIS_URL nor DATABASE_URL from the caller, the cluster runs on
/// the local Redis and PostgreSQL that cluster.sh set up, and keeps them through a rolling
/// restart (whose caller exports neither either) made under load through nginx without
/// one 502; `status` names an instance whose bus differs from its peers'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sh_restart_keeps_what_start_configured_and_nginx_always_has_an_instance() {
    crate::require!(Redis, Nginx);
    nginx();
    let db = Database(format!("sluice_deploy_{:08x}", rand::random::<u32>()));
    let tmp = tempfile::tempdir().unwrap();
    let free = free_ports(4);
    let (ports, nginx_port, odd_port) = (free[..2].to_vec(), free[2], free[3]);
    let dir = tmp.path().join("cluster");
    let prefix = format!("sluice-deploy-{:016x}", rand::random::<u64>());
    let port_list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut cluster = Cluster {
        env: vec![
            ("SLUICE_BIN".into(), SLUICE.into()),
            ("CLUSTER_DIR".into(), dir.display().to_string()),
            ("CLUSTER_PORTS".into(), port_list.join(" ")),
            ("CLUSTER_NGINX_PORT".into(), nginx_port.to_string()),
            ("CLUSTER_READY_SECS".into(), "90".into()),
            ("CLUSTER_DB".into(), db.0.clone()),
            ("SLUICE_REDIS_PREFIX".into(), prefix.clone()),
            ("SLUICE_DRAIN_SECS".into(), "10".into()),
            ("SLUICE_DEMO_FIRST_TOKEN_MS".into(), "50".into()),
            ("SLUICE_DEMO_TOKEN_MS".into(), "20".into()),
        ],
        dir,
        nginx_port,
        ports,
        stopped: false,
    };

    // Nothing to restart, and nothing recorded to start an instance with.
    let out = run(&mut cluster.command(&["start-instance", &odd_port.to_string()])).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("cluster.env"), "{}", text(&out));

    cluster.run(&["start"]).await;
    let first = cluster.processes();
    // What start set up is recorded, readable by its owner only.
    let env_path = cluster.dir.join("cluster.env");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&env_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let recorded = std::fs::read_to_string(&env_path).unwrap();
    for line in [
        "export REDIS_URL=redis://127.0.0.1:6379".to_owned(),
        format!(
            "export DATABASE_URL=postgres://postgres@127.0.0.1:5432/{}",
            db.0
        ),
        format!("export SLUICE_REDIS_PREFIX={prefix}"),
    ] {
        assert!(
            recorded.lines().any(|l| l == line),
            "{line} in:\n{recorded}"
        );
    }

    // Load through nginx during the whole rolling restart.
    let seen = std::sync::Arc::new(Seen::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut load = Vec::new();
    for _ in 0..6 {
        load.push(tokio::spawn(session_client(
            cluster.url(""),
            seen.clone(),
            stop_rx.clone(),
        )));
    }
    for _ in 0..3 {
        load.push(tokio::spawn(v1_client(
            cluster.url(""),
            seen.clone(),
            stop_rx.clone(),
        )));
    }
    // Under way first: streams open on both instances when the first one goes down.
    let deadline = Instant::now() + SCRIPT_WAIT;
    while seen.statuses.lock().unwrap().len() < 8 {
        assert!(Instant::now() < deadline, "the load did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restart_started = Instant::now();
    // Twice: the instance restarted first goes down again right after the last one.
    cluster.run(&["restart"]).await;
    cluster.run(&["restart"]).await;
    eprintln!(
        "cluster.sh restart of 2 instances under load: {:?}",
        restart_started.elapsed()
    );
    stop_tx.send(true).unwrap();
    for l in load {
        tokio::time::timeout(SCRIPT_WAIT, l).await.unwrap().unwrap();
    }
    let statuses = seen.statuses.lock().unwrap().clone();
    let errors = seen.errors.lock().unwrap().clone();
    let bad: Vec<_> = statuses
        .iter()
        .filter(|(_, s)| matches!(s, 502..=504))
        .collect();
    eprintln!(
        "{} responses through nginx during the restart, {} 502/503/504, {} transport errors",
        statuses.len(),
        bad.len(),
        errors.len()
    );
    assert!(statuses.len() > 20, "the load ran: {statuses:?}");
    assert!(
        statuses.iter().any(|(what, _)| what == "GET stream"),
        "streams were resumed: {statuses:?}"
    );
    if !bad.is_empty() {
        let log = std::fs::read_to_string(cluster.dir.join("nginx.error.log")).unwrap_or_default();
        let mut tail: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("no live"))
            .take(3)
            .collect();
        let access =
            std::fs::read_to_string(cluster.dir.join("nginx.access.log")).unwrap_or_default();
        let mut per_sec = std::collections::BTreeMap::<String, (usize, usize)>::new();
        for l in access.lines() {
            let t = l
                .split('[')
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .unwrap_or("")
                .to_owned();
            let e = per_sec.entry(t).or_default();
            if l.contains("\" 502 ") {
                e.0 += 1
            } else {
                e.1 += 1
            }
        }
        eprintln!("502s/others per second: {per_sec:?}");
        tail.extend(
            log.lines()
                .filter(|l| !l.contains("no live"))
                .filter(|l| l.contains("[error]"))
                .map(|l| &l[..80.min(l.len())]),
        );
        panic!(
            "{} of {} responses were 502/503/504, first {:?}; nginx: {tail:#?}",
            bad.len(),
            statuses.len(),
            bad[0]
        );
    }
    assert!(errors.is_empty(), "{errors:?}");
    for port in &cluster.ports {
        let pid = cluster.pid(&port.to_string());
        assert!(!first.contains(&pid), "instance {port} is a new process");
    }

    // Every instance on the same Redis and PostgreSQL as before the restart.
    let mut shared = Vec::new();
    for port in &cluster.ports {
        let ready = get_ok(&format!("http://127.0.0.1:{port}/health/ready")).await;
        shared.push(ready["shared"].clone());
    }
    assert_eq!(
        shared[0],
        json!({
            "store": format!("postgres 127.0.0.1:5432/{}", db.0),
            "bus": format!("redis 127.0.0.1:6379/0 prefix {prefix}:"),
        })
    );
    assert!(shared.iter().all(|s| s == &shared[0]), "{shared:?}");
    let out = run(&mut cluster.command(&["status"])).await;
    assert!(out.status.success(), "{}", text(&out));

    // An instance on another bus is one status names, and fails on.
    std::fs::write(
        &env_path,
        recorded.replace(&prefix, &format!("{prefix}-elsewhere")),
    )
    .unwrap();
    cluster
        .run(&["start-instance", &odd_port.to_string()])
        .await;
    let out = run(&mut cluster.command(&["status"])).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        said.lines()
            .any(|l| l.starts_with(&format!("instance {odd_port}: DIFFERS"))
                && l.contains("-elsewhere:")),
        "{said}"
    );
    for port in &cluster.ports {
        assert!(
            !said.contains(&format!("instance {port}: DIFFERS")),
            "{said}"
        );
    }

    cluster.run(&["stop"]).await;
    cluster.stopped = true;
}

// --- nginx in front ---------------------------------------------------------------------------

/// nginx from a directory rendered by `cluster.sh nginx-conf`; quit on drop.
struct Nginx {
    dir: PathBuf,
}

impl Nginx {
    async fn start(dir: &Path, upstream: u16, port: u16) -> Self {
        render_nginx(dir, &[upstream], port).await;
        let out = std::process::Command::new(nginx())
            .arg("-p")
            .arg(format!("{}/", dir.display()))
            .arg("-e")
            .arg(dir.join("nginx.error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        Nginx { dir: dir.into() }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("nginx.pid")) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", pid.trim()])
                .status();
        }
    }
}

/// A GET with an X-Forwarded-For, as a load balancer in front of nginx would send it.
async fn get_as(url: &str, client_ip: Option<&str>) -> (u16, String) {
    get_with(&common::client(), url, client_ip).await
}

async fn get_with(c: &reqwest::Client, url: &str, client_ip: Option<&str>) -> (u16, String) {
    let mut req = c.get(url);
    if let Some(ip) = client_ip {
        req = req.header("x-forwarded-for", ip);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The /64 of an address as Rust's std sees it; an IPv4-mapped address is its IPv4
/// client, counted as one.
fn block_of(ip: &std::net::Ipv6Addr) -> String {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4.to_string();
    }
    let s = ip.segments();
    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
}

/// Spellings of one address a client might send: compressed, full with leading zeros,
/// upper case, and "::" over the first run of zeros however short.
fn spellings(ip: &std::net::Ipv6Addr) -> Vec<String> {
    let s = ip.segments();
    let full: Vec<String> = s.iter().map(|g| format!("{g:04x}")).collect();
    let mut out = vec![
        ip.to_string(),
        full.join(":"),
        ip.to_string().to_uppercase(),
    ];
    // nginx's parser refuses "::" for the last group alone ("1:2:3:4:5:6:7::"), and
    // takes the peer's address instead: no proxy in front writes it that way.
    if let Some(i) = s.iter().position(|g| *g == 0).filter(|i| *i < 7) {
        let head: Vec<String> = s[..i].iter().map(|g| format!("{g:x}")).collect();
        let tail: Vec<String> = s[i + 1..].iter().map(|g| format!("{g:X}")).collect();
        out.push(format!("{}::{}", head.join(":"), tail.join(":")));
    }
    out
}

/// nginx as shipped, in front of one instance: /health/ready only from this host (a
/// JSON 403 otherwise), IPv6 clients counted per /64 by the flood shield, and a listener
/// on IPv6 loopback too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_keeps_readiness_local_and_limits_ipv6_clients_per_64() {
    crate::require!(Nginx);
    nginx();
    let tmp = tempfile::tempdir().unwrap();
    let free = free_ports(2);
    let (port, nginx_port) = (free[0], free[1]);
    let _sluice = tokio::process::Command::new(SLUICE)
        .arg("serve")
        .env("SLUICE_ADDR", format!("127.0.0.1:{port}"))
        .env("SLUICE_DATA_DIR", tmp.path().join("data"))
        .env("SLUICE_TRUSTED_PROXIES", "127.0.0.1/32")
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL")
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let dir = tmp.path().join("nginx");
    let _nginx = Nginx::start(&dir, port, nginx_port).await;
    let front = format!("http://127.0.0.1:{nginx_port}");
    let deadline = Instant::now() + SCRIPT_WAIT;
    while get_as(&format!("http://127.0.0.1:{port}/health/ready"), None)
        .await
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "sluice did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Readiness: this host only, as /metrics; /health stays public.
    let (status, body) = get_as(&format!("{front}/health/ready"), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"shared\""), "{body}");
    for outsider in ["203.0.113.7", "2001:db8::7"] {
        let (status, body) = get_as(&format!("{front}/health/ready"), Some(outsider)).await;
        assert_eq!(status, 403, "{outsider}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "forbidden", "{body}");
        assert_eq!(
            get_as(&format!("{front}/health"), Some(outsider)).await.0,
            200
        );
    }
    // Local clusters listen on IPv6 loopback too when the machine has it.
    let v6 = std::fs::read_to_string("/proc/net/if_inet6")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("00000000000000000000000000000001 ") && l.ends_with(" lo"));
    if v6 {
        assert_eq!(
            get_as(&format!("http://[::1]:{nginx_port}/health"), None)
                .await
                .0,
            200
        );
    }

    // The limit key of many addresses and spellings, from nginx's log: equal exactly when
    // Rust puts the addresses in one /64.
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut addrs: Vec<std::net::Ipv6Addr> = [
        "2001:db8::1",
        "2001:db8::2",
        "2001:db8:0:1::1",
        "2001:db8::1:0:0:1",
        "::1:2:3:4:5",
        "::2:3:4:5:6:7",
        "::2",
        "1::",
        "1::2:3:4:5:6",
        "1::3:4:5:6",
        "1:2::",
        "1:2:3::",
        "1:2:3:4::",
        "1:2:3:4:5::8",
        "0:0:1::",
        "fe80::1",
        "fe80::1:0:0:0:1",
        "0:1::1",
        "0:0:0:1::",
        "::1:0:0:0:1",
        "2001:db8:0:0:1::",
        "2001:db8::ffff:0:1",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    for _ in 0..120 {
        let mut g = [0u16; 8];
        for x in &mut g {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *x = [0, 0, 0, 1, 0xab, 0xffff][(rng % 6) as usize];
        }
        addrs.push(std::net::Ipv6Addr::from(g));
    }
    let sent: Vec<(String, String)> = addrs
        .iter()
        .flat_map(|ip| spellings(ip).into_iter().map(move |s| (s, block_of(ip))))
        .collect();
    let c = common::client();
    futures::stream::iter(sent.iter().enumerate())
        .for_each_concurrent(16, |(n, (spelling, _))| {
            let (c, front) = (&c, &front);
            async move {
                get_with(c, &format!("{front}/api/limit-probe?n={n}"), Some(spelling)).await;
            }
        })
        .await;
    let keys = loop {
        // nginx logs a request once it has answered it: poll for the lines.
        let log = std::fs::read_to_string(dir.join("nginx.access.log")).unwrap_or_default();
        let mut keys = vec![None; sent.len()];
        for l in log.lines() {
            let Some(n) = l
                .split("limit-probe?n=")
                .nth(1)
                .and_then(|r| r.split(' ').next())
            else {
                continue;
            };
            let key = l
                .split("limit_key=\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            keys[n.parse::<usize>().unwrap()] = key.map(str::to_owned);
        }
        if keys.iter().all(Option::is_some) {
            break keys.into_iter().map(Option::unwrap).collect::<Vec<_>>();
        }
        assert!(Instant::now() < deadline + SCRIPT_WAIT, "log lines missing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut by_key: std::collections::HashMap<&str, &str> = Default::default();
    let mut by_block: std::collections::HashMap<&str, &str> = Default::default();
    for ((spelling, block), key) in sent.iter().zip(&keys) {
        assert!(!key.is_empty(), "{spelling} not limited");
        let b = by_key.entry(key).or_insert(block);
        assert_eq!(b, block, "{spelling}: key {key} is shared by two /64s");
        let k = by_block.entry(block).or_insert(key);
        assert_eq!(k, key, "{spelling}: one /64 under two keys");
    }
    eprintln!(
        "{} spellings of {} addresses in {} /64s",
        sent.len(),
        addrs.len(),
        by_block.len()
    );

    // And the limit itself: a /64 that used up its burst is limited for every address in
    // it, while the next /64 is not.
    let limited = |body: &str| body.contains("too many requests from this address");
    // Concurrent, so the burst (500) empties far faster than it refills (50/s).
    let burst = |ip: &'static str, n: usize| {
        let (c, front) = (c.clone(), front.clone());
        async move {
            let all: Vec<(u16, String)> = futures::stream::iter(0..n)
                .map(|_| {
                    let (c, front) = (&c, &front);
                    async move { get_with(c, &format!("{front}/api/limit-probe"), Some(ip)).await }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            all.iter().filter(|(s, b)| *s == 429 && limited(b)).count()
        }
    };
    let flooded = burst("2001:db8:5:6:1::1", 800).await;
    assert!(flooded > 0, "800 requests at once and no 429");
    let same = burst("2001:db8:5:6:ffff::9", 20).await;
    let other = burst("2001:db8:5:7::1", 20).await;
    eprintln!("flood: {flooded}/800 limited; then same /64 {same}/20, next /64 {other}/20");
    assert!(same >= 10, "same /64 limited {same}/20");
    assert_eq!(other, 0, "another /64 limited");
}

// --- sd_notify ------------------------------------------------------------------------------

/// The binary as systemd runs it (Type=notify, WatchdogSec=): READY=1 once it serves,
/// watchdog pings, STOPPING=1 on SIGTERM, then a clean exit.
#[tokio::test]
async fn the_binary_notifies_systemd() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut child = tokio::process::Command::new(SLUICE)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .env("SLUICE_ADDR", "127.0.0.1:0")
        .env("SLUICE_SERVER_ID", "notify-test")
        .env("SLUICE_DATA_DIR", tmp.path().join("data"))
        .env("SLUICE_DRAIN_SECS", "5")
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let next = || async {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(common::WAIT, sock.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };

    let ready = next().await;
    let addr = ready
        .strip_prefix("READY=1\nSTATUS=serving on ")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("READY=1 and a status first, got {ready:?}"));
    assert!(ready.contains("notify-test"), "{ready}");
    // Ready means ready: the listener answers at once.
    get_ok(&format!("{addr}/health")).await;
    assert_eq!(next().await, "WATCHDOG=1\n");
    assert_eq!(
        next().await,
        "WATCHDOG=1\n",
        "pings keep coming (every 100 ms)"
    );

    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut seen = Vec::new();
    let stopping = loop {
        let m = next().await;
        if m.starts_with("STOPPING=1\n") {
            break m;
        }
        assert_eq!(m, "WATCHDOG=1\n", "before STOPPING=1: {seen:?}");
        seen.push(m);
    };
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    let code = tokio::time::timeout(common::WAIT, child.wait())
        .await
        .expect("sluice exits after the drain")
        .unwrap();
    assert_eq!(code.code(), Some(0));
    // The last word, after the watchdog has stopped.
    let mut last = String::new();
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = sock.try_recv(&mut buf) {
        last = String::from_utf8(buf[..n].to_vec()).unwrap();
    }
    assert_eq!(last, "STATUS=stopped\n");
}
