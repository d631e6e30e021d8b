use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use harbor_ingest::settings::{Cli, Command};
use harbor_ingest::startup::Application;
use harbor_shared::{ops, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.log.log_format);
    telemetry::exit_code("harbor-ingest", run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.clone().unwrap_or(Command::Serve) {
        Command::Serve => {
            Application::build(cli.into_settings()?)
                .await?
                .run_until_stopped()
                .await
        }
        Command::Healthcheck => {
            if !ops::probe(cli.listen_addr, "/readyz") {
                bail!("the ingest on LISTEN_ADDR {} is not ready", cli.listen_addr);
            }
            Ok(())
        }
    }
}
