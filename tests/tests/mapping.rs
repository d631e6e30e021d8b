//! A custom mapping file, end to end: webhooks through the ingest and the broker to a worker
//! whose `MAPPING_FILE` says what becomes of Harbor's objects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use harbor_sync_tests::apps::Stack;
use harbor_sync_tests::fakes::{PortWrite, harbor_json};
use harbor_sync_tests::rabbit::failure_reason;
use harbor_sync_tests::samples;
use harbor_worker::mapping::Mapping;
use serde_json::{Value, json};

/// Artifacts twice (the integration's own blueprint, and the team's `image` blueprint related
/// to its `service` from a `team-*` label, with a property from an OCI annotation), and
/// projects, with `sandbox-*` projects and everything in them left out.
const MAPPING: &str = r#"
deleteDependentEntities: false
resources:
  - kind: project
    selector:
      query: '.name | startswith("sandbox-") | not'
    port:
      entity:
        mappings:
          identifier: .name
          blueprint: '"harborProject"'
  - kind: artifact
    selector:
      query: '.__project.name | startswith("sandbox-") | not'
    port:
      entity:
        mappings:
          identifier: '.__repository.name + "@" + .digest'
          title: '.__repository.name + ":" + ((.tags // [])[0].name // "untagged")'
          blueprint: '"harborArtifact"'
          properties:
            tags: '[.tags[]?.name]'
          relations:
            repository: .__repository.name
  - kind: artifact
    selector:
      query: '[(.labels // [])[].name | select(startswith("team-"))] | length > 0'
    port:
      entity:
        mappings:
          identifier: .digest
          title: .repository_name
          blueprint: '"image"'
          properties:
            source: '(.annotations // {})["org.opencontainers.image.source"]'
          relations:
            service: '[(.labels // [])[].name | select(startswith("team-")) | ltrimstr("team-")][0]'
"#;

async fn stack(mapping: &str) -> Stack {
    let mapping = Arc::new(Mapping::parse(mapping, "test mapping").unwrap());
    Stack::start_with(|settings| settings.port.mapping = mapping).await
}

fn upserts(writes: &[PortWrite], blueprint: &str) -> Vec<Value> {
    writes
        .iter()
        .filter(|w| w.action == "upsert" && w.blueprint == blueprint)
        .filter_map(|w| w.entity.clone())
        .collect()
}

#[tokio::test]
async fn a_label_relates_an_artifact_to_a_service_and_one_artifact_makes_two_entities() {
    let stack = stack(MAPPING).await;
    let (repo, digest) = ("payments/api", samples::digest(1));
    stack.harbor.project_and_repository(repo).await;
    let mut artifact = harbor_json::artifact(repo, &digest, &["v1"], None);
    artifact["labels"] = json!([{"id": 3, "name": "team-checkout", "scope": "g"}]);
    artifact["annotations"] =
        json!({"org.opencontainers.image.source": "https://github.com/acme/api"});
    stack.harbor.artifact(repo, &digest, artifact).await;

    stack
        .webhook(&samples::event("PUSH_ARTIFACT", repo, &digest, "v1"))
        .await;
    stack.wait_for_outcome("synced", 1).await;

    let writes = stack.port.writes().await;
    let id = format!("{repo}@{digest}");
    assert_eq!(
        upserts(&writes, "harborArtifact"),
        vec![json!({
            "identifier": id, "title": format!("{repo}:v1"),
            "properties": {"tags": ["v1"], "harborInstance": "default",
                           "harborRef": format!("artifact:{id}"), "harborTags": ["v1"]},
            "relations": {"repository": repo},
        })]
    );
    assert_eq!(
        upserts(&writes, "image"),
        vec![json!({
            "identifier": digest, "title": repo,
            "properties": {"source": "https://github.com/acme/api", "harborInstance": "default",
                           "harborRef": format!("artifact:{id}"), "harborTags": ["v1"]},
            "relations": {"service": "checkout"},
        })]
    );
    // The mapping has no repository resource: nothing is written for the repository.
    assert!(upserts(&writes, "harborRepository").is_empty());
    assert_eq!(upserts(&writes, "harborProject").len(), 1);
}

