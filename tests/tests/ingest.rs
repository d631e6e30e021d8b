//! harbor-ingest against the real broker: what is answered, and what reaches the queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use harbor_shared::broker::AmqpSettings;
use harbor_shared::broker::BrokerUrl;
use harbor_sync_tests::apps::{SECRET, TestIngest, ingest_settings};
use harbor_sync_tests::proxy::StallingProxy;
use harbor_sync_tests::rabbit::{TestTopology, close_connections};
use harbor_sync_tests::samples;
use lapin::types::AMQPValue;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn header_string(headers: &lapin::types::FieldTable, key: &str) -> String {
    match headers.inner().get(key) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("header {key}: {other:?}"),
    }
}

#[tokio::test]
async fn an_accepted_webhook_is_on_the_queue_with_its_id_routing_key_and_headers() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let body = samples::load("push_artifact.default.docs.json");

    let response = ingest.post(&body, Some(SECRET)).await;
    assert_eq!(response.status(), 202);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let answer: Value = response.json().await.unwrap();
    let message_id = hex::encode(Sha256::digest(&body));
    assert_eq!(
        answer,
        json!({"status": "accepted", "message_id": message_id})
    );

    // A 202 means the broker confirmed it: it is on the queue now, not eventually.
    assert_eq!(broker.work_ready().await, 1);
    let delivery = &broker.take_work().await.unwrap();
    assert_eq!(delivery.data, body, "the raw bytes travel unchanged");
    assert_eq!(delivery.routing_key.as_str(), "PUSH_ARTIFACT");
    let properties = &delivery.properties;
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(
        properties.message_id().as_ref().unwrap().as_str(),
        message_id
    );
    assert!(properties.timestamp().is_some());
    let headers = properties.headers().as_ref().unwrap();
    assert_eq!(header_string(headers, "x-payload-format"), "default");
    assert_eq!(header_string(headers, "x-request-id"), request_id);
    assert!(header_string(headers, "x-received-at").ends_with('Z'));
    assert_eq!(
        header_string(headers, "x-subject"),
        "harbor",
        "routed by its project"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn a_cloudevents_webhook_is_routed_by_its_harbor_type_with_its_event_id() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let body = samples::load("scanning_failed.cloudevents.docs.json");

    let response = ingest.post(&body, Some(&format!("Bearer {SECRET}"))).await;
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["message_id"], "bdfe1de3-c069-4efc-b4f4-1a75c9a148c4");

    let delivery = broker.take_work().await.unwrap();
    assert_eq!(delivery.routing_key.as_str(), "SCANNING_FAILED");
    let headers = delivery.properties.headers().as_ref().unwrap();
    assert_eq!(header_string(headers, "x-payload-format"), "cloudevents");
    assert_eq!(
        delivery.properties.message_id().as_ref().unwrap().as_str(),
        "bdfe1de3-c069-4efc-b4f4-1a75c9a148c4"
    );
}

#[tokio::test]
async fn every_authorization_form_and_every_rotated_secret_is_accepted() {
    let broker = TestTopology::new().await;
    let mut settings = ingest_settings(&broker.amqp);
    settings.endpoints[0].auth = harbor_ingest::auth::Authenticator::new(
        harbor_ingest::auth::AuthMode::Auto,
        vec!["old-secret".into(), "new-secret".into()],
    )
    .unwrap();
    let ingest = TestIngest::start(settings, true).await;
    let body = samples::load("pull_artifact.default.harbor-unit-test.json");
    let signature =
        |secret: &str| hex::encode(harbor_ingest::auth::sign(&secret.to_owned().into(), &body));
    let forms = [
        "old-secret".to_owned(),
        "Harbor-Secret new-secret".to_owned(),
        "Bearer old-secret".to_owned(),
        format!("Harbor-Secret {}", signature("new-secret")),
        format!("sha256={}", signature("old-secret")),
    ];
    for form in &forms {
        assert_eq!(ingest.post(&body, Some(form)).await.status(), 202, "{form}");
    }
    assert_eq!(broker.work_ready().await, forms.len() as u32);
}

