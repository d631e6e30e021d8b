//! A uniquely named topology on the real broker, deleted when dropped, and ways to look into it.

use std::time::Duration;

use futures_util::StreamExt;
use harbor_shared::broker::AmqpSettings;
use harbor_shared::broker::{self, BrokerUrl};
use harbor_shared::topology::Topology;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};

/// The broker tests use.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| harbor_shared::config::DEFAULT_AMQP_URL.into())
}

/// One test's exchanges and queues (`test.<random>`), declared as the binaries declare them.
pub struct TestTopology {
    /// What to hand to the ingest and the worker.
    pub amqp: AmqpSettings,
    /// A connection of the test's own, reopened if the broker was restarted.
    link: tokio::sync::Mutex<(Connection, Channel)>,
}

impl TestTopology {
    /// Declares a fresh topology.
    pub async fn new() -> Self {
        Self::on(&amqp_url()).await
    }

    /// Declares a fresh topology on the broker(s) of this AMQP_URL.
    pub async fn on(url: &str) -> Self {
        let test = Self::named(url).await;
        // Declared once it exists, so that what a failed declaration made is deleted on drop.
        let declared = test.amqp.topology.declare(&test.link.lock().await.0).await;
        declared.unwrap();
        test
    }

    /// Fresh names on the default broker, nothing declared yet (a broker where neither binary
    /// has run); whatever gets declared under them is deleted on drop.
    pub async fn undeclared() -> Self {
        Self::named(&amqp_url()).await
    }

    async fn named(url: &str) -> Self {
        let name = format!("test.{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let amqp = AmqpSettings {
            url: BrokerUrl::parse(url).unwrap(),
            topology: Topology::new(&name, &name).unwrap(),
        };
        let link = open(&amqp).await;
        Self {
            amqp,
            link: tokio::sync::Mutex::new(link),
        }
    }

    /// The test's channel, on a new connection if the old one died (after a broker restart).
    async fn channel(&self) -> Channel {
        let mut link = self.link.lock().await;
        if !link.1.status().connected() {
            *link = open(&self.amqp).await;
        }
        link.1.clone()
    }

    /// The names.
    pub fn topology(&self) -> &Topology {
        &self.amqp.topology
    }

    /// Ready messages in a queue, exactly (a passive declare, not the lagging management API).
    pub async fn ready(&self, queue: &str) -> u32 {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        self.channel()
            .await
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .unwrap()
            .message_count()
    }

    /// Ready messages in the work queues, all together.
    pub async fn work_ready(&self) -> u32 {
        let mut ready = 0;
        for queue in self.topology().work_queues() {
            ready += self.ready(&queue).await;
        }
        ready
    }

