//! The sandbox: realistic as Harbor and Port, and the whole path through it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use harbor_sync_tests::apps::{
    TestIngest, TestSandbox, TestWorker, ingest_settings, sandbox_settings, start_sandbox,
    start_sandbox_with,
};
use harbor_sync_tests::browser::Browser;
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::sandbox::PayloadFormat;
use harbor_sync_tests::wait_until;
use serde_json::{Value, json};

async fn act_delivered(sandbox: &TestSandbox, action: &str, repository: &str, tag: &str) -> Value {
    let (status, answer) = sandbox.act(action, repository, tag).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn ids(entities: &Value, blueprint: &str) -> Vec<String> {
    entities[blueprint]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["identifier"].as_str().unwrap().to_owned())
        .collect()
}

async fn whole_path(format: PayloadFormat) {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let sandbox = start_sandbox(&format!("{}/webhook", ingest.base), format).await;
    let worker = TestWorker::start(sandbox.worker_settings(&broker.amqp)).await;

    let pushed = act_delivered(&sandbox, "push", "library/nginx", "1.27").await;
    assert_eq!(pushed["webhook"]["status"], 202, "{pushed}");
    let digest = pushed["digest"].as_str().unwrap().to_owned();
    let artifact_id = format!("library/nginx@{digest}");
    wait_until("the artifact in Port", Duration::from_secs(15), || async {
        ids(&sandbox.entities().await, "harborArtifact").contains(&artifact_id)
    })
    .await;
    let held = sandbox.entities().await;
    assert_eq!(ids(&held, "harborRepository"), ["library/nginx"]);
    assert_eq!(ids(&held, "harborProject"), ["library"]);
    assert_eq!(held["harborArtifact"][0]["title"], "library/nginx:1.27");

    act_delivered(&sandbox, "pull", "library/nginx", "1.27").await;
    act_delivered(&sandbox, "scan", "library/nginx", "1.27").await;
    wait_until(
        "the pull count and the scan in Port",
        Duration::from_secs(15),
        || async {
            let held = sandbox.entities().await;
            held["harborRepository"][0]["properties"]["pullCount"] == 1
                && held["harborArtifact"][0]["properties"]["scanStatus"] == "Success"
        },
    )
    .await;

    act_delivered(&sandbox, "delete", "library/nginx", "1.27").await;
    wait_until(
        "the artifact gone from Port",
        Duration::from_secs(15),
        || async { ids(&sandbox.entities().await, "harborArtifact").is_empty() },
    )
    .await;
    worker.stop().await;
    assert_eq!(broker.parked_ready().await, 0);
}

#[tokio::test]
async fn sandbox_push_pull_scan_and_delete_reach_port_through_ingest_and_worker() {
    whole_path(PayloadFormat::Default).await;
}

#[tokio::test]
async fn the_sandbox_in_cloudevents_format_reaches_port_too() {
    whole_path(PayloadFormat::Cloudevents).await;
}

#[tokio::test]
async fn the_sandbox_harbor_is_strict_like_harbor() {
    let sandbox = start_sandbox("http://127.0.0.1:9/webhook", PayloadFormat::Default).await;
    // No ingest listens: the registry changes and the answer says the webhook failed.
    let (status, answer) = sandbox.act("push", "team/app/api", "v1").await;
    assert_eq!(status, 502);
    assert!(answer["webhook"]["error"].is_string(), "{answer}");
    let client = reqwest::Client::new();
    let get = |path: &str, password: &str| {
        client
            .get(format!("{}/api/v2.0{path}", sandbox.base))
            .basic_auth("admin", Some(password))
            .send()
    };
    assert_eq!(
        get("/projects/team/repositories/app%252Fapi", "Harbor12345")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get("/projects/team/repositories/app%2Fapi", "Harbor12345")
            .await
            .unwrap()
            .status(),
        404,
        "encoded once"
    );
    assert_eq!(
        get("/projects/team/repositories/app%252Fapi", "wrong")
            .await
            .unwrap()
            .status(),
        401
    );
    let answer: Value = get(
        "/projects/team/repositories/app%252Fapi/artifacts/v1?with_tag=true",
        "Harbor12345",
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(answer["tags"][0]["name"], "v1");
    assert_eq!(answer["pull_time"], "0001-01-01T00:00:00.000Z");
    let missing = get(
        "/projects/team/repositories/app%252Fapi/artifacts/v2",
        "Harbor12345",
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);
    let errors: Value = missing.json().await.unwrap();
    assert_eq!(errors["errors"][0]["code"], "NOT_FOUND");
    // A project that is not there: 404 to the system administrator, as here.
    let no_project = get("/projects/ghost/repositories/app", "Harbor12345")
        .await
        .unwrap();
    assert_eq!(no_project.status(), 404);
}

#[tokio::test]
async fn the_sandbox_harbor_answers_a_robot_account_403_in_a_project_that_is_not_there() {
    let mut settings = sandbox_settings("http://127.0.0.1:9/webhook", PayloadFormat::Default);
    settings.harbor_username = "robot$port-sync".into();
    let sandbox = start_sandbox_with(settings).await;
    sandbox.act("push", "team/app", "v1").await;
    let client = reqwest::Client::new();
    let (username, password) = sandbox.harbor_login();
    let ask = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{}/api/v2.0{path}", sandbox.base))
            .basic_auth(username, Some(password))
            .header("x-request-id", "ours")
            .send()
    };
    for path in [
        "/projects/ghost",
        "/projects/ghost/repositories",
        "/projects/ghost/repositories/app",
        "/projects/ghost/webhook/policies",
    ] {
        let answer = ask(reqwest::Method::GET, path).await.unwrap();
        assert_eq!(answer.status(), 403, "{path}");
        let errors: Value = answer.json().await.unwrap();
        assert_eq!(errors["errors"][0]["code"], "FORBIDDEN", "{path}");
    }
    assert_eq!(
        ask(reqwest::Method::GET, "/projects/team/repositories/app")
            .await
            .unwrap()
            .status(),
        200
    );
    // HEAD /projects tells the two apart, sending the request's id back.
    for (name, status) in [("team", 200), ("ghost", 404)] {
        let path = format!("/projects?project_name={name}");
        let answer = ask(reqwest::Method::HEAD, &path).await.unwrap();
        assert_eq!(answer.status(), status, "{name}");
        assert_eq!(answer.headers()["x-request-id"], "ours", "{name}");
    }
}

