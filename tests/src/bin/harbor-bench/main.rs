//! `harbor-bench`: figures, not assertions about time. Each mode runs against the local RabbitMQ
//! in a topology of its own (deleted afterwards), with the binaries from this build as processes.
//! Its counts are checked: when one does not hold (a message lost or doubled, a wrong pull count)
//! it says so and exits with status 1.
//!
//!   cargo build --release --bins
//!   target/release/harbor-bench ingest --connections 64 --seconds 12 [--pin]
//!   target/release/harbor-bench worker --events 5000 --latency-ms 20
//!   target/release/harbor-bench pull-flood
//!   target/release/harbor-bench e2e --rate 500 --seconds 10
//!   target/release/harbor-bench port-budget --scale 20

#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring program: fail loudly

mod budget;
mod cpu;
mod ingest;
mod load;
mod pin;
mod raw_http;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use harbor_shared::message::SUBJECT_HEADER;
use harbor_sync_tests::apps::{SECRET, settled_count};
use harbor_sync_tests::fakes::{FakeHarbor, FakePort, accept_upserts, entity_writes, harbor_json};
use harbor_sync_tests::percentile;
use harbor_sync_tests::processes::{Processes, free_port, worker_env};
use harbor_sync_tests::rabbit::{TestTopology, amqp_url};
use harbor_sync_tests::samples;
use lapin::BasicProperties;
use serde_json::json;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Signed PUSH webhooks from K keep-alive connections for T s, through the ingest as users
    /// run it and a naive reference ingest, against the broker's own ceiling for confirmed
    /// persistent publishes into a quorum queue.
    Ingest {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Turns of a second each path takes at saturation and at the steady rate; a multiple
        /// of 6 balances the order of the turns fully.
        #[arg(long, default_value_t = 12)]
        seconds: u64,
        /// The broker's processes on core 0, everything else on core 1 (taskset; the broker's
        /// affinity is restored at the end).
        #[arg(long)]
        pin: bool,
        /// What the naive reference doing the contract's work does of it, to tell what each
        /// part costs.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "signature,envelope,properties"
        )]
        contract: Vec<ingest::Step>,
    },
    /// What the worker spends of Port's rate limits: a backfill, an unchanged resync and a
    /// push storm against the sandbox's Port, counting its requests by family; then a storm
    /// with Port enforcing its published limits divided by `scale`.
    PortBudget {
        #[arg(long, default_value_t = 20.0)]
        scale: f64,
    },
    /// N preloaded events through the worker, Harbor and Port faked with a latency.
    Worker {
        #[arg(long, default_value_t = 5000)]
        events: u64,
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        /// WORKER_CONCURRENCY (the worker's default: 100).
        #[arg(long, default_value_t = 100)]
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
        /// A `harbor-worker` binary of another build, run in turns with this one (this,
        /// baseline, this, baseline, ...) on fresh topologies and fakes.
        #[arg(long)]
        baseline_worker: Option<std::path::PathBuf>,
        /// Turns each with a baseline.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// The `ingest` mode's reference servers, run by it as processes of their own: actix-web on
    /// one worker as in the ingest, answering each webhook with 202.
    #[command(hide = true)]
    Reference {
        #[arg(long)]
        listen: SocketAddr,
        /// Publishes each body to this exchange (of the broker at `AMQP_URL`) before answering,
        /// as a naive ingest would.
        #[arg(long)]
        naive: Option<String>,
        /// With `--naive`: first does these parts of what the contract asks of every webhook.
        #[arg(long, requires = "naive", value_delimiter = ',')]
        contract: Vec<ingest::Step>,
    },
}

