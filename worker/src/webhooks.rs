//! Harbor's webhook policies, kept in every project: Harbor has no system-wide webhook, so
//! `harbor-worker webhooks sync` (and each resync) makes sure every project has one policy of
//! ours, named [`POLICY_NAME`] and recognised by that name only, sending the events the worker
//! handles to the ingest. Every other policy is left alone.

use std::collections::BTreeSet;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{error, info};
use url::Url;

use crate::clients::CallError;
use crate::clients::harbor::HarborClient;

/// The name of our policy in each project.
pub const POLICY_NAME: &str = "harbor-port-sync";

/// Failed deliveries shown per project by `webhooks status`.
const FAILED_SHOWN: usize = 5;

/// What our policy must be.
#[derive(Debug, Clone)]
pub struct Desired {
    /// Where Harbor posts: the ingest's `/webhook` (or `/webhook/<instance>`) as Harbor
    /// reaches it.
    pub address: Url,
    /// The policy's auth header: the (first) webhook secret.
    pub secret: SecretString,
    /// `Default` or `CloudEvents`.
    pub payload_format: String,
    /// The event types the worker handles.
    pub event_types: Vec<String>,
}

impl Desired {
    /// The policy for `public_url` (the ingest's address as Harbor reaches it): to
    /// `/webhook/<instance>` for a named instance, else to `/webhook`.
    pub fn new(
        public_url: &Url,
        instance: Option<&str>,
        secret: SecretString,
        cloudevents: bool,
    ) -> Self {
        let mut address = public_url.clone();
        if let Ok(mut path) = address.path_segments_mut() {
            path.pop_if_empty().push("webhook").extend(instance);
        }
        Self {
            address,
            secret,
            payload_format: if cloudevents {
                "CloudEvents"
            } else {
                "Default"
            }
            .to_owned(),
            event_types: harbor_shared::event::EventType::known_names()
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The policy as Harbor's API takes it (`WebhookPolicy`).
    fn body(&self) -> Value {
        json!({
            "name": POLICY_NAME,
            "description": "Sends Harbor's events to harbor-port-sync, which keeps Port's catalog in sync. Managed by `harbor-worker webhooks sync`: edits are undone.",
            "enabled": true,
            "event_types": self.event_types,
            "targets": [{
                "type": "http",
                "address": self.address.as_str(),
                "auth_header": self.secret.expose_secret(),
                "skip_cert_verify": false,
                "payload_format": self.payload_format,
            }],
        })
    }

    /// How a project's policies named ours (as Harbor sent them, at least one) differ from
    /// ours: the fields of the first that do, never their values (one of them is the secret),
    /// and `duplicates` when there are more.
    fn differences(&self, found: &[Policy]) -> Vec<&'static str> {
        let mut differ = Vec::new();
        let Some(policy) = found.first() else {
            return differ;
        };
        if found.len() > 1 {
            differ.push("duplicates");
        }
        if !policy.enabled {
            differ.push("enabled");
        }
        let types: BTreeSet<&str> = policy.event_types.iter().map(String::as_str).collect();
        let ours: BTreeSet<&str> = self.event_types.iter().map(String::as_str).collect();
        if types != ours {
            differ.push("event_types");
        }
        match policy.targets.as_slice() {
            [target] => {
                if target.kind != "http" {
                    differ.push("targets.type");
                }
                if target.address != self.address.as_str() {
                    differ.push("targets.address");
                }
                // Harbor hides nothing here; a policy whose header it does not send is rewritten.
                if target.auth_header.as_deref() != Some(self.secret.expose_secret()) {
                    differ.push("targets.auth_header");
                }
                if target.skip_cert_verify {
                    differ.push("targets.skip_cert_verify");
                }
                let format = target.payload_format.as_deref().unwrap_or("Default");
                if format != self.payload_format {
                    differ.push("targets.payload_format");
                }
            }
            _ => differ.push("targets"),
        }
        differ
    }
}

/// The fields of a `WebhookPolicy` this module reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Policy {
    id: i64,
    name: String,
    enabled: bool,
    event_types: Vec<String>,
    targets: Vec<Target>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Target {
    #[serde(rename = "type")]
    kind: String,
    address: String,
    auth_header: Option<String>,
    skip_cert_verify: bool,
    payload_format: Option<String>,
}

/// What a sync does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    /// Say what it would do; change nothing.
    pub dry_run: bool,
    /// Take our policy away instead of keeping it.
    pub remove: bool,
}

