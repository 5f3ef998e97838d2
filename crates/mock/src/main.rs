//! The `sluice-mock` binary: the mock upstream on its own port, until SIGINT or SIGTERM.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use sluice_mock::MockArgs;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "sluice-mock",
    version,
    about = "An OpenAI/Anthropic-compatible fake upstream with latency knobs and fault injection"
)]
struct Cli {
    #[command(flatten)]
    args: MockArgs,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    // Before parsing, so `.env` values feed the env-backed flags; real env vars win.
    let _ = dotenvy::dotenv();
    let args = Cli::parse().args;
    // Logs go to stderr: stdout carries the line scripts read the port from.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    raise_open_file_limit();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::from)
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-mock: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds `args.addr`, announces `mock-upstream listening on http://ADDR/v1` on stdout and
/// serves until SIGINT/SIGTERM.
async fn run(args: MockArgs) -> Result<(), Error> {
    let config = args.config()?;
    let listener = TcpListener::bind(args.addr.as_str()).await?;
    let addr = listener.local_addr()?;
    // Scripts wait for this exact line to learn the (possibly ephemeral) port, so it is
    // flushed at once.
    let mut out = std::io::stdout().lock();
    writeln!(out, "mock-upstream listening on http://{addr}/v1")?;
    out.flush()?;
    drop(out);
    sluice_mock::serve(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Each stream holds a socket; the default soft limit of 1024 would cap a load test at a
/// few hundred streams.
fn raise_open_file_limit() {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open file limit");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!("mock: cannot listen for ctrl-c: {err}");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::warn!("mock: cannot listen for SIGTERM: {err}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
