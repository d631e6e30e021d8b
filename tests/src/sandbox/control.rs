//! `/sandbox/...`: act as Harbor for a person, and show what Port holds; `/` is the page doing
//! both in a browser.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use harbor_worker::names::RepositoryName;
use serde::Deserialize;
use serde_json::{Value, json};

use super::state::{Artifact, Registry};
use super::{PayloadFormat, Shared, lock};

/// The host name the sandbox's registry pretends to have, in `resource_url`s.
pub const REGISTRY_HOST: &str = "harbor.sandbox.local";

/// Mounts `/sandbox/...`.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/sandbox/push", web::post().to(push))
        .route("/sandbox/pull", web::post().to(pull))
        .route("/sandbox/delete", web::post().to(delete))
        .route("/sandbox/scan", web::post().to(scan))
        .route(
            "/sandbox/delete-repository",
            web::post().to(delete_repository),
        )
        .route("/sandbox/delete-project", web::post().to(delete_project))
        .route("/sandbox/project", web::post().to(update_project))
        .route("/sandbox/port/entities", web::get().to(entities))
        .route("/sandbox/port/requests", web::get().to(requests))
        .route("/sandbox/port/stats", web::get().to(stats))
        .route("/sandbox/harbor", web::get().to(registry))
        .route("/sandbox/webhooks", web::get().to(webhooks))
        .route("/", web::get().to(page));
}

/// The page a person drives the sandbox from: Harbor beside Port, buttons, the last webhooks.
/// Plain HTML and JavaScript, served from the binary.
async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("page.html"))
}

/// How many of the last webhooks `/sandbox/webhooks` keeps.
const WEBHOOKS_KEPT: usize = 20;

/// The last webhooks sent and what the ingest answered, newest first.
async fn webhooks(shared: web::Data<Shared>) -> HttpResponse {
    let sent = lock(&shared.webhooks);
    HttpResponse::Ok().json(json!({"webhooks": *sent}))
}

/// What to act on.
#[derive(Debug, Deserialize)]
pub struct Action {
    /// `project/name`
    pub repository: String,
    /// A tag (or a digest for pull, delete and scan).
    #[serde(default = "latest")]
    pub tag: String,
    /// For a push: the artifact to put the tag on (as `docker push` of an image Harbor has
    /// already); a new artifact when absent.
    #[serde(default)]
    pub digest: Option<String>,
}

fn latest() -> String {
    "latest".to_owned()
}

fn bad_request(message: impl Into<String>) -> HttpResponse {
    HttpResponse::BadRequest().json(json!({"error": "bad_request", "message": message.into()}))
}

/// Harbor's event types: (default name, CloudEvents name).
fn names(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "push" => ("PUSH_ARTIFACT", "harbor.artifact.pushed"),
        "pull" => ("PULL_ARTIFACT", "harbor.artifact.pulled"),
        "delete" => ("DELETE_ARTIFACT", "harbor.artifact.deleted"),
        _ => ("SCANNING_COMPLETED", "harbor.scan.completed"),
    }
}

async fn push(shared: web::Data<Shared>, action: web::Json<Action>) -> HttpResponse {
    let digest = action.digest.clone();
    act(
        &shared,
        &action,
        "push",
        move |registry, repo, tag| match digest {
            Some(digest) => registry.tag(repo, &digest, tag),
            None => Ok(registry.push(repo, tag)),
        },
    )
    .await
}

/// What a repository or project change names.
#[derive(Debug, Deserialize)]
pub struct Named {
    /// `project/name`, or the project's name.
    pub name: String,
    /// For a project: whether anyone may pull from it.
    #[serde(default)]
    pub public: Option<bool>,
    /// For a project: Harbor refuses the account its webhook policies (403), as it does a
    /// robot account without the `notification-policy` permissions.
    #[serde(default)]
    pub webhooks_forbidden: Option<bool>,
}

/// Deletes a repository with all its artifacts, as Harbor's UI does; Harbor announces it with
/// the deletion of one artifact.
async fn delete_repository(shared: web::Data<Shared>, named: web::Json<Named>) -> HttpResponse {
    let Ok(repository) = RepositoryName::parse(&named.name) else {
        return bad_request(format!("invalid repository name {:?}", named.name));
    };
    let last = lock(&shared.registry).delete_repository(&repository);
    match last {
        Some(artifact) => announce_deletion(&shared, &repository, &artifact).await,
        None => not_found(format!("repository {repository} not found")),
    }
}

