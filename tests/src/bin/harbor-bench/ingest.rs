//! The `ingest` mode: signed PUSH webhooks from keep-alive connections at saturation and at a
//! steady 40 % of the broker's ceiling, through the ingest in its default configuration and
//! beside reference paths taking turns with it in the same run:
//!
//! - the ceiling: the ingest's messages published straight to the broker through the ingest's
//!   own publisher, without HTTP;
//! - the naive reference ingest (`harbor-bench reference --naive`, a process of its own):
//!   actix-web and lapin, one confirm channel, each request publishing its body persistently and
//!   awaiting its own confirm; no checks, no logs, no metrics; and the same doing the contract's
//!   work first ([`Step`]: signature, envelope and message id, the ingest's properties and
//!   mandatory), to tell what the contract costs from what the ingest adds;
//! - bare actix-web answering 202 at once: what the HTTP hop costs alone;
//! - the ingest with its per-webhook audit line switched on, to show what that line costs.
//!
//! With `--pin` the broker runs on core 0 and everything else on core 1 ([`crate::pin`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use futures_util::StreamExt;
use harbor_ingest::auth::{AuthMode, Authenticator};
use harbor_ingest::settings::{CONFIRM_TIMEOUT, PUBLISHER_CHANNELS};
use harbor_shared::broker::BrokerUrl;
use harbor_shared::event::Envelope;
use harbor_shared::message::SUBJECT_HEADER;
use harbor_shared::publisher::{Outgoing, PublishError, Publisher};
use harbor_sync_tests::apps::SECRET;
use harbor_sync_tests::processes::{Processes, free_port};
use harbor_sync_tests::rabbit::{TestTopology, amqp_url};
use harbor_sync_tests::wait_until;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::cpu::{self, Cores};
use crate::load::{Schedule, Tally};
use crate::{peak_rss_mb, push_payload, raw_http, start_ingest, stop};

/// The `RUST_LOG` that switches the ingest's per-webhook audit line on (README, Operating).
pub const AUDIT_LOG: &str = "info,harbor_ingest::audit=debug";

