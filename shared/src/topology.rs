//! The RabbitMQ topology both binaries declare, idempotently, every time they connect.
//!
//! ```text
//! exchange <exchange> (topic) --#--> exchange <queue>.hash (x-consistent-hash on header x-subject)
//!     --> quorum queues <queue>.0 ... <queue>.15 (single active consumer each)
//!           --dead letters--> exchange <queue>.dlx (fanout) --> quorum queue <queue>.parked
//! quorum queue <queue>.workers: no messages; each worker consumes it, so its consumer count is
//! the number of workers
//! ```
//!
//! Why the hash: a refresh must never run beside another refresh of the same thing, in any
//! worker. Every event names its subject (its Harbor project) in the `x-subject` header; the
//! consistent-hash exchange sends all events of one subject to the same work queue, and each work
//! queue delivers to one consumer at a time (single active consumer), so one worker at a time
//! handles a subject. The workers spread the queues among themselves (see the worker's
//! `balance`). The exchange type comes with RabbitMQ as the `rabbitmq_consistent_hash_exchange`
//! plugin, which must be enabled.

use anyhow::{Context, bail};
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use tracing::warn;

use crate::message::SUBJECT_HEADER;

/// How often the broker redelivers a message before dead-lettering it to the parked queue. The
/// worker parks failures itself; this limit only catches crash loops (a message that kills the
/// worker every time it is delivered).
pub const DELIVERY_LIMIT: i64 = 10;

/// How many work queues the events are spread over: the most workers that can share the work.
/// Both binaries must agree, so it is fixed.
pub const PARTITIONS: usize = 16;

/// Members of each quorum queue when it is created: every node of a cluster of up to this many
/// (RabbitMQ takes all nodes of a smaller one). Quorum queues gain little beyond seven.
pub const QUORUM_GROUP_SIZE: i64 = 7;

/// The argument [`QUORUM_GROUP_SIZE`] is given as. RabbitMQ refuses a declaration whose value
/// differs from the queue's (one declared by a version before it has none): such a queue keeps
/// the members it has, and is declared without it.
const GROUP_SIZE_ARG: &str = "x-quorum-initial-group-size";

/// The most bytes of message bodies a work queue holds: past it the broker refuses publishes
/// (`x-overflow: reject-publish`), the ingest answers 503 and Harbor tries again later, instead
/// of a flood filling the broker's disk. 16 queues of 256 MiB: 4 GiB at most, about four
/// million real events of backlog (docs/deploying.md sizes it; a policy with a lower
/// `max-length-bytes` lowers it, RabbitMQ applying the smaller of the two).
pub const WORK_QUEUE_MAX_BYTES: i64 = 256 * 1024 * 1024;