#[tokio::test]
async fn refused_webhooks_publish_nothing_and_say_why_in_json() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let event = samples::load("push_artifact.default.docs.json");
    let huge = vec![b' '; 1_048_577];
    let cases: [(&[u8], Option<&str>, u16, &str); 7] = [
        (&event, None, 401, "unauthorized"),
        (&event, Some("wrong-secret"), 401, "unauthorized"),
        (
            &event,
            Some(&format!("sha256={}", "0".repeat(64))),
            401,
            "unauthorized",
        ),
        (b"this is not json", Some(SECRET), 400, "invalid_json"),
        (br#"{"event_data": {}}"#, Some(SECRET), 400, "invalid_event"),
        (br#"{"type": 42}"#, Some(SECRET), 400, "invalid_event"),
        (&huge, Some(SECRET), 413, "payload_too_large"),
    ];
    for (body, authorization, status, code) in cases {
        let response = ingest.post(body, authorization).await;
        assert_eq!(response.status(), status, "{code}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], code);
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!answer.to_string().contains(SECRET));
    }
    // Unauthenticated garbage is refused as unauthenticated, before it is parsed.
    assert_eq!(ingest.post(b"garbage", Some("wrong")).await.status(), 401);
    assert_eq!(broker.work_ready().await, 0);
}

#[tokio::test]
async fn an_event_naming_one_resource_is_refused_past_16_kib_and_a_retention_list_is_not() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let pull = samples::load("pull_artifact.default.docs.json");
    let retention = samples::load("tag_retention.default.docs.json");
    let limit = harbor_shared::event::SINGLE_EVENT_MAX_BYTES;

    let answer = ingest
        .post(&samples::padded(&pull, limit + 1), Some(SECRET))
        .await;
    assert_eq!(answer.status(), 413);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["error"], "payload_too_large");
    assert_eq!(broker.work_ready().await, 0);

    let at_limit = ingest
        .post(&samples::padded(&pull, limit), Some(SECRET))
        .await;
    assert_eq!(at_limit.status(), 202);
    // A retention of a few thousand artifacts is that long, and real.
    let long = ingest
        .post(&samples::padded(&retention, 500_000), Some(SECRET))
        .await;
    assert_eq!(long.status(), 202);
    assert_eq!(broker.work_ready().await, 2);
}

#[tokio::test]
async fn an_unroutable_event_is_answered_503_never_202() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    broker.delete_work_queues().await;

    let response = ingest
        .post(
            &samples::load("push_artifact.default.docs.json"),
            Some(SECRET),
        )
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "broker_unavailable");
}

#[tokio::test]
async fn a_full_queue_nacks_and_the_answer_is_503_never_202() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let body = samples::load("push_artifact.default.docs.json");
    broker.limit_work_queues(1).await;

    // A quorum queue enforces its limit a little late; within a few publishes it refuses.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = ingest.post(&body, Some(SECRET)).await;
        if response.status() == 503 {
            assert_eq!(response.headers()["retry-after"], "5");
        }
        statuses.push(response.status().as_u16());
    }
    assert!(
        statuses.contains(&503),
        "the broker never refused: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 503),
        "{statuses:?}"
    );
    let accepted = statuses.iter().filter(|s| **s == 202).count() as u32;
    assert_eq!(
        broker.work_ready().await,
        accepted,
        "every 202 is on the queue, no 503 is"
    );
    // A nack is not a broken connection: once there is room, the next publish is accepted.
    while broker.take_work().await.is_some() {}
    assert_eq!(ingest.post(&body, Some(SECRET)).await.status(), 202);
}

