use std::process::ExitCode;

use clap::Parser;
use harbor_ingest::settings::Cli;
use harbor_ingest::startup::Application;
use harbor_shared::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.log.log_format);
    let result = async {
        let application = Application::build(cli.into_settings()?).await?;
        application.run_until_stopped().await
    };
    match result.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "harbor-ingest stopped on an error"
            );
            ExitCode::FAILURE
        }
    }
}
