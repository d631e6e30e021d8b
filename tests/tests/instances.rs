//! Several Harbors, one deployment (HARBOR_INSTANCES_FILE): two sandbox Harbors, one Port,
//! webhooks from both at their own endpoints with their own secrets, entities kept apart, a
//! resync of each, and our webhook policy synced in both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use harbor_ingest::auth::{AuthMode, Authenticator};
use harbor_ingest::settings::Endpoint;
use harbor_sync_tests::apps::{
    TestIngest, TestSandbox, TestWorker, ingest_settings, sandbox_settings, start_sandbox_with,
};
use harbor_sync_tests::processes::binary;
use harbor_sync_tests::rabbit::{TestTopology, amqp_url};
use harbor_sync_tests::sandbox::PayloadFormat;
use harbor_sync_tests::{samples, wait_until};
use harbor_worker::settings::HarborSettings;
use harbor_worker::webhooks::POLICY_NAME;
use secrecy::SecretString;
use serde_json::{Value, json};

const EU_SECRET: &str = "eu-webhook-secret-0123456789";
const US_SECRET: &str = "us-webhook-secret-0123456789";

/// An instances file in a folder of its own (with the eu password and the us webhook secret
/// in files beside it), removed when dropped.
struct InstancesFile {
    folder: PathBuf,
}

impl InstancesFile {
    fn write(eu: &TestSandbox, us: &TestSandbox) -> Self {
        let folder =
            std::env::temp_dir().join(format!("harbor-instances-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("eu-password"), "Harbor12345\n").unwrap();
        std::fs::write(folder.join("us-webhook-secret"), format!("{US_SECRET}\n")).unwrap();
        let text = format!(
            "instances:\n\
             \x20 - name: eu\n    url: {}\n    username: admin\n    password_file: eu-password\n    webhook_secret: {EU_SECRET}\n\
             \x20 - name: us\n    url: {}\n    username: admin\n    password: Harbor12345\n    webhook_secret_file: us-webhook-secret\n",
            eu.base, us.base
        );
        std::fs::write(folder.join("instances.yaml"), text).unwrap();
        Self { folder }
    }

    fn path(&self) -> String {
        self.folder.join("instances.yaml").display().to_string()
    }
}

impl Drop for InstancesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

/// Runs `harbor-worker <args>` with the instances file, Port at `port`, and this broker; the
/// exit code and stdout (the secrets checked absent from both outputs).
async fn worker_command(
    file: &InstancesFile,
    port: &TestSandbox,
    broker: &TestTopology,
    args: &[&str],
) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(binary("harbor-worker"));
    command
        .args(args)
        .env_clear()
        .env("HARBOR_INSTANCES_FILE", file.path())
        .env("PORT_API_URL", &port.base)
        .env("PORT_CLIENT_ID", "sandbox-client")
        .env("PORT_CLIENT_SECRET", "sandbox-secret")
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", broker.topology().exchange())
        .env("AMQP_QUEUE", broker.topology().queue())
        .env("WEBHOOK_PUBLIC_URL", "https://harbor-sync.example.com");
    // Off the test's runtime thread: the worker a resync asks runs on it.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    for secret in [EU_SECRET, US_SECRET] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret was printed: {stdout} {stderr}"
        );
    }
    (output.status.code(), stdout)
}

/// The JSON lines of a command's output, by their `instance`.
fn by_instance(out: &str) -> Vec<(String, Value)> {
    out.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|v| Some((v.get("instance")?.as_str()?.to_owned(), v)))
        .collect()
}

fn endpoint(name: &str, secret: &str) -> Endpoint {
    Endpoint {
        instance: Some(name.to_owned()),
        auth: Authenticator::new(AuthMode::Auto, vec![SecretString::from(secret)]).unwrap(),
    }
}

/// An entity as this integration writes it, for one instance.
fn ours(instance: &str, identifier: &str, reference: &str) -> Value {
    json!({
        "identifier": identifier,
        "title": identifier,
        "properties": {"harborInstance": instance, "harborRef": reference},
        "relations": {},
    })
}

