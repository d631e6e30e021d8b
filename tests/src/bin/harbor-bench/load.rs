//! Load made of lanes: each lane sends one request at a time, back to back or paced, and tallies
//! the answers. Latency counts from when a request was due, not from when it went out, so a
//! stall shows in full (coordinated omission corrected, as wrk2 does).

use std::time::Duration;

use harbor_sync_tests::percentile;
use tokio::time::Instant;

/// When each lane's requests are due: paced, lane `l` sending its `i`-th request at
/// `start + (i·lanes + l) / rate`, or back to back.
#[derive(Clone, Copy)]
pub struct Schedule {
    start: Instant,
    end: Instant,
    lanes: usize,
    rate: Option<f64>,
}

impl Schedule {
    /// `lanes` lanes for `duration`, at `rate` requests/s in all, or as fast as answers come.
    pub fn new(lanes: usize, duration: Duration, rate: Option<f64>) -> Self {
        let start = Instant::now();
        Self {
            start,
            end: start + duration,
            lanes,
            rate,
        }
    }

    /// Runs `lane` on a task per lane and adds up what they saw.
    pub async fn run<F>(self, lane: impl Fn(Lane) -> F) -> Tally
    where
        F: Future<Output = Tally> + Send + 'static,
    {
        let tasks: Vec<_> = (0..self.lanes)
            .map(|l| tokio::spawn(lane(Lane::new(self, l))))
            .collect();
        let mut total = Tally::default();
        for task in tasks {
            total.add(task.await.expect("a lane panicked"));
        }
        total
    }
}

/// What the lanes of a run saw.
#[derive(Default)]
pub struct Tally {
    latencies: Vec<Duration>,
    pub ok: u64,
    pub failed: u64,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.failed += other.failed;
    }

    /// p50, p99 and p99.9.
    pub fn latency(&mut self) -> String {
        let sorted = self.sorted();
        format!(
            "p50 {:.2?}  p99 {:.2?}  p99.9 {:.2?}",
            percentile(sorted, 0.5),
            percentile(sorted, 0.99),
            percentile(sorted, 0.999)
        )
    }

    /// The p99 alone.
    pub fn p99(&mut self) -> Duration {
        percentile(self.sorted(), 0.99)
    }

    fn sorted(&mut self) -> &[Duration] {
        self.latencies.sort_unstable();
        &self.latencies
    }
}

/// One lane of a [`Schedule`]: hands out its requests when they are due.
pub struct Lane {
    schedule: Schedule,
    lane: usize,
    sent: usize,
    due: Instant,
    tally: Tally,
}

impl Lane {
    fn new(schedule: Schedule, lane: usize) -> Self {
        Self {
            schedule,
            lane,
            sent: 0,
            due: schedule.start,
            tally: Tally::default(),
        }
    }

    /// This lane's number, from 0.
    pub fn index(&self) -> usize {
        self.lane
    }

    /// Waits until the next request is due and returns its number (unique in the run), or
    /// `None` once the schedule has ended.
    pub async fn next(&mut self) -> Option<usize> {
        let n = self.sent * self.schedule.lanes + self.lane;
        let now = Instant::now();
        self.due = match self.schedule.rate {
            Some(rate) => self.schedule.start + Duration::from_secs_f64(n as f64 / rate),
            None => now,
        };
        if self.due >= self.schedule.end {
            return None;
        }
        // Only when the request is not yet due: tokio's timer rounds up to the next
        // millisecond, which would hold back a request due now.
        if self.due > now {
            tokio::time::sleep_until(self.due).await;
        }
        self.sent += 1;
        Some(n)
    }

    /// Records the answer to the request [`next`](Self::next) handed out.
    pub fn answered(&mut self, ok: bool) {
        self.tally.latencies.push(self.due.elapsed());
        if ok {
            self.tally.ok += 1;
        } else {
            self.tally.failed += 1;
        }
    }

    /// What this lane saw.
    pub fn tally(self) -> Tally {
        self.tally
    }
}
