//! Harbor and Port, faked at the HTTP level with wiremock. Answers follow the real APIs'
//! shapes: Harbor's swagger (`tests/fixtures/harbor/swagger.yaml`) and Port's route schemas
//! (`tests/fixtures/port/`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::prelude::{BASE64_STANDARD, Engine as _};
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header, method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

/// Harbor login the worker is given in tests (a robot account, as in production).
pub const HARBOR_USER: &str = "robot$port-sync";
/// Its password.
pub const HARBOR_PASSWORD: &str = "harbor-robot-secret";
/// Port credentials the worker is given in tests.
pub const PORT_CLIENT_ID: &str = "port-client-id";
/// Port client secret.
pub const PORT_CLIENT_SECRET: &str = "port-client-secret";
/// The access token the fake Port hands out.
pub const PORT_TOKEN: &str = "port-access-token-1";

/// A fake Harbor API.
pub struct FakeHarbor {
    /// The mock server; mount more on it at will.
    pub server: MockServer,
}

fn harbor_repository_path(repository: &str) -> String {
    let (project, name) = repository.split_once('/').unwrap();
    // Harbor wants a nested name encoded twice: team/api → team%252Fapi.
    format!(
        "/api/v2.0/projects/{project}/repositories/{}",
        name.replace('/', "%252F")
    )
}

/// Harbor's 404 for something it does not have.
pub fn harbor_not_found(what: &str) -> ResponseTemplate {
    ResponseTemplate::new(404)
        .insert_header("x-request-id", "d7b4a3c0-0000-4000-8000-000000000000")
        .set_body_json(
            json!({"errors": [{"code": "NOT_FOUND", "message": format!("{what} not found")}]}),
        )
}

impl FakeHarbor {
    /// A Harbor that knows nothing yet: what a test does not mount answers Harbor's 404, as
    /// Harbor answers for what a project that exists does not hold (in a project that does not
    /// exist, Harbor answers the robot account 403: the sandbox plays that).
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(harbor_not_found("the resource"))
            .with_priority(u8::MAX)
            .mount(&server)
            .await;
        Self { server }
    }

    /// Its address, as `HARBOR_URL`.
    pub fn url(&self) -> String {
        self.server.uri()
    }

    fn get(&self, path_value: String) -> wiremock::MockBuilder {
        let credentials = format!("{HARBOR_USER}:{HARBOR_PASSWORD}");
        let basic = format!("Basic {}", BASE64_STANDARD.encode(credentials));
        Mock::given(method("GET"))
            .and(path(path_value))
            .and(header("authorization", basic.as_str()))
    }

    /// `GET .../artifacts/{digest}` answers `artifact`.
    pub async fn artifact(&self, repository: &str, digest: &str, artifact: Value) {
        let p = format!("{}/artifacts/{digest}", harbor_repository_path(repository));
        self.get(p)
            .and(query_param("with_tag", "true"))
            .and(query_param("with_scan_overview", "true"))
            .respond_with(ResponseTemplate::new(200).set_body_json(artifact))
            .mount(&self.server)
            .await;
    }

    /// `GET .../artifacts/{digest}` answers what `respond` says, each time asked (for a
    /// Harbor whose state the test changes).
    pub async fn artifact_answering(
        &self,
        repository: &str,
        digest: &str,
        respond: impl wiremock::Respond + 'static,
    ) {
        let p = format!("{}/artifacts/{digest}", harbor_repository_path(repository));
        self.get(p).respond_with(respond).mount(&self.server).await;
    }

    /// `GET .../artifacts` (the first page, and so the whole list when it holds fewer than a
    /// page) answers `artifacts`.
    pub async fn artifacts(&self, repository: &str, artifacts: Vec<Value>) {
        let p = format!("{}/artifacts", harbor_repository_path(repository));
        self.get(p)
            .and(query_param("page", "1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(artifacts))
            .mount(&self.server)
            .await;
    }

    /// `GET .../artifacts/{digest}` answers 404.
    pub async fn artifact_gone(&self, repository: &str, digest: &str) {
        let p = format!("{}/artifacts/{digest}", harbor_repository_path(repository));
        self.get(p)
            .respond_with(harbor_not_found(&format!("artifact {repository}@{digest}")))
            .mount(&self.server)
            .await;
    }

    /// `GET .../repositories/{name}` answers `repository`.
    pub async fn repository(&self, repository: &str, body: Value) {
        self.get(harbor_repository_path(repository))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&self.server)
            .await;
    }

    /// `GET .../repositories/{name}` answers 404.
    pub async fn repository_gone(&self, repository: &str) {
        self.get(harbor_repository_path(repository))
            .respond_with(harbor_not_found(&format!("repository {repository}")))
            .mount(&self.server)
            .await;
    }

    /// `GET /projects/{name}` answers `project`.
    pub async fn project(&self, name: &str, body: Value) {
        self.get(format!("/api/v2.0/projects/{name}"))
            .and(header("x-is-resource-name", "true"))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&self.server)
            .await;
    }

    /// `repository` exists (holding one artifact, never pulled), and so does its project.
    pub async fn project_and_repository(&self, repository: &str) {
        let project = repository.split_once('/').map_or(repository, |(p, _)| p);
        self.project(project, harbor_json::project(project)).await;
        self.repository(repository, harbor_json::repository(repository, 1, 0))
            .await;
    }

    /// Mounts the project, repository and artifact of a sample, all present.
    pub async fn holds(&self, repository: &str, digest: &str, tags: &[&str], scan: Option<Value>) {
        let project = repository.split_once('/').unwrap().0;
        self.project(project, harbor_json::project(project)).await;
        self.repository(repository, harbor_json::repository(repository, 1, 0))
            .await;
        self.artifact(
            repository,
            digest,
            harbor_json::artifact(repository, digest, tags, scan),
        )
        .await;
    }

    /// Harbor holds `repository` (and its project) and any artifact in it that is asked for,
    /// after `delay`: for tests that push many digests.
    pub async fn holds_any_artifact(&self, repository: &str, delay: Duration) {
        let project = repository.split_once('/').unwrap().0;
        self.project(project, harbor_json::project(project)).await;
        self.repository(repository, harbor_json::repository(repository, 1, 0))
            .await;
        let full_name = repository.to_owned();
        let p = format!(
            "^{}/artifacts/sha256:[0-9a-f]{{64}}$",
            harbor_repository_path(repository).replace('.', "[.]")
        );
        Mock::given(method("GET"))
            .and(path_regex(p))
            .respond_with(move |request: &Request| {
                let digest = request.url.path().rsplit('/').next().unwrap_or_default();
                ResponseTemplate::new(200)
                    .set_body_json(harbor_json::artifact(&full_name, digest, &["latest"], None))
                    .set_delay(delay)
            })
            .mount(&self.server)
            .await;
    }

    /// The paths (with query) Harbor was asked for, in order.
    pub async fn requests(&self) -> Vec<String> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| match r.url.query() {
                Some(q) => format!("{}?{q}", r.url.path()),
                None => r.url.path().to_owned(),
            })
            .collect()
    }
}

