//! What runs when: the worker's refreshes, one per key at a time.
//!
//! A refresh reads Harbor and writes Port. Two refreshes of the same thing running side by side
//! can land in either order, so the older read can overwrite the newer; one after the other, the
//! later one always reads (and writes) the newer state. The [`Scheduler`] therefore never runs
//! two refreshes of one key at once, as a Kubernetes controller never runs two reconciles of one
//! object at once:
//!
//! - a request that arrives while its key is idle starts a refresh (once a slot is free:
//!   `concurrency` refreshes run at once);
//! - requests that arrive while their key is being refreshed wait, and are folded into exactly
//!   one more refresh after it, which reads Harbor after they all arrived;
//! - a request with a delay (a pull waiting for Harbor to count it) waits until that long after
//!   the latest delayed request of its key, at most five delays after its own arrival, so that a
//!   flood of pulls becomes one refresh; [`Scheduler::hurry`] ends such waits early (when the
//!   consumer holds nearly as many deliveries as the broker will send it);
//! - a refresh that fails transiently is not retried in place: its requests wait (backoff, or
//!   what the server asked) and are folded into the next refresh, which reads Harbor again, so a
//!   retry never writes what it read before the failure. The retry budget is counted per
//!   request from its first refresh;
//! - a request not settled within `max_hold` fails, so that no delivery outlives the broker's
//!   patience.
//!
//! What a key is, what a refresh does and what it did for each request is the [`Reconcile`]
//! implementation's business; this module knows neither RabbitMQ nor Harbor.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backoff::ExponentialBackoffBuilder;
use backoff::backoff::Backoff;
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::retry::{RetryPolicy, later};

/// How many delays a delayed request may wait in all, however many follow it.
const MAX_DELAYS: u32 = 5;

/// What a request asks of a refresh; the requests folded into one refresh are merged.
pub trait Work: Clone + Send + Sync + 'static {
    /// Adds what `other` asks to what `self` asks.
    fn merge(&mut self, other: &Self);
}

/// What runs a refresh, and tells each request what became of it.
pub trait Reconcile: Send + Sync + 'static {
    /// What is refreshed: never two refreshes of one key at once.
    type Key: Clone + Ord + Hash + Debug + Send + Sync + 'static;
    /// What a request asks for.
    type Work: Work;
    /// What a refresh did.
    type Report: Send + 'static;

    /// Refreshes `key`, doing at least `work`.
    fn run(&self, key: &Self::Key, work: &Self::Work) -> impl Future<Output = Self::Report> + Send;

    /// What the refresh that made `report` did for a request that asked `asked`.
    fn judge(&self, report: &Self::Report, asked: &Self::Work) -> Judgement<Self::Key, Self::Work>;
}

/// What a refresh did for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement<K, W> {
    /// Done.
    Done,
    /// Failed in a way another refresh may not: refresh again after `after` (or the backoff).
    Retry {
        /// Why, for the log and, when the budget is spent, the parked message.
        reason: String,
        /// What the server asked to wait.
        after: Option<Duration>,
    },
    /// Failed for good.
    Failed(String),
    /// These must be refreshed first; then this request's key is refreshed again.
    After(Vec<(K, W)>),
}

/// A request for a refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<K, W> {
    /// What to refresh.
    pub key: K,
    /// What of it.
    pub work: W,
    /// Wait this long after the latest delayed request of the same key (zero: at once).
    pub delay: Duration,
    /// Which [`Scheduler::hurry`] ends its wait (the consumer's queue, say).
    pub group: usize,
}

/// Why a request failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("{reason}")]
pub struct Failure {
    /// The last error.
    pub reason: String,
    /// Refreshes tried for it.
    pub attempts: u32,
}

/// What became of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// A refresh that started after the request arrived did what it asked.
    Done,
    /// It failed for good, or its retry budget or hold time ran out.
    Failed(Failure),
    /// [`Scheduler::abort`] dropped it: nothing is known of it.
    Aborted,
}

/// How the scheduler runs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Refreshes at once.
    pub concurrency: usize,
    /// Backoff between refreshes of a failed request, and its budget.
    pub retry: RetryPolicy,
    /// A request not settled this long after it arrived fails.
    pub max_hold: Duration,
}

/// Runs refreshes for requests; cheap to clone, every clone drives the same driver task.
pub struct Scheduler<R: Reconcile> {
    commands: mpsc::UnboundedSender<Command<R::Key, R::Work>>,
    died: CancellationToken,
}

impl<R: Reconcile> Clone for Scheduler<R> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            died: self.died.clone(),
        }
    }
}

enum Command<K, W> {
    Submit(Request<K, W>, oneshot::Sender<Settled>),
    Hurry(Option<usize>),
    Abort(oneshot::Sender<()>),
}

