//! The RabbitMQ side of the worker: consume with manual acks and a bounded number of events in
//! flight, hand each to the [`HandleEvent`] handler, and settle each delivery exactly once:
//!
//! - handled (synced, ignored or skipped): ack;
//! - failed after retries, unparseable, or the handler panicked: park (a confirmed publish of
//!   the original message, with `x-failure-reason`, `x-failed-at` and `x-attempts` headers, to
//!   the dead-letter exchange), then ack;
//! - parking itself failed: nack with requeue, which counts toward the queue's delivery limit,
//!   so the broker dead-letters the message after a few rounds instead of looping forever.
//!
//! Nothing is acked before its writes are done: a crash or a lost connection leaves the
//! delivery unacked, and the broker delivers it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use harbor_shared::broker;
use harbor_shared::config::AmqpSettings;
use harbor_shared::event::{EventError, EventType, HarborEvent};
use harbor_shared::ops::Readiness;
use harbor_shared::publisher::{Outgoing, Publisher};
use harbor_shared::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::handler::{HandleEvent, Outcome, Subject, refresh_key};

/// How long parking may wait for the broker's confirm.
const PARK_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How the consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The broker and the queue names.
    pub amqp: AmqpSettings,
    /// Events handled at once.
    pub concurrency: u16,
    /// Deliveries held at once (the consumer's prefetch): handled, or waiting to be folded
    /// into a refresh of the same subject. At least `concurrency`.
    pub prefetch: u16,
    /// A pull is refreshed this long after the last pull of the same artifacts (Harbor updates
    /// pull counts about every 10 s); pulls in between are folded into that one refresh.
    pub pull_window: Duration,
    /// On shutdown, how long events in flight may take to finish.
    pub drain_timeout: Duration,
}

/// Consumes until `shutdown`, reconnecting whenever the connection is lost.
pub async fn run<H: HandleEvent>(
    settings: ConsumerSettings,
    handler: Arc<H>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let (settings_ref, handler, readiness_ref, shutdown_ref) =
        (&settings, &handler, &readiness, &shutdown);
    broker::run_reconnecting(
        &settings.amqp,
        "harbor-worker",
        &shutdown,
        move |connection| async move {
            let result = session(
                &connection,
                settings_ref,
                handler,
                readiness_ref,
                shutdown_ref,
            )
            .await;
            readiness_ref.set(false);
            result
        },
    )
    .await;
}