/// Harbor API answers, shaped as Harbor v2.15 sends them.
pub mod harbor_json {
    use serde_json::{Value, json};

    /// `GET /projects/{name}`
    pub fn project(name: &str) -> Value {
        json!({
            "project_id": 2, "owner_id": 1, "name": name, "registry_id": null,
            "creation_time": "2023-04-03T06:00:00.000Z", "update_time": "2023-04-03T06:00:00.000Z",
            "deleted": false, "owner_name": "admin", "togglable": true,
            "current_user_role_id": 1, "current_user_role_ids": [1], "repo_count": 3,
            "metadata": {"public": "false", "auto_scan": "true", "severity": "low"},
            "cve_allowlist": {"id": 1, "project_id": 2, "items": [], "creation_time": "0001-01-01T00:00:00.000Z", "update_time": "0001-01-01T00:00:00.000Z"}
        })
    }

    /// `GET /projects/{p}/repositories/{r}`; `name` is the full name.
    pub fn repository(full_name: &str, artifact_count: i64, pull_count: i64) -> Value {
        json!({
            "id": 5, "project_id": 2, "name": full_name, "description": "",
            "artifact_count": artifact_count, "pull_count": pull_count,
            "creation_time": "2023-04-03T06:04:46.771Z", "update_time": "2023-04-03T06:12:55.123Z"
        })
    }

