//! What each event does. Knows Harbor and Port, nothing of RabbitMQ.
//!
//! An event only says *what to refresh*: Harbor gives no ordering and sends duplicates, so the
//! handler always re-reads the current state from Harbor and writes that to Port.
//!
//! | event                              | Harbor reads                   | Port writes                   |
//! |------------------------------------|--------------------------------|-------------------------------|
//! | `PUSH_ARTIFACT`, `PULL_ARTIFACT`, `DELETE_ARTIFACT` | each artifact, the repository | upsert what exists, delete what answers 404 |
//! | `SCANNING_COMPLETED` / `_FAILED` / `_STOPPED` | each artifact (with scan overview) | upsert it, or delete on 404 |
//! | `TAG_RETENTION`, `REPLICATION`     | each repository they name      | upsert it, or delete on 404   |
//! | `QUOTA_EXCEED`, `QUOTA_WARNING`    | the project                    | upsert it, or delete on 404   |
//! | anything else                      | none                           | none (ignored)                |
//!
//! A repository that answers 404 is gone: its entity and those of the named artifacts are
//! deleted. A project's entity is written the first time one of its repositories is.

use std::collections::HashSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::Mutex;

use futures_util::future::try_join_all;
use harbor_shared::event::{EventData, EventType, HarborEvent};
use lru::LruCache;
use tracing::warn;

use crate::clients::CallError;
use crate::clients::harbor::HarborClient;
use crate::clients::port::PortClient;
use crate::entities::{self, ARTIFACT, Entity, PROJECT, REPOSITORY};
use crate::names::{Digest, RepositoryName, project_name};
use crate::retry::{Budget, RetryPolicy};

/// What became of an event that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Port now reflects Harbor.
    Synced {
        /// Entities upserted.
        upserted: usize,
        /// Entities deleted.
        deleted: usize,
    },
    /// An event type the worker does not act on.
    Ignored,
    /// The event lacks what it would need to be acted on.
    Skipped(String),
}

/// Why an event could not be synced, after retries.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("{reason}")]
pub struct Failure {
    /// The last error.
    pub reason: String,
    /// Calls made, retries included.
    pub attempts: u32,
}

/// What an artifact event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The repository.
    pub repository: RepositoryName,
    /// The artifacts, without duplicates.
    pub digests: Vec<Digest>,
}

impl Subject {
    /// Reads the repository and digests of an event; `Err` says what is missing.
    pub fn of(data: &EventData) -> Result<Self, String> {
        let full_name = data
            .repository
            .as_ref()
            .and_then(|r| r.full_name())
            .ok_or("the event names no repository")?;
        let repository = RepositoryName::parse(&full_name).map_err(|e| e.to_string())?;
        let mut digests = Vec::new();
        for resource in &data.resources {
            match resource.digest.as_deref().map(Digest::parse) {
                Some(Ok(digest)) if !digests.contains(&digest) => digests.push(digest),
                Some(Ok(_)) => {}
                Some(Err(error)) => warn!(%error, "Ignoring a resource of the event"),
                None => warn!("Ignoring a resource of the event: it has no digest"),
            }
        }
        if digests.is_empty() {
            return Err("the event names no artifact digest".to_owned());
        }
        Ok(Self {
            repository,
            digests,
        })
    }
}

/// What the consumer hands each event to. [`Handler`] is the real one; tests put others in
/// its place (one that panics, say) to exercise the consumer.
pub trait HandleEvent: Send + Sync + 'static {
    /// Handles one event, retries included.
    fn handle(&self, event: &HarborEvent) -> impl Future<Output = Result<Outcome, Failure>> + Send;
}

impl HandleEvent for Handler {
    fn handle(&self, event: &HarborEvent) -> impl Future<Output = Result<Outcome, Failure>> + Send {
        Handler::handle(self, event)
    }
}

/// What an event asks to refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Work {
    /// Artifact events: the artifacts, and the repository unless it is a scan event.
    Artifacts {
        subject: Subject,
        refresh_repository: bool,
    },
    /// `TAG_RETENTION`, `REPLICATION`: the repositories they name.
    Repositories(Vec<RepositoryName>),
    /// `QUOTA_*`: the project.
    Project(String),
}

