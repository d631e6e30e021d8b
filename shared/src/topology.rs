//! The RabbitMQ topology both binaries declare, idempotently, every time they connect.
//!
//! ```text
//! exchange <exchange> (topic) --#--> quorum queue <queue> --dead letters--> exchange <queue>.dlx
//!                                                                 (fanout) --> quorum queue <queue>.parked
//! ```

use anyhow::{Context, bail};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// How often the broker redelivers a message before dead-lettering it to the parked queue. The
/// worker parks failures itself; this limit only catches crash loops (a message that kills the
/// worker every time it is delivered).
pub const DELIVERY_LIMIT: i64 = 10;

/// Names of the exchanges and queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    exchange: String,
    queue: String,
}

impl Topology {
    /// Checks the names: non-empty, at most 200 bytes (AMQP allows 255 and we add suffixes),
    /// letters, digits and `.`, `_`, `-`, `:`.
    pub fn new(exchange: &str, queue: &str) -> anyhow::Result<Self> {
        for (var, name) in [("AMQP_EXCHANGE", exchange), ("AMQP_QUEUE", queue)] {
            let valid_chars = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
            if name.is_empty() || name.len() > 200 || !valid_chars {
                bail!(
                    "{var} must be 1-200 characters of letters, digits, '.', '_', '-' or ':' (got {name:?})"
                );
            }
        }
        Ok(Self {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
        })
    }

    /// The topic exchange webhooks are published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The work queue the worker consumes.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The fanout exchange failed events are sent to, by the worker or by the broker.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    /// Where failed events wait for an operator.
    pub fn parked_queue(&self) -> String {
        format!("{}.parked", self.queue)
    }

    /// Declares everything; a no-op when it already exists with the same arguments.
    pub async fn declare(&self, channel: &Channel) -> anyhow::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let dlx = self.dead_letter_exchange();
        let parked = self.parked_queue();
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("Failed to declare exchange {}", self.exchange))?;
        // Fanout: a parked message keeps its original routing key (the event type), and every
        // key must reach the parked queue.
        channel
            .exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("Failed to declare exchange {dlx}"))?;

        let mut parked_args = FieldTable::default();
        // Quorum: replicated, so parked events survive the loss of a broker node.
        parked_args.insert("x-queue-type".into(), string("quorum"));
        declare_queue(channel, &parked, parked_args).await?;
        bind(channel, &parked, &dlx, "").await?;

        let mut args = FieldTable::default();
        // Quorum: replicated and with a delivery limit, which classic queues lack.
        args.insert("x-queue-type".into(), string("quorum"));
        // A message redelivered this often (a worker crashing on it) is dead-lettered.
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        args.insert("x-dead-letter-exchange".into(), string(&dlx));
        // At-least-once dead-lettering: the broker keeps the message until the parked queue
        // confirmed it, instead of dropping it if the move fails.
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        // Required by at-least-once; when the queue is full, publishes are nacked (the ingest
        // answers 503 and Harbor retries) rather than the oldest event being dropped.
        args.insert("x-overflow".into(), string("reject-publish"));
        declare_queue(channel, &self.queue, args).await?;
        bind(channel, &self.queue, &self.exchange, "#").await?;
        Ok(())
    }
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> anyhow::Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(ShortString::from(name), options, args)
        .await
        .with_context(|| format!("Failed to declare queue {name}"))?;
    Ok(())
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> anyhow::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("Failed to bind queue {queue} to exchange {exchange}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_follow_the_queue() {
        let t = Topology::new("harbor.events", "work").unwrap();
        assert_eq!(t.dead_letter_exchange(), "work.dlx");
        assert_eq!(t.parked_queue(), "work.parked");
    }

    #[test]
    fn bad_names_are_refused_naming_the_variable() {
        let err = Topology::new("has space", "q").unwrap_err().to_string();
        assert!(err.starts_with("AMQP_EXCHANGE"), "{err}");
        let err = Topology::new("x", "").unwrap_err().to_string();
        assert!(err.starts_with("AMQP_QUEUE"), "{err}");
        assert!(Topology::new("x", &"q".repeat(201)).is_err());
    }
}
