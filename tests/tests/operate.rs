//! The operator's commands: backlog, parked list, parked replay.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use harbor_sync_tests::apps::Stack;
use harbor_sync_tests::samples;
use harbor_worker::backlog::backlog;
use harbor_worker::parked::{self, Selection};
use lapin::BasicProperties;
use sha2::Digest as _;

const REPOSITORY: &str = "harbor/alpine";
const WAIT: Duration = Duration::from_secs(15);

/// A stack where Port refuses (422) the first upsert of each of these artifacts, so that their
/// events are parked; later upserts succeed.
async fn with_parked(digests: &[String]) -> Stack {
    let stack = Stack::start().await;
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;
    for digest in digests {
        stack
            .port
            .fail_upsert(&format!("{REPOSITORY}@{digest}"), 422, None, 1)
            .await;
        stack.webhook(&samples::push(REPOSITORY, digest)).await;
    }
    stack
        .broker
        .wait_ready(
            &stack.broker.topology().parked_queue(),
            digests.len() as u32,
            WAIT,
        )
        .await;
    stack
}

#[tokio::test]
async fn parked_list_shows_what_failed_when_and_why_and_removes_nothing() {
    let digest = samples::digest(1);
    let stack = with_parked(std::slice::from_ref(&digest)).await;

    let listed = parked::list(&stack.broker.amqp, 10).await.unwrap();

    assert_eq!(listed.len(), 1);
    let event = &listed[0];
    assert_eq!(event.event_type, "PUSH_ARTIFACT");
    assert_eq!(
        event.message_id.as_deref(),
        Some(hex::encode(sha2::Sha256::digest(samples::push(REPOSITORY, &digest))).as_str())
    );
    assert!(
        event.reason.as_deref().is_some_and(|r| r.contains("422")),
        "{event:?}"
    );
    assert!(event.failed_at.is_some() && event.request_id.is_some());
    // One refresh: Port's 422 is not worth another.
    assert_eq!(event.attempts, Some(1), "{event:?}");
    // Listing removes nothing: the message comes back (a quorum queue returns it a moment
    // after the listing's channel closed).
    let parked = stack.broker.topology().parked_queue();
    stack.broker.wait_ready(&parked, 1, WAIT).await;
}

#[tokio::test]
async fn replay_all_brings_parked_events_to_port_and_empties_the_parked_queue() {
    let digests = [samples::digest(1), samples::digest(2)];
    let stack = with_parked(&digests).await;

    let done = parked::replay(&stack.broker.amqp, &Selection::All, None)
        .await
        .unwrap();

    assert_eq!((done.replayed, done.kept), (2, 0));
    stack.wait_for_outcome("synced", 2).await;
    let written = stack.port.writes().await;
    for digest in &digests {
        let id = format!("{REPOSITORY}@{digest}");
        // Refused once, then written after the replay (and maybe again: the fake Harbor gives
        // both artifacts the same tag, so each one's push rewrites the other as Harbor has it).
        let attempts = written.iter().filter(|w| w.identifier == id).count();
        assert!(
            attempts >= 2,
            "refused once, then written after the replay: {attempts}"
        );
    }
    assert_eq!(stack.broker.parked_ready().await, 0);
}

#[tokio::test]
async fn replay_by_id_moves_only_the_named_event() {
    let digests = [samples::digest(1), samples::digest(2)];
    let stack = with_parked(&digests).await;
    let listed = parked::list(&stack.broker.amqp, 10).await.unwrap();
    let first = listed[0].message_id.clone().unwrap();

    let done = parked::replay(
        &stack.broker.amqp,
        &Selection::Ids(vec![first, "nope".into()]),
        None,
    )
    .await
    .unwrap();

    assert_eq!((done.replayed, done.kept), (1, 1));
    assert_eq!(done.not_found, ["nope"]);
    stack.wait_for_outcome("synced", 1).await;
    stack
        .broker
        .wait_ready(&stack.broker.topology().parked_queue(), 1, WAIT)
        .await;
    let unknown = parked::replay(
        &stack.broker.amqp,
        &Selection::Ids(vec!["nope".into()]),
        None,
    )
    .await;
    assert!(
        unknown.is_err(),
        "asking only for an unknown id is an error"
    );
    stack
        .broker
        .wait_ready(&stack.broker.topology().parked_queue(), 1, WAIT)
        .await;
}

