//! The fake Port API: tokens, blueprints and entities, with Port's checks.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::state::PortStore;
use super::{Shared, lock};

/// Mounts `/v1/...`.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/v1/auth/access_token", web::post().to(access_token))
        .route("/v1/blueprints", web::post().to(create_blueprint))
        .route("/v1/blueprints/{id}", web::patch().to(update_blueprint))
        .route("/v1/blueprints/{id}", web::get().to(get_blueprint))
        .route(
            "/v1/blueprints/{bp}/entities",
            web::post().to(recorded_upsert),
        )
        .route("/v1/blueprints/{bp}/entities", web::get().to(list))
        .route(
            "/v1/blueprints/{bp}/entities/{id:.*}",
            web::delete().to(recorded_delete),
        );
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({"ok": false, "error": code, "message": message.into()}))
}

/// The request's token is one this Port handed out.
fn authorized(request: &HttpRequest, store: &PortStore) -> bool {
    request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| store.tokens.contains(token))
}

fn unauthorized() -> HttpResponse {
    error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "invalid or missing access token",
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Credentials {
    client_id: String,
    client_secret: String,
}

async fn access_token(shared: web::Data<Shared>, body: web::Json<Credentials>) -> HttpResponse {
    let settings = &shared.settings;
    if body.client_id != settings.port_client_id
        || body.client_secret != settings.port_client_secret
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid client id or secret",
        );
    }
    let token = format!("sandbox-{}", uuid::Uuid::new_v4().simple());
    lock(&shared.port).tokens.insert(token.clone());
    HttpResponse::Ok()
        .json(json!({"ok": true, "accessToken": token, "expiresIn": 10800, "tokenType": "Bearer"}))
}

async fn create_blueprint(
    request: HttpRequest,
    shared: web::Data<Shared>,
    body: web::Json<Value>,
) -> HttpResponse {
    let mut store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    let Some(id) = body["identifier"].as_str().map(str::to_owned) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "identifier is required",
        );
    };
    if store.blueprints.contains_key(&id) {
        return error(
            StatusCode::CONFLICT,
            "identifier_taken",
            format!("blueprint {id} exists"),
        );
    }
    store.blueprints.insert(id, body.0.clone());
    HttpResponse::Created().json(json!({"ok": true, "blueprint": body.0}))
}

async fn update_blueprint(
    request: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> HttpResponse {
    let mut store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    let Some(existing) = store.blueprints.get_mut(id.as_str()) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("blueprint {id} not found"),
        );
    };
    if let (Value::Object(existing), Value::Object(update)) = (existing, body.0) {
        existing.extend(update);
    }
    HttpResponse::Ok().json(json!({"ok": true, "blueprint": store.blueprints[id.as_str()]}))
}

async fn get_blueprint(
    request: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
) -> HttpResponse {
    let store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    match store.blueprints.get(id.as_str()) {
        Some(blueprint) => HttpResponse::Ok().json(json!({"ok": true, "blueprint": blueprint})),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("blueprint {id} not found"),
        ),
    }
}

/// Port's identifier rule: `^(?!\.{1,2}$)[\p{L}0-9@_.+:\\/=-]+$`, at most 1000 characters.
pub fn valid_identifier(id: &str) -> bool {
    !id.is_empty()
        && id.chars().count() <= 1000
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_alphabetic() || c.is_ascii_digit() || "@_.+:\\/=-".contains(c))
}

/// Upserts, and remembers the write for `GET /sandbox/port/requests`.
async fn recorded_upsert(
    request: HttpRequest,
    shared: web::Data<Shared>,
    blueprint: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
    body: web::Json<Value>,
) -> HttpResponse {
    let identifier = body["identifier"].as_str().unwrap_or_default().to_owned();
    let response = upsert(&request, &shared, &blueprint, &query, body.0);
    lock(&shared.port).record("POST", &blueprint, &identifier, response.status().as_u16());
    response
}

