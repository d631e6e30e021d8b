//! Observe: what Harbor has now for a repository refresh, and which of this integration's
//! entities the catalog holds where the refresh must compare. Read in three rounds, each at once:
//! the repository, its project (when the mapping reads it), the artifacts asked for and the whole
//! list, with the catalog's entities of the repository's artifacts; then the catalog's artifacts
//! showing a tag an artifact asked for now has; then, alone, each artifact the catalog shows that
//! the list missed or that a tag moved off. What the reads mean (gone, failed, to render) is
//! desire's and apply's to decide.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::join_all;
use harbor_shared::quote::quoted;
use serde_json::Value;
use tracing::{debug, warn};

use super::Handler;
use super::apply::Part;
use super::desire::tag_names;
use crate::catalog::{Catalog, Search};
use crate::clients::CallError;
use crate::clients::harbor::{Artifact, Project, Repository};
use crate::harbor_ref::HarborRef;
use crate::mapping::Kind;
use crate::names::{Digest, RepositoryName};
use crate::plan::Work;

/// One artifact as Harbor answered it (`Ok(None)`: gone), and the part of the refresh it answers.
pub(super) type Read = (Part, Digest, Result<Option<Artifact>, CallError>);

/// What one repository refresh observed; `None` where the work did not need it.
pub(super) struct Observed {
    /// The repository (`Ok(None)`: gone).
    pub repository: Option<Result<Option<Repository>, CallError>>,
    /// Its project.
    pub project: Option<Result<Option<Project>, CallError>>,
    /// Each artifact read, once: those asked for, those listed, those read alone.
    pub artifacts: Vec<Read>,
    /// The parts that could not be observed (the list, a catalog search).
    pub failed: Vec<(Part, CallError)>,
    /// What the catalog holds of the repository's artifacts' entities (every-artifact refreshes),
    /// by blueprint and identifier.
    pub held: BTreeMap<(String, String), Value>,
}

