//! What the worker holds is bounded in bytes: a flood of pulls padded to the ingest's limit for
//! one-resource events, sent steadily, as `harbor-worker` processes in their default
//! configuration but for `WORKER_MAX_HELD_BYTES`: one whose budget is past the flood holds it all
//! for the pull window, one with a budget of 1 MiB refreshes at once past it. Measured as the
//! growth of each process's peak RSS, in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use harbor_shared::event::SINGLE_EVENT_MAX_BYTES;
use harbor_sync_tests::apps::{SECRET, TestIngest, ingest_settings, outcome_count, wait_ready_at};
use harbor_sync_tests::fakes::{FakeHarbor, FakePort};
use harbor_sync_tests::processes::{Processes, free_port, status_kib, worker_env};
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::{samples, wait_until};

const REPOSITORY: &str = "library/nginx";
const PULLS: u64 = 800;

/// How much a worker with this budget grew its peak RSS, in KiB, while the flood went through.
async fn peak_growth_kib(harbor: &FakeHarbor, port: &FakePort, budget: usize) -> u64 {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let mut processes = Processes::new(broker.topology().queue());
    let metrics_port = free_port();
    let mut env = worker_env(&broker, harbor, port, metrics_port);
    env.push(("WORKER_MAX_HELD_BYTES", budget.to_string()));
    // Shorter than the default, for a shorter test; the flood lasts longer than it.
    env.push(("PULL_COALESCE_WINDOW", "3s".to_owned()));
    processes.spawn("worker", "harbor-worker", &env);
    let metrics = format!("http://127.0.0.1:{metrics_port}");
    wait_ready_at(&format!("{metrics}/readyz")).await;
    // Started in full: its connection for the resync lock, opened after ready, is no part of
    // what the flood costs.
    broker.wait_for_resync_lock().await;
    let pid = processes.pid("worker").unwrap();
    let before = status_kib(pid, "VmRSS:");

    // Pulls of one artifact, each padded to the largest body the ingest takes for a pull, at
    // about 150 a second: a steady flood, as Harbor would send it.
    let pull = samples::event("PULL_ARTIFACT", REPOSITORY, &samples::digest(1), "1.27");
    let mut pace = tokio::time::interval(Duration::from_millis(7));
    for i in 0..PULLS {
        pace.tick().await;
        let mut body = samples::padded(&pull, SINGLE_EVENT_MAX_BYTES);
        // Distinct bodies, so distinct messages.
        let tail = format!("{i:08}");
        let at = body.windows(4).position(|w| w == b"xxxx").unwrap();
        body[at..at + tail.len()].copy_from_slice(tail.as_bytes());
        let answer = ingest.post(&body, Some(SECRET)).await;
        assert_eq!(answer.status(), 202);
    }
    wait_until("every pull synced", Duration::from_secs(60), || async {
        let text = reqwest::get(format!("{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        outcome_count(&text, "synced") == PULLS as usize
    })
    .await;
    let peak = status_kib(pid, "VmHWM:");
    processes.terminate_all();
    ingest.stop().await;
    peak.saturating_sub(before)
}

#[tokio::test]
async fn a_flood_of_padded_pulls_is_held_within_the_workers_byte_budget() {
    let harbor = FakeHarbor::start().await;
    harbor.holds_any_artifact(REPOSITORY, Duration::ZERO).await;
    let port = FakePort::start().await;
    let flood_kib = PULLS * SINGLE_EVENT_MAX_BYTES as u64 / 1024;

    let unbounded = peak_growth_kib(&harbor, &port, 1 << 30).await;
    let bounded = peak_growth_kib(&harbor, &port, 1 << 20).await;
    println!(
        "peak RSS growth: {unbounded} KiB with a budget past the flood ({flood_kib} KiB), \
         {bounded} KiB with a budget of 1 MiB"
    );
    assert!(
        unbounded > flood_kib * 3 / 4,
        "the flood was not held for its window ({unbounded} KiB): the test shows nothing"
    );
    assert!(
        bounded < unbounded / 3,
        "a budget of 1 MiB held {bounded} KiB, against {unbounded} KiB without it"
    );
}
