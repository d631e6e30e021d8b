//! Retry policies, and the retrying of a command's calls within one budget.
//!
//! Events are not retried here: the scheduler refreshes a failed key again, a whole refresh at a
//! time, with the [`RetryPolicy`]'s spacing and budget (`RETRY_MAX_ELAPSED`). The commands
//! (`resync` taking stock, `blueprints`) retry each call with a [`Budget`]: while it fails
//! transiently and the budget lasts, waiting what the server asked (`Retry-After`) or else an
//! exponentially growing, jittered interval. A permanent failure, or a wait that would end past
//! the budget, ends it.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backoff::ExponentialBackoffBuilder;
use tokio::time::Instant;
use tracing::warn;

use crate::clients::CallError;

/// How retries are spaced, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Budget per event.
    pub max_elapsed: Duration,
    /// First wait.
    pub initial_interval: Duration,
    /// Longest wait.
    pub max_interval: Duration,
}

impl RetryPolicy {
    /// The policy for a budget: waits from 200 ms growing to 10 s.
    pub fn with_budget(max_elapsed: Duration) -> Self {
        Self {
            max_elapsed,
            initial_interval: Duration::from_millis(200),
            max_interval: Duration::from_secs(10),
        }
    }
}

/// The instant `wait` after `now`, or a year after it when `wait` is longer: deadlines computed
/// from what servers and options ask for never overflow the clock.
pub fn later(now: Instant, wait: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now.checked_add(wait.min(FAR)).unwrap_or(now)
}

/// One event's budget, and the count of calls made under it.
pub struct Budget {
    policy: RetryPolicy,
    deadline: Instant,
    attempts: AtomicU32,
}

impl Budget {
    /// Starts the clock.
    pub fn start(policy: RetryPolicy) -> Self {
        Self {
            policy,
            deadline: later(Instant::now(), policy.max_elapsed),
            attempts: AtomicU32::new(0),
        }
    }

    /// How many calls were made, retries included.
    #[cfg(test)]
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Runs `call` until it succeeds, fails permanently, or the budget is spent; returns the
    /// last error then. `api` labels the retry metric (`harbor`, `port`).
    pub async fn run<T, F, Fut>(&self, api: &'static str, mut call: F) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let backoff = ExponentialBackoffBuilder::new()
            .with_initial_interval(self.policy.initial_interval)
            .with_max_interval(self.policy.max_interval)
            .with_max_elapsed_time(Some(remaining))
            .build();
        backoff::future::retry_notify(
            backoff,
            || {
                self.attempts.fetch_add(1, Ordering::Relaxed);
                let attempt = call();
                async move {
                    match attempt.await {
                        Ok(value) => Ok(value),
                        Err(error @ CallError::Permanent { .. }) => {
                            Err(backoff::Error::Permanent(error))
                        }
                        Err(CallError::Transient {
                            reason,
                            retry_after,
                        }) => {
                            let wait_ends = later(Instant::now(), retry_after.unwrap_or_default());
                            if retry_after.is_some() && wait_ends > self.deadline {
                                return Err(backoff::Error::Permanent(CallError::Transient {
                                    reason: format!(
                                        "{reason} (asked to wait {:?}, past the retry budget)",
                                        retry_after.unwrap_or_default()
                                    ),
                                    retry_after,
                                }));
                            }
                            Err(backoff::Error::Transient {
                                err: CallError::Transient {
                                    reason,
                                    retry_after,
                                },
                                retry_after,
                            })
                        }
                    }
                }
            },
            |error: CallError, wait: Duration| {
                metrics::counter!("harbor_worker_retries_total", "api" => api).increment(1);
                warn!(api, %error, wait_ms = wait.as_millis() as u64, "Call failed; retrying");
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn quick(budget: Duration) -> Budget {
        Budget::start(RetryPolicy {
            max_elapsed: budget,
            initial_interval: Duration::from_millis(5),
            max_interval: Duration::from_millis(20),
        })
    }

    fn transient(retry_after: Option<Duration>) -> CallError {
        CallError::Transient {
            reason: "503".into(),
            retry_after,
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success() {
        let budget = quick(Duration::from_secs(5));
        let calls = AtomicUsize::new(0);
        let result = budget
            .run("port", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(transient(None))
                } else {
                    Ok(42)
                }
            })
            .await;
        assert_eq!(result, Ok(42));
        assert_eq!(budget.attempts(), 3);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let budget = quick(Duration::from_secs(5));
        let result: Result<(), _> = budget
            .run("port", || async { Err(CallError::permanent("422")) })
            .await;
        assert_eq!(result, Err(CallError::permanent("422")));
        assert_eq!(budget.attempts(), 1);
    }

    #[tokio::test]
    async fn the_budget_ends_the_retries() {
        let budget = quick(Duration::from_millis(150));
        let started = Instant::now();
        let result: Result<(), _> = budget
            .run("harbor", || async { Err(transient(None)) })
            .await;
        assert!(matches!(result, Err(CallError::Transient { .. })));
        assert!(budget.attempts() > 2, "{}", budget.attempts());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn retry_after_is_honoured() {
        let budget = quick(Duration::from_secs(5));
        let calls = AtomicUsize::new(0);
        let started = Instant::now();
        let result = budget
            .run("port", || async {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(transient(Some(Duration::from_millis(300))))
                } else {
                    Ok(())
                }
            })
            .await;
        assert_eq!(result, Ok(()));
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_retry_after_past_the_budget_gives_up_at_once() {
        let budget = quick(Duration::from_millis(500));
        let started = Instant::now();
        let result: Result<(), _> = budget
            .run("port", || async {
                Err(transient(Some(Duration::from_secs(60))))
            })
            .await;
        let Err(CallError::Transient { reason, .. }) = result else {
            panic!("expected the transient error back");
        };
        assert!(reason.contains("past the retry budget"), "{reason}");
        assert!(started.elapsed() < Duration::from_millis(400));
        assert_eq!(budget.attempts(), 1);
    }

    #[tokio::test]
    async fn calls_share_one_budget() {
        let budget = quick(Duration::from_millis(200));
        let _ = budget
            .run("harbor", || async { Err::<(), _>(transient(None)) })
            .await;
        let started = Instant::now();
        let _ = budget
            .run("port", || async { Err::<(), _>(transient(None)) })
            .await;
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "the second call had a budget of its own"
        );
    }
}
