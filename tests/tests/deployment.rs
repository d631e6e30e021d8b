//! The documented deployments run as written. The Kubernetes manifests: `deploy/k8s` (one
//! Harbor) and `deploy/k8s-several-harbors` are rendered with kustomize, and each container of
//! ours gets the environment Kubernetes would give it (env, envFrom of the ConfigMap and the
//! Secret, secretKeyRef and configMapKeyRef, the files of mounted Secrets), with only the
//! in-cluster addresses mapped to local ones: the broker's Service to the local broker (the
//! vhost to one of the test's own), Harbor and Port to the sandbox, the listening addresses to
//! free ports. The broker user the Secret's URLs name is made as deploy/k8s/rabbitmq/user.yaml
//! makes it. The ingest and the worker must become ready, a push must reach Port through them,
//! and the commands the README runs through `kubectl exec` must succeed with the worker's
//! environment. Every `REPLACE_ME` is filled in, as the manifests tell the operator to. The
//! same for `docker-compose.yml` as a real install runs it (its variables given, the sandbox
//! service off, a sandbox of the test's standing in for the real Harbor and Port).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harbor_sync_tests::apps::{sandbox_settings, start_sandbox_with, wait_ready_within};
use harbor_sync_tests::processes::{Processes, binary, free_port};
use harbor_sync_tests::sandbox::PayloadFormat;
use serde_yaml_ng::Value;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents `kubectl kustomize` renders of `dir`.
fn render(dir: &str) -> Vec<Value> {
    let output = Command::new(repository().join("deploy/kubectl.sh"))
        .args(["kustomize", &repository().join(dir).display().to_string()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .collect()
}

fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// What the operator puts in place of each `REPLACE_ME` of the manifests.
const FILLED_IN: &str = "filled-in-by-the-operator-0123456789";

/// A ConfigMap's data or a Secret's stringData, by key, placeholders filled in.
fn data(documents: &[Value], kind: &str, name: &str) -> BTreeMap<String, String> {
    let field = if kind == "Secret" {
        "stringData"
    } else {
        "data"
    };
    find(documents, kind, name)[field]
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let value = v.as_str().unwrap().replace("REPLACE_ME", FILLED_IN);
            (k.as_str().unwrap().to_owned(), value)
        })
        .collect()
}

/// What a container of a workload sees: its environment and, by path, the files of the Secrets
/// mounted into it.
struct Container {
    env: BTreeMap<String, String>,
    files: BTreeMap<String, String>,
}

fn container(documents: &[Value], kind: &str, workload: &str, name: &str) -> Container {
    let pod = &find(documents, kind, workload)["spec"]["template"]["spec"];
    let spec = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    let mut env = BTreeMap::new();
    for from in spec["envFrom"].as_sequence().into_iter().flatten() {
        if let Some(map) = from["configMapRef"]["name"].as_str() {
            env.extend(data(documents, "ConfigMap", map));
        }
        if let Some(secret) = from["secretRef"]["name"].as_str() {
            env.extend(data(documents, "Secret", secret));
        }
    }
    for var in spec["env"].as_sequence().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_owned();
        if let Some(value) = var["value"].as_str() {
            env.insert(name, value.to_owned());
            continue;
        }
        for (source, kind) in [("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")] {
            let reference = &var["valueFrom"][source];
            let Some(from) = reference["name"].as_str() else {
                continue;
            };
            let key = reference["key"].as_str().unwrap();
            match data(documents, kind, from).remove(key) {
                Some(value) => {
                    env.insert(name.clone(), value);
                }
                None => assert!(
                    reference["optional"] == true,
                    "{workload}: {name} reads {kind} {from}'s {key}, which is not there"
                ),
            }
        }
    }
    let mut files = BTreeMap::new();
    for mount in spec["volumeMounts"].as_sequence().into_iter().flatten() {
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let secret = data(
            documents,
            "Secret",
            volume["secret"]["secretName"].as_str().unwrap(),
        );
        let items: Option<Vec<(&str, &str)>> = volume["secret"]["items"].as_sequence().map(|i| {
            i.iter()
                .map(|i| (i["key"].as_str().unwrap(), i["path"].as_str().unwrap()))
                .collect()
        });
        let at = mount["mountPath"].as_str().unwrap();
        for (key, value) in &secret {
            let path = match &items {
                None => Some(key.as_str()),
                Some(items) => items.iter().find(|(k, _)| k == key).map(|(_, p)| *p),
            };
            if let Some(path) = path {
                files.insert(format!("{at}/{path}"), value.clone());
            }
        }
    }
    Container { env, files }
}