/// The argument [`WORK_QUEUE_MAX_BYTES`] is given as; like [`GROUP_SIZE_ARG`], a queue declared
/// by a version before it has none, and is declared without it.
const MAX_BYTES_ARG: &str = "x-max-length-bytes";

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

    /// The base name of the work queues (`AMQP_QUEUE`): the queues are `<queue>.0` to
    /// `<queue>.15`, and the other names derive from it.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The work queues, in partition order.
    pub fn work_queues(&self) -> Vec<String> {
        (0..PARTITIONS).map(|p| self.work_queue(p)).collect()
    }

    /// The work queue of partition `p`.
    pub fn work_queue(&self, p: usize) -> String {
        format!("{}.{p}", self.queue)
    }

    /// The consistent-hash exchange in front of the work queues.
    pub fn hash_exchange(&self) -> String {
        format!("{}.hash", self.queue)
    }

    /// The queue whose consumers are the workers (it never holds a message).
    pub fn workers_queue(&self) -> String {
        format!("{}.workers", self.queue)
    }

    /// The fanout exchange failed events are sent to, by the worker or by the broker.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    /// Where failed events wait for an operator.
    pub fn parked_queue(&self) -> String {
        format!("{}.parked", self.queue)
    }

    /// The arguments of each work queue, as versions before [`QUORUM_GROUP_SIZE`] declared
    /// them too ([`Topology::declare`] adds it).
    pub fn work_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        // Quorum: replicated and with a delivery limit, which classic queues lack.
        args.insert("x-queue-type".into(), string("quorum"));
        // One consumer at a time: one worker at a time handles the subjects of this queue.
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        // A message redelivered this often (a worker crashing on it) is dead-lettered.
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            string(&self.dead_letter_exchange()),
        );
        // At-least-once dead-lettering: the broker keeps the message until the parked queue
        // confirmed it, instead of dropping it if the move fails.
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        // Required by at-least-once; when the queue is full, publishes are nacked (the ingest
        // answers 503 and Harbor retries) rather than the oldest event being dropped.
        args.insert("x-overflow".into(), string("reject-publish"));
        args
    }

    /// What [`Topology::declare`] adds to [`Topology::work_queue_arguments`] where the queue
    /// allows it.
    fn work_queue_additions() -> Vec<(&'static str, AMQPValue)> {
        vec![
            (GROUP_SIZE_ARG, AMQPValue::LongLongInt(QUORUM_GROUP_SIZE)),
            (MAX_BYTES_ARG, AMQPValue::LongLongInt(WORK_QUEUE_MAX_BYTES)),
        ]
    }

    /// Declares everything; a no-op when it already exists with the same arguments.
    pub async fn declare(&self, connection: &Connection) -> anyhow::Result<()> {
        let mut channel = connection
            .create_channel()
            .await
            .context("Failed to open a channel")?;
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
        declare_queue(connection, &mut channel, &parked, parked_args, &[]).await?;
        bind(&channel, &parked, &dlx, "").await?;

        let hash = self.hash_exchange();
        let mut hash_args = FieldTable::default();
        // Route on the subject header, not on the routing key (the event type).
        hash_args.insert("hash-header".into(), string(SUBJECT_HEADER));
        channel
            .exchange_declare(
                hash.as_str().into(),
                ExchangeKind::Custom("x-consistent-hash".into()),
                durable,
                hash_args,
            )
            .await
            .with_context(|| {
                format!(
                    "Failed to declare exchange {hash} of type x-consistent-hash (is the \
                     rabbitmq_consistent_hash_exchange plugin enabled on the broker?)"
                )
            })?;
        channel
            .exchange_bind(
                hash.as_str().into(),
                self.exchange.as_str().into(),
                "#".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("Failed to bind exchange {hash} to {}", self.exchange))?;

        for queue in self.work_queues() {
            let args = self.work_queue_arguments();
            let additions = Self::work_queue_additions();
            declare_queue(connection, &mut channel, &queue, args, &additions).await?;
            // The weight of each queue on the hash ring: all equal.
            bind(&channel, &queue, &hash, "1").await?;
        }

        let mut workers_args = FieldTable::default();
        // Quorum, so that the count survives the loss of a node; it holds no message.
        workers_args.insert("x-queue-type".into(), string("quorum"));
        declare_queue(
            connection,
            &mut channel,
            &self.workers_queue(),
            workers_args,
            &[],
        )
        .await?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// Declares a durable quorum queue with `args` and `additions` (arguments a queue declared by an
/// earlier version lacks: replication on [`QUORUM_GROUP_SIZE`] nodes, [`WORK_QUEUE_MAX_BYTES`]).
/// An existing queue the broker refuses an addition for is declared without it, with a warning
/// that says what to do instead, and is checked against the other arguments.
async fn declare_queue(
    connection: &Connection,
    channel: &mut Channel,
    name: &str,
    args: FieldTable,
    additions: &[(&'static str, AMQPValue)],
) -> anyhow::Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut kept: Vec<&(&str, AMQPValue)> = additions.iter().collect();
    loop {
        let mut declared = args.clone();
        for (key, value) in &kept {
            declared.insert((*key).into(), value.clone());
        }
        let error = match channel
            .queue_declare(ShortString::from(name), options, declared)
            .await
        {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        let message = error.to_string();
        let Some(at) = kept.iter().position(|(key, _)| message.contains(*key)) else {
            return Err(error).with_context(|| format!("Failed to declare queue {name}"));
        };
        let (refused, _) = kept.remove(at);
        warn!(queue = name, refused = %message, "{}", without(refused));
        // The refusal closed the channel: the rest of the declaration goes on a new one.
        *channel = connection
            .create_channel()
            .await
            .context("Failed to open a channel")?;
    }
}

/// What an operator does about a queue declared by an earlier version without `argument`.
fn without(argument: &str) -> &'static str {
    if argument == MAX_BYTES_ARG {
        "The queue was created by an earlier version, without a size limit: a flood can fill the \
         broker's disk. Set one with a policy (`max-length-bytes`, `overflow: reject-publish`; \
         see docs/deploying.md)"
    } else {
        "The queue was created by an earlier version, on the nodes RabbitMQ chose then: it keeps \
         them. To replicate it on every node, run `rabbitmq-queues grow <node> all` for each \
         node that lacks it (see the README, Deploying)"
    }
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
