//! `harbor-worker resync`: a full walk of Harbor that fixes whatever the webhooks missed.
//!
//! Webhooks drift: Harbor gives up on a webhook after 3 failed attempts, and sends none when a
//! tag is removed or garbage collection deletes untagged artifacts. A resync lists every project,
//! repository and artifact (paginated, `page_size` 100, a few repositories at a time), upserts
//! them all, then deletes the entities of our blueprints that Harbor no longer has. It is safe
//! while webhooks flow: before deleting an entity it did not see, it asks Harbor for that one
//! thing again, so something pushed during the walk is not deleted. It writes and deletes
//! through the [`Handler`], so that the handler's memory of what it wrote stays true.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use tracing::{info, warn};

use crate::clients::CallError;
use crate::clients::harbor::Repository;
use crate::entities::{self, ARTIFACT, PROJECT, REPOSITORY};
use crate::handler::Handler;
use crate::names::{Digest, RepositoryName, project_name};
use crate::retry::Budget;

/// Repositories walked at once.
const CONCURRENCY: usize = 4;

/// What a resync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Projects, repositories and artifacts found in Harbor.
    pub seen: usize,
    /// Entities written to Port.
    pub upserted: usize,
    /// Entities deleted from Port (Harbor no longer has them).
    pub deleted: usize,
    /// Items that could not be synced (logged); a later resync retries them.
    pub failed: usize,
}

/// Entities found in Harbor during the walk, by blueprint.
#[derive(Default)]
struct Seen {
    projects: HashSet<String>,
    repositories: HashSet<String>,
    artifacts: HashSet<String>,
}

/// Walks Harbor and makes Port match it.
pub async fn resync(handler: &Handler) -> Summary {
    let (harbor, retry) = (handler.harbor(), handler.retry());
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut seen = Seen::default();

    let projects = match harbor.projects(&Budget::start(retry)).await {
        Ok(projects) => projects,
        Err(error) => {
            warn!(%error, "Resync: cannot list Harbor's projects; nothing done");
            summary.failed += 1;
            return summary;
        }
    };
    let mut repositories = Vec::new();
    for project in &projects {
        seen.projects.insert(project.name.clone());
        summary.seen += 1;
        let budget = Budget::start(retry);
        let entity = entities::project(project);
        let written = handler.write(PROJECT, &entity, &budget).await;
        count(&mut summary, written, &project.name);
        match harbor.repositories(&project.name, &budget).await {
            Ok(found) => repositories.extend(found),
            Err(error) => {
                warn!(project = %project.name, %error, "Resync: cannot list repositories");
                summary.failed += 1;
            }
        }
    }

    let mut walked = futures_util::stream::iter(repositories)
        .map(|repository| sync_repository(handler, repository))
        .buffer_unordered(CONCURRENCY);
    let mut last_progress = Instant::now();
    let mut done = 0;
    while let Some(repository) = walked.next().await {
        done += 1;
        summary.seen += repository.seen.len() + 1;
        summary.upserted += repository.tally.upserted;
        summary.failed += repository.tally.failed;
        seen.repositories.insert(repository.name);
        seen.artifacts.extend(repository.seen);
        if last_progress.elapsed() > Duration::from_secs(10) {
            info!(
                repositories = done,
                upserted = summary.upserted,
                "Resync in progress"
            );
            last_progress = Instant::now();
        }
    }

    delete_unseen(handler, &seen, &mut summary).await;
    info!(
        seen = summary.seen,
        upserted = summary.upserted,
        deleted = summary.deleted,
        failed = summary.failed,
        elapsed_s = started.elapsed().as_secs(),
        "Resync finished"
    );
    summary
}

fn count(summary: &mut Summary, written: Result<(), CallError>, what: &str) {
    match written {
        Ok(()) => summary.upserted += 1,
        Err(error) => {
            warn!(subject = what, %error, "Resync: cannot write");
            summary.failed += 1;
        }
    }
}

/// One repository's walk.
struct RepositoryWalk {
    name: String,
    /// The identifiers of its artifacts.
    seen: Vec<String>,
    /// What was written, and what failed.
    tally: Summary,
}

