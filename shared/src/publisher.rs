//! Confirmed, mandatory, persistent publishing on a small pool of channels.
//!
//! A publish succeeds only when the broker confirmed it (`basic.ack`) and did not return it as
//! unroutable. Many publishes are in flight at once on each channel: confirms are pipelined,
//! never one at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
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

/// Confirm-mode channels of one connection.
pub struct Publisher {
    channels: Vec<Channel>,
    next: AtomicUsize,
    confirm_timeout: Duration,
    broken: CancellationToken,
}

impl Publisher {
    /// Opens `channels` confirm-mode channels on `connection`.
    pub async fn open(
        connection: &Connection,
        channels: usize,
        confirm_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut opened = Vec::with_capacity(channels.max(1));
        for _ in 0..channels.max(1) {
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
        Ok(Self {
            channels: opened,
            next: AtomicUsize::new(0),
            confirm_timeout,
            broken: CancellationToken::new(),
        })
    }

    /// Publishes `message` (mandatory) and waits for the broker's confirm, at most the confirm
    /// timeout. A timeout or a channel error also marks this publisher [`broken`](Self::broken).
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), PublishError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let channel = &self.channels[index];
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
            for channel in &self.channels {
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
