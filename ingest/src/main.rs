use std::process::ExitCode;

use anyhow::bail;
use harbor_ingest::settings::{Cli, Command};
use harbor_ingest::startup::Application;
use harbor_shared::{config, ops, telemetry};

// One thread for what is not HTTP (the broker link, lapin's socket readiness, shutdown): HTTP
// runs on actix's own worker threads. A multi-threaded runtime here woke its two threads about
// 9,000 times a second each under load to hand lapin's socket events around, taking about a
// sixth of a core from the broker and the HTTP thread; this one wakes 500 times a second.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli: Cli = config::parse_cli();
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
