//! Start-up: waiting for PostgreSQL and Redis while a minimal router answers health checks,
//! and what the start-up log tells a newcomer: where to point a browser and an SDK, whether
//! they need a key, and which providers and default model answer.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::config::{AuthMode, Config};
use crate::error::ApiError;
use crate::server::systemd;
use crate::state::{AppState, StartError};

/// The first pause between attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// One probe's bound: a blackholed server answers nothing, and must not hold the wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A failure unchanged since the last warning is logged again only after this long.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// A dependency that did not answer, or answered with an error.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `PostgreSQL` or `Redis`; `None` for a failure of the store or configuration as such.
    pub dependency: Option<&'static str>,
    pub error: String,
    /// Only unreachable dependencies are waited for; a refused password, a bad URL or a
    /// failed migration would fail the same way again.
    pub retry: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dependency {
            Some(d) => write!(f, "{d}: {}", self.error),
            None => f.write_str(&self.error),
        }
    }
}

/// What a starting instance reports while it waits; shared with its minimal router.
#[derive(Debug)]
pub struct StartState {
    server_id: String,
    started: Instant,
    last: Mutex<Option<Failure>>,
    attempts: std::sync::atomic::AtomicU32,
}

impl StartState {
    pub fn new(server_id: &str) -> Arc<Self> {
        Arc::new(Self {
            server_id: server_id.to_owned(),
            started: Instant::now(),
            last: Mutex::new(None),
            attempts: Default::default(),
        })
    }

    fn record(&self, f: &Failure) {
        self.attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(f.clone());
        }
    }

    fn last(&self) -> Option<Failure> {
        self.last.lock().ok().and_then(|l| l.clone())
    }
}

/// What answers on the listener until the app is built: liveness 200 ("starting"),
/// readiness 503 with what is awaited, everything else a 503 to retry.
pub fn starting_router(state: Arc<StartState>) -> Router {
    Router::new()
        .route("/health", get(starting_live))
        .route("/health/ready", get(starting_ready))
        .fallback(starting_other)
        .with_state(state)
}

async fn starting_live(
    axum::extract::State(st): axum::extract::State<Arc<StartState>>,
) -> impl IntoResponse {
    axum::Json(json!({
        "status": "starting",
        "server_id": st.server_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": st.started.elapsed().as_secs(),
    }))
}

async fn starting_ready(
    axum::extract::State(st): axum::extract::State<Arc<StartState>>,
) -> impl IntoResponse {
    let last = st.last();
    let body = json!({
        "ready": false,
        "starting": true,
        "waiting_for": last.as_ref().and_then(|f| f.dependency),
        "error": last.as_ref().map(|f| f.error.clone()),
        "attempts": st.attempts.load(std::sync::atomic::Ordering::Relaxed),
        "waited_s": st.started.elapsed().as_secs(),
    });
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body))
}

async fn starting_other() -> Response {
    ApiError::Unavailable {
        message: "this instance is starting: it waits for its database or Redis; retry shortly"
            .into(),
        code: "starting",
        retry_after: 1,
    }
    .into_response()
}

/// How a start ended before the app was built.
pub enum Start {
    Ready(AppState),
    /// SIGTERM or SIGINT came first.
    Stopped,
}