/// `VmHWM` (peak resident set) of a process, in MB.
pub(crate) fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// The ingest as a process named `name`, in its default configuration but for `extra`; its base
/// URL once ready.
async fn start_ingest(
    processes: &mut Processes,
    name: &str,
    broker: &TestTopology,
    extra: &[(&str, String)],
) -> String {
    let port = free_port();
    let mut env = vec![
        ("AMQP_URL", amqp_url()),
        ("AMQP_EXCHANGE", broker.topology().exchange().to_owned()),
        ("AMQP_QUEUE", broker.topology().queue().to_owned()),
        ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
    ];
    env.extend(extra.iter().cloned());
    processes.spawn(name, "harbor-ingest", &env);
    let base = format!("http://127.0.0.1:{port}");
    harbor_sync_tests::apps::wait_ready_at(&format!("{base}/readyz")).await;
    base
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
pub(crate) fn push_payload(n: u64) -> Vec<u8> {
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

/// Stops the processes (SIGTERM, in the order started) off this one-thread runtime, which
/// meanwhile serves the fakes and closes the connections of the clients dropped before: a
/// stopping ingest waits for the connections still open to it, a stopping worker for its calls
/// in flight (up to their shutdown timeouts).
pub(crate) async fn stop(mut processes: Processes) {
    let _ = tokio::task::spawn_blocking(move || processes.terminate_all()).await;
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
    let ingest = start_ingest(&mut processes, "ingest", &broker, &[]).await;
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

async fn e2e(rate: u64, seconds: u64, baseline: Option<std::path::PathBuf>, rounds: usize) -> bool {
    println!("e2e: {rate} webhooks/s for {seconds} s (202 → first Port write of the artifact)");
    let Some(baseline) = baseline else {
        return e2e_round("harbor-worker", rate, seconds).await.is_some();
    };
    let baseline = baseline.display().to_string();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        println!("this build:");
        let Some(p50) = e2e_round("harbor-worker", rate, seconds).await else {
            return false;
        };
        ours.push(p50);
        println!("baseline {baseline}:");
        let Some(p50) = e2e_round(&baseline, rate, seconds).await else {
            return false;
        };
        theirs.push(p50);
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "p50 this ÷ baseline        {:.3} (means of {rounds} turns each: {:.2?} ÷ {:.2?})",
        mean(&ours).as_secs_f64() / mean(&theirs).as_secs_f64(),
        mean(&ours),
        mean(&theirs)
    );
    true
}

/// One e2e run with the worker `binary`; its p50, or `None` when a count did not hold.
async fn e2e_round(binary: &str, rate: u64, seconds: u64) -> Option<Duration> {
    let broker = TestTopology::new().await;
    let harbor = FakeHarbor::start().await;
    harbor
        .holds_any_artifact("myproj/team/api", Duration::ZERO)
        .await;
    let (port, _, first) = slow_port(Duration::ZERO).await;
    let mut processes = Processes::new(&format!("bench-{}", broker.topology().queue()));
    let ingest = start_ingest(&mut processes, "ingest", &broker, &[]).await;
    let _metrics = start_worker_binary(
        &mut processes,
        "worker",
        binary,
        &broker,
        &harbor,
        &port,
        &[],
    )
    .await;
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
    (written == accepted && errors == 0).then(|| percentile(&latencies, 0.5))
}

/// SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).unwrap();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

// One thread: the bench shares the two cores with what it measures, and a multi-threaded
// runtime spends part of a core waking its threads to hand events between them.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let counts_hold = match Cli::parse().mode {
        Mode::Ingest {
            connections,
            seconds,
            pin,
            contract,
        } => {
            // Interrupted, the measurement is dropped: its processes stopped, its topologies
            // deleted and the broker's affinity restored.
            tokio::select! {
                holds = ingest::run(connections, seconds, pin, &contract) => holds,
                () = interrupted() => {
                    eprintln!("harbor-bench: interrupted; no figures");
                    return std::process::ExitCode::from(130);
                }
            }
        }
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
        Mode::PortBudget { scale } => budget::run(scale).await,
        Mode::E2e {
            rate,
            seconds,
            baseline_worker,
            rounds,
        } => e2e(rate, seconds, baseline_worker, rounds.max(1)).await,
        Mode::Reference {
            listen,
            naive,
            contract,
        } => ingest::reference(listen, naive, contract).await,
    };
    if counts_hold {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("harbor-bench: a count did not hold (see MISMATCH, WRONG or errors above)");
        std::process::ExitCode::FAILURE
    }
}
