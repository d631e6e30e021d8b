//! harbor-worker on its own: messages put straight on the queue, failures of Harbor, Port and
//! the broker connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use harbor_sync_tests::apps::{Stack, outcome_count};
use harbor_sync_tests::fakes::{PORT_TOKEN, PortWrite, harbor_json, harbor_not_found};
use harbor_sync_tests::rabbit::{close_connections, failure_reason};
use harbor_sync_tests::samples;
use harbor_worker::clients::{Http, MAX_ANSWER_BYTES};
use lapin::BasicProperties;
use serde_json::json;
use wiremock::matchers::{header, method, path, path_regex};
use wiremock::{Mock, ResponseTemplate};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn messages_that_are_not_events_are_parked_once_not_redelivered_in_a_loop() {
    let stack = Stack::start().await;
    let props = || BasicProperties::default().with_message_id("poison-1".into());
    stack
        .broker
        .publish("PUSH_ARTIFACT", b"\xff not json at all", props())
        .await;
    stack
        .broker
        .publish("PUSH_ARTIFACT", br#"{"no_type": true}"#, props())
        .await;
    // A string a mebibyte long where a list belongs: the reason quotes its start only.
    let long =
        json!({"type": "PUSH_ARTIFACT", "event_data": {"resources": "oops".repeat(1 << 18)}});
    stack
        .broker
        .publish("PUSH_ARTIFACT", long.to_string().as_bytes(), props())
        .await;

    stack.wait_for_outcome("parked", 3).await;
    let parked = stack.broker.topology().parked_queue();
    stack.broker.wait_ready(&parked, 3, WAIT).await;
    let mut reasons = Vec::new();
    while let Some(message) = stack.broker.take(&parked).await {
        reasons.push(failure_reason(&message));
    }
    assert!(
        reasons.iter().all(|r| r.starts_with("not a Harbor event")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("malformed") && r.contains("oopsoops")),
        "{reasons:?}"
    );
    assert!(reasons.iter().all(|r| r.len() < 1000), "{reasons:?}");
    assert!(stack.harbor.requests().await.is_empty());
    let Stack { worker, broker, .. } = stack;
    worker.stop().await;
    assert_eq!(broker.work_ready().await, 0);
}

#[tokio::test]
async fn the_worker_reconnects_by_itself_and_consumes_again_after_its_connection_is_closed() {
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack.harbor.holds(&repo, &digest, &["latest"], None).await;

    let closed = close_connections(
        &format!("harbor-worker ({})", stack.broker.topology().queue()),
        1,
    )
    .await;
    assert_eq!(closed, 1);
    stack.webhook(&body).await;

    stack.port.wait_for_writes(3, WAIT).await;
    stack.wait_for_outcome("synced", 1).await;
}

/// A stack whose Harbor holds the artifact of the sample SCANNING_COMPLETED event: the event,
/// and its repository.
async fn scanned() -> (Stack, Vec<u8>, String) {
    let stack = Stack::start().await;
    let body = samples::load("scanning_completed.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack
        .harbor
        .artifact(
            &repo,
            &digest,
            harbor_json::artifact(&repo, &digest, &["3.17"], None),
        )
        .await;
    (stack, body, repo)
}

#[tokio::test]
async fn a_port_401_fetches_a_new_token_once_and_retries() {
    let (stack, body, _) = scanned().await;
    // The first upsert (in bulk, as every upsert) finds the token revoked.
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/blueprints/harborArtifact/entities/bulk$"))
        .and(header(
            "authorization",
            format!("Bearer {PORT_TOKEN}").as_str(),
        ))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"ok": false, "error": "token_expired"})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&stack.port.server)
        .await;

    stack.webhook(&body).await;
    stack.wait_for_outcome("synced", 1).await;

    let requests = stack.port.server.received_requests().await.unwrap();
    let paths: Vec<&str> = requests.iter().map(|r| r.url.path()).collect();
    assert_eq!(
        paths,
        [
            "/v1/auth/access_token",
            "/v1/blueprints/harborArtifact/entities/bulk",
            "/v1/auth/access_token",
            "/v1/blueprints/harborArtifact/entities/bulk",
        ]
    );
    assert_eq!(stack.broker.parked_ready().await, 0);
}

