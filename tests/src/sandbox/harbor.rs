//! The fake Harbor API: what the worker reads (and the webhook policies it writes), shaped as
//! Harbor v2.15 answers.

use actix_web::{HttpRequest, HttpResponse, web};
use base64::prelude::{BASE64_STANDARD, Engine as _};
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};

use super::state::{Artifact, Project, Registry, Repository};
use super::{Shared, lock};

/// Mounts `/api/v2.0/...`.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/v2.0/projects", web::head().to(head_project))
        .route("/api/v2.0/{tail:.*}", web::get().to(get))
        .route("/api/v2.0/{tail:.*}", web::post().to(write))
        .route("/api/v2.0/{tail:.*}", web::put().to(write))
        .route("/api/v2.0/{tail:.*}", web::delete().to(write));
}

fn errors(status: actix_web::http::StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(("x-request-id", uuid::Uuid::new_v4().to_string()))
        .json(json!({"errors": [{"code": code, "message": message}]}))
}

fn not_found(message: &str) -> HttpResponse {
    errors(actix_web::http::StatusCode::NOT_FOUND, "NOT_FOUND", message)
}

/// What Harbor answers for anything in a project it does not have: 404 to a system
/// administrator (the account `admin`), 403 to any other account (a robot account): Harbor
/// checks the account's permission in the project first, and there is none.
fn no_project(shared: &Shared, project: &str) -> HttpResponse {
    match shared.settings.harbor_username == "admin" {
        true => not_found(&format!("project {project} not found")),
        false => errors(
            actix_web::http::StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "forbidden",
        ),
    }
}

fn unauthorized() -> HttpResponse {
    errors(
        actix_web::http::StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "unauthorized",
    )
}

fn authorized(request: &HttpRequest, shared: &Shared) -> bool {
    let expected = format!(
        "{}:{}",
        shared.settings.harbor_username, shared.settings.harbor_password
    );
    request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| BASE64_STANDARD.decode(b64).ok())
        .is_some_and(|decoded| decoded == expected.as_bytes())
}

/// A repository path segment as Harbor reads it: decoded twice, and a `/` after the first
/// decoding means the client encoded it only once (Harbor would not find the route).
fn repository_segment(raw: &str) -> Option<String> {
    let once = percent_decode_str(raw).decode_utf8().ok()?;
    if once.contains('/') {
        return None;
    }
    Some(percent_decode_str(&once).decode_utf8().ok()?.into_owned())
}

/// `HEAD /projects?project_name=`: whether a project exists, to any account; the request's
/// `X-Request-ID` comes back (one of Harbor's own when it sent none), as from Harbor.
async fn head_project(request: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let name = query(&request).remove("project_name");
    let status = match name {
        _ if !authorized(&request, &shared) => actix_web::http::StatusCode::UNAUTHORIZED,
        None => actix_web::http::StatusCode::BAD_REQUEST,
        Some(name) if lock(&shared.registry).projects.contains_key(&name) => {
            actix_web::http::StatusCode::OK
        }
        Some(_) => actix_web::http::StatusCode::NOT_FOUND,
    };
    HttpResponse::build(status)
        .insert_header(("x-request-id", id))
        .finish()
}

/// A request's query parameters (none when it cannot be read).
fn query(request: &HttpRequest) -> std::collections::HashMap<String, String> {
    web::Query::from_query(request.query_string())
        .map(web::Query::into_inner)
        .unwrap_or_default()
}

async fn get(request: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let latency = shared.settings.harbor_latency_ms;
    if latency > 0 {
        let wait = rand::random_range(0..=latency);
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    }
    answer(&request, &shared)
}

