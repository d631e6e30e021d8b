//! Confirmed, mandatory, persistent publishing in batches on a pool of channels, one batch in
//! flight per channel.
//!
//! A publish succeeds only when the broker confirmed it (`basic.ack`) and did not return it as
//! unroutable. The publishes waiting when a channel is free go out on it together, so that the
//! broker confirms many messages per channel and per acknowledgement (64 channels carrying one
//! publish each cost the broker nearly twice the CPU per message of one channel carrying 64).
//! lapin (4.12) cannot be trusted to tell the publishes of one channel apart, and this module
//! does not ask it to (`docs/confirms.md`; `tests/tests/confirms.rs` keeps the reproduction):
//!
//! - lapin numbers a publish before it queues its frames, so publishes from two threads can
//!   reach the broker in another order than their numbers. Here one task publishes a batch,
//!   numbering and queueing each publish in turn within one poll: the numbers follow the frames.
//! - lapin hands a returned message to whichever confirm it resolves next, not to the publish it
//!   belongs to. Here a channel carries one batch at a time, so every return of a batch reaches
//!   some confirm of the same batch (the broker returns a message before it confirms it), and
//!   the batch gives each returned message to the publish whose message it is. Each publish is
//!   answered as soon as its outcome is sure (see `publish_batch`), not when its whole batch is.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::{MaybeDone, maybe_done};
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The most publishes one batch carries.
const MAX_BATCH: usize = 256;

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

/// A publish handed to the batching task, and where its outcome goes.
struct Request {
    message: Message,
    outcome: oneshot::Sender<Result<(), PublishError>>,
}

/// What a publish sends.
struct Message {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Message {
    /// Whether `returned` is this message.
    fn is(&self, returned: &BasicReturnMessage) -> bool {
        let message = &returned.delivery;
        message.data == self.body
            && message.routing_key.as_str() == self.routing_key
            && message.exchange.as_str() == self.exchange
            && message.properties == self.properties
    }
}

/// Each publish's caller, until told its outcome.
struct Outcomes(Vec<Option<oneshot::Sender<Result<(), PublishError>>>>);

impl Outcomes {
    /// Tells publish `index` (if its caller still waits) its outcome, once.
    fn tell(&mut self, index: usize, outcome: Result<(), PublishError>) {
        if let Some(sender) = self.0[index].take() {
            let _ = sender.send(outcome);
        }
    }
}

/// Confirm-mode channels of one connection and the task that publishes on them.
pub struct Publisher {
    requests: mpsc::UnboundedSender<Request>,
    /// The publishing task's half of the queue, until the first publish starts the task.
    queue: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
    channels: Vec<Channel>,
    confirm_timeout: Duration,
    broken: CancellationToken,
}

impl Publisher {
    /// Opens `channels` confirm-mode channels on `connection`: at most that many batches are in
    /// flight at once; publishes arriving meanwhile wait for a free channel. The task publishing
    /// on them starts with the first publish, on that publish's runtime: in the ingest, the HTTP
    /// thread's, so that neither a publish nor its confirm crosses to another thread on its way.
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
        let (requests, queue) = mpsc::unbounded_channel();
        let broken = CancellationToken::new();
        Ok(Self {
            requests,
            queue: std::sync::Mutex::new(Some(queue)),
            channels: opened,
            confirm_timeout,
            broken,
        })
    }

    /// Publishes `message` (mandatory) and waits for the broker's confirm, at most the confirm
    /// timeout (and as long again for a free channel). A confirm timeout or a channel error also
    /// marks this publisher [`broken`](Self::broken); a broken publisher refuses at once.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), PublishError> {
        if self.broken.is_cancelled() {
            return Err(PublishError::NotConnected);
        }
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(queue) = queue {
            let channels = self.channels.clone();
            tokio::spawn(run(
                channels,
                queue,
                self.confirm_timeout,
                self.broken.clone(),
            ));
        }
        let (outcome, answer) = oneshot::channel();
        let request = Request {
            message: Message {
                exchange: message.exchange.to_owned(),
                routing_key: message.routing_key.to_owned(),
                body: message.body.to_vec(),
                properties: message.properties,
            },
            outcome,
        };
        if self.requests.send(request).is_err() {
            return Err(PublishError::NotConnected);
        }
        match tokio::time::timeout(self.confirm_timeout * 2, answer).await {
            Ok(Ok(outcome)) => outcome,
            // The task ended (the publisher broke) without publishing it.
            Ok(Err(_)) => Err(PublishError::NotConnected),
            Err(_) => Err(PublishError::Timeout(self.confirm_timeout * 2)),
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

/// Takes the waiting publishes as a batch onto each channel that is free, until the publisher is
/// dropped or broken. A channel comes back when its batch is settled, unless its confirms did
/// not come or it failed.
async fn run(
    channels: Vec<Channel>,
    mut queue: mpsc::UnboundedReceiver<Request>,
    confirm_timeout: Duration,
    broken: CancellationToken,
) {
    let mut idle: Vec<usize> = (0..channels.len()).rev().collect();
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(settled) = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(index) = settled {
                    idle.push(index);
                }
            }
            request = queue.recv(), if !idle.is_empty() => {
                let Some(first) = request else { break };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
                let index = idle.pop().unwrap_or_default();
                let channel = channels[index].clone();
                let broken = broken.clone();
                in_flight.push(async move {
                    publish_batch(&channel, batch, confirm_timeout, &broken)
                        .await
                        .then_some(index)
                });
            }
            () = broken.cancelled() => break,
        }
    }
    // Publishes still waiting are dropped: their callers get NotConnected.
}

