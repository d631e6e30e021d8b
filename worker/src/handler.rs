//! What each event refreshes, and the refreshes. Knows Harbor and Port, nothing of RabbitMQ.
//!
//! An event only says *what to refresh*: Harbor gives no ordering and sends duplicates, so a
//! refresh always reads the current state from Harbor and writes that to Port. What is refreshed
//! is a [`Key`]: a project's entity, or a repository's entity with those of its artifacts. The
//! [`crate::schedule`] never runs two refreshes of one key at once, so a write never carries
//! state read before the state an earlier write of the same entity carried.
//!
//! | event                                  | refreshes                                           |
//! |----------------------------------------|-----------------------------------------------------|
//! | `PUSH_ARTIFACT`                        | the artifacts, the repository, the project; the pushed tags come off the repository's other artifacts |
//! | `PULL_ARTIFACT`                        | the artifacts and the repository, once Harbor has counted the pull (the pull window) |
//! | `DELETE_ARTIFACT`                      | the artifacts, the repository, the project          |
//! | `SCANNING_COMPLETED` / `_FAILED` / `_STOPPED` | the artifacts                                |
//! | `TAG_RETENTION`, `REPLICATION`         | every artifact of each repository named, the repository, the project |
//! | `QUOTA_EXCEED`, `QUOTA_WARNING`        | the project                                         |
//! | anything else                          | nothing (ignored)                                   |
//!
//! What Harbor answers 404 for is gone: its entity is deleted, and a repository takes the
//! entities of all its artifacts with it, a project those of its repositories. Only entities
//! this integration wrote (its `harborInstance` property) are found and deleted that way.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::future::join_all;
use harbor_shared::event::{EventData, EventType, HarborEvent};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::clients::CallError;
use crate::clients::harbor::{Artifact, HarborClient};
use crate::clients::port::{BULK_LIMIT, PortClient};
use crate::entities::{self, ARTIFACT, Entity, PROJECT, REPOSITORY};
use crate::names::{Digest, RepositoryName, project_name};
use crate::resync::{self, ResyncRequest, Target};
use crate::schedule::{self, Judgement, Reconcile, Request};

/// The property every entity this integration writes carries: which Harbor it came from. It is
/// how the worker tells its entities from others when it deletes what Harbor no longer has.
pub const INSTANCE_PROPERTY: &str = "harborInstance";

/// What a refresh covers: never two refreshes of one key at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A project's entity.
    Project(String),
    /// A repository's entity and those of its artifacts.
    Repository(RepositoryName),
}

/// What a request asks a refresh of a [`Key::Repository`] to do (a [`Key::Project`] refresh
/// always does the one thing it can).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Work {
    /// The repository's own entity.
    pub repository: bool,
    /// These artifacts.
    pub artifacts: BTreeSet<Digest>,
    /// The tags these artifacts carry now come off the repository's other artifacts (a push
    /// moves a tag; Harbor announces only the artifact it moved to).
    pub moved_tags: bool,
    /// Every artifact of the repository: written as Harbor has them, and those Harbor no
    /// longer has deleted.
    pub every_artifact: bool,
}

impl schedule::Work for Work {
    fn merge(&mut self, other: &Self) {
        self.repository |= other.repository;
        self.artifacts.extend(other.artifacts.iter().cloned());
        self.moved_tags |= other.moved_tags;
        self.every_artifact |= other.every_artifact;
    }
}

/// One refresh a delivery asks for (its group is the consumer's to set).
pub type Refresh = Request<Key, Work>;

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<K, W> {
    /// These refreshes.
    Refresh(Vec<Request<K, W>>),
    /// An event type the worker does not act on.
    Ignore,
    /// An event that lacks what it would need to be acted on.
    Skip(String),
    /// Not a Harbor event at all.
    Invalid(String),
}

/// A delivery, as the consumer needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<K, W> {
    /// The event type, for metrics (bounded: `other` for unknown types, `invalid`).
    pub event_type: String,
    /// What it is about, for the log (`project/repo@sha256:...`).
    pub subject: Option<String>,
    /// What to do.
    pub action: Action<K, W>,
}

/// What the consumer hands each delivery to: [`Handler`] is the real one; tests put others in
/// its place (one that panics, say) to exercise the consumer.
pub trait HandleEvent: Reconcile {
    /// What a delivery's body asks for.
    fn plan(&self, body: &[u8]) -> Plan<Self::Key, Self::Work>;

