//! Harbor's webhook events, in both of Harbor's payload formats.
//!
//! The ingest only needs the [`Envelope`] (format, type, id) to route a message; the worker
//! parses the whole [`HarborEvent`]. Both read the same raw body, which travels through the queue
//! unchanged.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

use crate::quote::cut;

/// Why a body is not a Harbor event.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// Not parseable as JSON at all.
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object with a string `type`.
    #[error("body is not an event object with a string \"type\": {0}")]
    NoType(String),
    /// `type` is empty, too long or not printable ASCII.
    #[error("\"type\" must be 1-255 printable ASCII characters")]
    BadType,
    /// The event's data does not have the shape Harbor sends.
    #[error("event data is malformed: {0}")]
    InvalidData(String),
}

/// Harbor's two webhook payload formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// `{"type": "PUSH_ARTIFACT", "event_data": {...}}`
    Default,
    /// CloudEvents 1.0: `{"specversion": "1.0", "type": "harbor.artifact.pushed", "data": {...}}`
    CloudEvents,
}

impl PayloadFormat {
    /// The value of the `x-payload-format` message header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::CloudEvents => "cloudevents",
        }
    }
}

/// The largest body of an event that names one resource (every type but those that
/// [`EventType::lists_artifacts`]): Harbor's largest, a scan result in CloudEvents, is about
/// 1.5 KiB. A larger one is padding, and a worker may hold thousands of such events at once.
pub const SINGLE_EVENT_MAX_BYTES: usize = 16 * 1024;

/// An event type, named as Harbor's default format names it (`PUSH_ARTIFACT`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `PUSH_ARTIFACT`
    PushArtifact,
    /// `PULL_ARTIFACT`
    PullArtifact,
    /// `DELETE_ARTIFACT`
    DeleteArtifact,
    /// `SCANNING_COMPLETED`
    ScanningCompleted,
    /// `SCANNING_FAILED`
    ScanningFailed,
    /// `SCANNING_STOPPED`
    ScanningStopped,
    /// `QUOTA_EXCEED`
    QuotaExceed,
    /// `QUOTA_WARNING`
    QuotaWarning,
    /// `REPLICATION`
    Replication,
    /// `TAG_RETENTION`
    TagRetention,
    /// Any other type, kept as sent.
    Other(UnknownType),
}

/// The name of an event type this program does not know: 1-255 printable ASCII characters,
/// so that it is a valid routing key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnknownType(String);

const KNOWN: [(EventType, &str, &str); 10] = [
    (
        EventType::PushArtifact,
        "PUSH_ARTIFACT",
        "harbor.artifact.pushed",
    ),
    (
        EventType::PullArtifact,
        "PULL_ARTIFACT",
        "harbor.artifact.pulled",
    ),
    (
        EventType::DeleteArtifact,
        "DELETE_ARTIFACT",
        "harbor.artifact.deleted",
    ),
    (
        EventType::ScanningCompleted,
        "SCANNING_COMPLETED",
        "harbor.scan.completed",
    ),
    (
        EventType::ScanningFailed,
        "SCANNING_FAILED",
        "harbor.scan.failed",
    ),
    (
        EventType::ScanningStopped,
        "SCANNING_STOPPED",
        "harbor.scan.stopped",
    ),
    (
        EventType::QuotaExceed,
        "QUOTA_EXCEED",
        "harbor.quota.exceeded",
    ),
    (
        EventType::QuotaWarning,
        "QUOTA_WARNING",
        "harbor.quota.warned",
    ),
    (
        EventType::Replication,
        "REPLICATION",
        "harbor.replication.status.changed",
    ),
    (
        EventType::TagRetention,
        "TAG_RETENTION",
        "harbor.tag_retention.finished",
    ),
];

