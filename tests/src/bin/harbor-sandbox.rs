//! Harbor and Port in one process, in memory; see `harbor_sync_tests::sandbox`.

use std::process::ExitCode;

use clap::Parser;
use harbor_shared::config::LogFormat;
use harbor_shared::{ops, telemetry};
use harbor_sync_tests::sandbox::{Sandbox, SandboxCommand, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json");
    telemetry::init_tracing(if json {
        LogFormat::Json
    } else {
        LogFormat::Pretty
    });
    let run = async {
        if settings.command == Some(SandboxCommand::Healthcheck) {
            if !ops::probe(settings.listen_addr, "/healthz") {
                anyhow::bail!(
                    "the sandbox on SANDBOX_LISTEN_ADDR {} does not answer",
                    settings.listen_addr
                );
            }
            return Ok(());
        }
        let sandbox = Sandbox::build(settings)?;
        tracing::info!(port = sandbox.port(), "harbor-sandbox listening");
        sandbox.run().await
    };
    telemetry::exit_code("harbor-sandbox", run.await)
}
