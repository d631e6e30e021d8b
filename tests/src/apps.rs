//! The ingest and the worker, started exactly as `main` starts them (`Application::build`,
//! `Worker::build`), on free ports, against a test topology and fakes.

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use harbor_ingest::auth::{AuthMode, Authenticator};
use harbor_ingest::settings::{Endpoint, Settings as IngestSettings};
use harbor_ingest::startup::Application;
use harbor_shared::broker::AmqpSettings;
use harbor_worker::clients::{Http, MAX_ANSWER_BYTES};
use harbor_worker::retry::RetryPolicy;
use harbor_worker::settings::{HarborSettings, PortSettings, Settings as WorkerSettings};
use harbor_worker::startup::Worker;
use secrecy::SecretString;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fakes::{
    FakeHarbor, FakePort, HARBOR_PASSWORD, HARBOR_USER, PORT_CLIENT_ID, PORT_CLIENT_SECRET,
};

/// The webhook secret the test ingest accepts.
pub const SECRET: &str = "test-webhook-secret";

fn free_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The ingest's settings for a test: secret [`SECRET`], mode `auto`, port 0.
pub fn ingest_settings(amqp: &AmqpSettings) -> IngestSettings {
    IngestSettings {
        listen_addr: free_port(),
        endpoints: vec![Endpoint {
            instance: None,
            auth: Authenticator::new(AuthMode::Auto, vec![SecretString::from(SECRET)]).unwrap(),
        }],
        max_body_bytes: 1_048_576,
        request_timeout: Duration::from_secs(10),
        amqp: amqp.clone(),
        confirm_timeout: Duration::from_secs(5),
        publisher_channels: 2,
        http_workers: 1,
        max_connections: 1024,
    }
}

/// A running ingest.
pub struct TestIngest {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    handle: ServerHandle,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestIngest {
    /// Starts an ingest; waits until `/readyz` says it can publish, unless told not to.
    pub async fn start(settings: IngestSettings, wait_ready: bool) -> Self {
        init_logs();
        let application = Application::build(settings).await.unwrap();
        let base = format!("http://127.0.0.1:{}", application.port());
        let handle = application.handle();
        let task = tokio::spawn(application.run_until_stopped());
        if wait_ready {
            wait_ready_at(&format!("{base}/readyz")).await;
        }
        Self { base, handle, task }
    }

    /// `POST /webhook` with a body and an `Authorization` header.
    pub async fn post(&self, body: &[u8], authorization: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(format!("{}/webhook", self.base))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request.send().await.unwrap()
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        metrics_at(&self.base).await
    }

