//! `harbor-soak`: drives webhooks through ingest → RabbitMQ → worker → a faked Port while
//! breaking things at random (broker connections closed, Port answering 503 for a while, the
//! worker killed with SIGKILL and restarted; with `--cluster`, on a three-node cluster of its
//! own, a random node stopped and started again instead of the connections closed), then
//! counts. Prints figures; exits 1 if an accepted event was lost.
//!
//!   cargo build --bins && target/debug/harbor-soak --events 3000 --rate 200
//!   target/debug/harbor-soak --cluster        # runs deploy/local/cluster.sh on ports 5901-5903
//!
//! Needs RabbitMQ at AMQP_URL with the management plugin, like the tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test program: fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use harbor_sync_tests::apps::{SECRET, TestIngest, ingest_settings};
use harbor_sync_tests::cluster::Cluster;
use harbor_sync_tests::fakes::{FakeHarbor, FakePort, accept_upserts, entity_writes};
use harbor_sync_tests::percentile;
use harbor_sync_tests::processes::{Processes, free_port, worker_env};
use harbor_sync_tests::rabbit::{TestTopology, close_connections};
use harbor_sync_tests::samples;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

const REPOSITORY: &str = "harbor/alpine";

/// Soak test of the whole pipeline under random faults.
#[derive(Parser, Debug)]
struct Options {
    /// Webhooks to send.
    #[arg(long, default_value_t = 2000)]
    events: u64,
    /// Webhooks per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send without breaking anything (a baseline).
    #[arg(long)]
    no_faults: bool,
    /// On a three-node cluster (started and removed by the program, ports 5901-5903), whose
    /// nodes are stopped and started at random among the faults.
    #[arg(long)]
    cluster: bool,
}

/// The fake Port's artifact upserts: when each identifier was first written, how many writes.
#[derive(Default)]
struct Writes {
    first: BTreeMap<String, Instant>,
    total: usize,
}

struct PortFace {
    writes: Arc<Mutex<Writes>>,
    down: Arc<AtomicBool>,
}

impl Respond for PortFace {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if self.down.load(Ordering::SeqCst) {
            return ResponseTemplate::new(503)
                .set_body_json(json!({"ok": false, "error": "unavailable"}));
        }
        // One artifact alone, or several in bulk.
        let upserts = entity_writes(request);
        let mut writes = self.writes.lock().unwrap();
        for upsert in &upserts {
            writes.total += 1;
            writes
                .first
                .entry(upsert.identifier.clone())
                .or_insert_with(Instant::now);
        }
        accept_upserts(request)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = Options::parse();
    let cluster = options.cluster.then(|| Cluster::start(5900));
    let broker = match &cluster {
        Some(cluster) => TestTopology::on(&cluster.url()).await,
        None => TestTopology::new().await,
    };
    let harbor = FakeHarbor::start().await;
    harbor
        .holds_any_artifact(REPOSITORY, Duration::from_millis(2))
        .await;
    let port = FakePort::start().await;
    let writes = Arc::new(Mutex::new(Writes::default()));
    let port_down = Arc::new(AtomicBool::new(false));
    Mock::given(method("POST"))
        .and(path_regex(
            r"^/v1/blueprints/harborArtifact/entities(/bulk)?$",
        ))
        .respond_with(PortFace {
            writes: writes.clone(),
            down: port_down.clone(),
        })
        .with_priority(1)
        .mount(&port.server)
        .await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;

    let mut processes = Processes::new(&format!("soak-{}", broker.topology().queue()));
    let worker_env = || {
        let mut env = worker_env(&broker, &harbor, &port, free_port());
        env.push(("RUST_LOG", "warn".to_owned()));
        if let Some(cluster) = &cluster {
            env.push(("AMQP_URL", cluster.url()));
        }
        env
    };
    processes.spawn("worker", "harbor-worker", &worker_env());