async fn sync_repository(handler: &Handler, repository: Repository) -> RepositoryWalk {
    let (harbor, retry) = (handler.harbor(), handler.retry());
    let mut walk = RepositoryWalk {
        name: repository.name.clone(),
        seen: Vec::new(),
        tally: Summary::default(),
    };
    let Ok(name) = RepositoryName::parse(&repository.name) else {
        warn!(repository = %repository.name, "Resync: skipping a repository with an unexpected name");
        walk.tally.failed += 1;
        return walk;
    };
    let budget = Budget::start(retry);
    let entity = entities::repository(&name, &repository, harbor.base());
    let written = handler.write(REPOSITORY, &entity, &budget).await;
    count(&mut walk.tally, written, &repository.name);
    let artifacts = match harbor.artifacts(&name, &budget).await {
        Ok(artifacts) => artifacts,
        Err(error) => {
            warn!(repository = %name, %error, "Resync: cannot list artifacts");
            walk.tally.failed += 1;
            return walk;
        }
    };
    for artifact in artifacts {
        let Ok(digest) = Digest::parse(&artifact.digest) else {
            continue;
        };
        let entity = entities::artifact(&name, &digest, &artifact, harbor.base());
        walk.seen.push(entity.identifier.clone());
        let written = handler
            .write(ARTIFACT, &entity, &Budget::start(retry))
            .await;
        count(&mut walk.tally, written, &entity.identifier);
    }
    walk
}

/// Deletes the entities Harbor does not have: those not seen in the walk, once Harbor confirmed
/// (404) that each is gone.
async fn delete_unseen(handler: &Handler, seen: &Seen, summary: &mut Summary) {
    let (harbor, retry) = (handler.harbor(), handler.retry());
    // Artifacts first, then repositories, then projects: dependents before what they relate to.
    for (blueprint, known) in [
        (ARTIFACT, &seen.artifacts),
        (REPOSITORY, &seen.repositories),
        (PROJECT, &seen.projects),
    ] {
        let budget = Budget::start(retry);
        let listed = match budget
            .run("port", || handler.port().identifiers(blueprint))
            .await
        {
            Ok(listed) => listed,
            Err(error) => {
                warn!(blueprint, %error, "Resync: cannot list Port's entities; none deleted");
                summary.failed += 1;
                continue;
            }
        };
        for identifier in listed.into_iter().filter(|id| !known.contains(id)) {
            let budget = Budget::start(retry);
            let gone = match blueprint {
                ARTIFACT => match identifier.split_once('@') {
                    Some((repo, digest)) => {
                        match (RepositoryName::parse(repo), Digest::parse(digest)) {
                            (Ok(repo), Ok(digest)) => budget
                                .run("harbor", || harbor.artifact(&repo, &digest))
                                .await
                                .map(|a| a.is_none()),
                            _ => Ok(true),
                        }
                    }
                    None => Ok(true),
                },
                REPOSITORY => match RepositoryName::parse(&identifier) {
                    Ok(repo) => budget
                        .run("harbor", || harbor.repository(&repo))
                        .await
                        .map(|r| r.is_none()),
                    Err(_) => Ok(true),
                },
                _ => match project_name(&identifier) {
                    Ok(project) => budget
                        .run("harbor", || harbor.project(project))
                        .await
                        .map(|p| p.is_none()),
                    Err(_) => Ok(true),
                },
            };
            match gone {
                // It appeared during the walk: a webhook will have written it.
                Ok(false) => {}
                Ok(true) => match handler.delete(blueprint, &identifier, &budget).await {
                    Ok(()) => summary.deleted += 1,
                    Err(error) => {
                        warn!(blueprint, %identifier, %error, "Resync: cannot delete");
                        summary.failed += 1;
                    }
                },
                Err(error) => {
                    warn!(blueprint, %identifier, %error, "Resync: cannot check Harbor; not deleted");
                    summary.failed += 1;
                }
            }
        }
    }
}
