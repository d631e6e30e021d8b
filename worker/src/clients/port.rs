//! The Port API: access token, entity upsert and delete, blueprint create-or-update.
//!
//! The access token is fetched with the client id and secret, shared by every call, refreshed
//! before it expires, and once more if Port answers 401 (a token revoked early).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{debug, instrument};
use url::Url;

use super::{CallError, Http, is_transient, success, transport_error};
use crate::entities::Entity;

mod budget;

pub use budget::{Family, PortBudget};

/// The default of `PORT_RATE_SHARE`: half of each of Port's limits, the rest left to the other
/// integrations of the organisation.
pub const DEFAULT_RATE_SHARE: f64 = 0.5;

/// The most entities Port's bulk upsert takes in one request.
pub const BULK_LIMIT: usize = 20;

/// The most entities Port's bulk delete takes in one request.
pub const DELETE_LIMIT: usize = 100;

/// Entities per page of a blueprint's search (Port's most).
pub const PAGE: usize = 1000;

struct Token {
    value: SecretString,
    refresh_at: Instant,
}

/// A Port API client.
pub struct PortClient {
    http: Http,
    base: Url,
    client_id: String,
    client_secret: SecretString,
    token: Mutex<Option<Token>>,
    refreshing: tokio::sync::Mutex<()>,
    /// `create_missing_related_entities` on upserts.
    create_missing_related: bool,
    /// `delete_dependents` on deletes.
    delete_dependents: bool,
    /// What it may spend of Port's rate limits.
    budget: Arc<PortBudget>,
}

/// What [`PortClient::apply_blueprint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The blueprint did not exist.
    Created,
    /// The blueprint existed and was updated (merged).
    Updated,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccessToken {
    access_token: String,
    expires_in: f64,
}

impl PortClient {
    /// Whether upserts create missing related entities (the mapping's
    /// `createMissingRelatedEntities`; on by default) and deletes take the entities that depend
    /// on the deleted one with them (`deleteDependentEntities`; off by default).
    pub fn with_options(mut self, create_missing_related: bool, delete_dependents: bool) -> Self {
        self.create_missing_related = create_missing_related;
        self.delete_dependents = delete_dependents;
        self
    }

    /// `base` is the API's address (`https://api.port.io`).
    pub fn new(http: Http, base: Url, client_id: String, client_secret: SecretString) -> Self {
        Self {
            http,
            base,
            client_id,
            client_secret,
            token: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            create_missing_related: true,
            delete_dependents: false,
            budget: Arc::new(PortBudget::new(DEFAULT_RATE_SHARE)),
        }
    }

    /// What it spends of Port's rate limits.
    pub fn budget(&self) -> &PortBudget {
        &self.budget
    }

