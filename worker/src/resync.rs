//! `harbor-worker resync`: a walk of Harbor that repairs what the webhooks missed.
//!
//! Webhooks drift: Harbor gives up on a webhook after 3 failed attempts, and sends none when a
//! tag is removed, garbage collection deletes untagged artifacts or a project is deleted. A
//! resync lists every project and repository of Harbor, and every project and repository entity
//! this integration wrote to Port, and asks for a refresh of each: of a project, and of every
//! artifact of a repository (written as Harbor has them; those it no longer has deleted).
//! What Port has and Harbor does not answers 404 to its refresh and is deleted.
//!
//! The refreshes are the webhooks' own, through the same scheduler: one refresh of a key at a
//! time, each reading Harbor just before it writes, so a resync never overwrites what a webhook
//! wrote since.

use std::collections::BTreeSet;
use std::time::Instant;

use futures_util::future::join_all;
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

use crate::clients::CallError;
use crate::entities::{PROJECT, REPOSITORY};
use crate::handler::{Handler, INSTANCE_PROPERTY, Key, Work};
use crate::names::RepositoryName;
use crate::retry::{Budget, RetryPolicy};
use crate::schedule::{Request, Scheduler, Settled};

/// What a resync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Projects refreshed (in Harbor, in Port, or both).
    pub projects: usize,
    /// Repositories refreshed, with every artifact of each.
    pub repositories: usize,
    /// Refreshes that failed (logged); a later resync retries them.
    pub failed: usize,
}

/// Walks Harbor and Port and refreshes everything either has.
pub async fn resync(
    handler: &Handler,
    scheduler: &Scheduler<Handler>,
    retry: RetryPolicy,
) -> Summary {
    let started = Instant::now();
    let mut summary = Summary::default();
    let keys = match inventory(handler, retry).await {
        Ok(keys) => keys,
        Err(error) => {
            warn!(%error, "Resync: cannot list what to refresh; nothing done");
            summary.failed += 1;
            return summary;
        }
    };
    let refreshes = keys.into_iter().map(|key| {
        let work = match &key {
            Key::Project(_) => Work::default(),
            Key::Repository(_) => Work {
                repository: true,
                every_artifact: true,
                ..Work::default()
            },
        };
        let settled = scheduler.submit(Request {
            key: key.clone(),
            work,
            delay: std::time::Duration::ZERO,
            group: 0,
        });
        async move { (key, settled.await) }
    });
    for (key, settled) in join_all(refreshes).await {
        match &key {
            Key::Project(_) => summary.projects += 1,
            Key::Repository(_) => summary.repositories += 1,
        }
        if let Settled::Failed(failure) = settled {
            warn!(?key, reason = %failure.reason, "Resync: refresh failed");
            summary.failed += 1;
        }
    }
    info!(
        projects = summary.projects,
        repositories = summary.repositories,
        failed = summary.failed,
        elapsed_s = started.elapsed().as_secs(),
        "Resync finished"
    );
    summary
}

/// Every project and repository in Harbor or among this integration's entities in Port.
async fn inventory(handler: &Handler, retry: RetryPolicy) -> Result<BTreeSet<Key>, CallError> {
    let harbor = handler.harbor();
    let projects = Budget::start(retry)
        .run("harbor", || harbor.projects())
        .await?;
    let mut keys = BTreeSet::new();
    for project in &projects {
        keys.insert(Key::Project(project.name.clone()));
        let repositories = Budget::start(retry)
            .run("harbor", || harbor.repositories(&project.name))
            .await?;
        for repository in repositories {
            match RepositoryName::parse(&repository.name) {
                Ok(name) => {
                    keys.insert(Key::Repository(name));
                }
                Err(error) => warn!(%error, "Resync: skipping a repository"),
            }
        }
    }
    for blueprint in [PROJECT, REPOSITORY] {
        let query = json!({"combinator": "and", "rules": [
            {"property": "$blueprint", "operator": "=", "value": blueprint},
            {"property": INSTANCE_PROPERTY, "operator": "=", "value": handler.instance()},
        ]});
        let found = Budget::start(retry)
            .run("port", || handler.port().search(&query, &["identifier"]))
            .await?;
        for identifier in found.iter().filter_map(|e| e["identifier"].as_str()) {
            match blueprint {
                PROJECT => {
                    keys.insert(Key::Project(identifier.to_owned()));
                }
                _ => {
                    if let Ok(name) = RepositoryName::parse(identifier) {
                        keys.insert(Key::Repository(name));
                    }
                }
            }
        }
    }
    Ok(keys)
}