async fn session<H: HandleEvent>(
    connection: &Connection,
    settings: &ConsumerSettings,
    handler: &Arc<H>,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let topology = &settings.amqp.topology;
    let parker = Arc::new(Publisher::open(connection, 1, PARK_CONFIRM_TIMEOUT).await?);
    let channel = connection
        .create_channel()
        .await
        .context("Failed to open the consuming channel")?;
    // Per-consumer prefetch (quorum queues refuse global QoS).
    let prefetch = settings.prefetch.max(settings.concurrency);
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .context("Failed to set the prefetch")?;
    let tag = format!("harbor-worker-{}", uuid::Uuid::new_v4());
    let mut deliveries = channel
        .basic_consume(
            topology.queue().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("Failed to consume from {}", topology.queue()))?;
    readiness.set(true);
    info!(
        queue = topology.queue(),
        prefetch,
        concurrency = settings.concurrency,
        "Consuming"
    );

    let shared = Arc::new(Shared {
        handler: Arc::clone(handler),
        parker: Arc::clone(&parker),
        topology: topology.clone(),
        slots: Semaphore::new(usize::from(settings.concurrency)),
        pending: Mutex::new(HashMap::new()),
        held: AtomicUsize::new(0),
        flush_at: (usize::from(prefetch) * 9 / 10).max(1),
        full: Notify::new(),
        pull_window: settings.pull_window,
        shutdown: shutdown.clone(),
    });
    let in_flight = TaskTracker::new();
    let closed = broker::closed(connection);
    tokio::pin!(closed);
    let ended = loop {
        tokio::select! {
            delivery = deliveries.next() => match delivery {
                Some(Ok(delivery)) => dispatch(delivery, &shared, &in_flight),
                Some(Err(error)) => break Err(anyhow::Error::new(error).context("Consuming failed")),
                None => break Err(anyhow!("The broker ended the consumer")),
            },
            () = &mut closed => break Ok(()),
            () = parker.broken() => break Err(anyhow!("The parking channel failed")),
            () = shutdown.cancelled() => break Ok(()),
        }
    };
    readiness.set(false);

    if shutdown.is_cancelled() {
        // No new deliveries; deliveries received but not started stay unacked and are
        // requeued when the connection closes.
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        in_flight.close();
        info!(
            in_flight = in_flight.len(),
            "Stopping: finishing events in flight"
        );
        if tokio::time::timeout(settings.drain_timeout, in_flight.wait())
            .await
            .is_err()
        {
            warn!(
                in_flight = in_flight.len(),
                "Events still in flight at the drain timeout; they stay unacked and will be redelivered"
            );
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        channel.close(200, "stopping".into()),
    )
    .await;
    parker.close().await;
    ended
}

/// What to do with a delivery.
#[derive(Clone)]
enum Verdict {
    Ack,
    Park { reason: String, attempts: u32 },
}

/// What the delivery tasks of one session share.
struct Shared<H> {
    handler: Arc<H>,
    parker: Arc<Publisher>,
    topology: Topology,
    /// One permit per event handled at once.
    slots: Semaphore,
    /// Deliveries waiting to be folded into a refresh that has not started yet, by what it
    /// refreshes.
    pending: Mutex<HashMap<String, Group>>,
    /// Deliveries received and not yet acked or parked. The broker sends no more once they
    /// reach the prefetch.
    held: AtomicUsize,
    /// At this many held (nine tenths of the prefetch), pulls waiting for their window are
    /// refreshed at once: a flood of pulls must not stop the consumer for a window.
    flush_at: usize,
    /// Signalled when `held` rises to `flush_at`.
    full: Notify,
    pull_window: Duration,
    shutdown: CancellationToken,
}

/// Deliveries folded into one refresh, besides the one that started it.
struct Group {
    followers: Vec<Delivery>,
    last_arrival: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts a refresh for a delivery, or folds it into a pending refresh of the same subject:
/// Harbor is read when the refresh starts, so one read answers every event that came before.
fn dispatch<H: HandleEvent>(delivery: Delivery, shared: &Arc<Shared<H>>, tasks: &TaskTracker) {
    // On the crossing only: the pulls that start waiting meanwhile wait for the next one.
    if shared.held.fetch_add(1, Ordering::Relaxed) + 1 == shared.flush_at {
        shared.full.notify_waiters();
    }
    let event = HarborEvent::parse(&delivery.data);
    let key = event.as_ref().ok().and_then(refresh_key);
    let is_pull = matches!(&event, Ok(e) if e.event_type == EventType::PullArtifact);
    if let Some(key) = &key {
        let mut pending = lock(&shared.pending);
        if let Some(group) = pending.get_mut(key) {
            group.followers.push(delivery);
            group.last_arrival = Instant::now();
            return;
        }
        pending.insert(
            key.clone(),
            Group {
                followers: Vec::new(),
                last_arrival: Instant::now(),
            },
        );
    }
    tasks.spawn(process(delivery, event, key, is_pull, Arc::clone(shared)));
}

async fn process<H: HandleEvent>(
    delivery: Delivery,
    event: Result<HarborEvent, EventError>,
    key: Option<String>,
    is_pull: bool,
    shared: Arc<Shared<H>>,
) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string);
    let span = info_span!(
        "event",
        message_id = %message_id,
        event_type = %delivery.routing_key,
        subject = tracing::field::Empty,
        redelivered = delivery.redelivered,
    );
    async move {
        let started = Instant::now();
        if is_pull {
            wait_for_pull_counts(&shared, key.as_deref(), started).await;
        }
        let Ok(_slot) = shared.slots.acquire().await else { return };
        // From here on, deliveries of the same subject start a refresh of their own.
        let followers = key
            .and_then(|key| lock(&shared.pending).remove(&key))
            .map(|group| group.followers)
            .unwrap_or_default();
        metrics::gauge!("harbor_worker_events_in_flight").increment(1.0);
        let (verdict, event_type, outcome) = decide(event, Arc::clone(&shared.handler)).await;
        // Before the ack: once acked, the broker sends the next delivery in its place.
        metrics::gauge!("harbor_worker_events_in_flight").decrement(1.0);
        if !followers.is_empty() {
            debug!(folded = followers.len(), "Events folded into this refresh");
            metrics::counter!("harbor_worker_events_coalesced_total").increment(followers.len() as u64);
        }
        let settled = 1 + followers.len();
        for follower in followers {
            settle(follower, verdict.clone(), &shared.parker, &shared.topology).await;
        }
        settle(delivery, verdict, &shared.parker, &shared.topology).await;
        shared.held.fetch_sub(settled, Ordering::Relaxed);
        metrics::counter!("harbor_worker_events_total", "event_type" => event_type.clone(), "outcome" => outcome)
            .increment(settled as u64);
        metrics::histogram!("harbor_worker_event_duration_seconds", "event_type" => event_type)
            .record(started.elapsed().as_secs_f64());
    }
    .instrument(span)
    .await;
}

