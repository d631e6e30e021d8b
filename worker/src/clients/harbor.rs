//! The Harbor API (v2.0): projects, repositories and artifacts, read; and the webhook policies
//! of projects, read and written (`harbor-worker webhooks`).
//!
//! Basic auth (a user or a robot account `robot$...`). A 404 with Harbor's `NOT_FOUND` error
//! means the thing is gone and is returned as `None`, not as an error; a 404 without it comes
//! from something in front of Harbor (a proxy, an ingress without its route) and proves
//! nothing: it is a transient failure.
//!
//! A project that is gone is answered 403, not 404, to anyone but a system administrator: Harbor
//! checks the account's permission in the project before it looks for what is asked, and no
//! account has any in a project that does not exist. So a 403 to a read in a project is followed
//! by `HEAD /projects?project_name=`, which asks only for a login: when Harbor answers that the
//! project does not exist, the read's answer is `None` too; when it exists, the 403 stands (the
//! account lacks the permission).

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use tracing::instrument;
use url::Url;

use super::{CallError, Http, success, transport_error, unreadable};
use crate::names::{Digest, RepositoryName};

/// Whether a 404's body is Harbor's own (`{"errors": [{"code": "NOT_FOUND", ...}]}`).
fn says_not_found(body: &Value) -> bool {
    body["errors"]
        .as_array()
        .is_some_and(|errors| errors.iter().any(|e| e["code"] == "NOT_FOUND"))
}

/// A 404 that does not show it is Harbor's (it lacks `proof`), so proves nothing of `object`:
/// a transient failure.
fn unproven_404(what: &str, proof: &str, object: &str) -> CallError {
    CallError::Transient {
        reason: format!(
            "{what} answered 404 without {proof} (from a proxy in front of Harbor?): not taken \
             to mean {object} is gone"
        ),
        retry_after: None,
    }
}

/// The header Harbor sends back with the request's own value, set to one of its own when the
/// request has none.
const REQUEST_ID: &str = "X-Request-ID";

/// The longest list read whole (projects, a project's repositories, a repository's artifacts):
/// past it a read fails for good instead of holding without bound what a misbehaving server
/// keeps sending (an artifact is a few KiB: 100,000 of them about 300 MB).
pub const MAX_LIST_ITEMS: usize = 100_000;

/// The project a path is in (`projects/{project}/...`), if any.
fn project_of<'a>(segments: &[&'a str]) -> Option<&'a str> {
    match segments {
        ["projects", project, ..] => Some(project),
        _ => None,
    }
}

/// Scan report types the worker reads, in order of preference.
pub const VULNERABILITY_REPORTS: &str = "application/vnd.security.vulnerability.report; version=1.1, application/vnd.scanner.adapter.vuln.report.harbor+json; version=1.0";

/// The path of a project's webhook policy `id`, and of `more` under it.
fn policy_path<'a>(project: &'a str, id: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut path = vec!["projects", project, "webhook", "policies", id];
    path.extend_from_slice(more);
    path
}

mod objects;

pub use objects::*;

/// A Harbor API client.
pub struct HarborClient {
    http: Http,
    base: Url,
    username: String,
    password: SecretString,
}

impl HarborClient {
    /// `base` is Harbor's address (`https://harbor.example.com`); the API is under `/api/v2.0`.
    pub fn new(http: Http, base: Url, username: String, password: SecretString) -> Self {
        Self {
            http,
            base,
            username,
            password,
        }
    }