fn answer(request: &HttpRequest, shared: &Shared) -> HttpResponse {
    if !authorized(request, shared) {
        return unauthorized();
    }
    let raw_path = request.uri().path().trim_start_matches("/api/v2.0/");
    let segments: Vec<&str> = raw_path.split('/').collect();
    let query = query(request);
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true");
    let registry = lock(&shared.registry);
    if let ["projects", project, ..] = segments.as_slice() {
        let project = percent_decode_str(project).decode_utf8_lossy();
        if !registry.projects.contains_key(project.as_ref()) {
            return no_project(shared, &project);
        }
    }
    let page = |items: Vec<Value>| paginate(items, &query);
    match segments.as_slice() {
        ["projects"] => page(
            registry
                .projects
                .values()
                .map(|p| project_json(&registry, p))
                .collect(),
        ),
        ["projects", project, "repositories"] => page(
            registry
                .repositories
                .values()
                .filter(|r| r.name.split_once('/').is_some_and(|(p, _)| p == *project))
                .map(|r| repository_json(&registry, r))
                .collect(),
        ),
        ["projects", project, "repositories", repo, "artifacts"] => {
            let Some(name) = repository_segment(repo) else {
                return not_found("no route");
            };
            let full = format!("{project}/{name}");
            let Some(repository) = registry.repositories.get(&full) else {
                return not_found(&format!("repository {full} not found"));
            };
            let artifacts = registry.artifacts.get(&full).into_iter().flatten();
            page(
                artifacts
                    .map(|a| {
                        artifact_json(repository, a, flag("with_tag"), flag("with_scan_overview"))
                    })
                    .collect(),
            )
        }
        ["projects", name] => {
            // It exists: checked above.
            let name = percent_decode_str(name).decode_utf8_lossy();
            HttpResponse::Ok().json(project_json(&registry, &registry.projects[name.as_ref()]))
        }
        ["projects", project, "repositories", repo] => {
            let Some(name) = repository_segment(repo) else {
                return not_found("no route");
            };
            let full = format!("{project}/{name}");
            match registry.repositories.get(&full) {
                Some(repository) => HttpResponse::Ok().json(repository_json(&registry, repository)),
                None => not_found(&format!("repository {full} not found")),
            }
        }
        [
            "projects",
            project,
            "repositories",
            repo,
            "artifacts",
            reference,
        ] => {
            let Some(name) = repository_segment(repo) else {
                return not_found("no route");
            };
            let full = format!("{project}/{name}");
            let reference = percent_decode_str(reference).decode_utf8_lossy();
            match (
                registry.repositories.get(&full),
                registry.find(&full, &reference),
            ) {
                (Some(repository), Some(artifact)) => HttpResponse::Ok().json(artifact_json(
                    repository,
                    artifact,
                    flag("with_tag") || !query.contains_key("with_tag"),
                    flag("with_scan_overview"),
                )),
                _ => not_found(&format!("artifact {full}:{reference} not found")),
            }
        }
        ["projects", project, "webhook", "policies"] => {
            let project = percent_decode_str(project).decode_utf8_lossy();
            match lock(&shared.policies).list(&project) {
                Ok(all) => page(all),
                Err(answer) => reply(answer),
            }
        }
        ["projects", project, "webhook", "policies", id, "executions"] => {
            let project = percent_decode_str(project).decode_utf8_lossy();
            let id = id.parse().unwrap_or(-1);
            match lock(&shared.policies).executions(&project, id) {
                Ok(all) => page(all),
                Err(answer) => reply(answer),
            }
        }
        [
            "projects",
            project,
            "webhook",
            "policies",
            id,
            "executions",
            execution,
            "tasks",
        ] => {
            let project = percent_decode_str(project).decode_utf8_lossy();
            let (id, execution) = (id.parse().unwrap_or(-1), execution.parse().unwrap_or(-1));
            match lock(&shared.policies).tasks(&project, id, execution) {
                Ok(all) => page(all),
                Err(answer) => reply(answer),
            }
        }
        _ => not_found("no such endpoint in the sandbox"),
    }
}

fn reply((status, body): super::policies::Answer) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    if body.is_null() {
        HttpResponse::build(status).finish()
    } else {
        HttpResponse::build(status).json(body)
    }
}

