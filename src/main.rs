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
    /// An OpenAI-compatible fake upstream with latency knobs and fault injection.
    MockUpstream(sluice::mock::MockArgs),
    /// Applies the store's migrations and exits (they also run at every start).
    Migrate,
    /// Manages API keys.
    #[command(subcommand)]
    Keys(sluice::store::cli::KeysCommand),
    /// The load client of scripts/bench.sh.
    Bench(sluice::bench::BenchArgs),
}

fn main() -> ExitCode {
    // Before parsing, so `.env` values feed the env-backed flags; real env vars win.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(*args),
        Some(Command::MockUpstream(args)) => mock_upstream(args),
        Some(Command::Bench(args)) => bench(args),
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
        let addr = config.server.addr;
        let state = sluice::app::AppState::new(config).await?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (SLUICE_ADDR / PORT)"))?;
        let local = listener.local_addr()?;
        tracing::info!(
            server_id = %state.config.server.server_id,
            providers = ?state.upstreams.provider_names(),
            default_model = state.upstreams.default_model(),
            "listening on http://{local}"
        );
        let systemd = sluice::ops::systemd::serving(&state, local);
        sluice::app::serve(state, listener, systemd.stopping_on(shutdown_signal())).await?;
        systemd.finish().await;
        tracing::info!("stopped");
        Ok(())
    })
}

fn mock_upstream(args: sluice::mock::MockArgs) -> anyhow::Result<()> {
    init_tracing(&LogConfig {
        format: LogFormat::Text,
        filter: "warn".into(),
    })?;
    raise_open_file_limit();
    runtime()?
        .block_on(sluice::mock::run(args))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `migrate` and `keys` act on the store that `serve` would use, configured the same way.
fn store_command(
    args: ServeArgs,
    keys: Option<sluice::store::cli::KeysCommand>,
) -> anyhow::Result<()> {
    let cfg = sluice::config::StoreConfig::from_args(&args);
    runtime()?.block_on(async move {
        match keys {
            None => sluice::store::cli::migrate(&cfg).await?,
            Some(cmd) => sluice::store::cli::keys(&cfg, cmd).await?,
        }
        Ok(())
    })
}

fn bench(args: sluice::bench::BenchArgs) -> anyhow::Result<()> {
    raise_open_file_limit();
    runtime()?
        .block_on(sluice::bench::run(args))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn init_tracing(log: &LogConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f).context("invalid RUST_LOG")?,
        _ => EnvFilter::try_new(&log.filter).context("invalid SLUICE_LOG")?,
    };
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
        Ok(n) => tracing::info!(limit = n, "open file limit"),
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