/// Deletes a project with all its repositories (Harbor wants it emptied first, which this
/// does); announced with the deletion of one of its artifacts.
async fn delete_project(shared: web::Data<Shared>, named: web::Json<Named>) -> HttpResponse {
    let deleted = lock(&shared.registry).delete_project(&named.name);
    match deleted {
        Some((repository, artifact)) => {
            let Ok(repository) = RepositoryName::parse(&repository) else {
                return bad_request("the project held an invalid repository name");
            };
            announce_deletion(&shared, &repository, &artifact).await
        }
        None => not_found(format!("project {} not found, or empty", named.name)),
    }
}

/// Changes a project's settings; Harbor sends no webhook for that.
async fn update_project(shared: web::Data<Shared>, named: web::Json<Named>) -> HttpResponse {
    let mut registry = lock(&shared.registry);
    match registry.projects.get_mut(&named.name) {
        Some(project) => {
            if let Some(public) = named.public {
                project.public = public;
            }
            let mut policies = lock(&shared.policies);
            match named.webhooks_forbidden {
                Some(true) => policies.forbidden.insert(project.name.clone()),
                Some(false) => policies.forbidden.remove(&project.name),
                None => false,
            };
            let forbidden = policies.forbidden.contains(&project.name);
            HttpResponse::Ok().json(json!({
                "project": project.name, "public": project.public, "webhooks_forbidden": forbidden,
            }))
        }
        None => not_found(format!("project {} not found", named.name)),
    }
}

fn not_found(message: String) -> HttpResponse {
    HttpResponse::NotFound().json(json!({"error": "not_found", "message": message}))
}

async fn announce_deletion(
    shared: &Shared,
    repository: &RepositoryName,
    artifact: &Artifact,
) -> HttpResponse {
    let tag = artifact
        .tags
        .first()
        .cloned()
        .unwrap_or_else(|| artifact.digest.clone());
    let payload = webhook(
        shared.settings.payload_format,
        "delete",
        repository,
        &tag,
        artifact,
        None,
    );
    deliver(shared, payload, repository, artifact).await
}

async fn pull(shared: web::Data<Shared>, action: web::Json<Action>) -> HttpResponse {
    act(&shared, &action, "pull", Registry::pull).await
}

async fn delete(shared: web::Data<Shared>, action: web::Json<Action>) -> HttpResponse {
    act(&shared, &action, "delete", Registry::delete).await
}

async fn scan(shared: web::Data<Shared>, action: web::Json<Action>) -> HttpResponse {
    act(&shared, &action, "scan", Registry::scan).await
}

/// Changes the registry, then sends the webhook Harbor would send.
async fn act(
    shared: &Shared,
    action: &Action,
    kind: &str,
    change: impl FnOnce(&mut Registry, &RepositoryName, &str) -> Result<Artifact, String>,
) -> HttpResponse {
    let repository = match RepositoryName::parse(&action.repository) {
        Ok(repository) => repository,
        Err(error) => return bad_request(error.to_string()),
    };
    if action.tag.is_empty() || action.tag.len() > 128 || action.tag.contains(['/', ' ']) {
        return bad_request("tag must be 1-128 characters without '/' or spaces");
    }
    let (artifact, created) = {
        let mut registry = lock(&shared.registry);
        let artifact = match change(&mut registry, &repository, &action.tag) {
            Ok(artifact) => artifact,
            Err(message) => return not_found(message),
        };
        let created = registry
            .repositories
            .get(repository.full())
            .map(|r| r.created.clone());
        (artifact, created)
    };
    let payload = webhook(
        shared.settings.payload_format,
        kind,
        &repository,
        &action.tag,
        &artifact,
        created.as_deref(),
    );
    deliver(shared, payload, &repository, &artifact).await
}

