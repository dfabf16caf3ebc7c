//! `ferry-loadtest`: parses flags, sets up logging (`FERRY_LOG`, default `warn`), runs the mode,
//! prints the report (a summary, or JSON with `--json`), and exits non-zero when the run found a
//! failure (a lost, duplicated or out-of-order message, a failed connection).

use std::process::ExitCode;

use clap::Parser;
use ferry_loadtest::cli::{Cli, Mode};
use ferry_loadtest::{Verdict, run_load, run_ramp, run_storm};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let json = cli.json;
    let outcome = runtime.block_on(async move {
        match cli.mode {
            Mode::Run(args) => print(json, run_load(args.into_config()?).await?),
            Mode::Ramp(args) => print(json, run_ramp(args.into_config()?).await?),
            Mode::Storm(args) => print(json, run_storm(args.into_config()?).await?),
        }
    });
    match outcome {
        Ok(failures) if failures.is_empty() => ExitCode::SUCCESS,
        Ok(failures) => {
            eprintln!("ferry-loadtest: FAILED: {}", failures.join(", "));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ferry-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints the report; its failures.
fn print(json: bool, report: impl Verdict) -> anyhow::Result<Vec<String>> {
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(report.failures())
}
