//! `harbor-worker webhooks sync|status`, and the policies each resync keeps, against the
//! sandbox's Harbor (its webhook policy API as Harbor's swagger has it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use harbor_sync_tests::apps::{TestSandbox, TestWorker, start_sandbox};
use harbor_sync_tests::processes::binary;
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::sandbox::PayloadFormat;
use harbor_sync_tests::wait_until;
use harbor_worker::webhooks::{Desired, POLICY_NAME};
use secrecy::SecretString;
use serde_json::{Value, json};

const SECRET: &str = "policy-secret-0123456789";
const PUBLIC_URL: &str = "https://harbor-sync.example.com";

/// Runs `harbor-worker webhooks <args>` against the sandbox; the exit code and stdout, with
/// stderr checked for the secret too.
fn webhooks(sandbox: &TestSandbox, args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(binary("harbor-worker"))
        .arg("webhooks")
        .args(args)
        .env_clear()
        .env("HARBOR_URL", &sandbox.base)
        .env("HARBOR_USERNAME", "admin")
        .env("HARBOR_PASSWORD", "Harbor12345")
        .env("WEBHOOK_PUBLIC_URL", PUBLIC_URL)
        .env("WEBHOOK_SECRET", format!("{SECRET},an-older-secret-kept"))
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "the secret was printed: {stdout} {stderr}"
    );
    (output.status.code(), stdout)
}

/// The JSON report: the first line.
fn json_report(out: &str) -> Value {
    serde_json::from_str(out.lines().next().unwrap_or_default()).unwrap()
}

fn actions(report: &str) -> Vec<(String, String)> {
    let report = json_report(report);
    report["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let (project, action) = (&p["project"], &p["action"]);
            (
                project.as_str().unwrap().into(),
                action.as_str().unwrap().into(),
            )
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(p, a)| ((*p).to_owned(), (*a).to_owned()))
        .collect()
}

