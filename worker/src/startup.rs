//! Builds and runs the worker: the one path production and tests share.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer};
use anyhow::Context;
use harbor_shared::ops::{self, Readiness};
use harbor_shared::telemetry;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::catalog::PortCatalog;
use crate::clients::Http;
use crate::clients::harbor::HarborClient;
use crate::clients::port::PortClient;
use crate::consumer::{self, ConsumerSettings};
use crate::fleet::{Fleet, Member};
use crate::handler::{Handler, Identity};
use crate::plan::HandleEvent;
use crate::resync;
use crate::schedule::{Limits, Scheduler};
use crate::settings::{HarborSettings, PortSettings, Settings};

/// The fleet for these settings: a handler per Harbor, their clients sharing `http`, at most
/// `concurrency` calls in flight in all.
pub fn fleet(
    harbors: &[HarborSettings],
    port: &PortSettings,
    http: Http,
    pull_window: Duration,
    concurrency: u16,
) -> Fleet {
    let calls = Arc::new(Semaphore::new(usize::from(concurrency.max(1))));
    let prefixed = harbors.len() > 1;
    let members = harbors.iter().map(|harbor| {
        let identity = Identity {
            name: harbor.name.clone(),
            prefixed,
        };
        let catalog = PortCatalog::new(
            port_client(port, http.clone()),
            identity.instance(),
            usize::from(concurrency),
        );
        Member {
            handler: Handler::new(
                harbor_client(harbor, http.clone()),
                catalog,
                Arc::clone(&port.mapping),
                identity,
                pull_window,
                Arc::clone(&calls),
            ),
            webhooks: harbor.webhooks.clone(),
        }
    });
    Fleet::new(members.collect())
}

/// The Harbor client for these settings.
pub fn harbor_client(settings: &HarborSettings, http: Http) -> HarborClient {
    HarborClient::new(
        http,
        settings.url.clone(),
        settings.username.clone(),
        settings.password.clone(),
    )
}

/// The scheduler of the worker's refreshes, for these settings.
pub fn scheduler<H: HandleEvent>(handler: Arc<H>, settings: &Settings) -> Scheduler<H> {
    let limits = Limits {
        concurrency: usize::from(settings.concurrency),
        retry: settings.retry,
        max_hold: settings.max_hold,
    };
    Scheduler::start(handler, limits)
}

/// The Port client for these settings.
pub fn port_client(settings: &PortSettings, http: Http) -> PortClient {
    PortClient::new(
        http,
        settings.url.clone(),
        settings.client_id.clone(),
        settings.client_secret.clone(),
    )
    .with_options(
        settings.mapping.create_missing_related,
        settings.mapping.delete_dependents,
    )
    .with_budget(Arc::clone(&settings.budget))
}

/// A bound, consuming worker.
pub struct Worker {
    metrics_port: u16,
    server: Server,
    consumer: JoinHandle<()>,
    shutdown: CancellationToken,
    scheduler_died: CancellationToken,
}

impl Worker {
    /// Binds `METRICS_ADDR` (port 0 picks one) and starts consuming.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let http = settings.http.clone();
        let fleet = Arc::new(fleet(
            &settings.harbors,
            &settings.port,
            http,
            settings.pull_window,
            settings.concurrency,
        ));
        let scheduler = scheduler(Arc::clone(&fleet), &settings);
        let holding = resync::Holding {
            interval: settings.resync_interval,
            retry: settings.retry,
            options: resync::Options {
                deletion_threshold: settings.deletion_threshold,
                force: false,
                dry_run: false,
            },
            deployment: resync::asked::deployment(&settings.harbors, &settings.port),
        };
        let amqp = settings.amqp.clone();
        let worker = Self::start(settings, Arc::clone(&fleet), scheduler).await?;
        let shutdown = worker.shutdown_token();
        tokio::spawn(async move {
            resync::hold(&holding, &fleet, &amqp, &shutdown).await;
        });
        Ok(worker)
    }

    /// [`Worker::build`] with the event handler given: the consumer, the shutdown and the
    /// endpoints are the production ones (tests use it to give a handler that fails on purpose).
    pub async fn start<H: HandleEvent>(
        settings: Settings,
        handler: Arc<H>,
        scheduler: Scheduler<H>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.metrics_addr)
            .with_context(|| format!("Failed to bind METRICS_ADDR {}", settings.metrics_addr))?;
        let metrics_port = listener
            .local_addr()
            .context("Failed to read the bound address")?
            .port();

        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        let scheduler_died = scheduler.died();
        let consumer = tokio::spawn(consumer::run(
            ConsumerSettings {
                amqp: settings.amqp,
                prefetch: settings.prefetch,
                max_held_bytes: settings.max_held_bytes,
                drain_timeout: settings.shutdown_timeout,
            },
            handler,
            scheduler,
            readiness.clone(),
            shutdown.clone(),
        ));

        let ops = ops::configure(readiness, telemetry::metrics());
        register_metrics();
        let server = HttpServer::new(move || App::new().configure(ops.clone()))
            .listen(listener)
            .context("Failed to listen")?
            .workers(1)
            // The worker decides when to stop (after draining), not the HTTP server.
            .disable_signals()
            .run();
        info!(metrics_port, "harbor-worker started");
        Ok(Self {
            metrics_port,
            server,
            consumer,
            shutdown,
            scheduler_died,
        })
    }

    /// The port `/healthz`, `/readyz` and `/metrics` are served on.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// Cancelling it stops the worker as SIGTERM does.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until SIGTERM/SIGINT or the shutdown token: then stops consuming, lets events in
    /// flight finish (at most `SHUTDOWN_TIMEOUT`), closes the broker connection and exits. Ends
    /// with an error, the same way, when the refresh scheduler died: a worker that can no longer
    /// refresh must not stay ready (its orchestrator restarts it).
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let server = self.server.handle();
        let serving = tokio::spawn(self.server);
        let mut failed = false;
        tokio::select! {
            () = terminated() => info!("Stop signal received"),
            () = self.shutdown.cancelled() => {}
            () = self.scheduler_died.cancelled() => failed = true,
        }
        self.shutdown.cancel();
        let _ = self.consumer.await;
        // The health and metrics server holds no work worth waiting for: stop it at once (a
        // graceful stop would wait for idle keep-alive connections).
        server.stop(false).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
        if failed {
            anyhow::bail!("the refresh scheduler panicked; the worker stopped");
        }
        info!("harbor-worker stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The series alerts and dashboards rely on, registered (at zero) once the recorder is
/// installed: an absent series would make "no broker connection" impossible to alert on.
fn register_metrics() {
    metrics::gauge!("harbor_worker_broker_connected").increment(0.0);
    metrics::gauge!("harbor_worker_work_queues_active").increment(0.0);
    metrics::gauge!("harbor_worker_refreshes_in_flight").increment(0.0);
    metrics::gauge!("harbor_worker_held_bytes").increment(0.0);
    for name in [
        "harbor_worker_events_coalesced_total",
        "harbor_worker_refresh_retries_total",
        "harbor_worker_pull_windows_cut_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for api in ["harbor", "port"] {
        metrics::counter!("harbor_worker_retries_total", "api" => api).increment(0);
    }
    for family in crate::clients::port::Family::ALL.map(|f| f.label()) {
        for outcome in ["answered", "refused"] {
            metrics::counter!("harbor_worker_port_requests_total", "family" => family, "outcome" => outcome)
                .increment(0);
        }
        metrics::counter!("harbor_worker_port_waits_total", "family" => family).increment(0);
        metrics::gauge!("harbor_worker_port_pace_per_second", "family" => family).increment(0.0);
    }
}