#[tokio::test]
async fn the_sandbox_port_checks_tokens_identifiers_and_schemas_like_port() {
    let sandbox = start_sandbox("http://127.0.0.1:9/webhook", PayloadFormat::Default).await;
    let client = reqwest::Client::new();
    let denied = client
        .post(format!("{}/v1/auth/access_token", sandbox.base))
        .json(&json!({"clientId": "sandbox-client", "clientSecret": "wrong"}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let token = sandbox.token().await;
    let token = token.as_str();
    let upsert = |bearer: &str, entity: Value| {
        client
            .post(format!("{}/v1/blueprints/harborRepository/entities?upsert=true&merge=true&create_missing_related_entities=true", sandbox.base))
            .bearer_auth(bearer)
            .json(&entity)
            .send()
    };
    let good = json!({"identifier": "a/b", "title": "a/b", "properties": {"pullCount": 1}, "relations": {"project": "a"}});
    assert_eq!(
        upsert("bad-token", good.clone()).await.unwrap().status(),
        401
    );
    assert_eq!(upsert(token, good).await.unwrap().status(), 201);
    let unknown = json!({"identifier": "a/b", "properties": {"colour": "red"}});
    assert_eq!(upsert(token, unknown).await.unwrap().status(), 422);
    let bad_id = json!({"identifier": "a b", "properties": {}});
    assert_eq!(upsert(token, bad_id).await.unwrap().status(), 422);
    // The missing related project was created, and the merge keeps earlier properties.
    let merged = json!({"identifier": "a/b", "properties": {"artifactCount": 2}});
    assert_eq!(upsert(token, merged).await.unwrap().status(), 201);
    let held = sandbox.entities().await;
    assert_eq!(ids(&held, "harborProject"), ["a"]);
    assert_eq!(
        held["harborRepository"][0]["properties"],
        json!({"pullCount": 1, "artifactCount": 2})
    );
}

#[tokio::test]
async fn the_page_pushes_an_image_and_shows_it_arrive_in_port() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let sandbox = start_sandbox(&format!("{}/webhook", ingest.base), PayloadFormat::Default).await;
    let _worker = TestWorker::start(sandbox.worker_settings(&broker.amqp)).await;

    let mut page = Browser::open(&format!("{}/", sandbox.base)).await;
    let loaded = "(document.getElementById('harbor') || {}).className === ''";
    page.wait_for("Harbor's contents", loaded, Duration::from_secs(15))
        .await;
    let artifacts = "document.querySelector('[data-blueprint=harborArtifact]')";
    let shown = format!("{artifacts}.innerText.includes('library/nginx:1.27')");
    assert_eq!(page.eval(&shown).await, false);

    page.eval("document.getElementById('tag').value = '1.27'; document.getElementById('push').click(); true")
        .await;
    page.wait_for(
        "the artifact on the Port side",
        &shown,
        Duration::from_secs(15),
    )
    .await;
    page.wait_for(
        "the ingest's answer among the last webhooks",
        "document.getElementById('webhooks').innerText.includes('PUSH_ARTIFACT')",
        Duration::from_secs(5),
    )
    .await;
    let harbor = page
        .eval("document.getElementById('harbor').innerText")
        .await;
    assert!(
        harbor.as_str().unwrap().contains("library/nginx"),
        "{harbor}"
    );
    let webhooks = page
        .eval("document.getElementById('webhooks').innerText")
        .await;
    assert!(webhooks.as_str().unwrap().contains("202"), "{webhooks}");
    let held = sandbox.entities().await;
    assert_eq!(held["harborArtifact"][0]["title"], "library/nginx:1.27");
}