/// Waits until `pull_window` has passed since the last pull of the same artifacts (so that
/// Harbor has counted them all), at most five windows in all, until the held deliveries near
/// the prefetch, or until shutdown. A refresh cut short reads a count Harbor may raise later;
/// the pulls after it wait for a refresh of their own.
async fn wait_for_pull_counts<H>(shared: &Shared<H>, key: Option<&str>, started: Instant) {
    let window = shared.pull_window;
    let latest_end = started + window * 5;
    let full = shared.full.notified();
    tokio::pin!(full);
    loop {
        let last = key
            .and_then(|key| lock(&shared.pending).get(key).map(|g| g.last_arrival))
            .unwrap_or(started)
            .max(started);
        let until = (last + window).min(latest_end);
        if Instant::now() >= until {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => {}
            () = &mut full => {
                metrics::counter!("harbor_worker_pull_windows_cut_total").increment(1);
                return;
            }
            () = shared.shutdown.cancelled() => return,
        }
    }
}

/// Parses and handles; returns the verdict and the metric labels (event type, outcome).
async fn decide<H: HandleEvent>(
    event: Result<HarborEvent, EventError>,
    handler: Arc<H>,
) -> (Verdict, String, &'static str) {
    let event = match event {
        Ok(event) => event,
        Err(error) => {
            let reason = format!("not a Harbor event: {error}");
            return (
                Verdict::Park {
                    reason,
                    attempts: 0,
                },
                "invalid".to_owned(),
                "parked",
            );
        }
    };
    let event_type = event.event_type.metric_label().to_owned();
    if let Ok(subject) = Subject::of(&event.data) {
        let shown = match subject.digests.as_slice() {
            [digest] => format!("{}@{digest}", subject.repository),
            _ => subject.repository.to_string(),
        };
        tracing::Span::current().record("subject", shown);
    }
    let started = Instant::now();
    // Its own task, so that a panic in the handler is caught and the delivery still settled.
    let handled = tokio::spawn(async move { handler.handle(&event).await }).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let (verdict, outcome) = match handled {
        Ok(Ok(Outcome::Synced { upserted, deleted })) => {
            info!(upserted, deleted, elapsed_ms, "Event synced");
            (Verdict::Ack, "synced")
        }
        Ok(Ok(Outcome::Ignored)) => {
            info!("Event ignored: no action for this type");
            (Verdict::Ack, "ignored")
        }
        Ok(Ok(Outcome::Skipped(reason))) => {
            warn!(%reason, "Event skipped");
            (Verdict::Ack, "skipped")
        }
        Ok(Err(failure)) => (
            Verdict::Park {
                reason: failure.reason,
                attempts: failure.attempts,
            },
            "parked",
        ),
        Err(join_error) => (
            Verdict::Park {
                reason: format!("the handler panicked: {join_error}"),
                attempts: 1,
            },
            "parked",
        ),
    };
    (verdict, event_type, outcome)
}

async fn settle(delivery: Delivery, verdict: Verdict, parker: &Publisher, topology: &Topology) {
    if let Verdict::Park { reason, attempts } = verdict {
        error!(%reason, attempts, "Event parked");
        let parked = parker
            .publish(Outgoing {
                exchange: &topology.dead_letter_exchange(),
                routing_key: delivery.routing_key.as_str(),
                body: &delivery.data,
                properties: parked_properties(&delivery.properties, &reason, attempts),
            })
            .await;
        if let Err(error) = parked {
            error!(%error, "Could not park the event; returning it to the queue");
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if let Err(error) = delivery.nack(requeue).await {
                debug!(%error, "Nack failed; the broker will redeliver the event");
            }
            return;
        }
    }
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => {
            debug!("Ack not sent: the delivery belongs to a closed channel and will be redelivered")
        }
        Err(error) => debug!(%error, "Ack failed; the broker will redeliver the event"),
    }
}

/// The original properties plus the failure headers.
fn parked_properties(original: &BasicProperties, reason: &str, attempts: u32) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let reason: String = reason.chars().take(2000).collect();
    headers.insert(
        "x-failure-reason".into(),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        "x-failed-at".into(),
        AMQPValue::LongString(
            humantime::format_rfc3339_millis(SystemTime::now())
                .to_string()
                .into(),
        ),
    );
    headers.insert(
        "x-attempts".into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    original.clone().with_delivery_mode(2).with_headers(headers)
}