/// Publishes the ingest's messages (same body, same properties) straight to the broker through
/// the ingest's own publisher (one connection, its confirm-mode channels), without HTTP: each
/// lane publishes its next message as soon as the last is confirmed, or when it is due. Back to
/// back on 64 lanes this is the ceiling, the broker's own rate for persistent, confirmed
/// publishes of one process with 64 in flight.
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
            properties: harbor_shared::message::webhook(
                &envelope,
                None,
                &uuid::Uuid::new_v4().to_string(),
            ),
            body,
        })
    }

    /// Publishes the body as the ingest publishes a PUSH webhook; returns once it is confirmed.
    async fn publish(&self) -> Result<(), PublishError> {
        self.publisher
            .publish(Outgoing {
                exchange: &self.exchange,
                routing_key: "PUSH_ARTIFACT",
                body: &self.body,
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
                        lane.answered(direct.publish().await.is_ok());
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
    /// `lanes` connections to `address`, sending [`requests`] for it in turn.
    async fn open(address: SocketAddr, lanes: usize) -> Self {
        let mut connections = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let connection = raw_http::Connection::open(address).await.unwrap();
            connections.push(tokio::sync::Mutex::new(connection));
        }
        Self {
            requests: requests(address),
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

/// One way for messages to reach a queue at saturation: what went through, and the CPU it took.
struct Path {
    cores: Cores,
    tally: Tally,
    /// Messages its queues held, counted as they are emptied.
    queued: u64,
}

impl Path {
    fn new(cores: Cores) -> Self {
        Self {
            cores,
            tally: Tally::default(),
            queued: 0,
        }
    }

    /// Empties the path's work queues, counting what they held.
    async fn empty(&mut self, broker: &TestTopology) {
        self.queued += u64::from(broker.purge_work_queues().await);
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

/// A reference server (`harbor-bench reference` with `options`) as a process named `name`; its
/// address.
async fn start_reference(processes: &mut Processes, name: &str, options: &[&str]) -> SocketAddr {
    let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = address.to_string();
    let mut args = vec!["reference", "--listen", &listen];
    args.extend(options);
    processes.spawn_with_args(name, "harbor-bench", &args, &[("AMQP_URL", amqp_url())]);
    wait_until(
        "the reference server to listen",
        Duration::from_secs(10),
        || async { tokio::net::TcpStream::connect(address).await.is_ok() },
    )
    .await;
    address
}

/// A naive ingest's broker side: one connection, one confirm-mode channel shared by every
/// request, each publishing persistently and awaiting its own confirm.
struct Naive {
    _connection: lapin::Connection,
    channel: lapin::Channel,
    exchange: String,
    properties: BasicProperties,
    authenticator: Authenticator,
}

impl Naive {
    async fn open(exchange: String) -> Self {
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        // The subject the consistent-hash exchange routes on, as the ingest sets it; fixed,
        // since nothing is read from the body.
        let mut headers = FieldTable::default();
        headers.insert(
            SUBJECT_HEADER.into(),
            AMQPValue::LongString("myproj".into()),
        );
        Self {
            _connection: connection,
            channel,
            exchange,
            properties: BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
            authenticator: Authenticator::new(AuthMode::Auto, vec![SECRET.to_owned().into()])
                .unwrap(),
        }
    }

    /// Publishes `body` and awaits its confirm, after the `contract` steps.
    async fn publish(&self, authorization: Option<&[u8]>, body: &[u8], contract: &[Step]) -> bool {
        if contract.contains(&Step::Signature)
            && self.authenticator.verify(authorization, body).is_err()
        {
            return false;
        }
        let (mut routing_key, mut properties) = ("PUSH_ARTIFACT".to_owned(), None);
        if contract.contains(&Step::Envelope) || contract.contains(&Step::Properties) {
            let Ok(envelope) = Envelope::parse(body) else {
                return false;
            };
            routing_key = envelope.event_type.to_string();
            if contract.contains(&Step::Properties) {
                let request_id = uuid::Uuid::new_v4().to_string();
                properties = Some(harbor_shared::message::webhook(
                    &envelope,
                    None,
                    &request_id,
                ));
            }
        }
        let mandatory = properties.is_some();
        let properties = properties.unwrap_or_else(|| self.properties.clone());
        let options = lapin::options::BasicPublishOptions {
            mandatory,
            ..Default::default()
        };
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.as_str().into(),
                options,
                body,
                properties,
            )
            .await;
        match confirm {
            Ok(confirm) => matches!(confirm.await, Ok(lapin::Confirmation::Ack(None))),
            Err(_) => false,
        }
    }
}

/// A part of the contract's work on each webhook, which the naive reference can be asked to do
/// before it publishes (`--contract`), to tell what the contract costs from what the ingest adds.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum Step {
    /// The signature verified (HMAC-SHA256 of the body).
    Signature,
    /// The envelope read: the event type (the routing key), the SHA-256 message id, the subject.
    Envelope,
    /// The ingest's properties and headers, published mandatory (implies `envelope`).
    Properties,
}

/// `steps` as the command line takes them.
fn step_names(steps: &[Step]) -> String {
    let names: Vec<String> = steps
        .iter()
        .filter_map(|step| Some(step.to_possible_value()?.get_name().to_owned()))
        .collect();
    names.join(",")
}

/// Serves `POST /webhook` with actix-web on one worker, with the ingest's timeouts, answering 202
/// with a JSON body of the ingest's length: at once, or (`naive_to`) once the body is published
/// to that exchange as a naive ingest would publish it, after the `contract` steps.
pub async fn reference(listen: SocketAddr, naive_to: Option<String>, contract: Vec<Step>) -> bool {
    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
    let answer = r#"{"status":"accepted","message_id":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}"#;
    let naive = match naive_to {
        Some(exchange) => Some(Arc::new(Naive::open(exchange).await)),
        None => None,
    };
    let contract: Arc<[Step]> = contract.into();
    HttpServer::new(move || {
        let (naive, contract) = (naive.clone(), contract.clone());
        App::new().route(
            "/webhook",
            web::post().to(move |request: HttpRequest, body: web::Bytes| {
                let (naive, contract) = (naive.clone(), contract.clone());
                async move {
                    let authorization = request
                        .headers()
                        .get(actix_web::http::header::AUTHORIZATION)
                        .map(|value| value.as_bytes());
                    match naive {
                        Some(naive) if !naive.publish(authorization, &body, &contract).await => {
                            HttpResponse::ServiceUnavailable().finish()
                        }
                        _ => HttpResponse::Accepted()
                            .content_type("application/json")
                            .body(answer),
                    }
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

/// Signed requests for `address`, made beforehand: the generator shares the cores with what it
/// measures.
fn requests(address: SocketAddr) -> Arc<Vec<Vec<u8>>> {
    Arc::new(
        (0..4096)
            .map(|n| {
                let body = push_payload(n);
                let signature =
                    hex::encode(harbor_ingest::auth::sign(&SECRET.to_owned().into(), &body));
                raw_http::post(address, &format!("sha256={signature}"), &body)
            })
            .collect(),
    )
}

/// The paths taking turns at saturation.
const PATHS: u64 = 6;

/// The order of `paths` (an even number) in `round`: row `round` of a Williams square, so that
/// over `paths` rounds each path comes right after every other exactly once.
fn balanced_order(paths: u64, round: u64) -> impl Iterator<Item = u64> {
    // 0, 1, n-1, 2, n-2, ...: consecutive differences take every value mod n once.
    (0..paths).map(move |i| {
        let base = if i % 2 == 1 {
            i.div_ceil(2)
        } else {
            paths - i / 2
        };
        (base % paths + round) % paths
    })
}

/// `a ÷ b`, and whether it meets `target`, for the summary.
fn ratio(name: &str, a: f64, b: f64, target: Option<f64>) {
    let value = a / b.max(f64::EPSILON);
    let verdict = match target {
        Some(t) if value >= t => format!("  (target ≥ {t}: met)"),
        Some(t) => format!("  (target ≥ {t}: NOT met)"),
        None => String::new(),
    };
    println!("  {name:<32} {value:.2}{verdict}");
}

/// The mode; `false` when a count did not hold.
pub async fn run(connections: usize, seconds: u64, pin: bool, contract_steps: &[Step]) -> bool {
    // Before anything starts: the processes started afterwards inherit this one's core.
    let _pinned = match pin.then(crate::pin::Pinned::broker_apart).transpose() {
        Ok(pinned) => pinned,
        Err(reason) => {
            eprintln!("harbor-bench: {reason}");
            return false;
        }
    };
    let ceiling_broker = TestTopology::new().await;
    let broker = TestTopology::new().await;
    let naive_broker = TestTopology::new().await;
    // Each path's queue of its own: a quorum queue's cost per message grows with its depth.
    let audit_broker = TestTopology::new().await;
    let contract_broker = TestTopology::new().await;
    let mut processes = Processes::new(&format!("bench-{}", broker.topology().queue()));
    let ingest_base = start_ingest(&mut processes, "ingest", &broker, &[]).await;
    let audit_base = start_ingest(
        &mut processes,
        "ingest-audit",
        &audit_broker,
        &[("RUST_LOG", AUDIT_LOG.to_owned())],
    )
    .await;
    let address =
        |base: &str| -> SocketAddr { base.trim_start_matches("http://").parse().unwrap() };
    let (ingest_address, audit_address) = (address(&ingest_base), address(&audit_base));
    let bare_address = start_reference(&mut processes, "bare", &[]).await;
    let naive_exchange = naive_broker.topology().exchange();
    let naive_address =
        start_reference(&mut processes, "naive", &["--naive", naive_exchange]).await;
    let contract_exchange = contract_broker.topology().exchange();
    let steps = step_names(contract_steps);
    let contract_options = ["--naive", contract_exchange, "--contract", &steps];
    let contract_address = start_reference(&mut processes, "contract", &contract_options).await;
    let pid = |name| processes.pid(name).unwrap();
    let (ingest_pid, audit_pid, bare_pid, naive_pid, contract_pid) = (
        pid("ingest"),
        pid("ingest-audit"),
        pid("bare"),
        pid("naive"),
        pid("contract"),
    );

    // Saturation: every path takes turns of a second, so that the broker's slow spells, which
    // last seconds (after a WAL roll-over, for one), weigh on all alike.
    let turn = Duration::from_secs(1);
    let ceiling_publisher = Direct::open(
        &ceiling_broker.amqp.url,
        ceiling_broker.topology().exchange(),
    )
    .await;
    let ingest_webhooks = Webhooks::open(ingest_address, connections).await;
    let audit_webhooks = Webhooks::open(audit_address, connections).await;
    let naive_webhooks = Webhooks::open(naive_address, connections).await;
    let contract_webhooks = Webhooks::open(contract_address, connections).await;
    let bare_webhooks = Webhooks::open(bare_address, connections).await;
    let mut ceiling = Path::new(Cores::new("publisher", &[]));
    let mut through_ingest = Path::new(Cores::new("generator", &[("ingest", ingest_pid)]));
    let mut audited = Path::new(Cores::new("generator", &[("ingest", audit_pid)]));
    let mut naive = Path::new(Cores::new("generator", &[("naive ingest", naive_pid)]));
    let mut contract = Path::new(Cores::new("generator", &[("naive ingest", contract_pid)]));
    let mut bare = Path::new(Cores::without_broker(
        "generator",
        &[("bare actix-web", bare_pid)],
    ));
    // Each round takes the paths in another order (`balanced_order`), so that over 6 rounds
    // every path follows every other once: a turn is charged with the broker's work left over
    // from the turn before it, and the turn after bare actix-web's finds the broker rested.
    // After each turn its path's queues are emptied (and what they held counted): a quorum
    // queue's cost per message grows with its depth, and in production the workers keep it
    // shallow.
    for round in 0..seconds {
        for path in balanced_order(PATHS, round) {
            match path {
                0 => {
                    let run = ceiling_publisher.run(connections, turn, None);
                    ceiling.measure(run).await;
                    ceiling.empty(&ceiling_broker).await;
                }
                1 => {
                    through_ingest
                        .measure(ingest_webhooks.run(turn, None))
                        .await;
                    through_ingest.empty(&broker).await;
                }
                2 => {
                    naive.measure(naive_webhooks.run(turn, None)).await;
                    naive.empty(&naive_broker).await;
                }
                3 => {
                    audited.measure(audit_webhooks.run(turn, None)).await;
                    audited.empty(&audit_broker).await;
                }
                4 => {
                    contract.measure(contract_webhooks.run(turn, None)).await;
                    contract.empty(&contract_broker).await;
                }
                _ => bare.measure(bare_webhooks.run(turn, None)).await,
            }
        }
    }
    ceiling_publisher.close().await;
    drop((
        audit_webhooks,
        naive_webhooks,
        contract_webhooks,
        bare_webhooks,
    ));
    drop(audit_broker);
    println!(
        "ingest: {connections} connections, {seconds} s in turns of 1 s, signed {} B PUSH payloads{}",
        push_payload(0).len(),
        if pin {
            ", broker pinned to core 0, the rest to core 1"
        } else {
            ", all sharing the cores"
        }
    );
    println!("the ingest, default configuration:");
    through_ingest.report("non-2xx");
    println!(
        "  peak RSS        {:.1} MB (target ≤ 25)",
        peak_rss_mb(ingest_pid)
    );
    println!(
        "naive reference ingest (one confirm channel, each request awaiting its confirm; no checks, logs or metrics):"
    );
    naive.report("non-2xx");
    println!("the naive reference doing the contract's work ({steps}):");
    contract.report("non-2xx");
    println!(
        "broker ceiling: confirmed persistent publishes (1 process, {connections} in flight, quorum queue):"
    );
    ceiling.report("failed");
    println!("the ingest with its audit line ({AUDIT_LOG}):");
    audited.report("non-2xx");
    println!("bare actix-web, answering 202 at once:");
    bare.report("non-2xx");
    let saturated_exact =
        through_ingest.queued == through_ingest.tally.ok && audited.queued == audited.tally.ok;
    println!(
        "queue check: {} and {} queued for {} and {} answered 202 by the two ingests: {}",
        through_ingest.queued,
        audited.queued,
        through_ingest.tally.ok,
        audited.tally.ok,
        check(saturated_exact)
    );
    println!(
        "  (the naive reference's queues held {} for its {} answered 202: not checked, lapin misattributes confirms on a shared channel, docs/confirms.md)",
        naive.queued, naive.tally.ok
    );
    println!("saturated ratios:");
    ratio(
        "ingest ÷ naive reference",
        through_ingest.rate(),
        naive.rate(),
        Some(0.95),
    );
    let ceiling_target = pin.then_some(0.9);
    ratio(
        "ingest ÷ ceiling",
        through_ingest.rate(),
        ceiling.rate(),
        ceiling_target,
    );
    ratio(
        "naive + contract ÷ naive",
        contract.rate(),
        naive.rate(),
        None,
    );
    ratio(
        "ingest ÷ naive + contract",
        through_ingest.rate(),
        contract.rate(),
        None,
    );
    ratio(
        "naive reference ÷ ceiling",
        naive.rate(),
        ceiling.rate(),
        None,
    );
    ratio(
        "naive + contract ÷ ceiling",
        contract.rate(),
        ceiling.rate(),
        None,
    );
    ratio(
        "audited ingest ÷ ingest",
        audited.rate(),
        through_ingest.rate(),
        None,
    );
    println!(
        "  CPU per webhook, all counted processes: ingest {:.0} µs, naive {:.0} µs, naive + contract {:.0} µs, audited ingest {:.0} µs, ceiling {:.0} µs",
        through_ingest.cpu(),
        naive.cpu(),
        contract.cpu(),
        audited.cpu(),
        ceiling.cpu()
    );
    drop(ceiling_broker);

    // A steady 40 % of the ceiling with a consumer draining each queue, as in production: straight
    // to the broker, through the ingest and through the naive reference (as is and doing the
    // contract's work) in turns of a second again, so that a stall of the broker can fall in any.
    // (Every path's queues were emptied after its last turn.)
    let steady = ceiling.rate() * 0.4;
    let drain = Drain::start(&broker).await;
    let naive_drain = Drain::start(&naive_broker).await;
    let contract_drain = Drain::start(&contract_broker).await;
    let publisher = Direct::open(&broker.amqp.url, broker.topology().exchange()).await;
    cpu::broker_quiet().await;
    // Opened after the wait, which can outlast the time a server gives a new connection to
    // send its first request.
    let ingest_webhooks = Webhooks::open(ingest_address, connections).await;
    let naive_webhooks = Webhooks::open(naive_address, connections).await;
    let contract_webhooks = Webhooks::open(contract_address, connections).await;
    let mut paths = [
        ("broker alone    ", Tally::default(), Vec::new()),
        ("through ingest  ", Tally::default(), Vec::new()),
        ("naive reference ", Tally::default(), Vec::new()),
        ("naive + contract", Tally::default(), Vec::new()),
    ];
    for _ in 0..seconds {
        for (path, (_, tally, p99s)) in paths.iter_mut().enumerate() {
            let mut run = match path {
                0 => publisher.run(connections, turn, Some(steady)).await,
                1 => ingest_webhooks.run(turn, Some(steady)).await,
                2 => naive_webhooks.run(turn, Some(steady)).await,
                _ => contract_webhooks.run(turn, Some(steady)).await,
            };
            p99s.push(run.p99());
            tally.add(run);
        }
    }
    publisher.close().await;
    drop((ingest_webhooks, naive_webhooks, contract_webhooks));
    println!(
        "steady load: {steady:.0}/s (40% of the ceiling) on {connections} lanes, {seconds} s in turns, queues drained; latency from when each was due"
    );
    for (name, tally, p99s) in &mut paths {
        println!("  {name}  {}  errors {}", tally.latency(), tally.failed);
        let p99s: Vec<String> = p99s
            .iter()
            .map(|p99| format!("{:.1}", p99.as_secs_f64() * 1e3))
            .collect();
        println!("    p99 of each turn (ms)  {}", p99s.join(" "));
    }
    let p99 = paths[1].1.p99().as_secs_f64() * 1e3;
    let verdict = if p99 <= 10.0 { "met" } else { "NOT met" };
    println!(
        "  through the ingest p99 {p99:.1} ms (target ≤ 10 ms{}: {verdict})",
        if pin { "" } else { " with --pin" }
    );
    let confirmed = paths[0].1.ok + paths[1].1.ok;
    let delivered = drain.wait_for(confirmed).await;
    println!(
        "  queue check     {delivered} delivered to the consumer for {confirmed} confirmed or answered 202 by the ingest: {}",
        check(delivered == confirmed)
    );
    let naive_delivered = naive_drain.wait_for(paths[2].1.ok).await;
    let contract_delivered = contract_drain.wait_for(paths[3].1.ok).await;
    println!(
        "  (the naive reference: {naive_delivered} delivered for {} answered 202, and {contract_delivered} for {} doing the contract's work; not checked)",
        paths[2].1.ok, paths[3].1.ok
    );
    stop(processes).await;
    saturated_exact && delivered == confirmed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_as_many_rounds_as_paths_each_path_follows_every_other_once() {
        let mut follows = std::collections::BTreeMap::new();
        for round in 0..PATHS {
            let order: Vec<u64> = balanced_order(PATHS, round).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..PATHS).collect::<Vec<_>>(),
                "round {round}: {order:?}"
            );
            for pair in order.windows(2) {
                *follows.entry((pair[0], pair[1])).or_insert(0) += 1;
            }
        }
        let pairs = PATHS * (PATHS - 1);
        assert_eq!(follows.len() as u64, pairs, "{follows:?}");
        assert!(follows.values().all(|n| *n == 1), "{follows:?}");
    }
}
