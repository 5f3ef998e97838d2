//! The `sluice-load` binary: one load-client run, its JSON report on stdout.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use sluice_load::{BenchArgs, BenchError};

#[derive(Parser)]
#[command(
    name = "sluice-load",
    version,
    about = "The load client of scripts/bench.sh: drives an OpenAI-compatible endpoint and reports in JSON"
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> ExitCode {
    let args = Cli::parse().args;
    // Thousands of held streams need as many sockets; the default soft limit is 1024.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: BenchArgs) -> Result<(), BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(sluice_load::run(args))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    Ok(())
}
