//! `harbor-bench port-budget`: what the worker spends of Port's rate limits, in its default
//! configuration, against the sandbox (Harbor and Port in memory, Port counting its requests by
//! family). First with Port answering everything: a backfill (a resync into an empty Port), a
//! resync of an unchanged Harbor, a storm of pushes; each printed beside its floor (one bulk
//! request per 20 entities written). Then with Port enforcing its published limits scaled in
//! time (`--scale`): a storm of pushes, its 429s and parked events, and how long until Port
//! holds every artifact, beside the floor time at the worker's share of the limits.

use std::time::{Duration, Instant};

use harbor_sync_tests::apps::{TestSandbox, sandbox_settings, start_sandbox_with};
use harbor_sync_tests::processes::{Processes, binary, free_port, sandbox_worker_env};
use harbor_sync_tests::rabbit::{TestTopology, amqp_url};
use harbor_sync_tests::sandbox::PayloadFormat;
use serde_json::{Value, json};

use crate::stop;

/// Port's requests by family (`upsert`, `bulk_upsert`, `search`, `entity`, `other`) and
/// outcome (`answered`, `refused`), as the sandbox counted them.
#[derive(Debug, Clone, Default)]
struct Counts(Value);

impl Counts {
    async fn of(sandbox: &TestSandbox) -> Self {
        let stats: Value = reqwest::get(format!("{}/sandbox/port/stats", sandbox.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Self(stats["requests"].clone())
    }

    fn get(&self, family: &str, outcome: &str) -> u64 {
        self.0[family][outcome].as_u64().unwrap_or(0)
    }

    /// What happened since `before`: per family, answered and refused.
    fn since(&self, before: &Self) -> Vec<(&'static str, u64, u64)> {
        ["upsert", "bulk_upsert", "search", "entity", "other"]
            .into_iter()
            .map(|f| {
                (
                    f,
                    self.get(f, "answered") - before.get(f, "answered"),
                    self.get(f, "refused") - before.get(f, "refused"),
                )
            })
            .collect()
    }
}

/// The rest of a phase's figures.
struct Phase {
    name: String,
    requests: Vec<(&'static str, u64, u64)>,
    seconds: f64,
}

impl Phase {
    fn total(&self) -> u64 {
        self.requests.iter().map(|(_, a, r)| a + r).sum()
    }

    fn refused(&self) -> u64 {
        self.requests.iter().map(|(_, _, r)| r).sum()
    }

    fn writes(&self) -> u64 {
        self.requests
            .iter()
            .filter(|(f, ..)| matches!(*f, "upsert" | "bulk_upsert"))
            .map(|(_, a, r)| a + r)
            .sum()
    }

    fn print(&self, unit: &str, units: u64, floor: u64) {
        let by_family: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, a, r)| a + r > 0)
            .map(|(f, a, r)| match r {
                0 => format!("{f} {a}"),
                r => format!("{f} {a} (+{r} refused)"),
            })
            .collect();
        println!("{}", self.name);
        println!(
            "  Port requests   {} ({})",
            self.total(),
            by_family.join(", ")
        );
        println!(
            "  per {unit:<11} {:.4} (floor {:.4}: {floor} bulk requests of 20)",
            self.total() as f64 / units.max(1) as f64,
            floor as f64 / units.max(1) as f64,
        );
        println!(
            "  429s            {} ({:.2} % of requests); took {:.1} s",
            self.refused(),
            100.0 * self.refused() as f64 / self.total().max(1) as f64,
            self.seconds
        );
    }
}

/// A sandbox, and an ingest and a worker (default configuration) on a topology of their own.
struct Rig {
    broker: TestTopology,
    sandbox: TestSandbox,
    processes: Processes,
    metrics: String,
}

impl Rig {
    /// With Port's limits scaled by `scale` (none: no limits); Harbor gets `projects` ×
    /// `repositories` × `artifacts` before the ingest starts (so without webhooks).
    async fn start(scale: Option<f64>, projects: u64, repositories: u64, artifacts: u64) -> Self {
        let broker = TestTopology::new().await;
        let ingest_port = free_port();
        let mut settings = sandbox_settings(
            &format!("http://127.0.0.1:{ingest_port}/webhook"),
            PayloadFormat::Default,
        );
        settings.port_rate_scale = scale;
        let sandbox = start_sandbox_with(settings).await;
        let pushes = (0..projects).flat_map(|p| {
            (0..repositories).flat_map(move |r| (0..artifacts).map(move |a| (p, r, a)))
        });
        for (p, r, a) in pushes {
            let (status, answer) = sandbox
                .post(
                    "push",
                    json!({"repository": format!("p{p}/r{r}"), "tag": format!("v{a}")}),
                )
                .await;
            assert!(status == 200 || status == 502, "{status} {answer}");
        }
        let mut processes = Processes::new(&format!("bench-{}", broker.topology().queue()));
        processes.spawn(
            "ingest",
            "harbor-ingest",
            &[
                ("AMQP_URL", amqp_url()),
                ("AMQP_EXCHANGE", broker.topology().exchange().to_owned()),
                ("AMQP_QUEUE", broker.topology().queue().to_owned()),
                ("LISTEN_ADDR", format!("127.0.0.1:{ingest_port}")),
                ("WEBHOOK_SECRET", harbor_sync_tests::apps::SECRET.to_owned()),
            ],
        );
        harbor_sync_tests::apps::wait_ready_at(&format!("http://127.0.0.1:{ingest_port}/readyz"))
            .await;
        let mut rig = Self {
            broker,
            sandbox,
            processes,
            metrics: String::new(),
        };
        rig.start_worker().await;
        rig
    }