impl Work {
    /// What to do for an event, or the outcome when there is nothing to do.
    fn of(event: &HarborEvent) -> Result<Self, Outcome> {
        let data = &event.data;
        match event.event_type {
            EventType::PushArtifact
            | EventType::PullArtifact
            | EventType::DeleteArtifact
            | EventType::ScanningCompleted
            | EventType::ScanningFailed
            | EventType::ScanningStopped => Ok(Work::Artifacts {
                subject: Subject::of(data).map_err(Outcome::Skipped)?,
                refresh_repository: matches!(
                    event.event_type,
                    EventType::PushArtifact | EventType::PullArtifact | EventType::DeleteArtifact
                ),
            }),
            EventType::TagRetention => {
                let retention = data.retention.clone().unwrap_or_default();
                let project = retention.project_name.unwrap_or_default();
                let names = retention
                    .deleted_artifact
                    .iter()
                    .filter_map(|a| a.repository_name());
                repositories(names.map(|name| format!("{project}/{name}")))
            }
            EventType::Replication => {
                let replication = data.replication.clone().unwrap_or_default();
                let namespaces: Vec<String> =
                    [&replication.src_resource, &replication.dest_resource]
                        .into_iter()
                        .flatten()
                        .filter_map(|end| end.namespace.clone())
                        .collect();
                let copied = replication
                    .successful_artifact
                    .iter()
                    .chain(&replication.failed_artifact);
                let names: Vec<&str> = copied.filter_map(|a| a.repository_name()).collect();
                repositories(
                    namespaces
                        .iter()
                        .flat_map(|ns| names.iter().map(move |name| format!("{ns}/{name}"))),
                )
            }
            EventType::QuotaExceed | EventType::QuotaWarning => {
                let namespace = data.repository.as_ref().and_then(|r| r.namespace.clone());
                let namespace = namespace
                    .ok_or_else(|| Outcome::Skipped("the event names no project".into()))?;
                let project =
                    project_name(&namespace).map_err(|e| Outcome::Skipped(e.to_string()))?;
                Ok(Work::Project(project.to_owned()))
            }
            EventType::Other(_) => Err(Outcome::Ignored),
        }
    }
}

/// What an event refreshes, as a key: events with the same key are answered by one read of
/// Harbor made after they all arrived. Pulls are kept apart from other events (they wait for
/// Harbor's pull counts). `None` for events with nothing to refresh.
pub fn refresh_key(event: &HarborEvent) -> Option<String> {
    let work = Work::of(event).ok()?;
    let class = if event.event_type == EventType::PullArtifact {
        "pull"
    } else {
        "change"
    };
    Some(format!("{class} {work:?}"))
}

/// The valid, distinct repository names among `full_names`; skipped when there are none.
fn repositories(full_names: impl Iterator<Item = String>) -> Result<Work, Outcome> {
    let mut names: Vec<RepositoryName> = Vec::new();
    for full in full_names {
        match RepositoryName::parse(&full) {
            Ok(name) if !names.contains(&name) => names.push(name),
            Ok(_) => {}
            Err(error) => warn!(%error, "Ignoring a repository the event names"),
        }
    }
    if names.is_empty() {
        return Err(Outcome::Skipped("the event names no repository".into()));
    }
    Ok(Work::Repositories(names))
}

/// Turns events into Port writes.
pub struct Handler {
    harbor: HarborClient,
    port: PortClient,
    retry: RetryPolicy,
    known_projects: Mutex<HashSet<String>>,
    /// A hash of the last entity written per identifier, so that an identical upsert is not
    /// sent again (a pull that changed nothing, a duplicate push). Bounded: the least recently
    /// written are forgotten first.
    written: Mutex<LruCache<String, u64>>,
}

/// How many entities [`Handler`] remembers having written.
const REMEMBERED_WRITES: usize = 100_000;

/// Under what an entity is remembered.
fn written_key(blueprint: &str, identifier: &str) -> String {
    format!("{blueprint}/{identifier}")
}

