//! The ingest's link to the broker: a reconnecting session that keeps a [`Publisher`] available
//! to the request handlers, or none while the broker is unreachable (requests then get 503 at
//! once instead of hanging).

use std::sync::Arc;
use std::time::Duration;

use harbor_shared::broker;
use harbor_shared::broker::AmqpSettings;
use harbor_shared::ops::Readiness;
use harbor_shared::publisher::Publisher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The current publisher, if connected.
pub type CurrentPublisher = watch::Receiver<Option<Arc<Publisher>>>;

/// Keeps `current` up to date until `shutdown`.
pub async fn maintain(
    amqp: AmqpSettings,
    channels: usize,
    confirm_timeout: Duration,
    current: watch::Sender<Option<Arc<Publisher>>>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let (current, readiness, shutdown_ref) = (&current, &readiness, &shutdown);
    broker::run_reconnecting(
        &amqp,
        "harbor-ingest",
        &shutdown,
        move |connection| async move {
            let publisher =
                Arc::new(Publisher::open(&connection, channels, confirm_timeout).await?);
            current.send_replace(Some(Arc::clone(&publisher)));
            readiness.set(true);
            metrics::gauge!("harbor_ingest_broker_connected").set(1.0);
            tokio::select! {
                () = broker::closed(&connection) => {}
                () = publisher.broken() => {}
                () = shutdown_ref.cancelled() => {}
            }
            readiness.set(false);
            metrics::gauge!("harbor_ingest_broker_connected").set(0.0);
            current.send_replace(None);
            publisher.close().await;
            Ok(())
        },
    )
    .await;
}
