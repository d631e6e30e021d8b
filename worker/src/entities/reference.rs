//! Harbor's state as Port entities, compiled in: the reference the default mapping file
//! (`deploy/port/mapping.yaml`) reproduces, property for property.

use serde_json::{Map, Value, json};
use url::Url;

use super::{ARTIFACT, Entity, PROJECT, REPOSITORY};
use crate::clients::harbor::{Artifact, Project, Repository, ScanSummary};
use crate::names::{Digest, RepositoryName};

/// The identifier of an artifact's entity.
pub fn artifact_id(repository: &RepositoryName, digest: &Digest) -> String {
    format!("{repository}@{digest}")
}

/// Harbor writes `0001-01-01T00:00:00Z` (Go's zero time) for "never".
fn time(value: Option<&String>) -> Value {
    match value {
        Some(t) if !t.is_empty() && !t.starts_with("0001-01-01") => Value::String(t.clone()),
        _ => Value::Null,
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// A link into Harbor's web UI.
fn ui_link(harbor: &Url, segments: &[&str]) -> String {
    let mut url = harbor.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().push("harbor").extend(segments);
    }
    url.to_string()
}

/// A project.
pub fn project(project: &Project) -> Entity {
    Entity {
        identifier: project.name.clone(),
        title: project.name.clone(),
        properties: object(json!({
            "public": project.metadata.public.as_deref() == Some("true"),
            "ownerName": project.owner_name,
            "repoCount": project.repo_count,
            "createdAt": time(project.creation_time.as_ref()),
            "updatedAt": time(project.update_time.as_ref()),
        })),
        relations: Map::new(),
    }
}

/// A repository; `harbor` is Harbor's address, for the link to it.
pub fn repository(name: &RepositoryName, repository: &Repository, harbor: &Url) -> Entity {
    let project_id = repository.project_id.to_string();
    Entity {
        identifier: name.full().to_owned(),
        title: name.full().to_owned(),
        properties: object(json!({
            "artifactCount": repository.artifact_count,
            "pullCount": repository.pull_count,
            "description": repository.description.clone().unwrap_or_default(),
            "createdAt": time(repository.creation_time.as_ref()),
            "updatedAt": time(repository.update_time.as_ref()),
            "url": ui_link(harbor, &["projects", &project_id, "repositories", name.name()]),
        })),
        relations: object(json!({ "project": name.project() })),
    }
}

/// An artifact of `name`.
pub fn artifact(
    name: &RepositoryName,
    digest: &Digest,
    artifact: &Artifact,
    harbor: &Url,
) -> Entity {
    let tags: Vec<&str> = artifact
        .tags
        .iter()
        .flatten()
        .map(|t| t.name.as_str())
        .collect();
    let labels: Vec<&str> = artifact
        .labels
        .iter()
        .flatten()
        .map(|l| l.name.as_str())
        .collect();
    let identifier = artifact_id(name, digest);
    let title = match tags.first() {
        Some(tag) => format!("{name}:{tag}"),
        None => identifier.clone(),
    };
    let project_id = artifact.project_id.to_string();
    let mut properties = object(json!({
        "digest": digest.as_str(),
        "tags": tags,
        "labels": labels,
        "size": artifact.size,
        "mediaType": artifact.manifest_media_type.as_ref().or(artifact.media_type.as_ref()),
        "type": artifact.artifact_type,
        "pushTime": time(artifact.push_time.as_ref()),
        "pullTime": time(artifact.pull_time.as_ref()),
        "url": ui_link(harbor, &[
            "projects", &project_id, "repositories", name.name(),
            "artifacts-tab", "artifacts", digest.as_str(),
        ]),
    }));
    properties.extend(scan_properties(artifact));
    Entity {
        identifier,
        title,
        properties,
        relations: object(json!({ "repository": name.full() })),
    }
}

/// The vulnerability report's summary, if the artifact has one. Harbor keys the overview by
/// report MIME type; an SBOM-only overview has no counts.
fn vulnerability_report(artifact: &Artifact) -> Option<&ScanSummary> {
    let overview = artifact.scan_overview.as_ref()?;
    overview
        .iter()
        .find(|(mime, _)| mime.contains("vulnerability") || mime.contains("vuln.report"))
        .or_else(|| overview.iter().next())
        .map(|(_, summary)| summary)
}

/// `scanStatus`, `scanSeverity`, `vulnerabilities`, `scanner`; all `null` when never scanned,
/// so that a stale count is cleared rather than kept.
fn scan_properties(artifact: &Artifact) -> Map<String, Value> {
    let Some(report) = vulnerability_report(artifact) else {
        return object(json!({
            "scanStatus": null, "scanSeverity": null, "vulnerabilities": null, "scanner": null,
        }));
    };
    let vulnerabilities = report.summary.as_ref().map(|summary| {
        let count = |severity: &str| -> i64 {
            summary
                .summary
                .iter()
                .flatten()
                .filter(|(key, _)| key.eq_ignore_ascii_case(severity))
                .map(|(_, n)| *n)
                .sum()
        };
        json!({
            "critical": count("critical"),
            "high": count("high"),
            "medium": count("medium"),
            "low": count("low"),
            "unknown": count("unknown"),
            "total": summary.total.unwrap_or(0),
            "fixable": summary.fixable.unwrap_or(0),
        })
    });
    let scanner = report
        .scanner
        .as_ref()
        .and_then(|s| match (&s.name, &s.version) {
            (Some(name), Some(version)) => Some(format!("{name} {version}")),
            (Some(name), None) => Some(name.clone()),
            _ => None,
        });
    object(json!({
        "scanStatus": report.scan_status,
        "scanSeverity": report.severity.as_ref().filter(|s| !s.is_empty()),
        "vulnerabilities": vulnerabilities,
        "scanner": scanner,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    fn harbor() -> Url {
        Url::parse("https://harbor.example.com").unwrap()
    }

    /// Shaped like `GET /projects/myproj/repositories/team%252Fapi/artifacts/...` answers.
    fn scanned_artifact() -> Artifact {
        serde_json::from_value(scanned_fixture()).unwrap()
    }

    fn scanned_fixture() -> Value {
        json!({
            "id": 7, "project_id": 3, "repository_id": 5, "repository_name": "myproj/team/api",
            "digest": DIGEST, "size": 3_145_728, "type": "IMAGE",
            "media_type": "application/vnd.oci.image.config.v1+json",
            "manifest_media_type": "application/vnd.oci.image.manifest.v1+json",
            "push_time": "2024-08-20T08:00:00.000Z", "pull_time": "0001-01-01T00:00:00.000Z",
            "tags": [{"id": 1, "name": "1.2.3", "immutable": false}, {"id": 2, "name": "latest"}],
            "labels": [{"id": 1, "name": "prod", "color": "#00FF00", "scope": "g"}],
            "scan_overview": {
                "application/vnd.security.vulnerability.report; version=1.1": {
                    "report_id": "r", "scan_status": "Success", "severity": "High",
                    "duration": 8, "complete_percent": 100,
                    "summary": {"total": 12, "fixable": 7, "summary": {"High": 2, "Medium": 6, "Low": 4}},
                    "scanner": {"name": "Trivy", "vendor": "Aqua Security", "version": "v0.54.1"}
                }
            },
            "extra_attrs": {"architecture": "amd64"}, "addition_links": {}
        })
    }

    #[test]
    fn an_artifact_maps_every_property() {
        let name = RepositoryName::parse("myproj/team/api").unwrap();
        let digest = Digest::parse(DIGEST).unwrap();
        let entity = artifact(&name, &digest, &scanned_artifact(), &harbor());
        assert_eq!(entity.identifier, format!("myproj/team/api@{DIGEST}"));
        assert_eq!(entity.title, "myproj/team/api:1.2.3");
        assert_eq!(
            Value::Object(entity.relations),
            json!({"repository": "myproj/team/api"})
        );
        assert_eq!(
            Value::Object(entity.properties),
            json!({
                "digest": DIGEST,
                "tags": ["1.2.3", "latest"],
                "labels": ["prod"],
                "size": 3_145_728,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "type": "IMAGE",
                "pushTime": "2024-08-20T08:00:00.000Z",
                "pullTime": null,
                "scanStatus": "Success",
                "scanSeverity": "High",
                "vulnerabilities": {"critical": 0, "high": 2, "medium": 6, "low": 4, "unknown": 0, "total": 12, "fixable": 7},
                "scanner": "Trivy v0.54.1",
                "url": format!("https://harbor.example.com/harbor/projects/3/repositories/team%2Fapi/artifacts-tab/artifacts/{DIGEST}"),
            })
        );
    }

    #[test]
    fn an_untagged_unscanned_artifact_is_titled_by_digest_and_clears_scan_fields() {
        let name = RepositoryName::parse("library/nginx").unwrap();
        let digest = Digest::parse(DIGEST).unwrap();
        let bare = Artifact {
            digest: DIGEST.into(),
            ..Artifact::default()
        };
        let entity = artifact(&name, &digest, &bare, &harbor());
        assert_eq!(entity.title, format!("library/nginx@{DIGEST}"));
        assert_eq!(entity.properties["tags"], json!([]));
        assert_eq!(entity.properties["vulnerabilities"], Value::Null);
        assert_eq!(entity.properties["scanStatus"], Value::Null);
    }

    #[test]
    fn a_failed_scan_has_a_status_and_no_counts() {
        let mut failed = scanned_artifact();
        let overview = failed.scan_overview.as_mut().unwrap();
        let report = overview.values_mut().next().unwrap();
        report.scan_status = Some("Error".into());
        report.severity = Some(String::new());
        report.summary = None;
        report.scanner = None;
        let props = scan_properties(&failed);
        assert_eq!(props["scanStatus"], "Error");
        assert_eq!(props["scanSeverity"], Value::Null);
        assert_eq!(props["vulnerabilities"], Value::Null);
    }

    #[test]
    fn a_repository_and_a_project_map_their_properties() {
        let name = RepositoryName::parse("myproj/team/api").unwrap();
        let repo: Repository = serde_json::from_value(json!({
            "id": 5, "project_id": 3, "name": "myproj/team/api", "description": "",
            "artifact_count": 4, "pull_count": 19,
            "creation_time": "2024-08-01T10:00:00.000Z", "update_time": "2024-08-20T08:00:00.000Z"
        }))
        .unwrap();
        let entity = repository(&name, &repo, &harbor());
        assert_eq!(entity.identifier, "myproj/team/api");
        assert_eq!(entity.title, "myproj/team/api");
        assert_eq!(entity.relations["project"], "myproj");
        assert_eq!(entity.properties["artifactCount"], 4);
        assert_eq!(entity.properties["pullCount"], 19);
        assert_eq!(
            entity.properties["url"],
            "https://harbor.example.com/harbor/projects/3/repositories/team%2Fapi"
        );

        let p: Project = serde_json::from_value(json!({
            "project_id": 3, "name": "myproj", "owner_name": "admin", "repo_count": 2,
            "creation_time": "2024-08-01T09:00:00.000Z", "update_time": "2024-08-01T09:00:00.000Z",
            "metadata": {"public": "false", "auto_scan": "true"}
        }))
        .unwrap();
        let entity = project(&p);
        assert_eq!(entity.identifier, "myproj");
        assert_eq!(
            Value::Object(entity.properties),
            json!({"public": false, "ownerName": "admin", "repoCount": 2,
                   "createdAt": "2024-08-01T09:00:00.000Z", "updatedAt": "2024-08-01T09:00:00.000Z"})
        );
    }

    /// The default mapping file makes exactly the entities above.
    #[test]
    fn the_default_mapping_file_makes_the_same_entities() {
        use crate::mapping::{Kind, Mapping};
        let mapping = Mapping::default_mapping();
        let with = |raw: Value, extra: Value| {
            let mut object = raw;
            object["__harbor"] = json!({"url": "https://harbor.example.com", "name": "default"});
            for (key, value) in extra.as_object().unwrap() {
                object[key] = value.clone();
            }
            object
        };
        let same = |kind: Kind, object: Value, expected: Entity, blueprint: &str| {
            let shown = object.to_string();
            let rendered = mapping
                .render(kind, &object, &[])
                .unwrap_or_else(|e| panic!("{e}: {shown}"));
            assert_eq!(rendered.entities.len(), 1, "{shown}");
            let mapped = &rendered.entities[0];
            assert_eq!(mapped.blueprint, blueprint);
            assert_eq!(mapped.entity, expected, "{shown}");
        };

        let mut failed = scanned_artifact();
        let report = failed
            .scan_overview
            .as_mut()
            .unwrap()
            .values_mut()
            .next()
            .unwrap();
        report.scan_status = Some("Error".into());
        report.severity = Some(String::new());
        report.summary = None;
        report.scanner = None;
        let failed_raw = {
            let mut raw = serde_json::to_value(scanned_fixture()).unwrap();
            let report = raw["scan_overview"]
                .as_object_mut()
                .unwrap()
                .values_mut()
                .next()
                .unwrap();
            report["scan_status"] = json!("Error");
            report["severity"] = json!("");
            report.as_object_mut().unwrap().remove("summary");
            report.as_object_mut().unwrap().remove("scanner");
            raw
        };
        let sbom_only = json!({
            "id": 9, "project_id": 3, "repository_name": "myproj/team/api", "digest": DIGEST,
            "size": 10, "type": "IMAGE", "media_type": "m", "manifest_media_type": null,
            "push_time": "2024-08-20T08:00:00.000Z", "pull_time": "2024-08-21T08:00:00.000Z",
            "tags": null, "labels": null,
            "scan_overview": {"application/vnd.security.sbom.report+json; version=1.0": {
                "scan_status": "Success", "scanner": {"name": "Trivy"}}}
        });
        let bare = json!({"digest": DIGEST, "repository_name": "library/nginx", "project_id": 1});
        let artifacts = [
            ("myproj/team/api", scanned_fixture()),
            ("myproj/team/api", failed_raw),
            ("myproj/team/api", sbom_only),
            ("library/nginx", bare),
        ];
        for (repository, raw) in artifacts {
            let name = RepositoryName::parse(repository).unwrap();
            let digest = Digest::parse(DIGEST).unwrap();
            let typed: Artifact = serde_json::from_value(raw.clone()).unwrap();
            let expected = artifact(&name, &digest, &typed, &harbor());
            same(Kind::Artifact, with(raw, json!({})), expected, ARTIFACT);
        }
        let _ = failed;

        let repositories = [
            json!({
                "id": 5, "project_id": 3, "name": "myproj/team/api", "description": "",
                "artifact_count": 4, "pull_count": 19,
                "creation_time": "2024-08-01T10:00:00.000Z", "update_time": "2024-08-20T08:00:00.000Z"
            }),
            json!({"id": 6, "project_id": 1, "name": "library/nginx", "description": "web",
                   "artifact_count": 0, "pull_count": 0, "creation_time": "0001-01-01T00:00:00Z"}),
        ];
        for raw in repositories {
            let typed: Repository = serde_json::from_value(raw.clone()).unwrap();
            let name = RepositoryName::parse(&typed.name).unwrap();
            let expected = repository(&name, &typed, &harbor());
            same(Kind::Repository, with(raw, json!({})), expected, REPOSITORY);
        }

        let projects = [
            json!({
                "project_id": 3, "name": "myproj", "owner_name": "admin", "repo_count": 2,
                "creation_time": "2024-08-01T09:00:00.000Z", "update_time": "2024-08-01T09:00:00.000Z",
                "metadata": {"public": "false", "auto_scan": "true"}
            }),
            json!({"project_id": 1, "name": "library", "metadata": {"public": "true"}}),
            json!({"project_id": 2, "name": "bare"}),
        ];
        for raw in projects {
            let typed: Project = serde_json::from_value(raw.clone()).unwrap();
            same(
                Kind::Project,
                with(raw, json!({})),
                project(&typed),
                PROJECT,
            );
        }
    }
}
