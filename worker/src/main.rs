use std::process::ExitCode;

use harbor_shared::{config, telemetry};
use harbor_worker::commands;
use harbor_worker::settings::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = config::parse_cli();
    telemetry::init_tracing(cli.log.log_format);
    telemetry::exit_code("harbor-worker", commands::run(cli).await)
}
