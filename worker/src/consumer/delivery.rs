//! One delivery, from its arrival to its settlement: asking the handler what it needs, handing
//! the refreshes to the scheduler, forwarding what another project's worker must refresh, and
//! the ack, park or nack that settles it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use harbor_shared::instances::NO_INSTANCE;
use harbor_shared::message::{self, FORWARDED_HEADER, INSTANCE_HEADER, SUBJECT_HEADER, header};
use harbor_shared::publisher::{Outgoing, Publisher};
use harbor_shared::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::plan::{Action, HandleEvent, Plan};
use crate::schedule::{Failure, Request, Scheduler, Settled};

/// What to do with a delivery.
#[derive(Clone)]
enum Verdict {
    Ack,
    Park { reason: String, attempts: u32 },
}

/// What the delivery tasks of one session share.
pub(super) struct Shared<H: HandleEvent> {
    pub(super) handler: Arc<H>,
    pub(super) scheduler: Scheduler<H>,
    pub(super) parker: Arc<Publisher>,
    pub(super) topology: Topology,
    /// Deliveries received and not yet acked or parked, per work queue. The broker sends no
    /// more of a queue once they reach the prefetch.
    pub(super) held: Vec<AtomicUsize>,
    /// At this many held (nine tenths of the prefetch), pulls waiting for their window are
    /// refreshed at once: a flood of pulls must not stop the consumer for a window.
    pub(super) flush_at: usize,
    /// Bytes of the bodies held, over all work queues.
    pub(super) held_bytes: AtomicUsize,
    /// Past this many held bytes, nothing waits for a window: the prefetch bounds what is held
    /// in count, this in bytes, so that padded events cannot pile up for a window.
    pub(super) max_held_bytes: usize,
}

impl<H: HandleEvent> Shared<H> {
    /// Counts a delivery of `bytes` as held; whether the bytes held are now past the budget. On
    /// the crossing, what waits for a window is refreshed at once.
    fn hold_bytes(&self, bytes: usize) -> bool {
        let before = self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        let now = before + bytes;
        metrics::gauge!("harbor_worker_held_bytes").set(now as f64);
        if before <= self.max_held_bytes && now > self.max_held_bytes {
            warn!(
                held_bytes = now,
                max_held_bytes = self.max_held_bytes,
                "Deliveries held past WORKER_MAX_HELD_BYTES: nothing waits for its window until \
                 they are settled"
            );
            self.scheduler.hurry(None);
        }
        now > self.max_held_bytes
    }

    /// Counts a delivery of `bytes` as settled.
    fn release_bytes(&self, bytes: usize) {
        let now = self.held_bytes.fetch_sub(bytes, Ordering::Relaxed) - bytes;
        metrics::gauge!("harbor_worker_held_bytes").set(now as f64);
    }
}

/// Asks for the refreshes a delivery needs (at once, so that each refresh that serves it reads
/// Harbor after it arrived), and settles it once they are done.
pub(super) fn dispatch<H: HandleEvent>(
    queue: usize,
    delivery: Delivery,
    shared: &Arc<Shared<H>>,
    tasks: &TaskTracker,
) {
    // On the crossing only: the pulls that start waiting meanwhile wait for the next one.
    if shared.held[queue].fetch_add(1, Ordering::Relaxed) + 1 == shared.flush_at {
        shared.scheduler.hurry(Some(queue));
    }
    let over_budget = shared.hold_bytes(delivery.data.len());
    let instance = header(&delivery.properties, INSTANCE_HEADER);
    let plan = shared.handler.plan(&delivery.data, instance.as_deref());
    let own_subject = header(&delivery.properties, SUBJECT_HEADER);
    let forwarded = header(&delivery.properties, FORWARDED_HEADER).is_some();
    let mut requests = Vec::new();
    let mut elsewhere = BTreeSet::new();
    if let Action::Refresh(refreshes) = &plan.action {
        for refresh in refreshes {
            let subject = shared.handler.subject(&refresh.key);
            match &own_subject {
                // Another project's: its own work queue's worker refreshes it.
                Some(own) if *own != subject => {
                    if !forwarded {
                        elsewhere.insert(subject);
                    }
                }
                _ => requests.push(shared.scheduler.submit(Request {
                    group: queue,
                    delay: if over_budget {
                        Duration::ZERO
                    } else {
                        refresh.delay
                    },
                    ..refresh.clone()
                })),
            }
        }
    }
    let forwards = elsewhere
        .into_iter()
        .map(|subject| {
            forward(
                &delivery,
                subject,
                Arc::clone(&shared.parker),
                shared.topology.clone(),
            )
        })
        .collect();
    tasks.spawn(process(
        queue,
        delivery,
        instance,
        plan,
        requests,
        forwards,
        Arc::clone(shared),
    ));
}