async fn harbor_write(sandbox: &TestSandbox, method: reqwest::Method, path: &str, body: Value) {
    let response = reqwest::Client::new()
        .request(method, format!("{}/api/v2.0/{path}", sandbox.base))
        .basic_auth("admin", Some("Harbor12345"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
}

#[tokio::test]
async fn sync_creates_updates_and_removes_only_our_policy_and_status_shows_failed_deliveries() {
    // Nothing listens on port 9: every delivery fails, as Harbor records it.
    let sandbox = start_sandbox("http://127.0.0.1:9/webhook", PayloadFormat::Default).await;
    for repository in ["library/nginx", "alpha/web", "locked/app"] {
        sandbox.act("push", repository, "1").await;
    }
    let (status, _) = sandbox
        .post(
            "project",
            json!({"name": "locked", "webhooks_forbidden": true}),
        )
        .await;
    assert_eq!(status, 200);
    let theirs = json!({
        "name": "team-alerts", "enabled": true, "event_types": ["QUOTA_EXCEED"],
        "targets": [{"type": "http", "address": "https://alerts.example.com/hook", "auth_header": "x",
                     "skip_cert_verify": false, "payload_format": "Default"}],
    });
    harbor_write(
        &sandbox,
        reqwest::Method::POST,
        "projects/library/webhook/policies",
        theirs,
    )
    .await;

    let (code, out) = webhooks(&sandbox, &["sync", "--dry-run", "--json"]);
    assert_eq!(code, Some(1), "a project failed: {out}");
    assert_eq!(
        actions(&out),
        pairs(&[
            ("alpha", "would be created"),
            ("library", "would be created"),
            ("locked", "failed")
        ])
    );
    assert!(out.contains("notification-policy"), "{out}");
    assert!(
        sandbox.policies("alpha").await.is_empty(),
        "a dry run changed nothing"
    );

    let (code, out) = webhooks(&sandbox, &["sync", "--json"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(
        actions(&out),
        pairs(&[
            ("alpha", "created"),
            ("library", "created"),
            ("locked", "failed")
        ])
    );
    let library = sandbox.policies("library").await;
    assert_eq!(library.len(), 2, "theirs is left alone: {library:?}");
    let ours = library.iter().find(|p| p["name"] == POLICY_NAME).unwrap();
    assert_eq!(ours["enabled"], true);
    assert_eq!(
        ours["targets"],
        json!([{"type": "http", "address": format!("{PUBLIC_URL}/webhook"), "auth_header": SECRET,
                "skip_cert_verify": false, "payload_format": "Default"}])
    );
    let types = ours["event_types"].as_array().unwrap();
    for handled in [
        "PUSH_ARTIFACT",
        "PULL_ARTIFACT",
        "DELETE_ARTIFACT",
        "SCANNING_COMPLETED",
    ] {
        assert!(types.contains(&json!(handled)), "{types:?}");
    }

    let (_, out) = webhooks(&sandbox, &["sync", "--json"]);
    assert_eq!(
        actions(&out)[..2],
        pairs(&[("alpha", "unchanged"), ("library", "unchanged")])
    );

    // Someone disables ours in alpha: the next sync puts it back, saying what differed.
    let mut disabled = sandbox.policies("alpha").await.remove(0);
    disabled["enabled"] = json!(false);
    let id = disabled["id"].as_i64().unwrap();
    harbor_write(
        &sandbox,
        reqwest::Method::PUT,
        &format!("projects/alpha/webhook/policies/{id}"),
        disabled,
    )
    .await;
    let (_, out) = webhooks(&sandbox, &["sync"]);
    assert!(out.contains("alpha  updated: enabled"), "{out}");
    assert_eq!(sandbox.policies("alpha").await[0]["enabled"], true);

    // A delivery Harbor gives up on shows in status.
    sandbox.act("push", "library/nginx", "2").await;
    let (code, out) = webhooks(&sandbox, &["status", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let all = json_report(&out);
    let library = all["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["project"] == "library")
        .unwrap();
    assert_eq!(library["present"], true);
    assert_eq!(library["matches"], true);
    let failed = &library["failed"][0];
    assert_eq!(failed["event_type"], "PUSH_ARTIFACT", "{library}");
    assert!(
        failed["message"].as_str().unwrap().contains("error"),
        "{library}"
    );
    let (_, text) = webhooks(&sandbox, &["status"]);
    assert!(
        text.contains("library  ok  (failed deliveries: 1)"),
        "{text}"
    );
    assert!(
        text.contains("locked  missing: the Harbor account may not manage"),
        "{text}"
    );

    let (_, out) = webhooks(&sandbox, &["sync", "--remove", "--json"]);
    assert_eq!(
        actions(&out)[..2],
        pairs(&[("alpha", "removed"), ("library", "removed")])
    );
    let library = sandbox.policies("library").await;
    assert_eq!(library.len(), 1);
    assert_eq!(library[0]["name"], "team-alerts");
}

#[tokio::test]
async fn without_a_public_url_the_commands_say_what_is_missing() {
    let output = std::process::Command::new(binary("harbor-worker"))
        .args(["webhooks", "sync"])
        .env_clear()
        .env("HARBOR_URL", "http://127.0.0.1:9")
        .env("HARBOR_USERNAME", "admin")
        .env("HARBOR_PASSWORD", "x")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("WEBHOOK_PUBLIC_URL is required"),
        "{stderr}"
    );
}

#[tokio::test]
async fn each_periodic_resync_covers_the_projects_created_since() {
    let broker = TestTopology::new().await;
    let sandbox = start_sandbox("http://127.0.0.1:9/webhook", PayloadFormat::Default).await;
    sandbox.act("push", "library/nginx", "1").await;
    let mut settings = sandbox.worker_settings(&broker.amqp);
    settings.resync_interval = Some(Duration::from_secs(5));
    settings.harbors[0].webhooks = Some(Desired::new(
        &PUBLIC_URL.parse().unwrap(),
        None,
        SecretString::from(SECRET),
        true,
    ));
    let worker = TestWorker::start(settings).await;
    wait_until(
        "our policy in the first project",
        Duration::from_secs(30),
        || async { !sandbox.policies("library").await.is_empty() },
    )
    .await;
    // Created after the worker started: covered by the next resync.
    sandbox.act("push", "fresh/app", "1").await;
    wait_until(
        "our policy in the new project",
        Duration::from_secs(30),
        || async { !sandbox.policies("fresh").await.is_empty() },
    )
    .await;
    let fresh = sandbox.policies("fresh").await;
    assert_eq!(fresh[0]["targets"][0]["payload_format"], "CloudEvents");
    worker.stop().await;
}
