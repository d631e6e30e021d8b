//! Planning: what a delivery asks for, as keys to refresh and the work each needs. A delivery
//! is a Harbor event (as the ingest published it) or a resync request (whose format this module
//! owns). It knows neither Harbor's API nor Port's: [`crate::handler`] does the refreshes.
//!
//! | event                                  | refreshes                                           |
//! |----------------------------------------|-----------------------------------------------------|
//! | `PUSH_ARTIFACT`                        | the artifacts, the repository, the project; the pushed tags come off the repository's other artifacts |
//! | `PULL_ARTIFACT`                        | the artifacts and the repository, once Harbor has counted the pull (the pull window) |
//! | `DELETE_ARTIFACT`                      | the artifacts, the repository, the project          |
//! | `SCANNING_COMPLETED` / `_FAILED` / `_STOPPED` | the artifacts                                |
//! | `TAG_RETENTION`, `REPLICATION`         | every artifact of each repository named, the repository, the project |
//! | `QUOTA_EXCEED`, `QUOTA_WARNING`        | the project                                         |
//! | a resync request                       | a project, or a repository with every artifact      |
//! | anything else                          | nothing (ignored)                                   |

use std::collections::BTreeSet;
use std::time::Duration;

use harbor_shared::event::{EventData, EventType, HarborEvent};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::names::{Digest, RepositoryName, project_name};
use crate::schedule::{self, Reconcile, Request};

/// The `type` of a resync request on the work queues (and its routing key).
pub const REQUEST_TYPE: &str = "harbor-port-sync.resync";

/// A request, on a work queue, to refresh one project or one repository with every artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRequest {
    /// Always [`REQUEST_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// What to refresh.
    pub resync: Target,
}

/// What one resync request refreshes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A project's entity.
    Project(String),
    /// A repository's entity and every artifact's.
    Repository(String),
}

impl ResyncRequest {
    /// Reads a resync request; `None` for anything else.
    pub fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Self>(body)
            .ok()
            .filter(|r| r.kind == REQUEST_TYPE)
    }

    /// The project whose work queue it goes to.
    pub fn project(&self) -> &str {
        match &self.resync {
            Target::Project(name) => name,
            Target::Repository(name) => name.split_once('/').map_or(name.as_str(), |(p, _)| p),
        }
    }
}

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
    /// What it is about (`project/repo@sha256:...`), the `subject` of its log lines (DESIGN.md).
    pub about: Option<String>,
    /// What to do.
    pub action: Action<K, W>,
}

/// What the consumer hands each delivery to: [`crate::fleet::Fleet`] is the real one; tests
/// put others in its place (one that panics, say) to exercise the consumer.
pub trait HandleEvent: Reconcile {
    /// What a delivery's body asks for; `instance` is the Harbor instance its header names.
    fn plan(&self, body: &[u8], instance: Option<&str>) -> Plan<Self::Key, Self::Work>;

    /// The subject whose work queue refreshes `key` (the ingest's `x-subject`): a delivery
    /// refreshes only the keys of its own subject and forwards the others.
    fn subject(&self, key: &Self::Key) -> String;

    /// The `harbor` label of an event whose header names `instance`: the name of the Harbor
    /// that handles it, or [`instances::NO_INSTANCE`] (the header is input: the label must stay
    /// one of the names served).
    fn harbor(&self, instance: Option<&str>) -> &str;

    /// The fleet now has `workers` workers (the consumer counts them): what is shared among
    /// them (Port's rate limits) is divided anew.
    fn fleet_size(&self, _workers: usize) {}
}

/// What a delivery's body asks for: a resync request, or a Harbor event (pulls wait
/// `pull_window`).
pub fn plan(body: &[u8], pull_window: Duration) -> Plan<Key, Work> {
    let event = match HarborEvent::parse(body) {
        Ok(event) if event.event_type.as_str() == REQUEST_TYPE => {
            return plan_resync(ResyncRequest::parse(body));
        }
        Ok(event) => event,
        Err(error) => {
            return Plan {
                event_type: "invalid".to_owned(),
                about: None,
                action: Action::Invalid(format!("not a Harbor event: {error}")),
            };
        }
    };
    let (about, action) = match refreshes(&event, pull_window) {
        Ok((about, refreshes)) => (Some(about), Action::Refresh(refreshes)),
        Err(action) => (None, action),
    };
    Plan {
        event_type: event.event_type.metric_label().to_owned(),
        about,
        action,
    }
}