/// What became of one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The project.
    pub project: String,
    /// `created`, `updated`, `unchanged`, `removed`, `absent` (nothing to remove) or `failed`;
    /// prefixed with `would be ` in a dry run.
    pub action: String,
    /// What differed (for an update), or why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Outcome {
    fn failed(&self) -> bool {
        self.action == "failed"
    }
}

/// Every project's outcome, in Harbor's order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Per project.
    pub projects: Vec<Outcome>,
}

impl Report {
    /// Projects whose policy could not be made right.
    pub fn failures(&self) -> usize {
        self.projects.iter().filter(|o| o.failed()).count()
    }

    /// How many projects had each action, e.g. `created 2, unchanged 5`.
    pub fn counts(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for outcome in &self.projects {
            match counts.iter_mut().find(|(a, _)| *a == outcome.action) {
                Some((_, n)) => *n += 1,
                None => counts.push((&outcome.action, 1)),
            }
        }
        let shown: Vec<String> = counts.iter().map(|(a, n)| format!("{a} {n}")).collect();
        if shown.is_empty() {
            "no projects".to_owned()
        } else {
            shown.join(", ")
        }
    }
}

/// Why a project's policies could not be read or written, for a person: a 403 says which
/// permission the robot account lacks.
fn reason(project: &str, error: &CallError) -> String {
    let text = error.to_string();
    if text.contains(" answered 403 ") {
        format!(
            "the Harbor account may not manage the webhook policies of project {project} \
             (Harbor answered 403): a robot account needs the project permission \
             `notification-policy` (list, read, create, update, delete), a user the Project \
             Admin role"
        )
    } else {
        text
    }
}

/// Our policies (by name) among a project's, and the policies as sent.
async fn ours(harbor: &HarborClient, project: &str) -> Result<Vec<Policy>, String> {
    let listed = harbor
        .webhook_policies(project)
        .await
        .map_err(|e| reason(project, &e))?;
    let mut found = Vec::new();
    for raw in listed {
        let policy = Policy::deserialize(&raw).map_err(|e| {
            format!("Harbor sent a webhook policy of {project} it cannot read: {e}")
        })?;
        if policy.name == POLICY_NAME {
            found.push(policy);
        }
    }
    Ok(found)
}

/// Makes (or, with `remove`, unmakes) our policy in every project Harbor lists; one project's
/// failure does not stop the others. Fails only when the projects cannot be listed.
pub async fn sync(
    harbor: &HarborClient,
    desired: &Desired,
    mode: Mode,
) -> Result<Report, CallError> {
    let projects = harbor.projects().await?;
    let mut report = Report::default();
    for project in projects {
        let name = project.name;
        let (action, detail) = match sync_project(harbor, desired, mode, &name).await {
            Ok((action, detail)) if mode.dry_run && action != "unchanged" && action != "absent" => {
                (format!("would be {action}"), detail)
            }
            Ok((action, detail)) => (action.to_owned(), detail),
            Err(why) => ("failed".to_owned(), Some(why)),
        };
        report.projects.push(Outcome {
            project: name,
            action,
            detail,
        });
    }
    Ok(report)
}

/// [`sync`] as each resync runs it: logs what it did, and each project it could not sync.
pub async fn keep(harbor: &HarborClient, desired: &Desired, dry_run: bool) {
    let mode = Mode {
        dry_run,
        remove: false,
    };
    match sync(harbor, desired, mode).await {
        Ok(report) => {
            for outcome in report.projects.iter().filter(|o| o.failed()) {
                error!(
                    project = %outcome.project,
                    error = outcome.detail.as_deref().unwrap_or_default(),
                    "Webhook policy not synced"
                );
            }
            info!(
                projects = report.projects.len(),
                failed = report.failures(),
                outcome = %report.counts(),
                "Webhook policies synced"
            );
        }
        Err(error) => {
            error!(%error, "Webhook policies not synced: Harbor's projects could not be listed")
        }
    }
}