impl<R: Reconcile> Scheduler<R> {
    /// Starts the driver task; it ends when the last clone is dropped, aborting what runs.
    pub fn start(reconciler: Arc<R>, limits: Limits) -> Self {
        let (commands, received) = mpsc::unbounded_channel();
        let driver = Driver {
            reconciler,
            limits,
            next_id: 0,
            waiters: HashMap::new(),
            keys: HashMap::new(),
            ready: VecDeque::new(),
            timers: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            tasks: JoinSet::new(),
        };
        let died = CancellationToken::new();
        let on_panic = died.clone();
        tokio::spawn(async move {
            // A panic here would leave every later request unanswered while the process looks
            // alive: say so, so that its owner can stop (its deliveries go back to the queue).
            if let Err(panic) = AssertUnwindSafe(driver.drive(received))
                .catch_unwind()
                .await
            {
                tracing::error!(panic = %panic_message(&*panic), "The refresh scheduler panicked");
                on_panic.cancel();
            }
        });
        Self { commands, died }
    }

    /// Cancelled when the driver task panicked: no request will be answered any more.
    pub fn died(&self) -> CancellationToken {
        self.died.clone()
    }

    /// Asks for a refresh; resolves once one has done what `request` asks, or it failed.
    pub fn submit(
        &self,
        request: Request<R::Key, R::Work>,
    ) -> impl Future<Output = Settled> + Send + 'static {
        let (reply, settled) = oneshot::channel();
        let sent = self.commands.send(Command::Submit(request, reply)).is_ok();
        async move {
            if sent {
                settled.await.unwrap_or(Settled::Aborted)
            } else {
                Settled::Aborted
            }
        }
    }

    /// Ends the delay of the requests of `group` (every group with `None`) that wait for their
    /// first refresh: they are refreshed as soon as their keys allow. Retries keep their waits.
    pub fn hurry(&self, group: Option<usize>) {
        let _ = self.commands.send(Command::Hurry(group));
    }

    /// Stops every refresh and drops every request (each resolves as [`Settled::Aborted`]);
    /// resolves once no refresh runs any more.
    pub async fn abort(&self) {
        let (done, stopped) = oneshot::channel();
        if self.commands.send(Command::Abort(done)).is_ok() {
            let _ = stopped.await;
        }
    }
}

/// Who is told when a request settles.
enum Reply {
    /// The submitter.
    Submitter(oneshot::Sender<Settled>),
    /// A request that waits for this one ([`Judgement::After`]).
    Parent(u64),
}

struct Waiter<K, W> {
    key: K,
    work: W,
    group: usize,
    delay: Duration,
    arrival: Instant,
    /// When it may be refreshed; `None` while it waits for the requests it depends on.
    due: Option<Instant>,
    /// Part of a refresh that runs now.
    running: bool,
    attempts: u32,
    /// Set by its first refresh: retries end here.
    retry_until: Option<Instant>,
    backoff: backoff::ExponentialBackoff,
    /// Requests it waits for.
    pending: usize,
    reply: Reply,
}

#[derive(Default)]
struct KeyState {
    running: bool,
    in_ready: bool,
    /// Requests not refreshed yet.
    fresh: Vec<u64>,
    /// Requests refreshed before, waiting for a retry or for the requests they depend on.
    again: Vec<u64>,
}

impl KeyState {
    /// The requests waiting for a refresh of the key.
    fn queued(&self) -> impl Iterator<Item = &u64> {
        self.fresh.iter().chain(&self.again)
    }

    fn is_idle(&self) -> bool {
        self.fresh.is_empty() && self.again.is_empty()
    }
}

type Finished<K, W> = (K, Vec<u64>, Result<W, String>);

struct Driver<R: Reconcile> {
    reconciler: Arc<R>,
    limits: Limits,
    next_id: u64,
    waiters: HashMap<u64, Waiter<R::Key, R::Work>>,
    keys: HashMap<R::Key, KeyState>,
    /// Keys with a due request and no refresh running, oldest first.
    ready: VecDeque<R::Key>,
    /// When to look at a key again (stale entries are harmless: looking finds nothing due).
    timers: BTreeSet<(Instant, R::Key)>,
    deadlines: BTreeSet<(Instant, u64)>,
    tasks: JoinSet<Finished<R::Key, R::Report>>,
}