/// Publishes (confirmed) a copy of the delivery for `subject`'s work queue, marked so that it
/// is not forwarded again: an event that names two projects (a replication between two of this
/// Harbor's) is refreshed in each by the worker that owns it.
fn forward(
    delivery: &Delivery,
    subject: String,
    publisher: Arc<Publisher>,
    topology: Topology,
) -> impl Future<Output = Result<(), String>> + Send + 'static {
    let properties = message::forwarded(&delivery.properties, &subject);
    let (body, routing_key) = (delivery.data.clone(), delivery.routing_key.to_string());
    async move {
        publisher
            .publish(Outgoing {
                exchange: topology.exchange(),
                routing_key: &routing_key,
                body: &body,
                properties,
            })
            .await
            .map_err(|error| format!("could not forward the event to project {subject}: {error}"))
    }
}

async fn process<H: HandleEvent>(
    queue: usize,
    delivery: Delivery,
    instance: Option<String>,
    plan: Plan<H::Key, H::Work>,
    requests: Vec<impl Future<Output = Settled>>,
    forwards: Vec<impl Future<Output = Result<(), String>>>,
    shared: Arc<Shared<H>>,
) {
    let bytes = delivery.data.len();
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string);
    let span = info_span!(
        "event",
        message_id = %message_id,
        event_type = %delivery.routing_key,
        instance = instance.as_deref().unwrap_or(NO_INSTANCE),
        subject = plan.about.as_deref().unwrap_or("-"),
        redelivered = delivery.redelivered,
    );
    async move {
        let started = Instant::now();
        let decided = match plan.action {
            Action::Refresh(_) => {
                let (settled, forwarded) = tokio::join!(join_all(requests), join_all(forwards));
                let elapsed_ms = started.elapsed().as_millis() as u64;
                let not_forwarded = forwarded.into_iter().find_map(Result::err).map(|reason| {
                    Failure {
                        reason,
                        attempts: 1,
                    }
                });
                let failed = settled
                    .iter()
                    .find_map(|s| match s {
                        Settled::Failed(failure) => Some(failure.clone()),
                        _ => None,
                    })
                    .or(not_forwarded);
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
            let harbor = shared.handler.harbor(instance.as_deref()).to_owned();
            metrics::counter!("harbor_worker_events_total", "harbor" => harbor, "event_type" => plan.event_type.clone(), "outcome" => outcome)
                .increment(1);
            metrics::histogram!("harbor_worker_event_duration_seconds", "event_type" => plan.event_type)
                .record(started.elapsed().as_secs_f64());
        }
        shared.held[queue].fetch_sub(1, Ordering::Relaxed);
        shared.release_bytes(bytes);
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
                properties: message::parked(&delivery.properties, &reason, attempts),
            })
            .await;
        if let Err(error) = parked {
            error!(%error, "Could not park the event; returning it to the queue");
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            // Bounded, as the ack below.
            match tokio::time::timeout(SETTLE_TIMEOUT, delivery.nack(requeue)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    debug!(%error, "Nack failed; the broker will redeliver the event")
                }
                Err(_) => debug!("Nack not sent in time; the broker will redeliver the event"),
            }
            return;
        }
    }
    // Bounded: on a connection that just died, lapin may never finish sending the ack, and the
    // session waits for this task before it reconnects.
    match tokio::time::timeout(SETTLE_TIMEOUT, delivery.ack(BasicAckOptions::default())).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            debug!("Ack not sent: the delivery belongs to a closed channel and will be redelivered")
        }
        Ok(Err(error)) => debug!(%error, "Ack failed; the broker will redeliver the event"),
        Err(_) => debug!("Ack not sent in time; the broker will redeliver the event"),
    }
}

/// How long an ack or a nack may take to be sent.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