    // Harbor's way: a webhook that fails is sent again (3 tries, 1 s apart).
    let accepted: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let sending = Arc::new(AtomicBool::new(true));
    let client = reqwest::Client::new();
    let url = format!("{}/webhook", ingest.base);
    let generator = {
        let (accepted, refused, sending) = (accepted.clone(), refused.clone(), sending.clone());
        let interval = Duration::from_secs_f64(1.0 / options.rate.max(1) as f64);
        let events = options.events;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let mut senders = tokio::task::JoinSet::new();
            for i in 0..events {
                tick.tick().await;
                let (client, url, accepted, refused) = (
                    client.clone(),
                    url.clone(),
                    accepted.clone(),
                    refused.clone(),
                );
                senders.spawn(async move {
                    let digest = samples::digest(i);
                    let body = samples::push(REPOSITORY, &digest);
                    for attempt in 0..4 {
                        if attempt > 0 {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        let sent = client
                            .post(&url)
                            .header("authorization", SECRET)
                            .body(body.clone())
                            .send()
                            .await;
                        if sent.is_ok_and(|r| r.status() == 202) {
                            accepted.lock().unwrap().insert(digest, Instant::now());
                            return;
                        }
                    }
                    refused.fetch_add(1, Ordering::SeqCst);
                });
            }
            while senders.join_next().await.is_some() {}
            sending.store(false, Ordering::SeqCst);
        })
    };

    // Faults, at random, while the generator runs.
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut injected: BTreeMap<&str, usize> = BTreeMap::new();
    let queue = broker.topology().queue().to_owned();
    while sending.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
        if options.no_faults || !sending.load(Ordering::SeqCst) {
            continue;
        }
        match rng.random_range(0..3) {
            0 => match &cluster {
                Some(cluster) => {
                    let node = rng.random_range(1..=3);
                    let stopped = tokio::task::block_in_place(|| cluster.stop_node(node));
                    tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
                    let started = tokio::task::block_in_place(|| cluster.start_node(node));
                    assert!(stopped && started, "could not stop and start node {node}");
                    *injected
                        .entry("broker node stopped and started")
                        .or_default() += 1;
                }
                None => {
                    close_connections(&format!("({queue})"), 2).await;
                    *injected.entry("broker connections closed").or_default() += 1;
                }
            },
            1 => {
                port_down.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
                port_down.store(false, Ordering::SeqCst);
                *injected.entry("Port down (503)").or_default() += 1;
            }
            _ => {
                processes.signal("worker", "KILL");
                tokio::time::sleep(Duration::from_millis(300)).await;
                processes.spawn("worker", "harbor-worker", &worker_env());
                *injected
                    .entry("worker SIGKILLed and restarted")
                    .or_default() += 1;
            }
        }
    }
    generator.await.unwrap();

    // Everything accepted must end written (or parked); wait for it, two minutes at most.
    let accepted = accepted.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut parked = BTreeSet::new();
    let lost = loop {
        while let Some(message) = broker.take_parked().await {
            let event = harbor_shared::event::HarborEvent::parse(&message.delivery.data).unwrap();
            parked.insert(event.data.resources[0].digest.clone().unwrap_or_default());
        }
        let written = writes
            .lock()
            .unwrap()
            .first
            .keys()
            .cloned()
            .collect::<BTreeSet<String>>();
        let lost: Vec<&String> = accepted
            .keys()
            .filter(|d| !written.contains(&format!("{REPOSITORY}@{d}")) && !parked.contains(*d))
            .collect();
        if lost.is_empty() || Instant::now() > deadline {
            break lost.len();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = processes.signal("worker", "TERM");

    let writes = writes.lock().unwrap();
    let mut latencies: Vec<Duration> = accepted
        .iter()
        .filter_map(|(digest, at)| {
            writes
                .first
                .get(&format!("{REPOSITORY}@{digest}"))
                .map(|w| w.saturating_duration_since(*at))
        })
        .collect();
    latencies.sort();
    println!(
        "harbor-soak: {} events at {}/s, seed {}",
        options.events, options.rate, options.seed
    );
    for (fault, count) in &injected {
        println!("  fault      {fault}: {count}");
    }
    println!(
        "  accepted   {} (202 within Harbor's 4 tries; {} never accepted)",
        accepted.len(),
        refused.load(Ordering::SeqCst)
    );
    println!("  written    {}", writes.first.len());
    println!("  parked     {}", parked.len());
    println!(
        "  duplicates {} (Port writes beyond the first per artifact)",
        writes.total - writes.first.len()
    );
    println!("  lost       {lost}");
    println!(
        "  latency    p50 {:?}  p99 {:?}  (202 → first Port write)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
