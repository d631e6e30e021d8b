//! The whole path: a Harbor webhook posted to harbor-ingest, through the real broker, to
//! harbor-worker, which reads a fake Harbor and writes a fake Port. Each test asserts the exact
//! Port requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use harbor_sync_tests::apps::Stack;
use harbor_sync_tests::fakes::{PortWrite, harbor_json};
use harbor_sync_tests::samples;
use lapin::types::AMQPValue;
use serde_json::{Value, json};
use wiremock::ResponseTemplate;

const WAIT: Duration = Duration::from_secs(15);

fn upsert(blueprint: &str, entity: Value) -> PortWrite {
    PortWrite {
        action: "upsert",
        blueprint: blueprint.to_owned(),
        identifier: entity["identifier"].as_str().unwrap().to_owned(),
        entity: Some(entity),
    }
}

fn delete(blueprint: &str, identifier: &str) -> PortWrite {
    PortWrite {
        action: "delete",
        blueprint: blueprint.to_owned(),
        identifier: identifier.to_owned(),
        entity: None,
    }
}

/// The project entity written for `harbor_json::project(name)`.
fn project_entity(name: &str) -> PortWrite {
    upsert(
        "harborProject",
        json!({
            "identifier": name, "title": name,
            "properties": {"harborInstance": "default", "harborRef": format!("project:{name}"), "public": false, "ownerName": "admin", "repoCount": 3,
                           "createdAt": "2023-04-03T06:00:00.000Z", "updatedAt": "2023-04-03T06:00:00.000Z"},
            "relations": {}
        }),
    )
}

/// The repository entity written for `harbor_json::repository(full_name, artifacts, pulls)`.
fn repository_entity(stack: &Stack, full_name: &str, artifacts: i64, pulls: i64) -> PortWrite {
    let (project, name) = full_name.split_once('/').unwrap();
    upsert(
        "harborRepository",
        json!({
            "identifier": full_name, "title": full_name,
            "properties": {
                "harborInstance": "default", "harborRef": format!("repository:{full_name}"), "artifactCount": artifacts, "pullCount": pulls, "description": "",
                "createdAt": "2023-04-03T06:04:46.771Z", "updatedAt": "2023-04-03T06:12:55.123Z",
                "url": format!("{}/harbor/projects/2/repositories/{}", stack.harbor.url(), name.replace('/', "%2F")),
            },
            "relations": {"project": project}
        }),
    )
}

/// The artifact entity written for `harbor_json::artifact(full_name, digest, tags, None)`.
fn artifact_entity(stack: &Stack, full_name: &str, digest: &str, tags: &[&str]) -> PortWrite {
    let name = full_name.split_once('/').unwrap().1.replace('/', "%2F");
    let id = format!("{full_name}@{digest}");
    let title = tags
        .first()
        .map_or(id.clone(), |t| format!("{full_name}:{t}"));
    upsert(
        "harborArtifact",
        json!({
            "identifier": id, "title": title,
            "properties": {
                "harborInstance": "default", "harborRef": format!("artifact:{id}"), "harborTags": tags,
                "digest": digest, "tags": tags, "labels": [], "size": 3_370_706,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json", "type": "IMAGE",
                "pushTime": "2023-04-03T06:04:46.771Z", "pullTime": null,
                "scanStatus": null, "scanSeverity": null, "vulnerabilities": null, "scanner": null,
                "url": format!("{}/harbor/projects/2/repositories/{name}/artifacts-tab/artifacts/{digest}", stack.harbor.url()),
            },
            "relations": {"repository": full_name}
        }),
    )
}

/// Port holds this integration's entity of `blueprint` (`harborArtifact`, ...) for `identifier`,
/// as an earlier refresh wrote it.
fn held(stack: &Stack, blueprint: &str, identifier: &str) {
    let kind = blueprint["harbor".len()..].to_lowercase();
    stack.port.holds(
        blueprint,
        json!({"identifier": identifier, "title": identifier, "relations": {},
               "properties": {"harborInstance": "default", "harborRef": format!("{kind}:{identifier}")}}),
    );
}

/// Refreshes of different things run side by side: their writes arrive in any order.
fn sorted(mut writes: Vec<PortWrite>) -> Vec<PortWrite> {
    writes.sort_by(|a, b| {
        (&a.blueprint, a.action, &a.identifier).cmp(&(&b.blueprint, b.action, &b.identifier))
    });
    writes
}