fn upsert(
    request: &HttpRequest,
    shared: &Shared,
    blueprint: &str,
    query: &HashMap<String, String>,
    entity: Value,
) -> HttpResponse {
    let mut store = lock(&shared.port);
    if !authorized(request, &store) {
        return unauthorized();
    }
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true");
    let Some(schema) = store.blueprints.get(blueprint).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("blueprint {blueprint} not found"),
        );
    };
    let Some(id) = entity["identifier"].as_str().map(str::to_owned) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "identifier must be a string",
        );
    };
    if !valid_identifier(&id) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("identifier {id:?} does not match Port's pattern"),
        );
    }
    let empty = Map::new();
    let properties = entity["properties"].as_object().unwrap_or(&empty);
    let relations = entity["relations"].as_object().unwrap_or(&empty);
    for key in properties.keys() {
        if schema["schema"]["properties"].get(key).is_none() {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("{blueprint} has no property {key:?}"),
            );
        }
    }
    for (key, target_id) in relations {
        let Some(target) = schema["relations"][key]["target"].as_str() else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("{blueprint} has no relation {key:?}"),
            );
        };
        let Some(target_id) = target_id.as_str() else {
            continue;
        };
        let exists = store
            .entities
            .get(target)
            .is_some_and(|e| e.contains_key(target_id));
        if !exists && !flag("create_missing_related_entities") {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("related entity {target}/{target_id} not found"),
            );
        }
        if !exists {
            store.entities.entry(target.to_owned()).or_default().insert(
                target_id.to_owned(),
                json!({"identifier": target_id, "title": target_id, "properties": {}, "relations": {}}),
            );
        }
    }
    let entities = store.entities.entry(blueprint.to_owned()).or_default();
    let merged = match entities.get(&id) {
        Some(existing) if flag("upsert") && flag("merge") => merge(existing, &entity),
        Some(_) if !flag("upsert") => {
            return error(
                StatusCode::CONFLICT,
                "identifier_taken",
                format!("entity {id} exists"),
            );
        }
        _ => entity,
    };
    entities.insert(id, merged.clone());
    HttpResponse::Created().json(json!({"ok": true, "entity": merged}))
}

/// `merge=true`: the given properties and relations replace those of the same name; the rest
/// stay.
fn merge(existing: &Value, update: &Value) -> Value {
    let mut merged = existing.clone();
    for section in ["properties", "relations"] {
        if let (Some(into), Some(from)) =
            (merged[section].as_object_mut(), update[section].as_object())
        {
            into.extend(from.clone());
        }
    }
    if let Some(title) = update.get("title") {
        merged["title"] = title.clone();
    }
    merged
}

async fn list(
    request: HttpRequest,
    shared: web::Data<Shared>,
    blueprint: web::Path<String>,
) -> HttpResponse {
    let store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    let entities: Vec<&Value> = store
        .entities
        .get(blueprint.as_str())
        .map(|e| e.values().collect())
        .unwrap_or_default();
    HttpResponse::Ok().json(json!({"ok": true, "entities": entities}))
}

/// Deletes, and remembers the write for `GET /sandbox/port/requests`.
async fn recorded_delete(request: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    // The raw path: the identifier is one URL-encoded segment (`harbor%2Falpine@sha256:…`).
    let segments: Vec<&str> = request.uri().path().split('/').collect();
    let (Some(blueprint), Some(raw_id)) = (segments.get(3), segments.get(5)) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such route");
    };
    let id = percent_decode_str(raw_id).decode_utf8_lossy().into_owned();
    let response = delete(&request, &shared, blueprint, &id);
    lock(&shared.port).record("DELETE", blueprint, &id, response.status().as_u16());
    response
}

fn delete(request: &HttpRequest, shared: &Shared, blueprint: &str, id: &str) -> HttpResponse {
    let mut store = lock(&shared.port);
    if !authorized(request, &store) {
        return unauthorized();
    }
    match store.entities.get_mut(blueprint).and_then(|e| e.remove(id)) {
        Some(_) => HttpResponse::Ok().json(json!({"ok": true})),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("entity {blueprint}/{id} not found"),
        ),
    }
}
