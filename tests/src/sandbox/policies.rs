//! The fake Harbor's webhook policies (`/api/v2.0/projects/{p}/webhook/policies...`), shaped
//! as Harbor's swagger (`WebhookPolicy`, `Execution`, `Task`), and their executions: every
//! webhook the sandbox sends for a project is recorded as an execution of each of the
//! project's policies, failed when the ingest did not answer 2xx.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::state::now;

/// A policy's deliveries remembered, newest last.
const EXECUTIONS_KEPT: usize = 100;

/// The policies of every project, and what the robot account may not touch.
#[derive(Debug, Default)]
pub struct Policies {
    next_id: i64,
    /// By project name: the policies as Harbor stores them.
    pub by_project: BTreeMap<String, Vec<Value>>,
    /// By policy id: its executions, each with its one task.
    executions: BTreeMap<i64, Vec<(Value, Value)>>,
    /// Projects whose policies the account may not manage (Harbor answers 403).
    pub forbidden: BTreeSet<String>,
}

/// What a policy call answers: a status and a body.
pub type Answer = (u16, Value);

fn error(status: u16, code: &str, message: &str) -> Answer {
    (
        status,
        json!({"errors": [{"code": code, "message": message}]}),
    )
}

/// A policy as a request carries it, checked as Harbor checks it.
fn checked(body: &Value) -> Result<Value, Answer> {
    let name = body["name"].as_str().unwrap_or_default();
    let targets = body["targets"].as_array().map_or(0, Vec::len);
    let types = body["event_types"].as_array().map_or(0, Vec::len);
    if name.is_empty() || targets == 0 || types == 0 {
        return Err(error(
            400,
            "BAD_REQUEST",
            "name, targets and event_types are required",
        ));
    }
    Ok(body.clone())
}

impl Policies {
    fn forbidden(&self, project: &str) -> Option<Answer> {
        self.forbidden.contains(project).then(|| {
            error(
                403,
                "FORBIDDEN",
                "forbidden: the account lacks notification-policy permissions",
            )
        })
    }

    /// `GET .../webhook/policies`
    pub fn list(&self, project: &str) -> Result<Vec<Value>, Answer> {
        if let Some(denied) = self.forbidden(project) {
            return Err(denied);
        }
        Ok(self.by_project.get(project).cloned().unwrap_or_default())
    }

    /// `POST .../webhook/policies`
    pub fn create(&mut self, project: &str, project_id: i64, body: &Value) -> Answer {
        if let Some(denied) = self.forbidden(project) {
            return denied;
        }
        let mut policy = match checked(body) {
            Ok(policy) => policy,
            Err(answer) => return answer,
        };
        let all = self.by_project.entry(project.to_owned()).or_default();
        if all.iter().any(|p| p["name"] == policy["name"]) {
            return error(409, "CONFLICT", "a policy with this name exists");
        }
        self.next_id += 1;
        policy["id"] = json!(self.next_id);
        policy["project_id"] = json!(project_id);
        policy["creator"] = json!("admin");
        policy["creation_time"] = json!(now());
        policy["update_time"] = json!(now());
        all.push(policy);
        (201, Value::Null)
    }

    /// `PUT .../webhook/policies/{id}`
    pub fn update(&mut self, project: &str, id: i64, body: &Value) -> Answer {
        if let Some(denied) = self.forbidden(project) {
            return denied;
        }
        let mut update = match checked(body) {
            Ok(policy) => policy,
            Err(answer) => return answer,
        };
        let all = self.by_project.entry(project.to_owned()).or_default();
        let Some(policy) = all.iter_mut().find(|p| p["id"] == id) else {
            return error(404, "NOT_FOUND", "no such webhook policy");
        };
        for key in ["id", "project_id", "creator", "creation_time"] {
            update[key] = policy[key].clone();
        }
        update["update_time"] = json!(now());
        *policy = update;
        (200, Value::Null)
    }

    /// `DELETE .../webhook/policies/{id}`
    pub fn delete(&mut self, project: &str, id: i64) -> Answer {
        if let Some(denied) = self.forbidden(project) {
            return denied;
        }
        let all = self.by_project.entry(project.to_owned()).or_default();
        let before = all.len();
        all.retain(|p| p["id"] != id);
        if all.len() == before {
            return error(404, "NOT_FOUND", "no such webhook policy");
        }
        self.executions.remove(&id);
        (200, Value::Null)
    }

    /// `GET .../webhook/policies/{id}/executions`, newest first.
    pub fn executions(&self, project: &str, id: i64) -> Result<Vec<Value>, Answer> {
        if let Some(denied) = self.forbidden(project) {
            return Err(denied);
        }
        let runs = self.executions.get(&id).into_iter().flatten();
        Ok(runs.rev().map(|(execution, _)| execution.clone()).collect())
    }

    /// `GET .../executions/{execution}/tasks`
    pub fn tasks(&self, project: &str, id: i64, execution: i64) -> Result<Vec<Value>, Answer> {
        if let Some(denied) = self.forbidden(project) {
            return Err(denied);
        }
        let runs = self.executions.get(&id).into_iter().flatten();
        Ok(runs
            .filter(|(e, _)| e["id"] == execution)
            .map(|(_, task)| task.clone())
            .collect())
    }

    /// Records a delivery of `event_type` for `project`: `failure` is why it failed, if it did.
    pub fn record(&mut self, project: &str, event_type: &str, failure: Option<&str>) {
        let ids: Vec<i64> = self
            .by_project
            .get(project)
            .into_iter()
            .flatten()
            .filter_map(|p| p["id"].as_i64())
            .collect();
        for id in ids {
            self.next_id += 1;
            let status = if failure.is_some() {
                "Error"
            } else {
                "Success"
            };
            let execution = json!({
                "id": self.next_id, "vendor_type": "WEBHOOK", "vendor_id": id,
                "status": status, "status_message": "", "trigger": "EVENT",
                "extra_attrs": {"event_type": event_type, "payload": ""},
                "start_time": now(), "end_time": now(),
            });
            let task = json!({
                "id": self.next_id, "execution_id": self.next_id, "status": status,
                "status_message": failure.unwrap_or_default(), "run_count": 1,
                "extra_attrs": {}, "creation_time": now(), "update_time": now(),
                "start_time": now(), "end_time": now(),
            });
            let runs = self.executions.entry(id).or_default();
            if runs.len() == EXECUTIONS_KEPT {
                runs.remove(0);
            }
            runs.push((execution, task));
        }
    }

    /// Every project's policies as the sandbox shows them: the auth header hidden.
    pub fn shown(&self) -> Value {
        let mut all = serde_json::Map::new();
        for (project, policies) in &self.by_project {
            let shown: Vec<Value> = policies
                .iter()
                .map(|p| {
                    let mut p = p.clone();
                    if let Some(targets) = p["targets"].as_array_mut() {
                        for target in targets {
                            if target["auth_header"]
                                .as_str()
                                .is_some_and(|h| !h.is_empty())
                            {
                                target["auth_header"] = json!("(hidden)");
                            }
                        }
                    }
                    p
                })
                .collect();
            all.insert(project.clone(), json!(shown));
        }
        Value::Object(all)
    }
}