/// Builds the app, waiting up to `server.start_wait` for PostgreSQL and Redis to answer:
/// probes with exponential backoff, then `AppState::new`, retried too when it fails to
/// reach them. Any other failure, or the wait running out, is an error naming the cause.
/// systemd hears of the wait (status lines, watchdog pings) only once there is one: a start
/// that needs no waiting sends `READY=1` first, as before.
pub async fn build_waiting(
    config: &Config,
    state: &StartState,
    notifier: systemd::Notifier,
    watchdog: Option<Duration>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Start> {
    let wait = config.server.start_wait;
    if wait.is_zero() {
        // The behaviour without a wait: the first failure is the answer.
        return Ok(Start::Ready(AppState::new(config.clone()).await?));
    }
    let deadline = tokio::time::Instant::now() + wait;
    let gave_up = |f: Option<Failure>| match f {
        Some(f) => anyhow::anyhow!(
            "{} did not answer within {} s (SLUICE_START_WAIT_SECS): {}",
            f.dependency.unwrap_or("a dependency"),
            wait.as_secs(),
            f.error
        ),
        None => anyhow::anyhow!(
            "the start did not finish within {} s (SLUICE_START_WAIT_SECS)",
            wait.as_secs()
        ),
    };
    let mut supervision: Option<systemd::Waiting> = None;
    let attempts = async {
        let mut backoff = FIRST_BACKOFF;
        let mut logged: Option<(String, Instant)> = None;
        loop {
            let failure = match attempt(config).await {
                Ok(app) => return Ok(app),
                Err(f) if !f.retry => return Err(anyhow::anyhow!("{f}")),
                Err(f) => f,
            };
            state.record(&failure);
            let shown = failure.to_string();
            supervision
                .get_or_insert_with(|| systemd::Waiting::start(notifier.clone(), watchdog))
                .status(&format!("waiting for {shown}"));
            let quiet = logged
                .as_ref()
                .is_some_and(|(m, at)| *m == shown && at.elapsed() < LOG_EVERY);
            if !quiet {
                tracing::warn!(
                    dependency = failure.dependency.unwrap_or("store"),
                    error = %failure.error,
                    retry_in_ms = backoff.as_millis() as u64,
                    "waiting for a dependency to answer"
                );
                logged = Some((shown, Instant::now()));
            }
            if tokio::time::Instant::now() + backoff >= deadline {
                return Err(gave_up(Some(failure)));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    };
    let ended = tokio::select! {
        built = attempts => built.map(Start::Ready),
        _ = tokio::time::sleep_until(deadline) => Err(gave_up(state.last())),
        _ = shutdown => Ok(Start::Stopped),
    };
    if let Some(s) = supervision {
        s.finish().await;
    }
    ended
}

/// One try: the dependencies first, cheaply, then the app itself.
async fn attempt(config: &Config) -> Result<AppState, Failure> {
    if let Some(url) = &config.store.database_url {
        probe_postgres(url.expose()).await?;
    }
    if let Some(r) = &config.redis {
        probe_redis(r.url.expose()).await?;
    }
    AppState::new(config.clone()).await.map_err(|e| {
        let (dependency, retry) = match &e {
            StartError::Store(crate::store::StoreError::Unavailable(_))
                if config.store.database_url.is_some() =>
            {
                (Some("PostgreSQL"), true)
            }
            StartError::Queue(crate::queue::QueueError::Unavailable(_)) | StartError::Bus(_) => {
                (Some("Redis"), true)
            }
            _ => (None, false),
        };
        Failure {
            dependency,
            error: e.to_string(),
            retry,
        }
    })
}

async fn probe_postgres(url: &str) -> Result<(), Failure> {
    let fail = |error: String, retry: bool| Failure {
        dependency: Some("PostgreSQL"),
        error,
        retry,
    };
    // The parse error never echoes the URL, which may hold a password.
    let pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| fail(format!("invalid DATABASE_URL: {e}"), false))?;
    let probe = async {
        let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(conn);
        let r = client.simple_query("SELECT 1").await.map(|_| ());
        drop(client);
        let _ = driver.await;
        r
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            // "error connecting to server" alone does not say refused from unresolvable.
            let shown = match std::error::Error::source(&e) {
                Some(cause) if e.as_db_error().is_none() => format!("{e}: {cause}"),
                _ => e.to_string(),
            };
            match crate::store::StoreError::from(e) {
                crate::store::StoreError::Unavailable(_) => Err(fail(shown, true)),
                other => Err(fail(other.to_string(), false)),
            }
        }
        Err(_) => Err(fail(
            format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            true,
        )),
    }
}

async fn probe_redis(url: &str) -> Result<(), Failure> {
    let fail = |error: String, retry: bool| Failure {
        dependency: Some("Redis"),
        error,
        retry,
    };
    let client =
        redis::Client::open(url).map_err(|e| fail(format!("invalid REDIS_URL: {e}"), false))?;
    let probe = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            use redis::{ErrorKind, ServerErrorKind};
            let retry = e.is_io_error()
                || e.is_connection_refusal()
                || e.is_connection_dropped()
                || e.is_timeout()
                || matches!(
                    e.kind(),
                    ErrorKind::Server(
                        ServerErrorKind::BusyLoading
                            | ServerErrorKind::TryAgain
                            | ServerErrorKind::ClusterDown
                            | ServerErrorKind::MasterDown
                    )
                );
            Err(fail(e.to_string(), retry))
        }
        Err(_) => Err(fail(
            format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            true,
        )),
    }
}