#[tokio::test]
async fn a_harbor_that_times_out_is_retried_within_the_budget_then_the_event_is_parked() {
    let stack = Stack::start_with(|settings| {
        settings.http = Http::new(Duration::from_millis(300), MAX_ANSWER_BYTES).unwrap();
        settings.retry.max_elapsed = Duration::from_secs(2);
    })
    .await;
    let body = samples::load("scanning_completed.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&stack.harbor.server)
        .await;

    let started = Instant::now();
    stack.webhook(&body).await;
    stack.wait_for_outcome("parked", 1).await;
    let elapsed = started.elapsed();

    // It stops when the next wait would end past the budget: at most one wait early, and a wait
    // is at most the longest interval (500 ms) with its jitter (half of it again).
    assert!(
        elapsed >= Duration::from_millis(1250),
        "parked before the budget was spent: {elapsed:?}"
    );
    let asked = stack.harbor.requests().await;
    assert!(asked.len() >= 3, "the read was not retried: {asked:?}");
    let parked = stack.broker.take_parked().await.unwrap();
    let reason = failure_reason(&parked);
    assert!(
        reason.contains(&format!("Harbor GET artifact {repo}@{digest} timed out")),
        "{reason}"
    );
    assert_eq!(stack.port.request_count().await, 0);
}

/// Starts a stack whose Harbor answers every GET with `answer`, sends it a scan event, and
/// returns the reason the event was parked with.
async fn parked_after_harbor_answers(answer: ResponseTemplate) -> String {
    let stack = Stack::start_with(|settings| {
        settings.http = Http::new(Duration::from_secs(2), 64 * 1024).unwrap();
        settings.retry.max_elapsed = Duration::from_millis(300);
    })
    .await;
    Mock::given(method("GET"))
        .respond_with(answer)
        .mount(&stack.harbor.server)
        .await;
    stack
        .webhook(&samples::load("scanning_completed.default.docs.json"))
        .await;
    stack.wait_for_outcome("parked", 1).await;
    let parked = stack.broker.take_parked().await.unwrap();
    assert_eq!(stack.port.request_count().await, 0);
    failure_reason(&parked)
}

#[tokio::test]
async fn a_404_that_is_not_harbors_deletes_nothing_and_the_event_is_parked() {
    // An ingress in front of Harbor without its route answers a 404 page of its own: that is
    // no proof the artifact is gone.
    let page = ResponseTemplate::new(404)
        .insert_header("content-type", "text/html")
        .set_body_string("<html><body><h1>404 Not Found</h1></body></html>");
    let reason = parked_after_harbor_answers(page).await;
    assert!(
        reason.contains("answered 404 without Harbor's NOT_FOUND error"),
        "{reason}"
    );
}

#[tokio::test]
async fn an_answer_past_the_bound_fails_the_event_saying_so() {
    // Valid JSON, shaped like Harbor's answers, a quarter of a mebibyte long.
    let huge = json!({"id": 1, "name": "library", "padding": "x".repeat(256 * 1024)});
    let reason = parked_after_harbor_answers(ResponseTemplate::new(200).set_body_json(huge)).await;
    assert!(
        reason.contains("the answer is larger than 65536 bytes (HTTP_MAX_RESPONSE_BYTES)"),
        "{reason}"
    );
}

#[tokio::test]
async fn an_error_page_is_quoted_only_in_part() {
    let page = ResponseTemplate::new(502).set_body_string("<html>".repeat(200_000));
    let reason = parked_after_harbor_answers(page).await;
    assert!(
        reason.contains("answered 502 Bad Gateway: <html><html>"),
        "{reason}"
    );
    assert!(reason.len() < 1000, "{} bytes: {reason}", reason.len());
}

/// Polls the worker's metrics until `done` holds, and returns the most refreshes it saw in
/// flight at once.
async fn most_in_flight(stack: &Stack, done: impl Fn(&str) -> bool) -> f64 {
    let mut most = 0.0_f64;
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = stack.worker.metrics().await;
        if done(&metrics) {
            return most;
        }
        assert!(Instant::now() < deadline, "the events were not all handled");
        let in_flight = metrics
            .lines()
            .find_map(|l| l.strip_prefix("harbor_worker_refreshes_in_flight "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        most = most.max(in_flight);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn no_more_refreshes_run_at_once_than_the_concurrency_allows() {
    let stack = Stack::start_with(|settings| settings.concurrency = 4).await;
    Mock::given(method("GET"))
        .and(path_regex("/artifacts/"))
        .respond_with(harbor_not_found("artifact").set_delay(Duration::from_millis(600)))
        .mount(&stack.harbor.server)
        .await;
    // Scans of ten different repositories: ten refreshes that may all run, but four at a time.
    for n in 0..10 {
        let repository = format!("library/app{n}");
        let mut scan: serde_json::Value =
            serde_json::from_slice(&samples::push(&repository, &samples::digest(n))).unwrap();
        scan["type"] = json!("SCANNING_COMPLETED");
        stack.webhook(&serde_json::to_vec(&scan).unwrap()).await;
    }
    let most = most_in_flight(&stack, |m| outcome_count(m, "synced") >= 10).await;
    assert_eq!(
        most, 4.0,
        "at most WORKER_CONCURRENCY refreshes at once, and that many"
    );
}

#[tokio::test]
async fn refreshes_of_one_repository_run_one_at_a_time_and_fold_what_arrives_meanwhile() {
    let stack = Stack::start_with(|settings| settings.concurrency = 8).await;
    // Harbor answers slowly, so that each push arrives while the repository is refreshed.
    stack
        .harbor
        .holds_any_artifact("library/app", Duration::from_millis(300))
        .await;
    for n in 0..10 {
        stack
            .webhook(&samples::push("library/app", &samples::digest(n)))
            .await;
    }
    // Its project's refresh may run beside it: at most two at once.
    let most = most_in_flight(&stack, |m| outcome_count(m, "synced") >= 10).await;
    assert!(
        most <= 2.0,
        "{most} refreshes at once for one repository and its project"
    );
    let artifacts = stack.port.identifiers_written("harborArtifact").await;
    assert_eq!(artifacts.len(), 10, "every pushed artifact was written");
    let reads = stack
        .harbor
        .requests()
        .await
        .iter()
        .filter(|p| p.ends_with("repositories/app"))
        .count();
    assert!(
        reads < 10,
        "the repository was read {reads} times for 10 pushes: nothing folded"
    );
    let metrics = stack.worker.metrics().await;
    assert!(
        metrics.contains("harbor_worker_events_coalesced_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_blueprints_command_creates_missing_blueprints_and_updates_existing_ones() {
    let port = harbor_sync_tests::fakes::FakePort::start().await;
    let bearer = format!("Bearer {PORT_TOKEN}");
    for (blueprint, status) in [
        ("harborProject", 404),
        ("harborRepository", 200),
        ("harborArtifact", 404),
    ] {
        Mock::given(method("PATCH"))
            .and(path(format!("/v1/blueprints/{blueprint}")))
            .and(header("authorization", bearer.as_str()))
            .respond_with(ResponseTemplate::new(status).set_body_json(json!({"ok": status == 200})))
            .mount(&port.server)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/v1/blueprints"))
        .and(header("authorization", bearer.as_str()))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"ok": true})))
        .mount(&port.server)
        .await;

    let settings = harbor_worker::settings::PortSettings {
        url: port.url().parse().unwrap(),
        client_id: harbor_sync_tests::fakes::PORT_CLIENT_ID.into(),
        client_secret: harbor_sync_tests::fakes::PORT_CLIENT_SECRET.into(),
        mapping: std::sync::Arc::new(harbor_worker::mapping::Mapping::default_mapping()),
        budget: std::sync::Arc::new(harbor_worker::clients::port::PortBudget::new(0.5)),
    };
    let http = Http::new(Duration::from_secs(5), MAX_ANSWER_BYTES).unwrap();
    let client = harbor_worker::startup::port_client(&settings, http);
    let retry = harbor_worker::retry::RetryPolicy::with_budget(Duration::from_secs(5));
    harbor_worker::blueprints::apply(&client, retry)
        .await
        .unwrap();

    let requests = port.server.received_requests().await.unwrap();
    let calls: Vec<String> = requests
        .iter()
        .filter(|r| r.url.path() != "/v1/auth/access_token")
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            format!(
                "{} {} {}",
                r.method,
                r.url.path(),
                body["identifier"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            "PATCH /v1/blueprints/harborProject harborProject",
            "POST /v1/blueprints harborProject",
            "PATCH /v1/blueprints/harborRepository harborRepository",
            "PATCH /v1/blueprints/harborArtifact harborArtifact",
            "POST /v1/blueprints harborArtifact",
        ]
    );
}

#[tokio::test]
async fn stopping_the_worker_finishes_the_events_in_flight_before_it_exits() {
    let stack = Stack::start().await;
    // Slow enough that the stop arrives while all three are being refreshed.
    for n in 0..3 {
        let repository = format!("harbor/app{n}");
        Mock::given(method("GET"))
            .and(path_regex(format!(
                "^/api/v2.0/projects/harbor/repositories/app{n}/artifacts/"
            )))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(harbor_json::artifact(
                        &repository,
                        &samples::digest(n),
                        &["1"],
                        None,
                    ))
                    .set_delay(Duration::from_millis(1500)),
            )
            .mount(&stack.harbor.server)
            .await;
        let mut scan: serde_json::Value =
            serde_json::from_slice(&samples::push(&repository, &samples::digest(n))).unwrap();
        scan["type"] = json!("SCANNING_COMPLETED");
        stack.webhook(&serde_json::to_vec(&scan).unwrap()).await;
    }
    let deadline = Instant::now() + WAIT;
    while !stack
        .worker
        .metrics()
        .await
        .contains("harbor_worker_refreshes_in_flight 3")
    {
        assert!(
            Instant::now() < deadline,
            "the events never were in flight together"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let Stack {
        worker,
        port,
        broker,
        harbor,
        ingest,
    } = stack;
    worker.stop().await;

    // Each was written before the worker exited, and acked: nothing is left to redeliver.
    let artifacts = port
        .writes()
        .await
        .into_iter()
        .filter(|w| w.blueprint == "harborArtifact")
        .count();
    assert_eq!(artifacts, 3);
    assert_eq!(broker.work_ready().await, 0);
    assert_eq!(broker.parked_ready().await, 0);
    drop((harbor, ingest));
}

/// A stack whose Harbor holds the artifact of Harbor's sample PULL_ARTIFACT, counting
/// `pulls`, and that sample's `n`-th distinct pull (Harbor sends the same bytes only on a
/// retry; distinct pulls differ in `occur_at`).
async fn pull_stack(
    pulls: i64,
    adjust: impl FnOnce(&mut harbor_worker::settings::Settings),
) -> (Stack, impl Fn(u64) -> Vec<u8>) {
    let stack = Stack::start_with(adjust).await;
    let body = samples::load("pull_artifact.default.harbor-unit-test.json");
    let (repo, digest) = samples::subject(&body);
    stack
        .harbor
        .project("library", harbor_json::project("library"))
        .await;
    stack
        .harbor
        .repository(&repo, harbor_json::repository(&repo, 1, pulls))
        .await;
    stack
        .harbor
        .artifact(
            &repo,
            &digest,
            harbor_json::artifact(&repo, &digest, &["1.36"], None),
        )
        .await;
    let pull = move |n: u64| {
        let mut event: serde_json::Value = serde_json::from_slice(&body).unwrap();
        event["occur_at"] = json!(1_678_082_303 + n);
        serde_json::to_vec(&event).unwrap()
    };
    (stack, pull)
}

/// The pull count of the last repository entity written to Port.
fn last_pull_count(writes: &[PortWrite]) -> serde_json::Value {
    let repository = writes
        .iter()
        .rev()
        .find(|w| w.blueprint == "harborRepository")
        .expect("a repository was written");
    repository.entity.as_ref().unwrap()["properties"]["pullCount"].clone()
}

#[tokio::test]
async fn a_flood_of_pulls_of_one_artifact_is_folded_into_one_refresh_after_the_window() {
    let (stack, pull) = pull_stack(20, |settings| {
        settings.pull_window = Duration::from_millis(800)
    })
    .await;

    let started = Instant::now();
    for n in 0..20 {
        stack.webhook(&pull(n)).await;
    }
    stack.wait_for_outcome("synced", 20).await;

    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "refreshed before the window ended"
    );
    let artifact_reads = stack
        .harbor
        .requests()
        .await
        .iter()
        .filter(|p| p.contains("/artifacts/"))
        .count();
    assert!(
        artifact_reads <= 2,
        "{artifact_reads} Harbor reads for 20 pulls"
    );
    let writes = stack.port.writes().await;
    let artifact_writes = writes
        .iter()
        .filter(|w| w.blueprint == "harborArtifact")
        .count();
    assert!(
        artifact_writes <= 2,
        "{artifact_writes} Port writes for 20 pulls"
    );
    assert_eq!(last_pull_count(&writes), 20);
    let metrics = stack.worker.metrics().await;
    assert!(
        metrics.contains("harbor_worker_events_coalesced_total"),
        "{metrics}"
    );
    let Stack { worker, broker, .. } = stack;
    worker.stop().await;
    assert_eq!(
        broker.work_ready().await,
        0,
        "every folded delivery was acked"
    );
}

#[tokio::test]
async fn a_flood_of_pulls_beyond_the_prefetch_does_not_stop_the_consumer_for_a_window() {
    // A window far longer than the test: only refreshes cut short when the held deliveries near
    // the prefetch (50) let the queue empty.
    let (stack, pull) = pull_stack(200, |settings| {
        settings.pull_window = Duration::from_secs(600);
        settings.prefetch = 50;
    })
    .await;
    for n in 0..200 {
        stack.webhook(&pull(n)).await;
    }
    harbor_sync_tests::wait_until(
        "the worker took every pull",
        Duration::from_secs(15),
        || async {
            let metrics = stack.worker.metrics().await;
            let synced = outcome_count(&metrics, "synced");
            stack.broker.work_ready().await == 0 && synced >= 150
        },
    )
    .await;
    let metrics = stack.worker.metrics().await;
    assert!(
        metrics.contains("harbor_worker_pull_windows_cut_total"),
        "{metrics}"
    );
    assert_eq!(last_pull_count(&stack.port.writes().await), 200);
    // Stopping ends the last window: its pulls are refreshed and acked, not left behind.
    let Stack { worker, broker, .. } = stack;
    worker.stop().await;
    assert_eq!(broker.work_ready().await, 0);
}

#[tokio::test]
async fn events_of_different_artifacts_are_not_folded_together() {
    let stack =
        Stack::start_with(|settings| settings.pull_window = Duration::from_millis(300)).await;
    stack
        .harbor
        .holds_any_artifact("harbor/alpine", Duration::ZERO)
        .await;
    for n in 0..5 {
        stack
            .webhook(&samples::push("harbor/alpine", &samples::digest(n)))
            .await;
    }
    stack.wait_for_outcome("synced", 5).await;
    let artifacts = stack.port.identifiers_written("harborArtifact").await;
    assert_eq!(artifacts.len(), 5);
}

#[tokio::test]
async fn a_duplicate_webhook_writes_harbors_state_again_whatever_port_holds_meanwhile() {
    // No memory of past writes: an entity edited in Port (or by another replica) is put back
    // as Harbor has it by the next event of its subject.
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack.harbor.holds(&repo, &digest, &["latest"], None).await;

    stack.webhook(&body).await;
    stack.wait_for_outcome("synced", 1).await;
    let first: Vec<PortWrite> = stack.port.writes().await;
    stack.webhook(&body).await;
    stack.wait_for_outcome("synced", 2).await;
    let all = stack.port.writes().await;
    assert_eq!(first.len(), 3);
    assert_eq!(all.len(), 6, "{all:?}");
    let id = format!("{repo}@{digest}");
    let artifact = |w: &&PortWrite| w.identifier == id;
    assert_eq!(
        all.iter().filter(artifact).collect::<Vec<_>>(),
        first
            .iter()
            .chain(&first)
            .filter(artifact)
            .collect::<Vec<_>>(),
        "the same entity, written again"
    );
}

#[tokio::test]
async fn a_webhook_as_the_first_ingest_of_this_topology_published_it_is_synced() {
    // Version skew: the workers are upgraded first (docs/deploying.md), so a worker must read
    // what an earlier ingest publishes. These are the properties, exactly, that the ingest of
    // 2327c91 (2026-12-02, the first with the work queues behind the consistent-hash exchange)
    // published: nothing added since may become required.
    let (stack, body, repo) = scanned().await;
    let project = repo.split('/').next().unwrap();
    let text = |value: &str| lapin::types::AMQPValue::LongString(value.into());
    let mut headers = lapin::types::FieldTable::default();
    headers.insert("x-payload-format".into(), text("default"));
    headers.insert("x-received-at".into(), text("2026-12-02T10:00:00.000Z"));
    headers.insert("x-request-id".into(), text("an-earlier-ingest"));
    headers.insert("x-subject".into(), text(project));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("from-an-earlier-ingest".into())
        .with_timestamp(1_764_669_600)
        .with_app_id("harbor-ingest".into())
        .with_headers(headers);
    stack
        .broker
        .publish("SCANNING_COMPLETED", &body, properties)
        .await;

    stack.wait_for_outcome("synced", 1).await;
    assert_eq!(stack.broker.parked_ready().await, 0);
    let written = stack.port.server.received_requests().await.unwrap();
    assert!(
        written
            .iter()
            .any(|r| r.url.path() == "/v1/blueprints/harborArtifact/entities/bulk"),
        "nothing written to Port"
    );
}