impl EventType {
    /// Reads a `type` field: a default-format name, or a CloudEvents type mapped to it.
    /// An unknown type is kept as sent.
    pub fn parse(raw: &str, format: PayloadFormat) -> Result<Self, EventError> {
        let known = KNOWN.iter().find(|(_, default, cloudevents)| match format {
            PayloadFormat::Default => *default == raw,
            PayloadFormat::CloudEvents => *cloudevents == raw,
        });
        if let Some((event_type, _, _)) = known {
            return Ok(event_type.clone());
        }
        if raw.is_empty() || raw.len() > 255 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(EventError::BadType);
        }
        Ok(Self::Other(UnknownType(raw.to_owned())))
    }

    /// Harbor's names (default format) of the types this program knows, and handles.
    pub fn known_names() -> impl Iterator<Item = &'static str> {
        KNOWN.iter().map(|(_, name, _)| *name)
    }

    /// Harbor's name for the type; the routing key of its messages.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Other(UnknownType(name)) => name,
            known => KNOWN
                .iter()
                .find(|(event_type, _, _)| event_type == known)
                .map_or("", |(_, name, _)| name),
        }
    }

    /// Whether its payload lists artifacts, as many as the operation touched (`TAG_RETENTION`,
    /// `REPLICATION`: about 100 bytes each, so 1 MiB holds a retention of 10,000). Every other
    /// type names one resource and fits in [`SINGLE_EVENT_MAX_BYTES`].
    pub fn lists_artifacts(&self) -> bool {
        matches!(self, Self::TagRetention | Self::Replication)
    }

    /// A bounded label for metrics: the name of a known type, `other` for the rest.
    pub fn metric_label(&self) -> &str {
        match self {
            Self::Other(_) => "other",
            known => known.as_str(),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Both formats in one shape; `D` is how much of the data is read.
#[derive(Deserialize)]
#[serde(bound(deserialize = "D: Deserialize<'de>"))]
struct Raw<'a, D> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    specversion: Option<IgnoredAny>,
    /// CloudEvents requires a string; anything else is ignored rather than refused.
    id: Option<&'a RawValue>,
    operator: Option<String>,
    event_data: Option<D>,
    data: Option<D>,
}

impl<'a, D: Deserialize<'a>> Raw<'a, D> {
    fn parse(body: &'a [u8]) -> Result<Self, EventError> {
        serde_json::from_slice(body).map_err(|error| match error.classify() {
            serde_json::error::Category::Data => EventError::NoType(cut(error)),
            _ => EventError::NotJson(cut(error)),
        })
    }

    fn format(&self) -> PayloadFormat {
        if self.specversion.is_some() {
            PayloadFormat::CloudEvents
        } else {
            PayloadFormat::Default
        }
    }
}

/// What the ingest reads of an event: enough to route it and name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Harbor's payload format.
    pub format: PayloadFormat,
    /// The event type (Harbor's name).
    pub event_type: EventType,
    /// The AMQP `message_id`: the CloudEvents `id`, else the hex SHA-256 of the body, so that
    /// Harbor's retries (identical bytes) share an id.
    pub message_id: String,
    /// The Harbor project the event is about, when it names one: the events of one project
    /// go to one work queue (the `x-subject` header).
    pub project: Option<String>,
}

/// The parts of an event's data that name its project; the rest is skipped.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Routing<'a> {
    #[serde(borrow)]
    repository: Option<RoutingRepository<'a>>,
    #[serde(borrow)]
    retention: Option<RoutingRetention<'a>>,
    #[serde(borrow)]
    replication: Option<RoutingReplication<'a>>,
}

impl Routing<'_> {
    /// The project: the repository's namespace (or the start of its full name), a retention
    /// run's project, or a replication's destination (else source) namespace.
    fn project(&self) -> Option<&str> {
        let repository = self.repository.as_ref().and_then(|r| {
            r.namespace
                .as_deref()
                .or_else(|| r.repo_full_name.as_deref()?.split_once('/').map(|(p, _)| p))
        });
        let replication = self.replication.as_ref().and_then(|r| {
            [&r.dest_resource, &r.src_resource]
                .into_iter()
                .flatten()
                .find_map(|end| end.namespace.as_deref())
        });
        repository
            .or_else(|| self.retention.as_ref()?.project_name.as_deref())
            .or(replication)
            .filter(|p| !p.is_empty() && p.len() <= 255 && p.bytes().all(|b| b.is_ascii_graphic()))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RoutingRepository<'a> {
    #[serde(borrow)]
    namespace: Option<Cow<'a, str>>,
    #[serde(borrow)]
    repo_full_name: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RoutingRetention<'a> {
    #[serde(borrow)]
    project_name: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RoutingReplication<'a> {
    #[serde(borrow)]
    dest_resource: Option<RoutingEnd<'a>>,
    #[serde(borrow)]
    src_resource: Option<RoutingEnd<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RoutingEnd<'a> {
    #[serde(borrow)]
    namespace: Option<Cow<'a, str>>,
}

