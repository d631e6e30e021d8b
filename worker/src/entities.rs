//! Port entities, as the worker writes them (what the mapping makes), and the blueprints of the
//! default mapping (`deploy/port/blueprints.json`). The default mapping's reference, Harbor's
//! state as entities compiled in, is test code (`reference`): the mapping's tests render every
//! fixture through both.
//!
//! | blueprint          | identifier                         | title                       |
//! |--------------------|------------------------------------|-----------------------------|
//! | `harborProject`    | project name                       | name                        |
//! | `harborRepository` | `project/repo`                     | same                        |
//! | `harborArtifact`   | `project/repo@sha256:<digest>`     | `project/repo:<first tag>`  |

use serde::Serialize;
use serde_json::{Map, Value};

#[cfg(test)]
pub mod reference;

/// Blueprint of projects.
pub const PROJECT: &str = "harborProject";
/// Blueprint of repositories.
pub const REPOSITORY: &str = "harborRepository";
/// Blueprint of artifacts.
pub const ARTIFACT: &str = "harborArtifact";

/// An entity as Port's upsert takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entity {
    /// Unique within the blueprint.
    pub identifier: String,
    /// Shown in Port's UI.
    pub title: String,
    /// Property values; `null` clears one.
    pub properties: Map<String, Value>,
    /// Related entities' identifiers.
    pub relations: Map<String, Value>,
}

impl Entity {
    /// Whether Port holds it so (`held`, as Port answered it): the same title, and each of its
    /// properties and relations the same there (a number the same number, whatever its form;
    /// `null` the same as absent). What else Port holds is not its concern: upserts merge.
    pub fn held_as(&self, held: &Value) -> bool {
        let same = |ours: &Value, theirs: Option<&Value>| match (ours, theirs) {
            (Value::Null, None) => true,
            (Value::Number(a), Some(Value::Number(b))) => a.as_f64() == b.as_f64(),
            (ours, Some(theirs)) => ours == theirs,
            (_, None) => false,
        };
        held["title"].as_str() == Some(self.title.as_str())
            && self
                .properties
                .iter()
                .all(|(k, v)| same(v, held["properties"].get(k)))
            && self
                .relations
                .iter()
                .all(|(k, v)| same(v, held["relations"].get(k)))
    }
}
