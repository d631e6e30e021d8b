//! The resync lock: one worker of the fleet at a time holds it (an exclusive queue, released
//! with its connection). Its holder runs the periodic resync when `RESYNC_INTERVAL` is set, and
//! takes the resyncs `harbor-worker resync` asks for through the lock's queue
//! ([`super::asked`]), so a resync spends the fleet's Port budget and token rather than a
//! process's own.

use std::time::Duration;

use futures_util::StreamExt;
use harbor_shared::broker;
use harbor_shared::broker::AmqpSettings;
use harbor_shared::topology::Topology;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::{Options, asked, resync_each};
use crate::fleet::Fleet;
use crate::retry::RetryPolicy;

/// How often a worker without the lock tries for it (at most; a shorter interval is used).
const RETAKE: Duration = Duration::from_secs(30);

/// The name of the queue whose holder runs the resyncs.
pub fn lock_queue(topology: &Topology) -> String {
    format!("{}.resync-lock", topology.queue())
}

/// How a worker takes part in the fleet's resyncs.
#[derive(Debug, Clone)]
pub struct Holding {
    /// How often the holder resyncs by itself, if at all (`RESYNC_INTERVAL`).
    pub interval: Option<Duration>,
    /// The retry policy of a resync's calls.
    pub retry: RetryPolicy,
    /// The periodic resync's options (an asked one brings its own).
    pub options: Options,
    /// What the worker is deployed against ([`asked::deployment`]): a resync asked for another
    /// deployment is declined.
    pub deployment: String,
}

/// The lock, held: its connection and the requests that reach its queue.
struct Lock {
    connection: Connection,
    channel: Channel,
    asked: Consumer,
}

impl Lock {
    /// The lock, or `None` if another worker holds it (or the broker cannot be reached).
    async fn take(amqp: &AmqpSettings) -> Option<Self> {
        let connection = broker::connect(&amqp.url, "harbor-worker resync")
            .await
            .ok()?;
        let taken = async {
            let channel = connection.create_channel().await?;
            let exclusive = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            let queue = lock_queue(&amqp.topology);
            channel
                .queue_declare(queue.as_str().into(), exclusive, FieldTable::default())
                .await?;
            let no_ack = BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            };
            // lapin routes deliveries by the tag it was given: the broker's own would not match.
            let tag = format!(
                "harbor-worker-resync-lock-{}",
                uuid::Uuid::new_v4().simple()
            );
            let asked = channel
                .basic_consume(
                    queue.into(),
                    tag.as_str().into(),
                    no_ack,
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, asked))
        };
        match taken.await {
            Ok((channel, asked)) => Some(Self {
                connection,
                channel,
                asked,
            }),
            Err(_) => {
                // RESOURCE_LOCKED: another worker's.
                let _ = connection.close(200, "lock held elsewhere".into()).await;
                None
            }
        }
    }

    fn held(&self) -> bool {
        self.connection.status().connected()
    }
}

/// Takes part in the resyncs until shutdown: tries for the lock at start and then every
/// [`RETAKE`] (or `interval`, when shorter); while holding it, answers the resyncs asked for
/// and, with an interval, resyncs each Harbor every interval, so the fleet resyncs once per
/// interval whichever worker does it. A worker that takes the lock waits a whole interval
/// before its first periodic resync. Each Harbor's resync is judged alone (its own deletion
/// threshold), and its webhook policies kept after it.
pub async fn hold(
    holding: &Holding,
    fleet: &Fleet,
    amqp: &AmqpSettings,
    shutdown: &CancellationToken,
) {
    let retake = holding.interval.map_or(RETAKE, |i| i.min(RETAKE));
    let mut lock: Option<Lock> = None;
    let mut due: Option<Instant> = None;
    loop {
        if !lock.as_ref().is_some_and(Lock::held) {
            lock = Lock::take(amqp).await;
            due = lock
                .as_ref()
                .and(holding.interval)
                .map(|i| Instant::now() + i);
            if lock.is_some() {
                info!("Holding the resync lock: this worker runs the fleet's resyncs");
            }
        }
        let Some(held) = &mut lock else {
            tokio::select! {
                () = tokio::time::sleep(retake) => continue,
                () = shutdown.cancelled() => break,
            }
        };
        let at = due;
        let periodic = async move {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = periodic => {
                due = holding.interval.map(|i| Instant::now() + i);
                let all = (0..fleet.members().len()).collect();
                let resynced = resync_each(fleet, all, holding.retry, holding.options, amqp, &held.connection);
                tokio::select! {
                    outcomes = resynced => record(&outcomes),
                    () = shutdown.cancelled() => break,
                }
            }
            delivery = held.asked.next() => match delivery {
                Some(Ok(delivery)) => {
                    let (channel, connection) = (&held.channel, &held.connection);
                    let answered = asked::answer(delivery, channel, &holding.deployment, |chosen, options| async move {
                        let outcomes = resync_each(fleet, chosen, holding.retry, options, amqp, connection).await;
                        record(&outcomes);
                        outcomes
                    });
                    tokio::select! {
                        () = answered => {}
                        () = shutdown.cancelled() => break,
                    }
                }
                // The connection failed: try for the lock again.
                Some(Err(_)) | None => lock = None,
            },
            () = shutdown.cancelled() => break,
        }
    }
    if let Some(lock) = lock {
        let _ = lock.connection.close(200, "stopping".into()).await;
    }
}

/// Counts each resync by its outcome, and logs each that failed.
fn record(outcomes: &[asked::Outcome]) {
    for outcome in outcomes {
        let label = match &outcome.result {
            Ok(summary) if summary.refused => "refused",
            Ok(_) => "requested",
            Err(error) => {
                error!(instance = outcome.instance, %error, "Resync failed");
                "failed"
            }
        };
        metrics::counter!("harbor_worker_resyncs_total", "outcome" => label).increment(1);
    }
}
