//! Port equals Harbor whatever the order: refreshes of one thing never overlap, in one worker
//! or across workers, so a write never carries Harbor state older than an earlier write of the
//! same entity; and what Harbor announces only indirectly (a moved tag, a deleted repository or
//! project, a project's settings) still reaches Port. Races are made to happen (a fake that
//! answers slowly, or refuses, until the test has done its part), then the test waits on
//! conditions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harbor_sync_tests::apps::{
    Stack, TestIngest, TestSandbox, ingest_settings, outcome_count, sandbox_settings,
    start_sandbox_with, wait_ready_at,
};
use harbor_sync_tests::fakes::{harbor_json, harbor_not_found};
use harbor_sync_tests::processes::{Processes, free_port, sandbox_worker_env};
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::sandbox::PayloadFormat;
use harbor_sync_tests::{samples, wait_until};
use serde_json::{Value, json};
use wiremock::{Request, Respond, ResponseTemplate};

const WAIT: Duration = Duration::from_secs(20);

/// The tags of each upsert of `identifier` Port received, in order.
async fn tags_written(stack: &Stack, identifier: &str) -> Vec<Vec<String>> {
    stack
        .port
        .writes()
        .await
        .iter()
        .filter(|w| w.identifier == identifier && w.action == "upsert")
        .map(|w| {
            let entity = w.entity.as_ref().unwrap();
            serde_json::from_value(entity["properties"]["tags"].clone()).unwrap()
        })
        .collect()
}

/// Harbor's artifact with the tags the test holds now.
struct TagsNow {
    repository: String,
    digest: String,
    tags: Arc<Mutex<Vec<&'static str>>>,
}

impl Respond for TagsNow {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let tags = self.tags.lock().unwrap().clone();
        ResponseTemplate::new(200).set_body_json(harbor_json::artifact(
            &self.repository,
            &self.digest,
            &tags,
            None,
        ))
    }
}

#[tokio::test]
async fn a_write_port_refused_waits_for_its_reset_and_no_older_state_follows_a_newer_one() {
    let stack = Stack::start().await;
    let (repository, digest) = ("alpha/web", samples::digest(1));
    let id = format!("{repository}@{digest}");
    stack.harbor.project_and_repository(repository).await;
    let tags = Arc::new(Mutex::new(vec!["v1"]));
    let answer = TagsNow {
        repository: repository.into(),
        digest: digest.clone(),
        tags: Arc::clone(&tags),
    };
    stack
        .harbor
        .artifact_answering(repository, &digest, answer)
        .await;
    // Port answers the first write of the artifact 429, asking for 3 s.
    stack
        .port
        .fail_upsert(&id, 429, Some(Duration::from_secs(3)), 1)
        .await;

    stack
        .webhook(&samples::event("PUSH_ARTIFACT", repository, &digest, "v1"))
        .await;
    wait_until("Port's 429", WAIT, || async {
        !tags_written(&stack, &id).await.is_empty()
    })
    .await;
    // Meanwhile v2 is pushed onto the same digest.
    tags.lock().unwrap().push("v2");
    stack
        .webhook(&samples::event("PUSH_ARTIFACT", repository, &digest, "v2"))
        .await;
    stack.wait_for_outcome("synced", 2).await;

    // The refused write waits for Port's reset and is sent again (Port's budget is waited
    // for, not failed on); whatever it carries, no write goes back once v2 is written, and
    // the last is what Harbor has now.
    let written = tags_written(&stack, &id).await;
    assert_eq!(written[0], ["v1"], "the refused write");
    let newest = written.iter().position(|tags| *tags == ["v1", "v2"]);
    let newest = newest.unwrap_or_else(|| panic!("v2 never written: {written:?}"));
    assert!(
        written[newest..].iter().all(|tags| *tags == ["v1", "v2"]),
        "an older state written after a newer one: {written:?}"
    );
}

