use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use harbor_shared::{ops, telemetry};
use harbor_worker::blueprints;
use harbor_worker::clients::http_client;
use harbor_worker::retry::RetryPolicy;
use harbor_worker::settings::{Cli, Command};
use harbor_worker::startup::{Worker, port_client};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.log.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "harbor-worker stopped on an error"
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.clone().unwrap_or(Command::Run) {
        Command::Run => {
            Worker::build(cli.into_settings()?)
                .await?
                .run_until_stopped()
                .await
        }
        Command::Blueprints => {
            let port = cli.port.into_settings()?;
            let http =
                http_client(cli.run.http_timeout).context("Failed to build the HTTP client")?;
            let retry = RetryPolicy::with_budget(cli.run.retry_max_elapsed);
            blueprints::apply(&port_client(&port, http), retry).await
        }
        Command::Healthcheck => {
            if !ops::probe(cli.run.metrics_addr, "/readyz") {
                bail!(
                    "the worker on METRICS_ADDR {} is not ready",
                    cli.run.metrics_addr
                );
            }
            Ok(())
        }
    }
}
