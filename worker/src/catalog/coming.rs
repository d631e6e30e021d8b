//! What is still coming to the searches and writes waiting to go to Port, and so how long a
//! request that is not full waits: while refreshes in flight have not yet asked or written
//! theirs, and in a storm (at least [`STORM`] refreshes started in the last [`WINDOW`]) for as
//! long as it lasts and more refreshes can start (for writes: fewer run than the worker's
//! concurrency; searches wait regardless, as the writes in flight free places as they are
//! answered); never more than [`LINGER`] after its oldest part came. A lone refresh's request,
//! or one of a steady trickle, leaves at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The longest a request that is not full waits for what is still coming.
pub const LINGER: Duration = Duration::from_millis(500);

/// As many refreshes starting within [`WINDOW`] are a storm, worth waiting for (64 a second:
/// a webhook every 50 ms, which may start two, is not one).
pub const STORM: usize = 16;

/// See [`STORM`]. Long enough to span the gaps between a storm's bursts on a loaded machine
/// (bursts of about 16 refreshes, 40-160 ms apart in `harbor-bench port-budget`): a storm
/// that seems over between two bursts sends its requests not full.
pub const WINDOW: Duration = Duration::from_millis(250);

/// The refreshes in flight that may still ask or write, and when the latest [`STORM`] started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flight {
    /// In flight, that may still ask or write.
    pub count: usize,
    /// In flight, and the most that may be.
    running: usize,
    capacity: usize,
    /// When the latest refreshes started, in a ring; `next` is the oldest's place.
    starts: [Option<Instant>; STORM],
    next: usize,
}

impl Flight {
    /// As the searches see it: refreshes waiting for their writes' answers free their places as
    /// those come (the writer never waits for a search), so more may start even at capacity.
    pub fn searching(self) -> Self {
        Self {
            capacity: usize::MAX,
            ..self
        }
    }

    /// Until when a request whose oldest part came at `since` waits, at `now`; `None`: it
    /// goes. `unheard`: refreshes in flight have still to ask or write theirs.
    pub fn wait_until(&self, since: Instant, unheard: bool, now: Instant) -> Option<Instant> {
        let deadline = since + LINGER;
        if now >= deadline {
            return None;
        }
        if unheard {
            return Some(deadline);
        }
        if self.running >= self.capacity {
            // Nothing more can start before these are done.
            return None;
        }
        // The storm lasts while the oldest of the latest starts is within the window.
        let storm_ends = self.starts[self.next]? + WINDOW;
        (storm_ends > now).then_some(storm_ends.min(deadline))
    }
}

/// The refreshes in flight that may still ask or write: a request that is not full waits for
/// them.
#[derive(Debug)]
pub struct Coming {
    flight: watch::Sender<Flight>,
}

impl Coming {
    /// For a worker running at most `capacity` refreshes at once.
    pub fn new(capacity: usize) -> Self {
        Self {
            flight: watch::Sender::new(Flight {
                capacity,
                ..Flight::default()
            }),
        }
    }

    /// A refresh starts that may write.
    pub fn expect(self: &Arc<Self>) -> Expected {
        self.flight.send_modify(|flight| {
            flight.count += 1;
            flight.running += 1;
            flight.starts[flight.next] = Some(Instant::now());
            flight.next = (flight.next + 1) % STORM;
        });
        Expected {
            coming: Some(Arc::clone(self)),
            writing: true,
        }
    }

    /// The refreshes in flight, to read and to wait on.
    pub fn watch(&self) -> watch::Receiver<Flight> {
        self.flight.subscribe()
    }
}

/// One refresh in flight, until dropped; it may still write until [`written`](Self::written).
pub struct Expected {
    coming: Option<Arc<Coming>>,
    writing: bool,
}

impl Expected {
    /// For a catalog that does not wait for anyone.
    pub fn none() -> Self {
        Self {
            coming: None,
            writing: false,
        }
    }

    /// The refresh has queued its writes (or has none).
    pub fn written(&mut self) {
        if let Some(coming) = self.coming.as_ref().filter(|_| self.writing) {
            coming
                .flight
                .send_modify(|flight| flight.count = flight.count.saturating_sub(1));
        }
        self.writing = false;
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.written();
        if let Some(coming) = self.coming.take() {
            coming
                .flight
                .send_modify(|flight| flight.running = flight.running.saturating_sub(1));
        }
    }
}

