//! Harbor and Port in one process, in memory; see `harbor_sync_tests::sandbox`.

use std::process::ExitCode;

use clap::Parser;
use harbor_shared::config::LogFormat;
use harbor_shared::telemetry;
use harbor_sync_tests::sandbox::{Sandbox, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    let format = if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        LogFormat::Json
    } else {
        LogFormat::Pretty
    };
    telemetry::init_tracing(format);
    let run = async {
        let sandbox = Sandbox::build(settings)?;
        tracing::info!(port = sandbox.port(), "harbor-sandbox listening");
        sandbox.run().await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "harbor-sandbox failed");
            ExitCode::FAILURE
        }
    }
}
