//! `harbor-sandbox`: Harbor and Port in one process, in memory, for trying the system without
//! either (docker compose, the local script, and the tests use it).
//!
//! - As Harbor's API (`/api/v2.0/...`, basic auth): the projects, repositories and artifacts
//!   the worker reads, with the shapes of Harbor's swagger and 404 for what does not exist.
//! - As Port's API (`/v1/...`, bearer token from `/v1/auth/access_token`): blueprints and
//!   entities, with Port's identifier rules, schema checks (unknown property → 422) and 401 for
//!   a bad token.
//! - As Harbor for a person (`/sandbox/...`): `POST /sandbox/push {"repository":
//!   "library/nginx", "tag": "1.27"}` (and `pull`, `delete`, `scan`) changes the registry and
//!   sends the webhook Harbor would send, in Harbor's format and with the `Authorization`
//!   header Harbor would send, to the ingest. `GET /sandbox/port/entities` shows what Port holds,
//!   `GET /sandbox/port/requests` the entity writes it received, `GET /sandbox/harbor` the
//!   registry and its webhook policies. `POST /sandbox/project {"name": "p",
//!   "webhooks_forbidden": true}` makes Harbor refuse the account the project's policies (403).

pub mod control;
pub mod harbor;
pub mod limits;
pub mod policies;
pub mod port;
pub mod state;

use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use state::{PortStore, Registry};

/// Which of Harbor's payload formats the sandbox's webhooks use.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// `{"type": "PUSH_ARTIFACT", "event_data": ...}`
    Default,
    /// CloudEvents 1.0.
    Cloudevents,
}

/// Plays Harbor and Port in memory, and sends Harbor's webhooks on request.
#[derive(Parser, Debug, Clone)]
#[command(name = "harbor-sandbox", version)]
pub struct Settings {
    #[command(subcommand)]
    pub command: Option<SandboxCommand>,

    /// Address to serve the fake Harbor API, the fake Port API and `/sandbox/...` on.
    #[arg(long, env = "SANDBOX_LISTEN_ADDR", default_value = "0.0.0.0:8090")]
    pub listen_addr: SocketAddr,

    /// Where Harbor's webhooks go: the ingest's `/webhook`.
    #[arg(
        long,
        env = "SANDBOX_WEBHOOK_URL",
        default_value = "http://127.0.0.1:8080/webhook"
    )]
    pub webhook_url: String,

    /// The Authorization header sent with each webhook: Harbor sends its policy's "Auth
    /// Header" verbatim, which is the webhook secret.
    #[arg(
        long,
        env = "WEBHOOK_SECRET",
        hide_env_values = true,
        default_value = "change-me-to-a-long-secret",
        hide_default_value = true
    )]
    pub webhook_auth: String,

    /// Payload format of the webhooks.
    #[arg(long, env = "SANDBOX_PAYLOAD_FORMAT", value_enum, default_value_t = PayloadFormat::Default)]
    pub payload_format: PayloadFormat,

    /// The Harbor user the fake Harbor API accepts: `admin` is a system administrator; any
    /// other account (a robot account) is answered 403 for anything in a project that does not
    /// exist, as by Harbor.
    #[arg(long, env = "HARBOR_USERNAME", default_value = "admin")]
    pub harbor_username: String,

    /// Its password.
    #[arg(
        long,
        env = "HARBOR_PASSWORD",
        hide_env_values = true,
        default_value = "Harbor12345",
        hide_default_value = true
    )]
    pub harbor_password: String,

    /// The Port client id the fake Port API accepts.
    #[arg(long, env = "PORT_CLIENT_ID", default_value = "sandbox-client")]
    pub port_client_id: String,

    /// Its secret.
    #[arg(
        long,
        env = "PORT_CLIENT_SECRET",
        hide_env_values = true,
        default_value = "sandbox-secret",
        hide_default_value = true
    )]
    pub port_client_secret: String,

    /// Each answer of the fake Harbor API waits a random 0 to this many milliseconds, as a busy
    /// Harbor does (0: at once).
    #[arg(long, env = "SANDBOX_HARBOR_LATENCY_MS", default_value_t = 0)]
    pub harbor_latency_ms: u64,

    /// Start without Port's blueprints, as a new Port account does (run `harbor-worker
    /// blueprints` to create them). By default they exist.
    #[arg(long, env = "SANDBOX_EMPTY_PORT")]
    pub empty_port: bool,

    /// Enforce Port's published rate limits divided by this (20: a storm of N requests stands
    /// for one of 20 × N at Port's real limits), with Port's `x-ratelimit-*` headers and 429s.
    /// Unset: no limit.
    #[arg(long, env = "SANDBOX_PORT_RATE_SCALE")]
    pub port_rate_scale: Option<f64>,
}

/// What to do; serving is the default.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum SandboxCommand {
    /// Serve (the default).
    Serve,
    /// Exit 0 if the sandbox on SANDBOX_LISTEN_ADDR answers, 1 if not.
    Healthcheck,
}

/// What every route shares.
pub struct Shared {
    /// The settings.
    pub settings: Settings,
    /// Harbor's contents.
    pub registry: Mutex<Registry>,
    /// Harbor's webhook policies.
    pub policies: Mutex<policies::Policies>,
    /// Port's contents.
    pub port: Mutex<PortStore>,
    /// Port's rate limits, and its requests counted.
    pub limits: Mutex<limits::Limits>,
    /// For sending webhooks.
    pub http: reqwest::Client,
    /// The last webhooks sent, with the ingest's answers, newest first.
    pub webhooks: Mutex<std::collections::VecDeque<serde_json::Value>>,
}

/// A bound sandbox.
pub struct Sandbox {
    port: u16,
    server: Server,
}

impl Sandbox {
    /// Binds and builds the server.
    pub fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.listen_addr).with_context(|| {
            format!(
                "Failed to bind SANDBOX_LISTEN_ADDR {}",
                settings.listen_addr
            )
        })?;
        let port = listener.local_addr()?.port();
        let mut store = PortStore::default();
        if !settings.empty_port {
            for (id, blueprint) in harbor_worker::blueprints::definitions()? {
                store.blueprints.insert(id, blueprint);
            }
        }
        let shared = web::Data::new(Shared {
            settings: settings.clone(),
            registry: Mutex::new(Registry::default()),
            policies: Mutex::new(policies::Policies::default()),
            limits: Mutex::new(limits::Limits::new(settings.port_rate_scale)),
            port: Mutex::new(store),
            http: reqwest::Client::new(),
            webhooks: Mutex::default(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::JsonConfig::default().limit(1_048_576))
                .route(
                    "/healthz",
                    web::get().to(|| async {
                        HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
                    }),
                )
                .configure(harbor::routes)
                .configure(port::routes)
                .wrap_fn(limits::enforce)
                .configure(control::routes)
        })
        .listen(listener)?
        .workers(1)
        .run();
        Ok(Self { port, server })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop it.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped (SIGTERM/SIGINT).
    pub async fn run(self) -> anyhow::Result<()> {
        self.server.await.context("sandbox server failed")
    }
}

/// Locks a mutex; a poisoned one (a panic in a handler) is still usable for a sandbox.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