impl Envelope {
    /// Reads the envelope of a webhook body, skipping over the event data but its project.
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let raw = Raw::<&RawValue>::parse(body)?;
        let format = raw.format();
        let event_type = EventType::parse(&raw.event_type, format)?;
        let cloudevents_id = raw
            .id
            .and_then(|id| serde_json::from_str::<Cow<'_, str>>(id.get()).ok())
            // Printable ASCII only: the id is the message id every log line and `parked list`
            // show, and control characters or look-alikes there would forge lines.
            .filter(|id| {
                !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_graphic())
            });
        let message_id = match cloudevents_id {
            Some(id) if format == PayloadFormat::CloudEvents => id.into_owned(),
            _ => hex::encode(Sha256::digest(body)),
        };
        // Data of the wrong shape is the worker's to judge (it parks it): no project then.
        let project = raw
            .event_data
            .or(raw.data)
            .and_then(|data| serde_json::from_str::<Routing<'_>>(data.get()).ok())
            .and_then(|routing| routing.project().map(str::to_owned));
        Ok(Self {
            format,
            event_type,
            message_id,
            project,
        })
    }
}

/// A whole Harbor event, as the worker reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HarborEvent {
    /// Harbor's payload format.
    pub format: PayloadFormat,
    /// The event type (Harbor's name).
    pub event_type: EventType,
    /// Who caused the event (a user, `robot$...`, `auto`, ...).
    pub operator: Option<String>,
    /// `event_data` (default format) or `data` (CloudEvents).
    pub data: EventData,
}

/// The part of an event's data the worker acts on. Missing fields are empty, not errors:
/// whether an event can be acted on is the worker's decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct EventData {
    /// The artifacts the event is about.
    pub resources: Vec<Resource>,
    /// The repository the artifacts are in.
    pub repository: Option<RepositoryRef>,
    /// `TAG_RETENTION`: the retention run.
    pub retention: Option<Retention>,
    /// `REPLICATION`: the replication task.
    pub replication: Option<Replication>,
}

/// A tag retention run (`TAG_RETENTION`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Retention {
    /// The project the run was in.
    pub project_name: Option<String>,
    /// What it deleted (`name_tag` is `repository:tag`).
    pub deleted_artifact: Vec<ArtifactRef>,
}

/// A replication task's status change (`REPLICATION`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Replication {
    /// Where it copied from.
    pub src_resource: Option<ReplicationEnd>,
    /// Where it copied to.
    pub dest_resource: Option<ReplicationEnd>,
    /// What was copied (`name_tag` is `repository [n item(s) in total]`).
    pub successful_artifact: Vec<ArtifactRef>,
    /// What failed to copy.
    pub failed_artifact: Vec<ArtifactRef>,
}

/// One end of a replication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ReplicationEnd {
    /// The project (namespace) on that registry.
    pub namespace: Option<String>,
}

/// An artifact as retention and replication events name it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ArtifactRef {
    /// `alpine:3.8`, `alpine [1 item(s) in total]`, ...
    pub name_tag: Option<String>,
}

impl ArtifactRef {
    /// The repository name inside its project: `name_tag` up to the tag, digest or count.
    pub fn repository_name(&self) -> Option<&str> {
        let name_tag = self.name_tag.as_deref()?;
        let end = name_tag.find([':', '@', ' ']).unwrap_or(name_tag.len());
        Some(&name_tag[..end]).filter(|name| !name.is_empty())
    }
}

/// One artifact named by an event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Resource {
    /// `sha256:...`
    pub digest: Option<String>,
    /// The tag, or the digest again when the artifact was pushed by digest.
    pub tag: Option<String>,
    /// `host/project/repo:tag` or `host/project/repo@digest`.
    pub resource_url: Option<String>,
}