    /// The subject whose work queue refreshes `key` (the ingest's `x-subject`): a delivery
    /// refreshes only the keys of its own subject and forwards the others.
    fn subject(&self, key: &Self::Key) -> String;
}

/// What a part of a refresh came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Status {
    #[default]
    Done,
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Failed(String),
}

impl Status {
    fn of<T>(result: &Result<T, CallError>) -> Self {
        match result {
            Ok(_) => Self::Done,
            Err(CallError::Transient {
                reason,
                retry_after,
            }) => Self::Retry {
                reason: reason.clone(),
                after: *retry_after,
            },
            Err(CallError::Permanent { reason }) => Self::Failed(reason.clone()),
        }
    }

    /// The worse of the two: failed over retry over done.
    fn and(self, other: &Self) -> Self {
        match (&self, other) {
            (Self::Failed(_), _) => self,
            (_, Self::Failed(_)) => other.clone(),
            (Self::Retry { .. }, _) => self,
            (_, Self::Retry { .. }) => other.clone(),
            _ => Self::Done,
        }
    }

    fn all<'a>(statuses: impl IntoIterator<Item = &'a Status>) -> Self {
        statuses.into_iter().fold(Self::Done, |a, b| a.and(b))
    }
}

/// What a refresh did, part by part, so that each request folded into it is told what became of
/// what it asked.
#[derive(Debug, Default)]
pub struct Report {
    /// The project, or the repository's own entity (a gone repository's deletes included).
    main: Status,
    artifacts: BTreeMap<Digest, Status>,
    moved_tags: Status,
    every_artifact: Status,
    /// To refresh first; then the key again (a gone project waits for its repositories).
    first: Vec<(Key, Work)>,
    upserted: usize,
    deleted: usize,
}

/// Turns events into refreshes, and refreshes into Port writes.
pub struct Handler {
    harbor: HarborClient,
    port: PortClient,
    /// The value of [`INSTANCE_PROPERTY`].
    instance: String,
    /// How long a pull waits for more pulls of the same repository.
    pull_window: Duration,
    /// One permit per call to Harbor or Port in flight.
    calls: Semaphore,
}

impl Handler {
    /// A handler with its clients; at most `concurrency` calls in flight at once.
    pub fn new(
        harbor: HarborClient,
        port: PortClient,
        instance: &str,
        pull_window: Duration,
        concurrency: usize,
    ) -> Self {
        Self {
            harbor,
            port,
            instance: instance.to_owned(),
            pull_window,
            calls: Semaphore::new(concurrency.max(1)),
        }
    }

    /// The Harbor client, for commands that read Harbor directly.
    pub fn harbor(&self) -> &HarborClient {
        &self.harbor
    }

    /// The Port client, for commands that read Port directly.
    pub fn port(&self) -> &PortClient {
        &self.port
    }