/// What a resync request refreshes: a project, or a repository with every artifact.
fn plan_resync(request: Option<ResyncRequest>) -> Plan<Key, Work> {
    let plan = |about: String, action| Plan {
        event_type: "resync".to_owned(),
        about: Some(about),
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
            about: None,
            action: Action::Invalid("a resync request without a project or repository".into()),
        },
    }
}

/// The repository and artifacts an artifact event names.
fn named_artifacts(data: &EventData) -> Result<(RepositoryName, BTreeSet<Digest>), String> {
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
fn refreshes(
    event: &HarborEvent,
    pull_window: Duration,
) -> Result<(String, Vec<Refresh>), Action<Key, Work>> {
    let data = &event.data;
    let artifact_event = |work: fn(BTreeSet<Digest>) -> Work, delay, project: bool| {
        let (repository, digests) = named_artifacts(data).map_err(Action::Skip)?;
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
    // A retention may list 10,000 artifacts of a few repositories: each distinct name is parsed
    // once, and the invalid ones are told in one line, not one each.
    let distinct: BTreeSet<String> = full_names.collect();
    let mut names: Vec<RepositoryName> = Vec::new();
    let mut invalid = Vec::new();
    for full in &distinct {
        match RepositoryName::parse(full) {
            Ok(name) => names.push(name),
            Err(error) => invalid.push(error.to_string()),
        }
    }
    if let Some(first) = invalid.first() {
        warn!(count = invalid.len(), first = %first, "Ignoring repositories the event names");
    }
    if names.is_empty() {
        return Err(Action::Skip("the event names no repository".into()));
    }
    const SHOWN: usize = 5;
    let mut shown = names
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        shown.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
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
    let mut projects = BTreeSet::new();
    for name in &names {
        if projects.insert(name.project()) {
            refreshes.push(project_of(name));
        }
    }
    Ok((shown, refreshes))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

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
        match refreshes(&artifact_event(kind), Duration::from_secs(11)) {
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
    fn a_retention_of_100_000_artifacts_names_each_repository_and_project_once() {
        let deleted: Vec<Value> = (0..100_000)
            .map(|i| {
                let repository = match i % 3 {
                    0 => format!("app{}", i % 7),
                    1 => format!("BAD NAME {i}"),
                    _ => "web".to_owned(),
                };
                json!({"type": "image", "status": "SUCCESS", "name_tag": format!("{repository}:{i}")})
            })
            .collect();
        let retention = event(json!({
            "type": "TAG_RETENTION",
            "event_data": {"retention": {"project_name": "harbor", "deleted_artifact": deleted}}
        }));
        let (shown, refreshes) = refreshes(&retention, Duration::ZERO).unwrap();
        // Seven apps and web, and their project once.
        assert_eq!(refreshes.len(), 9);
        assert_eq!(
            shown,
            "harbor/app0, harbor/app1, harbor/app2, harbor/app3, harbor/app4 and 3 more"
        );
    }

    #[test]
    fn retention_refreshes_every_artifact_of_the_repositories_it_touched() {
        let retention = event(json!({
            "type": "TAG_RETENTION",
            "event_data": {"retention": {"project_name": "harbor", "deleted_artifact": [
                {"name_tag": "alpine:3.8"}, {"name_tag": "alpine:3.9"}, {"name_tag": "nginx:1"}
            ]}}
        }));
        let (_, refreshes) = refreshes(&retention, Duration::ZERO).unwrap();
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
    fn events_naming_nothing_to_refresh_are_skipped_and_unknown_types_ignored() {
        let no_digest = event(json!({"type": "PUSH_ARTIFACT", "event_data": {
            "resources": [{"tag": "v1"}], "repository": {"repo_full_name": "alpha/web"}}}));
        assert!(matches!(
            refreshes(&no_digest, Duration::ZERO),
            Err(Action::Skip(_))
        ));
        let other = event(json!({"type": "SOMETHING_NEW", "event_data": {}}));
        assert_eq!(refreshes(&other, Duration::ZERO), Err(Action::Ignore));
    }
}
