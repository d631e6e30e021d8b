//! The RabbitMQ side of the worker: consume with manual acks, ask the [`HandleEvent`] handler
//! what each delivery needs refreshed, hand that to the [`Scheduler`] (which decides what runs
//! when), and settle each delivery exactly once:
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

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use futures_util::future::join_all;
use harbor_shared::broker;
use harbor_shared::config::AmqpSettings;
use harbor_shared::ops::Readiness;
use harbor_shared::publisher::{Outgoing, Publisher};
use harbor_shared::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::handler::{Action, HandleEvent, Plan};
use crate::schedule::{Request, Scheduler, Settled};

/// How long parking may wait for the broker's confirm.
const PARK_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How the consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The broker and the queue names.
    pub amqp: AmqpSettings,
    /// Deliveries held at once (the consumer's prefetch): handled, or waiting to be folded
    /// into a refresh of the same subject.
    pub prefetch: u16,
    /// On shutdown, how long events in flight may take to finish.
    pub drain_timeout: Duration,
}

/// Consumes until `shutdown`, reconnecting whenever the connection is lost; `scheduler` runs
/// the refreshes.
///
/// The scheduler outlives the sessions, and a lost session's refreshes are stopped before the
/// next session consumes: the broker redelivers what was not acked, and a redelivered event
/// must not be refreshed beside its own first delivery.
pub async fn run<H: HandleEvent>(
    settings: ConsumerSettings,
    handler: Arc<H>,
    scheduler: Scheduler<H>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let (settings_ref, handler, readiness_ref, shutdown_ref, scheduler_ref) =
        (&settings, &handler, &readiness, &shutdown, &scheduler);
    broker::run_reconnecting(
        &settings.amqp,
        "harbor-worker",
        &shutdown,
        move |connection| async move {
            let result = session(
                &connection,
                settings_ref,
                handler,
                scheduler_ref,
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
    scheduler: &Scheduler<H>,
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
    let prefetch = settings.prefetch;
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
    info!(queue = topology.queue(), prefetch, "Consuming");

    let shared = Arc::new(Shared {
        handler: Arc::clone(handler),
        scheduler: scheduler.clone(),
        parker: Arc::clone(&parker),
        topology: topology.clone(),
        held: AtomicUsize::new(0),
        flush_at: (usize::from(prefetch) * 9 / 10).max(1),
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
    in_flight.close();

    if shutdown.is_cancelled() {
        // No new deliveries; pulls waiting for their window are refreshed now. Deliveries not
        // settled by the drain timeout stay unacked and are requeued when the connection closes.
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        scheduler.hurry(None);
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
    // What is still running belongs to this session, whose deliveries the broker hands out
    // again (maybe to another worker): stop it before anything else reads or writes.
    scheduler.abort().await;
    in_flight.wait().await;
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
struct Shared<H: HandleEvent> {
    handler: Arc<H>,
    scheduler: Scheduler<H>,
    parker: Arc<Publisher>,
    topology: Topology,
    /// Deliveries received and not yet acked or parked. The broker sends no more once they
    /// reach the prefetch.
    held: AtomicUsize,
    /// At this many held (nine tenths of the prefetch), pulls waiting for their window are
    /// refreshed at once: a flood of pulls must not stop the consumer for a window.
    flush_at: usize,
}

/// Asks for the refreshes a delivery needs (at once, so that each refresh that serves it reads
/// Harbor after it arrived), and settles it once they are done.
fn dispatch<H: HandleEvent>(delivery: Delivery, shared: &Arc<Shared<H>>, tasks: &TaskTracker) {
    // On the crossing only: the pulls that start waiting meanwhile wait for the next one.
    if shared.held.fetch_add(1, Ordering::Relaxed) + 1 == shared.flush_at {
        shared.scheduler.hurry(Some(0));
    }
    let plan = shared.handler.plan(&delivery.data);
    let requests = match &plan.action {
        Action::Refresh(refreshes) => refreshes
            .iter()
            .map(|refresh| {
                shared.scheduler.submit(Request {
                    group: 0,
                    ..refresh.clone()
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    tasks.spawn(process(delivery, plan, requests, Arc::clone(shared)));
}

async fn process<H: HandleEvent>(
    delivery: Delivery,
    plan: Plan<H::Key, H::Work>,
    requests: Vec<impl Future<Output = Settled>>,
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
        subject = plan.subject.as_deref().unwrap_or("-"),
        redelivered = delivery.redelivered,
    );
    async move {
        let started = Instant::now();
        let decided = match plan.action {
            Action::Refresh(_) => {
                let settled = join_all(requests).await;
                let elapsed_ms = started.elapsed().as_millis() as u64;
                let failed = settled.iter().find_map(|s| match s {
                    Settled::Failed(failure) => Some(failure.clone()),
                    _ => None,
                });
                if let Some(failure) = failed {
                    Some((
                        Verdict::Park {
                            reason: failure.reason,
                            attempts: failure.attempts,
                        },
                        "parked",
                    ))
                } else if settled.contains(&Settled::Aborted) {
                    // Its session is gone; the broker delivers it again.
                    None
                } else {
                    info!(refreshes = settled.len(), elapsed_ms, "Event synced");
                    Some((Verdict::Ack, "synced"))
                }
            }
            Action::Ignore => {
                info!("Event ignored: no action for this type");
                Some((Verdict::Ack, "ignored"))
            }
            Action::Skip(reason) => {
                warn!(%reason, "Event skipped");
                Some((Verdict::Ack, "skipped"))
            }
            Action::Invalid(reason) => Some((
                Verdict::Park {
                    reason,
                    attempts: 0,
                },
                "parked",
            )),
        };
        if let Some((verdict, outcome)) = decided {
            settle(delivery, verdict, &shared.parker, &shared.topology).await;
            metrics::counter!("harbor_worker_events_total", "event_type" => plan.event_type.clone(), "outcome" => outcome)
                .increment(1);
            metrics::histogram!("harbor_worker_event_duration_seconds", "event_type" => plan.event_type)
                .record(started.elapsed().as_secs_f64());
        }
        shared.held.fetch_sub(1, Ordering::Relaxed);
    }
    .instrument(span)
    .await;
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