    /// Which Harbor this is (the value of [`INSTANCE_PROPERTY`]).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    async fn call<T>(&self, call: impl Future<Output = T>) -> T {
        // Never closed: the permit is always granted.
        let _permit = self.calls.acquire().await;
        call.await
    }

    /// What an event asks for.
    pub fn plan_event(&self, event: &HarborEvent) -> Plan<Key, Work> {
        let event_type = event.event_type.metric_label().to_owned();
        let (subject, action) = match plan(event, self.pull_window) {
            Ok((subject, refreshes)) => (Some(subject), Action::Refresh(refreshes)),
            Err(action) => (None, action),
        };
        Plan {
            event_type,
            subject,
            action,
        }
    }

    /// The entity as this integration writes it: marked as its own.
    fn owned(&self, mut entity: Entity) -> Entity {
        entity
            .properties
            .insert(INSTANCE_PROPERTY.to_owned(), json!(self.instance));
        entity
    }

    /// A search query for this integration's entities of `blueprint` whose identifier starts
    /// with `prefix`, and the rules given.
    fn owned_query(&self, blueprint: &str, prefix: &str, rules: Vec<Value>) -> Value {
        let mut all = vec![
            json!({"property": "$blueprint", "operator": "=", "value": blueprint}),
            json!({"property": "$identifier", "operator": "beginsWith", "value": prefix}),
            json!({"property": INSTANCE_PROPERTY, "operator": "=", "value": self.instance}),
        ];
        all.extend(rules);
        json!({"combinator": "and", "rules": all})
    }

    /// Upserts entities of one blueprint: alone, or through the bulk endpoint in batches.
    /// Returns what became of each, in order.
    async fn upsert_all(&self, blueprint: &str, entities: Vec<Entity>) -> Vec<Status> {
        let entities: Vec<Entity> = entities.into_iter().map(|e| self.owned(e)).collect();
        if let [entity] = entities.as_slice() {
            return vec![Status::of(
                &self.call(self.port.upsert(blueprint, entity)).await,
            )];
        }
        let batches = entities.chunks(BULK_LIMIT).map(|batch| async move {
            match self.call(self.port.upsert_bulk(blueprint, batch)).await {
                Ok(each) => each.iter().map(Status::of).collect(),
                Err(error) => vec![Status::of::<()>(&Err(error)); batch.len()],
            }
        });
        join_all(batches).await.into_iter().flatten().collect()
    }

    async fn delete(&self, blueprint: &str, identifier: &str) -> Status {
        Status::of(&self.call(self.port.delete(blueprint, identifier)).await)
    }

    /// The identifiers (and digests, for artifacts) of this integration's entities a query
    /// finds.
    async fn find(&self, query: &Value) -> Result<Vec<Found>, CallError> {
        let found = self
            .call(
                self.port
                    .search(query, &["identifier", "properties.digest"]),
            )
            .await?;
        Ok(found
            .iter()
            .filter_map(|entity| {
                let identifier = entity["identifier"].as_str()?.to_owned();
                let digest = entity["properties"]["digest"]
                    .as_str()
                    .or_else(|| identifier.rsplit_once('@').map(|(_, d)| d))
                    .and_then(|d| Digest::parse(d).ok());
                Some(Found { identifier, digest })
            })
            .collect())
    }

    async fn refresh_project(&self, name: &str) -> Report {
        let mut report = Report::default();
        match self.call(self.harbor.project(name)).await {
            Err(error) => report.main = Status::of::<()>(&Err(error)),
            Ok(Some(project)) => {
                let written = self
                    .upsert_all(PROJECT, vec![entities::project(&project)])
                    .await;
                report.main = Status::all(&written);
                report.upserted = 1;
            }
            Ok(None) => {
                // Gone: its repositories go first (each through its own refresh), then it.
                let query = self.owned_query(REPOSITORY, &format!("{name}/"), Vec::new());
                match self.find(&query).await {
                    Err(error) => report.main = Status::of::<()>(&Err(error)),
                    Ok(repositories) if !repositories.is_empty() => {
                        report.first = repositories
                            .iter()
                            .filter_map(|r| RepositoryName::parse(&r.identifier).ok())
                            .map(|r| {
                                let work = Work {
                                    repository: true,
                                    ..Work::default()
                                };
                                (Key::Repository(r), work)
                            })
                            .collect();
                    }
                    Ok(_) => {
                        report.main = self.delete(PROJECT, name).await;
                        report.deleted = 1;
                    }
                }
            }
        }
        report
    }

    async fn refresh_repository(&self, name: &RepositoryName, work: &Work) -> Report {
        let read_repository = work.repository || work.every_artifact;
        let repository = async {
            match read_repository {
                true => Some(self.call(self.harbor.repository(name)).await),
                false => None,
            }
        };
        let artifacts = join_all(work.artifacts.iter().map(|digest| async move {
            let found = self.call(self.harbor.artifact(name, digest)).await;
            (digest.clone(), found)
        }));
        let listed = async {
            match work.every_artifact {
                true => Some(self.call(self.harbor.artifacts(name)).await),
                false => None,
            }
        };
        let (repository, artifacts, listed) = tokio::join!(repository, artifacts, listed);

        if let Some(Ok(None)) = repository {
            return self.repository_gone(name, work).await;
        }

        let mut report = Report::default();
        let mut upserts: Vec<(Option<Digest>, Entity)> = Vec::new();
        let mut deletes: Vec<(Option<Digest>, String)> = Vec::new();
        match repository {
            Some(Ok(Some(repository))) => {
                let entity = entities::repository(name, &repository, self.harbor.base());
                upserts.push((None, entity));
            }
            Some(Err(error)) => report.main = Status::of::<()>(&Err(error)),
            _ => {}
        }
        let mut written = BTreeSet::new();
        let mut tags = BTreeSet::new();
        for (digest, found) in artifacts {
            match found {
                Ok(Some(artifact)) => {
                    tags.extend(tag_names(&artifact));
                    written.insert(digest.clone());
                    let entity = entities::artifact(name, &digest, &artifact, self.harbor.base());
                    upserts.push((Some(digest), entity));
                }
                Ok(None) => {
                    let id = entities::artifact_id(name, &digest);
                    deletes.push((Some(digest), id));
                }
                Err(error) => {
                    report
                        .artifacts
                        .insert(digest, Status::of::<()>(&Err(error)));
                }
            }
        }
        let every = async {
            match listed {
                None => (Status::Done, 0, 0),
                Some(listed) => self.every_artifact(name, listed, &written).await,
            }
        };
        let moved = async {
            match work.moved_tags && !tags.is_empty() {
                true => self.take_moved_tags(name, &tags, &written).await,
                false => (Status::Done, 0, 0),
            }
        };
        let writes = self.write(upserts, deletes);
        let ((every, every_up, every_del), (moved, moved_up, moved_del), written) =
            tokio::join!(every, moved, writes);
        report.every_artifact = every;
        report.moved_tags = moved;
        report.upserted = every_up + moved_up;
        report.deleted = every_del + moved_del;
        for (digest, status, upserted) in written {
            report.upserted += usize::from(upserted);
            report.deleted += usize::from(!upserted);
            match digest {
                Some(digest) => {
                    report.artifacts.insert(digest, status);
                }
                None => report.main = report.main.and(&status),
            }
        }
        report
    }

    /// Upserts and deletes at once; returns, for each, its digest (none for the repository's
    /// entity), what became of it and whether it was an upsert.
    async fn write(
        &self,
        upserts: Vec<(Option<Digest>, Entity)>,
        deletes: Vec<(Option<Digest>, String)>,
    ) -> Vec<(Option<Digest>, Status, bool)> {
        let (repositories, artifacts): (Vec<_>, Vec<_>) = upserts
            .into_iter()
            .partition(|(digest, _)| digest.is_none());
        let upsert = |blueprint, list: Vec<(Option<Digest>, Entity)>| async move {
            let (digests, entities): (Vec<_>, Vec<_>) = list.into_iter().unzip();
            let statuses = match entities.is_empty() {
                true => Vec::new(),
                false => self.upsert_all(blueprint, entities).await,
            };
            digests
                .into_iter()
                .zip(statuses)
                .map(|(digest, status)| (digest, status, true))
                .collect::<Vec<_>>()
        };
        let deleted =
            join_all(deletes.into_iter().map(|(digest, id)| async move {
                (digest, self.delete(ARTIFACT, &id).await, false)
            }));
        let (mut done, artifacts, deleted) = tokio::join!(
            upsert(REPOSITORY, repositories),
            upsert(ARTIFACT, artifacts),
            deleted
        );
        done.extend(artifacts);
        done.extend(deleted);
        done
    }

    /// The repository is gone: the entities of all its artifacts (this integration's) and its
    /// own are deleted.
    async fn repository_gone(&self, name: &RepositoryName, work: &Work) -> Report {
        let mut report = Report::default();
        let query = self.owned_query(ARTIFACT, &format!("{name}@"), Vec::new());
        let status = match self.find(&query).await {
            Err(error) => Status::of::<()>(&Err(error)),
            Ok(artifacts) => {
                let deletes = join_all(
                    artifacts
                        .iter()
                        .map(|a| self.delete(ARTIFACT, &a.identifier)),
                )
                .await;
                let named: Vec<String> = work
                    .artifacts
                    .iter()
                    .map(|d| entities::artifact_id(name, d))
                    .filter(|id| !artifacts.iter().any(|a| &a.identifier == id))
                    .collect();
                // The artifacts the event named, whether or not Port listed them as ours.
                let named = join_all(named.iter().map(|id| self.delete(ARTIFACT, id))).await;
                report.deleted = deletes.len() + named.len() + 1;
                let artifacts_gone = Status::all(deletes.iter().chain(&named));
                // The repository's entity last, once nothing of it is left to relate to it.
                match artifacts_gone {
                    Status::Done => self.delete(REPOSITORY, name.full()).await,
                    failed => failed,
                }
            }
        };
        debug!(repository = %name, deleted = report.deleted, "Repository gone");
        report.main = status.clone();
        report.moved_tags = status.clone();
        report.every_artifact = status.clone();
        for digest in &work.artifacts {
            report.artifacts.insert(digest.clone(), status.clone());
        }
        report
    }

    /// Every artifact Harbor listed is written; this integration's artifacts of the repository
    /// that Harbor no longer has are deleted. Returns the status, and how many were upserted and
    /// deleted.
    async fn every_artifact(
        &self,
        name: &RepositoryName,
        listed: Result<Vec<Artifact>, CallError>,
        written: &BTreeSet<Digest>,
    ) -> (Status, usize, usize) {
        let listed = match listed {
            Ok(listed) => listed,
            Err(error) => return (Status::of::<()>(&Err(error)), 0, 0),
        };
        let query = self.owned_query(ARTIFACT, &format!("{name}@"), Vec::new());
        let in_port = match self.find(&query).await {
            Ok(found) => found,
            Err(error) => return (Status::of::<()>(&Err(error)), 0, 0),
        };
        let mut keep = BTreeSet::new();
        let mut upserts = Vec::new();
        for artifact in &listed {
            let Ok(digest) = Digest::parse(&artifact.digest) else {
                warn!(repository = %name, digest = %artifact.digest, "Skipping an artifact with an unexpected digest");
                continue;
            };
            keep.insert(entities::artifact_id(name, &digest));
            if !written.contains(&digest) {
                let entity = entities::artifact(name, &digest, artifact, self.harbor.base());
                upserts.push((Some(digest), entity));
            }
        }
        let deletes: Vec<(Option<Digest>, String)> = in_port
            .into_iter()
            .filter(|found| !keep.contains(&found.identifier))
            .map(|found| (None, found.identifier))
            .collect();
        let done = self.write(upserts, deletes).await;
        let upserted = done.iter().filter(|(_, _, up)| *up).count();
        let status = Status::all(done.iter().map(|(_, status, _)| status));
        (status, upserted, done.len() - upserted)
    }

    /// The other artifacts of the repository that Port shows with one of `tags` are read again
    /// from Harbor and written as Harbor has them now (without the tag that moved).
    async fn take_moved_tags(
        &self,
        name: &RepositoryName,
        tags: &BTreeSet<String>,
        written: &BTreeSet<Digest>,
    ) -> (Status, usize, usize) {
        let rule = json!({"property": "tags", "operator": "containsAny", "value": tags});
        let query = self.owned_query(ARTIFACT, &format!("{name}@"), vec![rule]);
        let stale: Vec<Digest> = match self.find(&query).await {
            Ok(found) => found
                .into_iter()
                .filter_map(|f| f.digest)
                .filter(|d| !written.contains(d))
                .collect(),
            Err(error) => return (Status::of::<()>(&Err(error)), 0, 0),
        };
        if stale.is_empty() {
            return (Status::Done, 0, 0);
        }
        debug!(repository = %name, count = stale.len(), "Taking moved tags off older artifacts");
        let reads = join_all(stale.into_iter().map(|digest| async move {
            let found = self.call(self.harbor.artifact(name, &digest)).await;
            (digest, found)
        }))
        .await;
        let mut status = Status::Done;
        let (mut upserts, mut deletes) = (Vec::new(), Vec::new());
        for (digest, found) in reads {
            match found {
                Ok(Some(artifact)) => {
                    let entity = entities::artifact(name, &digest, &artifact, self.harbor.base());
                    upserts.push((Some(digest), entity));
                }
                Ok(None) => {
                    let id = entities::artifact_id(name, &digest);
                    deletes.push((Some(digest), id));
                }
                Err(error) => status = status.and(&Status::of::<()>(&Err(error))),
            }
        }
        let done = self.write(upserts, deletes).await;
        let upserted = done.iter().filter(|(_, _, up)| *up).count();
        let status = status.and(&Status::all(done.iter().map(|(_, s, _)| s)));
        (status, upserted, done.len() - upserted)
    }
}

