//! `resync`: Port made to match Harbor after the webhooks missed things.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use harbor_sync_tests::apps::{TestSandbox, TestWorker, start_sandbox};
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::samples;
use harbor_sync_tests::sandbox::PayloadFormat;
use harbor_sync_tests::wait_until;
use harbor_worker::clients::http_client;
use harbor_worker::resync::{Summary, resync};
use harbor_worker::retry::RetryPolicy;
use harbor_worker::startup::handler;
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
    let stale = format!("library/old@{}", samples::digest(99));
    sandbox
        .put_entity("harborArtifact", json!({"identifier": stale, "title": "old", "properties": {}, "relations": {"repository": "library/old"}}))
        .await;
    sandbox
        .put_entity(
            "harborProject",
            json!({"identifier": "ghost", "title": "ghost", "properties": {}, "relations": {}}),
        )
        .await;
    sandbox
}

#[tokio::test]
async fn resync_upserts_everything_harbor_has_and_deletes_what_it_no_longer_has() {
    let sandbox = drifted().await;
    let settings = sandbox.worker_settings(&TestTopology::new().await.amqp);
    let http = http_client(Duration::from_secs(5)).unwrap();
    let handler = handler(
        &settings.harbor,
        &settings.port,
        http,
        RetryPolicy::with_budget(Duration::from_secs(5)),
    );

    let summary = resync(&handler).await;

    // 2 projects, 2 repositories, 106 artifacts; the stale artifact, its repository and the
    // ghost project deleted.
    assert_eq!(
        summary,
        Summary {
            seen: 110,
            upserted: 110,
            deleted: 3,
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
    assert_eq!(projects, ["library", "team"]);

    // A second run finds nothing to delete.
    let again = resync(&handler).await;
    assert_eq!((again.deleted, again.failed), (0, 0));
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