/// The in-cluster addresses and this machine's, and where the mounted files are put.
struct Local {
    addresses: Vec<(String, String)>,
    root: PathBuf,
}

impl Local {
    /// `value` with every in-cluster address mapped; one left over fails the test.
    fn map(&self, value: &str) -> String {
        let mut value = value.to_owned();
        for (cluster, local) in &self.addresses {
            value = value.replace(cluster.as_str(), local);
        }
        value = value.replace("/etc/", &format!("{}/etc/", self.root.display()));
        for cluster in [".svc", "example.com", "api.port.io", "0.0.0.0"] {
            assert!(!value.contains(cluster), "no local address for {value}");
        }
        value
    }

    /// The container's environment, its files written where the environment now points.
    fn environment(&self, container: &Container) -> Vec<(String, String)> {
        for (path, content) in &container.files {
            let path = PathBuf::from(self.map(path));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, self.map(content)).unwrap();
        }
        container
            .env
            .iter()
            .map(|(k, v)| (k.clone(), self.map(v)))
            .collect()
    }
}

/// The broker's management API, as its administrator.
async fn management(method: reqwest::Method, path: &str, body: Option<serde_json::Value>) {
    let mut request = reqwest::Client::new()
        .request(method, format!("http://127.0.0.1:15672/api/{path}"))
        .basic_auth("guest", Some("guest"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let status = request.send().await.unwrap().status();
    assert!(status.is_success(), "management API {path}: {status}");
}

fn as_pairs(env: &[(String, String)]) -> Vec<(&str, String)> {
    env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
}

/// Runs `harbor-worker <args>` with `env` (and nothing else); its output, or why it failed.
async fn worker_command(env: &[(String, String)], args: &[&str]) -> Result<String, String> {
    let mut command = Command::new(binary("harbor-worker"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("harbor-worker {}: {text}", args.join(" ")))
    }
}

/// `dir`'s ingest and worker (and blueprints Job) as Kubernetes would run them.
fn rendered(dir: &str) -> (Container, Container, Option<Container>) {
    let documents = render(dir);
    let ingest = container(&documents, "Deployment", "harbor-ingest", "ingest");
    let worker = container(&documents, "Deployment", "harbor-worker", "worker");
    let blueprints = container(
        &documents,
        "Job",
        "harbor-port-sync-blueprints",
        "blueprints",
    );
    (ingest, worker, Some(blueprints))
}

/// The value compose gives `value` (`${NAME}`, `${NAME:-default}`, `${NAME:?error}`) with
/// `variables` set; compose's refusal fails the test.
fn interpolate(value: &str, variables: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}').unwrap();
        let expression = &rest[start + 2..end];
        let (name, otherwise) =
            expression.split_at(expression.find(':').unwrap_or(expression.len()));
        let set = variables.get(name).copied().filter(|v| !v.is_empty());
        out.push_str(&match (set, otherwise.get(..2), otherwise.get(2..)) {
            (Some(value), _, _) => value.to_owned(),
            (None, Some(":-"), Some(default)) => default.to_owned(),
            (None, Some(":?"), Some(error)) => panic!("compose refuses to run: {error}"),
            (None, ..) => String::new(),
        });
        rest = &rest[end + 1..];
    }
    out + rest
}

