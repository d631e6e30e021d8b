//! Breaking things on purpose: every webhook answered 202 must end as a Port write or a parked
//! message, whatever fails in between.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use harbor_shared::broker::BrokerUrl;
use harbor_sync_tests::apps::{self, SECRET, Stack, outcome_count, worker_settings};
use harbor_sync_tests::fakes::{FakePort, Upserts, refuse_upsert};
use harbor_sync_tests::processes::{Processes, free_port, worker_env};
use harbor_sync_tests::proxy::StallingProxy;
use harbor_sync_tests::rabbit::{TestTopology, close_connections, failure_reason};
use harbor_sync_tests::{samples, wait_until};
use harbor_worker::plan::{Action, HandleEvent, Key, Plan, Work};
use harbor_worker::schedule::{self, Judgement, Reconcile};
use harbor_worker::startup::{Worker, scheduler};
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicNackOptions};
use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, Request, Respond, ResponseTemplate};

const REPOSITORY: &str = "harbor/alpine";

/// Posts `count` distinct pushes from 4 concurrent senders; once `trigger_after` of them were
/// accepted, runs `fault` (concurrently with the stream). Returns the accepted digests; every
/// other answer must be a 503.
async fn stream_with_fault<Fut>(
    stack: &Stack,
    count: u64,
    trigger_after: usize,
    fault: Fut,
) -> BTreeSet<String>
where
    Fut: std::future::Future<Output = ()>,
{
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let accepted_count = Arc::new(AtomicUsize::new(0));
    let other = Arc::new(Mutex::new(Vec::new()));
    let stream = futures_util::stream::iter(0..count)
        .map(|i| {
            let (accepted, accepted_count, other) =
                (accepted.clone(), accepted_count.clone(), other.clone());
            async move {
                let digest = samples::digest(i);
                let status = stack
                    .ingest
                    .post(&samples::push(REPOSITORY, &digest), Some(SECRET))
                    .await
                    .status()
                    .as_u16();
                match status {
                    202 => {
                        accepted.lock().unwrap().insert(digest);
                        accepted_count.fetch_add(1, Ordering::SeqCst);
                    }
                    503 => {}
                    _ => other.lock().unwrap().push(status),
                }
                // A steady stream, not one burst: the fault lands in the middle of it.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<()>>();
    let trigger = async {
        while accepted_count.load(Ordering::SeqCst) < trigger_after {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fault.await;
    };
    futures_util::join!(stream, trigger);
    assert!(
        other.lock().unwrap().is_empty(),
        "answers other than 202 and 503: {:?}",
        other.lock().unwrap()
    );
    accepted.lock().unwrap().clone()
}

/// [`harbor_sync_tests::apps::assert_none_lost`] for [`REPOSITORY`].
async fn assert_none_lost(
    port: &FakePort,
    broker: &TestTopology,
    accepted: &BTreeSet<String>,
    timeout: Duration,
) {
    apps::assert_none_lost(port, broker, REPOSITORY, accepted, timeout).await;
}

#[tokio::test]
async fn killing_the_broker_connections_mid_stream_loses_no_accepted_webhook() {
    let stack = Stack::start().await;
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;
    let queue = stack.broker.topology().queue().to_owned();

    let accepted = stream_with_fault(&stack, 300, 60, async {
        // Both the ingest's and the worker's connections are named after the queue.
        assert_eq!(close_connections(&format!("({queue})"), 2).await, 2);
    })
    .await;

    assert!(accepted.len() >= 60, "only {} accepted", accepted.len());
    assert_none_lost(
        &stack.port,
        &stack.broker,
        &accepted,
        Duration::from_secs(60),
    )
    .await;
}

/// The network between the worker and the broker goes silent (a proxy that stops forwarding):
/// no error, no close, nothing. The AMQP heartbeat notices (2 s here, asked for in `AMQP_URL`;
/// the broker's default is 60 s), the worker reconnects by itself, and the event published in
/// the meantime reaches Port.
#[tokio::test]
async fn a_worker_cut_off_from_the_broker_without_a_word_reconnects_once_heartbeats_stop() {
    let proxy = StallingProxy::start().await;
    let mut url = url::Url::parse(&proxy.amqp_url()).unwrap();
    url.query_pairs_mut().append_pair("heartbeat", "2");
    let stack = Stack::start_with(|settings| {
        settings.amqp.url = BrokerUrl::parse(url.as_str()).unwrap();
    })
    .await;
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;
    // Pushes one artifact and waits until it is in Port.
    let push = |digest: String, within: Duration| {
        let stack = &stack;
        async move {
            stack.webhook(&samples::push(REPOSITORY, &digest)).await;
            let accepted = BTreeSet::from([digest]);
            assert_none_lost(&stack.port, &stack.broker, &accepted, within).await;
        }
    };
    push(samples::digest(1), Duration::from_secs(10)).await;
    proxy.stall();
    push(samples::digest(2), Duration::from_secs(30)).await;
}

/// Restarts the broker's application; starts it again even if the test fails half-way.
struct BrokerRestart;

impl BrokerRestart {
    fn stop() -> Self {
        let status = std::process::Command::new("rabbitmqctl")
            .args(["-q", "stop_app"])
            .status()
            .unwrap();
        assert!(status.success(), "rabbitmqctl stop_app failed");
        BrokerRestart
    }
}

impl Drop for BrokerRestart {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "await_startup"])
            .status();
    }
}

/// Runs alone (see `.config/nextest.toml`): it stops the broker every other test uses.
#[tokio::test]
async fn broker_restart_loses_no_accepted_webhook_and_both_binaries_recover_by_themselves() {
    let stack = Stack::start().await;
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;

    let accepted = stream_with_fault(&stack, 400, 60, async {
        let restart = tokio::task::spawn_blocking(BrokerRestart::stop)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking(move || drop(restart))
            .await
            .unwrap();
    })
    .await;

    // Both recover by themselves: webhooks are accepted again, and reach Port.
    let after = samples::digest(1_000_000);
    let mut answer = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while answer != 202 {
        assert!(Instant::now() < deadline, "the ingest never accepted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = stack
            .ingest
            .post(&samples::push(REPOSITORY, &after), Some(SECRET))
            .await
            .status()
            .as_u16();
    }
    let mut all = accepted.clone();
    all.insert(after);
    assert_none_lost(&stack.port, &stack.broker, &all, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn a_worker_killed_mid_batch_loses_nothing_a_new_worker_finishes_the_work() {
    let stack = Stack::start().await;
    // Slow enough that the kill finds events in flight.
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::from_millis(300))
        .await;
    // The in-process worker stops; two worker processes take over, one after the other.
    let Stack {
        worker,
        ingest,
        harbor,
        port,
        broker,
    } = stack;
    worker.stop().await;

    let mut processes = Processes::new(broker.topology().queue());
    let env = |metrics: u16| {
        let mut env = worker_env(&broker, &harbor, &port, metrics);
        env.push(("WORKER_CONCURRENCY", "8".to_owned()));
        env
    };
    let mut accepted = BTreeSet::new();
    for i in 0..40 {
        let digest = samples::digest(i);
        assert_eq!(
            ingest
                .post(&samples::push(REPOSITORY, &digest), Some(SECRET))
                .await
                .status(),
            202
        );
        accepted.insert(digest);
    }
    processes.spawn("first-worker", "harbor-worker", &env(free_port()));
    wait_until(
        "the first worker to write something",
        Duration::from_secs(20),
        || async {
            port.writes()
                .await
                .iter()
                .any(|w| w.blueprint == "harborArtifact")
        },
    )
    .await;
    processes.signal("first-worker", "KILL");
    let written_before = port.writes().await.len();
    assert!(
        written_before < 3 * 40,
        "the kill came too late to test anything"
    );

    processes.spawn("second-worker", "harbor-worker", &env(free_port()));
    assert_none_lost(&port, &broker, &accepted, Duration::from_secs(60)).await;
    assert_eq!(processes.signal("second-worker", "TERM"), Some(0));
}

/// Answers upserts of one entity (alone or in bulk) by attempt number (1, 2, ...) with a
/// status and a `Retry-After`, and remembers when each attempt came.
struct ByAttempt {
    identifier: String,
    times: Arc<Mutex<Vec<Instant>>>,
    answer: fn(usize, Duration) -> (u16, Option<Duration>),
    started: Instant,
}

impl Respond for ByAttempt {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut times = self.times.lock().unwrap();
        times.push(Instant::now());
        let (status, retry_after) = (self.answer)(times.len(), self.started.elapsed());
        if status < 300 {
            let entity: serde_json::Value =
                serde_json::from_slice(&request.body).unwrap_or_default();
            return ResponseTemplate::new(status)
                .set_body_json(json!({"ok": true, "entity": entity}));
        }
        refuse_upsert(request, &self.identifier, status, retry_after)
    }
}

async fn answer_upserts_of(
    port: &FakePort,
    identifier: &str,
    answer: fn(usize, Duration) -> (u16, Option<Duration>),
) -> Arc<Mutex<Vec<Instant>>> {
    let times = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(Upserts(identifier.to_owned()))
        .respond_with(ByAttempt {
            identifier: identifier.to_owned(),
            times: times.clone(),
            answer,
            started: Instant::now(),
        })
        .with_priority(1)
        .mount(&port.server)
        .await;
    times
}

#[tokio::test]
async fn port_down_for_longer_than_a_retry_delays_that_event_and_the_queue_keeps_flowing() {
    let stack =
        Stack::start_with(|settings| settings.retry.max_elapsed = Duration::from_secs(20)).await;
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;
    let (slow, fast) = (samples::digest(1), samples::digest(2));
    // Port answers 503 to this entity for 3 s, then accepts it.
    let attempts = answer_upserts_of(&stack.port, &format!("{REPOSITORY}@{slow}"), |_, since| {
        (
            if since < Duration::from_secs(3) {
                503
            } else {
                201
            },
            None,
        )
    })
    .await;

    stack.webhook(&samples::push(REPOSITORY, &slow)).await;
    stack.webhook(&samples::push(REPOSITORY, &fast)).await;

    // The other event is written and settled while the first one still waits. (Port records
    // the write before the worker has its answer and counts the event: wait for both.)
    wait_until(
        "the second event written and settled",
        Duration::from_secs(10),
        || async {
            let written = stack
                .port
                .writes()
                .await
                .iter()
                .any(|w| w.identifier.ends_with(&fast));
            written && outcome_count(&stack.worker.metrics().await, "synced") >= 1
        },
    )
    .await;
    let synced = outcome_count(&stack.worker.metrics().await, "synced");
    assert_eq!(synced, 1, "only the second event is done yet");
    stack.wait_for_outcome("synced", 2).await;
    assert!(
        attempts.lock().unwrap().len() >= 3,
        "retried while Port was down"
    );
    assert_eq!(stack.broker.parked_ready().await, 0);
}

/// Port's rate limit is waited for, not failed on: each `Retry-After` is waited out, and refused
/// with 429 for longer than the retry budget, the event is still written once Port accepts;
/// nothing is parked.
#[tokio::test]
async fn port_refusing_for_its_rate_limit_longer_than_the_retry_budget_parks_nothing() {
    let stack =
        Stack::start_with(|settings| settings.retry.max_elapsed = Duration::from_secs(1)).await;
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;
    let digest = samples::digest(7);
    // Three refusals of a second each: three times the budget.
    let attempts = answer_upserts_of(
        &stack.port,
        &format!("{REPOSITORY}@{digest}"),
        |attempt, _| match attempt {
            1..=3 => (429, Some(Duration::from_secs(1))),
            _ => (201, None),
        },
    )
    .await;

    stack.webhook(&samples::push(REPOSITORY, &digest)).await;
    stack.wait_for_outcome("synced", 1).await;

    let times = attempts.lock().unwrap().clone();
    assert_eq!(times.len(), 4, "three refusals, then the write");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_secs(1),
            "sent again after {gap:?}, not after the 1 s Port asked for"
        );
    }
    assert_eq!(stack.broker.parked_ready().await, 0);
    let metrics = stack.worker.metrics().await;
    assert!(
        metrics.contains(
            r#"harbor_worker_port_requests_total{family="bulk_upsert",outcome="refused"} 3"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn harbor_asking_to_wait_for_ever_has_the_event_parked_and_the_worker_goes_on() {
    // `Retry-After: 10000000000000000000` from a proxy in front of Harbor: no clock can add that
    // wait. The event is parked at once, and the worker goes on. (Port's 429 is waited out by
    // its family, at most Port's period: `clients::port::budget`'s tests.)
    const FOREVER: &str = "10000000000000000000";
    let stack = Stack::start().await;
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;
    let (at_harbor, fine) = (samples::digest(1), samples::digest(3));
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex(format!("{at_harbor}$")))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", FOREVER))
        .with_priority(1)
        .mount(&stack.harbor.server)
        .await;
    stack.webhook(&samples::push(REPOSITORY, &at_harbor)).await;
    stack.wait_for_outcome("parked", 1).await;
    let reason = failure_reason(&stack.broker.take_parked().await.unwrap());
    assert!(
        reason.contains("answered 429") && reason.contains("past the retry budget"),
        "{reason}"
    );
    stack.webhook(&samples::push(REPOSITORY, &fine)).await;
    stack.wait_for_outcome("synced", 1).await;
    assert!(
        stack
            .port
            .identifiers_written("harborArtifact")
            .await
            .contains(&format!("{REPOSITORY}@{fine}"))
    );
}

/// A handler whose every refresh panics, or whose judging of a refresh does (a bug inside the
/// scheduler's own task).
enum Panics {
    InRefresh,
    InJudge,
}

impl Reconcile for Panics {
    type Key = Key;
    type Work = Work;
    type Report = ();

    async fn run(&self, _key: &Key, _work: &Work) {
        if let Panics::InRefresh = self {
            panic!("a bug in the handler");
        }
    }

    fn judge(&self, _report: &(), _asked: &Work) -> Judgement<Key, Work> {
        if let Panics::InJudge = self {
            panic!("a bug in the judge");
        }
        Judgement::Done
    }
}

impl HandleEvent for Panics {
    fn subject(&self, _key: &Key) -> String {
        "library".into()
    }

    fn harbor(&self, _instance: Option<&str>) -> &str {
        "default"
    }

    fn plan(&self, _body: &[u8], _instance: Option<&str>) -> Plan<Key, Work> {
        let refresh = schedule::Request {
            key: Key::Project("library".into()),
            work: Work::default(),
            delay: Duration::ZERO,
            group: 0,
        };
        Plan {
            event_type: "PUSH_ARTIFACT".into(),
            about: None,
            action: Action::Refresh(vec![refresh]),
        }
    }
}

/// A stack whose worker hands its deliveries to `panics` instead of the real handler: its ingest
/// and broker, the worker's shutdown token, and the worker running, once ready.
async fn panicking_stack(
    panics: Panics,
) -> (
    apps::TestIngest,
    TestTopology,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let Stack {
        worker,
        ingest,
        harbor,
        port,
        broker,
    } = Stack::start().await;
    worker.stop().await;
    let settings = worker_settings(&broker.amqp, &harbor.url(), &port.url());
    let panics = Arc::new(panics);
    let scheduler = scheduler(Arc::clone(&panics), &settings);
    let panicking = Worker::start(settings, panics, scheduler).await.unwrap();
    let metrics = format!("http://127.0.0.1:{}", panicking.metrics_port());
    let shutdown = panicking.shutdown_token();
    let running = tokio::spawn(panicking.run_until_stopped());
    apps::wait_ready_at(&format!("{metrics}/readyz")).await;
    (ingest, broker, shutdown, running)
}

#[tokio::test]
async fn an_event_whose_handler_panics_is_parked_and_the_worker_keeps_consuming() {
    let (ingest, broker, shutdown, running) = panicking_stack(Panics::InRefresh).await;

    for i in 0..2 {
        let response = ingest
            .post(
                &samples::push(REPOSITORY, &samples::digest(i)),
                Some(SECRET),
            )
            .await;
        assert_eq!(response.status(), 202);
    }
    broker
        .wait_ready(
            &broker.topology().parked_queue(),
            2,
            Duration::from_secs(15),
        )
        .await;
    let parked = broker.take_parked().await.unwrap();
    let reason = failure_reason(&parked);
    assert!(reason.contains("panicked"), "{reason}");
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(broker.work_ready().await, 0);
}

#[tokio::test]
async fn a_worker_whose_scheduler_panics_stops_with_an_error_and_its_event_goes_back_to_the_queue()
{
    let (ingest, broker, _shutdown, running) = panicking_stack(Panics::InJudge).await;

    let response = ingest
        .post(
            &samples::push(REPOSITORY, &samples::digest(1)),
            Some(SECRET),
        )
        .await;
    assert_eq!(response.status(), 202);
    let stopped = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the worker kept running without its scheduler")
        .unwrap();
    let error = stopped.unwrap_err().to_string();
    assert!(error.contains("scheduler panicked"), "{error}");
    wait_until(
        "the event back in its work queue",
        Duration::from_secs(15),
        || async { broker.work_ready().await == 1 },
    )
    .await;
    assert_eq!(
        broker.parked_ready().await,
        0,
        "nothing parked for a bug of ours"
    );
}

#[tokio::test]
async fn a_message_that_keeps_coming_back_is_dead_lettered_by_the_delivery_limit() {
    let stack = Stack::start().await;
    let Stack { worker, broker, .. } = stack;
    worker.stop().await;
    broker
        .publish("PUSH_ARTIFACT", b"a crash loop", BasicProperties::default())
        .await;

    // A consumer that dies on the message every time: requeued, delivered again, ...
    let (_connection, mut consumer) = broker
        .consume_work_queues("crash-loop", BasicConsumeOptions::default(), 0)
        .await;
    let mut deliveries = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.parked_ready().await == 0 {
        assert!(
            Instant::now() < deadline,
            "never dead-lettered after {deliveries} deliveries"
        );
        if let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        {
            deliveries += 1;
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .unwrap();
        }
    }
    assert!(
        (10..=11).contains(&deliveries),
        "dead-lettered after {deliveries} deliveries"
    );
    // `parked list` says why and when, though the worker never parked it.
    let listed = harbor_worker::parked::list(&broker.amqp, 10).await.unwrap();
    let [event] = listed.as_slice() else {
        panic!("{listed:?}")
    };
    let reason = event.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("delivery limit"), "{reason}");
    let work_queue = format!("from {}.", broker.topology().queue());
    assert!(reason.contains(&work_queue), "{reason}");
    assert!(event.failed_at.is_some(), "{event:?}");
    let parked = broker.take_parked().await.unwrap();
    assert_eq!(parked.delivery.data, b"a crash loop");
    assert_eq!(broker.work_ready().await, 0);
}
