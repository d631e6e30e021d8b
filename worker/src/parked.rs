//! `harbor-worker parked list` and `parked replay`: what failed, and sending it back.
//!
//! Both read the parked queue with unacknowledged gets: a message is only removed (acked) once
//! its republish to the work exchange was confirmed by the broker; everything else goes back to
//! the parked queue when the channel closes.

use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use harbor_shared::broker;
use harbor_shared::broker::AmqpSettings;
use harbor_shared::message::{
    self, ATTEMPTS_HEADER, FAILED_AT_HEADER, FAILURE_REASON_HEADER, INSTANCE_HEADER,
    REQUEST_ID_HEADER, headers_text,
};
use harbor_shared::publisher::{Outgoing, Publisher};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

/// One parked event, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedEvent {
    /// The message id (CloudEvents id or body hash).
    pub message_id: Option<String>,
    /// Harbor's event type (the routing key).
    pub event_type: String,
    /// When it was parked.
    pub failed_at: Option<String>,
    /// Calls made before it was parked.
    pub attempts: Option<i64>,
    /// Why.
    pub reason: Option<String>,
    /// The webhook request that brought it.
    pub request_id: Option<String>,
    /// The Harbor it came from, with several (HARBOR_INSTANCES_FILE).
    pub instance: Option<String>,
}

/// Which parked events to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every one.
    All,
    /// Those with these message ids.
    Ids(Vec<String>),
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Sent back to the work queue and removed from the parked queue.
    pub replayed: usize,
    /// Left parked.
    pub kept: usize,
    /// Ids asked for but not found.
    pub not_found: Vec<String>,
}

fn describe(routing_key: &str, properties: &BasicProperties) -> ParkedEvent {
    let headers = properties.headers().clone().unwrap_or_default();
    ParkedEvent {
        message_id: properties.message_id().as_ref().map(ToString::to_string),
        event_type: routing_key.to_owned(),
        failed_at: headers_text(&headers, FAILED_AT_HEADER).or_else(|| dead_lettered_at(&headers)),
        attempts: match headers.inner().get(ATTEMPTS_HEADER) {
            Some(AMQPValue::LongLongInt(n)) => Some(*n),
            Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
            _ => None,
        },
        reason: headers_text(&headers, FAILURE_REASON_HEADER)
            .or_else(|| dead_lettered_because(&headers)),
        request_id: headers_text(&headers, REQUEST_ID_HEADER),
        instance: headers_text(&headers, INSTANCE_HEADER),
    }
}

/// Why the broker itself dead-lettered a message (the worker parks with `x-failure-reason`; the
/// broker's own dead-lettering says only `x-first-death-reason`).
fn dead_lettered_because(headers: &FieldTable) -> Option<String> {
    let why = headers_text(headers, "x-first-death-reason")?;
    let queue = headers_text(headers, "x-first-death-queue").unwrap_or_else(|| "?".into());
    Some(match why.as_str() {
        "delivery_limit" => format!(
            "the broker dead-lettered it from {queue}: it was delivered more times than the \
             queue's delivery limit, each time left unsettled (its worker stopped or lost the \
             broker while holding it, or could not park it)"
        ),
        _ => format!("the broker dead-lettered it from {queue} ({why})"),
    })
}

/// When the broker dead-lettered a message (`x-death`'s newest entry).
fn dead_lettered_at(headers: &FieldTable) -> Option<String> {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return None;
    };
    let Some(AMQPValue::FieldTable(newest)) = deaths.as_slice().first() else {
        return None;
    };
    let Some(AMQPValue::Timestamp(seconds)) = newest.inner().get("time") else {
        return None;
    };
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(*seconds);
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

async fn open(amqp: &AmqpSettings, queue: &str) -> anyhow::Result<(Connection, Channel, u32)> {
    let connection = broker::connect(&amqp.url, "harbor-worker parked").await?;
    let channel = connection
        .create_channel()
        .await
        .context("Failed to open a channel")?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("The queue {queue} does not exist"))?;
    Ok((connection, channel, declared.message_count()))
}

/// The first `limit` parked events, oldest first; nothing is removed.
pub async fn list(amqp: &AmqpSettings, limit: usize) -> anyhow::Result<Vec<ParkedEvent>> {
    let queue = amqp.topology.parked_queue();
    let (connection, channel, count) = open(amqp, &queue).await?;
    let mut events = Vec::new();
    while events.len() < limit.min(count as usize) {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .context("Failed to read the parked queue")?;
        let Some(message) = got else { break };
        events.push(describe(
            message.delivery.routing_key.as_str(),
            &message.delivery.properties,
        ));
    }
    // Unacked: closing gives every message back to the parked queue.
    let _ = channel.close(200, "listed".into()).await;
    let _ = connection.close(200, "listed".into()).await;
    Ok(events)
}

/// Sends the selected parked events back to the work exchange, each removed from the parked
/// queue (or from the queue `from`, the single work queue of an earlier version, say) only once
/// the broker confirmed its republish.
pub async fn replay(
    amqp: &AmqpSettings,
    selection: &Selection,
    from: Option<&str>,
) -> anyhow::Result<Replayed> {
    let queue = from.map_or_else(|| amqp.topology.parked_queue(), str::to_owned);
    let (connection, channel, count) = open(amqp, &queue).await?;
    let publisher = Publisher::open(&connection, 1, Duration::from_secs(10)).await?;
    let mut summary = Replayed::default();
    let mut found = Vec::new();
    // At most the messages there at the start: those kept come back after the close, not now.
    for _ in 0..count {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .context("Failed to read the parked queue")?;
        let Some(message) = got else { break };
        let delivery = message.delivery;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string);
        let wanted = match selection {
            Selection::All => true,
            Selection::Ids(ids) => id.as_ref().is_some_and(|id| ids.contains(id)),
        };
        if !wanted {
            summary.kept += 1;
            continue;
        }
        found.extend(id);
        publisher
            .publish(Outgoing {
                exchange: amqp.topology.exchange(),
                routing_key: delivery.routing_key.as_str(),
                body: &delivery.data,
                properties: message::replayed(&delivery.properties),
            })
            .await
            .context("Failed to republish a parked event; it stays parked")?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .context("Failed to remove a replayed event from the parked queue")?;
        summary.replayed += 1;
    }
    if let Selection::Ids(ids) = selection {
        summary.not_found = ids
            .iter()
            .filter(|id| !found.contains(id))
            .cloned()
            .collect();
    }
    publisher.close().await;
    let _ = channel.close(200, "replayed".into()).await;
    let _ = connection.close(200, "replayed".into()).await;
    if summary.replayed == 0 && !summary.not_found.is_empty() {
        bail!(
            "no parked event has the id(s) {}",
            summary.not_found.join(", ")
        );
    }
    Ok(summary)
}
