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
        .route(
            "/v1/blueprints/{bp}/entities/bulk",
            web::post().to(bulk_upsert),
        )
        .route("/v1/entities/search", web::post().to(search))
        .route(
            "/v1/blueprints/{bp}/entities/search",
            web::post().to(search_blueprint),
        )
        .route("/v1/blueprints/{bp}/entities", web::get().to(list))
        .route(
            "/v1/blueprints/{bp}/entities/{id:.*}",
            web::delete().to(recorded_delete),
        )
        .route(
            "/v1/blueprints/{bp}/bulk/entities/delete",
            web::post().to(bulk_delete),
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
    let mut store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    let identifier = body["identifier"].as_str().unwrap_or_default().to_owned();
    let response = match upsert(&mut store, &blueprint, &query, body.0) {
        Ok(entity) => HttpResponse::Created().json(json!({"ok": true, "entity": entity})),
        Err(refused) => refused.response(),
    };
    store.record("POST", &blueprint, &identifier, response.status().as_u16());
    response
}

/// `POST /v1/blueprints/{bp}/entities/bulk`: each entity upserted as alone; 207 with the
/// failed ones in `errors` when some fail.
async fn bulk_upsert(
    request: HttpRequest,
    shared: web::Data<Shared>,
    blueprint: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
    body: web::Json<Value>,
) -> HttpResponse {
    let mut store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    let Some(entities) = body["entities"]
        .as_array()
        .filter(|e| (1..=20).contains(&e.len()))
    else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "entities must hold 1 to 20 entities",
        );
    };
    let (mut created, mut errors) = (Vec::new(), Vec::new());
    for (index, entity) in entities.iter().enumerate() {
        let identifier = entity["identifier"].as_str().unwrap_or_default().to_owned();
        let status = match upsert(&mut store, &blueprint, &query, entity.clone()) {
            Ok(_) => {
                created.push(json!({"created": true, "identifier": identifier, "index": index}));
                StatusCode::CREATED
            }
            Err(refused) => {
                errors.push(json!({
                    "identifier": identifier, "index": index, "statusCode": refused.status.as_u16(),
                    "error": refused.code, "message": refused.message,
                }));
                refused.status
            }
        };
        store.record("BULK", &blueprint, &identifier, status.as_u16());
    }
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    HttpResponse::build(status).json(json!({"ok": true, "entities": created, "errors": errors}))
}

/// Why Port refused an entity.
struct Refused {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refused {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn response(&self) -> HttpResponse {
        error(self.status, self.code, self.message.clone())
    }
}

fn upsert(
    store: &mut PortStore,
    blueprint: &str,
    query: &HashMap<String, String>,
    entity: Value,
) -> Result<Value, Refused> {
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true");
    let invalid = |message: String| {
        Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    };
    let Some(schema) = store.blueprints.get(blueprint).cloned() else {
        return Err(Refused::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("blueprint {blueprint} not found"),
        ));
    };
    let Some(id) = entity["identifier"].as_str().map(str::to_owned) else {
        return Err(invalid("identifier must be a string".into()));
    };
    if !valid_identifier(&id) {
        return Err(invalid(format!(
            "identifier {id:?} does not match Port's pattern"
        )));
    }
    let empty = Map::new();
    let properties = entity["properties"].as_object().unwrap_or(&empty);
    let relations = entity["relations"].as_object().unwrap_or(&empty);
    for key in properties.keys() {
        if schema["schema"]["properties"].get(key).is_none() {
            return Err(invalid(format!("{blueprint} has no property {key:?}")));
        }
    }
    for (key, target_id) in relations {
        let Some(target) = schema["relations"][key]["target"].as_str() else {
            return Err(invalid(format!("{blueprint} has no relation {key:?}")));
        };
        let Some(target_id) = target_id.as_str() else {
            continue;
        };
        let exists = store
            .entities
            .get(target)
            .is_some_and(|e| e.contains_key(target_id));
        if !exists && !flag("create_missing_related_entities") {
            return Err(Refused::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("related entity {target}/{target_id} not found"),
            ));
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
            return Err(Refused::new(
                StatusCode::CONFLICT,
                "identifier_taken",
                format!("entity {id} exists"),
            ));
        }
        _ => entity,
    };
    entities.insert(id, merged.clone());
    Ok(merged)
}

/// `POST /v1/entities/search`: the entities the query's rules match, with the fields `include`
/// names (all of them without it). Rules: `$blueprint`, `$identifier` and properties, with
/// `=`, `!=`, `beginsWith`, `contains`, `containsAny` and `in`, and nested `and` / `or`.
async fn search(
    request: HttpRequest,
    shared: web::Data<Shared>,
    body: web::Json<Value>,
) -> HttpResponse {
    let store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    let include: Vec<String> = url::form_urlencoded::parse(request.query_string().as_bytes())
        .filter(|(key, _)| key == "include")
        .map(|(_, value)| value.into_owned())
        .collect();
    let mut found = Vec::new();
    for (blueprint, entities) in &store.entities {
        for entity in entities.values() {
            match matches(&body, blueprint, entity) {
                Ok(true) => found.push(included(entity, blueprint, &include)),
                Ok(false) => {}
                Err(message) => {
                    return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message);
                }
            }
        }
    }
    HttpResponse::Ok().json(json!({"ok": true, "entities": found}))
}