    /// Stops it as SIGTERM would, and waits.
    pub async fn stop(self) {
        self.handle.stop(true).await;
        self.task.await.unwrap().unwrap();
    }
}

/// The worker's settings for a test: Harbor and Port at these addresses with the fakes'
/// credentials, a short retry budget, port 0.
pub fn worker_settings(amqp: &AmqpSettings, harbor_url: &str, port_url: &str) -> WorkerSettings {
    WorkerSettings {
        amqp: amqp.clone(),
        harbors: vec![HarborSettings {
            name: None,
            url: harbor_url.parse().unwrap(),
            username: HARBOR_USER.into(),
            password: SecretString::from(HARBOR_PASSWORD),
            webhooks: None,
        }],
        port: PortSettings {
            url: port_url.parse().unwrap(),
            client_id: PORT_CLIENT_ID.into(),
            client_secret: SecretString::from(PORT_CLIENT_SECRET),
            mapping: std::sync::Arc::new(harbor_worker::mapping::Mapping::default_mapping()),
            budget: std::sync::Arc::new(harbor_worker::clients::port::PortBudget::new(
                harbor_worker::clients::port::DEFAULT_RATE_SHARE,
            )),
        },
        concurrency: 8,
        prefetch: 100,
        max_held_bytes: 64 * 1024 * 1024,
        pull_window: Duration::ZERO,
        retry: RetryPolicy {
            max_elapsed: Duration::from_secs(5),
            initial_interval: Duration::from_millis(50),
            max_interval: Duration::from_millis(500),
        },
        metrics_addr: free_port(),
        http: Http::new(Duration::from_secs(2), MAX_ANSWER_BYTES).unwrap(),
        shutdown_timeout: Duration::from_secs(10),
        resync_interval: None,
        deletion_threshold: 0.9,
        max_hold: Duration::from_secs(29 * 60),
    }
}

/// A running worker; dropping it stops it.
pub struct TestWorker {
    /// `http://127.0.0.1:<port>` of `/healthz`, `/readyz`, `/metrics`.
    pub base: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestWorker {
    /// Starts a worker and waits until it consumes.
    pub async fn start(settings: WorkerSettings) -> Self {
        init_logs();
        let worker = Worker::build(settings).await.unwrap();
        let base = format!("http://127.0.0.1:{}", worker.metrics_port());
        let shutdown = worker.shutdown_token();
        let task = Some(tokio::spawn(worker.run_until_stopped()));
        wait_ready_at(&format!("{base}/readyz")).await;
        Self {
            base,
            shutdown,
            task,
        }
    }

    /// Stops it as SIGTERM would (events in flight finish), and waits.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        metrics_at(&self.base).await
    }
}

/// The text of `<base>/metrics`.
async fn metrics_at(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Logs go to the test's output, shown by the test runner when a test fails.
pub fn init_logs() {
    harbor_shared::telemetry::init_tracing(harbor_shared::config::LogFormat::Pretty);
}

/// Waits (up to 15 s) until a `/readyz` answers 200.
pub async fn wait_ready_at(url: &str) {
    wait_ready_within(url, Duration::from_secs(15)).await;
}

/// Waits until a `/readyz` answers 200, up to `timeout`.
pub async fn wait_ready_within(url: &str, timeout: Duration) {
    let client = reqwest::Client::new();
    crate::wait_until(&format!("{url} to answer 200"), timeout, || async {
        client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

/// The whole path: fakes, a topology, an ingest and a worker. Fields drop in order, so the
/// apps stop before the topology is deleted.
pub struct Stack {
    /// The ingest Harbor's webhooks are posted to.
    pub ingest: TestIngest,
    /// The worker.
    pub worker: TestWorker,
    /// Fake Harbor.
    pub harbor: FakeHarbor,
    /// Fake Port.
    pub port: FakePort,
    /// The broker topology.
    pub broker: crate::rabbit::TestTopology,
}

impl Stack {
    /// Starts everything with the test defaults.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts everything, letting the test adjust the worker's settings.
    pub async fn start_with(adjust: impl FnOnce(&mut WorkerSettings)) -> Self {
        Self::start_on(crate::rabbit::TestTopology::new().await, adjust).await
    }

    /// [`Stack::start_with`] on this topology (another broker's, a cluster's).
    pub async fn start_on(
        broker: crate::rabbit::TestTopology,
        adjust: impl FnOnce(&mut WorkerSettings),
    ) -> Self {
        let harbor = FakeHarbor::start().await;
        let port = FakePort::start().await;
        let mut settings = worker_settings(&broker.amqp, &harbor.url(), &port.url());
        adjust(&mut settings);
        let worker = TestWorker::start(settings).await;
        let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
        Self {
            ingest,
            worker,
            harbor,
            port,
            broker,
        }
    }

    /// Posts a webhook as Harbor does (the secret as the Authorization header); expects 202.
    pub async fn webhook(&self, body: &[u8]) {
        let response = self.ingest.post(body, Some(SECRET)).await;
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
    }

    /// Waits until the worker counted `count` events with this outcome.
    pub async fn wait_for_outcome(&self, outcome: &str, count: usize) {
        let what = format!("{count} events {outcome}");
        crate::wait_until(&what, Duration::from_secs(15), || async {
            outcome_count(&self.worker.metrics().await, outcome) >= count
        })
        .await;
    }
}

/// Sums `harbor_worker_events_total{outcome=...}` over event types.
pub fn outcome_count(metrics: &str, outcome: &str) -> usize {
    let label = format!("outcome=\"{outcome}\"");
    events_total(metrics, |line| line.contains(&label))
}

/// Sums `harbor_worker_events_total` over event types and outcomes: every event settled.
pub fn settled_count(metrics: &str) -> usize {
    events_total(metrics, |_| true)
}

fn events_total(metrics: &str, keep: impl Fn(&str) -> bool) -> usize {
    metrics
        .lines()
        .filter(|line| line.starts_with("harbor_worker_events_total{") && keep(line))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// A running sandbox (fake Harbor and Port), credentials `admin` / `Harbor12345` (unless its
/// settings say otherwise) and `sandbox-client` / `sandbox-secret`, sending its webhooks to
/// `webhook_url` with [`SECRET`].
pub struct TestSandbox {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    /// The Harbor account its Harbor API accepts, and its password.
    harbor_login: (String, String),
    _handle: ServerHandle,
}

/// The settings of a test sandbox: credentials as above, webhooks to `webhook_url`.
pub fn sandbox_settings(
    webhook_url: &str,
    format: crate::sandbox::PayloadFormat,
) -> crate::sandbox::Settings {
    crate::sandbox::Settings {
        command: None,
        listen_addr: free_port(),
        webhook_url: webhook_url.to_owned(),
        webhook_auth: SECRET.to_owned(),
        payload_format: format,
        harbor_username: "admin".into(),
        harbor_password: "Harbor12345".into(),
        port_client_id: "sandbox-client".into(),
        port_client_secret: "sandbox-secret".into(),
        harbor_latency_ms: 0,
        empty_port: false,
        port_rate_scale: None,
    }
}

/// Starts a sandbox in this process, through its production `build`.
pub async fn start_sandbox(
    webhook_url: &str,
    format: crate::sandbox::PayloadFormat,
) -> TestSandbox {
    start_sandbox_with(sandbox_settings(webhook_url, format)).await
}

/// Starts a sandbox with these settings.
pub async fn start_sandbox_with(settings: crate::sandbox::Settings) -> TestSandbox {
    init_logs();
    let harbor_login = (
        settings.harbor_username.clone(),
        settings.harbor_password.clone(),
    );
    let sandbox = crate::sandbox::Sandbox::build(settings).unwrap();
    let base = format!("http://127.0.0.1:{}", sandbox.port());
    let handle = sandbox.handle();
    tokio::spawn(sandbox.run());
    TestSandbox {
        base,
        harbor_login,
        _handle: handle,
    }
}

impl TestSandbox {
    /// The Harbor account its Harbor API accepts, and its password.
    pub fn harbor_login(&self) -> (&str, &str) {
        (&self.harbor_login.0, &self.harbor_login.1)
    }

    /// The worker's settings pointed at this sandbox, with its credentials.
    pub fn worker_settings(&self, amqp: &AmqpSettings) -> WorkerSettings {
        let mut settings = worker_settings(amqp, &self.base, &self.base);
        let (username, password) = self.harbor_login();
        settings.harbors[0].username = username.to_owned();
        settings.harbors[0].password = password.to_owned().into();
        settings.port.client_id = "sandbox-client".into();
        settings.port.client_secret = "sandbox-secret".into();
        settings
    }

    /// `POST /sandbox/{action}`; the status (200 when the webhook was delivered, 502 when not)
    /// and the answer.
    pub async fn act(&self, action: &str, repository: &str, tag: &str) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/sandbox/{action}", self.base))
            .json(&serde_json::json!({"repository": repository, "tag": tag}))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// `POST /sandbox/{action}` with any body; the status and the answer.
    pub async fn post(&self, action: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/sandbox/{action}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// The entity of a blueprint with this identifier, if Port holds it.
    pub async fn entity(&self, blueprint: &str, identifier: &str) -> Option<serde_json::Value> {
        let held = self.entities().await;
        held[blueprint]
            .as_array()?
            .iter()
            .find(|e| e["identifier"] == identifier)
            .cloned()
    }

    /// What the sandbox's Port holds, by blueprint.
    pub async fn entities(&self) -> serde_json::Value {
        reqwest::get(format!("{}/sandbox/port/entities", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The identifiers of one blueprint's entities.
    pub async fn ids(&self, blueprint: &str) -> Vec<String> {
        let held = self.entities().await;
        held[blueprint]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["identifier"].as_str().unwrap().to_owned())
            .collect()
    }

    /// A Port access token from the sandbox, as the worker gets one.
    pub async fn token(&self) -> String {
        let token: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v1/auth/access_token", self.base))
            .json(&serde_json::json!({"clientId": "sandbox-client", "clientSecret": "sandbox-secret"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        token["accessToken"].as_str().unwrap().to_owned()
    }

    /// The webhook policies of a project as its Harbor API lists them (the auth header
    /// included).
    pub async fn policies(&self, project: &str) -> Vec<serde_json::Value> {
        reqwest::Client::new()
            .get(format!(
                "{}/api/v2.0/projects/{project}/webhook/policies",
                self.base
            ))
            .basic_auth(self.harbor_login().0, Some(self.harbor_login().1))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Upserts an entity straight into the sandbox's Port, as another writer would.
    pub async fn put_entity(&self, blueprint: &str, entity: serde_json::Value) {
        let url = format!(
            "{}/v1/blueprints/{blueprint}/entities?upsert=true&merge=true&create_missing_related_entities=true",
            self.base
        );
        let token = self.token().await;
        let response = reqwest::Client::new()
            .post(url)
            .bearer_auth(token)
            .json(&entity)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
}

/// What became of the accepted webhooks of [`assert_none_lost`].
pub struct Settled {
    /// Artifacts of the repository written to Port.
    pub written: usize,
    /// The reasons of the events taken from the parked queue.
    pub parked: Vec<String>,
}

/// Waits until every accepted digest of `repository` was written to Port or parked; none may be
/// lost within `timeout`.
pub async fn assert_none_lost(
    port: &FakePort,
    broker: &crate::rabbit::TestTopology,
    repository: &str,
    accepted: &std::collections::BTreeSet<String>,
    timeout: Duration,
) -> Settled {
    use std::collections::BTreeSet;
    let deadline = std::time::Instant::now() + timeout;
    let mut parked = BTreeSet::new();
    let mut reasons = Vec::new();
    let prefix = format!("{repository}@");
    loop {
        while let Some(message) = broker.take_parked().await {
            let event = harbor_shared::event::HarborEvent::parse(&message.delivery.data).unwrap();
            let headers = message.delivery.properties.headers().clone();
            let reason = match headers.unwrap_or_default().inner().get("x-failure-reason") {
                Some(lapin::types::AMQPValue::LongString(reason)) => reason.to_string(),
                _ => String::new(),
            };
            reasons.push(reason);
            parked.insert(event.data.resources[0].digest.clone().unwrap());
        }
        let written: BTreeSet<String> = port
            .writes()
            .await
            .into_iter()
            .filter(|w| w.blueprint == "harborArtifact" && w.action == "upsert")
            .filter_map(|w| w.identifier.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        let lost = accepted
            .iter()
            .filter(|d| !written.contains(*d) && !parked.contains(*d))
            .count();
        if lost == 0 {
            return Settled {
                written: written.len(),
                parked: reasons,
            };
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{lost} of {} accepted events never reached Port nor the parked queue",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
