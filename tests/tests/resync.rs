//! `resync`: Port made to match Harbor after the webhooks missed things.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use harbor_shared::broker;
use harbor_shared::broker::AmqpSettings;
use harbor_sync_tests::apps::{
    TestSandbox, TestWorker, outcome_count, sandbox_settings, start_sandbox, start_sandbox_with,
    wait_ready_at,
};
use harbor_sync_tests::processes::{Processes, binary, free_port, sandbox_worker_env, stdout_of};
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::samples;
use harbor_sync_tests::sandbox::PayloadFormat;
use harbor_sync_tests::wait_until;
use harbor_worker::clients::{Http, MAX_ANSWER_BYTES};
use harbor_worker::fleet::Fleet;
use harbor_worker::resync::{Options, Summary, lock_queue, resync};
use harbor_worker::retry::RetryPolicy;
use harbor_worker::startup::fleet;
use serde_json::json;

/// A sandbox whose Harbor holds 105 artifacts in library/nginx (more than one page) and one in
/// team/app/api, whose webhooks went nowhere, and whose Port holds things Harbor does not. The
/// worker reads it with a robot account, as in production: Harbor answers it 403, not 404, for
/// anything in the ghost project.
async fn drifted() -> TestSandbox {
    let mut settings = sandbox_settings("http://127.0.0.1:9/webhook", PayloadFormat::Default);
    settings.harbor_username = "robot$port-sync".into();
    let sandbox = start_sandbox_with(settings).await;
    for i in 0..105 {
        sandbox
            .act("push", "library/nginx", &format!("1.{i}"))
            .await;
    }
    sandbox.act("push", "team/app/api", "v1").await;
    assert!(
        sandbox.ids("harborArtifact").await.is_empty(),
        "no webhook reached Port"
    );
    let ours = |blueprint: &str, identifier: &str, relations| {
        let kind = &blueprint["harbor".len()..].to_lowercase();
        json!({"identifier": identifier, "title": identifier,
               "properties": {"harborInstance": "default", "harborRef": format!("{kind}:{identifier}")},
               "relations": relations})
    };
    let stale = format!("library/old@{}", samples::digest(99));
    sandbox
        .put_entity(
            "harborArtifact",
            ours(
                "harborArtifact",
                &stale,
                json!({"repository": "library/old"}),
            ),
        )
        .await;
    sandbox
        .put_entity(
            "harborRepository",
            ours("harborRepository", "library/old", json!({})),
        )
        .await;
    sandbox
        .put_entity("harborProject", ours("harborProject", "ghost", json!({})))
        .await;
    // Two that Harbor has, written before the webhooks stopped coming.
    sandbox
        .put_entity("harborProject", ours("harborProject", "library", json!({})))
        .await;
    sandbox
        .put_entity(
            "harborRepository",
            ours(
                "harborRepository",
                "library/nginx",
                json!({"project": "library"}),
            ),
        )
        .await;
    // Someone else's entity in our blueprint: not ours to delete.
    sandbox
        .put_entity(
            "harborProject",
            json!({"identifier": "by-hand", "title": "by hand", "properties": {}, "relations": {}}),
        )
        .await;
    sandbox
}

/// Port's identifiers of each blueprint, sorted.
async fn held(sandbox: &TestSandbox) -> (usize, Vec<String>, Vec<String>) {
    let mut repositories = sandbox.ids("harborRepository").await;
    repositories.sort();
    let mut projects = sandbox.ids("harborProject").await;
    projects.sort();
    (
        sandbox.ids("harborArtifact").await.len(),
        repositories,
        projects,
    )
}

/// `harbor-worker resync` as the command runs it, against the sandbox and this topology.
struct Resyncs {
    fleet: Fleet,
    retry: RetryPolicy,
    amqp: AmqpSettings,
    connection: lapin::Connection,
}

impl Resyncs {
    async fn new(sandbox: &TestSandbox, broker: &TestTopology) -> Self {
        let settings = sandbox.worker_settings(&broker.amqp);
        let http = Http::new(Duration::from_secs(5), MAX_ANSWER_BYTES).unwrap();
        Self {
            fleet: fleet(&settings.harbors, &settings.port, http, Duration::ZERO, 8),
            retry: settings.retry,
            connection: broker::connect(&broker.amqp.url, "resync test")
                .await
                .unwrap(),
            amqp: broker.amqp.clone(),
        }
    }