    /// Harbor's address, for links to its UI.
    pub fn base(&self) -> &Url {
        &self.base
    }

    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v2.0"]).extend(segments);
        }
        url
    }

    async fn get<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        project: Option<&str>,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<T>, CallError> {
        let raw = self.get_raw(what, project, request).await?;
        raw.map(|raw| T::deserialize(&raw))
            .transpose()
            .map_err(|error| unreadable(what, &error))
    }

    /// An object, kept whole beside its fields.
    async fn get_answer<T: Answer>(
        &self,
        what: &str,
        project: Option<&str>,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<T>, CallError> {
        let raw = self.get_raw(what, project, request).await?;
        raw.map(read)
            .transpose()
            .map_err(|error| unreadable(what, &error))
    }

    /// A read's answer, `None` when what it asks for is gone; `project` is the project it is
    /// in, if any.
    async fn get_raw(
        &self,
        what: &str,
        project: Option<&str>,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<Value>, CallError> {
        let response = request
            .basic_auth(&self.username, Some(self.password.expose_secret()))
            .send()
            .await
            .map_err(|error| transport_error(what, &error))?;
        if response.status() == StatusCode::NOT_FOUND {
            let body: Result<Value, _> = self.http.json(what, response).await;
            return match body {
                Ok(body) if says_not_found(&body) => Ok(None),
                _ => Err(unproven_404(what, "Harbor's NOT_FOUND error", "it")),
            };
        }
        if let Some(project) = project.filter(|_| response.status() == StatusCode::FORBIDDEN) {
            let exists = self.project_exists(project).await;
            if !exists.map_err(|error| error.after(&format!("{what} answered 403")))? {
                return Ok(None);
            }
        }
        let response = success(what, response).await?;
        self.http.json(what, response).await.map(Some)
    }

    /// Whether Harbor has the project (`HEAD /projects?project_name=`). A HEAD answer has no
    /// body to carry Harbor's error, so a 404 is taken for Harbor's only when it carries back
    /// this request's `X-Request-ID`, as Harbor's do and a proxy's own do not.
    async fn project_exists(&self, project: &str) -> Result<bool, CallError> {
        let what = format!("Harbor HEAD project {project}");
        let mut url = self.endpoint(&["projects"]);
        url.query_pairs_mut().append_pair("project_name", project);
        let id = uuid::Uuid::new_v4().to_string();
        let response = self
            .http
            .client
            .head(url)
            .header(REQUEST_ID, &id)
            .basic_auth(&self.username, Some(self.password.expose_secret()))
            .send()
            .await
            .map_err(|error| transport_error(&what, &error))?;
        if response.status() == StatusCode::NOT_FOUND {
            let echoed = response
                .headers()
                .get(REQUEST_ID)
                .is_some_and(|v| v == id.as_str());
            return match echoed {
                true => Ok(false),
                false => Err(unproven_404(
                    &what,
                    &format!("the request's {REQUEST_ID}"),
                    "the project",
                )),
            };
        }
        success(&what, response).await.map(|_| true)
    }

    /// Every item of a paginated list (`page_size` 100, Harbor's maximum), page by page; the
    /// first failed page ends it (a list is retried whole, never resumed from a stale page).
    async fn list_all<T: Answer>(
        &self,
        what: &str,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Vec<T>, CallError> {
        let items = self.list_values(what, segments, query).await?;
        items
            .into_iter()
            .map(|item| read(item).map_err(|error| unreadable(what, &error)))
            .collect()
    }

    /// Every item of a paginated list, as sent, at most [`MAX_LIST_ITEMS`].
    async fn list_values(
        &self,
        what: &str,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Vec<Value>, CallError> {
        const PAGE_SIZE: usize = 100;
        let mut all = Vec::new();
        for page in 1.. {
            let mut url = self.endpoint(segments);
            url.query_pairs_mut()
                .append_pair("page", &page.to_string())
                .append_pair("page_size", &PAGE_SIZE.to_string())
                .extend_pairs(query);
            let what = format!("{what} (page {page})");
            // Harbor ignores the header where there is no scan overview to shape.
            let request = self
                .http
                .client
                .get(url)
                .header("X-Is-Resource-Name", "true")
                .header("X-Accept-Vulnerabilities", VULNERABILITY_REPORTS);
            let items: Vec<Value> = self
                .get(&what, project_of(segments), request)
                .await?
                .unwrap_or_default();
            let last = items.len() < PAGE_SIZE;
            // A proxy that drops the query answers the first page again and again.
            if page > 1 && !items.is_empty() && all[all.len() - PAGE_SIZE..] == items[..] {
                return Err(CallError::permanent(format!(
                    "{what}: the same page as the one before (does a proxy in front of Harbor \
                     drop the query?)"
                )));
            }
            all.extend(items);
            if last {
                break;
            }
            if all.len() >= MAX_LIST_ITEMS {
                return Err(CallError::permanent(format!(
                    "{what}: more than {MAX_LIST_ITEMS} items; this worker holds no longer list"
                )));
            }
        }
        Ok(all)
    }

    /// Every project.
    pub async fn projects(&self) -> Result<Vec<Project>, CallError> {
        self.list_all("Harbor GET projects", &["projects"], &[])
            .await
    }

    /// Every repository of a project (none for a project that is gone).
    pub async fn repositories(&self, project: &str) -> Result<Vec<Repository>, CallError> {
        let what = format!("Harbor GET repositories of {project}");
        self.list_all(&what, &["projects", project, "repositories"], &[])
            .await
    }

    /// Every artifact of a repository, with tags, labels and scan overview.
    pub async fn artifacts(&self, repository: &RepositoryName) -> Result<Vec<Artifact>, CallError> {
        let what = format!("Harbor GET artifacts of {repository}");
        let segments = [
            "projects",
            repository.project(),
            "repositories",
            &repository.encoded_once(),
            "artifacts",
        ];
        let query = [
            ("with_tag", "true"),
            ("with_label", "true"),
            ("with_scan_overview", "true"),
        ];
        self.list_all(&what, &segments, &query).await
    }

    /// The project, or `None` if it does not exist.
    #[instrument(skip_all, fields(project = name))]
    pub async fn project(&self, name: &str) -> Result<Option<Project>, CallError> {
        let url = self.endpoint(&["projects", name]);
        let request = self
            .http
            .client
            .get(url)
            .header("X-Is-Resource-Name", "true");
        self.get_answer(&format!("Harbor GET project {name}"), Some(name), request)
            .await
    }

    /// The repository, or `None` if it does not exist.
    #[instrument(skip_all, fields(repository = %repository))]
    pub async fn repository(
        &self,
        repository: &RepositoryName,
    ) -> Result<Option<Repository>, CallError> {
        let url = self.endpoint(&[
            "projects",
            repository.project(),
            "repositories",
            &repository.encoded_once(),
        ]);
        self.get_answer(
            &format!("Harbor GET repository {repository}"),
            Some(repository.project()),
            self.http.client.get(url),
        )
        .await
    }

    /// The artifact with its tags, labels and scan overview, or `None` if it does not exist.
    #[instrument(skip_all, fields(repository = %repository, digest = %digest))]
    pub async fn artifact(
        &self,
        repository: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<Artifact>, CallError> {
        self.artifact_at(repository, digest.as_str()).await
    }

    /// The artifact a digest or a tag names, as [`HarborClient::artifact`].
    pub async fn artifact_at(
        &self,
        repository: &RepositoryName,
        reference: &str,
    ) -> Result<Option<Artifact>, CallError> {
        let mut url = self.endpoint(&[
            "projects",
            repository.project(),
            "repositories",
            &repository.encoded_once(),
            "artifacts",
            reference,
        ]);
        url.query_pairs_mut()
            .append_pair("with_tag", "true")
            .append_pair("with_label", "true")
            .append_pair("with_scan_overview", "true");
        let request = self
            .http
            .client
            .get(url)
            .header("X-Accept-Vulnerabilities", VULNERABILITY_REPORTS);
        self.get_answer(
            &format!("Harbor GET artifact {repository}@{reference}"),
            Some(repository.project()),
            request,
        )
        .await
    }

    /// The webhook policies of a project (`GET /projects/{p}/webhook/policies`), as sent.
    pub async fn webhook_policies(&self, project: &str) -> Result<Vec<Value>, CallError> {
        let what = format!("Harbor GET webhook policies of {project}");
        self.list_values(&what, &["projects", project, "webhook", "policies"], &[])
            .await
    }

    /// Creates a webhook policy in a project.
    pub async fn create_webhook_policy(
        &self,
        project: &str,
        policy: &Value,
    ) -> Result<(), CallError> {
        let url = self.endpoint(&["projects", project, "webhook", "policies"]);
        let what = format!("Harbor POST webhook policy of {project}");
        self.send(&what, self.http.client.post(url).json(policy))
            .await
    }

    /// Replaces a project's webhook policy `id`.
    pub async fn update_webhook_policy(
        &self,
        project: &str,
        id: i64,
        policy: &Value,
    ) -> Result<(), CallError> {
        let id = id.to_string();
        let url = self.endpoint(&policy_path(project, &id, &[]));
        let what = format!("Harbor PUT webhook policy {id} of {project}");
        self.send(&what, self.http.client.put(url).json(policy))
            .await
    }

    /// Deletes a project's webhook policy `id`.
    pub async fn delete_webhook_policy(&self, project: &str, id: i64) -> Result<(), CallError> {
        let id = id.to_string();
        let url = self.endpoint(&policy_path(project, &id, &[]));
        let what = format!("Harbor DELETE webhook policy {id} of {project}");
        self.send(&what, self.http.client.delete(url)).await
    }

    /// The latest executions (deliveries) of a project's webhook policy, newest first.
    pub async fn webhook_executions(
        &self,
        project: &str,
        id: i64,
        count: usize,
    ) -> Result<Vec<Value>, CallError> {
        let id = id.to_string();
        let mut url = self.endpoint(&policy_path(project, &id, &["executions"]));
        url.query_pairs_mut()
            .append_pair("page", "1")
            .append_pair("page_size", &count.to_string())
            .append_pair("sort", "-start_time");
        let what = format!("Harbor GET executions of webhook policy {id} of {project}");
        let request = self
            .http
            .client
            .get(url)
            .header("X-Is-Resource-Name", "true");
        let items = self.get(&what, Some(project), request).await?;
        Ok(items.unwrap_or_default())
    }

    /// The tasks (one per target) of an execution of a project's webhook policy.
    pub async fn webhook_tasks(
        &self,
        project: &str,
        id: i64,
        execution: i64,
    ) -> Result<Vec<Value>, CallError> {
        let (id, execution) = (id.to_string(), execution.to_string());
        let segments = policy_path(project, &id, &["executions", &execution, "tasks"]);
        let what = format!("Harbor GET tasks of webhook execution {execution} of {project}");
        self.list_values(&what, &segments, &[]).await
    }

    /// A call whose answer is only its status.
    async fn send(&self, what: &str, request: reqwest::RequestBuilder) -> Result<(), CallError> {
        let response = request
            .header("X-Is-Resource-Name", "true")
            .basic_auth(&self.username, Some(self.password.expose_secret()))
            .send()
            .await
            .map_err(|error| transport_error(what, &error))?;
        success(what, response).await.map(drop)
    }
}

#[cfg(test)]
pub mod tests;