/// The repository an event names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RepositoryRef {
    /// Name inside the project (`team/api`).
    pub name: Option<String>,
    /// The project.
    pub namespace: Option<String>,
    /// `project/name`.
    pub repo_full_name: Option<String>,
}

impl RepositoryRef {
    /// `project/name`, from `repo_full_name` or else from its parts.
    pub fn full_name(&self) -> Option<String> {
        match (&self.repo_full_name, &self.namespace, &self.name) {
            (Some(full), _, _) if !full.is_empty() => Some(full.clone()),
            (_, Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => {
                Some(format!("{namespace}/{name}"))
            }
            _ => None,
        }
    }
}

impl HarborEvent {
    /// Parses a whole event. Fails on a body that is not an event, or whose data has the wrong
    /// shape; missing data parses as empty.
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let raw = Raw::<&RawValue>::parse(body)?;
        let format = raw.format();
        let event_type = EventType::parse(&raw.event_type, format)?;
        let data = match raw.event_data.or(raw.data) {
            Some(data) if data.get() != "null" => serde_json::from_str(data.get())
                .map_err(|error| EventError::InvalidData(cut(error)))?,
            _ => EventData::default(),
        };
        Ok(Self {
            format,
            event_type,
            operator: raw.operator,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudevents_types_map_to_harbor_names() {
        for (event_type, default, cloudevents) in KNOWN {
            assert_eq!(
                EventType::parse(cloudevents, PayloadFormat::CloudEvents).unwrap(),
                event_type
            );
            assert_eq!(
                EventType::parse(default, PayloadFormat::Default).unwrap(),
                event_type
            );
            assert_eq!(event_type.as_str(), default);
        }
    }

    #[test]
    fn unknown_types_are_kept_and_labelled_other() {
        let t = EventType::parse("ROBOT_DELETED", PayloadFormat::Default).unwrap();
        assert_eq!(t.as_str(), "ROBOT_DELETED");
        assert_eq!(t.metric_label(), "other");
        // A default-format name in CloudEvents is not mapped: it is just unknown.
        let t = EventType::parse("PUSH_ARTIFACT", PayloadFormat::CloudEvents).unwrap();
        assert!(matches!(t, EventType::Other(_)));
    }

    #[test]
    fn types_that_cannot_be_routing_keys_are_refused() {
        for bad in ["", "has space", "é", &"X".repeat(256)] {
            assert_eq!(
                EventType::parse(bad, PayloadFormat::Default),
                Err(EventError::BadType)
            );
        }
    }

    #[test]
    fn envelope_errors_say_what_is_wrong() {
        assert!(matches!(
            Envelope::parse(b"{not json"),
            Err(EventError::NotJson(_))
        ));
        assert!(matches!(Envelope::parse(b""), Err(EventError::NotJson(_))));
        assert!(matches!(Envelope::parse(b"{}"), Err(EventError::NoType(_))));
        assert!(matches!(
            Envelope::parse(br#"{"type": 3}"#),
            Err(EventError::NoType(_))
        ));
        assert!(matches!(Envelope::parse(b"[]"), Err(EventError::NoType(_))));
        assert!(matches!(
            Envelope::parse(b"\xff\xfe"),
            Err(EventError::NotJson(_))
        ));
    }

    #[test]
    fn default_format_message_id_is_the_body_hash() {
        let body = br#"{"type":"PUSH_ARTIFACT","event_data":{}}"#;
        let envelope = Envelope::parse(body).unwrap();
        assert_eq!(envelope.format, PayloadFormat::Default);
        assert_eq!(envelope.message_id, hex::encode(Sha256::digest(body)));
    }

    #[test]
    fn cloudevents_message_id_is_the_event_id() {
        let body = br#"{"specversion":"1.0","id":"abc-1","type":"harbor.scan.failed","data":{}}"#;
        let envelope = Envelope::parse(body).unwrap();
        assert_eq!(envelope.format, PayloadFormat::CloudEvents);
        assert_eq!(envelope.event_type, EventType::ScanningFailed);
        assert_eq!(envelope.message_id, "abc-1");
        // A non-string id is not refused; the hash stands in.
        let body = br#"{"specversion":"1.0","id":7,"type":"harbor.scan.failed"}"#;
        assert_eq!(Envelope::parse(body).unwrap().message_id.len(), 64);
        // An id that would forge a log line is not taken.
        for id in [
            r"a\nlevel=ERROR forged",
            r"a\u001b[31mred",
            "a b",
            r"\u202eevil",
        ] {
            let body =
                format!(r#"{{"specversion":"1.0","id":"{id}","type":"harbor.scan.failed"}}"#);
            let envelope = Envelope::parse(body.as_bytes()).unwrap();
            assert_eq!(
                envelope.message_id,
                hex::encode(Sha256::digest(&body)),
                "{id}"
            );
        }
    }

    #[test]
    fn an_event_names_its_project() {
        let project = |body: &str| Envelope::parse(body.as_bytes()).unwrap().project;
        assert_eq!(
            project(
                r#"{"type":"PUSH_ARTIFACT","event_data":{"repository":{"namespace":"alpha","repo_full_name":"alpha/web"}}}"#
            ),
            Some("alpha".into())
        );
        assert_eq!(
            project(
                r#"{"specversion":"1.0","id":"1","type":"harbor.artifact.pulled","data":{"repository":{"repo_full_name":"beta/team/api"}}}"#
            ),
            Some("beta".into())
        );
        assert_eq!(
            project(
                r#"{"type":"TAG_RETENTION","event_data":{"retention":{"project_name":"gamma"}}}"#
            ),
            Some("gamma".into())
        );
        assert_eq!(
            project(
                r#"{"type":"REPLICATION","event_data":{"replication":{"src_resource":{"namespace":"library"},"dest_resource":{"namespace":"delta"}}}}"#
            ),
            Some("delta".into())
        );
        // No project, or data of the wrong shape: no project, and still an event.
        assert_eq!(project(r#"{"type":"PUSH_ARTIFACT","event_data":{}}"#), None);
        assert_eq!(
            project(r#"{"type":"PUSH_ARTIFACT","event_data":{"repository":"oops"}}"#),
            None
        );
        assert_eq!(project(r#"{"type":"PUSH_ARTIFACT","event_data":7}"#), None);
    }

    #[test]
    fn malformed_data_is_an_error_and_missing_data_is_empty() {
        let err = HarborEvent::parse(br#"{"type":"PUSH_ARTIFACT","event_data":{"resources":"x"}}"#);
        assert!(matches!(err, Err(EventError::InvalidData(_))));
        let event = HarborEvent::parse(br#"{"type":"PUSH_ARTIFACT","event_data":null}"#).unwrap();
        assert_eq!(event.data, EventData::default());
        let event = HarborEvent::parse(br#"{"type":"PUSH_ARTIFACT"}"#).unwrap();
        assert!(event.data.repository.is_none());
    }

    #[test]
    fn retention_and_replication_name_their_repositories() {
        let name = |s: &str| {
            ArtifactRef {
                name_tag: Some(s.into()),
            }
            .repository_name()
            .map(str::to_owned)
        };
        assert_eq!(name("alpine:3.8").as_deref(), Some("alpine"));
        assert_eq!(
            name("alpine [1 item(s) in total]").as_deref(),
            Some("alpine")
        );
        assert_eq!(name("team/api@sha256:abc").as_deref(), Some("team/api"));
        assert_eq!(name(":3.8"), None);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/harbor/webhook-samples");
        let retention = HarborEvent::parse(
            &std::fs::read(dir.join("tag_retention.default.docs.json")).unwrap(),
        )
        .unwrap();
        let retention = retention.data.retention.unwrap();
        assert_eq!(retention.project_name.as_deref(), Some("harbor"));
        assert_eq!(
            retention.deleted_artifact[0].repository_name(),
            Some("alpine")
        );
        let replication = HarborEvent::parse(
            &std::fs::read(dir.join("replication.default.reconstructed-head.json")).unwrap(),
        )
        .unwrap();
        let replication = replication.data.replication.unwrap();
        assert_eq!(
            replication.dest_resource.unwrap().namespace.as_deref(),
            Some("myproj")
        );
        assert_eq!(
            replication.successful_artifact[0].repository_name(),
            Some("alpine")
        );
    }

    #[test]
    fn full_name_falls_back_to_namespace_and_name() {
        let repo = RepositoryRef {
            name: Some("team/api".into()),
            namespace: Some("myproj".into()),
            repo_full_name: None,
        };
        assert_eq!(repo.full_name().as_deref(), Some("myproj/team/api"));
        assert_eq!(RepositoryRef::default().full_name(), None);
    }

    /// Every real payload in `tests/fixtures/harbor/webhook-samples/` (Harbor's docs, source and
    /// unit tests) parses, with the type its file name says and the data the worker needs.
    #[test]
    fn every_harbor_sample_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/harbor/webhook-samples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let body = std::fs::read(&path).unwrap();
            let envelope = Envelope::parse(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            let event = HarborEvent::parse(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(envelope.event_type, event.event_type, "{name}");
            assert_eq!(envelope.format, event.format, "{name}");

            // `scanning_completed_sbom.default...` names SCANNING_COMPLETED, and so on.
            let stem = name.split('.').next().unwrap().trim_end_matches("_sbom");
            let stem = stem.trim_end_matches("_running").to_uppercase();
            assert_eq!(event.event_type.as_str(), stem, "{name}");
            let expected_format = if name.contains(".cloudevents.") {
                PayloadFormat::CloudEvents
            } else {
                PayloadFormat::Default
            };
            assert_eq!(event.format, expected_format, "{name}");
            if expected_format == PayloadFormat::CloudEvents {
                assert_eq!(
                    envelope.message_id.len(),
                    36,
                    "{name}: the CloudEvents id is a UUID"
                );
            } else {
                assert_eq!(
                    envelope.message_id,
                    hex::encode(Sha256::digest(&body)),
                    "{name}"
                );
            }

            if matches!(
                event.event_type,
                EventType::PushArtifact
                    | EventType::PullArtifact
                    | EventType::DeleteArtifact
                    | EventType::ScanningCompleted
                    | EventType::ScanningFailed
                    | EventType::ScanningStopped
            ) {
                let repository = event
                    .data
                    .repository
                    .as_ref()
                    .and_then(RepositoryRef::full_name);
                assert!(repository.is_some_and(|r| r.contains('/')), "{name}");
                assert!(!event.data.resources.is_empty(), "{name}");
                for resource in &event.data.resources {
                    assert!(
                        resource
                            .digest
                            .as_ref()
                            .is_some_and(|d| d.starts_with("sha256:")),
                        "{name}"
                    );
                }
            }
            seen += 1;
        }
        assert!(seen >= 30, "only {seen} samples found in {}", dir.display());
    }
}

/// Fuzzing the parsers with generated bodies (a bounded number of cases, so it runs in CI).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// Arbitrary JSON, nested a few levels.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,20}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(".{0,10}", inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn any_bytes_are_parsed_or_refused_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..4000)) {
            let envelope = Envelope::parse(&body);
            let event = HarborEvent::parse(&body);
            // What the worker can read, the ingest accepts.
            prop_assert!(event.is_err() || envelope.is_ok());
        }

        #[test]
        fn any_object_with_a_printable_type_is_an_event_with_a_stable_id(
            event_type in "[!-~]{1,60}",
            data in json_value(),
            cloudevents in any::<bool>(),
        ) {
            let body = if cloudevents {
                json!({"specversion": "1.0", "id": "e-1", "type": event_type, "data": data})
            } else {
                json!({"type": event_type, "event_data": data, "occur_at": 1})
            };
            let bytes = serde_json::to_vec(&body).unwrap();
            let envelope = Envelope::parse(&bytes).unwrap();
            prop_assert_eq!(&envelope, &Envelope::parse(&bytes).unwrap());
            let expected_id = if cloudevents { "e-1".to_owned() } else { hex::encode(Sha256::digest(&bytes)) };
            prop_assert_eq!(envelope.message_id, expected_id);
            // The worker reads it too, or says its data is malformed; never anything else.
            match HarborEvent::parse(&bytes) {
                Ok(event) => prop_assert_eq!(event.event_type, envelope.event_type),
                Err(error) => prop_assert!(matches!(error, EventError::InvalidData(_)), "{error}"),
            }
        }
    }
}
