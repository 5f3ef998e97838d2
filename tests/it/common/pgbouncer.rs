//! A PgBouncer in transaction mode in front of the test server, on a free port with its
//! own ini in a temp dir. Pools are small (3 server connections per database), so a store's
//! connections really do share server connections from one transaction to the next.
//!
//! Self-contained (std, tempfile, tokio-postgres's URL parser), so the benches include it
//! with `#[path]` as well.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Server connections per (database, user) pool.
pub const POOL_SIZE: u32 = 3;

pub struct PgBouncer {
    pub port: u16,
    /// The user PgBouncer lets in and logs in as.
    pub user: String,
    /// The process ends when this closes, that is when the test process does, even when it
    /// never runs a destructor (a static, a panic that aborts).
    _lifeline: ChildStdin,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer in front of the PostgreSQL of `server` (a URL); panics naming
    /// PgBouncer when it is not installed or does not come up.
    pub fn start(server: &str) -> Self {
        let bin = binary().unwrap_or_else(|| {
            panic!(
                "the PgBouncer tests need pgbouncer (Debian package `pgbouncer`; \
                 scripts/test.sh installs it), found neither on PATH nor in /usr/sbin"
            )
        });
        let cfg: tokio_postgres::Config = server.parse().expect("a PostgreSQL URL");
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres").to_owned();

        let dir = tempfile::tempdir().expect("temp dir");
        // PgBouncer refuses to run as root; it then drops to `postgres`, which must read
        // its files.
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if root {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod temp dir");
        }
        let listen = free_port();
        let users = dir.path().join("users.txt");
        write(&users, &format!("\"{user}\" \"\"\n"));
        let ini = dir.path().join("pgbouncer.ini");
        write(
            &ini,
            &format!(
                "[databases]\n\
                 * = host={host} port={port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {listen}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 pool_mode = transaction\n\
                 default_pool_size = {POOL_SIZE}\n\
                 max_client_conn = 2000\n\
                 log_connections = 0\n\
                 log_disconnections = 0\n",
                users = users.display()
            ),
        );
        // A shell holds PgBouncer and kills it once its stdin, our end of the pipe, closes.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#""$@" & pid=$!; read -r _; kill "$pid"; wait "$pid""#)
            .arg("sh")
            .arg(&bin);
        if root {
            cmd.args(["-u", "postgres"]);
        }
        let mut child = cmd
            .arg(&ini)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pgbouncer");
        let lifeline = child.stdin.take().expect("stdin");
        let stderr = child.stderr.take().expect("stderr");

        // Its log says when it listens; read to the end so it never blocks on the pipe.
        let (tx, rx) = mpsc::channel();
        let ready = format!("listening on 127.0.0.1:{listen}");
        let marker = ready.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(t) = &tx {
                    let up = line.contains(&marker);
                    let _ = t.send(line);
                    if up {
                        tx = None;
                    }
                }
            }
        });
        let mut log = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let up = line.contains(&ready);
                    log.push(line);
                    if up {
                        break;
                    }
                }
                Err(_) => panic!("pgbouncer did not start:\n{}", log.join("\n")),
            }
        }
        Self {
            port: listen,
            user,
            _lifeline: lifeline,
            _child: child,
            _dir: dir,
        }
    }

    /// A URL of `database` through PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{database}",
            self.user, self.port
        )
    }
}

fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("pgbouncer"))
        .find(|p| p.is_file())
}

fn write(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).expect("create file");
    f.write_all(text.as_bytes()).expect("write file");
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
}

/// A port nothing listens on now; PgBouncer takes it a moment later.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
