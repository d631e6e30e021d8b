//! `harbor-worker resync`: take stock of each Harbor and ask the workers for the refreshes.
//! The worker holding the resync lock runs it when one does (with the fleet's Port budget and
//! token); else this command runs it itself.

use std::time::Duration;

use anyhow::bail;
use harbor_shared::broker;

use super::{heading, with_instance};
use crate::resync;
use crate::resync::asked::{self, Asked};
use crate::retry::RetryPolicy;
use crate::settings::{Cli, select};
use crate::startup::fleet;

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
    let connection = broker::connect(&amqp.url, "harbor-worker resync").await?;
    let asked = Asked {
        deployment: asked::deployment(&harbors, &port),
        chosen: chosen.clone(),
        options,
        asked_at: asked::now_ms(),
    };
    let outcomes = match asked::ask(&connection, &amqp.topology, &asked).await? {
        Some(outcomes) => {
            eprintln!("run by the worker that holds the resync lock");
            outcomes
        }
        None => {
            if !dry_run {
                // The usual first install runs a resync before any worker: its requests wait
                // in the work queues, which must exist for the publish to be routed.
                amqp.topology.declare(&connection).await?;
            }
            let run = &cli.run;
            let fleet = fleet(
                &harbors,
                &port,
                run.http()?,
                Duration::ZERO,
                run.worker_concurrency,
            );
            let retry = RetryPolicy::with_budget(run.retry_max_elapsed);
            resync::resync_each(&fleet, chosen.clone(), retry, options, &amqp, &connection).await
        }
    };
    let _ = connection.close(200, "done".into()).await;
    let (mut refused, mut failed) = (Vec::new(), Vec::new());
    // In the order asked: each chosen Harbor's.
    for (index, outcome) in chosen.into_iter().zip(outcomes) {
        let name = outcome.instance;
        let title = heading(harbors[index].name.as_deref());
        let summary = match outcome.result {
            Ok(summary) => summary,
            Err(error) => {
                eprintln!("{title}resync failed: {error}");
                failed.push(name);
                continue;
            }
        };
        if json {
            println!("{}", with_instance(serde_json::json!(summary), &name));
        } else {
            println!(
                "{title}Harbor has {}; this integration has {} in Port, of which {} ({:.0} %) Harbor no longer has",
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
