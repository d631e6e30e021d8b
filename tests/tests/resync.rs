//! `resync`: Port made to match Harbor after the webhooks missed things.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use harbor_sync_tests::apps::{TestSandbox, TestWorker, start_sandbox};
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::samples;
use harbor_sync_tests::sandbox::PayloadFormat;
use harbor_sync_tests::wait_until;
use harbor_worker::clients::http_client;
use harbor_worker::resync::{Summary, resync};
use harbor_worker::startup::{handler, scheduler};
use serde_json::json;

/// A sandbox whose Harbor holds 105 artifacts in library/nginx (more than one page) and one in
/// team/app/api, whose webhooks went nowhere, and whose Port holds things Harbor does not.
async fn drifted() -> TestSandbox {
    let sandbox = start_sandbox("http://127.0.0.1:9/webhook", PayloadFormat::Default).await;
    for i in 0..105 {
        sandbox
            .act("push", "library/nginx", &format!("1.{i}"))
            .await;
    }
    sandbox.act("push", "team/app/api", "v1").await;
    assert!(
        sandbox.ids("harborArtifact").await.is_empty(),
        "no webhook reached Port"
    );
    let ours = |identifier: &str, relations| {
        json!({"identifier": identifier, "title": identifier,
               "properties": {"harborInstance": "default"}, "relations": relations})
    };
    let stale = format!("library/old@{}", samples::digest(99));
    sandbox
        .put_entity(
            "harborArtifact",
            ours(&stale, json!({"repository": "library/old"})),
        )
        .await;
    sandbox
        .put_entity("harborRepository", ours("library/old", json!({})))
        .await;
    sandbox
        .put_entity("harborProject", ours("ghost", json!({})))
        .await;
    // Someone else's entity in our blueprint: not ours to delete.
    sandbox
        .put_entity(
            "harborProject",
            json!({"identifier": "by-hand", "title": "by hand", "properties": {}, "relations": {}}),
        )
        .await;
    sandbox
}

#[tokio::test]
async fn resync_upserts_everything_harbor_has_and_deletes_what_it_no_longer_has() {
    let sandbox = drifted().await;
    let settings = sandbox.worker_settings(&TestTopology::new().await.amqp);
    let http = http_client(Duration::from_secs(5)).unwrap();
    let handler = Arc::new(handler(
        &settings.harbor,
        &settings.port,
        http,
        Duration::ZERO,
        8,
    ));
    let scheduler = scheduler(Arc::clone(&handler), &settings);

    let summary = resync(&handler, &scheduler, settings.retry).await;

    // Harbor's 2 projects and 2 repositories, and the ghost project and the old repository,
    // which Port has and Harbor does not.
    assert_eq!(
        summary,
        Summary {
            projects: 3,
            repositories: 3,
            failed: 0
        }
    );
    let artifacts = sandbox.ids("harborArtifact").await;
    assert_eq!(artifacts.len(), 106);
    assert!(
        artifacts
            .iter()
            .all(|id| id.starts_with("library/nginx@") || id.starts_with("team/app/api@"))
    );
    let mut repositories = sandbox.ids("harborRepository").await;
    repositories.sort();
    assert_eq!(repositories, ["library/nginx", "team/app/api"]);
    let mut projects = sandbox.ids("harborProject").await;
    projects.sort();
    assert_eq!(projects, ["by-hand", "library", "team"]);

    // A second run has nothing of Port's alone to refresh.
    let again = resync(&handler, &scheduler, settings.retry).await;
    assert_eq!(
        again,
        Summary {
            projects: 2,
            repositories: 2,
            failed: 0
        }
    );
}

#[tokio::test]
async fn the_worker_resyncs_periodically_when_asked() {
    let sandbox = drifted().await;
    let broker = TestTopology::new().await;
    let mut settings = sandbox.worker_settings(&broker.amqp);
    settings.resync_interval = Some(Duration::from_secs(1));
    let worker = TestWorker::start(settings).await;

    wait_until("the periodic resync", Duration::from_secs(30), || async {
        sandbox.ids("harborArtifact").await.len() == 106
            && !sandbox
                .ids("harborProject")
                .await
                .contains(&"ghost".to_owned())
    })
    .await;
    worker.stop().await;
}
