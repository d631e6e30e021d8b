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