/// The key an entity is remembered under, and a hash of its content.
fn fingerprint(blueprint: &str, entity: &Entity) -> (String, u64) {
    let mut hasher = std::hash::DefaultHasher::new();
    serde_json::to_string(entity)
        .unwrap_or_default()
        .hash(&mut hasher);
    (written_key(blueprint, &entity.identifier), hasher.finish())
}

impl Handler {
    /// A handler with its clients.
    pub fn new(harbor: HarborClient, port: PortClient, retry: RetryPolicy) -> Self {
        Self {
            harbor,
            port,
            retry,
            known_projects: Mutex::new(HashSet::new()),
            written: Mutex::new(LruCache::new(
                NonZeroUsize::new(REMEMBERED_WRITES).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Upserts the entity unless this exact entity is the last one written under its
    /// identifier; returns how many were written (0 or 1).
    async fn upsert(
        &self,
        blueprint: &str,
        entity: &Entity,
        budget: &Budget,
    ) -> Result<usize, CallError> {
        let (key, hash) = fingerprint(blueprint, entity);
        let unchanged = self
            .written
            .lock()
            .is_ok_and(|mut w| w.get(&key) == Some(&hash));
        if unchanged {
            metrics::counter!("harbor_worker_unchanged_writes_skipped_total").increment(1);
            return Ok(0);
        }
        self.send(blueprint, entity, key, hash, budget).await?;
        Ok(1)
    }

    /// Upserts the entity even if it is the last one written (a resync repairs what was
    /// changed in Port too), and remembers it.
    pub(crate) async fn write(
        &self,
        blueprint: &str,
        entity: &Entity,
        budget: &Budget,
    ) -> Result<(), CallError> {
        let (key, hash) = fingerprint(blueprint, entity);
        self.send(blueprint, entity, key, hash, budget).await
    }

    async fn send(
        &self,
        blueprint: &str,
        entity: &Entity,
        key: String,
        hash: u64,
        budget: &Budget,
    ) -> Result<(), CallError> {
        budget
            .run("port", || self.port.upsert(blueprint, entity))
            .await?;
        if let Ok(mut written) = self.written.lock() {
            written.put(key, hash);
        }
        Ok(())
    }

    /// Deletes the entity (and forgets having written it).
    pub(crate) async fn delete(
        &self,
        blueprint: &str,
        identifier: &str,
        budget: &Budget,
    ) -> Result<(), CallError> {
        if let Ok(mut written) = self.written.lock() {
            written.pop(&written_key(blueprint, identifier));
        }
        budget
            .run("port", || self.port.delete(blueprint, identifier))
            .await
    }

    /// The Port client, for reads; writes go through the handler, which remembers them.
    pub(crate) fn port(&self) -> &PortClient {
        &self.port
    }

    /// The Harbor client, for commands that read Harbor directly.
    pub fn harbor(&self) -> &HarborClient {
        &self.harbor
    }

    /// The retry policy.
    pub fn retry(&self) -> RetryPolicy {
        self.retry
    }

    /// Handles one event, retrying failed calls within the event's budget.
    pub async fn handle(&self, event: &HarborEvent) -> Result<Outcome, Failure> {
        let work = match Work::of(event) {
            Ok(work) => work,
            Err(outcome) => return Ok(outcome),
        };
        let budget = Budget::start(self.retry);
        let done = match &work {
            Work::Artifacts {
                subject,
                refresh_repository,
            } => self.sync(subject, *refresh_repository, &budget).await,
            Work::Repositories(names) => self.refresh_repositories(names, &budget).await,
            Work::Project(name) => self.refresh_project(name, &budget).await,
        };
        done.map_err(|error| Failure {
            reason: error.to_string(),
            attempts: budget.attempts(),
        })
    }

    /// Reads each repository from Harbor and upserts it (with its project, the first time), or
    /// deletes its entity if Harbor no longer has it.
    async fn refresh_repositories(
        &self,
        names: &[RepositoryName],
        budget: &Budget,
    ) -> Result<Outcome, CallError> {
        let refreshed = try_join_all(names.iter().map(|name| async move {
            match budget
                .run("harbor", || self.harbor.repository(name))
                .await?
            {
                Some(repository) => {
                    let projects = self.ensure_project(name.project(), budget).await?;
                    let entity = entities::repository(name, &repository, self.harbor.base());
                    let written = self.upsert(REPOSITORY, &entity, budget).await?;
                    Ok::<_, CallError>((projects + written, 0))
                }
                None => {
                    self.delete(REPOSITORY, name.full(), budget).await?;
                    Ok((0, 1))
                }
            }
        }))
        .await?;
        Ok(Outcome::Synced {
            upserted: refreshed.iter().map(|(u, _)| u).sum(),
            deleted: refreshed.iter().map(|(_, d)| d).sum(),
        })
    }

    /// Reads the project from Harbor and upserts its entity, or deletes it if Harbor no longer
    /// has it.
    async fn refresh_project(&self, name: &str, budget: &Budget) -> Result<Outcome, CallError> {
        match budget.run("harbor", || self.harbor.project(name)).await? {
            Some(project) => {
                let entity = entities::project(&project);
                let upserted = self.upsert(PROJECT, &entity, budget).await?;
                if let Ok(mut set) = self.known_projects.lock() {
                    set.insert(name.to_owned());
                }
                Ok(Outcome::Synced {
                    upserted,
                    deleted: 0,
                })
            }
            None => {
                self.delete(PROJECT, name, budget).await?;
                Ok(Outcome::Synced {
                    upserted: 0,
                    deleted: 1,
                })
            }
        }
    }

    /// Reads the subject from Harbor (all reads at once) and writes it to Port.
    async fn sync(
        &self,
        subject: &Subject,
        refresh_repository: bool,
        budget: &Budget,
    ) -> Result<Outcome, CallError> {
        let name = &subject.repository;
        let repository = async {
            if refresh_repository {
                budget
                    .run("harbor", || self.harbor.repository(name))
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        };
        let artifacts = try_join_all(subject.digests.iter().map(|digest| async move {
            let found = budget
                .run("harbor", || self.harbor.artifact(name, digest))
                .await?;
            Ok::<_, CallError>((digest, found))
        }));
        let (repository, artifacts) = futures_util::try_join!(repository, artifacts)?;

        if let Some(None) = repository {
            // The repository is gone, and with it every artifact it had.
            let deletes = subject.digests.iter().map(|digest| {
                let id = entities::artifact_id(name, digest);
                async move { self.delete(ARTIFACT, &id, budget).await }
            });
            try_join_all(deletes).await?;
            self.delete(REPOSITORY, name.full(), budget).await?;
            return Ok(Outcome::Synced {
                upserted: 0,
                deleted: subject.digests.len() + 1,
            });
        }

        let mut upserted = 0;
        if let Some(Some(repository)) = &repository {
            upserted += self.ensure_project(name.project(), budget).await?;
            let entity = entities::repository(name, repository, self.harbor.base());
            upserted += self.upsert(REPOSITORY, &entity, budget).await?;
        }

        let mut deleted = 0;
        let writes = artifacts.iter().map(|(digest, found)| async move {
            match found {
                Some(artifact) => {
                    let entity = entities::artifact(name, digest, artifact, self.harbor.base());
                    let written = self.upsert(ARTIFACT, &entity, budget).await?;
                    Ok::<_, CallError>((written, 0))
                }
                None => {
                    let id = entities::artifact_id(name, digest);
                    self.delete(ARTIFACT, &id, budget).await?;
                    Ok((0, 1))
                }
            }
        });
        for (written, removed) in try_join_all(writes).await? {
            upserted += written;
            deleted += removed;
        }
        Ok(Outcome::Synced { upserted, deleted })
    }

    /// Writes the project's entity unless this worker already did; returns how many entities
    /// it wrote (0 or 1).
    async fn ensure_project(&self, project: &str, budget: &Budget) -> Result<usize, CallError> {
        let known = |p: &str| self.known_projects.lock().is_ok_and(|set| set.contains(p));
        if known(project) {
            return Ok(0);
        }
        let Some(found) = budget
            .run("harbor", || self.harbor.project(project))
            .await?
        else {
            return Ok(0);
        };
        let entity = entities::project(&found);
        let written = self.upsert(PROJECT, &entity, budget).await?;
        if let Ok(mut set) = self.known_projects.lock() {
            set.insert(project.to_owned());
        }
        Ok(written)
    }
}