/// Harbor's artifact while it exists; the first answer comes late.
struct SlowThenGone {
    repository: String,
    digest: String,
    exists: Arc<AtomicBool>,
    asked: Arc<AtomicUsize>,
}

impl Respond for SlowThenGone {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let first = self.asked.fetch_add(1, Ordering::SeqCst) == 0;
        let answer = if self.exists.load(Ordering::SeqCst) {
            let artifact = harbor_json::artifact(&self.repository, &self.digest, &["1"], None);
            ResponseTemplate::new(200).set_body_json(artifact)
        } else {
            harbor_not_found("artifact")
        };
        if first {
            answer.set_delay(Duration::from_millis(800))
        } else {
            answer
        }
    }
}

#[tokio::test]
async fn a_delete_that_arrives_while_the_push_is_refreshed_leaves_the_artifact_deleted() {
    let stack = Stack::start().await;
    let (repository, digest) = ("alpha/web", samples::digest(2));
    stack.harbor.project_and_repository(repository).await;
    let (exists, asked) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicUsize::new(0)),
    );
    let answer = SlowThenGone {
        repository: repository.into(),
        digest: digest.clone(),
        exists: Arc::clone(&exists),
        asked: Arc::clone(&asked),
    };
    stack
        .harbor
        .artifact_answering(repository, &digest, answer)
        .await;

    stack
        .webhook(&samples::event("PUSH_ARTIFACT", repository, &digest, "1"))
        .await;
    // The push's refresh has read the artifact (its answer is on the way): delete it now.
    wait_until("the push's read", WAIT, || async {
        asked.load(Ordering::SeqCst) == 1
    })
    .await;
    exists.store(false, Ordering::SeqCst);
    stack
        .webhook(&samples::event("DELETE_ARTIFACT", repository, &digest, "1"))
        .await;
    stack.wait_for_outcome("synced", 2).await;

    let id = format!("{repository}@{digest}");
    let writes: Vec<&'static str> = stack
        .port
        .writes()
        .await
        .iter()
        .filter(|w| w.identifier == id)
        .map(|w| w.action)
        .collect();
    assert_eq!(
        writes.last(),
        Some(&"delete"),
        "the older read landed last: {writes:?}"
    );
    assert_eq!(writes.first(), Some(&"upsert"));
}

/// A sandbox (Harbor and Port) with an ingest and worker processes on a fresh topology (each
/// worker a process of its own, so that each has its own metrics).
struct World {
    sandbox: TestSandbox,
    workers: Vec<u16>,
    processes: Processes,
    _ingest: TestIngest,
    broker: TestTopology,
}

impl World {
    async fn start(latency_ms: u64) -> Self {
        let broker = TestTopology::new().await;
        let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
        let webhooks = format!("{}/webhook", ingest.base);
        let mut settings = sandbox_settings(&webhooks, PayloadFormat::Default);
        settings.harbor_latency_ms = latency_ms;
        let sandbox = start_sandbox_with(settings).await;
        let processes = Processes::new(broker.topology().queue());
        let mut world = Self {
            sandbox,
            workers: Vec::new(),
            processes,
            _ingest: ingest,
            broker,
        };
        world.add_worker().await;
        world
    }

    async fn add_worker(&mut self) {
        let metrics_port = free_port();
        let env = sandbox_worker_env(&self.broker, &self.sandbox, metrics_port);
        let name = format!("worker-{}", self.workers.len());
        self.processes.spawn(&name, "harbor-worker", &env);
        wait_ready_at(&format!("http://127.0.0.1:{metrics_port}/readyz")).await;
        self.workers.push(metrics_port);
    }

