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
use std::time::Duration;

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use harbor_shared::broker;
use harbor_shared::broker::AmqpSettings;
use harbor_shared::ops::Readiness;
use harbor_shared::publisher::Publisher;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::balance;

mod delivery;

use crate::plan::HandleEvent;
use crate::schedule::Scheduler;
use delivery::{Shared, dispatch};

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
    /// Bytes of deliveries held past which nothing waits for a window (`WORKER_MAX_HELD_BYTES`).
    pub max_held_bytes: usize,
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
            metrics::gauge!("harbor_worker_broker_connected").set(1.0);
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
            metrics::gauge!("harbor_worker_broker_connected").set(0.0);
            result
        },
    )
    .await;
}

/// How often a worker looks at how many workers share the queues.
const REBALANCE_EVERY: Duration = Duration::from_secs(5);

/// What a work queue's consumer yields: its queue, which subscription it is, and a delivery or
/// (`None`) the end of the consumer.
type Incoming = (usize, u64, Option<Result<Delivery, lapin::Error>>);

/// This session's consumer of each work queue.
struct Queues {
    channel: lapin::Channel,
    names: Vec<String>,
    tags: Vec<String>,
    /// Which subscription is the current one: deliveries of an older one are returned.
    generation: Vec<u64>,
    /// Delivered to this worker since it last subscribed: it is the queue's active consumer.
    active: Vec<bool>,
    /// Being handed on: what it delivers is held back, and returned once the rest is settled.
    leaving: Vec<Option<Vec<Delivery>>>,
}

impl Queues {
    async fn subscribe(&mut self, queue: usize) -> anyhow::Result<BoxStream<'static, Incoming>> {
        let tag = format!("harbor-worker-{}-{queue}", uuid::Uuid::new_v4().simple());
        let consumer = self
            .channel
            .basic_consume(
                self.names[queue].as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("Failed to consume from {}", self.names[queue]))?;
        self.tags[queue] = tag;
        self.active[queue] = false;
        self.generation[queue] += 1;
        let generation = self.generation[queue];
        Ok(consumer
            .map(move |delivery| (queue, generation, Some(delivery)))
            .chain(futures_util::stream::once(async move {
                (queue, generation, None)
            }))
            .boxed())
    }

    /// Hands `queue` on: its consumer is cancelled (the next worker in line becomes active),
    /// what it delivered meanwhile goes back to it, and this worker subscribes again, at the
    /// back of the line.
    async fn hand_on(&mut self, queue: usize) -> anyhow::Result<BoxStream<'static, Incoming>> {
        self.channel
            .basic_cancel(
                self.tags[queue].as_str().into(),
                BasicCancelOptions::default(),
            )
            .await
            .with_context(|| format!("Failed to stop consuming {}", self.names[queue]))?;
        for delivery in self.leaving[queue].take().unwrap_or_default() {
            give_back(delivery).await?;
        }
        info!(queue = %self.names[queue], "Handed the queue on to the next worker");
        self.subscribe(queue).await
    }
}

