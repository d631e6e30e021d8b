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
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};
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

/// The `type` of the probe a worker without the lock publishes to the lock's queue: its holder
/// ignores it.
pub const PROBE: &str = "resync-lock-probe";

/// A worker's connection for the lock, while it does not hold it.
struct Contender {
    connection: Connection,
    /// In confirm mode, for the probe.
    probe: Channel,
}

impl Contender {
    async fn open(amqp: &AmqpSettings) -> Option<Self> {
        let connection = broker::connect(&amqp.url, "harbor-worker resync")
            .await
            .ok()?;
        let probe = connection.create_channel().await.ok()?;
        probe
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .ok()?;
        Some(Self { connection, probe })
    }

    fn connected(&self) -> bool {
        self.connection.status().connected() && self.probe.status().connected()
    }

    /// Whether no worker holds the lock: a mandatory probe, expiring at once, comes back
    /// unroutable only when the lock's queue does not exist. Declaring the queue to find out
    /// would close the channel with RESOURCE_LOCKED, which lapin logs as an error, every try.
    async fn vacant(&self, queue: &str) -> bool {
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let probe = BasicProperties::default()
            .with_type(PROBE.into())
            .with_expiration("0".into());
        let published = self
            .probe
            .basic_publish("".into(), queue.into(), mandatory, b"", probe)
            .await;
        match published {
            Ok(confirm) => matches!(confirm.await, Ok(Confirmation::Ack(Some(_)))),
            Err(_) => false,
        }
    }
}

/// The lock, held: its connection and the requests that reach its queue.
struct Lock {
    connection: Connection,
    channel: Channel,
    asked: Consumer,
}

impl Lock {
    /// The lock, when no worker holds it (or the broker cannot be reached); `contender` kept
    /// for the next try when another worker does.
    async fn take(contender: &mut Option<Contender>, amqp: &AmqpSettings) -> Option<Self> {
        if !contender.as_ref().is_some_and(Contender::connected) {
            *contender = Contender::open(amqp).await;
        }
        let queue = lock_queue(&amqp.topology);
        if !contender.as_ref()?.vacant(&queue).await {
            return None;
        }
        let connection = &contender.as_ref()?.connection;
        let taken = async {
            let channel = connection.create_channel().await?;
            let exclusive = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
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
                    queue.as_str().into(),
                    tag.as_str().into(),
                    no_ack,
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, asked))
        };
        // Taken by another worker since the probe (RESOURCE_LOCKED): the next try.
        let (channel, asked) = taken.await.ok()?;
        let Contender { connection, .. } = contender.take()?;
        Some(Self {
            connection,
            channel,
            asked,
        })
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
    let mut contender: Option<Contender> = None;
    let mut due: Option<Instant> = None;
    loop {
        if !lock.as_ref().is_some_and(Lock::held) {
            lock = Lock::take(&mut contender, amqp).await;
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
                // Another worker asking whether the lock is held: it is.
                Some(Ok(delivery)) if delivery.properties.kind().as_ref().is_some_and(|k| k.as_str() == PROBE) => {}
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
    if let Some(contender) = contender {
        let _ = contender.connection.close(200, "stopping".into()).await;
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