#[tokio::test]
async fn a_project_its_selector_leaves_out_is_not_written_and_its_entities_are_deleted() {
    let stack = stack(MAPPING).await;
    let (repo, digest) = ("sandbox-1/app", samples::digest(2));
    stack.harbor.project_and_repository(repo).await;
    stack.harbor.holds(repo, &digest, &["v1"], None).await;
    // Written before the mapping left sandbox projects out.
    let id = format!("{repo}@{digest}");
    for (blueprint, identifier, reference) in [
        (
            "harborProject",
            "sandbox-1".to_owned(),
            "project:sandbox-1".to_owned(),
        ),
        ("harborArtifact", id.clone(), format!("artifact:{id}")),
    ] {
        stack.port.holds(
            blueprint,
            json!({"identifier": identifier, "title": identifier, "relations": {},
                   "properties": {"harborInstance": "default", "harborRef": reference}}),
        );
    }

    stack
        .webhook(&samples::event("PUSH_ARTIFACT", repo, &digest, "v1"))
        .await;
    stack.wait_for_outcome("synced", 1).await;

    let writes = stack.port.writes().await;
    let actions: Vec<(&str, &str, &str)> = writes
        .iter()
        .map(|w| (w.action, w.blueprint.as_str(), w.identifier.as_str()))
        .collect();
    assert!(
        actions.contains(&("delete", "harborProject", "sandbox-1")),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("delete", "harborArtifact", id.as_str())),
        "{actions:?}"
    );
    assert!(
        !writes.iter().any(|w| w.action == "upsert"),
        "nothing of a sandbox project is written: {actions:?}"
    );
}

#[tokio::test]
async fn a_mapping_that_fails_on_an_object_parks_its_event_with_the_resource_and_the_field() {
    // jaq refuses to index null: an artifact without labels fails this identifier.
    let broken = r#"
resources:
  - kind: artifact
    port:
      entity:
        mappings:
          identifier: '.labels[0].name'
          blueprint: '"harborArtifact"'
"#;
    let stack = stack(broken).await;
    let (repo, digest) = ("alpha/web", samples::digest(3));
    stack.harbor.project_and_repository(repo).await;
    stack.harbor.holds(repo, &digest, &["v1"], None).await;

    stack
        .webhook(&samples::event("PUSH_ARTIFACT", repo, &digest, "v1"))
        .await;
    stack.wait_for_outcome("parked", 1).await;

    let parked = stack.broker.take_parked().await.unwrap();
    let reason = failure_reason(&parked);
    assert!(
        reason.contains("mapping resource 0 (artifact), identifier:"),
        "{reason}"
    );
    assert!(
        !stack
            .port
            .writes()
            .await
            .iter()
            .any(|w| w.action == "upsert"),
        "nothing written for the object"
    );
}

#[tokio::test]
async fn mapping_render_prints_what_the_mapping_makes_of_harbors_current_data() {
    let sandbox = harbor_sync_tests::apps::start_sandbox(
        "http://127.0.0.1:9/webhook",
        harbor_sync_tests::sandbox::PayloadFormat::Default,
    )
    .await;
    sandbox.act("push", "library/nginx", "1.27").await;
    let output = std::process::Command::new(harbor_sync_tests::processes::binary("harbor-worker"))
        .args([
            "mapping",
            "render",
            "--kind",
            "artifact",
            "--project",
            "library",
        ])
        .args(["--repository", "nginx", "--reference", "1.27"])
        .env_clear()
        .env("HARBOR_URL", &sandbox.base)
        .env("HARBOR_USERNAME", "admin")
        .env("HARBOR_PASSWORD", "Harbor12345")
        .env("PORT_CLIENT_ID", "sandbox-client")
        .env("PORT_CLIENT_SECRET", "sandbox-secret")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["blueprint"], "harborArtifact");
    let entity = &lines[0]["entity"];
    assert_eq!(entity["title"], "library/nginx:1.27");
    assert_eq!(entity["properties"]["tags"], json!(["1.27"]));
    assert!(
        entity["properties"]["harborRef"]
            .as_str()
            .unwrap()
            .starts_with("artifact:library/nginx@sha256:")
    );
    // Nothing was written.
    assert!(sandbox.ids("harborArtifact").await.is_empty());
}