/// Gathers into `pending` what `incoming` brings, for as long as `wait` (of what is pending
/// and the refreshes in flight) says, or until `incoming` ends.
pub async fn gather<T>(
    incoming: &mut mpsc::UnboundedReceiver<T>,
    pending: &mut VecDeque<T>,
    flight: &mut watch::Receiver<Flight>,
    wait: impl Fn(&VecDeque<T>, Flight) -> Option<Instant>,
) {
    loop {
        while let Ok(item) = incoming.try_recv() {
            pending.push_back(item);
        }
        let Some(until) = wait(pending, *flight.borrow_and_update()) else {
            return;
        };
        tokio::select! {
            item = incoming.recv() => match item {
                Some(item) => pending.push_back(item),
                None => return,
            },
            // The sender lives as long as the catalog: a refresh's drop still changes it.
            changed = flight.changed() => if changed.is_err() {
                return;
            },
            () = tokio::time::sleep_until(until) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_lone_request_goes_at_once_and_a_storm_is_waited_for_within_the_linger() {
        let t0 = Instant::now();
        let started = |at: &[Instant]| {
            let mut flight = Flight {
                capacity: 64,
                ..Flight::default()
            };
            for start in at {
                flight.starts[flight.next] = Some(*start);
                flight.next = (flight.next + 1) % STORM;
            }
            flight
        };
        // A webhook every 50 ms: nothing else is coming.
        let trickle: Vec<Instant> = (0..20u32).map(|n| t0 + n * 50 * MS).collect();
        let now = t0 + 19 * 50 * MS + MS;
        assert_eq!(started(&trickle).wait_until(now, false, now), None);
        // The same webhooks each starting two refreshes (a push: its repository's, its
        // project's): still no storm.
        let doubled: Vec<Instant> = (0..40u32).map(|n| t0 + (n / 2) * 50 * MS).collect();
        assert_eq!(started(&doubled).wait_until(now, false, now), None);
        // Bursts of 16 refreshes 160 ms apart (a storm on a loaded machine): between two, the
        // storm lasts.
        let bursts: Vec<Instant> = (0..48u32).map(|n| t0 + (n / 16) * 160 * MS).collect();
        let between = t0 + 420 * MS;
        assert_eq!(
            started(&bursts).wait_until(between, false, between),
            Some(t0 + 320 * MS + WINDOW)
        );
        // A refresh in flight has not written yet: up to the linger.
        assert_eq!(
            started(&trickle).wait_until(now, true, now),
            Some(now + LINGER)
        );
        // A burst: until the window after the oldest of the latest starts.
        let burst: Vec<Instant> = (0..20u32).map(|n| t0 + n * MS).collect();
        let storm = started(&burst);
        let oldest = t0 + (20 - STORM as u32) * MS;
        assert_eq!(
            storm.wait_until(t0 + 20 * MS, false, t0 + 20 * MS),
            Some(oldest + WINDOW)
        );
        // The storm passed: it goes.
        assert_eq!(storm.wait_until(t0, false, oldest + WINDOW), None);
        // As many run as may: nothing more can start.
        let full = Flight {
            running: 64,
            ..storm
        };
        assert_eq!(full.wait_until(t0 + 20 * MS, false, t0 + 20 * MS), None);
        // Unless for searches: the writes those wait for free their places as they are answered.
        assert_eq!(
            full.searching()
                .wait_until(t0 + 20 * MS, false, t0 + 20 * MS),
            Some(oldest + WINDOW)
        );
        // Never past the linger, however long the storm.
        let late: Vec<Instant> = (0..20u32).map(|n| t0 + LINGER + n * MS).collect();
        assert_eq!(
            started(&late).wait_until(t0 + MS, false, t0 + LINGER),
            Some(t0 + MS + LINGER)
        );
        assert_eq!(
            started(&late).wait_until(t0 + MS, true, t0 + MS + LINGER),
            None
        );
    }
}
