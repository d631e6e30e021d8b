//! Harbor's objects as its API answers them: read into their types, and each kept whole (`raw`)
//! for the mapping.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// A Harbor project (`GET /projects/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Project {
    pub project_id: i64,
    pub name: String,
    pub owner_name: Option<String>,
    pub repo_count: Option<i64>,
    pub creation_time: Option<String>,
    pub update_time: Option<String>,
    pub metadata: ProjectMetadata,
    /// The answer as Harbor sent it, for the mapping.
    #[serde(skip)]
    pub raw: Value,
}

/// Project settings; Harbor sends booleans as the strings `"true"` / `"false"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProjectMetadata {
    pub public: Option<String>,
}

/// A repository (`GET /projects/{p}/repositories/{r}`); `name` is the full name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Repository {
    pub id: i64,
    pub project_id: i64,
    pub name: String,
    pub description: Option<String>,
    pub artifact_count: Option<i64>,
    pub pull_count: Option<i64>,
    pub creation_time: Option<String>,
    pub update_time: Option<String>,
    /// The answer as Harbor sent it, for the mapping.
    #[serde(skip)]
    pub raw: Value,
}

/// An artifact (`GET .../artifacts/{digest}`) with tags, labels and scan overview.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Artifact {
    pub id: i64,
    pub project_id: i64,
    pub repository_name: Option<String>,
    pub digest: String,
    pub size: Option<i64>,
    #[serde(rename = "type")]
    pub artifact_type: Option<String>,
    pub media_type: Option<String>,
    pub manifest_media_type: Option<String>,
    pub push_time: Option<String>,
    pub pull_time: Option<String>,
    pub tags: Option<Vec<Tag>>,
    pub labels: Option<Vec<Label>>,
    pub scan_overview: Option<BTreeMap<String, ScanSummary>>,
    /// The answer as Harbor sent it, for the mapping.
    #[serde(skip)]
    pub raw: Value,
}

/// An object as Harbor answers it: read into its type, and kept whole for the mapping.
pub trait Answer: for<'de> Deserialize<'de> {
    /// Keeps the whole answer beside the fields read from it.
    fn keep(&mut self, raw: Value);
}

macro_rules! answer {
    ($($t:ty),*) => {$(
        impl Answer for $t {
            fn keep(&mut self, raw: Value) {
                self.raw = raw;
            }
        }
    )*};
}
answer!(Project, Repository, Artifact);

/// Reads an answer, keeping it whole.
pub(super) fn read<T: Answer>(raw: Value) -> Result<T, serde_json::Error> {
    let mut typed = T::deserialize(&raw)?;
    typed.keep(raw);
    Ok(typed)
}

/// A tag of an artifact.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Tag {
    pub name: String,
}

/// A label on an artifact.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Label {
    pub name: String,
}

/// One scan report's summary (`NativeReportSummary`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ScanSummary {
    pub scan_status: Option<String>,
    pub severity: Option<String>,
    pub summary: Option<VulnerabilitySummary>,
    pub scanner: Option<Scanner>,
}

/// Vulnerability counts; `summary` maps a severity (`Critical`, ...) to a count.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct VulnerabilitySummary {
    pub total: Option<i64>,
    pub fixable: Option<i64>,
    pub summary: Option<BTreeMap<String, i64>>,
}

/// The scanner that produced a report.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Scanner {
    pub name: Option<String>,
    pub vendor: Option<String>,
    pub version: Option<String>,
}