/// Returns a delivery to its queue, for another consumer.
async fn give_back(delivery: Delivery) -> anyhow::Result<()> {
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    delivery
        .nack(requeue)
        .await
        .context("Failed to return a delivery")?;
    Ok(())
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
    // Per-consumer prefetch (quorum queues refuse global QoS): each work queue's consumer holds
    // up to this many.
    let prefetch = settings.prefetch;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .context("Failed to set the prefetch")?;
    // Counted among the workers for as long as this session lives.
    let workers_queue = topology.workers_queue();
    let _counted = channel
        .basic_consume(
            workers_queue.as_str().into(),
            format!("harbor-worker-{}", uuid::Uuid::new_v4().simple())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("Failed to consume from {workers_queue}"))?;
    let names = topology.work_queues();
    let count = names.len();
    let mut queues = Queues {
        channel: channel.clone(),
        names,
        tags: vec![String::new(); count],
        generation: vec![0; count],
        active: vec![false; count],
        leaving: (0..count).map(|_| None).collect(),
    };
    let mut deliveries = futures_util::stream::SelectAll::new();
    // Each worker subscribes in an order of its own, so that workers starting together are the
    // first in line of different queues.
    let first = rand::random_range(0..count);
    for queue in (0..count).map(|n| (first + n) % count) {
        deliveries.push(queues.subscribe(queue).await?);
    }
    readiness.set(true);
    info!(queues = count, prefetch, "Consuming");

    let shared = Arc::new(Shared {
        handler: Arc::clone(handler),
        scheduler: scheduler.clone(),
        parker: Arc::clone(&parker),
        topology: topology.clone(),
        held: (0..count).map(|_| AtomicUsize::new(0)).collect(),
        flush_at: (usize::from(prefetch) * 9 / 10).max(1),
        held_bytes: AtomicUsize::new(0),
        max_held_bytes: settings.max_held_bytes,
    });
    let in_flight = TaskTracker::new();
    let closed = broker::closed(connection);
    tokio::pin!(closed);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut next_rebalance = tokio::time::Instant::now() + REBALANCE_EVERY;
    let ended = loop {
        tokio::select! {
            incoming = deliveries.next() => match incoming {
                Some((queue, generation, Some(Ok(delivery)))) => {
                    if generation != queues.generation[queue] {
                        // A consumer handed on, delivering before its cancel took effect.
                        if let Err(error) = bounded(give_back(delivery)).await {
                            break Err(error);
                        }
                    } else if let Some(held_back) = &mut queues.leaving[queue] {
                        held_back.push(delivery);
                    } else {
                        queues.active[queue] = true;
                        dispatch(queue, delivery, &shared, &in_flight);
                    }
                }
                Some((_, _, Some(Err(error)))) => {
                    break Err(anyhow::Error::new(error).context("Consuming failed"));
                }
                Some((queue, generation, None)) if generation == queues.generation[queue] => {
                    break Err(anyhow!("The broker ended the consumer of {}", queues.names[queue]));
                }
                // The end of a consumer handed on.
                Some((_, _, None)) => {}
                None => break Err(anyhow!("No consumer left")),
            },
            _ = tick.tick() => {
                // Bounded: a broker that stopped answering must end the session, not hang it.
                let handed = hand_on_drained(&mut queues, &shared, &mut deliveries);
                if let Err(error) = bounded(handed).await {
                    break Err(error);
                }
                if tokio::time::Instant::now() >= next_rebalance {
                    next_rebalance += REBALANCE_EVERY;
                    match bounded(workers(connection, &workers_queue)).await {
                        Ok(workers) => rebalance(&mut queues, &shared, workers),
                        Err(error) => break Err(error),
                    }
                }
            }
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
        let cancel_all = async {
            for tag in &queues.tags {
                let _ = channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), cancel_all).await;
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

/// How long the consumer loop waits for the broker to answer one of its own requests.
const BROKER_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// `work`, or an error if the broker has not answered it in time.
async fn bounded<T>(work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(BROKER_ANSWER_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!(
                "The broker did not answer within {BROKER_ANSWER_TIMEOUT:?}"
            ))
        })
}

/// How many workers consume the work queues (each consumes the workers' queue).
async fn workers(connection: &Connection, queue: &str) -> anyhow::Result<usize> {
    let channel = connection
        .create_channel()
        .await
        .context("Failed to open a channel")?;
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .with_context(|| format!("Failed to count the consumers of {queue}"));
    let _ = channel.close(200, "counted".into()).await;
    Ok(declared?.consumer_count() as usize)
}

/// Marks the queues this worker should hand on (see [`crate::balance`]); their pulls waiting
/// for a window are refreshed now, so that they drain.
fn rebalance<H: HandleEvent>(queues: &mut Queues, shared: &Shared<H>, workers: usize) {
    let active: Vec<(usize, usize)> = (0..queues.names.len())
        .filter(|&q| queues.active[q] && queues.leaving[q].is_none())
        .map(|q| (q, shared.held[q].load(Ordering::Relaxed)))
        .collect();
    shared.handler.fleet_size(workers);
    let hand_on = balance::to_hand_on(queues.names.len(), workers, &active);
    metrics::gauge!("harbor_worker_work_queues_active").set((active.len() - hand_on.len()) as f64);
    for queue in hand_on {
        debug!(queue = %queues.names[queue], workers, "Handing the queue on");
        queues.leaving[queue] = Some(Vec::new());
        shared.scheduler.hurry(Some(queue));
    }
}

/// Hands on the queues being handed on whose deliveries are all settled.
async fn hand_on_drained<H: HandleEvent>(
    queues: &mut Queues,
    shared: &Shared<H>,
    deliveries: &mut futures_util::stream::SelectAll<BoxStream<'static, Incoming>>,
) -> anyhow::Result<()> {
    for queue in 0..queues.names.len() {
        if queues.leaving[queue].is_some() && shared.held[queue].load(Ordering::Relaxed) == 0 {
            deliveries.push(queues.hand_on(queue).await?);
        }
    }
    Ok(())
}
