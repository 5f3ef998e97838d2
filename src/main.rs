//! The `sluice` binary: CLI, configuration, telemetry, then serve with graceful shutdown.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::config::{Config, LogConfig, LogFormat, ServeArgs};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Streaming LLM chat server")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `sluice` alone runs `sluice serve`.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve(Box<ServeArgs>),
    /// Applies the store's migrations and exits (they also run at every start).
    Migrate,
    /// Manages API keys.
    #[command(subcommand)]
    Keys(sluice::store::cli::KeysCommand),
}

fn main() -> ExitCode {
    // Before parsing, so `.env` values feed the env-backed flags; real env vars win.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(*args),
        Some(Command::Migrate) => store_command(cli.serve, None),
        Some(Command::Keys(cmd)) => store_command(cli.serve, Some(cmd)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Validated before anything else happens, and before any port is bound.
    let config = Config::from_args(&args)?;
    init_tracing(&config.log)?;
    raise_open_file_limit();
    runtime()?.block_on(async move {
        // Bound before the store is opened, so a port in use leaves no `data/` behind.
        let listener = bind(config.server.addr).await?;
        let local = listener.local_addr()?;
        let Some(state) = start(&config, &listener).await? else {
            tracing::info!("stopped while starting");
            return Ok(());
        };
        tracing::info!(
            server_id = %state.config.server.server_id,
            "listening on http://{local}"
        );
        for line in sluice::server::startup::next_steps(
            &state.config,
            state.upstreams.default_model(),
            local,
        ) {
            tracing::info!("{line}");
        }
        let systemd = sluice::server::systemd::serving(&state, local);
        sluice::server::serve(state, listener, systemd.stopping_on(shutdown_signal())).await?;
        systemd.finish().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Builds the app while a minimal router answers on `listener` (on a duplicate of its
/// socket, so the app serves the same one afterwards); `None` when stopped meanwhile.
async fn start(
    config: &Config,
    listener: &tokio::net::TcpListener,
) -> anyhow::Result<Option<sluice::state::AppState>> {
    use sluice::server::startup::{Start, StartState, build_waiting, starting_router};
    let state = StartState::new(&config.server.server_id);
    let dup = std::os::fd::AsFd::as_fd(listener)
        .try_clone_to_owned()
        .and_then(|fd| {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        })
        .context("cannot share the listening socket")?;
    let done = tokio_util::sync::CancellationToken::new();
    let mut server = tokio::spawn(
        axum::serve(dup, starting_router(state.clone()))
            .with_graceful_shutdown(done.clone().cancelled_owned())
            .into_future(),
    );
    let built = build_waiting(
        config,
        &state,
        sluice::server::systemd::Notifier::from_env(),
        sd_notify::watchdog_enabled(),
        shutdown_signal(),
    )
    .await;
    done.cancel();
    // Requests to the minimal router are instant; a client keeping its connection idle
    // is not waited for long.
    if tokio::time::timeout(std::time::Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        server.abort();
    }
    match built? {
        Start::Ready(app) => Ok(Some(app)),
        Start::Stopped => Ok(None),
    }
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "; another process (another sluice?) uses it: stop it or choose another port with PORT=8081"
            }
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need privileges: choose another port with PORT=8080"
            }
            _ => "",
        };
        anyhow::anyhow!("cannot listen on {addr} (SLUICE_ADDR / PORT): {e}{hint}")
    })
}

/// `migrate` and `keys` act on the store that `serve` would use, configured the same way.
fn store_command(
    args: ServeArgs,
    keys: Option<sluice::store::cli::KeysCommand>,
) -> anyhow::Result<()> {
    let cfg = sluice::config::StoreConfig::from_args(&args.store);
    runtime()?.block_on(async move {
        match keys {
            None => sluice::store::cli::migrate(&cfg).await?,
            Some(cmd) => sluice::store::cli::keys(&cfg, cmd).await?,
        }
        Ok(())
    })
}

/// Crates logged at most at this level unless the log filter names them.
const QUIET_CRATES: [(&str, &str); 1] = [("refinery_core", "warn")];

/// Libraries that write what passes through them at DEBUG and TRACE: WebSocket frames,
/// HTTP bodies, SQL parameters, Redis commands, that is prompts, replies and keys. They log
/// at WARN at most unless `SLUICE_LOG_WIRE` lets them through, whatever the filter says.
const WIRE_CRATES: [&str; 12] = [
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "tokio_postgres",
    "postgres_protocol",
    "bb8",
    "redis",
    "rusqlite",
    "axum::rejection",
];

/// Whether a filter directive (`target[span{field}]=level`) names a wire library.
fn names_wire_crate(directive: &str) -> bool {
    let target = directive.split(['=', '[']).next().unwrap_or("").trim();
    WIRE_CRATES
        .iter()
        .any(|c| target == *c || target.strip_prefix(c).is_some_and(|r| r.starts_with("::")))
}

/// The log filter: the operator's, with the wire libraries held at WARN unless `wire`.
fn log_filter(spec: &str, wire: bool) -> anyhow::Result<EnvFilter> {
    let spec = if wire {
        spec.to_owned()
    } else {
        spec.split(',')
            .filter(|d| !names_wire_crate(d))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut filter = EnvFilter::try_new(&spec)?;
    // Libraries' routine chatter (refinery lists each migration at INFO) would bury the
    // lines that say what to do next; a filter that names the crate still gets it.
    for (krate, level) in QUIET_CRATES {
        if !spec.contains(krate) {
            filter = filter.add_directive(format!("{krate}={level}").parse()?);
        }
    }
    if !wire {
        for krate in WIRE_CRATES {
            filter = filter.add_directive(format!("{krate}=warn").parse()?);
        }
    }
    Ok(filter)
}

fn init_tracing(log: &LogConfig) -> anyhow::Result<()> {
    let (spec, var) = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => (f, "RUST_LOG"),
        _ => (log.filter.clone(), "SLUICE_LOG"),
    };
    let filter = log_filter(&spec, log.wire).with_context(|| format!("invalid {var}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// Each stream holds a socket (two through a proxy); the default soft limit of 1024 would
/// cap sluice at a few hundred streams, so it is raised to the hard limit.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        // Only worth a word when it caps the streams sluice is meant to hold.
        Ok(n) if n < 4096 => tracing::warn!(
            limit = n,
            "open file limit is low: each stream holds a socket; raise it (ulimit -n, LimitNOFILE)"
        ),
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_directives_are_recognised_by_their_target() {
        for d in [
            "hyper=trace",
            "hyper::proto::h1=debug",
            "tungstenite",
            "redis[x]=trace",
        ] {
            assert!(names_wire_crate(d), "{d}");
        }
        for d in [
            "trace",
            "sluice=trace",
            "hyperlocal=trace",
            "tower_http=debug",
        ] {
            assert!(!names_wire_crate(d), "{d}");
        }
    }
}
