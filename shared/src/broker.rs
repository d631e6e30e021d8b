//! One reconnecting session with RabbitMQ.
//!
//! lapin can recover connections by itself, but its recovery gives up after a fixed number of
//! attempts and replays channel state we would rather rebuild. Instead each binary runs
//! [`run_reconnecting`]: connect, declare the topology, hand the connection to a session
//! function, and when the connection dies (or the session reports a broken channel) start over
//! with backoff, forever, until shutdown. Unacknowledged deliveries of a dead connection are
//! redelivered by the broker, so nothing is lost in between.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use backoff::backoff::Backoff;
use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rand::seq::SliceRandom;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::topology::Topology;

/// How long one connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker and the names of the exchanges and queues: the typed form of
/// [`crate::config::AmqpArgs`].
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// Where the broker is.
    pub url: BrokerUrl,
    /// Names of the exchanges and queues.
    pub topology: Topology,
}

/// One or more `amqp://` or `amqps://` URLs, comma-separated: the nodes of a cluster, tried in
/// turn. They usually carry a password, so they are only ever shown redacted
/// (`amqp://user:***@host:5672/vhost`).
#[derive(Clone)]
pub struct BrokerUrl {
    nodes: Vec<Node>,
}

#[derive(Clone)]
struct Node {
    url: SecretString,
    redacted: String,
}

