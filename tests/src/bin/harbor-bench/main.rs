//! `harbor-bench`: figures, not assertions about time. Each mode runs against the local RabbitMQ
//! in a topology of its own (deleted afterwards), with the binaries from this build as processes.
//! Its counts are checked: when one does not hold (a message lost or doubled, a wrong pull count)
//! it says so and exits with status 1.
//!
//!   cargo build --release --bins
//!   target/release/harbor-bench ingest --connections 64 --seconds 10
//!   target/release/harbor-bench worker --events 5000 --latency-ms 20
//!   target/release/harbor-bench pull-flood
//!   target/release/harbor-bench e2e --rate 500 --seconds 10

#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring program: fail loudly

mod cpu;
mod load;
mod raw_http;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use harbor_ingest::routes::webhook;
use harbor_ingest::settings::{CONFIRM_TIMEOUT, PUBLISHER_CHANNELS};
use harbor_shared::broker::BrokerUrl;
use harbor_shared::event::Envelope;
use harbor_shared::publisher::{Outgoing, PublishError, Publisher};
use harbor_shared::topology::SUBJECT_HEADER;
use harbor_sync_tests::apps::{SECRET, settled_count};
use harbor_sync_tests::fakes::{FakeHarbor, FakePort, accept_upserts, entity_writes, harbor_json};
use harbor_sync_tests::percentile;
use harbor_sync_tests::processes::{Processes, free_port, worker_env};
use harbor_sync_tests::rabbit::{TestTopology, amqp_url};
use harbor_sync_tests::{samples, wait_until};
use lapin::BasicProperties;
use serde_json::json;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