/// What is known of one publish of a batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// No confirm yet.
    Waiting,
    /// Acknowledged with no returned message, first seen in this pass over the batch.
    Acked(u64),
    /// Acknowledged, carrying another publish's returned message: its own may still come.
    AckedCarrying,
    /// Its outcome is told.
    Settled,
}

/// Publishes `batch` on `channel` and tells each request its outcome as soon as it is sure;
/// whether the channel can carry another batch.
///
/// lapin resolves the confirms one by one on its I/O thread and hands each the oldest returned
/// message waiting, if any; the broker returns a message before it acknowledges it. So a
/// publish acknowledged with nothing handed to it had its own returned message (if any) handed
/// to a confirm resolved before it, and every such confirm is resolved by the time its own is
/// seen: one more pass over the batch sees them all. A publish handed another's returned message
/// may have its own handed to one resolved after it, so it waits for the whole batch.
async fn publish_batch(
    channel: &Channel,
    batch: Vec<Request>,
    confirm_timeout: Duration,
    broken: &CancellationToken,
) -> bool {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let (messages, outcomes): (Vec<Message>, Vec<_>) = batch
        .into_iter()
        .map(|request| (request.message, Some(request.outcome)))
        .unzip();
    let mut outcomes = Outcomes(outcomes);
    let mut publishes: Vec<Pin<Box<MaybeDone<_>>>> = messages
        .iter()
        .map(|message| {
            Box::pin(maybe_done(async move {
                channel
                    .basic_publish(
                        message.exchange.as_str().into(),
                        message.routing_key.as_str().into(),
                        options,
                        &message.body,
                        message.properties.clone(),
                    )
                    .await?
                    .await
            }))
        })
        .collect();
    let mut seen = vec![Seen::Waiting; messages.len()];
    let mut usable = true;
    let mut pass = 0_u64;
    // Every poll polls each publish in turn; the first poll of each numbers it and queues its
    // frames before it waits, so the numbers lapin gives follow the order of the frames.
    let settled = std::future::poll_fn(|cx| {
        loop {
            pass += 1;
            let mut new = false;
            for index in 0..messages.len() {
                if seen[index] != Seen::Waiting || publishes[index].as_mut().poll(cx).is_pending() {
                    continue;
                }
                new = true;
                let confirmed = publishes[index].as_mut().take_output();
                let (outcome, returned) = match confirmed {
                    Some(Ok(Confirmation::Ack(returned))) => (Ok(()), returned),
                    Some(Ok(Confirmation::Nack(returned))) => (Err(PublishError::Nacked), returned),
                    // NotRequested cannot happen on a confirm-mode channel; it is no confirm.
                    Some(Ok(Confirmation::NotRequested)) | None => {
                        (Err(PublishError::Nacked), None)
                    }
                    Some(Err(error)) => {
                        usable = false;
                        (Err(PublishError::Channel(error)), None)
                    }
                };
                let carrying = returned.is_some();
                if let Some(message) = returned {
                    give_back(&messages, &mut outcomes, &mut seen, &message);
                }
                if seen[index] == Seen::Settled {
                    continue;
                }
                match outcome {
                    Ok(()) if carrying => seen[index] = Seen::AckedCarrying,
                    Ok(()) => seen[index] = Seen::Acked(pass),
                    Err(error) => {
                        outcomes.tell(index, Err(error));
                        seen[index] = Seen::Settled;
                    }
                }
            }
            let all = !seen.contains(&Seen::Waiting);
            for (index, seen) in seen.iter_mut().enumerate() {
                let sure = match *seen {
                    Seen::Acked(first) => first < pass || all,
                    Seen::AckedCarrying => all,
                    Seen::Waiting | Seen::Settled => false,
                };
                if sure {
                    outcomes.tell(index, Ok(()));
                    *seen = Seen::Settled;
                }
            }
            if all {
                return Poll::Ready(());
            }
            if !new {
                return Poll::Pending;
            }
        }
    });
    if tokio::time::timeout(confirm_timeout, settled)
        .await
        .is_err()
    {
        broken.cancel();
        for index in 0..messages.len() {
            outcomes.tell(index, Err(PublishError::Timeout(confirm_timeout)));
        }
        return false;
    }
    if !usable {
        broken.cancel();
    }
    usable
}

/// Gives a returned message to the publish of the batch whose message it is (the first of
/// those alike not yet told): its outcome is unroutable. One matching none (which cannot happen
/// unless the broker changed the message) makes every acknowledgement not yet told untrusted.
fn give_back(
    messages: &[Message],
    outcomes: &mut Outcomes,
    seen: &mut [Seen],
    returned: &BasicReturnMessage,
) {
    let matching: Vec<usize> = (0..messages.len())
        .filter(|i| messages[*i].is(returned))
        .collect();
    let owners: Vec<usize> = match matching.iter().find(|i| seen[**i] != Seen::Settled) {
        Some(owner) => vec![*owner],
        None if matching.is_empty() => (0..messages.len())
            .filter(|i| seen[*i] != Seen::Settled)
            .collect(),
        // Its publish was told already (refused): nothing more to tell.
        None => Vec::new(),
    };
    for index in owners {
        let reason = format!("{} {}", returned.reply_code, returned.reply_text);
        outcomes.tell(index, Err(PublishError::Unroutable(reason)));
        seen[index] = Seen::Settled;
    }
}