/// Stops the worker, then checks that nothing was left on the queue unacked or parked.
async fn assert_all_acked(stack: Stack) {
    let Stack { worker, broker, .. } = stack;
    worker.stop().await;
    assert_eq!(broker.work_ready().await, 0, "an event was not acked");
    assert_eq!(broker.parked_ready().await, 0, "an event was parked");
}

#[tokio::test]
async fn push_event_upserts_project_repository_and_artifact() {
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack.harbor.holds(&repo, &digest, &["latest"], None).await;

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(3, WAIT).await;

    assert_eq!(
        sorted(writes),
        sorted(vec![
            project_entity("harbor"),
            repository_entity(&stack, "harbor/alpine", 1, 0),
            artifact_entity(&stack, "harbor/alpine", &digest, &["latest"]),
        ])
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn pull_event_refreshes_the_pull_count_and_pull_time() {
    let stack = Stack::start().await;
    let body = samples::load("pull_artifact.default.harbor-unit-test.json");
    let (repo, digest) = samples::subject(&body);
    stack
        .harbor
        .project("library", harbor_json::project("library"))
        .await;
    stack
        .harbor
        .repository(&repo, harbor_json::repository(&repo, 1, 42))
        .await;
    let mut artifact = harbor_json::artifact(&repo, &digest, &["1.36"], None);
    artifact["pull_time"] = json!("2023-03-06T06:08:43.000Z");
    stack.harbor.artifact(&repo, &digest, artifact).await;

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(2, WAIT).await;

    let mut expected_artifact = artifact_entity(&stack, &repo, &digest, &["1.36"]);
    expected_artifact.entity.as_mut().unwrap()["properties"]["pullTime"] =
        json!("2023-03-06T06:08:43.000Z");
    assert_eq!(
        sorted(writes),
        sorted(vec![
            repository_entity(&stack, &repo, 1, 42),
            expected_artifact
        ])
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn delete_event_deletes_the_artifact_and_refreshes_the_repository() {
    let stack = Stack::start().await;
    let body = samples::load("delete_artifact.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack
        .harbor
        .project("harbor", harbor_json::project("harbor"))
        .await;
    stack
        .harbor
        .repository(&repo, harbor_json::repository(&repo, 0, 7))
        .await;
    stack.harbor.artifact_gone(&repo, &digest).await;
    held(&stack, "harborArtifact", &format!("{repo}@{digest}"));

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(3, WAIT).await;

    assert_eq!(
        sorted(writes),
        sorted(vec![
            project_entity("harbor"),
            repository_entity(&stack, &repo, 0, 7),
            delete("harborArtifact", &format!("{repo}@{digest}")),
        ])
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn scan_completed_event_writes_vulnerability_counts_without_reading_the_repository() {
    let stack = Stack::start().await;
    let body = samples::load("scanning_completed.default.reconstructed-head.json");
    let (repo, digest) = samples::subject(&body);
    let scan = harbor_json::trivy_overview(1, 2, 6, 4);
    stack
        .harbor
        .artifact(
            &repo,
            &digest,
            harbor_json::artifact(&repo, &digest, &["1.2.3"], Some(scan)),
        )
        .await;

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(1, WAIT).await;

    let mut expected = artifact_entity(&stack, &repo, &digest, &["1.2.3"]);
    let properties = &mut expected.entity.as_mut().unwrap()["properties"];
    properties["scanStatus"] = json!("Success");
    properties["scanSeverity"] = json!("Critical");
    properties["scanner"] = json!("Trivy v0.37.2");
    properties["vulnerabilities"] = json!({"critical": 1, "high": 2, "medium": 6, "low": 4, "unknown": 0, "total": 13, "fixable": 6});
    assert_eq!(writes, [expected]);
    let asked = stack.harbor.requests().await;
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(asked[0].contains("/artifacts/"), "{asked:?}");
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn cloudevents_push_is_synced_like_a_default_push() {
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.cloudevents.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack.harbor.holds(&repo, &digest, &["3.17"], None).await;

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(3, WAIT).await;

    assert_eq!(
        sorted(writes),
        sorted(vec![
            project_entity("harbor"),
            repository_entity(&stack, &repo, 1, 0),
            artifact_entity(&stack, &repo, &digest, &["3.17"]),
        ])
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn nested_repository_names_are_double_encoded_for_harbor_and_kept_whole_for_port() {
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.default.reconstructed-head.json");
    let (repo, digest) = samples::subject(&body);
    assert_eq!(repo, "myproj/team/api");
    // The fake only answers `team%252Fapi`; any other encoding would get no answer.
    stack.harbor.holds(&repo, &digest, &["1.2.3"], None).await;

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(3, WAIT).await;

    assert_eq!(
        sorted(writes),
        sorted(vec![
            project_entity("myproj"),
            repository_entity(&stack, "myproj/team/api", 1, 0),
            artifact_entity(&stack, "myproj/team/api", &digest, &["1.2.3"]),
        ])
    );
    let asked = stack.harbor.requests().await;
    assert!(
        asked
            .iter()
            .any(|p| p == "/api/v2.0/projects/myproj/repositories/team%252Fapi"),
        "{asked:?}"
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn unknown_event_types_are_acked_without_any_call() {
    let stack = Stack::start().await;
    stack
        .webhook(br#"{"type":"ROBOT_CREATED","occur_at":1,"event_data":{}}"#)
        .await;
    stack
        .webhook(br#"{"specversion":"1.0","id":"x-1","type":"harbor.robot.created","data":{}}"#)
        .await;

    stack.wait_for_outcome("ignored", 2).await;

    assert!(stack.harbor.requests().await.is_empty());
    assert_eq!(stack.port.request_count().await, 0);
    let metrics = stack.worker.metrics().await;
    assert!(
        metrics.contains(
            r#"harbor_worker_events_total{harbor="default",event_type="other",outcome="ignored"} 2"#
        ),
        "{metrics}"
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn tag_retention_refreshes_the_repositories_it_names() {
    let stack = Stack::start().await;
    stack
        .harbor
        .project("harbor", harbor_json::project("harbor"))
        .await;
    stack
        .harbor
        .repository(
            "harbor/alpine",
            harbor_json::repository("harbor/alpine", 2, 9),
        )
        .await;

    stack
        .webhook(&samples::load("tag_retention.default.docs.json"))
        .await;
    let writes = stack.port.wait_for_writes(2, WAIT).await;

    assert_eq!(
        sorted(writes),
        sorted(vec![
            project_entity("harbor"),
            repository_entity(&stack, "harbor/alpine", 2, 9)
        ])
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn an_artifact_missing_from_the_list_is_deleted_only_when_harbor_answers_404_for_it() {
    let stack = Stack::start().await;
    let repository = "harbor/alpine";
    stack.harbor.project_and_repository(repository).await;
    let (listed, missed, gone) = (samples::digest(1), samples::digest(2), samples::digest(3));
    // Harbor pages by offset: an artifact deleted from an earlier page while the list is read
    // moves `missed` out of the pages read. Asked for alone, Harbor has it; `gone` it has not.
    stack
        .harbor
        .artifacts(
            repository,
            vec![harbor_json::artifact(repository, &listed, &["v1"], None)],
        )
        .await;
    stack
        .harbor
        .artifact(
            repository,
            &missed,
            harbor_json::artifact(repository, &missed, &["v2"], None),
        )
        .await;
    stack.harbor.artifact_gone(repository, &gone).await;
    for digest in [&listed, &missed, &gone] {
        held(&stack, "harborArtifact", &format!("{repository}@{digest}"));
    }

    // TAG_RETENTION refreshes every artifact of the repository it names.
    stack
        .webhook(&samples::load("tag_retention.default.docs.json"))
        .await;
    stack.wait_for_outcome("synced", 1).await;

    let writes = stack.port.writes().await;
    let artifacts = |action: &str| -> Vec<String> {
        let mut found: Vec<String> = writes
            .iter()
            .filter(|w| w.blueprint == "harborArtifact" && w.action == action)
            .map(|w| w.identifier.clone())
            .collect();
        found.sort();
        found
    };
    let id = |digest: &str| format!("{repository}@{digest}");
    let mut upserted = vec![id(&listed), id(&missed)];
    upserted.sort();
    assert_eq!(artifacts("upsert"), upserted);
    assert_eq!(artifacts("delete"), [id(&gone)]);
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn a_refresh_of_every_artifact_and_of_moved_tags_writes_each_artifact_once() {
    let stack = Stack::start().await;
    let repository = "harbor/alpine";
    stack.harbor.project_and_repository(repository).await;
    let (old, new) = (samples::digest(1), samples::digest(2));
    // `latest` moved from `old` to `new`; Port still shows it on `old`. Reads of `new` are slow,
    // so that what arrives during the first refresh is folded into a second one.
    let artifact =
        |digest: &str, tags: &[&str]| harbor_json::artifact(repository, digest, tags, None);
    stack
        .harbor
        .artifacts(
            repository,
            vec![artifact(&old, &[]), artifact(&new, &["latest"])],
        )
        .await;
    stack
        .harbor
        .artifact(repository, &old, artifact(&old, &[]))
        .await;
    stack
        .harbor
        .artifact_answering(
            repository,
            &new,
            ResponseTemplate::new(200)
                .set_body_json(artifact(&new, &["latest"]))
                .set_delay(Duration::from_millis(800)),
        )
        .await;
    stack.port.holds(
        "harborArtifact",
        json!({"identifier": format!("{repository}@{old}"), "title": "old", "relations": {},
               "properties": {"harborInstance": "default", "harborRef": format!("artifact:{repository}@{old}"),
                              "harborTags": ["latest"]}}),
    );

    let mut scan: Value = serde_json::from_slice(&samples::push(repository, &new)).unwrap();
    scan["type"] = json!("SCANNING_COMPLETED");
    stack.webhook(&serde_json::to_vec(&scan).unwrap()).await;
    // While the scan's refresh reads: every artifact (retention), and the moved tag (the push).
    stack
        .webhook(&samples::load("tag_retention.default.docs.json"))
        .await;
    stack.webhook(&samples::push(repository, &new)).await;
    stack.wait_for_outcome("synced", 3).await;
    let metrics = stack.worker.metrics().await;
    assert!(
        metrics.contains("harbor_worker_events_coalesced_total 1"),
        "the two were not folded into one refresh: {metrics}"
    );

    let requests = stack.port.server.received_requests().await.unwrap();
    for bulk in requests.iter().filter(|r| r.url.path().ends_with("/bulk")) {
        let body: Value = serde_json::from_slice(&bulk.body).unwrap();
        let mut identifiers: Vec<&str> = body["entities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["identifier"].as_str().unwrap())
            .collect();
        let count = identifiers.len();
        identifiers.sort_unstable();
        identifiers.dedup();
        assert_eq!(
            identifiers.len(),
            count,
            "an entity twice in one bulk write: {body}"
        );
    }
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn replication_refreshes_the_copied_repositories_at_both_ends() {
    let stack = Stack::start().await;
    // Pulled from Docker Hub's library/alpine into myproj/alpine: only the latter is here.
    stack
        .harbor
        .project("myproj", harbor_json::project("myproj"))
        .await;
    stack
        .harbor
        .repository(
            "myproj/alpine",
            harbor_json::repository("myproj/alpine", 1, 0),
        )
        .await;
    stack.harbor.repository_gone("library/alpine").await;
    held(&stack, "harborRepository", "library/alpine");
    held(&stack, "harborProject", "library");

    stack
        .webhook(&samples::load(
            "replication.default.reconstructed-head.json",
        ))
        .await;
    let writes = stack.port.wait_for_writes(4, WAIT).await;

    // Harbor has no project library either: its entity goes too.
    assert_eq!(
        sorted(writes),
        sorted(vec![
            delete("harborRepository", "library/alpine"),
            delete("harborProject", "library"),
            project_entity("myproj"),
            repository_entity(&stack, "myproj/alpine", 1, 0),
        ])
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn quota_events_update_the_project() {
    let stack = Stack::start().await;
    stack
        .harbor
        .project("myproj", harbor_json::project("myproj"))
        .await;

    stack
        .webhook(&samples::load(
            "quota_exceed.default.reconstructed-head.json",
        ))
        .await;
    stack
        .webhook(&samples::load("quota_warning.default.docs.json"))
        .await;
    stack.wait_for_outcome("synced", 2).await;

    let writes = stack.port.writes().await;
    assert!(writes.contains(&project_entity("myproj")), "{writes:?}");
    let asked = stack.harbor.requests().await;
    assert!(
        asked
            .iter()
            .all(|p| p.starts_with("/api/v2.0/projects/") && !p.contains("repositories")),
        "{asked:?}"
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn an_event_missing_its_repository_is_skipped_and_acked() {
    let stack = Stack::start().await;
    stack
        .webhook(br#"{"type":"PUSH_ARTIFACT","occur_at":1,"event_data":{"resources":[{"digest":"sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4"}]}}"#)
        .await;
    stack.wait_for_outcome("skipped", 1).await;
    assert!(stack.harbor.requests().await.is_empty());
    assert_eq!(stack.port.request_count().await, 0);
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn port_429_is_retried_and_the_entity_written() {
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack.harbor.holds(&repo, &digest, &["latest"], None).await;
    let id = format!("{repo}@{digest}");
    stack
        .port
        .fail_upsert(&id, 429, Some(Duration::from_secs(1)), 1)
        .await;

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(4, WAIT).await;

    let expected = artifact_entity(&stack, &repo, &digest, &["latest"]);
    let attempts: Vec<&PortWrite> = writes.iter().filter(|w| w.identifier == id).collect();
    assert_eq!(attempts, [&expected, &expected], "one 429, then the retry");
    stack.wait_for_outcome("synced", 1).await;
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn port_422_parks_the_event_with_its_reason_and_the_queue_keeps_flowing() {
    let stack = Stack::start().await;
    let refused = samples::load("push_artifact.default.docs.json");
    let (refused_repo, refused_digest) = samples::subject(&refused);
    stack
        .harbor
        .holds(&refused_repo, &refused_digest, &["latest"], None)
        .await;
    stack
        .port
        .fail_upsert(&format!("{refused_repo}@{refused_digest}"), 422, None, 0)
        .await;
    let fine = samples::load("push_artifact.default.reconstructed-head.json");
    let (fine_repo, fine_digest) = samples::subject(&fine);
    stack
        .harbor
        .holds(&fine_repo, &fine_digest, &["1.2.3"], None)
        .await;

    stack.webhook(&refused).await;
    stack.wait_for_outcome("parked", 1).await;
    stack.webhook(&fine).await;
    stack.wait_for_outcome("synced", 1).await;

    let writes = stack.port.writes().await;
    assert!(writes.contains(&artifact_entity(
        &stack,
        &fine_repo,
        &fine_digest,
        &["1.2.3"]
    )));
    let parked = stack.broker.take_parked().await.unwrap();
    assert_eq!(parked.delivery.data, refused, "the original body is parked");
    assert_eq!(parked.delivery.routing_key.as_str(), "PUSH_ARTIFACT");
    let headers = parked
        .delivery
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .clone();
    let Some(AMQPValue::LongString(reason)) = headers.get("x-failure-reason") else {
        panic!("{headers:?}")
    };
    assert!(reason.to_string().contains("422"), "{reason}");
    assert!(matches!(headers.get("x-attempts"), Some(AMQPValue::LongLongInt(n)) if *n >= 1));
    assert!(headers.contains_key("x-failed-at"));
    assert!(
        headers.contains_key("x-request-id"),
        "the original headers are kept"
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn harbor_404_on_push_deletes_the_artifact_entity() {
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack
        .harbor
        .project("harbor", harbor_json::project("harbor"))
        .await;
    stack
        .harbor
        .repository(&repo, harbor_json::repository(&repo, 0, 0))
        .await;
    stack.harbor.artifact_gone(&repo, &digest).await;
    held(&stack, "harborArtifact", &format!("{repo}@{digest}"));

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(3, WAIT).await;

    assert!(
        writes.contains(&delete("harborArtifact", &format!("{repo}@{digest}"))),
        "{writes:?}"
    );
    assert_all_acked(stack).await;
}

#[tokio::test]
async fn a_repository_that_is_gone_deletes_its_entity_and_its_artifacts() {
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack.harbor.repository_gone(&repo).await;
    stack.harbor.artifact_gone(&repo, &digest).await;
    held(&stack, "harborArtifact", &format!("{repo}@{digest}"));
    held(&stack, "harborRepository", &repo);
    held(&stack, "harborProject", "harbor");

    stack.webhook(&body).await;
    let writes = stack.port.wait_for_writes(3, WAIT).await;

    // The project answers 404 too (the fake Harbor holds nothing): its entity goes as well.
    assert_eq!(
        sorted(writes),
        sorted(vec![
            delete("harborArtifact", &format!("{repo}@{digest}")),
            delete("harborRepository", &repo),
            delete("harborProject", "harbor"),
        ])
    );
    assert_all_acked(stack).await;
}
