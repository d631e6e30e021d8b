//! Port's rate limits, spent with care. Port limits its API per organisation and per family of
//! routes, shared with every other integration of the organisation, and says where each family
//! stands in every answer (`x-ratelimit-limit` requests per `x-ratelimit-period` seconds,
//! `x-ratelimit-remaining`, `x-ratelimit-reset`). The worker spends at most `PORT_RATE_SHARE` of
//! each family's limit, divided among the workers of the fleet: a token bucket per family, at
//! that rate, holding a second of it, so that a lone request never waits and a storm is paced
//! before Port refuses. A 429 (or a family Port says is spent) pauses the family for the whole
//! worker until Port's reset: every request of it waits, none fails for it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use tokio::time::Instant;

use crate::clients::retry_after;
use crate::retry::later;

/// A family of Port's routes, each with a limit of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `POST /v1/blueprints/{bp}/entities`: the scarcest.
    Upsert,
    /// `POST /v1/blueprints/{bp}/entities/bulk`.
    BulkUpsert,
    /// Entity searches.
    Search,
    /// The other entity routes: delete, get, bulk delete.
    Entity,
    /// Everything else (blueprints, tokens).
    Other,
}

impl Family {
    /// Every family.
    pub const ALL: [Self; 5] = [
        Self::Upsert,
        Self::BulkUpsert,
        Self::Search,
        Self::Entity,
        Self::Other,
    ];

