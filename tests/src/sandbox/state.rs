//! The sandbox's memory: Harbor's registry and Port's catalog.

use std::collections::{BTreeMap, HashSet};
use std::time::SystemTime;

use harbor_worker::names::RepositoryName;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// A project.
#[derive(Debug, Clone)]
pub struct Project {
    /// Harbor's id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Anyone may pull from it.
    pub public: bool,
}

/// A repository.
#[derive(Debug, Clone)]
pub struct Repository {
    /// Harbor's id.
    pub id: i64,
    /// Its project's id.
    pub project_id: i64,
    /// Full name, `project/name`.
    pub name: String,
    /// Creation time.
    pub created: String,
    /// Last change.
    pub updated: String,
    /// Pulls so far.
    pub pull_count: i64,
}

/// An artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// Harbor's id.
    pub id: i64,
    /// `sha256:…`
    pub digest: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Bytes.
    pub size: i64,
    /// Push time.
    pub push_time: String,
    /// Last pull, if any.
    pub pull_time: Option<String>,
    /// The scan overview, once scanned.
    pub scan: Option<Value>,
}

/// Harbor's registry.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: i64,
    /// By name.
    pub projects: BTreeMap<String, Project>,
    /// By full name.
    pub repositories: BTreeMap<String, Repository>,
    /// By repository full name.
    pub artifacts: BTreeMap<String, Vec<Artifact>>,
}