    /// Starts the worker (its metrics counted from zero).
    async fn start_worker(&mut self) {
        let metrics_port = free_port();
        let mut env = sandbox_worker_env(&self.broker, &self.sandbox, metrics_port);
        env.push(("RUST_LOG", "warn".to_owned()));
        self.processes.spawn("worker", "harbor-worker", &env);
        self.metrics = format!("http://127.0.0.1:{metrics_port}");
        harbor_sync_tests::apps::wait_ready_at(&format!("{}/readyz", self.metrics)).await;
        // Holding the resync lock: the resyncs below are the worker's, as in a deployment.
        self.broker.wait_for_resync_lock().await;
    }

    /// `harbor-worker resync`, run to its end.
    fn resync(&self) {
        let env = sandbox_worker_env(&self.broker, &self.sandbox, free_port());
        let status = std::process::Command::new(binary("harbor-worker"))
            .arg("resync")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "resync failed");
    }

    /// Events the worker settled, and of those parked.
    async fn settled(&self) -> (usize, usize) {
        let text = reqwest::get(format!("{}/metrics", self.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let parked = text
            .lines()
            .filter(|l| {
                l.starts_with("harbor_worker_events_total{") && l.contains("outcome=\"parked\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize;
        (harbor_sync_tests::apps::settled_count(&text), parked)
    }

    /// Waits until the worker has settled `events` in all and then nothing more for a second.
    async fn quiet(&self, events: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut last = (usize::MAX, Instant::now());
        loop {
            let (settled, _) = self.settled().await;
            if settled != last.0 {
                last = (settled, Instant::now());
            } else if settled >= events && last.1.elapsed() > Duration::from_secs(1) {
                return true;
            }
            if Instant::now() > deadline {
                eprintln!("port-budget: {settled} of {events} events settled at the deadline");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The artifacts Port holds.
    async fn artifacts(&self) -> usize {
        let held = self.sandbox.entities().await;
        held["harborArtifact"].as_array().map_or(0, Vec::len)
    }

    /// Pushes `count` new artifacts, `per` per repository, into the first repositories, 32 at
    /// a time, as a busy CI does; the webhooks go through the ingest. How many the ingest
    /// accepted.
    async fn storm(&self, count: u64, per: u64, round: &str) -> u64 {
        use futures_util::StreamExt;
        let pushes = futures_util::stream::iter(0..count).map(|n| {
            let (p, r) = ((n / per) / 40, (n / per) % 40);
            let body = json!({"repository": format!("p{p}/r{r}"), "tag": format!("{round}-{n}")});
            async move { self.sandbox.post("push", body).await.0 == 200 }
        });
        let accepted = pushes
            .buffer_unordered(32)
            .filter(|ok| std::future::ready(*ok));
        accepted.count().await as u64
    }
}

/// The figures; `false` when a count did not hold (something not written, or parked).
pub async fn run(scale: f64) -> bool {
    let (projects, repositories, artifacts) = (10, 40, 5);
    let entities = projects + projects * repositories + projects * repositories * artifacts;
    let mut holds = true;

    let rig = Rig::start(None, projects, repositories, artifacts).await;
    println!(
        "port-budget: the worker in its default configuration (PORT_RATE_SHARE 0.5) against the \
         sandbox's Port, {projects} projects × {repositories} repositories × {artifacts} artifacts \
         ({entities} entities)"
    );

    // A backfill: a resync into an empty Port.
    let before = Counts::of(&rig.sandbox).await;
    let started = Instant::now();
    rig.resync();
    let requested = projects + projects * repositories;
    holds &= rig
        .quiet(requested as usize, Duration::from_secs(600))
        .await;
    let held = rig.artifacts().await as u64;
    let backfill = Phase {
        name: format!("backfill: a resync into an empty Port ({held} artifacts written)"),
        requests: Counts::of(&rig.sandbox).await.since(&before),
        seconds: started.elapsed().as_secs_f64(),
    };
    backfill.print("entity", entities, entities.div_ceil(20));
    holds &= held == projects * repositories * artifacts;

    // A resync of the unchanged Harbor.
    let (settled, _) = rig.settled().await;
    let before = Counts::of(&rig.sandbox).await;
    let started = Instant::now();
    rig.resync();
    holds &= rig.quiet(settled, Duration::from_secs(600)).await;
    let unchanged = Phase {
        name: "resync of an unchanged Harbor".to_owned(),
        requests: Counts::of(&rig.sandbox).await.since(&before),
        seconds: started.elapsed().as_secs_f64(),
    };
    unchanged.print("entity", entities, 0);
    println!("  writes          {}", unchanged.writes());

    // A push storm: 600 new artifacts into 300 repositories.
    let (settled, _) = rig.settled().await;
    let before = Counts::of(&rig.sandbox).await;
    let held_before = rig.artifacts().await;
    let started = Instant::now();
    let accepted = rig.storm(600, 2, "storm").await;
    holds &= rig
        .quiet(settled + accepted as usize, Duration::from_secs(600))
        .await;
    let storm = Phase {
        name: format!("push storm: {accepted} pushes into 300 repositories"),
        requests: Counts::of(&rig.sandbox).await.since(&before),
        seconds: started.elapsed().as_secs_f64(),
    };
    // Each push writes its artifact and its repository (its artifact count changed).
    storm.print("push", accepted, (accepted + 300).div_ceil(20));
    holds &= rig.artifacts().await == held_before + accepted as usize;
    let (_, parked) = rig.settled().await;
    holds &= parked == 0;

    // The same storm met as a backlog: the worker stopped (idle) while 600 more are pushed.
    let mut rig = rig;
    rig.processes.signal("worker", "TERM");
    let before = Counts::of(&rig.sandbox).await;
    let held_before = rig.artifacts().await;
    let accepted = rig.storm(600, 2, "backlog").await;
    let started = Instant::now();
    rig.start_worker().await;
    holds &= rig.quiet(accepted as usize, Duration::from_secs(600)).await;
    let backlog = Phase {
        name: format!("the same met as a backlog: {accepted} pushes queued, then the worker"),
        requests: Counts::of(&rig.sandbox).await.since(&before),
        seconds: started.elapsed().as_secs_f64(),
    };
    backlog.print("push", accepted, (accepted + 300).div_ceil(20));
    holds &= rig.artifacts().await == held_before + accepted as usize;
    let (_, parked) = rig.settled().await;
    holds &= parked == 0;
    stop(rig.processes).await;
    drop(rig.broker);

    // With Port enforcing its limits.
    let rig = Rig::start(Some(scale), 5, 40, 1).await;
    rig.resync();
    holds &= rig.quiet(5 + 200, Duration::from_secs(900)).await;
    let (settled, _) = rig.settled().await;
    let before = Counts::of(&rig.sandbox).await;
    let held_before = rig.artifacts().await;
    let started = Instant::now();
    let accepted = rig.storm(200, 2, "limited").await;
    let all_written = {
        let deadline = Instant::now() + Duration::from_secs(900);
        while rig.artifacts().await < held_before + accepted as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed().as_secs_f64()
    };
    holds &= rig
        .quiet(settled + accepted as usize, Duration::from_secs(900))
        .await;
    let limited = Phase {
        name: format!(
            "push storm with Port enforcing its limits / {scale} in time: {accepted} pushes into \
             100 repositories (stands for {} at Port's real limits)",
            accepted as f64 * scale
        ),
        requests: Counts::of(&rig.sandbox).await.since(&before),
        seconds: started.elapsed().as_secs_f64(),
    };
    let floor = (accepted + 100).div_ceil(20);
    limited.print("push", accepted, floor);
    let (_, parked) = rig.settled().await;
    // At the worker's share of the bulk family's rate, past its burst.
    let share_rate = 0.5 * 35_000.0 / scale / 300.0;
    println!(
        "  Port = Harbor   after {all_written:.1} s; floor {:.1} s ({floor} bulk requests at \
         {share_rate:.2}/s, half the family's rate); parked {parked}",
        floor as f64 / share_rate
    );
    holds &= parked == 0 && rig.artifacts().await == held_before + accepted as usize;
    stop(rig.processes).await;
    holds
}