async fn sync_project(
    harbor: &HarborClient,
    desired: &Desired,
    mode: Mode,
    project: &str,
) -> Result<(&'static str, Option<String>), String> {
    let found = ours(harbor, project).await?;
    let fail = |e: CallError| reason(project, &e);
    if mode.remove {
        if found.is_empty() {
            return Ok(("absent", None));
        }
        if !mode.dry_run {
            for policy in &found {
                harbor
                    .delete_webhook_policy(project, policy.id)
                    .await
                    .map_err(fail)?;
            }
        }
        return Ok(("removed", None));
    }
    let Some((first, extra)) = found.split_first() else {
        if !mode.dry_run {
            harbor
                .create_webhook_policy(project, &desired.body())
                .await
                .map_err(fail)?;
        }
        return Ok(("created", None));
    };
    let differ = desired.differences(&found);
    if differ.is_empty() {
        return Ok(("unchanged", None));
    }
    if !mode.dry_run {
        harbor
            .update_webhook_policy(project, first.id, &desired.body())
            .await
            .map_err(fail)?;
        for policy in extra {
            harbor
                .delete_webhook_policy(project, policy.id)
                .await
                .map_err(fail)?;
        }
    }
    Ok(("updated", Some(differ.join(", "))))
}

/// A delivery Harbor gave up on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedDelivery {
    /// The execution's id.
    pub execution: i64,
    /// When it started.
    pub at: Option<String>,
    /// The event type it carried.
    pub event_type: Option<String>,
    /// What went wrong, as Harbor recorded it.
    pub message: Option<String>,
}

/// One project's policy, as `webhooks status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The project.
    pub project: String,
    /// Our policy is there.
    pub present: bool,
    /// It is as `webhooks sync` would make it.
    pub matches: bool,
    /// What differs, if it does not match; or why the project could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The latest deliveries Harbor gave up on, newest first.
    pub failed: Vec<FailedDelivery>,
}

/// Every project's policy and its latest failed deliveries.
pub async fn status(harbor: &HarborClient, desired: &Desired) -> Result<Vec<Status>, CallError> {
    let projects = harbor.projects().await?;
    let mut all = Vec::with_capacity(projects.len());
    for project in projects {
        let name = project.name;
        let mut status = Status {
            project: name.clone(),
            present: false,
            matches: false,
            detail: None,
            failed: Vec::new(),
        };
        match ours(harbor, &name).await {
            Err(why) => status.detail = Some(why),
            Ok(found) => {
                if let Some(policy) = found.first() {
                    status.present = true;
                    let differ = desired.differences(&found);
                    status.matches = differ.is_empty();
                    if !differ.is_empty() {
                        status.detail = Some(differ.join(", "));
                    }
                    match failed_deliveries(harbor, &name, policy.id).await {
                        Ok(failed) => status.failed = failed,
                        // Said beside what differs, which must not be lost.
                        Err(error) => {
                            let why = format!(
                                "its failed deliveries cannot be read: {}",
                                reason(&name, &error)
                            );
                            status.detail = Some(match status.detail.take() {
                                Some(differ) => format!("{differ}; {why}"),
                                None => why,
                            });
                        }
                    }
                }
            }
        }
        all.push(status);
    }
    Ok(all)
}