impl<C: Catalog> Handler<C> {
    /// Reads what `work` needs of the repository `name`, from Harbor and from the catalog.
    pub(super) async fn observe_repository(&self, name: &RepositoryName, work: &Work) -> Observed {
        let artifacts_read = !work.artifacts.is_empty() || work.every_artifact || work.moved_tags;
        let read_repository = work.repository
            || work.every_artifact
            || (artifacts_read && self.mapping.reads_repository(Kind::Artifact));
        let read_project = (work.repository && self.mapping.reads_project(Kind::Repository))
            || (artifacts_read && self.mapping.reads_project(Kind::Artifact));
        let prefix = HarborRef::artifacts_of(name);
        let repository = async {
            match read_repository {
                true => Some(self.call(self.harbor.repository(name)).await),
                false => None,
            }
        };
        let project = async {
            match read_project {
                true => Some(self.call(self.harbor.project(name.project())).await),
                false => None,
            }
        };
        let asked = self.read_alone(name, Part::Artifact, work.artifacts.iter().cloned());
        let listed = async {
            match work.every_artifact {
                true => Some(tokio::join!(
                    self.call(self.harbor.artifacts(name)),
                    // Whole: what the catalog holds is compared, and only what differs written.
                    self.find(Search {
                        under: Some(&prefix),
                        whole: true,
                        ..Search::default()
                    })
                )),
                false => None,
            }
        };
        let (repository, project, asked, listed) = tokio::join!(repository, project, asked, listed);

        let mut observed = Observed {
            repository,
            project,
            artifacts: Vec::new(),
            failed: Vec::new(),
            held: BTreeMap::new(),
        };
        if matches!(observed.repository, Some(Ok(None))) {
            // Gone: there is nothing more to read.
            observed.artifacts = asked;
            return observed;
        }
        // Each digest is read once: an artifact asked for, listed, or read alone.
        let mut seen: BTreeSet<Digest> = asked
            .iter()
            .filter(|(_, _, found)| matches!(found, Ok(Some(_))))
            .map(|(_, digest, _)| digest.clone())
            .collect();
        let tags: BTreeSet<String> = asked
            .iter()
            .filter_map(|(_, _, found)| found.as_ref().ok().and_then(Option::as_ref))
            .flat_map(tag_names)
            .collect();
        observed.artifacts = asked;
        let mut alone = Vec::new();
        match listed {
            None => {}
            Some((Err(error), _)) | Some((_, Err(error))) => {
                observed.failed.push((Part::Every, error));
            }
            Some((Ok(listed), Ok(in_catalog))) => {
                observed.held = in_catalog
                    .iter()
                    .filter_map(|(_, f)| {
                        let key = (f.blueprint.clone(), f.identifier.clone());
                        Some((key, f.held.clone()?))
                    })
                    .collect();
                let unlisted = self.unlisted(name, &listed, in_catalog);
                for artifact in listed {
                    let Ok(digest) = Digest::parse(&artifact.digest) else {
                        warn!(repository = %name, digest = %artifact.digest, "Skipping an artifact with an unexpected digest");
                        continue;
                    };
                    // Once: an artifact pushed while the list is read can come on two pages.
                    if seen.insert(digest.clone()) {
                        observed
                            .artifacts
                            .push((Part::Every, digest, Ok(Some(artifact))));
                    }
                }
                let unlisted: Vec<Digest> = unlisted
                    .into_iter()
                    .filter(|d| seen.insert(d.clone()))
                    .collect();
                alone.push(self.read_alone(name, |_| Part::Every, unlisted));
            }
        }
        if work.moved_tags && !tags.is_empty() {
            match self.moved_off(name, &tags, &seen).await {
                Ok(stale) => alone.push(self.read_alone(name, |_| Part::Moved, stale)),
                Err(error) => observed.failed.push((Part::Moved, error)),
            }
        }
        observed
            .artifacts
            .extend(join_all(alone).await.into_iter().flatten());
        observed
    }

    /// The artifacts of `name` the catalog shows and Harbor's list lacks. Harbor pages by
    /// offset: an artifact deleted from an earlier page while the list was read moves a later
    /// one out of the pages read, so these are read alone, and gone only when Harbor answers
    /// 404 for one. An entity whose reference this version cannot read is kept, not taken for
    /// gone.
    fn unlisted(
        &self,
        name: &RepositoryName,
        listed: &[Artifact],
        in_catalog: Vec<(String, crate::catalog::Found)>,
    ) -> BTreeSet<Digest> {
        let listed: BTreeSet<&str> = listed.iter().map(|a| a.digest.as_str()).collect();
        let mut unlisted = BTreeSet::new();
        for (reference, _) in in_catalog {
            match HarborRef::parse(&reference) {
                Some(HarborRef::Artifact(repository, digest)) if repository == *name => {
                    if !listed.contains(digest.as_str()) {
                        unlisted.insert(digest);
                    }
                }
                _ => warn!(
                    repository = %name,
                    reference = %quoted(&reference),
                    "Keeping an entity whose harborRef this version cannot read"
                ),
            }
        }
        unlisted
    }

    /// The other artifacts of `name` the catalog shows with one of `tags` (not in `seen`): a
    /// tag moved off them.
    async fn moved_off(
        &self,
        name: &RepositoryName,
        tags: &BTreeSet<String>,
        seen: &BTreeSet<Digest>,
    ) -> Result<Vec<Digest>, CallError> {
        let prefix = HarborRef::artifacts_of(name);
        let search = Search {
            under: Some(&prefix),
            tagged: Some(tags),
            ..Search::default()
        };
        let stale: Vec<Digest> = self
            .find(search)
            .await?
            .iter()
            .filter_map(|(reference, _)| match HarborRef::parse(reference) {
                Some(HarborRef::Artifact(_, digest)) => Some(digest),
                _ => None,
            })
            .filter(|d| !seen.contains(d))
            .collect();
        if !stale.is_empty() {
            debug!(repository = %name, count = stale.len(), "Taking moved tags off older artifacts");
        }
        Ok(stale)
    }