/// Sends the webhook to the ingest, and answers with it and what the ingest said.
async fn deliver(
    shared: &Shared,
    payload: Value,
    repository: &RepositoryName,
    artifact: &Artifact,
) -> HttpResponse {
    let sent = shared
        .http
        .post(&shared.settings.webhook_url)
        .header("content-type", "application/json")
        .header("authorization", &shared.settings.webhook_auth)
        .json(&payload)
        .send()
        .await;
    let webhook = match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.json::<Value>().await.unwrap_or(Value::Null);
            json!({"url": shared.settings.webhook_url, "status": status, "answer": body})
        }
        Err(error) => json!({"url": shared.settings.webhook_url, "error": error.to_string()}),
    };
    let delivered = webhook["status"]
        .as_u64()
        .is_some_and(|s| (200..300).contains(&s));
    let failure = match (&webhook["status"], &webhook["error"]) {
        _ if delivered => None,
        (Value::Number(status), _) => Some(format!("the endpoint answered {status}")),
        (_, error) => Some(error.as_str().unwrap_or("not delivered").to_owned()),
    };
    let event_type = payload["type"].as_str().unwrap_or_default();
    lock(&shared.policies).record(repository.project(), event_type, failure.as_deref());
    let status = if delivered {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    let answer = json!({
        "event": payload["type"],
        "repository": repository.full(),
        "digest": artifact.digest,
        "tags": artifact.tags,
        "webhook": webhook,
    });
    {
        let mut sent = lock(&shared.webhooks);
        sent.push_front(answer.clone());
        sent.truncate(WEBHOOKS_KEPT);
    }
    HttpResponse::build(status).json(answer)
}

/// The webhook body Harbor sends for this change, in the configured format.
pub fn webhook(
    format: PayloadFormat,
    kind: &str,
    repository: &RepositoryName,
    tag: &str,
    artifact: &Artifact,
    repository_created: Option<&str>,
) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let date_created = repository_created
        .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(now, |d| d.as_secs());
    let mut resource = json!({
        "digest": artifact.digest,
        "tag": tag,
        "resource_url": format!("{REGISTRY_HOST}/{repository}:{tag}"),
    });
    let mut data = json!({
        "resources": [],
        "repository": {
            "date_created": date_created,
            "name": repository.name(),
            "namespace": repository.project(),
            "repo_full_name": repository.full(),
            "repo_type": "private",
        }
    });
    if kind == "scan" {
        resource["scan_overview"] = artifact.scan.clone().unwrap_or(Value::Null);
        data["scan"] = json!({"scan_type": "vulnerability"});
    }
    data["resources"] = json!([resource]);
    let (default_type, cloudevents_type) = names(kind);
    match format {
        PayloadFormat::Default => json!({
            "type": default_type,
            "occur_at": now,
            "operator": "admin",
            "event_data": data,
        }),
        PayloadFormat::Cloudevents => json!({
            "specversion": "1.0",
            "id": uuid::Uuid::new_v4().to_string(),
            "requestid": uuid::Uuid::new_v4().to_string(),
            "source": "/projects/1/webhook/policies/1",
            "type": cloudevents_type,
            "datacontenttype": "application/json",
            "time": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            "data": data,
            "operator": "admin",
        }),
    }
}

async fn entities(shared: web::Data<Shared>) -> HttpResponse {
    let store = lock(&shared.port);
    let mut all = serde_json::Map::new();
    for blueprint in store.blueprints.keys() {
        let entities: Vec<&Value> = store
            .entities
            .get(blueprint)
            .map(|e| e.values().collect())
            .unwrap_or_default();
        all.insert(blueprint.clone(), json!(entities));
    }
    HttpResponse::Ok().json(all)
}

async fn requests(shared: web::Data<Shared>) -> HttpResponse {
    let store = lock(&shared.port);
    HttpResponse::Ok().json(json!({"requests": store.requests}))
}

async fn registry(shared: web::Data<Shared>) -> HttpResponse {
    let registry = lock(&shared.registry);
    let repositories: Vec<Value> = registry
        .repositories
        .values()
        .map(|r| {
            let artifacts: Vec<Value> = registry
                .artifacts
                .get(&r.name)
                .into_iter()
                .flatten()
                .map(|a| json!({"digest": a.digest, "tags": a.tags, "pull_time": a.pull_time, "scanned": a.scan.is_some(), "scan": a.scan}))
                .collect();
            json!({"name": r.name, "pull_count": r.pull_count, "artifacts": artifacts})
        })
        .collect();
    let policies = lock(&shared.policies).shown();
    HttpResponse::Ok().json(json!({"repositories": repositories, "webhook_policies": policies}))
}

/// Port's requests by family and outcome, and the rate limits enforced.
async fn stats(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(lock(&shared.limits).stats())
}