    /// A Trivy scan overview with these counts (critical, high, medium, low).
    pub fn trivy_overview(critical: i64, high: i64, medium: i64, low: i64) -> Value {
        let total = critical + high + medium + low;
        let severity = if critical > 0 {
            "Critical"
        } else if high > 0 {
            "High"
        } else if medium > 0 {
            "Medium"
        } else if low > 0 {
            "Low"
        } else {
            "None"
        };
        json!({
            "application/vnd.security.vulnerability.report; version=1.1": {
                "report_id": "af0546c1-67dc-4e9d-927e-372900ead0df",
                "scan_status": "Success", "severity": severity, "duration": 8,
                "summary": {"total": total, "fixable": total / 2,
                            "summary": {"Critical": critical, "High": high, "Medium": medium, "Low": low}},
                "start_time": "2023-04-03T06:12:47Z", "end_time": "2023-04-03T06:12:55Z",
                "scanner": {"name": "Trivy", "vendor": "Aqua Security", "version": "v0.37.2"},
                "complete_percent": 100
            }
        })
    }

    /// `GET .../artifacts/{digest}?with_tag=true&with_label=true&with_scan_overview=true`
    pub fn artifact(full_name: &str, digest: &str, tags: &[&str], scan: Option<Value>) -> Value {
        let tags: Vec<Value> = tags
            .iter()
            .enumerate()
            .map(|(i, tag)| json!({
                "id": i + 1, "repository_id": 5, "artifact_id": 11, "name": tag,
                "push_time": "2023-04-03T06:04:46.771Z", "pull_time": "0001-01-01T00:00:00.000Z",
                "immutable": false
            }))
            .collect();
        json!({
            "id": 11, "type": "IMAGE",
            "media_type": "application/vnd.docker.container.image.v1+json",
            "manifest_media_type": "application/vnd.docker.distribution.manifest.v2+json",
            "artifact_type": "application/vnd.docker.container.image.v1+json",
            "project_id": 2, "repository_id": 5, "repository_name": full_name,
            "digest": digest, "size": 3_370_706,
            "icon": "sha256:0048162a053eef4d4ce3fe7518615bef084403614f8bca43b40ae2e762e11e06",
            "push_time": "2023-04-03T06:04:46.771Z", "pull_time": "0001-01-01T00:00:00.000Z",
            "extra_attrs": {"architecture": "amd64", "os": "linux", "created": "2023-03-29T18:19:24.45578926Z"},
            "annotations": null, "references": null, "tags": tags,
            "addition_links": {"build_history": {"absolute": false, "href": "/api/v2.0/..."}},
            "labels": null, "scan_overview": scan, "accessories": null
        })
    }
}

/// One write the worker sent to Port.
#[derive(Debug, Clone, PartialEq)]
pub struct PortWrite {
    /// `upsert` or `delete`.
    pub action: &'static str,
    /// The blueprint.
    pub blueprint: String,
    /// The entity's identifier (from the body of an upsert, the path of a delete).
    pub identifier: String,
    /// The upserted entity, as sent.
    pub entity: Option<Value>,
}

/// A fake Port API that accepts every well-formed, authenticated write.
pub struct FakePort {
    /// The mock server; mount more on it at will (with a priority below 5 to override).
    pub server: MockServer,
    /// What Port holds, by blueprint and identifier: what was written, and what a test says
    /// it holds. Searches look here.
    held: Held,
}