/// The latest executions of a policy that failed, each with its failed task's message.
async fn failed_deliveries(
    harbor: &HarborClient,
    project: &str,
    policy: i64,
) -> Result<Vec<FailedDelivery>, CallError> {
    const LOOKED_AT: usize = 50;
    let executions = harbor
        .webhook_executions(project, policy, LOOKED_AT)
        .await?;
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let mut failed = Vec::new();
    for execution in executions {
        if failed.len() == FAILED_SHOWN {
            break;
        }
        if text(&execution, "status").as_deref() != Some("Error") {
            continue;
        }
        let id = execution.get("id").and_then(Value::as_i64).unwrap_or(0);
        let tasks = harbor.webhook_tasks(project, policy, id).await?;
        let message = tasks
            .iter()
            .filter(|t| text(t, "status").as_deref() == Some("Error"))
            .find_map(|t| text(t, "status_message"))
            .or_else(|| text(&execution, "status_message"));
        let event_type = execution
            .get("extra_attrs")
            .and_then(|a| a.get("event_type"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        failed.push(FailedDelivery {
            execution: id,
            at: text(&execution, "start_time"),
            event_type,
            message,
        });
    }
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Desired {
        Desired::new(
            &Url::parse("https://sync.example.com/").unwrap(),
            None,
            SecretString::from("s3cret-s3cret-s3cret"),
            false,
        )
    }

    fn policy(body: Value) -> Policy {
        Policy::deserialize(&body).unwrap()
    }

    #[test]
    fn our_policy_posts_every_handled_event_type_to_the_webhook_endpoint() {
        let body = desired().body();
        assert_eq!(body["name"], POLICY_NAME);
        assert_eq!(
            body["targets"][0]["address"],
            "https://sync.example.com/webhook"
        );
        assert_eq!(body["targets"][0]["auth_header"], "s3cret-s3cret-s3cret");
        assert_eq!(body["targets"][0]["payload_format"], "Default");
        let types = body["event_types"].as_array().unwrap();
        assert!(types.contains(&json!("PUSH_ARTIFACT")));
        assert!(types.contains(&json!("TAG_RETENTION")));
        assert_eq!(types.len(), 10);
        assert!(desired().differences(&[policy(body)]).is_empty());
        let named = Desired::new(
            &Url::parse("https://sync.example.com/base/").unwrap(),
            Some("eu"),
            SecretString::from("s3cret-s3cret-s3cret"),
            false,
        );
        assert_eq!(
            named.body()["targets"][0]["address"],
            "https://sync.example.com/base/webhook/eu"
        );
    }

    #[test]
    fn differences_name_the_fields_and_never_the_secret() {
        let mut body = desired().body();
        body["enabled"] = json!(false);
        body["targets"][0]["auth_header"] = json!("old-secret");
        body["targets"][0]["skip_cert_verify"] = json!(true);
        body["event_types"] = json!(["PUSH_ARTIFACT"]);
        let differ = desired().differences(&[policy(body)]);
        assert_eq!(
            differ,
            [
                "enabled",
                "event_types",
                "targets.auth_header",
                "targets.skip_cert_verify"
            ]
        );
        let mut two = desired().body();
        two["targets"] = json!([two["targets"][0], two["targets"][0]]);
        assert_eq!(desired().differences(&[policy(two)]), ["targets"]);
    }

    #[tokio::test]
    async fn status_keeps_what_differs_when_the_failed_deliveries_cannot_be_read() {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};

        let harbor = MockServer::start().await;
        let api = "/api/v2.0/projects";
        let mut ours = desired().body();
        ours["id"] = json!(7);
        ours["enabled"] = json!(false);
        for (at, body) in [
            (api.to_owned(), json!([{"project_id": 1, "name": "alpha"}])),
            (format!("{api}/alpha/webhook/policies"), json!([ours])),
        ] {
            Mock::given(method("GET"))
                .and(path(at))
                .respond_with(ResponseTemplate::new(200).set_body_json(body))
                .mount(&harbor)
                .await;
        }
        Mock::given(method("GET"))
            .and(path(format!("{api}/alpha/webhook/policies/7/executions")))
            .respond_with(ResponseTemplate::new(403).set_body_json(json!({"errors": []})))
            .mount(&harbor)
            .await;
        // The project exists: the 403 is the account's.
        Mock::given(method("HEAD"))
            .and(path(api))
            .respond_with(ResponseTemplate::new(200))
            .mount(&harbor)
            .await;
        let client = crate::clients::harbor::tests::client_of(&harbor);

        let all = status(&client, &desired()).await.unwrap();
        let [alpha] = all.as_slice() else {
            panic!("{all:?}")
        };
        assert!(alpha.present && !alpha.matches, "{alpha:?}");
        let detail = alpha.detail.as_deref().unwrap();
        assert!(detail.starts_with("enabled; "), "{detail}");
        assert!(detail.contains("notification-policy"), "{detail}");
    }

    #[test]
    fn a_403_says_which_permission_is_missing() {
        let error = CallError::permanent(
            "Harbor POST webhook policy of alpha answered 403 Forbidden: {\"errors\":[]}",
        );
        let text = reason("alpha", &error);
        assert!(text.contains("notification-policy"), "{text}");
        assert!(text.contains("project alpha"), "{text}");
    }
}
