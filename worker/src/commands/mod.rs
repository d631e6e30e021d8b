//! The commands besides `run`: each parses nothing (`main.rs` has), does its work, and prints
//! its own output on stdout; errors go back to `main.rs`, which prints them and sets the exit
//! code.

mod backlog;
mod blueprints;
mod mapping;
mod parked;
mod resync;
mod webhooks;

use anyhow::bail;
use harbor_shared::ops;

use crate::settings::{Cli, Command, MappingAction, ParkedAction};
use crate::startup::Worker;

/// Runs the command `cli` names (the worker itself when none).
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.clone().unwrap_or(Command::Run) {
        Command::Run => {
            Worker::build(cli.into_settings()?)
                .await?
                .run_until_stopped()
                .await
        }
        Command::Blueprints => blueprints::run(cli).await,
        Command::Resync {
            json,
            dry_run,
            force,
            instance,
        } => resync::run(cli, json, dry_run, force, instance).await,
        Command::Backlog {
            json,
            management_url,
        } => backlog::run(cli, json, management_url).await,
        Command::Parked {
            action: ParkedAction::List { json, limit },
        } => parked::list(cli, json, limit).await,
        Command::Parked {
            action: ParkedAction::Replay { all, ids, from },
        } => parked::replay(cli, all, ids, from).await,
        Command::Mapping {
            action: MappingAction::Check,
        } => mapping::check(cli),
        Command::Mapping {
            action:
                MappingAction::Render {
                    kind,
                    project,
                    repository,
                    reference,
                    instance,
                },
        } => mapping::render(cli, kind, project, repository, reference, instance).await,
        Command::Webhooks { action } => webhooks::run(cli, action).await,
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

/// What a line about a named instance starts with (`eu: `); nothing for a single Harbor.
fn heading(instance: Option<&str>) -> String {
    instance.map_or_else(String::new, |name| format!("{name}: "))
}

/// A JSON object with the instance it is about.
fn with_instance(mut value: serde_json::Value, instance: &str) -> serde_json::Value {
    if let Some(object) = value.as_object_mut() {
        object.insert("instance".into(), instance.into());
    }
    value
}

/// `head`, or `head: detail` when there is one.
fn with_detail(head: &str, detail: Option<&str>) -> String {
    match detail {
        Some(detail) if !detail.is_empty() => format!("{head}: {detail}"),
        _ => head.to_owned(),
    }
}