    /// Its label on the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Upsert => "upsert",
            Self::BulkUpsert => "bulk_upsert",
            Self::Search => "search",
            Self::Entity => "entity",
            Self::Other => "other",
        }
    }

    /// Port's published limit (requests per 5 minutes), until an answer says otherwise.
    fn published(self) -> f64 {
        match self {
            Self::Upsert => 10_000.0,
            Self::BulkUpsert | Self::Search | Self::Entity => 35_000.0,
            Self::Other => 15_000.0,
        }
    }

    /// Port's published burst, a tenth of the limit (200 for single upserts).
    fn burst(self) -> f64 {
        match self {
            Self::Upsert => 200.0,
            other => other.published() / 10.0,
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// How long a family pauses after a 429 that says nothing of when to come back.
const UNSAID_PAUSE: Duration = Duration::from_secs(1);

/// Port's period when no answer has said it: 5 minutes.
const PUBLISHED_PERIOD: Duration = Duration::from_secs(300);

/// One family's bucket.
#[derive(Debug)]
struct Bucket {
    /// The organisation's rate for the family, in requests per second.
    org_rate: f64,
    /// Port's period for the family: no pause lasts longer (a reset is never further away).
    period: Duration,
    /// Port's burst for the family, as many periods' worth of its rate as published.
    burst_periods: f64,
    tokens: f64,
    updated: Instant,
    /// No request of the family leaves before this.
    paused_until: Option<Instant>,
}

/// What the worker may spend of Port's budget, shared by every Port client of the process.
#[derive(Debug)]
pub struct PortBudget {
    share: f64,
    workers: AtomicUsize,
    buckets: [Mutex<Bucket>; 5],
}

impl PortBudget {
    /// A budget spending `share` (0 < share ≤ 1) of each family's limit.
    pub fn new(share: f64) -> Self {
        let now = Instant::now();
        let bucket = |family: Family| {
            Mutex::new(Bucket {
                org_rate: family.published() / PUBLISHED_PERIOD.as_secs_f64(),
                period: PUBLISHED_PERIOD,
                burst_periods: family.burst() / family.published(),
                tokens: 0.0,
                updated: now,
                paused_until: None,
            })
        };
        let buckets = Family::ALL.map(bucket);
        let budget = Self {
            share: share.clamp(f64::MIN_POSITIVE, 1.0),
            workers: AtomicUsize::new(1),
            buckets,
        };
        for family in Family::ALL {
            // A full bucket to start with: the first requests do not wait.
            if let Ok(mut bucket) = budget.bucket(family).lock() {
                bucket.tokens = budget.capacity(&bucket);
            }
            budget.show(family);
        }
        budget
    }

    /// The workers of the fleet now (they count each other): each spends its part.
    pub fn set_workers(&self, workers: usize) {
        self.workers.store(workers.max(1), Ordering::Relaxed);
        for family in Family::ALL {
            self.show(family);
        }
    }

    fn bucket(&self, family: Family) -> &Mutex<Bucket> {
        &self.buckets[family.index()]
    }

    /// This worker's rate for a family whose organisation rate is `org_rate`.
    fn rate(&self, org_rate: f64) -> f64 {
        org_rate * self.share / self.workers.load(Ordering::Relaxed).max(1) as f64
    }

    /// This worker's part of Port's burst (Port's published burst, in proportion to the limit
    /// Port says), at least a second of its rate and one request: a storm's first requests
    /// leave at once, as Port's own bucket lets them.
    fn capacity(&self, bucket: &Bucket) -> f64 {
        let org_burst = bucket.burst_periods * bucket.org_rate * bucket.period.as_secs_f64();
        let burst = org_burst * self.share / self.workers.load(Ordering::Relaxed).max(1) as f64;
        burst.max(self.rate(bucket.org_rate)).max(1.0)
    }

    fn show(&self, family: Family) {
        if let Ok(bucket) = self.bucket(family).lock() {
            metrics::gauge!("harbor_worker_port_pace_per_second", "family" => family.label())
                .set(self.rate(bucket.org_rate));
        }
    }

    /// Waits until a request of `family` may leave, and takes its token.
    pub async fn admit(&self, family: Family) {
        loop {
            let wait = {
                let Ok(mut bucket) = self.bucket(family).lock() else {
                    return;
                };
                let now = Instant::now();
                match bucket.paused_until {
                    Some(until) if until > now => Some(until - now),
                    _ => {
                        bucket.paused_until = None;
                        let rate = self.rate(bucket.org_rate);
                        let elapsed = now.saturating_duration_since(bucket.updated);
                        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * rate)
                            .min(self.capacity(&bucket));
                        bucket.updated = now;
                        if bucket.tokens >= 1.0 {
                            bucket.tokens -= 1.0;
                            None
                        } else {
                            let missing = (1.0 - bucket.tokens) / rate.max(f64::MIN_POSITIVE);
                            Some(Duration::try_from_secs_f64(missing).unwrap_or(UNSAID_PAUSE))
                        }
                    }
                }
            };
            match wait {
                None => return,
                Some(wait) => {
                    metrics::counter!("harbor_worker_port_waits_total", "family" => family.label())
                        .increment(1);
                    tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
                }
            }
        }
    }

    /// Learns from an answer of `family`: its limit, and whether it is spent. `true` when Port
    /// refused the request for the rate limit (429): it is to be sent again once admitted.
    pub fn observe(&self, family: Family, status: StatusCode, headers: &HeaderMap) -> bool {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        let refused = status == StatusCode::TOO_MANY_REQUESTS;
        let spent = number("x-ratelimit-remaining").is_some_and(|r| r < 1.0);
        let pause = (refused || spent)
            .then(|| retry_after(headers, SystemTime::now()).unwrap_or(UNSAID_PAUSE));
        if let Ok(mut bucket) = self.bucket(family).lock() {
            if let (Some(limit), Some(period)) =
                (number("x-ratelimit-limit"), number("x-ratelimit-period"))
                && limit > 0.0
                && period > 0.0
            {
                bucket.org_rate = limit / period;
                bucket.period = Duration::try_from_secs_f64(period).unwrap_or(PUBLISHED_PERIOD);
            }
            if let Some(pause) = pause {
                let until = later(Instant::now(), pause.min(bucket.period));
                bucket.paused_until = Some(bucket.paused_until.map_or(until, |u| u.max(until)));
                bucket.tokens = 0.0;
            }
        }
        self.show(family);
        let outcome = if refused { "refused" } else { "answered" };
        metrics::counter!("harbor_worker_port_requests_total", "family" => family.label(), "outcome" => outcome)
            .increment(1);
        refused
    }

    /// This worker's rate for `family` now, in requests per second (its gauge shows it).
    #[cfg(test)]
    pub fn pace(&self, family: Family) -> f64 {
        self.bucket(family)
            .lock()
            .map(|b| self.rate(b.org_rate))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[tokio::test(start_paused = true)]
    async fn a_family_is_paced_at_the_share_of_its_limit_divided_among_the_workers() {
        let budget = PortBudget::new(0.5);
        let limit = headers(&[("x-ratelimit-limit", "600"), ("x-ratelimit-period", "60")]);
        assert!(!budget.observe(Family::BulkUpsert, StatusCode::OK, &limit));
        assert_eq!(budget.pace(Family::BulkUpsert), 5.0);
        budget.set_workers(2);
        assert_eq!(budget.pace(Family::BulkUpsert), 2.5);

        // Its part of Port's burst leaves at once (a tenth of the limit, 60, × 0.5 ÷ 2 = 15);
        // then each request waits its turn.
        let started = Instant::now();
        for _ in 0..20 {
            budget.admit(Family::BulkUpsert).await;
        }
        let took = started.elapsed().as_secs_f64();
        assert!(
            took > 1.9 && took < 2.5,
            "15 at once, then 5 at 2.5/s: {took}"
        );
        // Another family is not held by it.
        let started = Instant::now();
        budget.admit(Family::Search).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_the_family_until_ports_reset_and_says_to_send_again() {
        let budget = PortBudget::new(1.0);
        let refused = headers(&[("retry-after", "7"), ("x-ratelimit-remaining", "0")]);
        assert!(budget.observe(Family::Upsert, StatusCode::TOO_MANY_REQUESTS, &refused));
        let started = Instant::now();
        budget.admit(Family::Upsert).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(7) && waited < Duration::from_secs(9));

        // Spent without a refusal: paused all the same, until the reset.
        let spent = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "3")]);
        assert!(!budget.observe(Family::Search, StatusCode::OK, &spent));
        let started = Instant::now();
        budget.admit(Family::Search).await;
        assert!(started.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn no_pause_outlasts_ports_period() {
        let budget = PortBudget::new(1.0);
        let forever = headers(&[
            ("retry-after", "10000000000000000000"),
            ("x-ratelimit-limit", "100"),
            ("x-ratelimit-period", "60"),
        ]);
        budget.observe(Family::Upsert, StatusCode::TOO_MANY_REQUESTS, &forever);
        let started = Instant::now();
        budget.admit(Family::Upsert).await;
        assert!(started.elapsed() <= Duration::from_secs(61));
    }

    #[test]
    fn nonsense_headers_change_nothing() {
        let budget = PortBudget::new(0.5);
        let before = budget.pace(Family::Upsert);
        let nonsense = headers(&[("x-ratelimit-limit", "-5"), ("x-ratelimit-period", "NaN")]);
        budget.observe(Family::Upsert, StatusCode::OK, &nonsense);
        assert_eq!(budget.pace(Family::Upsert), before);
        let zero = headers(&[("x-ratelimit-limit", "100"), ("x-ratelimit-period", "0")]);
        budget.observe(Family::Upsert, StatusCode::OK, &zero);
        assert_eq!(budget.pace(Family::Upsert), before);
    }
}