/// Now, as Harbor writes times.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Registry {
    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// `docker push repo:tag`: a new artifact carries the tag (taken from any artifact that had
    /// it); the project and repository are created as needed.
    pub fn push(&mut self, repository: &RepositoryName, tag: &str) -> Artifact {
        if !self.projects.contains_key(repository.project()) {
            let id = self.id();
            let project = Project {
                id,
                name: repository.project().to_owned(),
                created: now(),
                public: false,
            };
            self.projects.insert(project.name.clone(), project);
        }
        let project_id = self.projects[repository.project()].id;
        if !self.repositories.contains_key(repository.full()) {
            let id = self.id();
            self.repositories.insert(
                repository.full().to_owned(),
                Repository {
                    id,
                    project_id,
                    name: repository.full().to_owned(),
                    created: now(),
                    updated: now(),
                    pull_count: 0,
                },
            );
        }
        let id = self.id();
        let digest = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(
                format!("{repository}:{tag}:{id}").as_bytes()
            ))
        );
        let artifacts = self
            .artifacts
            .entry(repository.full().to_owned())
            .or_default();
        for other in artifacts.iter_mut() {
            other.tags.retain(|t| t != tag);
        }
        let artifact = Artifact {
            id,
            digest,
            tags: vec![tag.to_owned()],
            size: 2_000_000 + (id * 7919) % 50_000_000,
            push_time: now(),
            pull_time: None,
            scan: None,
        };
        artifacts.push(artifact.clone());
        if let Some(repo) = self.repositories.get_mut(repository.full()) {
            repo.updated = now();
        }
        artifact
    }

    /// `docker push` of an image Harbor has: the artifact gains the tag, which leaves any
    /// other artifact that had it.
    pub fn tag(
        &mut self,
        repository: &RepositoryName,
        digest: &str,
        tag: &str,
    ) -> Result<Artifact, String> {
        let artifacts = self
            .artifacts
            .get_mut(repository.full())
            .ok_or_else(|| format!("repository {repository} not found"))?;
        if !artifacts.iter().any(|a| a.digest == digest) {
            return Err(format!("artifact {repository}@{digest} not found"));
        }
        let mut tagged = None;
        for artifact in artifacts.iter_mut() {
            artifact.tags.retain(|t| t != tag);
            if artifact.digest == digest {
                artifact.tags.push(tag.to_owned());
                artifact.push_time = now();
                tagged = Some(artifact.clone());
            }
        }
        tagged.ok_or_else(|| format!("artifact {repository}@{digest} not found"))
    }

    /// Deletes a repository and its artifacts; returns its last artifact.
    pub fn delete_repository(&mut self, repository: &RepositoryName) -> Option<Artifact> {
        self.repositories.remove(repository.full())?;
        self.artifacts.remove(repository.full())?.pop()
    }

    /// Deletes a project and everything in it; returns one of its repositories with one of
    /// its artifacts, or `None` if it did not exist or held no artifact.
    pub fn delete_project(&mut self, name: &str) -> Option<(String, Artifact)> {
        self.projects.remove(name)?;
        let inside: Vec<String> = self
            .repositories
            .keys()
            .filter(|r| r.split_once('/').is_some_and(|(p, _)| p == name))
            .cloned()
            .collect();
        let mut last = None;
        for repository in inside {
            self.repositories.remove(&repository);
            if let Some(artifact) = self.artifacts.remove(&repository).and_then(|mut a| a.pop()) {
                last = Some((repository, artifact));
            }
        }
        last
    }

    fn artifact_mut(
        &mut self,
        repository: &RepositoryName,
        reference: &str,
    ) -> Result<&mut Artifact, String> {
        self.artifacts
            .get_mut(repository.full())
            .and_then(|all| {
                all.iter_mut()
                    .find(|a| a.digest == reference || a.tags.iter().any(|t| t == reference))
            })
            .ok_or_else(|| format!("artifact {repository}:{reference} not found"))
    }

    /// `docker pull repo:tag`: counts the pull and stamps the time.
    pub fn pull(
        &mut self,
        repository: &RepositoryName,
        reference: &str,
    ) -> Result<Artifact, String> {
        let artifact = self.artifact_mut(repository, reference)?;
        artifact.pull_time = Some(now());
        let pulled = artifact.clone();
        if let Some(repo) = self.repositories.get_mut(repository.full()) {
            repo.pull_count += 1;
        }
        Ok(pulled)
    }

    /// Deletes the artifact a tag (or digest) names.
    pub fn delete(
        &mut self,
        repository: &RepositoryName,
        reference: &str,
    ) -> Result<Artifact, String> {
        let deleted = self.artifact_mut(repository, reference)?.clone();
        if let Some(all) = self.artifacts.get_mut(repository.full()) {
            all.retain(|a| a.digest != deleted.digest);
        }
        if let Some(repo) = self.repositories.get_mut(repository.full()) {
            repo.updated = now();
        }
        Ok(deleted)
    }

    /// Scans the artifact: vulnerability counts derived from its digest, so they differ from
    /// artifact to artifact but not from scan to scan.
    pub fn scan(
        &mut self,
        repository: &RepositoryName,
        reference: &str,
    ) -> Result<Artifact, String> {
        let artifact = self.artifact_mut(repository, reference)?;
        let seed = artifact.digest.as_bytes();
        let count = |i: usize| i64::from(seed[7 + i] % 5);
        let (critical, high, medium, low) = (count(0) / 3, count(1), count(2) * 2, count(3) * 3);
        let total = critical + high + medium + low;
        let severity = [
            ("Critical", critical),
            ("High", high),
            ("Medium", medium),
            ("Low", low),
        ]
        .into_iter()
        .find(|(_, n)| *n > 0)
        .map_or("None", |(s, _)| s);
        artifact.scan = Some(json!({
            "application/vnd.security.vulnerability.report; version=1.1": {
                "report_id": uuid::Uuid::new_v4().to_string(),
                "scan_status": "Success",
                "severity": severity,
                "duration": 4,
                "summary": {"total": total, "fixable": total / 2, "summary": {"Critical": critical, "High": high, "Medium": medium, "Low": low}},
                "start_time": now(),
                "end_time": now(),
                "scanner": {"name": "Trivy", "vendor": "Aqua Security", "version": "v0.54.1"},
                "complete_percent": 100
            }
        }));
        Ok(artifact.clone())
    }

    /// An artifact by digest or tag.
    pub fn find(&self, repository: &str, reference: &str) -> Option<&Artifact> {
        self.artifacts
            .get(repository)?
            .iter()
            .find(|a| a.digest == reference || a.tags.iter().any(|t| t == reference))
    }
}

/// Port's catalog.
#[derive(Debug, Default)]
pub struct PortStore {
    /// Blueprints by identifier.
    pub blueprints: BTreeMap<String, Value>,
    /// Entities by blueprint, then identifier.
    pub entities: BTreeMap<String, BTreeMap<String, Value>>,
    /// Access tokens handed out.
    pub tokens: HashSet<String>,
    /// The latest entity writes, oldest first (at most [`REQUEST_LOG`]).
    pub requests: std::collections::VecDeque<Value>,
}

/// How many entity writes the sandbox's Port remembers.
pub const REQUEST_LOG: usize = 1000;

impl PortStore {
    /// Remembers an entity write and its answer.
    pub fn record(&mut self, method: &str, blueprint: &str, identifier: &str, status: u16) {
        if self.requests.len() == REQUEST_LOG {
            self.requests.pop_front();
        }
        self.requests.push_back(json!({
            "at": now(), "method": method, "blueprint": blueprint, "identifier": identifier, "status": status,
        }));
    }
}
