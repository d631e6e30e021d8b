//! `harbor-worker resync` asks the worker that holds the resync lock to run it: the request
//! goes to the lock's queue (mandatory, so the broker returns it when no worker holds the
//! lock), its answers come back on RabbitMQ's direct reply-to. The holder answers `working` at
//! once and every [`HEARTBEAT`] while it takes stock, then what each resync found; the command
//! gives up after [`SILENCE`] without an answer. So a resync is paced with the fleet's Port
//! budget and spends the fleet's Port token. Where no worker holds the lock (a first install, a
//! deployment without workers), or the holder does not take the request within [`TAKEN`] (an
//! earlier version, which holds the lock without reading its queue, or one busy with its
//! periodic resync), the command runs the resync itself; the request then expires, and a
//! holder that reaches it late skips it.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use harbor_shared::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Options, Summary, lock::lock_queue};
use crate::settings::{HarborSettings, PortSettings};

/// How often the holder says it is still at work.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long the command waits for the next answer before it gives up.
const SILENCE: Duration = Duration::from_secs(30);
/// How long the command waits for the holder to take its request before running it itself.
const TAKEN: Duration = Duration::from_secs(10);
/// RabbitMQ's direct reply-to pseudo-queue.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A resync asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Asked {
    /// The asker's [`deployment`]: the holder declines unless it is its own.
    pub deployment: String,
    /// The Harbors to resync, by their place in the deployment.
    pub chosen: Vec<usize>,
    /// How.
    pub options: Options,
    /// When, in milliseconds since the Unix epoch: a holder reaching it more than [`TAKEN`]
    /// later skips it (the command has run it itself).
    pub asked_at: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What one Harbor's resync came to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Its instance (`default` for a single Harbor).
    pub instance: String,
    /// What it found, or why it failed.
    pub result: Result<Summary, String>,
}

impl Outcome {
    /// The outcome of `instance`'s resync.
    pub fn of(instance: &str, done: anyhow::Result<Summary>) -> Self {
        Self {
            instance: instance.to_owned(),
            result: done.map_err(|error| format!("{error:#}")),
        }
    }
}

/// The holder's answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
enum Answer {
    /// Still taking stock.
    Working,
    /// Not this worker's to run (its settings differ); the asker runs it.
    Declined { reason: String },
    /// Each Harbor's outcome, in the order asked.
    Done { outcomes: Vec<Outcome> },
}

/// What a deployment is pointed at: each Harbor (by name and address, and the webhook policy
/// a resync keeps in it, but for its secret) and Port (address and client). Two processes with
/// the same one resync the same way.
pub fn deployment(harbors: &[HarborSettings], port: &PortSettings) -> String {
    let harbors: Vec<String> = harbors
        .iter()
        .map(|h| {
            let policy = h.webhooks.as_ref().map_or_else(
                || "no policy".to_owned(),
                |d| {
                    format!(
                        "policy to {} ({}, {})",
                        d.address,
                        d.payload_format,
                        d.event_types.join(" ")
                    )
                },
            );
            format!("{}={} {policy}", h.name.as_deref().unwrap_or("-"), h.url)
        })
        .collect();
    format!(
        "port {} as {}; harbor {}",
        port.url,
        port.client_id,
        harbors.join(", ")
    )
}

