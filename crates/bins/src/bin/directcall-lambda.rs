//! `directcall-lambda`: the gateway's routes as an AWS Lambda behind API
//! Gateway (REST v1 or HTTP API v2), through lambda_http. One MQTT
//! connection per execution environment, made at init and reused by every
//! warm invocation. Configuration: the environment variables of
//! `directcall serve` (`directcall-lambda --help` lists them).

use std::process::ExitCode;

use clap::Parser;
use directcall_bins::lambda::{self, LambdaArgs};

fn main() -> ExitCode {
    let args = LambdaArgs::parse();
    // Logs written before each answer: the environment is frozen between
    // invocations.
    let logs = directcall_bins::cli::LogWriter::Direct;
    directcall_bins::cli::run_with("directcall-lambda", logs, async move {
        match lambda::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("directcall-lambda: {e}");
                ExitCode::from(2)
            }
        }
    })
}
