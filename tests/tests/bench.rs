//! `harbor-bench` on a small load, so that it keeps working. Its figures are not checked (they
//! are for people, and times on a shared machine vary); its counts are: it exits with status 1
//! when an accepted webhook is missing from the queue, an event is not settled, or a webhook
//! never reaches Port. (`pull-flood` takes 20 s by design; the folding it measures is tested in
//! `worker.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use harbor_sync_tests::processes::stdout_of;

/// Runs `harbor-bench` with `args`; its output, once it exited with success.
fn bench(args: &[&str]) -> String {
    stdout_of(Command::new(env!("CARGO_BIN_EXE_harbor-bench")).args(args))
}

#[test]
fn the_ingest_benchmark_finds_every_accepted_webhook_on_the_queue() {
    let output = bench(&["ingest", "--connections", "4", "--seconds", "1"]);
    assert_eq!(output.matches(": exact").count(), 2, "{output}");
    // Every server path answered every webhook 202: the ingest, its audited twin, the naive
    // reference as is and doing the contract's work (which verifies the bench's signatures),
    // and bare actix-web.
    assert_eq!(output.matches("non-2xx         0").count(), 5, "{output}");
}

#[test]
fn the_worker_benchmark_settles_every_event() {
    let output = bench(&["worker", "--events", "200", "--latency-ms", "0"]);
    assert!(output.contains("events settled  200 of 200"), "{output}");
}

#[test]
fn the_end_to_end_benchmark_sees_every_webhook_written_to_port() {
    let output = bench(&["e2e", "--rate", "50", "--seconds", "1"]);
    assert!(
        output.contains("written         50 of 50; errors 0"),
        "{output}"
    );
}