/// `POST`, `PUT` and `DELETE`: the webhook policies of a project, the only thing the worker
/// writes to Harbor.
async fn write(request: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    if !authorized(&request, &shared) {
        return unauthorized();
    }
    let raw_path = request.uri().path().trim_start_matches("/api/v2.0/");
    let segments: Vec<&str> = raw_path.split('/').collect();
    let ["projects", project, "webhook", "policies", rest @ ..] = segments.as_slice() else {
        return not_found("no such endpoint in the sandbox");
    };
    let project = percent_decode_str(project).decode_utf8_lossy().into_owned();
    let Some(project_id) = lock(&shared.registry).projects.get(&project).map(|p| p.id) else {
        return no_project(&shared, &project);
    };
    let parsed = || serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    let mut policies = lock(&shared.policies);
    let method = request.method().as_str();
    reply(match (method, rest) {
        ("POST", []) => policies.create(&project, project_id, &parsed()),
        ("PUT", [id]) => policies.update(&project, id.parse().unwrap_or(-1), &parsed()),
        ("DELETE", [id]) => policies.delete(&project, id.parse().unwrap_or(-1)),
        _ => (
            405,
            json!({"errors": [{"code": "METHOD_NOT_ALLOWED", "message": "not allowed"}]}),
        ),
    })
}

/// One page of a list, as Harbor pages: `page` from 1, `page_size` 10 by default and at most
/// 100, the total in `X-Total-Count`.
fn paginate(items: Vec<Value>, query: &std::collections::HashMap<String, String>) -> HttpResponse {
    let number = |key: &str, default: usize| {
        query
            .get(key)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let page = number("page", 1).max(1);
    let size = number("page_size", 10).clamp(1, 100);
    let total = items.len();
    let slice: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * size)
        .take(size)
        .collect();
    HttpResponse::Ok()
        .insert_header(("x-total-count", total.to_string()))
        .json(slice)
}

/// `GET /projects/{name}`
pub fn project_json(registry: &Registry, project: &Project) -> Value {
    let repo_count = registry
        .repositories
        .values()
        .filter(|r| r.project_id == project.id)
        .count();
    json!({
        "project_id": project.id, "owner_id": 1, "name": project.name, "registry_id": null,
        "creation_time": project.created, "update_time": project.created, "deleted": false,
        "owner_name": "admin", "togglable": true, "current_user_role_id": 1,
        "current_user_role_ids": [1], "repo_count": repo_count,
        "metadata": {"public": project.public.to_string(), "auto_scan": "true"},
    })
}

/// `GET /projects/{p}/repositories/{r}`
pub fn repository_json(registry: &Registry, repository: &Repository) -> Value {
    let artifact_count = registry.artifacts.get(&repository.name).map_or(0, Vec::len);
    json!({
        "id": repository.id, "project_id": repository.project_id, "name": repository.name,
        "description": "", "artifact_count": artifact_count, "pull_count": repository.pull_count,
        "creation_time": repository.created, "update_time": repository.updated,
    })
}

/// `GET .../artifacts/{reference}`
pub fn artifact_json(
    repository: &Repository,
    artifact: &Artifact,
    with_tag: bool,
    with_scan: bool,
) -> Value {
    let tags: Vec<Value> = artifact
        .tags
        .iter()
        .enumerate()
        .map(|(i, tag)| json!({
            "id": artifact.id * 100 + i as i64, "repository_id": repository.id, "artifact_id": artifact.id,
            "name": tag, "push_time": artifact.push_time,
            "pull_time": artifact.pull_time.as_deref().unwrap_or("0001-01-01T00:00:00.000Z"),
            "immutable": false,
        }))
        .collect();
    json!({
        "id": artifact.id, "type": "IMAGE",
        "media_type": "application/vnd.oci.image.config.v1+json",
        "manifest_media_type": "application/vnd.oci.image.manifest.v1+json",
        "project_id": repository.project_id, "repository_id": repository.id,
        "repository_name": repository.name, "digest": artifact.digest, "size": artifact.size,
        "push_time": artifact.push_time,
        "pull_time": artifact.pull_time.as_deref().unwrap_or("0001-01-01T00:00:00.000Z"),
        "extra_attrs": {"architecture": "amd64", "os": "linux"},
        "annotations": null, "references": null,
        "tags": if with_tag { Value::Array(tags) } else { Value::Null },
        "labels": null,
        "scan_overview": if with_scan { artifact.scan.clone().unwrap_or(Value::Null) } else { Value::Null },
        "accessories": null,
    })
}