use crate::cpu::Cores;
use crate::load::{Schedule, Tally};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Signed PUSH webhooks from K keep-alive connections for T s, against the broker's own
    /// ceiling for confirmed persistent publishes into a quorum queue.
    Ingest {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// N preloaded events through the worker, Harbor and Port faked with a latency.
    Worker {
        #[arg(long, default_value_t = 5000)]
        events: u64,
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: u16,
        /// Worker processes sharing the work queues.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// Projects the events are spread over (one work queue handles a project).
        #[arg(long, default_value_t = 1)]
        projects: u64,
        /// Another harbor-worker binary (an earlier build, such as the last one with the
        /// compiled mapping) to measure in turns with this one, on the same load: prints both
        /// and their ratio.
        #[arg(long)]
        baseline_worker: Option<std::path::PathBuf>,
        /// Turns each with a baseline (this, baseline, this, baseline, ...).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// 10,000 PULL_ARTIFACT events for 10 repositories within 10 s; Harbor counts pulls every 10 s.
    PullFlood,
    /// Webhook → Port write latency at a steady rate.
    E2e {
        #[arg(long, default_value_t = 500)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// The `ingest` mode's bare HTTP servers, run by it as processes of their own: actix-web on
    /// one worker as in the ingest, answering each webhook with 202, nothing checked.
    #[command(hide = true)]
    BareHttp {
        #[arg(long)]
        listen: SocketAddr,
        /// Publishes each body to this exchange (of the broker at `AMQP_URL`) before answering.
        #[arg(long)]
        publish_to: Option<String>,
    },
}

/// `VmHWM` (peak resident set) of a process, in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

async fn start_ingest(processes: &mut Processes, broker: &TestTopology) -> String {
    let port = free_port();
    let env = [
        ("AMQP_URL", amqp_url()),
        ("AMQP_EXCHANGE", broker.topology().exchange().to_owned()),
        ("AMQP_QUEUE", broker.topology().queue().to_owned()),
        ("RUST_LOG", "warn".to_owned()),
        ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
    ];
    processes.spawn("ingest", "harbor-ingest", &env);
    let base = format!("http://127.0.0.1:{port}");
    harbor_sync_tests::apps::wait_ready_at(&format!("{base}/readyz")).await;
    base
}

/// The bare HTTP server (`harbor-bench bare-http`) as a process named `name`, publishing to
/// `exchange` if given; its address.
async fn start_bare_http(
    processes: &mut Processes,
    name: &str,
    exchange: Option<&str>,
) -> SocketAddr {
    let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = address.to_string();
    let mut args = vec!["bare-http", "--listen", &listen];
    args.extend(exchange.iter().flat_map(|e| ["--publish-to", *e]));
    processes.spawn_with_args(name, "harbor-bench", &args, &[("AMQP_URL", amqp_url())]);
    wait_until(
        "the bare HTTP server to listen",
        Duration::from_secs(10),
        || async { tokio::net::TcpStream::connect(address).await.is_ok() },
    )
    .await;
    address
}

async fn start_worker(
    processes: &mut Processes,
    broker: &TestTopology,
    harbor: &FakeHarbor,
    port: &FakePort,
    extra: &[(&'static str, String)],
) -> String {
    start_worker_named(processes, "worker", broker, harbor, port, extra).await
}

async fn start_worker_named(
    processes: &mut Processes,
    name: &str,
    broker: &TestTopology,
    harbor: &FakeHarbor,
    port: &FakePort,
    extra: &[(&'static str, String)],
) -> String {
    start_worker_binary(
        processes,
        name,
        "harbor-worker",
        broker,
        harbor,
        port,
        extra,
    )
    .await
}

async fn start_worker_binary(
    processes: &mut Processes,
    name: &str,
    binary: &str,
    broker: &TestTopology,
    harbor: &FakeHarbor,
    port: &FakePort,
    extra: &[(&'static str, String)],
) -> String {
    let metrics = free_port();
    let mut env = worker_env(broker, harbor, port, metrics);
    env.push(("RUST_LOG", "warn".to_owned()));
    env.extend(extra.iter().cloned());
    processes.spawn(name, binary, &env);
    let base = format!("http://127.0.0.1:{metrics}");
    harbor_sync_tests::apps::wait_ready_at(&format!("{base}/readyz")).await;
    base
}

/// Events the worker has settled, read from its metrics.
async fn handled(metrics_base: &str) -> usize {
    let text = reqwest::get(format!("{metrics_base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    settled_count(&text)
}

/// A ~1.2 KB PUSH payload, shaped like Harbor's, unique per `n`.
fn push_payload(n: u64) -> Vec<u8> {
    push_payload_in(n, "myproj")
}

/// [`push_payload`] into `project/team/api`.
fn push_payload_in(n: u64, project: &str) -> Vec<u8> {
    let digest = samples::digest(n);
    serde_json::to_vec(&json!({
        "type": "PUSH_ARTIFACT", "occur_at": 1_724_140_800 + n, "operator": "robot$myproj+ci-pipeline-runner",
        "event_data": {
            "resources": [{"digest": digest, "tag": format!("1.{n}.0"), "resource_url": format!("harbor.example.com/{project}/team/api:1.{n}.0")}],
            "repository": {"date_created": 1_700_000_000, "name": "team/api", "namespace": project, "repo_full_name": format!("{project}/team/api"), "repo_type": "private"},
            "custom_attributes": {"pipeline": "https://ci.example.com/myproj/team-api/pipelines/123456789", "commit": "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d", "note": "x".repeat(600)}
        }
    }))
    .unwrap()
}

/// Publishes the ingest's messages (same body, same properties) straight to the broker through
/// the ingest's own publisher (one connection, its confirm-mode channels), without HTTP: each
/// lane publishes its next message as soon as the last is confirmed, or when it is due. Back to
/// back on 64 lanes this is the ceiling, the broker's own rate for persistent, confirmed
/// publishes of one process with 64 in flight. The bare publishing server publishes through it
/// too.
struct Direct {
    connection: lapin::Connection,
    publisher: Publisher,
    exchange: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Direct {
    async fn open(url: &BrokerUrl, exchange: &str) -> Arc<Self> {
        let connection = harbor_shared::broker::connect(url, "harbor-bench publisher")
            .await
            .unwrap();
        let publisher = Publisher::open(&connection, PUBLISHER_CHANNELS, CONFIRM_TIMEOUT)
            .await
            .unwrap();
        let body = push_payload(0);
        let envelope = Envelope::parse(&body).unwrap();
        Arc::new(Self {
            connection,
            publisher,
            exchange: exchange.to_owned(),
            properties: webhook::properties(&envelope, None, &uuid::Uuid::new_v4().to_string()),
            body,
        })
    }

    /// Publishes `body` as the ingest publishes a PUSH webhook; returns once it is confirmed.
    async fn publish(&self, body: &[u8]) -> Result<(), PublishError> {
        self.publisher
            .publish(Outgoing {
                exchange: &self.exchange,
                routing_key: "PUSH_ARTIFACT",
                body,
                properties: self.properties.clone(),
            })
            .await
    }

    async fn run(self: &Arc<Self>, lanes: usize, duration: Duration, rate: Option<f64>) -> Tally {
        Schedule::new(lanes, duration, rate)
            .run(|mut lane| {
                let direct = Arc::clone(self);
                async move {
                    while lane.next().await.is_some() {
                        lane.answered(direct.publish(&direct.body).await.is_ok());
                    }
                    lane.tally()
                }
            })
            .await
    }

    async fn close(&self) {
        self.publisher.close().await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Signed webhooks through the ingest, on keep-alive connections kept from turn to turn (a
/// connection opened within a paced turn would delay its first requests).
struct Webhooks {
    requests: Arc<Vec<Vec<u8>>>,
    connections: Arc<Vec<tokio::sync::Mutex<raw_http::Connection>>>,
}

impl Webhooks {
    /// `lanes` connections to `address`, sending `requests` in turn.
    async fn open(address: SocketAddr, requests: &Arc<Vec<Vec<u8>>>, lanes: usize) -> Self {
        let mut connections = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let connection = raw_http::Connection::open(address).await.unwrap();
            connections.push(tokio::sync::Mutex::new(connection));
        }
        Self {
            requests: Arc::clone(requests),
            connections: Arc::new(connections),
        }
    }

    /// One connection per lane for `duration`, at `rate` webhooks/s in all or back to back.
    async fn run(&self, duration: Duration, rate: Option<f64>) -> Tally {
        Schedule::new(self.connections.len(), duration, rate)
            .run(|mut lane| {
                let (requests, connections) = (self.requests.clone(), self.connections.clone());
                async move {
                    let mut connection = connections[lane.index()].lock().await;
                    while let Some(n) = lane.next().await {
                        let status = connection.send(&requests[n % requests.len()]).await;
                        lane.answered(status.is_ok_and(|s| s == 202));
                    }
                    lane.tally()
                }
            })
            .await
    }
}

/// Consumes the work queue as production would (without the work), counting, until dropped.
struct Drain {
    task: tokio::task::JoinHandle<()>,
    delivered: Arc<AtomicU64>,
}

impl Drain {
    async fn start(broker: &TestTopology) -> Self {
        let options = lapin::options::BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let (connection, mut deliveries) = broker
            .consume_work_queues("harbor-bench-drain", options, 0)
            .await;
        let delivered = Arc::new(AtomicU64::new(0));
        let counter = delivered.clone();
        let task = tokio::spawn(async move {
            let _connection = connection;
            while deliveries.next().await.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self { task, delivered }
    }

    /// Waits (at most 10 s) until `expected` messages were delivered; returns how many were.
    async fn wait_for(&self, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.delivered.load(Ordering::Relaxed)
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `POST /webhook` with actix-web alone, on one worker and with the timeouts of the
/// ingest: the body is read and a 202 answered with a JSON body of the ingest's length. With
/// `publish_to`, each body is first published as the ingest publishes it, nothing checked: the
/// least an ingest on actix-web and lapin can do. Without, what the HTTP hop costs on its own.
async fn bare_http(listen: SocketAddr, publish_to: Option<String>) -> bool {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let answer = r#"{"status":"accepted","message_id":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}"#;
    let direct = match publish_to {
        Some(exchange) => {
            Some(Direct::open(&BrokerUrl::parse(&amqp_url()).unwrap(), &exchange).await)
        }
        None => None,
    };
    HttpServer::new(move || {
        let direct = direct.clone();
        App::new().route(
            "/webhook",
            web::post().to(move |body: web::Bytes| {
                let direct = direct.clone();
                async move {
                    if let Some(direct) = direct {
                        // As the ingest does before it publishes.
                        tokio::task::yield_now().await;
                        if let Err(error) = direct.publish(&body).await {
                            static FIRST: std::sync::Once = std::sync::Once::new();
                            FIRST.call_once(|| {
                                eprintln!(
                                    "publishing failed (only the first failure is logged): {error}"
                                )
                            });
                            return HttpResponse::ServiceUnavailable().finish();
                        }
                    }
                    HttpResponse::Accepted()
                        .content_type("application/json")
                        .body(answer)
                }
            }),
        )
    })
    .workers(1)
    .client_request_timeout(Duration::from_secs(10))
    .keep_alive(Duration::from_secs(75))
    .shutdown_timeout(0)
    .bind(listen)
    .unwrap()
    .run()
    .await
    .is_ok()
}

/// Stops the processes (SIGTERM, in the order started) off this one-thread runtime, which
/// meanwhile serves the fakes and closes the connections of the clients dropped before: a
/// stopping ingest waits for the connections still open to it, a stopping worker for its calls
/// in flight (up to their shutdown timeouts).
async fn stop(mut processes: Processes) {
    let _ = tokio::task::spawn_blocking(move || processes.terminate_all()).await;
}

/// One way for messages to reach a queue at saturation: what went through, and the CPU it took.
struct Path {
    cores: Cores,
    tally: Tally,
}

impl Path {
    fn new(cores: Cores) -> Self {
        Self {
            cores,
            tally: Tally::default(),
        }
    }

    async fn measure(&mut self, run: impl Future<Output = Tally>) {
        self.tally.add(self.cores.measure(run).await);
    }

    /// Messages (or requests) through per second.
    fn rate(&self) -> f64 {
        self.tally.ok as f64 / self.cores.seconds()
    }

    /// CPU time of all counted processes together per message, in µs.
    fn cpu(&self) -> f64 {
        self.cores.total_per_message(self.tally.ok)
    }

    /// Rate, latency, failures (under the name `failed`), cores and CPU per message.
    fn report(&mut self, failed: &str) {
        println!("  per second      {:.0}", self.rate());
        println!("  latency         {}", self.tally.latency());
        println!("  {failed:<15} {}", self.tally.failed);
        println!("  cores used      {}", self.cores);
        println!(
            "  CPU per message {}",
            self.cores.per_message(self.tally.ok)
        );
    }
}

/// `exact`, or `MISMATCH` when a count is not what it must be.
fn check(exact: bool) -> &'static str {
    if exact { "exact" } else { "MISMATCH" }
}

async fn ingest(connections: usize, seconds: u64) -> bool {
    let ceiling_broker = TestTopology::new().await;
    let broker = TestTopology::new().await;
    let mut processes = Processes::new(&format!("bench-{}", broker.topology().queue()));
    let base = start_ingest(&mut processes, &broker).await;
    let pid = processes.pid("ingest").unwrap();
    let address: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    // Requests made beforehand: the generator shares the cores with the ingest.
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..4096)
            .map(|n| {
                let body = push_payload(n);
                let signature =
                    hex::encode(harbor_ingest::auth::sign(&SECRET.to_owned().into(), &body));
                raw_http::post(address, &format!("sha256={signature}"), &body)
            })
            .collect(),
    );

    // Saturation: the broker's ceiling and the ingest take turns of a second, so that the
    // broker's slow spells, which last seconds (after a WAL roll-over, for one), weigh on both
    // alike. Neither queue is drained. Two bare actix-web servers take turns too, to show what
    // HTTP costs: one answering at once, one publishing each body first (into the ingest's
    // queue), as an ingest that checked nothing would.
    let turn = Duration::from_secs(1);
    let ceiling_exchange = ceiling_broker.topology().exchange();
    let ceiling_publisher = Direct::open(&ceiling_broker.amqp.url, ceiling_exchange).await;
    let webhooks = Webhooks::open(address, &requests, connections).await;
    let bare_address = start_bare_http(&mut processes, "bare", None).await;
    let bare_webhooks = Webhooks::open(bare_address, &requests, connections).await;
    let exchange = broker.topology().exchange();
    let publishing_address =
        start_bare_http(&mut processes, "bare-publishing", Some(exchange)).await;
    let publishing_webhooks = Webhooks::open(publishing_address, &requests, connections).await;
    let bare_pid = processes.pid("bare").unwrap();
    let publishing_pid = processes.pid("bare-publishing").unwrap();
    let mut ceiling = Path::new(Cores::new("publisher", &[]));
    let mut through_ingest = Path::new(Cores::new("generator", &[("ingest", pid)]));
    let mut bare = Path::new(Cores::without_broker(
        "generator",
        &[("bare actix-web", bare_pid)],
    ));
    let mut publishing = Path::new(Cores::new(
        "generator",
        &[("bare actix-web", publishing_pid)],
    ));
    for _ in 0..seconds {
        ceiling
            .measure(ceiling_publisher.run(connections, turn, None))
            .await;
        through_ingest.measure(webhooks.run(turn, None)).await;
        bare.measure(bare_webhooks.run(turn, None)).await;
        publishing
            .measure(publishing_webhooks.run(turn, None))
            .await;
    }
    drop((bare_webhooks, publishing_webhooks));
    let queued = broker.work_ready().await;
    println!(
        "ingest: {connections} connections, {seconds} s, signed {} B PUSH payloads",
        push_payload(0).len()
    );
    through_ingest.report("non-2xx");
    println!("  ingest peak RSS {:.1} MB", peak_rss_mb(pid));
    let answered = through_ingest.tally.ok + publishing.tally.ok;
    let saturated_exact = u64::from(queued) == answered;
    println!(
        "  queue check     {queued} queued for {answered} answered 202 (by the ingest and the bare publishing server below): {}",
        check(saturated_exact)
    );
    println!(
        "broker ceiling: confirmed persistent publishes (1 process, {connections} in flight, quorum queue), {seconds} s in turns with the ingest"
    );
    ceiling.report("failed");
    println!(
        "ingest/ceiling:  {:.2}",
        through_ingest.rate() / ceiling.rate()
    );
    // Both paths share the same cores, so where both use them up the ratio follows the CPU
    // each spends per message, broker included.
    println!(
        "  by CPU alone   {:.2} (CPU per message, all counted processes: ceiling {:.0} µs, ingest {:.0} µs)",
        ceiling.cpu() / through_ingest.cpu(),
        ceiling.cpu(),
        through_ingest.cpu()
    );
    println!(
        "bare actix-web, answering at once (1 worker, reads the body, answers 202), in turns with the above:"
    );
    bare.report("non-2xx");
    println!(
        "  with the ceiling by CPU {:.2} (the ceiling's {:.0} µs per message and this {:.0} µs)",
        ceiling.cpu() / (ceiling.cpu() + bare.cpu()),
        ceiling.cpu(),
        bare.cpu()
    );
    println!(
        "bare actix-web, publishing each body first (no checks; the ingest's publisher), in turns with the above:"
    );
    publishing.report("non-2xx");
    println!(
        "  ÷ ceiling       {:.2}",
        publishing.rate() / ceiling.rate()
    );
    ceiling_publisher.close().await;
    drop((ceiling_broker, webhooks));

    // A steady 40 % of the ceiling with a consumer draining the queue, as in production: straight
    // to the broker, through the ingest and through the bare publishing server in turns of a
    // second again, so that a stall of the broker can fall in any.
    let steady = ceiling.rate() * 0.4;
    broker.purge_work_queues().await;
    let drain = Drain::start(&broker).await;
    let publisher = Direct::open(&broker.amqp.url, broker.topology().exchange()).await;
    cpu::broker_quiet().await;
    // Opened after the wait, which can outlast the time a server gives a new connection to
    // send its first request.
    let webhooks = Webhooks::open(address, &requests, connections).await;
    let publishing_webhooks = Webhooks::open(publishing_address, &requests, connections).await;
    let mut paths = [
        ("broker alone   ", Tally::default(), Vec::new()),
        ("through ingest ", Tally::default(), Vec::new()),
        ("bare publishing", Tally::default(), Vec::new()),
    ];
    for _ in 0..seconds {
        for (path, (_, tally, p99s)) in paths.iter_mut().enumerate() {
            let mut run = match path {
                0 => publisher.run(connections, turn, Some(steady)).await,
                1 => webhooks.run(turn, Some(steady)).await,
                _ => publishing_webhooks.run(turn, Some(steady)).await,
            };
            p99s.push(run.p99());
            tally.add(run);
        }
    }
    publisher.close().await;
    drop((webhooks, publishing_webhooks));
    println!(
        "steady load: {steady:.0}/s (40% of the ceiling) on {connections} lanes, {seconds} s in turns, queue drained; latency from when each was due"
    );
    for (name, tally, p99s) in &mut paths {
        println!("  {name}  {}  errors {}", tally.latency(), tally.failed);
        let p99s: Vec<String> = p99s
            .iter()
            .map(|p99| format!("{:.1}", p99.as_secs_f64() * 1e3))
            .collect();
        println!("    p99 of each turn (ms)  {}", p99s.join(" "));
    }
    let confirmed: u64 = paths.iter().map(|(_, tally, _)| tally.ok).sum();
    let delivered = drain.wait_for(confirmed).await;
    println!(
        "  queue check     {delivered} delivered to the consumer for {confirmed} confirmed or answered 202: {}",
        check(delivered == confirmed)
    );
    stop(processes).await;
    saturated_exact && delivered == confirmed
}

/// Port's entity upserts, answered after a delay; counted.
struct SlowPort {
    delay: Duration,
    writes: Arc<AtomicUsize>,
    first: Arc<Mutex<BTreeMap<String, (Instant, serde_json::Value)>>>,
}

impl Respond for SlowPort {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut first = self.first.lock().unwrap();
        // One entity alone, or several in bulk.
        for upsert in entity_writes(request) {
            let entity = upsert.entity.unwrap_or_default();
            first
                .entry(upsert.identifier)
                .and_modify(|e| e.1 = entity.clone())
                .or_insert((now, entity));
        }
        accept_upserts(request).set_delay(self.delay)
    }
}

async fn slow_port(
    delay: Duration,
) -> (
    FakePort,
    Arc<AtomicUsize>,
    Arc<Mutex<BTreeMap<String, (Instant, serde_json::Value)>>>,
) {
    let port = FakePort::start().await;
    let writes = Arc::new(AtomicUsize::new(0));
    let first = Arc::new(Mutex::new(BTreeMap::new()));
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/blueprints/[^/]+/entities(/bulk)?$"))
        .respond_with(SlowPort {
            delay,
            writes: writes.clone(),
            first: first.clone(),
        })
        .with_priority(1)
        .mount(&port.server)
        .await;
    (port, writes, first)
}

/// The worker mode: this build's worker, and, with a baseline binary, that one in turns
/// (this, baseline, this, baseline), each on a fresh topology and fakes.
async fn worker(
    events: u64,
    latency_ms: u64,
    concurrency: u16,
    replicas: usize,
    projects: u64,
    baseline: Option<std::path::PathBuf>,
    rounds: usize,
) -> bool {
    let load = (events, latency_ms, concurrency, replicas, projects);
    let Some(baseline) = baseline else {
        return worker_round("harbor-worker", load).await.is_some();
    };
    let baseline = baseline.display().to_string();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let Some(rate) = worker_round("harbor-worker", load).await else {
            return false;
        };
        ours.push(rate);
        let Some(rate) = worker_round(&baseline, load).await else {
            return false;
        };
        theirs.push(rate);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let median = |v: &[f64]| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    println!(
        "this worker, events/s      {ours:.0?} (mean {:.0}, median {:.0})",
        mean(&ours),
        median(&ours)
    );
    println!(
        "baseline {baseline}, events/s {theirs:.0?} (mean {:.0}, median {:.0})",
        mean(&theirs),
        median(&theirs)
    );
    // Turn by turn: each pair ran back to back, so a slow stretch of the machine hits both.
    let pairs: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a / b).collect();
    println!(
        "this ÷ baseline            {:.3} (means); per pair {pairs:.2?}, median {:.3}",
        mean(&ours) / mean(&theirs),
        median(&pairs)
    );
    true
}

/// One run of `binary` (a name in the build's directory, or a path) on the load; its rate if
/// every event settled.
async fn worker_round(binary: &str, load: (u64, u64, u16, usize, u64)) -> Option<f64> {
    let (events, latency_ms, concurrency, replicas, projects) = load;
    let latency = Duration::from_millis(latency_ms);
    let broker = TestTopology::new().await;
    let harbor = FakeHarbor::start().await;
    for p in 0..projects {
        harbor
            .holds_any_artifact(&format!("{}/team/api", project(p, projects)), latency)
            .await;
    }
    let (port, _, _) = slow_port(latency).await;
    for n in 0..events {
        // As the ingest publishes them: routed by their project.
        let project = project(n % projects, projects);
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            SUBJECT_HEADER.into(),
            lapin::types::AMQPValue::LongString(project.as_str().into()),
        );
        broker
            .publish(
                "PUSH_ARTIFACT",
                &push_payload_in(n, &project),
                BasicProperties::default().with_headers(headers),
            )
            .await;
    }
    let mut processes = Processes::new(&format!("bench-{}", broker.topology().queue()));
    let mut metrics = Vec::new();
    for replica in 0..replicas {
        let env = [("WORKER_CONCURRENCY", concurrency.to_string())];
        let name = format!("worker-{replica}");
        metrics.push(
            start_worker_binary(&mut processes, &name, binary, &broker, &harbor, &port, &env).await,
        );
    }
    // Timed from readiness: process start is not throughput. Given up on after 30 s without
    // progress.
    let started = Instant::now();
    let (mut settled, mut progressed) = (0, Instant::now());
    while settled < events as usize && progressed.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut now = 0;
        for base in &metrics {
            now += handled(base).await;
        }
        if now > settled {
            (settled, progressed) = (now, Instant::now());
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = settled as f64 / elapsed;
    let rss = (0..replicas)
        .filter_map(|r| processes.pid(&format!("worker-{r}")))
        .map(peak_rss_mb)
        .fold(0.0, f64::max);
    let harbor_calls = harbor.requests().await.len();
    let port_calls = port.request_count().await;
    // Per event at most: the Harbor reads (at once), then the artifact upsert. Refreshes of one
    // repository fold the pushes that came meanwhile, and write their artifacts in bulk, so a
    // worker can pass this.
    let per_event = 2.0 * latency.as_secs_f64();
    println!(
        "worker ({binary}): {events} preloaded PUSH events in {projects} project(s), fakes at {latency_ms} ms, WORKER_CONCURRENCY {concurrency}, {replicas} worker(s)"
    );
    println!("  events settled  {settled} of {events}");
    println!("  events/s        {rate:.0}");
    println!("  Harbor calls    {harbor_calls}");
    println!("  Port calls      {port_calls}");
    println!("  worker peak RSS {rss:.1} MB (the largest)");
    if per_event > 0.0 {
        let bound = f64::from(concurrency) / per_event;
        println!(
            "  bound           {bound:.0}/s per worker (concurrency ÷ {:.0} ms per event, one event at a time)",
            per_event * 1000.0
        );
        println!("  events/bound    {:.2}", rate / bound);
    }
    stop(processes).await;
    (settled == events as usize).then_some(rate)
}

/// The name of project `p` of `projects`: `myproj` when there is one.
fn project(p: u64, projects: u64) -> String {
    if projects <= 1 {
        "myproj".to_owned()
    } else {
        format!("myproj{p}")
    }
}

/// Harbor's repository endpoint for the pull flood: `pull_count` is what Harbor counted at its
/// last 10 s flush.
struct FlushedPulls {
    repository: String,
    pulls: Arc<Mutex<Vec<Instant>>>,
    epoch: Instant,
}

impl Respond for FlushedPulls {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let since = self.epoch.elapsed();
        let last_flush = self.epoch + Duration::from_secs(since.as_secs() / 10 * 10);
        let counted = self
            .pulls
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t <= last_flush)
            .count();
        ResponseTemplate::new(200).set_body_json(harbor_json::repository(
            &self.repository,
            1,
            counted as i64,
        ))
    }
}

async fn pull_flood() -> bool {
    const REPOSITORIES: u64 = 10;
    const PULLS: u64 = 10_000;
    const SPREAD: Duration = Duration::from_secs(10);
    let broker = TestTopology::new().await;
    let harbor = FakeHarbor::start().await;
    let epoch = Instant::now();
    let mut pulls = Vec::new();
    for r in 0..REPOSITORIES {
        let name = format!("library/app{r}");
        harbor.holds_any_artifact(&name, Duration::ZERO).await;
        let counted = Arc::new(Mutex::new(Vec::new()));
        Mock::given(method("GET"))
            .and(path_regex(format!(
                "^/api/v2.0/projects/library/repositories/app{r}$"
            )))
            .respond_with(FlushedPulls {
                repository: name.clone(),
                pulls: counted.clone(),
                epoch,
            })
            .with_priority(1)
            .mount(&harbor.server)
            .await;
        pulls.push((name, counted));
    }
    let (port, writes, last) = slow_port(Duration::ZERO).await;
    let mut processes = Processes::new(&format!("bench-{}", broker.topology().queue()));
    let ingest = start_ingest(&mut processes, &broker).await;
    let metrics = start_worker(&mut processes, &broker, &harbor, &port, &[]).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    // Spread over the 10 s, as `docker pull`s of a busy registry are: pulls keep arriving within
    // the coalescing window, which must not put the refresh off for ever.
    let sends = futures_util::stream::iter(0..PULLS).map(|n| {
        let (client, url, pulls) = (client.clone(), format!("{ingest}/webhook"), &pulls);
        async move {
            tokio::time::sleep_until(start + SPREAD * n as u32 / PULLS as u32).await;
            let (name, counted) = &pulls[(n % REPOSITORIES) as usize];
            let digest = samples::digest(n % REPOSITORIES);
            let mut body: serde_json::Value =
                serde_json::from_slice(&samples::push(name, &digest)).unwrap();
            body["type"] = json!("PULL_ARTIFACT");
            body["occur_at"] = json!(n);
            counted.lock().unwrap().push(Instant::now());
            let status = client
                .post(url)
                .header("authorization", SECRET)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 202);
        }
    });
    sends.buffer_unordered(32).collect::<Vec<()>>().await;
    let sent_in = started.elapsed();
    // Wait until the worker has settled every pull and Port shows every repository's true
    // count (at most 120 s).
    let deadline = Instant::now() + Duration::from_secs(120);
    let (true_counts, settled) = loop {
        let last = last.lock().unwrap().clone();
        let ok = pulls.iter().all(|(name, counted)| {
            last.get(name)
                .is_some_and(|(_, e)| e["properties"]["pullCount"] == counted.lock().unwrap().len())
        });
        let settled = handled(&metrics).await;
        if (ok && settled >= PULLS as usize) || Instant::now() > deadline {
            break (ok, settled);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let repository_reads = harbor
        .requests()
        .await
        .iter()
        .filter(|p| !p.contains("/artifacts/") && p.contains("/repositories/"))
        .count();
    println!(
        "pull-flood: {PULLS} PULL_ARTIFACT events for {REPOSITORIES} repositories, sent in {sent_in:.1?}"
    );
    println!("  events settled  {settled} of {PULLS}");
    println!("  Port writes     {}", writes.load(Ordering::Relaxed));
    println!(
        "  Harbor calls    {} ({repository_reads} repository reads)",
        harbor.requests().await.len()
    );
    println!(
        "  final pull counts in Port: {}",
        if true_counts {
            "true (= pulls sent)"
        } else {
            "WRONG"
        }
    );
    println!("  done after      {:.1?}", started.elapsed());
    drop(client);
    stop(processes).await;
    true_counts && settled == PULLS as usize
}

async fn e2e(rate: u64, seconds: u64) -> bool {
    let broker = TestTopology::new().await;
    let harbor = FakeHarbor::start().await;
    harbor
        .holds_any_artifact("myproj/team/api", Duration::ZERO)
        .await;
    let (port, _, first) = slow_port(Duration::ZERO).await;
    let mut processes = Processes::new(&format!("bench-{}", broker.topology().queue()));
    let ingest = start_ingest(&mut processes, &broker).await;
    let _metrics = start_worker(&mut processes, &broker, &harbor, &port, &[]).await;
    let client = reqwest::Client::new();
    let sent = Arc::new(Mutex::new(BTreeMap::new()));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..rate * seconds {
        tick.tick().await;
        let (client, url, sent, errors) = (
            client.clone(),
            format!("{ingest}/webhook"),
            sent.clone(),
            errors.clone(),
        );
        tasks.spawn(async move {
            let body = push_payload(n);
            let at = Instant::now();
            match client
                .post(url)
                .header("authorization", SECRET)
                .body(body)
                .send()
                .await
            {
                Ok(r) if r.status() == 202 => {
                    sent.lock()
                        .unwrap()
                        .insert(format!("myproj/team/api@{}", samples::digest(n)), at);
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.lock().unwrap().len() < sent.lock().unwrap().len() + 2 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut latencies, accepted): (Vec<Duration>, usize) = {
        let (first, sent) = (first.lock().unwrap(), sent.lock().unwrap());
        let latencies = sent
            .iter()
            .filter_map(|(id, at)| {
                first
                    .get(id)
                    .map(|(written, _)| written.saturating_duration_since(*at))
            })
            .collect();
        (latencies, sent.len())
    };
    latencies.sort();
    println!("e2e: {rate} webhooks/s for {seconds} s (202 → first Port write of the artifact)");
    println!(
        "  latency         p50 {:.2?}  p99 {:.2?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    let written = latencies.len();
    let errors = errors.load(Ordering::Relaxed);
    println!("  written         {written} of {accepted}; errors {errors}");
    drop(client);
    stop(processes).await;
    written == accepted && errors == 0
}

// One thread: the bench shares the two cores with what it measures, and a multi-threaded
// runtime spends part of a core waking its threads to hand events between them.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let counts_hold = match Cli::parse().mode {
        Mode::Ingest {
            connections,
            seconds,
        } => ingest(connections, seconds).await,
        Mode::Worker {
            events,
            latency_ms,
            concurrency,
            replicas,
            projects,
            baseline_worker,
            rounds,
        } => {
            worker(
                events,
                latency_ms,
                concurrency,
                replicas,
                projects.max(1),
                baseline_worker,
                rounds.max(1),
            )
            .await
        }
        Mode::PullFlood => pull_flood().await,
        Mode::E2e { rate, seconds } => e2e(rate, seconds).await,
        Mode::BareHttp { listen, publish_to } => bare_http(listen, publish_to).await,
    };
    if counts_hold {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("harbor-bench: a count did not hold (see MISMATCH, WRONG or errors above)");
        std::process::ExitCode::FAILURE
    }
}