/// `POST /v1/blueprints/{bp}/entities/search`: the blueprint's entities the body's `query`
/// matches, `limit` (at most 1000) a page, in identifier order from the body's `from` (the
/// previous page's `next`, absent on the last page), with the fields `include` names.
async fn search_blueprint(
    request: HttpRequest,
    shared: web::Data<Shared>,
    blueprint: web::Path<String>,
    body: web::Json<Value>,
) -> HttpResponse {
    let store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    let limit = body["limit"].as_u64().unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "limit must be 1 to 1000",
        );
    }
    let include: Vec<String> = body["include"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let from = body["from"].as_str().unwrap_or_default();
    let everything = json!({"combinator": "and", "rules": []});
    let query = body.get("query").unwrap_or(&everything);
    let mut page = Vec::new();
    let mut next = None;
    let entities = store.entities.get(blueprint.as_str());
    for (id, entity) in entities.into_iter().flatten() {
        if id.as_str() < from {
            continue;
        }
        match matches(query, &blueprint, entity) {
            Ok(false) => {}
            Ok(true) if page.len() as u64 == limit => {
                next = Some(id.clone());
                break;
            }
            Ok(true) => page.push(included(entity, &blueprint, &include)),
            Err(message) => {
                return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message);
            }
        }
    }
    let mut answer = json!({"ok": true, "entities": page});
    if let Some(next) = next {
        answer["next"] = json!(next);
    }
    HttpResponse::Ok().json(answer)
}

/// Whether a search query matches an entity of `blueprint` (also used by the fake Port).
pub fn matches(query: &Value, blueprint: &str, entity: &Value) -> Result<bool, String> {
    let rules = query["rules"].as_array().ok_or("a query needs rules")?;
    let mut results = Vec::new();
    for rule in rules {
        results.push(if rule.get("combinator").is_some() {
            matches(rule, blueprint, entity)?
        } else {
            rule_matches(rule, blueprint, entity)?
        });
    }
    match query["combinator"].as_str() {
        Some("and") => Ok(results.iter().all(|r| *r)),
        Some("or") => Ok(results.iter().any(|r| *r)),
        other => Err(format!("unknown combinator {other:?}")),
    }
}

fn rule_matches(rule: &Value, blueprint: &str, entity: &Value) -> Result<bool, String> {
    let property = rule["property"].as_str().ok_or("a rule needs a property")?;
    let actual = match property {
        "$blueprint" => json!(blueprint),
        "$identifier" => entity["identifier"].clone(),
        "$title" => entity["title"].clone(),
        name => entity["properties"][name].clone(),
    };
    let value = &rule["value"];
    let text = |v: &Value| v.as_str().map(str::to_owned);
    Ok(match rule["operator"].as_str() {
        Some("=") => &actual == value,
        Some("!=") => &actual != value,
        Some("beginsWith") => text(&actual)
            .zip(text(value))
            .is_some_and(|(a, v)| a.starts_with(&v)),
        Some("contains") => match &actual {
            Value::Array(items) => items.contains(value),
            Value::String(a) => text(value).is_some_and(|v| a.contains(&v)),
            _ => false,
        },
        Some("containsAny") => {
            let wanted = value.as_array().ok_or("containsAny takes an array")?;
            actual
                .as_array()
                .is_some_and(|items| items.iter().any(|i| wanted.contains(i)))
        }
        Some("in") => value
            .as_array()
            .ok_or("in takes an array")?
            .contains(&actual),
        other => {
            return Err(format!(
                "operator {other:?} is not supported by the sandbox"
            ));
        }
    })
}

/// The entity with only the fields named (`identifier`, `properties.digest`, ...).
pub fn included(entity: &Value, blueprint: &str, include: &[String]) -> Value {
    let mut full = entity.clone();
    full["blueprint"] = json!(blueprint);
    if include.is_empty() {
        return full;
    }
    let mut out = json!({});
    for path in include {
        match path.split_once('.') {
            Some((section, field)) => {
                if let Some(value) = full[section].get(field) {
                    out[section][field] = value.clone();
                }
            }
            None => {
                if let Some(value) = full.get(path.as_str()) {
                    out[path.as_str()] = value.clone();
                }
            }
        }
    }
    out
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

/// `POST /v1/blueprints/{bp}/bulk/entities/delete`: 1 to 100 identifiers, all deleted or, when
/// one does not exist, none (404); each remembered for `GET /sandbox/port/requests`.
async fn bulk_delete(
    request: HttpRequest,
    shared: web::Data<Shared>,
    blueprint: web::Path<String>,
    body: web::Json<Value>,
) -> HttpResponse {
    let mut store = lock(&shared.port);
    if !authorized(&request, &store) {
        return unauthorized();
    }
    let Some(ids) = body["entities"]
        .as_array()
        .filter(|ids| (1..=100).contains(&ids.len()))
        .and_then(|ids| {
            ids.iter()
                .map(|id| id.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
    else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "entities must hold 1 to 100 identifiers",
        );
    };
    let held = store.entities.entry(blueprint.to_string()).or_default();
    let missing = ids.iter().find(|id| !held.contains_key(*id)).cloned();
    if missing.is_none() {
        for id in &ids {
            held.remove(id);
        }
    }
    let status = if missing.is_some() { 404 } else { 200 };
    for id in &ids {
        store.record("DELETE", &blueprint, id, status);
    }
    if let Some(id) = missing {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("entity {blueprint}/{id} not found"),
        );
    }
    HttpResponse::Ok().json(json!({"ok": true, "deletedEntities": ids}))
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
