//! Confirmed, mandatory, persistent publishing on a pool of channels, one publish in flight per
//! channel.
//!
//! A publish succeeds only when the broker confirmed it (`basic.ack`) and did not return it as
//! unroutable. Publishes are pipelined across the channels of the pool, but each channel carries
//! one at a time: lapin (4.12) cannot tell apart the confirms of publishes in flight together on
//! one channel. It numbers a publish before it queues its frames, so publishes from two threads
//! can reach the broker in another order than their numbers, and it hands a returned message to
//! whichever confirm it resolves next (with a `multiple` ack, the first of a hash map's keys).
//! Either way a publish the broker returned or refused can be reported as acknowledged, and one
//! it holds as returned: a 202 for a webhook that is on no queue. With one publish per channel
//! there is nothing to confuse (`docs/confirms.md`; `tests/tests/confirms.rs` keeps the
//! reproduction).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Why a message is not safely on a queue.
#[derive(thiserror::Error, Debug)]
pub enum PublishError {
    /// There is no broker connection right now.
    #[error("not connected to the broker")]
    NotConnected,
    /// The broker refused the message, for example because the queue is full.
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// No queue is bound for the message; the broker returned it.
    #[error("no queue took the message: {0}")]
    Unroutable(String),
    /// The broker did not confirm in time; the connection is presumed dead.
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    /// The channel failed; the connection is presumed dead.
    #[error("channel failed: {0}")]
    Channel(#[source] lapin::Error),
}

/// A message to publish. The body is sent as is.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Target exchange.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Raw body.
    pub body: &'a [u8],
    /// Properties and headers; `delivery_mode` 2 is up to the caller.
    pub properties: BasicProperties,
}

/// Confirm-mode channels of one connection, each carrying one publish at a time.
pub struct Publisher {
    pool: Arc<Pool>,
    confirm_timeout: Duration,
    broken: CancellationToken,
}

struct Pool {
    channels: Vec<Channel>,
    /// The channels no publish is using.
    idle: std::sync::Mutex<Vec<usize>>,
    /// As many permits as idle channels.
    free: Semaphore,
}

impl Pool {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn release(&self, index: usize) {
        self.lock_idle().push(index);
        self.free.add_permits(1);
    }
}

/// A channel taken for one publish. Given back when the publish is over; if the publish was
/// abandoned half way (its caller dropped it) or its confirm did not come, only once the broker
/// has confirmed what it sent, so that the next publish on it is alone again. A channel whose
/// confirm does not come within the confirm timeout is never given back: its publisher is then
/// broken, and replaced with its connection.
struct Lease {
    pool: Arc<Pool>,
    index: usize,
    settled: bool,
    confirm_timeout: Duration,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.settled {
            self.pool.release(self.index);
            return;
        }
        let (pool, index, timeout) = (Arc::clone(&self.pool), self.index, self.confirm_timeout);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let confirmed =
                    tokio::time::timeout(timeout, pool.channels[index].wait_for_confirms()).await;
                if matches!(confirmed, Ok(Ok(_))) {
                    pool.release(index);
                }
            });
        }
    }
}

impl Publisher {
    /// Opens `channels` confirm-mode channels on `connection`: at most that many publishes are
    /// in flight at once; more wait for a channel.
    pub async fn open(
        connection: &Connection,
        channels: usize,
        confirm_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let count = channels.max(1);
        let mut opened = Vec::with_capacity(count);
        for _ in 0..count {
            let channel = connection
                .create_channel()
                .await
                .context("Failed to open a publishing channel")?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .context("Failed to enable publisher confirms")?;
            opened.push(channel);
        }
        let pool = Pool {
            channels: opened,
            idle: std::sync::Mutex::new((0..count).collect()),
            free: Semaphore::new(count),
        };
        Ok(Self {
            pool: Arc::new(pool),
            confirm_timeout,
            broken: CancellationToken::new(),
        })
    }

    /// Publishes `message` (mandatory) and waits for the broker's confirm, at most the confirm
    /// timeout (and as long again for a free channel). A confirm timeout or a channel error also
    /// marks this publisher [`broken`](Self::broken); a broken publisher refuses at once.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), PublishError> {
        if self.broken.is_cancelled() {
            return Err(PublishError::NotConnected);
        }
        // Each permit stands for an idle channel; the semaphore is never closed.
        let permit = tokio::select! {
            permit = self.pool.free.acquire() => permit,
            () = self.broken.cancelled() => return Err(PublishError::NotConnected),
            () = tokio::time::sleep(self.confirm_timeout) => {
                return Err(PublishError::Timeout(self.confirm_timeout));
            }
        };
        let Ok(permit) = permit else {
            return Err(PublishError::NotConnected);
        };
        permit.forget();
        let index = self.pool.lock_idle().pop().unwrap_or_default();
        let mut lease = Lease {
            pool: Arc::clone(&self.pool),
            index,
            settled: false,
            confirm_timeout: self.confirm_timeout,
        };
        let result = self.publish_on(&self.pool.channels[index], message).await;
        // A confirm that did not come may still come: the channel waits for it before reuse.
        lease.settled = !matches!(
            result,
            Err(PublishError::Timeout(_) | PublishError::Channel(_))
        );
        result
    }

    async fn publish_on(
        &self,
        channel: &Channel,
        message: Outgoing<'_>,
    ) -> Result<(), PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirmed = tokio::time::timeout(self.confirm_timeout, async {
            channel
                .basic_publish(
                    message.exchange.into(),
                    message.routing_key.into(),
                    options,
                    message.body,
                    message.properties,
                )
                .await?
                .await
        })
        .await;
        match confirmed {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(PublishError::Unroutable(format!(
                "{} {}",
                returned.reply_code, returned.reply_text
            ))),
            // NotRequested cannot happen on a confirm-mode channel; it is not a confirm either.
            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Err(PublishError::Nacked),
            Ok(Err(error)) => {
                self.broken.cancel();
                Err(PublishError::Channel(error))
            }
            Err(_) => {
                self.broken.cancel();
                Err(PublishError::Timeout(self.confirm_timeout))
            }
        }
    }

    /// Closes the channels. Closing them before the connection keeps lapin from closing them
    /// later, on drop, against a connection that is already closing (which it logs as an error).
    /// Bounded: a broker that does not answer does not hold up a shutdown.
    pub async fn close(&self) {
        let close_all = async {
            for channel in &self.pool.channels {
                let _ = channel.close(200, "closing".into()).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), close_all).await;
    }

    /// Resolves once a publish found the connection unusable; the session should reconnect.
    pub async fn broken(&self) {
        self.broken.cancelled().await;
    }
}
