//! Losing a broker node: the ingest and the worker on a three-node cluster
//! (`deploy/local/cluster.sh`, its own ports and folder), webhooks at a steady rate, and one
//! node at a time stopped and started again: the node the ingest is connected to (and the
//! worker's, if another), then the node that leads the work queue the events go to. Every 202
//! must end as a Port write or a parked event, every other answer be a 503 with `Retry-After`,
//! the ingest be ready again within 10 s of each stop, and the worker resume by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harbor_sync_tests::apps::{SECRET, Stack, assert_none_lost};
use harbor_sync_tests::cluster::Cluster;
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::samples;

const REPOSITORY: &str = "harbor/alpine";
/// Ports 5801-5803 (AMQP), 15801-15803 (management), 25801-25803: apart from the default
/// broker's and from a cluster someone started with the script's defaults.
const PORT_BASE: u16 = 5800;

/// What the steady sender saw: each answer's time and status, and whether a non-202 had
/// `Retry-After`.
#[derive(Default)]
struct Answers {
    accepted: BTreeSet<String>,
    log: Vec<(Instant, u16, bool)>,
}

/// Posts distinct pushes, two at a time, every few milliseconds, until `stop`.
async fn send_steadily(stack: &Stack, answers: &Mutex<Answers>, stop: &AtomicBool) {
    let mut next = 0_u64;
    let sender = |i: u64| async move {
        let digest = samples::digest(i);
        let response = stack
            .ingest
            .post(&samples::push(REPOSITORY, &digest), Some(SECRET))
            .await;
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key("retry-after");
        let mut answers = answers.lock().unwrap();
        answers.log.push((Instant::now(), status, retry_after));
        if status == 202 {
            answers.accepted.insert(digest);
        }
    };
    while !stop.load(Ordering::SeqCst) {
        futures_util::join!(sender(next), sender(next + 1));
        next += 2;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the ingest's `/readyz` says ready; how long that took.
async fn ready_after(stack: &Stack, since: Instant) -> Duration {
    let url = format!("{}/readyz", stack.ingest.base);
    loop {
        if let Ok(response) = reqwest::get(&url).await
            && response.status() == 200
        {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the ingest is not ready 30 s after the node stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a webhook sent now is accepted.
async fn accepting_again(answers: &Mutex<Answers>, since: Instant) {
    let deadline = since + Duration::from_secs(30);
    loop {
        let accepted = answers
            .lock()
            .unwrap()
            .log
            .iter()
            .any(|(at, status, _)| *at > since && *status == 202);
        if accepted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no webhook accepted 30 s after the step"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs alone (see `.config/nextest.toml`): three more broker nodes load both cores.
// Several threads: the script's commands block one while the ingest and the sender go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_broker_node_loses_no_accepted_webhook() {
    let cluster = Cluster::start(PORT_BASE);
    let stack = Arc::new(Stack::start_on(TestTopology::on(&cluster.url()).await, |_| {}).await);
    stack
        .harbor
        .holds_any_artifact(REPOSITORY, Duration::ZERO)
        .await;
    let ingest_node = cluster.node_of("harbor-ingest (").await;
    let worker_node = cluster.node_of("harbor-worker (").await;

    let answers = Arc::new(Mutex::new(Answers::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // A task of its own: the steps block their thread while the script runs.
    let sender = tokio::spawn({
        let (stack, answers, stop) = (stack.clone(), answers.clone(), stop.clone());
        async move { send_steadily(&stack, &answers, &stop).await }
    });
    let steps = async {
        let mut report = Vec::new();
        let mut step = async |name: String, node: u16| {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let stopping = Instant::now();
            assert!(tokio::task::block_in_place(|| cluster.stop_node(node)));
            let stopped = Instant::now();
            let ready = ready_after(&stack, stopped).await;
            accepting_again(&answers, stopped).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(tokio::task::block_in_place(|| cluster.start_node(node)));
            let started = Instant::now();
            accepting_again(&answers, started).await;
            report.push((name, node, stopping, Instant::now(), ready));
        };
        step(
            format!(
                "the ingest's node{}",
                if ingest_node == worker_node {
                    " and the worker's"
                } else {
                    ""
                }
            ),
            ingest_node,
        )
        .await;
        if worker_node != ingest_node {
            step("the worker's node".to_owned(), worker_node).await;
        }
        let queue = busy_queue(&cluster, &stack).await;
        let leader = cluster.leader_of(&queue).await;
        step(format!("the leader of {queue}"), leader).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::SeqCst);
        report
    };
    let report = steps.await;
    sender.await.unwrap();

    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let others: Vec<u16> = answers
        .log
        .iter()
        .filter(|(_, status, _)| *status != 202 && *status != 503)
        .map(|(_, status, _)| *status)
        .collect();
    assert!(
        others.is_empty(),
        "answers other than 202 and 503: {others:?}"
    );
    assert!(
        answers
            .log
            .iter()
            .all(|(_, status, retry_after)| *status == 202 || *retry_after),
        "a 503 without Retry-After"
    );
    for (name, node, from, to, ready) in &report {
        let refused: Vec<Instant> = answers
            .log
            .iter()
            .filter(|(at, status, _)| at >= from && at <= to && *status == 503)
            .map(|(at, _, _)| *at)
            .collect();
        let span = match (refused.first(), refused.last()) {
            (Some(first), Some(last)) => format!("{:.1} s", (*last - *first).as_secs_f64()),
            _ => "0 s".to_owned(),
        };
        println!(
            "cluster: stopping {name} (hsync{node}): {} webhooks got 503, over {span}; the ingest ready {:.1} s after the node stopped",
            refused.len(),
            ready.as_secs_f64()
        );
        assert!(
            *ready <= Duration::from_secs(10),
            "the ingest was not ready within 10 s of stopping {name}: {ready:?}"
        );
    }
    assert!(
        answers.accepted.len() > 100,
        "too few webhooks accepted to tell"
    );
    let timeout = Duration::from_secs(90);
    let settled = assert_none_lost(
        &stack.port,
        &stack.broker,
        REPOSITORY,
        &answers.accepted,
        timeout,
    )
    .await;
    for reason in &settled.parked {
        println!("cluster: parked: {reason}");
    }
    println!(
        "cluster: {} accepted, {} written, {} parked, none lost",
        answers.accepted.len(),
        settled.written,
        settled.parked.len()
    );
    drop(Arc::into_inner(stack));
    drop(cluster);
}

/// The work queue the test's events go to: the one that took the most messages.
async fn busy_queue(cluster: &Cluster, stack: &Stack) -> String {
    let mut busiest = (0, String::new());
    for queue in stack.broker.topology().work_queues() {
        let stats = cluster.management(&format!("/queues/%2f/{queue}")).await;
        let published = stats["message_stats"]["publish"].as_u64().unwrap_or(0);
        if published > busiest.0 {
            busiest = (published, queue);
        }
    }
    assert!(
        busiest.0 > 0,
        "the management API counted no message on any work queue"
    );
    busiest.1
}