    /// Spends `budget` (shared by every Port client of the process: Port limits the
    /// organisation, not a client).
    pub fn with_budget(mut self, budget: Arc<PortBudget>) -> Self {
        self.budget = budget;
        self
    }

    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("v1").extend(segments);
        }
        url
    }

    fn cached_token(&self) -> Option<SecretString> {
        let guard = self.token.lock().ok()?;
        guard
            .as_ref()
            .filter(|token| Instant::now() < token.refresh_at)
            .map(|token| token.value.clone())
    }

    /// The shared token, fetching a new one when there is none or it is about to expire. One
    /// caller fetches; the others wait for it.
    async fn token(&self) -> Result<SecretString, CallError> {
        if let Some(token) = self.cached_token() {
            return Ok(token);
        }
        let _refreshing = self.refreshing.lock().await;
        if let Some(token) = self.cached_token() {
            return Ok(token);
        }
        let what = "Port POST /v1/auth/access_token";
        self.budget.admit(Family::Other).await;
        let response = self
            .http
            .client
            .post(self.endpoint(&["auth", "access_token"]))
            .json(&json!({
                "clientId": self.client_id,
                "clientSecret": self.client_secret.expose_secret(),
            }))
            .send()
            .await
            .map_err(|error| transport_error(what, &error))?;
        self.budget
            .observe(Family::Other, response.status(), response.headers());
        if matches!(
            response.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            return Err(CallError::permanent(format!(
                "{what} answered {}: check PORT_CLIENT_ID and PORT_CLIENT_SECRET",
                response.status()
            )));
        }
        let fresh: AccessToken = self.http.json(what, success(what, response).await?).await?;
        // Refresh a minute early, or halfway through a short lifetime.
        let lifetime = Duration::from_secs_f64(fresh.expires_in.clamp(0.0, 86_400.0 * 30.0));
        let early = Duration::from_secs(60).min(lifetime / 2);
        let value = SecretString::from(fresh.access_token);
        if let Ok(mut guard) = self.token.lock() {
            *guard = Some(Token {
                value: value.clone(),
                refresh_at: Instant::now() + lifetime - early,
            });
        }
        debug!(expires_in = fresh.expires_in, "Fetched a Port access token");
        Ok(value)
    }

    /// Drops the cached token if it is still `stale`, so the next call fetches a new one.
    fn forget(&self, stale: &SecretString) {
        if let Ok(mut guard) = self.token.lock()
            && guard
                .as_ref()
                .is_some_and(|t| t.value.expose_secret() == stale.expose_secret())
        {
            *guard = None;
        }
    }

    /// Sends an authenticated request of `family` once the budget admits it; on 401, fetches a
    /// new token and sends it once more. A 429 is not an answer: the family pauses until Port's
    /// reset and the request is sent again (the consumer timeout bounds the wait of an event).
    async fn send(
        &self,
        what: &str,
        family: Family,
        request: impl Fn(&str) -> RequestBuilder,
    ) -> Result<Response, CallError> {
        self.send_admitted(what, family, false, request).await
    }

    /// [`Self::send`], the first attempt already `admitted` by the budget or not.
    async fn send_admitted(
        &self,
        what: &str,
        family: Family,
        mut admitted: bool,
        request: impl Fn(&str) -> RequestBuilder,
    ) -> Result<Response, CallError> {
        loop {
            if !std::mem::take(&mut admitted) {
                self.budget.admit(family).await;
            }
            let response = self.send_once(what, &request).await?;
            if !self
                .budget
                .observe(family, response.status(), response.headers())
            {
                return Ok(response);
            }
            debug!(what, "Port answered 429: the family waits for its reset");
        }
    }

    async fn send_once(
        &self,
        what: &str,
        request: &impl Fn(&str) -> RequestBuilder,
    ) -> Result<Response, CallError> {
        let token = self.token().await?;
        let response = request(token.expose_secret())
            .send()
            .await
            .map_err(|error| transport_error(what, &error))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        self.forget(&token);
        let token = self.token().await?;
        request(token.expose_secret())
            .send()
            .await
            .map_err(|error| transport_error(what, &error))
    }

    /// [`Self::send_admitted`] of a `POST` of `body` (JSON) to `url`.
    async fn post(
        &self,
        what: &str,
        family: Family,
        admitted: bool,
        url: &Url,
        body: &(impl serde::Serialize + ?Sized),
    ) -> Result<Response, CallError> {
        self.send_admitted(what, family, admitted, |token| {
            self.http
                .client
                .post(url.clone())
                .bearer_auth(token)
                .json(body)
        })
        .await
    }

    /// An upsert endpoint with the upsert options: create or merge, and whether to create
    /// missing related entities.
    fn upsert_url(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint(segments);
        url.query_pairs_mut()
            .append_pair("upsert", "true")
            .append_pair("merge", "true")
            .append_pair(
                "create_missing_related_entities",
                if self.create_missing_related {
                    "true"
                } else {
                    "false"
                },
            );
        url
    }

    /// Creates the entity or merges it into the existing one; a missing related entity (the
    /// repository of an artifact, say) is created empty, to be filled in by its own upsert,
    /// unless the mapping turns that off.
    #[instrument(skip_all, fields(blueprint = blueprint, identifier = %entity.identifier))]
    pub async fn upsert(&self, blueprint: &str, entity: &Entity) -> Result<(), CallError> {
        let url = self.upsert_url(&["blueprints", blueprint, "entities"]);
        let what = format!("Port upsert {blueprint} {}", entity.identifier);
        let response = self
            .post(&what, Family::Upsert, false, &url, entity)
            .await?;
        success(&what, response).await.map(drop)
    }

    /// Upserts up to [`BULK_LIMIT`] entities of one blueprint in one request (Port's bulk
    /// endpoint, same semantics as [`PortClient::upsert`]); returns, per entity in order, what
    /// Port answered for it (a 207 carries per-entity errors).
    #[instrument(skip_all, fields(blueprint = blueprint, entities = entities.len()))]
    ///
    /// `admitted`: the caller already waited for the budget's token of its first attempt (it
    /// chose what to send once it could leave).
    pub async fn upsert_bulk(
        &self,
        blueprint: &str,
        entities: &[Entity],
        admitted: bool,
    ) -> Result<Vec<Result<(), CallError>>, CallError> {
        let url = self.upsert_url(&["blueprints", blueprint, "entities", "bulk"]);
        let what = format!("Port bulk upsert of {} {blueprint}", entities.len());
        let body = json!({ "entities": entities });
        let response = self
            .post(&what, Family::BulkUpsert, admitted, &url, &body)
            .await?;
        #[derive(Deserialize)]
        struct Bulk {
            #[serde(default)]
            errors: Vec<BulkError>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct BulkError {
            index: usize,
            status_code: u16,
            #[serde(default)]
            error: String,
            #[serde(default)]
            message: String,
        }
        let answer: Bulk = self
            .http
            .json(&what, success(&what, response).await?)
            .await?;
        let mut results: Vec<Result<(), CallError>> = entities.iter().map(|_| Ok(())).collect();
        for failed in answer.errors {
            let Some(slot) = results.get_mut(failed.index) else {
                continue;
            };
            let identifier = entities[failed.index].identifier.as_str();
            let reason = format!(
                "Port upsert {blueprint} {identifier} answered {} {}: {}",
                failed.status_code, failed.error, failed.message
            );
            let transient = StatusCode::from_u16(failed.status_code).is_ok_and(is_transient);
            *slot = Err(if transient {
                CallError::Transient {
                    reason,
                    retry_after: None,
                }
            } else {
                CallError::Permanent { reason }
            });
        }
        Ok(results)
    }

    /// The entities a search query finds (`POST /v1/entities/search`), with only the fields
    /// named in `include` (`identifier`, `properties.digest`, ...).
    #[instrument(skip_all)]
    pub async fn search(&self, query: &Value, include: &[&str]) -> Result<Vec<Value>, CallError> {
        self.search_as(query, include, false).await
    }

    /// [`Self::search`], its first attempt already admitted by the budget.
    pub async fn search_admitted(
        &self,
        query: &Value,
        include: &[&str],
    ) -> Result<Vec<Value>, CallError> {
        self.search_as(query, include, true).await
    }

    async fn search_as(
        &self,
        query: &Value,
        include: &[&str],
        admitted: bool,
    ) -> Result<Vec<Value>, CallError> {
        let mut url = self.endpoint(&["entities", "search"]);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("exclude_calculated_properties", "true");
            for field in include {
                pairs.append_pair("include", field);
            }
        }
        let what = "Port search entities";
        let response = self
            .post(what, Family::Search, admitted, &url, &query)
            .await?;
        #[derive(Deserialize)]
        struct Found {
            entities: Vec<Value>,
        }
        let found: Found = self.http.json(what, success(what, response).await?).await?;
        Ok(found.entities)
    }

    /// Every entity of `blueprint` a search query finds, page after page of [`PAGE`]
    /// (`POST /v1/blueprints/{bp}/entities/search`, each page's `next` the following one's
    /// `from`), with only the fields named in `include` (all of them when empty).
    #[instrument(skip_all, fields(blueprint = blueprint))]
    pub async fn search_blueprint(
        &self,
        blueprint: &str,
        query: &Value,
        include: &[&str],
    ) -> Result<Vec<Value>, CallError> {
        #[derive(Deserialize)]
        struct Page {
            entities: Vec<Value>,
            #[serde(default)]
            next: Option<String>,
        }
        let mut url = self.endpoint(&["blueprints", blueprint, "entities", "search"]);
        url.query_pairs_mut()
            .append_pair("exclude_calculated_properties", "true");
        let what = format!("Port search {blueprint} entities");
        let mut found = Vec::new();
        let mut from: Option<String> = None;
        loop {
            let mut body = json!({"query": query, "limit": PAGE});
            if !include.is_empty() {
                body["include"] = json!(include);
            }
            if let Some(from) = &from {
                body["from"] = json!(from);
            }
            let response = self.post(&what, Family::Search, false, &url, &body).await?;
            let page: Page = self
                .http
                .json(&what, success(&what, response).await?)
                .await?;
            found.extend(page.entities.into_iter().map(|mut entity| {
                entity["blueprint"] = json!(blueprint);
                entity
            }));
            match page.next {
                Some(next) if Some(&next) != from.as_ref() => from = Some(next),
                _ => return Ok(found),
            }
        }
    }

    /// A delete endpoint with the delete option: whether dependents go too.
    fn delete_url(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint(segments);
        let dependents = if self.delete_dependents {
            "true"
        } else {
            "false"
        };
        url.query_pairs_mut()
            .append_pair("delete_dependents", dependents);
        url
    }

    /// Deletes the entity; one that does not exist counts as deleted.
    #[instrument(skip_all, fields(blueprint = blueprint, identifier = identifier))]
    pub async fn delete(&self, blueprint: &str, identifier: &str) -> Result<(), CallError> {
        let url = self.delete_url(&["blueprints", blueprint, "entities", identifier]);
        let what = format!("Port delete {blueprint} {identifier}");
        let response = self
            .send(&what, Family::Entity, |token| {
                self.http.client.delete(url.clone()).bearer_auth(token)
            })
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        success(&what, response).await.map(drop)
    }

    /// Deletes up to [`DELETE_LIMIT`] entities of one blueprint in one request
    /// (`POST /v1/blueprints/{bp}/bulk/entities/delete`); Port deletes all or none (an entity
    /// with dependents refuses the whole request when `delete_dependents` is off).
    /// `admitted`: as for [`Self::upsert_bulk`].
    #[instrument(skip_all, fields(blueprint = blueprint, entities = identifiers.len()))]
    pub async fn delete_bulk(
        &self,
        blueprint: &str,
        identifiers: &[&str],
        admitted: bool,
    ) -> Result<(), CallError> {
        let url = self.delete_url(&["blueprints", blueprint, "bulk", "entities", "delete"]);
        let what = format!("Port bulk delete of {} {blueprint}", identifiers.len());
        let body = json!({ "entities": identifiers });
        let response = self
            .post(&what, Family::Entity, admitted, &url, &body)
            .await?;
        success(&what, response).await.map(drop)
    }

    /// Updates a blueprint (`PATCH`, which merges and keeps fields added in Port's UI), or
    /// creates it when it does not exist yet.
    #[instrument(skip_all, fields(blueprint = identifier))]
    pub async fn apply_blueprint(
        &self,
        identifier: &str,
        blueprint: &Value,
    ) -> Result<Applied, CallError> {
        let what = format!("Port update blueprint {identifier}");
        let url = self.endpoint(&["blueprints", identifier]);
        let response = self
            .send(&what, Family::Other, |token| {
                self.http
                    .client
                    .patch(url.clone())
                    .bearer_auth(token)
                    .json(blueprint)
            })
            .await?;
        if response.status() != StatusCode::NOT_FOUND {
            return success(&what, response).await.map(|_| Applied::Updated);
        }
        let what = format!("Port create blueprint {identifier}");
        let url = self.endpoint(&["blueprints"]);
        let response = self
            .post(&what, Family::Other, false, &url, &blueprint)
            .await?;
        success(&what, response).await.map(|_| Applied::Created)
    }
}