    async fn metrics(&self, worker: usize) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.workers[worker]))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Pushes `tag` (onto `digest` if given); returns the artifact's digest.
    async fn push(&self, repository: &str, tag: &str, digest: Option<&str>) -> String {
        let (status, answer) = self
            .sandbox
            .post(
                "push",
                json!({"repository": repository, "tag": tag, "digest": digest}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        answer["digest"].as_str().unwrap().to_owned()
    }

    async fn synced(&self) -> usize {
        let mut synced = 0;
        for worker in 0..self.workers.len() {
            synced += outcome_count(&self.metrics(worker).await, "synced");
        }
        synced
    }

    async fn wait_synced(&self, events: usize) {
        wait_until(&format!("{events} events synced"), WAIT, || async {
            self.synced().await >= events
        })
        .await;
    }

    /// What Harbor holds, as Port should show it: artifact identifier → tags, and the
    /// repositories and projects.
    async fn harbor(&self) -> (BTreeMap<String, Vec<String>>, Vec<String>, Vec<String>) {
        let held: Value = reqwest::get(format!("{}/sandbox/harbor", self.sandbox.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut artifacts = BTreeMap::new();
        let mut repositories = Vec::new();
        let mut projects = Vec::new();
        for repository in held["repositories"].as_array().unwrap() {
            let name = repository["name"].as_str().unwrap();
            repositories.push(name.to_owned());
            let project = name.split_once('/').unwrap().0.to_owned();
            if !projects.contains(&project) {
                projects.push(project);
            }
            for artifact in repository["artifacts"].as_array().unwrap() {
                let id = format!("{name}@{}", artifact["digest"].as_str().unwrap());
                artifacts.insert(
                    id,
                    serde_json::from_value(artifact["tags"].clone()).unwrap(),
                );
            }
        }
        repositories.sort();
        projects.sort();
        (artifacts, repositories, projects)
    }

    /// What Port holds, in the same shape.
    async fn port(&self) -> (BTreeMap<String, Vec<String>>, Vec<String>, Vec<String>) {
        let held = self.sandbox.entities().await;
        let artifacts = held["harborArtifact"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let tags =
                    serde_json::from_value(e["properties"]["tags"].clone()).unwrap_or_default();
                (e["identifier"].as_str().unwrap().to_owned(), tags)
            })
            .collect();
        let mut repositories = self.sandbox.ids("harborRepository").await;
        repositories.sort();
        let mut projects = self.sandbox.ids("harborProject").await;
        projects.sort();
        (artifacts, repositories, projects)
    }

    async fn wait_port_equals_harbor(&self) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (harbor, port) = (self.harbor().await, self.port().await);
            if harbor == port {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Port never came to equal Harbor:\nHarbor {harbor:?}\nPort   {port:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_tag_pushed_onto_another_artifact_leaves_the_one_that_had_it() {
    let world = World::start(0).await;
    let old = world.push("library/app", "latest", None).await;
    world.wait_synced(1).await;
    let new = world.push("library/app", "latest", None).await;
    world.wait_synced(2).await;

    let entity = |digest: &str| {
        let sandbox = &world.sandbox;
        let id = format!("library/app@{digest}");
        async move { sandbox.entity("harborArtifact", &id).await.unwrap() }
    };
    assert_eq!(entity(&new).await["properties"]["tags"], json!(["latest"]));
    assert_eq!(
        entity(&old).await["properties"]["tags"],
        json!([]),
        "the old artifact still shows the tag that moved"
    );
    assert_eq!(entity(&old).await["title"], format!("library/app@{old}"));
    world.wait_port_equals_harbor().await;
}

#[tokio::test]
async fn a_deleted_repository_takes_every_artifact_entity_with_it() {
    let world = World::start(0).await;
    for n in 0..30 {
        world.push("library/app", &format!("v{n}"), None).await;
    }
    world.push("library/other", "v1", None).await;
    world.wait_synced(31).await;
    assert_eq!(world.port().await.0.len(), 31);

    // Harbor announces the deletion with one artifact's deletion.
    let (status, answer) = world
        .sandbox
        .post("delete-repository", json!({"name": "library/app"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    world.wait_synced(32).await;

    world.wait_port_equals_harbor().await;
    let (artifacts, repositories, _) = world.port().await;
    assert_eq!(artifacts.len(), 1);
    assert_eq!(repositories, ["library/other"]);
}

#[tokio::test]
async fn a_projects_entity_follows_harbor_and_goes_once_its_repositories_have() {
    let world = World::start(0).await;
    world.push("team/api", "v1", None).await;
    world.wait_synced(1).await;
    let project = || world.sandbox.entity("harborProject", "team");
    assert_eq!(project().await.unwrap()["properties"]["public"], false);
    assert_eq!(project().await.unwrap()["properties"]["repoCount"], 1);

    // Harbor sends nothing when a project's settings change; its next event carries them.
    world
        .sandbox
        .post("project", json!({"name": "team", "public": true}))
        .await;
    world.push("team/web", "v1", None).await;
    world.wait_synced(2).await;
    wait_until("the project updated", WAIT, || async {
        project()
            .await
            .is_some_and(|p| p["properties"]["public"] == true && p["properties"]["repoCount"] == 2)
    })
    .await;

    let (status, answer) = world
        .sandbox
        .post("delete-project", json!({"name": "team"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    world.wait_synced(3).await;
    world.wait_port_equals_harbor().await;
    let (artifacts, repositories, projects) = world.port().await;
    assert!(artifacts.is_empty() && repositories.is_empty() && projects.is_empty());
}

#[tokio::test]
async fn several_workers_and_a_slow_harbor_leave_port_equal_to_harbor() {
    // Harbor answers in 0-40 ms at random; pushes, tag moves and deletions interleave across
    // 12 projects; a second worker joins half way (queues are handed over while events flow)
    // and a third after that.
    let mut world = World::start(40).await;
    let mut events = 0;
    let mut digests: Vec<(String, String)> = Vec::new();
    for round in 0..3 {
        for p in 0..12 {
            let repository = format!("p{p}/app");
            let digest = world.push(&repository, &format!("r{round}"), None).await;
            world.push(&repository, "latest", Some(&digest)).await;
            digests.push((repository, digest));
            events += 2;
        }
        if round < 2 {
            world.add_worker().await;
        }
    }
    // Delete every third artifact, by digest.
    for (repository, digest) in digests.iter().step_by(3) {
        let (status, _) = world.sandbox.act("delete", repository, digest).await;
        assert_eq!(status, 200);
        events += 1;
    }
    world.wait_synced(events).await;
    world.wait_port_equals_harbor().await;
    let (artifacts, _, projects) = world.port().await;
    assert_eq!(projects.len(), 12);
    assert_eq!(artifacts.len(), 36 - 12);
    drop(world);
}

#[tokio::test]
async fn a_worker_that_joins_takes_a_share_of_the_work_queues() {
    let mut world = World::start(0).await;
    // The first worker is the active consumer of every queue that has had an event.
    for p in 0..32 {
        world.push(&format!("p{p}/app"), "v1", None).await;
    }
    world.wait_synced(32).await;
    world.add_worker().await;

    // Within a few rebalancing rounds (5 s each) the newcomer handles events too.
    let newcomer = |metrics: &str| outcome_count(metrics, "synced");
    let mut pushed = 32;
    wait_until(
        "the second worker to take events",
        Duration::from_secs(40),
        || {
            let world = &world;
            pushed += 16;
            let first = pushed - 16;
            async move {
                for p in first..first + 16 {
                    world
                        .push(&format!("p{}/app", p % 32), &format!("v{p}"), None)
                        .await;
                }
                world.wait_synced(first + 16).await;
                newcomer(&world.metrics(1).await) > 0
            }
        },
    )
    .await;
    let active = |metrics: String| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("harbor_worker_work_queues_active "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let first = active(world.metrics(0).await);
    assert!(
        first <= 8.0 + 1.0,
        "the first worker kept {first} of the 16 queues"
    );
    world.wait_port_equals_harbor().await;
}