    /// Takes (and acks) the next message of the work queues, waiting up to a second for one:
    /// single-active-consumer queues refuse `basic.get`, so this consumes for a moment.
    pub async fn take_work(&self) -> Option<lapin::message::Delivery> {
        let connection = broker::connect(&self.amqp.url, "harbor-sync-tests take")
            .await
            .unwrap();
        let options = BasicConsumeOptions::default();
        let (_channel, mut deliveries) =
            consume_all(&connection, self.topology(), "take", options, 0).await;
        let next = tokio::time::timeout(Duration::from_secs(1), deliveries.next()).await;
        let delivery = next.ok().flatten().map(Result::unwrap);
        if let Some(delivery) = &delivery {
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = connection.close(200, "taken".into()).await;
        delivery
    }

    /// Ready messages in the parked queue.
    pub async fn parked_ready(&self) -> u32 {
        self.ready(&self.topology().parked_queue()).await
    }

    /// Takes (and acks) the next message of a queue.
    pub async fn take(&self, queue: &str) -> Option<BasicGetMessage> {
        let options = BasicGetOptions { no_ack: true };
        self.channel()
            .await
            .basic_get(queue.into(), options)
            .await
            .unwrap()
    }

    /// Takes (and acks) the next parked message.
    pub async fn take_parked(&self) -> Option<BasicGetMessage> {
        self.take(&self.topology().parked_queue()).await
    }

    /// Waits until a queue holds `count` ready messages.
    pub async fn wait_ready(&self, queue: &str, count: u32, timeout: Duration) {
        let what = format!("{count} messages in {queue}");
        crate::wait_until(&what, timeout, || async {
            self.ready(queue).await == count
        })
        .await;
    }

    /// Publishes straight to the exchange (confirmed), bypassing the ingest.
    pub async fn publish(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel()
            .await
            .basic_publish(
                self.topology().exchange().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            confirm.is_ack() && confirm.take_message().is_none(),
            "publish not confirmed"
        );
    }

    /// Caps each work queue at `max_length` messages with a policy (removed on drop): beyond it
    /// the broker refuses publishes with a nack, as a full queue does.
    pub async fn limit_work_queues(&self, max_length: u32) {
        let queue = self.topology().queue();
        let body = serde_json::json!({
            "pattern": format!("^{}\\.[0-9]+$", queue.replace('.', "\\.")),
            "definition": {"max-length": max_length},
            "apply-to": "queues",
            "priority": 100,
        });
        let (url, user, password) =
            management(&format!("/api/policies/%2f/{}", policy_name(queue)));
        let response = reqwest::Client::new()
            .put(url)
            .basic_auth(user, Some(password))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "policy not set: {}",
            response.status()
        );
        // Policies apply asynchronously; wait until every queue reports it.
        for queue in self.topology().work_queues() {
            crate::wait_until(
                "the policy on the queue",
                Duration::from_secs(10),
                || async {
                    let queue = queue_info(&queue).await;
                    queue["effective_policy_definition"]["max-length"] == max_length
                },
            )
            .await;
        }
    }

    /// A consumer of every work queue tagged `tag`, each queue lending it at most `prefetch`
    /// messages (0: no limit), on a connection of its own named the same, returned with it: the
    /// consumer ends when the connection is dropped.
    pub async fn consume_work_queues(
        &self,
        tag: &str,
        options: BasicConsumeOptions,
        prefetch: u16,
    ) -> (Connection, WorkDeliveries) {
        let connection = broker::connect(&self.amqp.url, tag).await.unwrap();
        let (_channel, deliveries) =
            consume_all(&connection, self.topology(), tag, options, prefetch).await;
        (connection, deliveries)
    }

    /// Empties the work queues; how many messages they held.
    pub async fn purge_work_queues(&self) -> u32 {
        let channel = self.channel().await;
        let mut purged = 0;
        for queue in self.topology().work_queues() {
            purged += channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await
                .expect("purge a work queue");
        }
        purged
    }

    /// Deletes the work queues, leaving the exchanges without a queue (publishes are
    /// unroutable).
    pub async fn delete_work_queues(&self) {
        let channel = self.channel().await;
        for queue in self.topology().work_queues() {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
    }
}

/// The deliveries of every work queue, as one stream.
pub type WorkDeliveries = futures_util::stream::SelectAll<Consumer>;

async fn consume_all(
    connection: &Connection,
    topology: &Topology,
    tag: &str,
    options: BasicConsumeOptions,
    prefetch: u16,
) -> (Channel, WorkDeliveries) {
    let channel = connection.create_channel().await.unwrap();
    if prefetch > 0 {
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .unwrap();
    }
    let mut all = futures_util::stream::SelectAll::new();
    for queue in topology.work_queues() {
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("{tag}-{queue}").as_str().into(),
                options,
                FieldTable::default(),
            )
            .await
            .unwrap();
        all.push(consumer);
    }
    (channel, all)
}

impl Drop for TestTopology {
    fn drop(&mut self) {
        let amqp = self.amqp.clone();
        // Drop cannot await; a thread of its own with a small runtime does the deleting.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let Ok(connection) = broker::connect(&amqp.url, "harbor-sync-tests cleanup").await
                else {
                    return;
                };
                let Ok(channel) = connection.create_channel().await else {
                    return;
                };
                let topology = &amqp.topology;
                let mut queues = topology.work_queues();
                queues.extend([topology.parked_queue(), topology.workers_queue()]);
                for queue in queues {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in [
                    topology.exchange().to_owned(),
                    topology.hash_exchange(),
                    topology.dead_letter_exchange(),
                ] {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "cleaned up".into()).await;
                let (url, user, password) = management(&format!(
                    "/api/policies/%2f/{}",
                    policy_name(topology.queue())
                ));
                let _ = reqwest::Client::new()
                    .delete(url)
                    .basic_auth(user, Some(password))
                    .send()
                    .await;
            });
        })
        .join();
    }
}

