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

/// The management API's address of `queue`, and the credentials to ask with. The address may
/// be given as KEDA takes it, `http://user:password@host:15672/<vhost>`: its credentials, else
/// the broker URL's; its path as the vhost, else the broker URL's.
fn queue_url(
    base: &Url,
    amqp: &AmqpSettings,
    queue: &str,
) -> anyhow::Result<(Url, String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (mut user, mut password, mut vhost) = amqp.url.credentials_and_vhost();
    if !base.username().is_empty() {
        user = decode(base.username());
        password = base.password().map(decode).unwrap_or_default();
    }
    let path = base.path().trim_matches('/');
    if !path.is_empty() {
        vhost = decode(path);
    }
    let mut url = base.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("RABBITMQ_MANAGEMENT_URL must be an http(s) address"))?
        .clear()
        .extend(["api", "queues", &vhost, queue]);
    Ok((url, user, password))
}

/// `messages_unacknowledged` from `GET /api/queues/{vhost}/{queue}`.
async fn unacked(base: &Url, amqp: &AmqpSettings, queue: &str) -> anyhow::Result<u64> {
    let (url, user, password) = queue_url(base, amqp, queue)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn amqp(url: &str) -> AmqpSettings {
        AmqpSettings {
            url: harbor_shared::broker::BrokerUrl::parse(url).unwrap(),
            topology: harbor_shared::topology::Topology::new("harbor.events", "harbor.events")
                .unwrap(),
        }
    }

    #[test]
    fn the_management_url_may_carry_credentials_and_a_vhost_as_keda_takes_it() {
        let broker = amqp("amqp://sync:secret@rabbitmq:5672/%2F");
        let keda = Url::parse("http://keda:k%40y@rabbitmq:15672/%2F").unwrap();
        let (url, user, password) = queue_url(&keda, &broker, "harbor.events.0").unwrap();
        assert_eq!(
            url.as_str(),
            "http://rabbitmq:15672/api/queues/%2F/harbor.events.0"
        );
        assert_eq!((user.as_str(), password.as_str()), ("keda", "k@y"));

        let bare = Url::parse("http://rabbitmq:15672").unwrap();
        let (url, user, password) = queue_url(&bare, &broker, "q").unwrap();
        assert_eq!(url.as_str(), "http://rabbitmq:15672/api/queues/%2F/q");
        assert_eq!((user.as_str(), password.as_str()), ("sync", "secret"));

        let other = Url::parse("http://rabbitmq:15672/team").unwrap();
        assert_eq!(
            queue_url(&other, &broker, "q").unwrap().0.as_str(),
            "http://rabbitmq:15672/api/queues/team/q"
        );
    }
}