#[cfg(test)]
mod tests {
    use wiremock::matchers::{body_partial_json, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;

    /// Port, with a token for anyone.
    async fn port() -> (MockServer, PortClient) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/auth/access_token"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"accessToken": "t", "expiresIn": 3600})),
            )
            .mount(&server)
            .await;
        let http = Http::new(Duration::from_secs(5), 1 << 20).unwrap();
        let url = Url::parse(&server.uri()).unwrap();
        let client = PortClient::new(http, url, "id".into(), SecretString::from("secret"));
        (server, client)
    }

    #[tokio::test]
    async fn a_blueprints_search_reads_every_page() {
        let (server, client) = port().await;
        let route = "/v1/blueprints/harborArtifact/entities/search";
        let page = |ids: &[&str], next: Option<&str>| {
            let entities: Vec<Value> = ids.iter().map(|i| json!({"identifier": i})).collect();
            let mut body = json!({"ok": true, "entities": entities});
            if let Some(next) = next {
                body["next"] = json!(next);
            }
            ResponseTemplate::new(200).set_body_json(body)
        };
        Mock::given(method("POST"))
            .and(path(route))
            .and(body_partial_json(json!({"from": "c"})))
            .respond_with(page(&["c"], None))
            .with_priority(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(route))
            .and(body_partial_json(json!({"limit": PAGE})))
            .respond_with(page(&["a", "b"], Some("c")))
            .mount(&server)
            .await;

        let query = json!({"combinator": "and", "rules": []});
        let found = client
            .search_blueprint("harborArtifact", &query, &[])
            .await
            .unwrap();
        let ids: Vec<&str> = found
            .iter()
            .filter_map(|e| e["identifier"].as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(found.iter().all(|e| e["blueprint"] == "harborArtifact"));
        let searches = server.received_requests().await.unwrap();
        assert_eq!(searches.iter().filter(|r| r.url.path() == route).count(), 2);
    }
}