fn policy_name(queue: &str) -> String {
    format!("{queue}-limit")
}

/// A connection with a confirm-mode channel.
async fn open(amqp: &AmqpSettings) -> (Connection, Channel) {
    let connection = broker::connect(&amqp.url, "harbor-sync-tests")
        .await
        .expect("RabbitMQ must be running at AMQP_URL");
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (connection, channel)
}

/// The management API (`RABBITMQ_MANAGEMENT_URL`, default `http://127.0.0.1:15672`), with the
/// credentials of `AMQP_URL`.
impl TestTopology {
    /// A queue's arguments, as the management API shows them.
    pub async fn queue_arguments(&self, queue: &str) -> serde_json::Map<String, serde_json::Value> {
        let answer = queue_info(queue).await;
        answer["arguments"].as_object().cloned().unwrap_or_default()
    }
}

impl TestTopology {
    /// Waits until a worker of this topology holds the resync lock (its queue exists, as the
    /// management API says: a passive declare cannot tell of another connection's exclusive
    /// queue).
    pub async fn wait_for_resync_lock(&self) {
        let lock = harbor_worker::resync::lock_queue(self.topology());
        crate::wait_until(
            "a worker to hold the resync lock",
            Duration::from_secs(60),
            || async { queue_info(&lock).await.get("name").is_some() },
        )
        .await;
    }
}

/// What the management API says of a queue of the default vhost.
async fn queue_info(queue: &str) -> serde_json::Value {
    let (url, user, password) = management(&format!("/api/queues/%2f/{queue}"));
    reqwest::Client::new()
        .get(url)
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn management(path: &str) -> (String, String, String) {
    let base = std::env::var("RABBITMQ_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    let amqp = url::Url::parse(&amqp_url()).unwrap();
    let user = if amqp.username().is_empty() {
        "guest".to_owned()
    } else {
        amqp.username().to_owned()
    };
    let password = amqp.password().unwrap_or("guest").to_owned();
    (format!("{base}{path}"), user, password)
}

/// Closes, through the management API, every connection whose name contains `name_part` (as
/// an operator would, or a network failure); returns how many it closed. Waits up to 10 s for
/// `expected` of them to show up, since the management API lists new connections with a
/// delay; closes what it found by then.
pub async fn close_connections(name_part: &str, expected: usize) -> usize {
    let client = reqwest::Client::new();
    let (url, user, password) = management("/api/connections?columns=name,client_properties");
    let list = || async {
        let connections: Vec<serde_json::Value> = client
            .get(&url)
            .basic_auth(&user, Some(&password))
            .send()
            .await
            .expect("the RabbitMQ management API must be enabled (rabbitmq-plugins enable rabbitmq_management)")
            .json()
            .await
            .unwrap();
        connections
            .into_iter()
            .filter(|c| {
                c["client_properties"]["connection_name"]
                    .as_str()
                    .is_some_and(|n| n.contains(name_part))
            })
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect::<Vec<String>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut names = list().await;
    while names.len() < expected.max(1) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        names = list().await;
    }
    for name in &names {
        let encoded: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
        let (url, user, password) =
            management(&format!("/api/connections/{}", encoded.replace('+', "%20")));
        let response = client
            .delete(url)
            .basic_auth(&user, Some(&password))
            .header("x-reason", "closed by a test")
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success() || response.status() == 404,
            "{}",
            response.status()
        );
    }
    names.len()
}

/// The `x-failure-reason` a parked message carries.
pub fn failure_reason(message: &BasicGetMessage) -> String {
    let headers = message
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    match headers.inner().get("x-failure-reason") {
        Some(lapin::types::AMQPValue::LongString(reason)) => reason.to_string(),
        other => panic!("x-failure-reason: {other:?}"),
    }
}
