//! `harbor-worker blueprints`: create or update the Port blueprints.

use crate::blueprints;
use crate::retry::RetryPolicy;
use crate::settings::Cli;
use crate::startup::port_client;

/// Creates the blueprints, or merges them into those Port has.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let port = cli.port.into_settings()?;
    let http = cli.run.http()?;
    let retry = RetryPolicy::with_budget(cli.run.retry_max_elapsed);
    blueprints::apply(&port_client(&port, http), retry).await
}
