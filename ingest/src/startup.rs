//! Builds and runs the ingest: the one path production and tests share.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use harbor_shared::ops::{self, Readiness};
use harbor_shared::telemetry;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::link;
use crate::routes::webhook::{
    OUTCOMES, SIGNED_READS_AT_ONCE, WebhookState, instance_webhook, webhook,
};
use crate::settings::{Endpoint, Settings};

/// A bound, not yet running ingest.
pub struct Application {
    port: u16,
    server: Server,
    link: JoinHandle<()>,
    shutdown: CancellationToken,
}

impl Application {
    /// Binds `LISTEN_ADDR` (port 0 picks one) and starts connecting to the broker.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = bind(settings.listen_addr)
            .with_context(|| format!("Failed to bind LISTEN_ADDR {}", settings.listen_addr))?;
        let port = listener
            .local_addr()
            .context("Failed to read the bound address")?
            .port();

        let (publisher_tx, publisher_rx) = watch::channel(None);
        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        let link = tokio::spawn(link::maintain(
            settings.amqp.clone(),
            settings.publisher_channels,
            settings.confirm_timeout,
            publisher_tx,
            readiness.clone(),
            shutdown.clone(),
        ));

        let state = web::Data::new(WebhookState {
            endpoints: settings.endpoints,
            publisher: publisher_rx,
            topology: settings.amqp.topology,
            max_body_bytes: settings.max_body_bytes,
            request_timeout: settings.request_timeout,
            signed_reads: tokio::sync::Semaphore::new(SIGNED_READS_AT_ONCE),
        });
        let ops = ops::configure(readiness, telemetry::metrics());
        register_metrics(&state.endpoints);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .configure(ops.clone())
                .route("/webhook", web::post().to(webhook))
                .route("/webhook/{instance}", web::post().to(instance_webhook))
        })
        .workers(settings.http_workers)
        // Past the cap, connections wait in the kernel's backlog, holding no memory of ours.
        .max_connections(settings.max_connections)
        .listen(listener)
        .context("Failed to listen")?
        // Slow or idle clients are cut off instead of holding a connection forever: headers
        // within REQUEST_TIMEOUT, an idle keep-alive connection after 75 s (longer than the
        // usual 60 s of load balancers, so they close first).
        .client_request_timeout(settings.request_timeout)
        .client_disconnect_timeout(Duration::from_secs(5))
        .keep_alive(Duration::from_secs(75))
        // A stopping server closes its idle keep-alive connections at once (actix-web 4.14.1 and
        // later) and waits for the requests in flight: one needs at most the request timeout
        // twice (headers, then body) and the confirm timeout.
        .shutdown_timeout((settings.request_timeout * 2 + settings.confirm_timeout).as_secs())
        .run();
        info!(port, "harbor-ingest listening");
        Ok(Self {
            port,
            server,
            link,
            shutdown,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server as SIGTERM would.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/SIGINT (or [`ServerHandle::stop`]): then stops accepting, lets
    /// requests in flight finish (at most twice REQUEST_TIMEOUT + 5 s), and closes the broker connection.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let served = self.server.await;
        self.shutdown.cancel();
        let _ = self.link.await;
        info!("harbor-ingest stopped");
        served.context("HTTP server failed")
    }
}

/// Connections accepted by the kernel and not yet by the ingest (std's 128 is soon full when
/// MAX_CONNECTIONS holds new ones back); Linux caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 2048;

/// Binds `address` as `TcpListener::bind` does, with a listen backlog of [`BACKLOG`].
fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Every series alerts and dashboards rely on, registered (at zero) once the recorder is
/// installed: an absent series would make "no broker connection" or "a spike of 401s"
/// impossible to alert on.
fn register_metrics(endpoints: &[Endpoint]) {
    metrics::gauge!("harbor_ingest_broker_connected").increment(0.0);
    for endpoint in endpoints {
        for outcome in OUTCOMES {
            let harbor = endpoint.harbor().to_owned();
            metrics::counter!("harbor_ingest_requests_total", "harbor" => harbor, "outcome" => outcome)
                .increment(0);
        }
    }
}