#[tokio::test]
async fn without_a_broker_webhooks_get_503_at_once_and_readyz_says_not_ready() {
    let broker = TestTopology::new().await;
    let mut settings = ingest_settings(&broker.amqp);
    // Nothing listens there.
    settings.amqp = AmqpSettings {
        url: BrokerUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap(),
        topology: broker.amqp.topology.clone(),
    };
    let ingest = TestIngest::start(settings, false).await;

    let readyz = reqwest::get(format!("{}/readyz", ingest.base))
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let healthz = reqwest::get(format!("{}/healthz", ingest.base))
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    let started = Instant::now();
    let response = ingest
        .post(
            &samples::load("push_artifact.default.docs.json"),
            Some(SECRET),
        )
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "503 must not wait for a broker"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn the_ingest_reconnects_by_itself_after_its_connection_is_closed() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let body = samples::load("push_artifact.default.docs.json");
    assert_eq!(ingest.post(&body, Some(SECRET)).await.status(), 202);

    let closed =
        close_connections(&format!("harbor-ingest ({})", broker.topology().queue()), 1).await;
    assert_eq!(closed, 1);

    post_until_accepted(&ingest, &body).await;
    assert_eq!(broker.work_ready().await, 2, "both 202s are on the queue");
}

/// Posts `body` until it is accepted: until the ingest has reconnected the answer is 503, then
/// 202. Never a hang, never another status.
async fn post_until_accepted(ingest: &TestIngest, body: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut statuses = vec![ingest.post(body, Some(SECRET)).await.status().as_u16()];
    while statuses.last() != Some(&202) {
        assert!(
            Instant::now() < deadline,
            "no 202 after the reconnect: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        statuses.push(ingest.post(body, Some(SECRET)).await.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 503),
        "{statuses:?}"
    );
}

/// A publish whose confirm never comes (the network to the broker went silent) is answered 503
/// once the confirm timeout has passed, not held; the ingest then drops that connection and
/// accepts again on a new one.
#[tokio::test]
async fn a_confirm_that_never_comes_is_a_503_after_the_timeout_then_the_ingest_reconnects() {
    let broker = TestTopology::new().await;
    let proxy = StallingProxy::start().await;
    let mut settings = ingest_settings(&broker.amqp);
    settings.amqp.url = BrokerUrl::parse(&proxy.amqp_url()).unwrap();
    settings.confirm_timeout = Duration::from_secs(1);
    let ingest = TestIngest::start(settings, true).await;
    let body = samples::load("push_artifact.default.docs.json");
    assert_eq!(ingest.post(&body, Some(SECRET)).await.status(), 202);

    proxy.stall();
    let started = Instant::now();
    let response = ingest.post(&body, Some(SECRET)).await;
    let waited = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
        "answered after {waited:?}, with a confirm timeout of 1 s"
    );

    post_until_accepted(&ingest, &body).await;
    assert_eq!(
        broker.work_ready().await,
        2,
        "both 202s are on the queue; the stalled publish never reached the broker"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn a_stop_does_not_wait_for_an_idle_keep_alive_connection() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    // A client that keeps its connection open between webhooks, as Harbor's does.
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/webhook", ingest.base))
        .header("authorization", SECRET)
        .body(samples::load("push_artifact.default.docs.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.bytes().await.unwrap();

    // Before actix-web 4.14.1 the stop waited for it until the shutdown timeout (25 s here).
    let started = Instant::now();
    ingest.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the stop waited {took:?} for an idle connection"
    );
    drop(client);
}

#[tokio::test]
async fn metrics_count_requests_by_outcome() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    ingest
        .post(
            &samples::load("push_artifact.default.docs.json"),
            Some(SECRET),
        )
        .await;
    ingest.post(b"{}", None).await;
    let metrics = ingest.metrics().await;
    assert!(
        metrics.contains(r#"harbor_ingest_requests_total{harbor="default",outcome="accepted"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"harbor_ingest_requests_total{harbor="default",outcome="unauthorized"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("harbor_ingest_publish_duration_seconds_bucket"),
        "{metrics}"
    );
}