impl<R: Reconcile> Driver<R> {
    async fn drive(mut self, mut commands: mpsc::UnboundedReceiver<Command<R::Key, R::Work>>) {
        loop {
            self.start_ready();
            let wake = self.next_wake();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Submit(request, reply)) => {
                        self.submit(request, Reply::Submitter(reply));
                    }
                    Some(Command::Hurry(group)) => self.hurry(group),
                    Some(Command::Abort(done)) => {
                        self.abort().await;
                        let _ = done.send(());
                    }
                    None => {
                        self.abort().await;
                        return;
                    }
                },
                Some(finished) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    // The task catches panics itself; a join error is an abort, handled there.
                    if let Ok(finished) = finished {
                        self.finished(finished);
                    }
                }
                () = sleep_until(wake), if wake.is_some() => self.wake(),
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let timer = self.timers.first().map(|(at, _)| *at);
        let deadline = self.deadlines.first().map(|(at, _)| *at);
        timer.into_iter().chain(deadline).min()
    }

    fn submit(&mut self, request: Request<R::Key, R::Work>, reply: Reply) -> u64 {
        let now = Instant::now();
        let id = self.next_id;
        self.next_id += 1;
        if !request.delay.is_zero() {
            // A flood of delayed requests is refreshed once: each new one pushes back the wait
            // of those of its key not yet refreshed, within their own limit.
            let fresh = self.keys.get(&request.key).map(|k| k.fresh.as_slice());
            for other in fresh.into_iter().flatten() {
                if let Some(w) = self.waiters.get_mut(other)
                    && !w.delay.is_zero()
                    && let Some(due) = w.due
                {
                    let pushed = later(now, w.delay).min(later(w.arrival, w.delay * MAX_DELAYS));
                    w.due = Some(due.max(pushed));
                }
            }
        }
        // An immediate request of a key whose refresh failed and waits to be retried joins that
        // retry: it reads after this request arrived, and the server asked us to wait.
        let retry_due = match request.delay.is_zero() {
            true => self.keys.get(&request.key).and_then(|k| {
                k.again
                    .iter()
                    .filter_map(|id| self.waiters.get(id))
                    .filter_map(|w| w.due)
                    .min()
            }),
            false => None,
        };
        let due = retry_due.unwrap_or(now).max(later(now, request.delay));
        self.deadlines
            .insert((later(now, self.limits.max_hold), id));
        self.waiters.insert(
            id,
            Waiter {
                key: request.key.clone(),
                work: request.work,
                group: request.group,
                delay: request.delay,
                arrival: now,
                due: Some(due),
                running: false,
                attempts: 0,
                retry_until: None,
                // The builder, not a struct literal over `default()`: that would keep the
                // default's current interval (500 ms) for the first wait.
                backoff: ExponentialBackoffBuilder::new()
                    .with_initial_interval(self.limits.retry.initial_interval)
                    .with_max_interval(self.limits.retry.max_interval)
                    .with_max_elapsed_time(None)
                    .build(),
                pending: 0,
                reply,
            },
        );
        self.keys
            .entry(request.key.clone())
            .or_default()
            .fresh
            .push(id);
        self.look_at(&request.key, now);
        id
    }

    /// Queues `key` for a refresh if a request of it is due, else sets a timer for the next.
    fn look_at(&mut self, key: &R::Key, now: Instant) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        if state.running {
            return;
        }
        if state.is_idle() {
            self.keys.remove(key);
            return;
        }
        let next_due = state
            .queued()
            .filter_map(|id| self.waiters.get(id)?.due)
            .min();
        match next_due {
            Some(due) if due <= now && !state.in_ready => {
                state.in_ready = true;
                self.ready.push_back(key.clone());
            }
            Some(due) if due <= now => {}
            Some(due) => {
                self.timers.insert((due, key.clone()));
            }
            None => {}
        }
    }

    fn start_ready(&mut self) {
        let now = Instant::now();
        while self.tasks.len() < self.limits.concurrency {
            let Some(key) = self.ready.pop_front() else {
                return;
            };
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            state.in_ready = false;
            let waiters = &self.waiters;
            let due = |id: &u64| {
                waiters
                    .get(id)
                    .and_then(|w| w.due)
                    .is_some_and(|d| d <= now)
            };
            let first_delayed = |id: &u64| {
                waiters
                    .get(id)
                    .is_some_and(|w| w.attempts == 0 && !w.delay.is_zero() && w.due.is_some())
            };
            // When a delayed request's wait ends, the other delayed ones of its key go along:
            // a flood of pulls is one refresh even when its first pull's wait ran out.
            if state.running {
                continue;
            }
            let with_delayed = state.queued().any(|id| due(id) && first_delayed(id));
            let taken = |id: &u64| due(id) || (with_delayed && first_delayed(id));
            let (mut batch, fresh): (Vec<u64>, Vec<u64>) =
                state.fresh.iter().partition(|id| taken(id));
            let (again_taken, again): (Vec<u64>, Vec<u64>) =
                state.again.iter().partition(|id| taken(id));
            batch.extend(again_taken);
            if batch.is_empty() {
                continue;
            }
            state.running = true;
            (state.fresh, state.again) = (fresh, again);
            let mut work: Option<R::Work> = None;
            for id in &batch {
                if let Some(w) = self.waiters.get_mut(id) {
                    w.running = true;
                    w.attempts += 1;
                    w.retry_until
                        .get_or_insert(later(now, self.limits.retry.max_elapsed));
                    match &mut work {
                        Some(merged) => merged.merge(&w.work),
                        None => work = Some(w.work.clone()),
                    }
                }
            }
            let Some(work) = work else { continue };
            if batch.len() > 1 {
                metrics::counter!("harbor_worker_events_coalesced_total")
                    .increment(batch.len() as u64 - 1);
            }
            metrics::gauge!("harbor_worker_refreshes_in_flight").increment(1.0);
            let reconciler = Arc::clone(&self.reconciler);
            self.tasks.spawn(async move {
                let run = AssertUnwindSafe(reconciler.run(&key, &work)).catch_unwind();
                let report = run.await.map_err(|panic| panic_message(&*panic));
                metrics::gauge!("harbor_worker_refreshes_in_flight").decrement(1.0);
                (key, batch, report)
            });
        }
    }

    fn finished(&mut self, (key, batch, report): Finished<R::Key, R::Report>) {
        let now = Instant::now();
        if let Some(state) = self.keys.get_mut(&key) {
            state.running = false;
        }
        for id in batch {
            let Some(w) = self.waiters.get_mut(&id) else {
                continue; // settled meanwhile (its hold time ran out)
            };
            // Still `running` while it is judged: a request settled now is in no queue, and
            // the key is looked at once, after the whole batch.
            let judgement = match &report {
                Ok(report) => self.reconciler.judge(report, &w.work),
                Err(panic) => Judgement::Failed(format!("the handler panicked: {panic}")),
            };
            match judgement {
                Judgement::Done => self.settle(id, Settled::Done, now),
                Judgement::Failed(reason) => {
                    let attempts = w.attempts;
                    self.settle(id, Settled::Failed(Failure { reason, attempts }), now);
                }
                Judgement::Retry { reason, after } => {
                    let backoff = w.backoff.next_backoff().unwrap_or_default();
                    let wait = after.map_or(backoff, |after| after.max(backoff));
                    let due = later(now, wait);
                    if w.retry_until.is_some_and(|until| due > until) {
                        let attempts = w.attempts;
                        let reason = match after {
                            Some(after) => {
                                format!("{reason} (asked to wait {after:?}, past the retry budget)")
                            }
                            None => reason,
                        };
                        self.settle(id, Settled::Failed(Failure { reason, attempts }), now);
                    } else {
                        tracing::warn!(key = ?w.key, %reason, wait_ms = wait.as_millis() as u64, "Refresh failed; refreshing again");
                        metrics::counter!("harbor_worker_refresh_retries_total").increment(1);
                        w.running = false;
                        w.due = Some(due);
                        self.requeue(id);
                    }
                }
                Judgement::After(first) => {
                    let (group, count) = (w.group, first.len());
                    w.running = false;
                    w.due = None;
                    w.pending = count;
                    self.requeue(id);
                    if count == 0 {
                        self.dependencies_done(id, now);
                    }
                    for (key, work) in first {
                        let request = Request {
                            key,
                            work,
                            delay: Duration::ZERO,
                            group,
                        };
                        self.submit(request, Reply::Parent(id));
                    }
                }
            }
        }
        self.look_at(&key, now);
    }

    fn requeue(&mut self, id: u64) {
        if let Some(w) = self.waiters.get(&id) {
            self.keys.entry(w.key.clone()).or_default().again.push(id);
        }
    }

    fn dependencies_done(&mut self, id: u64, now: Instant) {
        if let Some(w) = self.waiters.get_mut(&id) {
            w.due = Some(now);
            let key = w.key.clone();
            self.look_at(&key, now);
        }
    }

    /// Removes the request and tells whoever waits for it.
    fn settle(&mut self, id: u64, settled: Settled, now: Instant) {
        let Some(w) = self.waiters.remove(&id) else {
            return;
        };
        // A request that runs is in no queue.
        if !w.running
            && let Some(state) = self.keys.get_mut(&w.key)
        {
            state.fresh.retain(|other| *other != id);
            state.again.retain(|other| *other != id);
        }
        self.deadlines
            .remove(&(later(w.arrival, self.limits.max_hold), id));
        if !w.running {
            self.look_at(&w.key, now);
        }
        match w.reply {
            Reply::Submitter(reply) => {
                let _ = reply.send(settled);
            }
            Reply::Parent(parent) => match settled {
                Settled::Done => {
                    let all_done = self.waiters.get_mut(&parent).is_some_and(|p| {
                        p.pending = p.pending.saturating_sub(1);
                        p.pending == 0
                    });
                    if all_done {
                        self.dependencies_done(parent, now);
                    }
                }
                Settled::Failed(failure) => self.settle(parent, Settled::Failed(failure), now),
                Settled::Aborted => self.settle(parent, Settled::Aborted, now),
            },
        }
    }

    fn wake(&mut self) {
        let now = Instant::now();
        while let Some((at, key)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            self.look_at(&key, now);
        }
        while let Some((at, id)) = self.deadlines.first().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let attempts = self.waiters.get(&id).map_or(0, |w| w.attempts);
            let reason = format!(
                "not done within {} of its arrival; given up so that the broker does not take the delivery back",
                humantime::format_duration(self.limits.max_hold)
            );
            self.settle(id, Settled::Failed(Failure { reason, attempts }), now);
        }
    }

    fn hurry(&mut self, group: Option<usize>) {
        let now = Instant::now();
        let mut keys = BTreeSet::new();
        for w in self.waiters.values_mut() {
            let waiting_first_refresh = w.attempts == 0 && !w.delay.is_zero();
            if waiting_first_refresh
                && group.is_none_or(|g| g == w.group)
                && w.due.is_some_and(|due| due > now)
            {
                w.due = Some(now);
                keys.insert(w.key.clone());
            }
        }
        if !keys.is_empty() {
            metrics::counter!("harbor_worker_pull_windows_cut_total").increment(1);
        }
        for key in keys {
            self.look_at(&key, now);
        }
    }

    async fn abort(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let now = Instant::now();
        // No key left to look at: settling each request is then O(1).
        self.keys.clear();
        let ids: Vec<u64> = self.waiters.keys().copied().collect();
        for id in ids {
            self.settle(id, Settled::Aborted, now);
        }
        self.ready.clear();
        self.timers.clear();
        self.deadlines.clear();
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use tokio::sync::Semaphore;
    use tokio::time::sleep;

    use super::*;

    type Items = BTreeSet<u32>;

    impl Work for Items {
        fn merge(&mut self, other: &Self) {
            self.extend(other.iter().copied());
        }
    }

    /// A reconciler that reports each refresh it starts, holds it until the test lets it
    /// finish, and answers what the test scripted for the key (`Done` by default).
    struct Probe {
        started: mpsc::UnboundedSender<(String, Items, Instant)>,
        gate: Semaphore,
        script: Mutex<HashMap<String, VecDeque<Judgement<String, Items>>>>,
        running: Mutex<HashMap<String, usize>>,
        overlapped: Mutex<bool>,
    }

    impl Reconcile for Probe {
        type Key = String;
        type Work = Items;
        type Report = Judgement<String, Items>;

        async fn run(&self, key: &String, work: &Items) -> Self::Report {
            {
                let mut running = self.running.lock().unwrap();
                let count = running.entry(key.clone()).or_default();
                *count += 1;
                if *count > 1 {
                    *self.overlapped.lock().unwrap() = true;
                }
            }
            let _ = self
                .started
                .send((key.clone(), work.clone(), Instant::now()));
            if work.contains(&666) {
                panic!("a bug");
            }
            self.gate.acquire().await.unwrap().forget();
            *self.running.lock().unwrap().get_mut(key).unwrap() -= 1;
            let mut script = self.script.lock().unwrap();
            script
                .get_mut(key)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Judgement::Done)
        }

        fn judge(&self, report: &Self::Report, _asked: &Items) -> Judgement<String, Items> {
            report.clone()
        }
    }

    struct Harness {
        scheduler: Scheduler<Probe>,
        probe: Arc<Probe>,
        started: mpsc::UnboundedReceiver<(String, Items, Instant)>,
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn harness(concurrency: usize, open: bool) -> Harness {
        let (tx, started) = mpsc::unbounded_channel();
        let probe = Arc::new(Probe {
            started: tx,
            gate: Semaphore::new(if open { Semaphore::MAX_PERMITS } else { 0 }),
            script: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            overlapped: Mutex::new(false),
        });
        let limits = Limits {
            concurrency,
            retry: RetryPolicy {
                max_elapsed: 60 * SECOND,
                // Not the backoff crate's default (500 ms), so that a test can tell them apart.
                initial_interval: 2 * SECOND,
                max_interval: 10 * SECOND,
            },
            max_hold: 600 * SECOND,
        };
        Harness {
            scheduler: Scheduler::start(Arc::clone(&probe), limits),
            probe,
            started,
        }
    }

    impl Harness {
        fn submit(
            &self,
            key: &str,
            items: &[u32],
            delay: Duration,
        ) -> tokio::task::JoinHandle<Settled> {
            let request = Request {
                key: key.to_owned(),
                work: items.iter().copied().collect(),
                delay,
                group: 0,
            };
            tokio::spawn(self.scheduler.submit(request))
        }

        async fn next_start(&mut self) -> (String, Items, Instant) {
            self.started.recv().await.unwrap()
        }

        fn nothing_started(&mut self) -> bool {
            self.started.try_recv().is_err()
        }

        fn release(&self, runs: usize) {
            self.probe.gate.add_permits(runs);
        }

        fn script(&self, key: &str, judgements: Vec<Judgement<String, Items>>) {
            self.probe
                .script
                .lock()
                .unwrap()
                .insert(key.to_owned(), judgements.into());
        }
    }

    fn items(list: &[u32]) -> Items {
        list.iter().copied().collect()
    }

    /// Lets the driver and the spawned tasks run until they all wait.
    async fn settle_down() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_arriving_while_their_key_runs_fold_into_exactly_one_more_refresh() {
        let mut h = harness(4, false);
        let first = h.submit("repo", &[1], Duration::ZERO);
        assert_eq!(h.next_start().await.1, items(&[1]));
        let later: Vec<_> = (2..=4)
            .map(|n| h.submit("repo", &[n], Duration::ZERO))
            .collect();
        settle_down().await;
        assert!(
            h.nothing_started(),
            "a second refresh of the key started beside the first"
        );

        h.release(1);
        assert_eq!(first.await.unwrap(), Settled::Done);
        assert_eq!(h.next_start().await.1, items(&[2, 3, 4]));
        h.release(1);
        for request in later {
            assert_eq!(request.await.unwrap(), Settled::Done);
        }
        settle_down().await;
        assert!(h.nothing_started());
        assert!(!*h.probe.overlapped.lock().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn different_keys_run_side_by_side_up_to_the_concurrency() {
        let mut h = harness(2, false);
        let requests: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|key| h.submit(key, &[1], Duration::ZERO))
            .collect();
        let mut keys = vec![h.next_start().await.0, h.next_start().await.0];
        settle_down().await;
        assert!(h.nothing_started(), "more refreshes than the concurrency");
        h.release(1);
        keys.push(h.next_start().await.0);
        keys.sort();
        assert_eq!(keys, ["a", "b", "c"]);
        h.release(2);
        for request in requests {
            assert_eq!(request.await.unwrap(), Settled::Done);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_arriving_while_waiting_for_a_slot_join_that_refresh() {
        let mut h = harness(1, false);
        let _busy = h.submit("busy", &[1], Duration::ZERO);
        h.next_start().await;
        let waiting: Vec<_> = (1..=3)
            .map(|n| h.submit("repo", &[n], Duration::ZERO))
            .collect();
        h.release(1);
        assert_eq!(
            h.next_start().await,
            ("repo".into(), items(&[1, 2, 3]), Instant::now())
        );
        h.release(1);
        for request in waiting {
            assert_eq!(request.await.unwrap(), Settled::Done);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_requests_wait_for_the_latest_of_their_key_within_five_delays() {
        let mut h = harness(4, true);
        let start = Instant::now();
        let window = 10 * SECOND;
        let mut pulls = vec![h.submit("pull", &[1], window)];
        sleep(4 * SECOND).await;
        pulls.push(h.submit("pull", &[2], window));
        let (_, work, at) = h.next_start().await;
        assert_eq!(work, items(&[1, 2]));
        assert_eq!(at - start, 14 * SECOND, "10 s after the last pull");
        for pull in pulls {
            assert_eq!(pull.await.unwrap(), Settled::Done);
        }

        // A pull every 5 s for ever: refreshed after five windows all the same.
        let start = Instant::now();
        let flood = tokio::spawn({
            let scheduler = h.scheduler.clone();
            async move {
                for n in 0..30 {
                    let request = Request {
                        key: "pull".to_owned(),
                        work: items(&[n]),
                        delay: window,
                        group: 0,
                    };
                    drop(tokio::spawn(scheduler.submit(request)));
                    sleep(5 * SECOND).await;
                }
            }
        });
        let (_, work, at) = h.next_start().await;
        assert_eq!(at - start, 50 * SECOND);
        // Every pull that came before it (the one due at the same instant may or may not).
        assert!(
            work.is_superset(&(0..=9).collect()) && !work.contains(&11),
            "{work:?}"
        );
        flood.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_immediate_request_does_not_take_the_delayed_ones_along() {
        let mut h = harness(4, true);
        let start = Instant::now();
        let pull = h.submit("repo", &[1], 10 * SECOND);
        let push = h.submit("repo", &[2], Duration::ZERO);
        assert_eq!(h.next_start().await.1, items(&[2]));
        assert_eq!(push.await.unwrap(), Settled::Done);
        let (_, work, at) = h.next_start().await;
        assert_eq!((work, at - start), (items(&[1]), 10 * SECOND));
        assert_eq!(pull.await.unwrap(), Settled::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn hurry_ends_the_wait_of_its_group_only_and_not_a_retry_wait() {
        let mut h = harness(4, true);
        let start = Instant::now();
        let request = |key: &str, group| Request {
            key: key.to_owned(),
            work: items(&[1]),
            delay: 60 * SECOND,
            group,
        };
        let zero = tokio::spawn(h.scheduler.submit(request("zero", 0)));
        let _one = tokio::spawn(h.scheduler.submit(request("one", 1)));
        h.script(
            "retried",
            vec![Judgement::Retry {
                reason: "429".into(),
                after: Some(30 * SECOND),
            }],
        );
        let retried = h.submit("retried", &[1], Duration::ZERO);
        assert_eq!(h.next_start().await.0, "retried");
        sleep(SECOND).await;

        h.scheduler.hurry(Some(0));
        let (key, _, at) = h.next_start().await;
        assert_eq!((key.as_str(), at - start), ("zero", SECOND));
        assert_eq!(zero.await.unwrap(), Settled::Done);
        settle_down().await;
        assert!(
            h.nothing_started(),
            "another group's wait or the retry's was cut"
        );

        // Shutting down hurries every group; the retry still waits what Port asked.
        h.scheduler.hurry(None);
        assert_eq!(h.next_start().await.0, "one");
        let (key, _, at) = h.next_start().await;
        assert_eq!((key.as_str(), at - start), ("retried", 30 * SECOND));
        assert_eq!(retried.await.unwrap(), Settled::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_is_a_new_refresh_that_also_serves_the_requests_that_came_meanwhile() {
        let mut h = harness(4, true);
        h.script(
            "repo",
            vec![Judgement::Retry {
                reason: "Port answered 429".into(),
                after: Some(3 * SECOND),
            }],
        );
        let start = Instant::now();
        let first = h.submit("repo", &[1], Duration::ZERO);
        h.next_start().await;
        sleep(SECOND).await;
        let second = h.submit("repo", &[2], Duration::ZERO);
        // The second does not start a refresh of its own at once: the retry reads after it.
        let (_, work, at) = h.next_start().await;
        assert_eq!(work, items(&[1, 2]));
        assert!(at - start >= SECOND);
        assert_eq!(first.await.unwrap(), Settled::Done);
        assert_eq!(second.await.unwrap(), Settled::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_at_least_what_the_server_asked() {
        let mut h = harness(4, true);
        h.script(
            "repo",
            vec![Judgement::Retry {
                reason: "Port answered 429".into(),
                after: Some(3 * SECOND),
            }],
        );
        let start = Instant::now();
        let request = h.submit("repo", &[1], Duration::ZERO);
        h.next_start().await;
        let (_, _, at) = h.next_start().await;
        assert!(at - start >= 3 * SECOND, "{:?}", at - start);
        assert_eq!(request.await.unwrap(), Settled::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_asking_to_wait_for_ever_fails_the_request_and_the_scheduler_goes_on() {
        let mut h = harness(4, true);
        h.script(
            "repo",
            vec![Judgement::Retry {
                reason: "Port answered 429".into(),
                after: Some(Duration::MAX),
            }],
        );
        let request = h.submit("repo", &[1], Duration::ZERO);
        let Settled::Failed(failure) = request.await.unwrap() else {
            panic!("not failed")
        };
        assert!(
            failure.reason.contains("past the retry budget"),
            "{}",
            failure.reason
        );
        assert!(!h.scheduler.died().is_cancelled());
        let next = h.submit("other", &[1], Duration::ZERO);
        h.next_start().await;
        h.next_start().await;
        assert_eq!(next.await.unwrap(), Settled::Done);
    }

    /// A reconciler whose judging panics: a bug inside the driver task.
    struct JudgePanics;

    impl Reconcile for JudgePanics {
        type Key = String;
        type Work = Items;
        type Report = ();

        async fn run(&self, _key: &String, _work: &Items) {}

        fn judge(&self, _report: &(), _asked: &Items) -> Judgement<String, Items> {
            panic!("a bug in the judge")
        }
    }

    #[tokio::test]
    async fn a_panic_in_the_driver_is_told_and_every_request_ends_aborted() {
        let limits = Limits {
            concurrency: 2,
            retry: RetryPolicy::with_budget(60 * SECOND),
            max_hold: 600 * SECOND,
        };
        let scheduler = Scheduler::start(Arc::new(JudgePanics), limits);
        let died = scheduler.died();
        let request = |key: &str| Request {
            key: key.to_owned(),
            work: items(&[1]),
            delay: Duration::ZERO,
            group: 0,
        };
        assert_eq!(scheduler.submit(request("a")).await, Settled::Aborted);
        tokio::time::timeout(10 * SECOND, died.cancelled())
            .await
            .expect("the scheduler's death was not told");
        assert_eq!(scheduler.submit(request("b")).await, Settled::Aborted);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_retry_waits_the_initial_interval_with_its_jitter() {
        let mut h = harness(4, true);
        h.script(
            "repo",
            vec![Judgement::Retry {
                reason: "Harbor answered 503".into(),
                after: None,
            }],
        );
        let request = h.submit("repo", &[1], Duration::ZERO);
        let (_, _, first) = h.next_start().await;
        let (_, _, second) = h.next_start().await;
        // The harness's initial interval is 2 s, jittered by half.
        let wait = second - first;
        assert!(wait >= SECOND && wait <= 3 * SECOND, "{wait:?}");
        assert_eq!(request.await.unwrap(), Settled::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_end_with_the_budget_and_permanent_failures_at_once() {
        let h = harness(4, true);
        let transient = || Judgement::Retry {
            reason: "Harbor answered 503".into(),
            after: None,
        };
        h.script(
            "flaky",
            std::iter::repeat_with(transient).take(1000).collect(),
        );
        h.script("bad", vec![Judgement::Failed("Port answered 422".into())]);
        let start = Instant::now();
        let flaky = h.submit("flaky", &[1], Duration::ZERO);
        let bad = h.submit("bad", &[1], Duration::ZERO);
        let Settled::Failed(failure) = bad.await.unwrap() else {
            panic!("not failed")
        };
        assert_eq!(
            (failure.reason.as_str(), failure.attempts),
            ("Port answered 422", 1)
        );
        let Settled::Failed(failure) = flaky.await.unwrap() else {
            panic!("not failed")
        };
        assert_eq!(failure.reason, "Harbor answered 503");
        assert!(failure.attempts > 3, "{}", failure.attempts);
        let spent = Instant::now() - start;
        // It ends when the next wait would end past the budget: at most one wait (10 s, jittered
        // by half) early.
        assert!(spent <= 60 * SECOND && spent >= 45 * SECOND, "{spent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_depends_on_others_is_refreshed_again_once_they_are_done() {
        let mut h = harness(1, true);
        h.script(
            "project",
            vec![Judgement::After(vec![
                ("repo-a".into(), items(&[1])),
                ("repo-b".into(), items(&[1])),
            ])],
        );
        let project = h.submit("project", &[1], Duration::ZERO);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(h.next_start().await.0);
        }
        assert_eq!(order, ["project", "repo-a", "repo-b", "project"]);
        assert_eq!(project.await.unwrap(), Settled::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_not_done_within_the_hold_time_fails_while_its_key_stays_busy() {
        let mut h = harness(4, false);
        let start = Instant::now();
        let _stuck = h.submit("repo", &[1], Duration::ZERO);
        h.next_start().await;
        let waiting = h.submit("repo", &[2], Duration::ZERO);
        let Settled::Failed(failure) = waiting.await.unwrap() else {
            panic!("not failed")
        };
        assert_eq!(Instant::now() - start, 600 * SECOND);
        assert!(
            failure.reason.contains("not done within 10m"),
            "{}",
            failure.reason
        );
        // The key is still being refreshed: nothing else of it started.
        settle_down().await;
        assert!(h.nothing_started());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_that_panics_fails_its_requests_and_the_key_is_usable_again() {
        let mut h = harness(4, true);
        let broken = h.submit("repo", &[666], Duration::ZERO);
        h.next_start().await;
        let Settled::Failed(failure) = broken.await.unwrap() else {
            panic!("not failed")
        };
        assert!(
            failure.reason.contains("panicked: a bug"),
            "{}",
            failure.reason
        );
        let fine = h.submit("repo", &[1], Duration::ZERO);
        assert_eq!(fine.await.unwrap(), Settled::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn abort_stops_the_refreshes_and_drops_every_request() {
        let mut h = harness(4, false);
        let running = h.submit("repo", &[1], Duration::ZERO);
        h.next_start().await;
        let queued = h.submit("repo", &[2], Duration::ZERO);
        let delayed = h.submit("other", &[1], 60 * SECOND);
        settle_down().await;
        h.scheduler.abort().await;
        for request in [running, queued, delayed] {
            assert_eq!(request.await.unwrap(), Settled::Aborted);
        }
        assert_eq!(
            h.probe.running.lock().unwrap()["repo"],
            1,
            "the refresh was cut off"
        );
        // The scheduler is usable afterwards.
        h.release(1);
        let again = h.submit("repo", &[3], Duration::ZERO);
        assert_eq!(h.next_start().await.1, items(&[3]));
        assert_eq!(again.await.unwrap(), Settled::Done);
    }
}