/// Asks the lock's holder to run the resync: each chosen Harbor's outcome, or `None` when no
/// worker holds the lock or the holder declined (the caller then runs it itself).
pub async fn ask(
    connection: &Connection,
    topology: &Topology,
    asked: &Asked,
) -> anyhow::Result<Option<Vec<Outcome>>> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let tag = format!("harbor-worker-resync-{}", uuid::Uuid::new_v4().simple());
    let mut answers = channel
        .basic_consume(
            REPLY_TO.into(),
            tag.as_str().into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .context("Failed to consume from the direct reply-to")?;
    let body = serde_json::to_vec(asked)?;
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let properties = BasicProperties::default()
        .with_reply_to(REPLY_TO.into())
        .with_expiration(TAKEN.as_millis().to_string().as_str().into());
    let queue = lock_queue(topology);
    let confirmation = channel
        .basic_publish("".into(), queue.into(), mandatory, &body, properties)
        .await?
        .await
        .context("Failed to ask the workers for the resync")?;
    match confirmation {
        Confirmation::Ack(None) => {}
        Confirmation::Ack(Some(_)) => return Ok(None),
        Confirmation::Nack(_) | Confirmation::NotRequested => {
            bail!("the broker refused the resync request")
        }
    }
    let mut taken = false;
    loop {
        let wait = if taken { SILENCE } else { TAKEN };
        let next = tokio::time::timeout(wait, answers.next()).await;
        let delivery = match next {
            Ok(Some(delivery)) => delivery.context("Failed to read the worker's answer")?,
            Ok(None) => bail!("the broker connection closed while the resync ran"),
            Err(_) if !taken => {
                eprintln!(
                    "the worker holding the resync lock did not take the resync within {}s (an \
                     earlier version, or busy with its periodic resync): resyncing here",
                    TAKEN.as_secs()
                );
                return Ok(None);
            }
            Err(_) => bail!(
                "the worker holding the resync lock took the resync but said nothing for {}s \
                 (did it stop?); its logs tell what it did, and the resync can be run again",
                SILENCE.as_secs()
            ),
        };
        taken = true;
        match serde_json::from_slice(&delivery.data) {
            Ok(Answer::Working) => {}
            Ok(Answer::Declined { reason }) => {
                eprintln!("the worker holding the resync lock declined ({reason}): resyncing here");
                return Ok(None);
            }
            Ok(Answer::Done { outcomes }) => return Ok(Some(outcomes)),
            Err(error) => bail!("the worker's answer is not one this version reads: {error}"),
        }
    }
}

/// Answers one resync asked for through the lock's queue: runs it with `run` (given the
/// chosen Harbors and the options) unless `deployment` is not the asker's, saying it is at
/// work every [`HEARTBEAT`] meanwhile.
pub async fn answer<F, Fut>(delivery: Delivery, channel: &Channel, deployment: &str, run: F)
where
    F: FnOnce(Vec<usize>, Options) -> Fut,
    Fut: Future<Output = Vec<Outcome>>,
{
    let Some(reply_to) = delivery.properties.reply_to().clone() else {
        warn!("A resync request without reply-to on the lock's queue: ignored");
        return;
    };
    let reply = |answer: Answer| {
        let reply_to = reply_to.clone();
        async move {
            let sent = match serde_json::to_vec(&answer) {
                Ok(body) => channel
                    .basic_publish(
                        "".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = sent {
                warn!(%error, "Could not answer the resync command (it will time out)");
            }
        }
    };
    let asked: Asked = match serde_json::from_slice(&delivery.data) {
        Ok(asked) => asked,
        Err(error) => {
            let reason = format!("this worker cannot read the request: {error}");
            return reply(Answer::Declined { reason }).await;
        }
    };
    let late = now_ms().saturating_sub(asked.asked_at);
    if late > u64::try_from(TAKEN.as_millis()).unwrap_or(u64::MAX) {
        warn!(
            late_ms = late,
            "A resync asked for too long ago (its command has run it itself): skipped"
        );
        return;
    }
    if asked.deployment != deployment {
        let reason = "this worker is deployed against other Harbors or another Port".to_owned();
        return reply(Answer::Declined { reason }).await;
    }
    info!(
        harbors = asked.chosen.len(),
        dry_run = asked.options.dry_run,
        force = asked.options.force,
        "Resync asked for by `harbor-worker resync`"
    );
    let work = run(asked.chosen, asked.options);
    tokio::pin!(work);
    let mut beat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            outcomes = &mut work => return reply(Answer::Done { outcomes }).await,
            _ = beat.tick() => reply(Answer::Working).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reads_back_as_written() {
        let summary = Summary {
            harbor: 3,
            ours: 2,
            to_delete: 1,
            requested: 2,
            refused: false,
        };
        let done = Answer::Done {
            outcomes: vec![
                Outcome::of("eu", Ok(summary.clone())),
                Outcome::of("us", Err(anyhow::anyhow!("Harbor answered 401"))),
            ],
        };
        let text = serde_json::to_string(&done).unwrap();
        let Answer::Done { outcomes } = serde_json::from_str(&text).unwrap() else {
            panic!("not done: {text}");
        };
        assert_eq!(outcomes[0].result, Ok(summary));
        assert_eq!(outcomes[1].instance, "us");
        assert_eq!(outcomes[1].result, Err("Harbor answered 401".to_owned()));
    }
}