/// An entity a search found.
struct Found {
    identifier: String,
    digest: Option<Digest>,
}

fn tag_names(artifact: &Artifact) -> impl Iterator<Item = String> + '_ {
    artifact.tags.iter().flatten().map(|t| t.name.clone())
}

impl Reconcile for Handler {
    type Key = Key;
    type Work = Work;
    type Report = Report;

    async fn run(&self, key: &Key, work: &Work) -> Report {
        let report = match key {
            Key::Project(name) => self.refresh_project(name).await,
            Key::Repository(name) => self.refresh_repository(name, work).await,
        };
        debug!(
            ?key,
            upserted = report.upserted,
            deleted = report.deleted,
            "Refreshed"
        );
        report
    }

    fn judge(&self, report: &Report, asked: &Work) -> Judgement<Key, Work> {
        verdict(report, asked)
    }
}

/// What a refresh's report means for a request that asked `asked`: only the parts it asked for
/// count, so that one artifact Port refuses does not fail the requests for the others.
fn verdict(report: &Report, asked: &Work) -> Judgement<Key, Work> {
    if !report.first.is_empty() {
        return Judgement::After(report.first.clone());
    }
    let mut status = Status::Done;
    // A project refresh asks nothing of a repository refresh's parts: its status is `main`.
    if asked.repository || *asked == Work::default() {
        status = status.and(&report.main);
    }
    for digest in &asked.artifacts {
        status = status.and(report.artifacts.get(digest).unwrap_or(&report.main));
    }
    if asked.moved_tags {
        status = status.and(&report.moved_tags);
    }
    if asked.every_artifact {
        status = status.and(&report.every_artifact);
    }
    match status {
        Status::Done => Judgement::Done,
        Status::Retry { reason, after } => Judgement::Retry { reason, after },
        Status::Failed(reason) => Judgement::Failed(reason),
    }
}