    async fn run(&self, force: bool) -> Summary {
        let options = Options {
            deletion_threshold: 0.9,
            force,
            dry_run: false,
        };
        resync(
            &self.fleet.members()[0].handler,
            self.retry,
            &self.amqp,
            &self.connection,
            options,
        )
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn resync_has_the_workers_write_what_harbor_has_and_delete_what_it_no_longer_has() {
    let sandbox = drifted().await;
    let broker = TestTopology::new().await;
    let settings = sandbox.worker_settings(&broker.amqp);
    let worker = TestWorker::start(settings.clone()).await;
    let resyncs = Resyncs::new(&sandbox, &broker).await;

    let summary = resyncs.run(false).await;

    // Harbor: 2 projects, 2 repositories, 106 artifacts. Ours in Port: library, library/nginx,
    // and the stale artifact, the old repository and the ghost project, which Harbor does not
    // have (by-hand is not ours).
    assert_eq!(
        summary,
        Summary {
            harbor: 110,
            ours: 5,
            to_delete: 3,
            requested: 6,
            refused: false
        }
    );
    wait_until("Port to match Harbor", Duration::from_secs(30), || async {
        held(&sandbox).await
            == (
                106,
                vec!["library/nginx".to_owned(), "team/app/api".to_owned()],
                vec![
                    "by-hand".to_owned(),
                    "library".to_owned(),
                    "team".to_owned(),
                ],
            )
    })
    .await;
    let artifacts = sandbox.ids("harborArtifact").await;
    assert!(
        artifacts
            .iter()
            .all(|id| id.starts_with("library/nginx@") || id.starts_with("team/app/api@"))
    );
    wait_until(
        "the work queues drained",
        Duration::from_secs(10),
        || async { broker.work_ready().await == 0 },
    )
    .await;

    // A second run finds Port equal to Harbor: it asks for nothing.
    let again = resyncs.run(false).await;
    assert_eq!((again.ours, again.to_delete, again.requested), (110, 0, 0));
    worker.stop().await;
}

#[tokio::test]
async fn a_resync_against_an_empty_harbor_is_refused_unless_forced() {
    // A Harbor with nothing (the wrong one, or a robot account that sees nothing) and a Port
    // with this integration's entities.
    let sandbox = start_sandbox("http://127.0.0.1:9/webhook", PayloadFormat::Default).await;
    for n in 0..5 {
        let id = format!("library/app@{}", samples::digest(n));
        sandbox
            .put_entity(
                "harborArtifact",
                json!({"identifier": id, "title": id,
                "properties": {"harborInstance": "default", "harborRef": format!("artifact:{id}")},
                "relations": {}}),
            )
            .await;
    }
    let broker = TestTopology::new().await;
    let settings = sandbox.worker_settings(&broker.amqp);
    let resyncs = Resyncs::new(&sandbox, &broker).await;

    let refused = resyncs.run(false).await;
    assert!(refused.refused);
    assert_eq!(
        (refused.ours, refused.to_delete, refused.requested),
        (5, 5, 0)
    );
    assert_eq!(broker.work_ready().await, 0, "nothing asked for");
    assert_eq!(
        sandbox.ids("harborArtifact").await.len(),
        5,
        "nothing deleted"
    );

    let forced = resyncs.run(true).await;
    assert!(!forced.refused);
    assert_eq!(forced.requested, 1, "library/app, to delete its artifacts");
    let worker = TestWorker::start(settings).await;
    wait_until("the forced deletes", Duration::from_secs(20), || async {
        sandbox.ids("harborArtifact").await.is_empty()
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn two_workers_with_a_resync_interval_resync_once_per_interval_between_them() {
    let sandbox = drifted().await;
    let broker = TestTopology::new().await;
    let mut processes = Processes::new(broker.topology().queue());
    let mut metrics = Vec::new();
    for n in 0..2 {
        let port = free_port();
        let mut env = sandbox_worker_env(&broker, &sandbox, port);
        env.push(("RESYNC_INTERVAL", "5s".to_owned()));
        processes.spawn(&format!("worker-{n}"), "harbor-worker", &env);
        let url = format!("http://127.0.0.1:{port}");
        wait_ready_at(&format!("{url}/readyz")).await;
        metrics.push(url);
        // The first holds the lock before the second starts (two at once may both find it
        // free, and one of them is then refused once).
        broker.wait_for_resync_lock().await;
    }
    let resyncs = |url: String| async move {
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("harbor_worker_resyncs_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    };
    wait_until("two resyncs", Duration::from_secs(30), || async {
        resyncs(metrics[0].clone()).await + resyncs(metrics[1].clone()).await >= 2
    })
    .await;
    let counts = [
        resyncs(metrics[0].clone()).await,
        resyncs(metrics[1].clone()).await,
    ];
    assert!(
        counts.contains(&0),
        "both workers resynced ({counts:?}): twice per interval"
    );
    // The worker without the lock asked for it every interval without a channel error (lapin
    // logs one each time a declare of the held queue is refused).
    for n in 0..2 {
        let log = processes.log(&format!("worker-{n}"));
        assert!(!log.contains("RESOURCE_LOCKED"), "worker-{n}: {log}");
    }
    // And it did its work.
    wait_until(
        "the periodic resync's deletes",
        Duration::from_secs(30),
        || async {
            !sandbox
                .ids("harborProject")
                .await
                .contains(&"ghost".to_owned())
                && sandbox.ids("harborArtifact").await.len() == 106
        },
    )
    .await;
    processes.terminate_all();
}

#[tokio::test]
async fn the_resync_command_on_a_broker_where_nothing_ran_yet_leaves_its_requests_for_the_first_worker()
 {
    // The usual first install: blueprints, a resync to fill Port, then the deployments.
    let sandbox = drifted().await;
    let broker = TestTopology::undeclared().await;
    let output = stdout_of(
        std::process::Command::new(binary("harbor-worker"))
            .arg("resync")
            .envs(sandbox_worker_env(&broker, &sandbox, free_port())),
    );
    assert!(output.contains("refreshes requested: 6"), "{output}");
    assert_eq!(
        broker.work_ready().await,
        6,
        "the requests wait in the work queues"
    );

    let worker = TestWorker::start(sandbox.worker_settings(&broker.amqp)).await;
    wait_until(
        "Port to hold Harbor's artifacts",
        Duration::from_secs(30),
        || async { sandbox.ids("harborArtifact").await.len() == 106 },
    )
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn the_resync_command_is_run_by_the_worker_holding_the_lock_with_the_fleets_port_token() {
    let sandbox = drifted().await;
    let broker = TestTopology::new().await;
    let worker = TestWorker::start(sandbox.worker_settings(&broker.amqp)).await;
    broker.wait_for_resync_lock().await;
    let run = || async {
        // Off the test's runtime thread, which the worker answering it runs on.
        let mut command = std::process::Command::new(binary("harbor-worker"));
        command
            .args(["resync", "--json"])
            .envs(sandbox_worker_env(&broker, &sandbox, free_port()));
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap();
        let (out, err) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert!(output.status.success(), "{out}\n{err}");
        assert!(
            err.contains("run by the worker that holds the resync lock"),
            "{err}"
        );
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let summary = run().await;
    assert_eq!(
        (
            &summary["harbor"],
            &summary["to_delete"],
            &summary["requested"]
        ),
        (&json!(110), &json!(3), &json!(6)),
        "{summary}"
    );
    wait_until("Port to match Harbor", Duration::from_secs(30), || async {
        let (artifacts, _, projects) = held(&sandbox).await;
        artifacts == 106 && !projects.contains(&"ghost".to_owned())
    })
    .await;

    // Again, now that the worker has its token: the command costs Port nothing of its own.
    let others = || async {
        let stats: serde_json::Value = reqwest::get(format!("{}/sandbox/port/stats", sandbox.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["requests"]["other"]["answered"].as_u64().unwrap_or(0)
    };
    let before = others().await;
    let again = run().await;
    assert_eq!(
        (&again["to_delete"], &again["requested"]),
        (&json!(0), &json!(0)),
        "{again}"
    );
    assert_eq!(
        others().await,
        before,
        "the command took a Port token of its own"
    );
    worker.stop().await;
}

#[tokio::test]
async fn the_resync_command_runs_the_resync_itself_when_the_lock_holder_does_not_take_it() {
    // A worker of an earlier version holds the lock without reading its queue.
    let sandbox = drifted().await;
    let broker = TestTopology::new().await;
    let earlier = broker::connect(&broker.amqp.url, "an earlier worker")
        .await
        .unwrap();
    let exclusive = lapin::options::QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    earlier
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            lock_queue(broker.topology()).as_str().into(),
            exclusive,
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();

    let output = std::process::Command::new(binary("harbor-worker"))
        .args(["resync", "--json"])
        .envs(sandbox_worker_env(&broker, &sandbox, free_port()))
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{out}\n{err}");
    assert!(err.contains("did not take the resync"), "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["requested"], 6, "{summary}");
    assert_eq!(
        broker.work_ready().await,
        6,
        "the requests wait in the work queues"
    );
    let _ = earlier.close(200, "done".into()).await;
}

#[tokio::test]
async fn an_entity_whose_reference_this_version_cannot_read_is_kept() {
    // One of this integration's, under the prefix of a repository's artifacts, whose harborRef
    // names no digest this version reads (a later version's, say): not to be taken for an
    // artifact Harbor no longer has.
    let sandbox = start_sandbox("http://127.0.0.1:9/webhook", PayloadFormat::Default).await;
    sandbox.act("push", "library/nginx", "1.27").await;
    let odd = "library/nginx@by-a-later-version";
    sandbox
        .put_entity(
            "harborArtifact",
            json!({"identifier": odd, "title": odd,
                   "properties": {"harborInstance": "default", "harborRef": "artifact:library/nginx@sha512:later"},
                   "relations": {}}),
        )
        .await;
    let broker = TestTopology::new().await;
    let worker = TestWorker::start(sandbox.worker_settings(&broker.amqp)).await;
    // Forced: the odd entity is all this integration has in Port, and Harbor lacks it.
    let summary = Resyncs::new(&sandbox, &broker).await.run(true).await;
    assert!(summary.requested > 0, "{summary:?}");
    wait_until(
        "the resync's refreshes done",
        Duration::from_secs(30),
        || async { outcome_count(&worker.metrics().await, "synced") == summary.requested },
    )
    .await;
    let artifacts = sandbox.ids("harborArtifact").await;
    assert_eq!(artifacts.len(), 2, "{artifacts:?}");
    assert!(artifacts.contains(&odd.to_owned()), "{artifacts:?}");
    worker.stop().await;
}