#[tokio::test]
async fn two_harbors_one_port_kept_apart() {
    let broker = TestTopology::new().await;
    let mut settings = ingest_settings(&broker.amqp);
    settings.endpoints = vec![endpoint("eu", EU_SECRET), endpoint("us", US_SECRET)];
    let ingest = TestIngest::start(settings, true).await;

    let start = |name: &str, secret: &str| {
        let mut settings = sandbox_settings(
            &format!("{}/webhook/{name}", ingest.base),
            PayloadFormat::Default,
        );
        settings.webhook_auth = secret.to_owned();
        start_sandbox_with(settings)
    };
    let eu = start("eu", EU_SECRET).await;
    let us = start("us", US_SECRET).await;
    let file = InstancesFile::write(&eu, &us);

    // One Port (eu's sandbox), both Harbors.
    let mut worker_settings = eu.worker_settings(&broker.amqp);
    let eu_harbor = worker_settings.harbors[0].clone();
    let named = |name: &str, harbor: &TestSandbox| HarborSettings {
        name: Some(name.to_owned()),
        url: harbor.base.parse().unwrap(),
        ..eu_harbor.clone()
    };
    worker_settings.harbors = vec![named("eu", &eu), named("us", &us)];
    let worker = TestWorker::start(worker_settings).await;

    // The same repository pushed in each Harbor: two sets of entities, each with its
    // instance, its identifiers and relations prefixed.
    let (status, pushed_eu) = eu.act("push", "library/nginx", "1.27").await;
    assert_eq!(status, 200, "{pushed_eu}");
    let (status, pushed_us) = us.act("push", "library/nginx", "1.27").await;
    assert_eq!(status, 200, "{pushed_us}");
    let artifact = |instance: &str, pushed: &Value| {
        format!(
            "{instance}:library/nginx@{}",
            pushed["digest"].as_str().unwrap()
        )
    };
    let (eu_artifact, us_artifact) = (artifact("eu", &pushed_eu), artifact("us", &pushed_us));
    wait_until(
        "both Harbors' artifacts in Port",
        Duration::from_secs(20),
        || async {
            let ids = eu.ids("harborArtifact").await;
            ids.contains(&eu_artifact) && ids.contains(&us_artifact)
        },
    )
    .await;
    wait_until(
        "both Harbors' projects in Port",
        Duration::from_secs(20),
        || async {
            let ids = eu.ids("harborProject").await;
            ids.contains(&"eu:library".to_owned()) && ids.contains(&"us:library".to_owned())
        },
    )
    .await;
    for instance in ["eu", "us"] {
        let repository = eu
            .entity("harborRepository", &format!("{instance}:library/nginx"))
            .await
            .unwrap();
        assert_eq!(repository["properties"]["harborInstance"], instance);
        assert_eq!(
            repository["relations"]["project"],
            format!("{instance}:library")
        );
    }
    // Events are counted by the Harbor they came from.
    wait_until(
        "each Harbor's push counted",
        Duration::from_secs(20),
        || async {
            let metrics = worker.metrics().await;
            ["eu", "us"].iter().all(|harbor| {
                metrics.contains(&format!(
                    r#"harbor_worker_events_total{{harbor="{harbor}",event_type="PUSH_ARTIFACT",outcome="synced"}}"#
                ))
            })
        },
    )
    .await;
    let us_entity = eu.entity("harborArtifact", &us_artifact).await.unwrap();
    assert_eq!(us_entity["properties"]["harborInstance"], "us");
    assert_eq!(us_entity["relations"]["repository"], "us:library/nginx");
    assert!(
        eu.ids("harborArtifact")
            .await
            .iter()
            .all(|id| id.starts_with("eu:") || id.starts_with("us:")),
        "an unprefixed artifact"
    );

    // Each endpoint takes only its own Harbor's secret.
    let body = samples::load("push_artifact.default.docs.json");
    let post = |path: &str, secret: &str| {
        reqwest::Client::new()
            .post(format!("{}{path}", ingest.base))
            .header("authorization", secret.to_owned())
            .body(body.clone())
            .send()
    };
    assert_eq!(post("/webhook/eu", US_SECRET).await.unwrap().status(), 401);
    assert_eq!(post("/webhook/us", EU_SECRET).await.unwrap().status(), 401);
    assert_eq!(post("/webhook/ap", EU_SECRET).await.unwrap().status(), 404);
    let plain = post("/webhook", EU_SECRET).await.unwrap();
    assert_eq!(plain.status(), 404);
    let answer: Value = plain.json().await.unwrap();
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("/webhook/<instance>"),
        "{answer}"
    );
    // The requests are counted by the Harbor they came to.
    let metrics = ingest.metrics().await;
    for series in [
        r#"harbor_ingest_requests_total{harbor="eu",outcome="unauthorized"} 1"#,
        r#"harbor_ingest_requests_total{harbor="us",outcome="unauthorized"} 1"#,
        r#"harbor_ingest_requests_total{harbor="-",outcome="unknown_instance"} 2"#,
    ] {
        assert!(metrics.contains(series), "no {series} in\n{metrics}");
    }

    // A resync of one instance deletes only that instance's entities.
    eu.put_entity(
        "harborRepository",
        ours("eu", "eu:library/gone", "repository:library/gone"),
    )
    .await;
    eu.put_entity(
        "harborRepository",
        ours("us", "us:library/gone", "repository:library/gone"),
    )
    .await;
    let (code, out) = worker_command(
        &file,
        &eu,
        &broker,
        &["resync", "--json", "--instance", "us"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let summaries = by_instance(&out);
    assert_eq!(summaries.len(), 1, "{out}");
    let (instance, summary) = &summaries[0];
    assert_eq!(instance, "us");
    assert_eq!(summary["to_delete"], 1, "{summary}");
    wait_until(
        "us's stray entity deleted",
        Duration::from_secs(20),
        || async {
            eu.entity("harborRepository", "us:library/gone")
                .await
                .is_none()
        },
    )
    .await;
    assert!(
        eu.entity("harborRepository", "eu:library/gone")
            .await
            .is_some(),
        "the us resync deleted an entity of eu"
    );
    let (code, out) = worker_command(&file, &eu, &broker, &["resync", "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let instances: Vec<String> = by_instance(&out).into_iter().map(|(i, _)| i).collect();
    assert_eq!(instances, ["eu", "us"], "{out}");
    wait_until(
        "eu's stray entity deleted",
        Duration::from_secs(20),
        || async {
            eu.entity("harborRepository", "eu:library/gone")
                .await
                .is_none()
        },
    )
    .await;
    assert!(eu.ids("harborArtifact").await.contains(&us_artifact));

    // Our policy in both Harbors, each posting to its own endpoint with its own secret.
    let (code, out) = worker_command(&file, &eu, &broker, &["webhooks", "sync", "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let reports = by_instance(&out);
    assert_eq!(reports.len(), 2, "{out}");
    for (instance, report) in &reports {
        let actions: Vec<&str> = report["projects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["action"].as_str().unwrap())
            .collect();
        // The resync above already kept them (WEBHOOK_PUBLIC_URL is set): nothing to do.
        assert_eq!(actions, ["unchanged"], "{instance}: {report}");
    }
    for (harbor, name, secret) in [(&eu, "eu", EU_SECRET), (&us, "us", US_SECRET)] {
        let policies = harbor.policies("library").await;
        let ours: Vec<&Value> = policies
            .iter()
            .filter(|p| p["name"] == POLICY_NAME)
            .collect();
        assert_eq!(ours.len(), 1, "{name}: {policies:?}");
        let target = &ours[0]["targets"][0];
        assert_eq!(
            target["address"],
            format!("https://harbor-sync.example.com/webhook/{name}")
        );
        assert_eq!(target["auth_header"], secret);
    }
    let (code, out) = worker_command(&file, &eu, &broker, &["webhooks", "status", "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(by_instance(&out).len(), 2, "{out}");
    let (code, _) = worker_command(
        &file,
        &eu,
        &broker,
        &[
            "mapping",
            "render",
            "--kind",
            "project",
            "--project",
            "library",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "mapping render must ask which instance");
    let (code, out) = worker_command(
        &file,
        &eu,
        &broker,
        &[
            "mapping",
            "render",
            "--kind",
            "project",
            "--project",
            "library",
            "--instance",
            "us",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let rendered: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(rendered["entity"]["identifier"], "us:library");

    worker.stop().await;
}