    /// Reads each artifact from Harbor, at once, as the part `part` names for it.
    async fn read_alone(
        &self,
        name: &RepositoryName,
        part: fn(Digest) -> Part,
        digests: impl IntoIterator<Item = Digest>,
    ) -> Vec<Read> {
        join_all(digests.into_iter().map(|digest| {
            let part = part(digest.clone());
            async move {
                let found = self.call(self.harbor.artifact(name, &digest)).await;
                (part, digest, found)
            }
        }))
        .await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{D1, harbor_answering, harbor_without_anything, in_memory, ours};
    use super::*;

    const NGINX: &str = "/api/v2.0/projects/library/repositories/nginx";

    fn artifact(digest: &str, tag: &str) -> serde_json::Value {
        json!({"id": 1, "project_id": 1, "repository_name": "library/nginx", "digest": digest,
               "tags": [{"name": tag}]})
    }

    #[tokio::test]
    async fn a_refresh_observes_only_what_its_work_needs() {
        let harbor = harbor_without_anything().await;
        let handler = in_memory(&harbor);
        let name = RepositoryName::parse("library/nginx").unwrap();
        let scan = Work {
            artifacts: [Digest::parse(D1).unwrap()].into(),
            ..Work::default()
        };
        let observed = handler.observe_repository(&name, &scan).await;
        assert!(observed.repository.is_none() && observed.project.is_none());
        assert_eq!(observed.artifacts.len(), 1);
        assert!(
            matches!(observed.artifacts[0], (Part::Artifact(_), _, Ok(None))),
            "gone"
        );
        assert_eq!(harbor.received_requests().await.unwrap().len(), 1);
    }

    /// The artifact asked for, the list, what the catalog shows that the list missed (read
    /// alone, once, though a tag moved off it too): each digest read once, as its part.
    #[tokio::test]
    async fn every_digest_is_read_once_as_the_first_part_that_needs_it() {
        let d2 = D1.replace("0a1b", "ffff");
        let repository = json!({"id": 1, "project_id": 1, "name": "library/nginx"});
        let routes = [
            (NGINX.to_owned(), json!(repository)),
            (format!("{NGINX}/artifacts"), json!([artifact(D1, "v1")])),
            (format!("{NGINX}/artifacts/{D1}"), artifact(D1, "v1")),
        ];
        let harbor = harbor_answering(routes).await;
        let handler = in_memory(&harbor);
        let mut stale = ours(&format!("artifact:library/nginx@{d2}"));
        stale.properties.insert("harborTags".into(), json!(["v1"]));
        handler.catalog.upsert("harborArtifact", &[stale]).await;
        let unreadable = ours("artifact:library/nginx@not-a-digest");
        handler
            .catalog
            .upsert("harborArtifact", &[unreadable])
            .await;

        let name = RepositoryName::parse("library/nginx").unwrap();
        let work = Work {
            artifacts: [Digest::parse(D1).unwrap()].into(),
            every_artifact: true,
            moved_tags: true,
            ..Work::default()
        };
        let observed = handler.observe_repository(&name, &work).await;
        assert!(observed.failed.is_empty());
        let reads: Vec<(Part, String, bool)> = observed
            .artifacts
            .iter()
            .map(|(part, d, found)| (part.clone(), d.to_string(), matches!(found, Ok(Some(_)))))
            .collect();
        assert_eq!(
            reads,
            [
                (
                    Part::Artifact(Digest::parse(D1).unwrap()),
                    D1.to_owned(),
                    true
                ),
                (Part::Every, d2.clone(), false),
            ],
            "the unreadable reference is kept: never read, never taken for gone"
        );
    }
}