impl HandleEvent for Handler {
    fn subject(&self, key: &Key) -> String {
        match key {
            Key::Project(name) => name.clone(),
            Key::Repository(name) => name.project().to_owned(),
        }
    }

    fn plan(&self, body: &[u8]) -> Plan<Key, Work> {
        match HarborEvent::parse(body) {
            Ok(event) if event.event_type.as_str() == resync::REQUEST_TYPE => {
                plan_resync(ResyncRequest::parse(body))
            }
            Ok(event) => self.plan_event(&event),
            Err(error) => Plan {
                event_type: "invalid".to_owned(),
                subject: None,
                action: Action::Invalid(format!("not a Harbor event: {error}")),
            },
        }
    }
}

/// What a resync request refreshes: a project, or a repository with every artifact.
fn plan_resync(request: Option<ResyncRequest>) -> Plan<Key, Work> {
    let plan = |subject: String, action| Plan {
        event_type: "resync".to_owned(),
        subject: Some(subject),
        action,
    };
    let refresh = |key, work| {
        Action::Refresh(vec![Refresh {
            key,
            work,
            delay: Duration::ZERO,
            group: 0,
        }])
    };
    match request.map(|r| r.resync) {
        Some(Target::Project(name)) => match project_name(&name) {
            Ok(_) => plan(name.clone(), refresh(Key::Project(name), Work::default())),
            Err(error) => plan(name, Action::Invalid(error.to_string())),
        },
        Some(Target::Repository(name)) => match RepositoryName::parse(&name) {
            Ok(repository) => {
                let work = Work {
                    repository: true,
                    every_artifact: true,
                    ..Work::default()
                };
                plan(name, refresh(Key::Repository(repository), work))
            }
            Err(error) => plan(name, Action::Invalid(error.to_string())),
        },
        None => Plan {
            event_type: "resync".to_owned(),
            subject: None,
            action: Action::Invalid("a resync request without a project or repository".into()),
        },
    }
}