/// docker-compose.yml's ingest and worker with `variables` set, as compose would run them;
/// each listens where it publishes its port.
fn composed(variables: &BTreeMap<&str, &str>) -> (Container, Container, Option<Container>) {
    let path = repository().join("docker-compose.yml");
    let compose: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let service = |name: &str, listen: (&str, &str)| {
        let mut env: BTreeMap<String, String> = compose["services"][name]["environment"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let value = interpolate(v.as_str().unwrap(), variables);
                (k.as_str().unwrap().to_owned(), value)
            })
            .collect();
        env.insert(listen.0.to_owned(), listen.1.to_owned());
        Container {
            env,
            files: BTreeMap::new(),
        }
    };
    let ingest = service("ingest", ("LISTEN_ADDR", "0.0.0.0:8080"));
    let worker = service("worker", ("METRICS_ADDR", "0.0.0.0:9090"));
    (ingest, worker, None)
}

/// One deployment run (`dir` names it): its ingest and worker become ready, a push to
/// `endpoint` reaches Port, and the documented commands succeed.
async fn runs(
    dir: &str,
    (ingest, worker, blueprints): (Container, Container, Option<Container>),
    endpoint: &str,
    vhost: &str,
) {
    let (ingest_port, metrics_port) = (free_port(), free_port());
    // The sandbox plays Harbor (every instance) and Port with the manifests' credentials, and
    // sends its webhooks to the ingest with the first Harbor's secret.
    let credential = |key: &str| worker.env.get(key).cloned().unwrap_or_default();
    let instance_secret = worker
        .files
        .iter()
        .find(|(path, _)| path.ends_with("webhook-secret"))
        .map(|(_, secret)| secret.clone());
    let mut settings = sandbox_settings(
        &format!("http://127.0.0.1:{ingest_port}{endpoint}"),
        PayloadFormat::Default,
    );
    settings.webhook_auth = instance_secret.unwrap_or_else(|| credential("WEBHOOK_SECRET"));
    settings.harbor_username = credential("HARBOR_USERNAME");
    settings.harbor_password = credential("HARBOR_PASSWORD");
    if settings.harbor_username.is_empty() {
        settings.harbor_username = "robot$port-sync".into();
        settings.harbor_password = FILLED_IN.into();
    }
    settings.port_client_id = credential("PORT_CLIENT_ID");
    settings.port_client_secret = credential("PORT_CLIENT_SECRET");
    let sandbox = start_sandbox_with(settings).await;

    let local = Local {
        addresses: vec![
            (
                "rabbitmq.harbor-port-sync.svc:5672/%2f".into(),
                format!("127.0.0.1:5672/{vhost}"),
            ),
            (
                "rabbitmq.harbor-port-sync.svc:15672/%2F".into(),
                format!("127.0.0.1:15672/{vhost}"),
            ),
            ("https://harbor.example.com".into(), sandbox.base.clone()),
            ("https://harbor-eu.example.com".into(), sandbox.base.clone()),
            ("https://harbor-us.example.com".into(), sandbox.base.clone()),
            ("https://api.port.io".into(), sandbox.base.clone()),
            // Where Harbor posts webhooks: the Ingress, in front of the ingest.
            (
                "https://harbor-webhooks.example.com".into(),
                format!("http://127.0.0.1:{ingest_port}"),
            ),
            // The broker's compose service.
            (
                "guest:guest@rabbitmq:5672/%2f".into(),
                format!("guest:guest@127.0.0.1:5672/{vhost}"),
            ),
            ("0.0.0.0:8080".into(), format!("127.0.0.1:{ingest_port}")),
            ("0.0.0.0:9090".into(), format!("127.0.0.1:{metrics_port}")),
        ],
        root: std::env::temp_dir().join(format!("deployment-{}", uuid::Uuid::new_v4().simple())),
    };
    let worker_env = local.environment(&worker);
    if let Some(blueprints) = &blueprints {
        worker_command(&local.environment(blueprints), &["blueprints"])
            .await
            .unwrap();
    }

    let mut processes = Processes::new("deployment");
    processes.spawn(
        "ingest",
        "harbor-ingest",
        &as_pairs(&local.environment(&ingest)),
    );
    processes.spawn("worker", "harbor-worker", &as_pairs(&worker_env));
    for (name, url) in [
        ("ingest", format!("http://127.0.0.1:{ingest_port}/readyz")),
        ("worker", format!("http://127.0.0.1:{metrics_port}/readyz")),
    ] {
        if tokio::time::timeout(
            Duration::from_secs(30),
            wait_ready_within(&url, Duration::from_secs(30)),
        )
        .await
        .is_err()
        {
            panic!(
                "{dir}: the {name} never became ready:\n{}",
                processes.log(name)
            );
        }
    }

    let (status, pushed) = sandbox.act("push", "library/nginx", "1.27").await;
    assert_eq!(status, 200, "{dir}: the webhook was not taken: {pushed}");
    let digest = pushed["digest"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let entities = sandbox.entities().await;
        let written = entities["harborArtifact"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| {
                e["identifier"]
                    .as_str()
                    .is_some_and(|i| i.ends_with(&digest))
            });
        if written {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dir}: the push never reached Port:\n{}",
            processes.log("worker")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for command in [
        &["backlog"][..],
        &["resync", "--dry-run"],
        &["parked", "list"],
        &["webhooks", "status"],
    ] {
        if let Err(failed) = worker_command(&worker_env, command).await {
            panic!("{dir}: {failed}");
        }
    }
    processes.terminate_all();
    let _ = std::fs::remove_dir_all(&local.root);
}

/// Runs `run` with the name of a vhost of its own on which `user` may do everything (made with
/// the `management` tag when `password` is given, as deploy/k8s/rabbitmq/user.yaml makes it),
/// then deletes what it made, whatever `run` did.
async fn on_a_vhost_of_its_own<F>(user: &str, password: Option<&str>, run: impl FnOnce(String) -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    use reqwest::Method;
    let vhost = format!("deployment-{}", uuid::Uuid::new_v4().simple());
    management(Method::PUT, &format!("vhosts/{vhost}"), None).await;
    if let Some(password) = password {
        let made = serde_json::json!({"password": password, "tags": "management"});
        management(Method::PUT, &format!("users/{user}"), Some(made)).await;
    }
    let everything = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    management(
        Method::PUT,
        &format!("permissions/{vhost}/{user}"),
        Some(everything),
    )
    .await;
    let outcome = tokio::spawn(run(vhost.clone())).await;
    management(Method::DELETE, &format!("vhosts/{vhost}"), None).await;
    if password.is_some() {
        management(Method::DELETE, &format!("users/{user}"), None).await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kubernetes_manifests_run_as_rendered_for_one_harbor_and_for_several() {
    // The user of the Secret's URLs, on a vhost of this test's own (the manifests' `/`).
    on_a_vhost_of_its_own("harbor-port-sync", Some(FILLED_IN), |vhost| async move {
        runs("deploy/k8s", rendered("deploy/k8s"), "/webhook", &vhost).await;
        let several = rendered("deploy/k8s-several-harbors");
        runs("deploy/k8s-several-harbors", several, "/webhook/eu", &vhost).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_runs_as_written_against_a_real_harbor_and_port() {
    // What a real install sets (README, docker-compose.yml's header); PORT_API_URL left to its
    // default.
    let variables = BTreeMap::from([
        ("WEBHOOK_SECRET", FILLED_IN),
        ("HARBOR_URL", "https://harbor.example.com"),
        ("HARBOR_USERNAME", "robot$port-sync"),
        ("HARBOR_PASSWORD", FILLED_IN),
        ("PORT_CLIENT_ID", FILLED_IN),
        ("PORT_CLIENT_SECRET", FILLED_IN),
        ("WEBHOOK_PUBLIC_URL", "https://harbor-webhooks.example.com"),
    ]);
    let containers = composed(&variables);
    // Compose's broker user, guest, on a vhost of this test's own (compose's `/`).
    on_a_vhost_of_its_own("guest", None, |vhost| async move {
        runs("docker-compose.yml", containers, "/webhook", &vhost).await;
    })
    .await;
}
