use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use harbor_shared::instances::DEFAULT_INSTANCE;
use harbor_shared::quote::printable;
use harbor_shared::{broker, config, ops, telemetry};
use harbor_worker::mapping::Kind;
use harbor_worker::parked::{self, Selection};
use harbor_worker::retry::RetryPolicy;
use harbor_worker::settings::{Cli, Command, MappingAction, ParkedAction, WebhooksAction, select};
use harbor_worker::startup::{Worker, fleet, harbor_client, port_client};
use harbor_worker::{backlog, blueprints, resync, webhooks};

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = config::parse_cli();
    telemetry::init_tracing(cli.log.log_format);
    telemetry::exit_code("harbor-worker", run(cli).await)
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
            let http = cli.run.http()?;
            let retry = RetryPolicy::with_budget(cli.run.retry_max_elapsed);
            blueprints::apply(&port_client(&port, http), retry).await
        }
        Command::Resync {
            json,
            dry_run,
            force,
            instance,
        } => {
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
                let summary =
                    match resync::resync(handler, retry, &amqp, &connection, options).await {
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
        Command::Backlog {
            json,
            management_url,
        } => {
            let amqp = cli.amqp.into_settings()?;
            let counts = backlog::backlog(&amqp, management_url.as_ref()).await?;
            if json {
                println!("{}", serde_json::json!({ "queues": counts }));
            } else {
                println!(
                    "{:<40} {:>10} {:>10} {:>10}",
                    "queue", "ready", "unacked", "consumers"
                );
                for q in counts {
                    let unacked = q.unacked.map_or_else(|| "-".to_owned(), |n| n.to_string());
                    println!(
                        "{:<40} {:>10} {:>10} {:>10}",
                        q.queue, q.ready, unacked, q.consumers
                    );
                }
            }
            Ok(())
        }
        Command::Parked {
            action: ParkedAction::List { json, limit },
        } => {
            let events = parked::list(&cli.amqp.into_settings()?, limit).await?;
            if json {
                println!("{}", serde_json::json!({ "parked": events }));
            } else {
                for e in &events {
                    // Each from a message: printable, so that one cannot forge a line.
                    let show =
                        |v: &Option<String>| v.as_deref().map_or_else(|| "-".into(), printable);
                    let attempts = e.attempts.map_or_else(|| "-".into(), |n| n.to_string());
                    let event_type = match &e.instance {
                        Some(instance) => format!("{instance}: {}", e.event_type),
                        None => e.event_type.clone(),
                    };
                    let event_type = printable(&event_type);
                    println!(
                        "{}  {}  {}  attempts={}  {}",
                        show(&e.failed_at),
                        show(&e.message_id),
                        event_type,
                        attempts,
                        show(&e.reason)
                    );
                }
                println!("{} parked event(s) shown", events.len());
            }
            Ok(())
        }
        Command::Parked {
            action: ParkedAction::Replay { all, ids, from },
        } => {
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids)
            };
            let amqp = cli.amqp.into_settings()?;
            let done = parked::replay(&amqp, &selection, from.as_deref()).await?;
            println!("replayed {}, still parked {}", done.replayed, done.kept);
            if !done.not_found.is_empty() {
                println!("not found: {}", done.not_found.join(", "));
            }
            Ok(())
        }
        Command::Mapping {
            action: MappingAction::Check,
        } => {
            cli.port.mapping()?;
            let file = cli.port.mapping_file.as_ref();
            let file = file.map_or_else(
                || "the built-in mapping".into(),
                |f| f.display().to_string(),
            );
            println!("{file}: ok");
            Ok(())
        }
        Command::Mapping {
            action:
                MappingAction::Render {
                    kind,
                    project,
                    repository,
                    reference,
                    instance,
                },
        } => {
            let Some(kind) = Kind::parse(&kind) else {
                bail!("--kind must be project, repository or artifact (got {kind})");
            };
            let harbors = cli.harbor.into_settings(cli.webhooks)?;
            let chosen = select(&harbors, instance.as_deref())?;
            let &[index] = chosen.as_slice() else {
                bail!("HARBOR_INSTANCES_FILE lists several instances: name one with --instance");
            };
            let port = cli.port.into_settings()?;
            let http = cli.run.http()?;
            let fleet = fleet(&harbors, &port, http, Duration::ZERO, 1);
            let handler = &fleet.members()[index].handler;
            let rendered = handler
                .render_current(kind, &project, repository.as_deref(), reference.as_deref())
                .await
                .map_err(anyhow::Error::msg)?;
            let Some(entities) = rendered else {
                bail!("Harbor has no such {kind}");
            };
            for mapped in entities {
                println!(
                    "{}",
                    serde_json::json!({"blueprint": mapped.blueprint, "entity": mapped.entity})
                );
            }
            Ok(())
        }
        Command::Webhooks { action } => {
            let harbors = cli.harbor.into_settings(cli.webhooks)?;
            let (WebhooksAction::Sync { instance, .. } | WebhooksAction::Status { instance, .. }) =
                &action;
            let chosen = select(&harbors, instance.as_deref())?;
            let http = cli.run.http()?;
            let mut failures = 0;
            for index in chosen {
                let settings = &harbors[index];
                let Some(desired) = &settings.webhooks else {
                    bail!(
                        "WEBHOOK_PUBLIC_URL is required: the ingest's address as Harbor reaches \
                         it (our policies post to <WEBHOOK_PUBLIC_URL>/webhook)"
                    );
                };
                let harbor = harbor_client(settings, http.clone());
                let name = settings.name.as_deref();
                let instance = name.unwrap_or(DEFAULT_INSTANCE);
                failures += match &action {
                    WebhooksAction::Sync {
                        dry_run,
                        json,
                        remove,
                        ..
                    } => {
                        let mode = webhooks::Mode {
                            dry_run: *dry_run,
                            remove: *remove,
                        };
                        let report =
                            webhooks::sync(&harbor, desired, mode)
                                .await
                                .with_context(|| {
                                    format!("{}Failed to list Harbor's projects", heading(name))
                                })?;
                        if *json {
                            println!("{}", with_instance(serde_json::json!(report), instance));
                        } else {
                            for outcome in &report.projects {
                                let action =
                                    with_detail(&outcome.action, outcome.detail.as_deref());
                                println!("{}{}  {action}", heading(name), outcome.project);
                            }
                            println!("{}{}", heading(name), report.counts());
                        }
                        report.failures()
                    }
                    WebhooksAction::Status { json, .. } => {
                        let all = webhooks::status(&harbor, desired).await.with_context(|| {
                            format!("{}Failed to list Harbor's projects", heading(name))
                        })?;
                        if *json {
                            let all = serde_json::json!({ "projects": all });
                            println!("{}", with_instance(all, instance));
                            continue;
                        }
                        for status in &all {
                            let state = match (status.present, status.matches) {
                                (false, _) => "missing",
                                (true, true) => "ok",
                                (true, false) => "differs",
                            };
                            println!(
                                "{}{}  {}  (failed deliveries: {})",
                                heading(name),
                                status.project,
                                with_detail(state, status.detail.as_deref()),
                                status.failed.len()
                            );
                            for failed in &status.failed {
                                let show =
                                    |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                                println!(
                                    "    {}  execution {}  {}  {}",
                                    show(&failed.at),
                                    failed.execution,
                                    show(&failed.event_type),
                                    show(&failed.message)
                                );
                            }
                        }
                        0
                    }
                };
            }
            if failures > 0 {
                bail!("the webhook policy of {failures} project(s) could not be synced");
            }
            Ok(())
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