/// The repository and artifacts an artifact event names.
fn subject(data: &EventData) -> Result<(RepositoryName, BTreeSet<Digest>), String> {
    let full_name = data
        .repository
        .as_ref()
        .and_then(|r| r.full_name())
        .ok_or("the event names no repository")?;
    let repository = RepositoryName::parse(&full_name).map_err(|e| e.to_string())?;
    let mut digests = BTreeSet::new();
    for resource in &data.resources {
        match resource.digest.as_deref().map(Digest::parse) {
            Some(Ok(digest)) => {
                digests.insert(digest);
            }
            Some(Err(error)) => warn!(%error, "Ignoring a resource of the event"),
            None => warn!("Ignoring a resource of the event: it has no digest"),
        }
    }
    if digests.is_empty() {
        return Err("the event names no artifact digest".to_owned());
    }
    Ok((repository, digests))
}

fn project_of(name: &RepositoryName) -> Refresh {
    Refresh {
        key: Key::Project(name.project().to_owned()),
        work: Work::default(),
        delay: Duration::ZERO,
        group: 0,
    }
}

/// What an event refreshes, and a name for it in the log; `Err` when there is nothing to do.
fn plan(
    event: &HarborEvent,
    pull_window: Duration,
) -> Result<(String, Vec<Refresh>), Action<Key, Work>> {
    let data = &event.data;
    let artifact_event = |work: fn(BTreeSet<Digest>) -> Work, delay, project: bool| {
        let (repository, digests) = subject(data).map_err(Action::Skip)?;
        let shown = match digests.first() {
            Some(digest) if digests.len() == 1 => format!("{repository}@{digest}"),
            _ => repository.to_string(),
        };
        let mut refreshes = vec![Refresh {
            key: Key::Repository(repository.clone()),
            work: work(digests),
            delay,
            group: 0,
        }];
        if project {
            refreshes.push(project_of(&repository));
        }
        Ok((shown, refreshes))
    };
    match event.event_type {
        EventType::PushArtifact => artifact_event(
            |artifacts| Work {
                repository: true,
                artifacts,
                moved_tags: true,
                every_artifact: false,
            },
            Duration::ZERO,
            true,
        ),
        EventType::PullArtifact => artifact_event(
            |artifacts| Work {
                repository: true,
                artifacts,
                ..Work::default()
            },
            pull_window,
            false,
        ),
        EventType::DeleteArtifact => artifact_event(
            |artifacts| Work {
                repository: true,
                artifacts,
                ..Work::default()
            },
            Duration::ZERO,
            true,
        ),
        EventType::ScanningCompleted | EventType::ScanningFailed | EventType::ScanningStopped => {
            artifact_event(
                |artifacts| Work {
                    artifacts,
                    ..Work::default()
                },
                Duration::ZERO,
                false,
            )
        }
        EventType::TagRetention => {
            let retention = data.retention.clone().unwrap_or_default();
            let project = retention.project_name.unwrap_or_default();
            let names = retention
                .deleted_artifact
                .iter()
                .filter_map(|a| a.repository_name());
            whole_repositories(names.map(|name| format!("{project}/{name}")))
        }
        EventType::Replication => {
            let replication = data.replication.clone().unwrap_or_default();
            let namespaces: Vec<String> = [&replication.src_resource, &replication.dest_resource]
                .into_iter()
                .flatten()
                .filter_map(|end| end.namespace.clone())
                .collect();
            let copied = replication
                .successful_artifact
                .iter()
                .chain(&replication.failed_artifact);
            let names: Vec<&str> = copied.filter_map(|a| a.repository_name()).collect();
            whole_repositories(
                namespaces
                    .iter()
                    .flat_map(|ns| names.iter().map(move |name| format!("{ns}/{name}"))),
            )
        }
        EventType::QuotaExceed | EventType::QuotaWarning => {
            let namespace = data.repository.as_ref().and_then(|r| r.namespace.clone());
            let namespace =
                namespace.ok_or_else(|| Action::Skip("the event names no project".into()))?;
            let project = project_name(&namespace).map_err(|e| Action::Skip(e.to_string()))?;
            let refresh = Refresh {
                key: Key::Project(project.to_owned()),
                work: Work::default(),
                delay: Duration::ZERO,
                group: 0,
            };
            Ok((project.to_owned(), vec![refresh]))
        }
        EventType::Other(_) => Err(Action::Ignore),
    }
}

