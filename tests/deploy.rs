//! The deployment files as shipped: nginx/sluice.conf passes `nginx -t`, the systemd units
//! pass `systemd-analyze verify`, scripts/install.sh puts everything where it belongs,
//! scripts/cluster.sh runs instances behind nginx and stops every process it started, and
//! the binary speaks sd_notify to systemd.
//!
//! nginx and systemd-analyze must be installed (scripts/test.sh installs nginx); a missing
//! one fails the test with a message instead of skipping it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

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
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
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
        cmd.arg(script("cluster.sh"))
            .args(args)
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
    nginx();
    let db = fresh(Backend::Postgres).await;
    let tmp = tempfile::tempdir().unwrap();
    let free = free_ports(3);
    let (ports, nginx_port) = (free[..2].to_vec(), free[2]);
    let dir = tmp.path().join("cluster");
    let redis = std::env::var("SLUICE_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
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

    // stop leaves no process behind, and no pid file.
    cluster.run(&["stop"]).await;
    cluster.stopped = true;
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
