//! `harbor-worker webhooks sync|status`.

use anyhow::{Context, bail};
use harbor_shared::instances::DEFAULT_INSTANCE;

use super::{heading, with_detail, with_instance};
use crate::settings::{Cli, WebhooksAction, select};
use crate::startup::harbor_client;
use crate::webhooks;

/// Syncs our webhook policy in every project of each Harbor chosen, or shows it.
pub async fn run(cli: Cli, action: WebhooksAction) -> anyhow::Result<()> {
    let harbors = cli.harbor.into_settings(cli.webhooks)?;
    let (WebhooksAction::Sync { instance, .. } | WebhooksAction::Status { instance, .. }) = &action;
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
                let report = webhooks::sync(&harbor, desired, mode)
                    .await
                    .with_context(|| {
                        format!("{}Failed to list Harbor's projects", heading(name))
                    })?;
                if *json {
                    println!("{}", with_instance(serde_json::json!(report), instance));
                } else {
                    for outcome in &report.projects {
                        let action = with_detail(&outcome.action, outcome.detail.as_deref());
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
                        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
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