impl FakePort {
    /// A Port that hands out [`PORT_TOKEN`] for the test credentials and accepts writes.
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/auth/access_token"))
            .and(body_partial_json(json!({"clientId": PORT_CLIENT_ID, "clientSecret": PORT_CLIENT_SECRET})))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"ok": true, "accessToken": PORT_TOKEN, "expiresIn": 10800, "tokenType": "Bearer"}),
            ))
            .mount(&server)
            .await;
        let bearer = format!("Bearer {PORT_TOKEN}");
        let held = Held::default();
        // Upserts alone and in bulk.
        Mock::given(method("POST"))
            .and(path_regex(r"^/v1/blueprints/[^/]+/entities(/bulk)?$"))
            .and(query_param("upsert", "true"))
            .and(query_param("merge", "true"))
            .and(query_param("create_missing_related_entities", "true"))
            .and(header("authorization", bearer.as_str()))
            .respond_with({
                let held = held.clone();
                move |request: &Request| {
                    for write in entity_writes(request) {
                        held.write(&write);
                    }
                    accept_upserts(request)
                }
            })
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/entities/search"))
            .and(header("authorization", bearer.as_str()))
            .respond_with({
                let held = held.clone();
                move |request: &Request| held.search(request)
            })
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path_regex(r"^/v1/blueprints/[^/]+/bulk/entities/delete$"))
            .and(query_param("delete_dependents", "false"))
            .and(header("authorization", bearer.as_str()))
            .respond_with({
                let held = held.clone();
                move |request: &Request| {
                    let writes = entity_writes(request);
                    for write in &writes {
                        held.write(write);
                    }
                    let deleted: Vec<&str> = writes.iter().map(|w| w.identifier.as_str()).collect();
                    ResponseTemplate::new(200)
                        .set_body_json(json!({"ok": true, "deletedEntities": deleted}))
                }
            })
            .mount(&server)
            .await;
        Mock::given(method("DELETE"))
            .and(path_regex(r"^/v1/blueprints/[^/]+/entities/[^/]+$"))
            .and(query_param("delete_dependents", "false"))
            .and(header("authorization", bearer.as_str()))
            .respond_with({
                let held = held.clone();
                move |request: &Request| {
                    for write in entity_writes(request) {
                        held.write(&write);
                    }
                    ResponseTemplate::new(200).set_body_json(json!({"ok": true}))
                }
            })
            .mount(&server)
            .await;
        Self { server, held }
    }

    /// Port holds this entity of `blueprint` (written before the test began).
    pub fn holds(&self, blueprint: &str, entity: Value) {
        let identifier = entity["identifier"].as_str().unwrap_or_default().to_owned();
        self.held.write(&PortWrite {
            action: "upsert",
            blueprint: blueprint.to_owned(),
            identifier,
            entity: Some(entity),
        });
    }

    /// Its address, as `PORT_API_URL`.
    pub fn url(&self) -> String {
        self.server.uri()
    }

    /// Upserts of `identifier` (alone or in bulk) answer `status` (with `Retry-After` if given)
    /// `times` times, then the normal answer resumes. `times` 0 means always.
    pub async fn fail_upsert(
        &self,
        identifier: &str,
        status: u16,
        retry_after: Option<Duration>,
        times: u64,
    ) {
        let id = identifier.to_owned();
        let mock = Mock::given(method("POST"))
            .and(Upserts(identifier.to_owned()))
            .respond_with(move |request: &Request| refuse_upsert(request, &id, status, retry_after))
            .with_priority(1);
        let mock = if times > 0 {
            mock.up_to_n_times(times)
        } else {
            mock
        };
        mock.mount(&self.server).await;
    }

    /// Every entity write received so far, in order (token requests and searches left out); a
    /// bulk upsert counts as one write per entity.
    pub async fn writes(&self) -> Vec<PortWrite> {
        let requests = self.server.received_requests().await.unwrap_or_default();
        requests.iter().flat_map(entity_writes).collect()
    }

    /// The identifiers of the entities of `blueprint` written (upserted or deleted) so far.
    pub async fn identifiers_written(&self, blueprint: &str) -> std::collections::BTreeSet<String> {
        self.writes()
            .await
            .into_iter()
            .filter(|w| w.blueprint == blueprint)
            .map(|w| w.identifier)
            .collect()
    }

    /// Waits until at least `count` writes were received, then returns them all.
    pub async fn wait_for_writes(&self, count: usize, timeout: Duration) -> Vec<PortWrite> {
        let what = format!("{count} Port writes");
        crate::wait_until(&what, timeout, || async {
            self.writes().await.len() >= count
        })
        .await;
        self.writes().await
    }

    /// How many requests reached the fake, token requests included.
    pub async fn request_count(&self) -> usize {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .len()
    }
}

/// The entities the fake Port holds, by blueprint and identifier.
#[derive(Clone, Default)]
struct Held(Arc<Mutex<std::collections::BTreeMap<(String, String), Value>>>);

impl Held {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<(String, String), Value>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An upsert merges its properties and relations into the entity; a delete removes it.
    fn write(&self, write: &PortWrite) {
        let key = (write.blueprint.clone(), write.identifier.clone());
        let mut held = self.lock();
        match &write.entity {
            None => {
                held.remove(&key);
            }
            Some(entity) => {
                let current = held
                    .entry(key)
                    .or_insert_with(|| json!({"properties": {}, "relations": {}}));
                for (field, value) in entity.as_object().into_iter().flatten() {
                    match (field.as_str(), value.as_object()) {
                        ("properties" | "relations", Some(values)) => {
                            for (name, v) in values {
                                current[field][name] = v.clone();
                            }
                        }
                        _ => current[field] = value.clone(),
                    }
                }
            }
        }
    }