/// The lines logged once the server is ready, in order; `default_model` is the one sessions,
/// tasks and the UI use (chosen from the providers when not configured).
pub fn next_steps(config: &Config, default_model: &str, local: SocketAddr) -> [String; 3] {
    let base = browsable(local);
    [
        format!("chat UI at {base}/ · OpenAI-compatible API at {base}/v1"),
        keys_line(config),
        providers_line(config, default_model),
    ]
}

/// The URL a browser on this machine can open: an unspecified address is not one.
fn browsable(local: SocketAddr) -> String {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, local.port()))
}

fn keys_line(config: &Config) -> String {
    let why = match config.chat.auth {
        AuthMode::Auto if config.auth_required() => "not a loopback address",
        AuthMode::Auto => "loopback address",
        AuthMode::Required => "SLUICE_AUTH=required",
        AuthMode::Off => "SLUICE_AUTH=off",
    };
    if config.auth_required() {
        format!(
            "API keys required ({why}): create one with `sluice keys create --name NAME` \
             and send it as `Authorization: Bearer KEY`"
        )
    } else {
        format!(
            "API keys not required ({why}): requests without a key, or with an SDK's \
             placeholder key, act as the local user; `sluice keys create --name NAME` makes one"
        )
    }
}

fn providers_line(config: &Config, model: &str) -> String {
    let providers = &config.upstream.providers;
    if providers.is_empty() {
        return format!(
            "providers: demo (built-in, canned replies; set OPENAI_API_KEY, OPENAI_BASE_URL, \
             ANTHROPIC_API_KEY or sluice.toml for a real model) · default model: {model}"
        );
    }
    let list = providers
        .iter()
        .map(|p| match p.urls().first().and_then(|u| shown_url(u)) {
            Some(url) => format!("{} ({url})", p.name),
            None => p.name.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("providers: {list} · default model: {model}")
}

/// A base URL without any user or password it may carry.
fn shown_url(url: &str) -> Option<String> {
    let mut u = reqwest::Url::parse(url).ok()?;
    u.set_username("").ok()?;
    u.set_password(None).ok()?;
    Some(u.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProviderConfig;

    #[test]
    fn defaults_point_at_the_ui_need_no_key_and_name_the_demo() {
        let c = Config::default();
        let [ui, keys, providers] = next_steps(&c, "demo", "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            ui,
            "chat UI at http://127.0.0.1:8080/ · OpenAI-compatible API at http://127.0.0.1:8080/v1"
        );
        assert!(
            keys.starts_with("API keys not required (loopback address)"),
            "{keys}"
        );
        assert!(keys.contains("act as the local user"), "{keys}");
        assert!(providers.starts_with("providers: demo"), "{providers}");
        assert!(providers.ends_with("default model: demo"), "{providers}");
    }

    #[test]
    fn public_addresses_require_keys_and_urls_hide_credentials() {
        let mut c = Config::default();
        c.server.addr = SocketAddr::from(([0, 0, 0, 0], 8080));
        c.upstream.providers = vec![ProviderConfig::openai(
            "openai",
            "http://user:pw@10.0.0.5:8000/v1/",
            None,
        )];
        let [ui, keys, providers] = next_steps(&c, "gpt-4o-mini", c.server.addr);
        assert!(ui.starts_with("chat UI at http://127.0.0.1:8080/"), "{ui}");
        assert!(keys.contains("`sluice keys create --name NAME`"), "{keys}");
        assert!(
            keys.starts_with("API keys required (not a loopback address)"),
            "{keys}"
        );
        assert_eq!(
            providers,
            "providers: openai (http://10.0.0.5:8000/v1) · default model: gpt-4o-mini"
        );
    }
}