impl BrokerUrl {
    /// Checks each URL's scheme and that it has a host.
    pub fn parse(raw: &str) -> anyhow::Result<Self> {
        let nodes = raw
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .enumerate()
            .map(|(i, raw)| Node::parse(raw).with_context(|| format!("URL {}", i + 1)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if nodes.is_empty() {
            bail!("no URL");
        }
        Ok(Self { nodes })
    }

    /// User, password and vhost of the first URL, for the management API (`guest`, `guest`,
    /// `/` by default).
    pub fn credentials_and_vhost(&self) -> (String, String, String) {
        let Ok(url) = url::Url::parse(self.nodes[0].url.expose_secret()) else {
            return ("guest".into(), "guest".into(), "/".into());
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let user = if url.username().is_empty() {
            "guest".to_owned()
        } else {
            decode(url.username())
        };
        let password = url.password().map_or_else(|| "guest".to_owned(), decode);
        let vhost = match url.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            vhost => decode(vhost),
        };
        (user, password, vhost)
    }

    /// The nodes in a random order, so that a fleet spreads over them.
    fn shuffled(&self) -> Vec<&Node> {
        let mut nodes: Vec<&Node> = self.nodes.iter().collect();
        nodes.shuffle(&mut rand::rng());
        nodes
    }
}

impl Node {
    fn parse(raw: &str) -> anyhow::Result<Self> {
        let mut url = url::Url::parse(raw).context("not a URL")?;
        if !matches!(url.scheme(), "amqp" | "amqps") {
            bail!("scheme must be amqp or amqps, not {:?}", url.scheme());
        }
        if url.host_str().is_none_or(str::is_empty) {
            bail!("no host");
        }
        if url.password().is_some() {
            // Cannot fail: the URL has a host, so it can carry a password.
            let _ = url.set_password(Some("***"));
        }
        Ok(Self {
            url: SecretString::from(raw.to_owned()),
            redacted: url.to_string(),
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<&str> = self.nodes.iter().map(|n| n.redacted.as_str()).collect();
        f.write_str(&shown.join(","))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

/// Opens a connection, named `name` in the management UI, to the first of the nodes (in a
/// random order) that answers.
pub async fn connect(url: &BrokerUrl, name: &str) -> anyhow::Result<Connection> {
    connect_any(url, name)
        .await
        .map(|(connection, _)| connection)
}

/// [`connect`], and which node (redacted) it connected to.
async fn connect_any(url: &BrokerUrl, name: &str) -> anyhow::Result<(Connection, String)> {
    let mut failures = Vec::new();
    for node in url.shuffled() {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(node.url.expose_secret(), properties),
        )
        .await;
        match connection {
            Ok(Ok(connection)) => return Ok((connection, node.redacted.clone())),
            Ok(Err(error)) => failures.push(format!("{}: {error}", node.redacted)),
            Err(_) => failures.push(format!("{}: timed out", node.redacted)),
        }
    }
    match failures.as_slice() {
        [one] => bail!("Failed to connect to {one}"),
        _ => bail!(
            "Failed to connect to any of the brokers: {}",
            failures.join("; ")
        ),
    }
}

/// Resolves when the connection has failed or been closed.
///
/// lapin reports errors on its event stream; the status check catches a failure that happened
/// before this function started listening.
pub async fn closed(connection: &Connection) {
    let events = connection.events_listener();
    tokio::pin!(events);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(lapin::Event::Error(error)) => {
                    warn!(error = %error, "Broker connection failed");
                    return;
                }
                None => return,
                Some(_) => {}
            },
            _ = tick.tick() => {
                if !connection.status().connected() {
                    return;
                }
            }
        }
    }
}

/// Connects, declares the topology, and runs `session` on the connection; reconnects with
/// jittered exponential backoff (250 ms up to 5 s) whenever the session ends, until `shutdown`.
///
/// `session` should return when [`closed`] resolves, when it finds its channels broken, or on
/// shutdown. Its error is logged here, once.
pub async fn run_reconnecting<F, Fut>(
    amqp: &AmqpSettings,
    name: &str,
    shutdown: &CancellationToken,
    mut session: F,
) where
    F: FnMut(Arc<Connection>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    // The builder sets the first wait to the initial interval; a struct literal over
    // `default()` would keep the default's (500 ms) until the first reset.
    let mut backoff = backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(250))
        .with_max_interval(Duration::from_secs(5))
        .with_max_elapsed_time(None)
        .build();
    while !shutdown.is_cancelled() {
        match open(amqp, name).await {
            Ok((connection, node)) => {
                backoff.reset();
                info!(broker = %node, "Connected to the broker");
                let result = session(Arc::clone(&connection)).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    connection.close(200, "session ended".into()),
                )
                .await;
                match result {
                    Ok(()) if shutdown.is_cancelled() => return,
                    Ok(()) => warn!(broker = %node, "Lost the broker connection; reconnecting"),
                    Err(error) => warn!(
                        broker = %node,
                        error = format!("{error:#}"),
                        "Broker session failed; reconnecting"
                    ),
                }
            }
            Err(error) => warn!(
                error = format!("{error:#}"),
                "Cannot reach the broker; retrying"
            ),
        }
        let delay = backoff.next_backoff().unwrap_or(backoff.max_interval);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// A connection to one of the nodes, with the topology declared, and that node.
async fn open(amqp: &AmqpSettings, name: &str) -> anyhow::Result<(Arc<Connection>, String)> {
    // Named after the binary and its queue, so that it can be told apart in the management UI.
    let name = format!("{name} ({})", amqp.topology.queue());
    let (connection, node) = connect_any(&amqp.url, &name).await?;
    amqp.topology
        .declare(&connection)
        .await
        .with_context(|| format!("On {node}"))?;
    retire_single_work_queue(&connection, &amqp.topology).await;
    Ok((Arc::new(connection), node))
}

/// Versions before the 16 work queues had one, named `AMQP_QUEUE` and bound to the exchange: it
/// would keep a copy of every event with nobody to consume it. It is unbound (not deleted: what
/// it holds is moved with `harbor-worker parked replay --all --from <queue>`).
async fn retire_single_work_queue(connection: &Connection, topology: &Topology) {
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = topology.queue();
    // Absent (the usual case), the passive declare fails and closes this channel.
    if let Ok(old) = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        let unbound = channel
            .queue_unbind(
                queue.into(),
                topology.exchange().into(),
                "#".into(),
                FieldTable::default(),
            )
            .await;
        warn!(
            queue,
            messages = old.message_count(),
            unbound = unbound.is_ok(),
            "The single work queue of an earlier version exists: it no longer receives events; move what it holds with `harbor-worker parked replay --all --from {queue}`, then delete it"
        );
        let _ = channel.close(200, "checked".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let url = BrokerUrl::parse("amqp://user:hunter2@rabbit:5672/%2f").unwrap();
        assert_eq!(url.to_string(), "amqp://user:***@rabbit:5672/%2f");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(
            url.nodes[0].url.expose_secret(),
            "amqp://user:hunter2@rabbit:5672/%2f"
        );
    }

    #[test]
    fn several_urls_are_the_nodes_of_a_cluster() {
        let url =
            BrokerUrl::parse("amqp://u:pw@rmq-0:5672/%2f, amqp://u:pw@rmq-1:5672/%2f,").unwrap();
        assert_eq!(
            url.to_string(),
            "amqp://u:***@rmq-0:5672/%2f,amqp://u:***@rmq-1:5672/%2f"
        );
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let order = url.shuffled();
            assert_eq!(order.len(), 2);
            firsts.insert(order[0].redacted.clone());
        }
        assert_eq!(firsts.len(), 2, "the order is never shuffled");
        let error = BrokerUrl::parse("amqp://a/%2f,http://b").unwrap_err();
        assert!(format!("{error:#}").contains("URL 2"), "{error:#}");
        assert!(BrokerUrl::parse(" , ").is_err());
    }

    #[test]
    fn credentials_and_vhost_are_decoded_with_amqp_defaults() {
        let url = BrokerUrl::parse("amqp://sync:p%40s+s@rabbit:5672/%2f").unwrap();
        assert_eq!(
            url.credentials_and_vhost(),
            ("sync".into(), "p@s+s".into(), "/".into())
        );
        let url = BrokerUrl::parse("amqp://rabbit/prod").unwrap();
        assert_eq!(
            url.credentials_and_vhost(),
            ("guest".into(), "guest".into(), "prod".into())
        );
    }

    #[test]
    fn only_amqp_urls_with_a_host_are_accepted() {
        assert!(BrokerUrl::parse("http://rabbit").is_err());
        assert!(BrokerUrl::parse("not a url").is_err());
        assert!(BrokerUrl::parse("amqps://rabbit.example.com/prod").is_ok());
    }
}
