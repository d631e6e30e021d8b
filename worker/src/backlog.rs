//! `harbor-worker backlog`: how many events wait, per queue.

use anyhow::Context;
use harbor_shared::broker;
use harbor_shared::broker::AmqpSettings;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use url::Url;

/// One queue's counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueBacklog {
    /// The queue.
    pub queue: String,
    /// Messages waiting for a consumer.
    pub ready: u32,
    /// Messages delivered and not yet acknowledged (only with the management API).
    pub unacked: Option<u64>,
    /// Consumers; for the work queues together, the workers sharing them.
    pub consumers: u32,
}

/// Counts of the work queues (together, as `<queue>.*`, with the number of workers as their
/// consumers) and of the parked queue: exact ready counts from passive declares, and the unacked
/// count from the management API when its address is given.
pub async fn backlog(
    amqp: &AmqpSettings,
    management: Option<&Url>,
) -> anyhow::Result<Vec<QueueBacklog>> {
    let connection = broker::connect(&amqp.url, "harbor-worker backlog").await?;
    let channel = connection
        .create_channel()
        .await
        .context("Failed to open a channel")?;
    let topology = &amqp.topology;
    let count = |queue: String| {
        let channel = &channel;
        async move {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let declared = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .with_context(|| format!("The queue {queue} does not exist"))?;
            let unacked = match management {
                Some(base) => Some(unacked(base, amqp, &queue).await?),
                None => None,
            };
            Ok::<_, anyhow::Error>(QueueBacklog {
                queue,
                ready: declared.message_count(),
                unacked,
                consumers: declared.consumer_count(),
            })
        }
    };
    let mut work = QueueBacklog {
        queue: format!("{}.*", topology.queue()),
        ready: 0,
        unacked: management.map(|_| 0),
        consumers: count(topology.workers_queue()).await?.consumers,
    };
    for queue in topology.work_queues() {
        let one = count(queue).await?;
        work.ready += one.ready;
        work.unacked = work.unacked.zip(one.unacked).map(|(a, b)| a + b);
    }
    let parked = count(topology.parked_queue()).await?;
    let _ = connection.close(200, "counted".into()).await;
    Ok(vec![work, parked])
}

/// `messages_unacknowledged` from `GET /api/queues/{vhost}/{queue}`, with the broker URL's
/// credentials.
async fn unacked(base: &Url, amqp: &AmqpSettings, queue: &str) -> anyhow::Result<u64> {
    let (user, password, vhost) = amqp.url.credentials_and_vhost();
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("RABBITMQ_MANAGEMENT_URL cannot have a path"))?
        .pop_if_empty()
        .extend(["api", "queues", &vhost, queue]);
    // No redirects (reqwest would follow them with the credentials); errors without the URL,
    // which may carry them.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("Failed to build an HTTP client")?;
    let answer: serde_json::Value = client
        .get(url)
        .basic_auth(user, Some(password))
        .send()
        .await
        .map_err(reqwest::Error::without_url)
        .context("Failed to reach the management API")?
        .error_for_status()
        .map_err(reqwest::Error::without_url)
        .context("The management API refused the request")?
        .json()
        .await
        .context("The management API's answer is unreadable")?;
    Ok(answer["messages_unacknowledged"].as_u64().unwrap_or(0))
}
