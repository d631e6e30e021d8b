//! Test support for the end-to-end tests in `tests/tests/`: a uniquely named RabbitMQ topology per
//! test (deleted afterwards), Harbor and Port faked at the HTTP level with answers shaped like
//! the real APIs', the ingest and the worker started through the same `build` path as
//! production, Harbor's real webhook samples, and a headless Chromium for the sandbox's page.
//!
//! The broker is the real one at `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

// Test support may unwrap: a broken precondition should fail the test on the spot, with its
// message. The sandbox is a program people run, and may not.
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod apps;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod browser;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod cluster;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod fakes;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod processes;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod proxy;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod rabbit;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod samples;
pub mod sandbox;

use std::future::Future;
use std::time::{Duration, Instant};

/// The `p` quantile (0 to 1) of durations sorted in ascending order; zero when there are none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