    /// `POST /v1/entities/search` over what it holds.
    fn search(&self, request: &Request) -> ResponseTemplate {
        let query: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let include: Vec<String> = request
            .url
            .query_pairs()
            .filter(|(key, _)| key == "include")
            .map(|(_, value)| value.into_owned())
            .collect();
        let mut found = Vec::new();
        for ((blueprint, _), entity) in self.lock().iter() {
            match crate::sandbox::port::matches(&query, blueprint, entity) {
                Ok(true) => found.push(crate::sandbox::port::included(entity, blueprint, &include)),
                Ok(false) => {}
                Err(message) => {
                    return ResponseTemplate::new(422)
                        .set_body_json(json!({"ok": false, "message": message}));
                }
            }
        }
        ResponseTemplate::new(200).set_body_json(json!({"ok": true, "entities": found}))
    }
}

/// The entity writes of one request to Port: upserts (one or in bulk) and deletes.
pub fn entity_writes(request: &Request) -> Vec<PortWrite> {
    let Some(segments) = request.url.path_segments() else {
        return Vec::new();
    };
    let segments: Vec<&str> = segments.collect();
    let upsert = |blueprint: &str, entity: &Value| {
        Some(PortWrite {
            action: "upsert",
            blueprint: blueprint.to_owned(),
            identifier: entity["identifier"].as_str()?.to_owned(),
            entity: Some(entity.clone()),
        })
    };
    let body = || serde_json::from_slice::<Value>(&request.body).unwrap_or(Value::Null);
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "blueprints", blueprint, "entities"]) => {
            upsert(blueprint, &body()).into_iter().collect()
        }
        ("POST", ["v1", "blueprints", blueprint, "entities", "bulk"]) => body()["entities"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|entity| upsert(blueprint, entity))
            .collect(),
        ("POST", ["v1", "blueprints", blueprint, "bulk", "entities", "delete"]) => {
            body()["entities"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|id| {
                    Some(PortWrite {
                        action: "delete",
                        blueprint: (*blueprint).to_owned(),
                        identifier: id.as_str()?.to_owned(),
                        entity: None,
                    })
                })
                .collect()
        }
        ("DELETE", ["v1", "blueprints", blueprint, "entities", id]) => {
            let identifier = url::form_urlencoded::parse(format!("x={id}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned());
            identifier
                .map(|identifier| PortWrite {
                    action: "delete",
                    blueprint: (*blueprint).to_owned(),
                    identifier,
                    entity: None,
                })
                .into_iter()
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Matches an upsert, alone or in bulk, that carries the entity with this identifier.
pub struct Upserts(pub String);

impl wiremock::Match for Upserts {
    fn matches(&self, request: &Request) -> bool {
        entity_writes(request)
            .iter()
            .any(|w| w.action == "upsert" && w.identifier == self.0)
    }
}

/// Port's answer to an upsert that carries `identifier` when Port refuses that entity with
/// `status`: alone, that status; in bulk, 429 (with `Retry-After`) refuses the whole request,
/// any other status makes a 207 that names the entity among the errors.
pub fn refuse_upsert(
    request: &Request,
    identifier: &str,
    status: u16,
    retry_after: Option<Duration>,
) -> ResponseTemplate {
    let code = if status == 429 {
        "rate_limit_exceeded"
    } else {
        "invalid_request"
    };
    let body =
        json!({"ok": false, "error": code, "message": format!("fake Port answers {status}")});
    let bulk = request.url.path().ends_with("/bulk");
    let mut response = if bulk && status != 429 {
        let entities: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let (mut created, mut errors) = (Vec::new(), Vec::new());
        for (index, entity) in entities["entities"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if entity["identifier"] == identifier {
                errors.push(
                    json!({"identifier": identifier, "index": index, "statusCode": status,
                                   "error": code, "message": body["message"]}),
                );
            } else {
                created.push(
                    json!({"created": true, "identifier": entity["identifier"], "index": index}),
                );
            }
        }
        ResponseTemplate::new(207)
            .set_body_json(json!({"ok": true, "entities": created, "errors": errors}))
    } else {
        ResponseTemplate::new(status).set_body_json(body)
    };
    if let Some(wait) = retry_after {
        response = response.insert_header("retry-after", wait.as_secs().to_string().as_str());
    }
    response
}

/// Port's answer to an upsert it accepts: 201 with the entity alone, 200 naming each entity in
/// bulk.
pub fn accept_upserts(request: &Request) -> ResponseTemplate {
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    if !request.url.path().ends_with("/bulk") {
        return ResponseTemplate::new(201).set_body_json(json!({"ok": true, "entity": body}));
    }
    let created: Vec<Value> = body["entities"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(index, e)| json!({"created": true, "identifier": e["identifier"], "index": index}))
        .collect();
    ResponseTemplate::new(200).set_body_json(json!({"ok": true, "entities": created, "errors": []}))
}