#[tokio::test]
async fn backlog_counts_ready_unacked_and_parked_events() {
    let digest = samples::digest(1);
    let stack = with_parked(std::slice::from_ref(&digest)).await;
    let Stack { worker, broker, .. } = stack;
    worker.stop().await;
    for i in 0..3 {
        broker
            .publish(
                "PUSH_ARTIFACT",
                &samples::push(REPOSITORY, &samples::digest(10 + i)),
                BasicProperties::default(),
            )
            .await;
    }
    let management: url::Url = std::env::var("RABBITMQ_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".into())
        .parse()
        .unwrap();

    let counts = backlog(&broker.amqp, None).await.unwrap();
    assert_eq!(counts.len(), 2);
    assert_eq!(
        (counts[0].queue.clone(), counts[0].ready, counts[0].unacked),
        (format!("{}.*", broker.topology().queue()), 3, None)
    );
    assert_eq!((counts[1].ready, counts[1].consumers), (1, 0));
    let counts = backlog(&broker.amqp, Some(&management)).await.unwrap();
    assert_eq!(counts[0].unacked, Some(0));
    // The form KEDA takes (and deploy/k8s/secret.yaml ships): credentials and the vhost in it.
    let mut keda = management.clone();
    keda.set_username("guest").unwrap();
    keda.set_password(Some("guest")).unwrap();
    keda.set_path("/%2F");
    let counts = backlog(&broker.amqp, Some(&keda)).await.unwrap();
    assert_eq!(counts[0].unacked, Some(0));
    let json = serde_json::to_value(&counts).unwrap();
    assert_eq!(json[1]["queue"], broker.topology().parked_queue());
}

#[tokio::test]
async fn an_earlier_versions_single_work_queue_is_unbound_and_its_events_replayed() {
    let stack = Stack::start().await;
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;
    let topology = stack.broker.topology().clone();
    let old = topology.queue().to_owned();
    // As an upgrade finds it: the old queue, bound to the exchange, holding two events.
    let connection = harbor_shared::broker::connect(&stack.broker.amqp.url, "old version")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(old.as_str().into(), durable, args)
        .await
        .unwrap();
    channel
        .queue_bind(
            old.as_str().into(),
            topology.exchange().into(),
            "#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let waiting = [samples::digest(21), samples::digest(22)];
    for digest in &waiting {
        channel
            .basic_publish(
                "".into(),
                old.as_str().into(),
                Default::default(),
                &samples::push(REPOSITORY, digest),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    // The worker's next connection unbinds it: new events no longer land there.
    harbor_sync_tests::rabbit::close_connections(&format!("harbor-worker ({old})"), 1).await;
    harbor_sync_tests::wait_until("the worker back", WAIT, || async {
        reqwest::get(format!("{}/readyz", stack.worker.base))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let unbound = || async {
        stack
            .webhook(&samples::push(REPOSITORY, &samples::digest(23)))
            .await;
        stack.broker.ready(&old).await == 2
    };
    harbor_sync_tests::wait_until("the old queue unbound", WAIT, unbound).await;

    let done = parked::replay(&stack.broker.amqp, &Selection::All, Some(&old))
        .await
        .unwrap();
    assert_eq!(done.replayed, 2);
    let ids: Vec<String> = waiting
        .iter()
        .map(|d| format!("{REPOSITORY}@{d}"))
        .collect();
    harbor_sync_tests::wait_until("the old events in Port", WAIT, || async {
        let writes = stack.port.writes().await;
        ids.iter()
            .all(|id| writes.iter().any(|w| &w.identifier == id))
    })
    .await;
    assert_eq!(stack.broker.ready(&old).await, 0);
    channel
        .queue_delete(old.as_str().into(), Default::default())
        .await
        .unwrap();
}