/// Every artifact of each valid, distinct repository among `full_names`, and their projects;
/// skipped when there are none.
fn whole_repositories(
    full_names: impl Iterator<Item = String>,
) -> Result<(String, Vec<Refresh>), Action<Key, Work>> {
    let mut names: Vec<RepositoryName> = Vec::new();
    for full in full_names {
        match RepositoryName::parse(&full) {
            Ok(name) if !names.contains(&name) => names.push(name),
            Ok(_) => {}
            Err(error) => warn!(%error, "Ignoring a repository the event names"),
        }
    }
    if names.is_empty() {
        return Err(Action::Skip("the event names no repository".into()));
    }
    let shown = names
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut refreshes: Vec<Refresh> = names
        .iter()
        .map(|name| Refresh {
            key: Key::Repository(name.clone()),
            work: Work {
                repository: true,
                every_artifact: true,
                ..Work::default()
            },
            delay: Duration::ZERO,
            group: 0,
        })
        .collect();
    for name in &names {
        let project = project_of(name);
        if !refreshes.contains(&project) {
            refreshes.push(project);
        }
    }
    Ok((shown, refreshes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: serde_json::Value) -> HarborEvent {
        HarborEvent::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    const D1: &str = "sha256:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    fn artifact_event(kind: &str) -> HarborEvent {
        event(json!({
            "type": kind, "occur_at": 1, "operator": "admin",
            "event_data": {
                "resources": [{"digest": D1, "tag": "v1", "resource_url": "h/p/r:v1"}],
                "repository": {"name": "web", "namespace": "alpha", "repo_full_name": "alpha/web"}
            }
        }))
    }

    fn planned(kind: &str) -> Vec<Refresh> {
        match plan(&artifact_event(kind), Duration::from_secs(11)) {
            Ok((_, refreshes)) => refreshes,
            Err(action) => panic!("{action:?}"),
        }
    }

    #[test]
    fn a_push_refreshes_its_artifact_repository_and_project_and_moves_its_tags() {
        let refreshes = planned("PUSH_ARTIFACT");
        let repository = RepositoryName::parse("alpha/web").unwrap();
        assert_eq!(
            refreshes,
            [
                Refresh {
                    key: Key::Repository(repository),
                    work: Work {
                        repository: true,
                        artifacts: [Digest::parse(D1).unwrap()].into(),
                        moved_tags: true,
                        every_artifact: false,
                    },
                    delay: Duration::ZERO,
                    group: 0,
                },
                Refresh {
                    key: Key::Project("alpha".into()),
                    work: Work::default(),
                    delay: Duration::ZERO,
                    group: 0,
                },
            ]
        );
    }

    #[test]
    fn a_pull_waits_for_the_window_and_a_scan_touches_only_its_artifact() {
        let pull = planned("PULL_ARTIFACT");
        assert_eq!(pull.len(), 1);
        assert_eq!(pull[0].delay, Duration::from_secs(11));
        assert!(pull[0].work.repository && !pull[0].work.moved_tags);
        let scan = planned("SCANNING_COMPLETED");
        assert_eq!(scan.len(), 1);
        assert!(!scan[0].work.repository && scan[0].work.artifacts.len() == 1);
    }

    #[test]
    fn retention_refreshes_every_artifact_of_the_repositories_it_touched() {
        let retention = event(json!({
            "type": "TAG_RETENTION",
            "event_data": {"retention": {"project_name": "harbor", "deleted_artifact": [
                {"name_tag": "alpine:3.8"}, {"name_tag": "alpine:3.9"}, {"name_tag": "nginx:1"}
            ]}}
        }));
        let (_, refreshes) = plan(&retention, Duration::ZERO).unwrap();
        let keys: Vec<&Key> = refreshes.iter().map(|r| &r.key).collect();
        assert_eq!(
            keys,
            [
                &Key::Repository(RepositoryName::parse("harbor/alpine").unwrap()),
                &Key::Repository(RepositoryName::parse("harbor/nginx").unwrap()),
                &Key::Project("harbor".into()),
            ]
        );
        assert!(refreshes[0].work.every_artifact);
    }

    #[test]
    fn events_without_a_subject_are_skipped_and_unknown_types_ignored() {
        let no_digest = event(json!({"type": "PUSH_ARTIFACT", "event_data": {
            "resources": [{"tag": "v1"}], "repository": {"repo_full_name": "alpha/web"}}}));
        assert!(matches!(
            plan(&no_digest, Duration::ZERO),
            Err(Action::Skip(_))
        ));
        let other = event(json!({"type": "SOMETHING_NEW", "event_data": {}}));
        assert_eq!(plan(&other, Duration::ZERO), Err(Action::Ignore));
    }

    #[test]
    fn a_request_is_told_about_the_parts_it_asked_for_only() {
        let d1 = Digest::parse(D1).unwrap();
        let d2 = Digest::parse(&D1.replace("0a1b", "ffff")).unwrap();
        let report = Report {
            artifacts: [
                (d1.clone(), Status::Failed("422".into())),
                (d2.clone(), Status::Done),
            ]
            .into(),
            moved_tags: Status::Retry {
                reason: "429".into(),
                after: None,
            },
            ..Report::default()
        };
        let asked = |d: &Digest, moved_tags| Work {
            artifacts: [d.clone()].into(),
            moved_tags,
            ..Work::default()
        };
        assert_eq!(verdict(&report, &asked(&d2, false)), Judgement::Done);
        assert_eq!(
            verdict(&report, &asked(&d1, false)),
            Judgement::Failed("422".into())
        );
        assert_eq!(
            verdict(&report, &asked(&d2, true)),
            Judgement::Retry {
                reason: "429".into(),
                after: None
            }
        );
        let gone_project = Report {
            first: vec![(Key::Project("x".into()), Work::default())],
            ..Report::default()
        };
        assert!(matches!(
            verdict(&gone_project, &Work::default()),
            Judgement::After(_)
        ));
    }
}
