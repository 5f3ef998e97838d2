//! What a test needs from the machine, and skipping instead of failing when it is missing.
//!
//! Each service is looked for once per process (a 1 s connect, or a file check). A test that
//! lacks one returns early after one `SKIP <test>: <why>` line on stderr, written directly so
//! that libtest's capture does not hide it. With `SLUICE_TEST_REQUIRE_ALL=1` (scripts/test.sh
//! sets it) a missing service fails the test instead.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub enum Need {
    Postgres,
    Redis,
    Nginx,
    PgBouncer,
    Chromium,
    SdkVenv,
    /// tests/node's packages (`npm ci` in tests/node), for the Vercel AI SDK test.
    NodeModules,
}

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Redis the tests use; override with `SLUICE_TEST_REDIS_URL`.
pub fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// `host:port` of [`redis_url`], for tests that put a proxy in front of it.
pub fn redis_addr() -> SocketAddr {
    host_port(&redis_url(), 6379)
        .and_then(|hp| hp.to_socket_addrs().ok()?.next())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 6379)))
}

/// `host:port` of a `scheme://[user@]host[:port][/…]` URL.
fn host_port(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return None;
    }
    Some(if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    })
}

fn answers(addr: Option<String>) -> bool {
    addr.and_then(|a| a.to_socket_addrs().ok())
        .into_iter()
        .flatten()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// The first of `candidates` that exists.
fn first_file(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

pub fn nginx_bin() -> Option<PathBuf> {
    first_file(&["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"])
}

pub fn pgbouncer_bin() -> Option<PathBuf> {
    first_file(&["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"])
}

/// Why `need` is missing, or `None` if it is there; looked for once per process.
pub fn missing(need: Need) -> Option<&'static str> {
    static FOUND: [OnceLock<Option<&'static str>>; 7] = [const { OnceLock::new() }; 7];
    *FOUND[need as usize].get_or_init(|| {
        let ok = match need {
            Need::Postgres => answers(host_port(&super::db::server_url(), 5432)),
            Need::Redis => answers(host_port(&redis_url(), 6379)),
            Need::Nginx => nginx_bin().is_some(),
            Need::PgBouncer => pgbouncer_bin().is_some(),
            Need::Chromium => {
                Path::new("/usr/bin/chromium").exists()
                    && Path::new("/usr/bin/chromedriver").exists()
            }
            Need::SdkVenv => Path::new(ROOT).join("target/sdk-venv/bin/python").exists(),
            Need::NodeModules => {
                let modules = Path::new(ROOT).join("tests/node/node_modules");
                modules.join("ai/package.json").exists()
                    && modules.join("@ai-sdk/openai/package.json").exists()
            }
        };
        (!ok).then_some(match need {
            Need::Postgres => "PostgreSQL not reachable at SLUICE_TEST_DATABASE_URL",
            Need::Redis => "Redis not reachable at SLUICE_TEST_REDIS_URL",
            Need::Nginx => "nginx not found",
            Need::PgBouncer => "pgbouncer not found",
            Need::Chromium => "chromium or chromedriver not found",
            Need::SdkVenv => "the SDK venv target/sdk-venv not found",
            Need::NodeModules => "tests/node/node_modules (ai, @ai-sdk/openai) not installed",
        })
    })
}

/// True if everything in `needs` is there. Otherwise writes the SKIP line and returns false,
/// or fails the test under `SLUICE_TEST_REQUIRE_ALL=1`.
pub fn have(needs: &[Need]) -> bool {
    let Some(why) = needs.iter().find_map(|&n| missing(n)) else {
        return true;
    };
    // libtest names each test's thread after the test.
    let test = std::thread::current()
        .name()
        .map_or_else(|| "a test".to_owned(), |n| format!("it::{n}"));
    let line = format!("{test}: {why} (scripts/test.sh installs it)");
    if std::env::var("SLUICE_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{line}, and SLUICE_TEST_REQUIRE_ALL=1");
    }
    // One write, so the line is not split by the harness's own output.
    let _ = std::io::stderr().write_all(format!("SKIP {line}\n").as_bytes());
    false
}

/// Returns from the calling test, after its SKIP line, unless every listed service is there:
/// `require!(Postgres, Redis);`.
#[macro_export]
macro_rules! require {
    ($($need:ident),+ $(,)?) => {
        if !$crate::common::need::have(&[$($crate::common::need::Need::$need),+]) {
            return;
        }
    };
}
