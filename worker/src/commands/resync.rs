//! `harbor-worker resync`: take stock of each Harbor and ask the workers for the refreshes.

use std::time::Duration;

use anyhow::bail;
use harbor_shared::broker;

use super::{heading, with_instance};
use crate::retry::RetryPolicy;
use crate::settings::{Cli, select};
use crate::startup::fleet;
use crate::{resync, webhooks};

/// Resyncs each Harbor chosen, printing a summary of each.
pub async fn run(
    cli: Cli,
    json: bool,
    dry_run: bool,
    force: bool,
    instance: Option<String>,
) -> anyhow::Result<()> {
    let harbors = cli.harbor.into_settings(cli.webhooks)?;
    let chosen = select(&harbors, instance.as_deref())?;
    let port = cli.port.into_settings()?;
    let options = resync::Options {
        deletion_threshold: cli.run.deletion_threshold(&port.mapping)?,
        force,
        dry_run,
    };
    let amqp = cli.amqp.into_settings()?;
    let run = &cli.run;
    let http = run.http()?;
    let retry = RetryPolicy::with_budget(run.retry_max_elapsed);
    let fleet = fleet(
        &harbors,
        &port,
        http,
        Duration::ZERO,
        run.worker_concurrency,
    );
    let connection = broker::connect(&amqp.url, "harbor-worker resync").await?;
    if !dry_run {
        // The usual first install runs a resync before any worker: its requests wait in
        // the work queues, which must exist for the publish to be routed.
        amqp.topology.declare(&connection).await?;
    }
    let (mut refused, mut failed) = (Vec::new(), Vec::new());
    for index in chosen {
        let member = &fleet.members()[index];
        let handler = &member.handler;
        let name = handler.instance();
        let summary = match resync::resync(handler, retry, &amqp, &connection, options).await {
            Ok(summary) => summary,
            Err(error) => {
                eprintln!("{}resync failed: {error:#}", heading(handler.name()));
                failed.push(name);
                continue;
            }
        };
        if let Some(desired) = &member.webhooks {
            webhooks::keep(handler.harbor(), desired, dry_run).await;
        }
        if json {
            println!("{}", with_instance(serde_json::json!(summary), name));
        } else {
            println!(
                "{}Harbor has {}; this integration has {} in Port, of which {} ({:.0} %) Harbor no longer has",
                heading(handler.name()),
                summary.harbor,
                summary.ours,
                summary.to_delete,
                summary.deleted_share() * 100.0
            );
            println!("refreshes requested: {}", summary.requested);
        }
        if summary.refused {
            refused.push(format!("{name} ({:.0} %)", summary.deleted_share() * 100.0));
        }
    }
    let _ = connection.close(200, "done".into()).await;
    if !failed.is_empty() {
        bail!("the resync of {} failed", failed.join(", "));
    }
    if !refused.is_empty() {
        bail!(
            "refused: it would delete more of this integration's entities than the deletion threshold ({}: the mapping file's entityDeletionThreshold, else RESYNC_DELETION_THRESHOLD) allows, of {}; check the Harbor's URL and the robot account's access, or use --force",
            options.deletion_threshold,
            refused.join(", ")
        );
    }
    Ok(())
}
