//! Observe: what Harbor has now for a repository refresh, read at once (the repository, its
//! project when the mapping reads it, the artifacts asked for, the whole list when asked). What
//! the reads mean (gone, failed, to render) is the refresh's to decide.

use futures_util::future::join_all;

use super::Handler;
use crate::catalog::Catalog;
use crate::clients::CallError;
use crate::clients::harbor::{Artifact, Project, Repository};
use crate::mapping::Kind;
use crate::names::{Digest, RepositoryName};
use crate::plan::Work;

/// What Harbor answered for one repository refresh; `None` where the work did not need it.
pub(super) struct Observed {
    /// The repository (`Ok(None)`: gone).
    pub repository: Option<Result<Option<Repository>, CallError>>,
    /// Its project.
    pub project: Option<Result<Option<Project>, CallError>>,
    /// Each artifact asked for (`Ok(None)`: gone).
    pub artifacts: Vec<(Digest, Result<Option<Artifact>, CallError>)>,
    /// Every artifact of the repository.
    pub listed: Option<Result<Vec<Artifact>, CallError>>,
}

impl<C: Catalog> Handler<C> {
    /// Reads, all at once, what `work` needs of the repository `name`.
    pub(super) async fn observe_repository(&self, name: &RepositoryName, work: &Work) -> Observed {
        let artifacts_read = !work.artifacts.is_empty() || work.every_artifact || work.moved_tags;
        let read_repository = work.repository
            || work.every_artifact
            || (artifacts_read && self.mapping.reads_repository(Kind::Artifact));
        let read_project = (work.repository && self.mapping.reads_project(Kind::Repository))
            || (artifacts_read && self.mapping.reads_project(Kind::Artifact));
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
        let artifacts = join_all(work.artifacts.iter().map(|digest| async move {
            let found = self.call(self.harbor.artifact(name, digest)).await;
            (digest.clone(), found)
        }));
        let listed = async {
            match work.every_artifact {
                true => Some(self.call(self.harbor.artifacts(name)).await),
                false => None,
            }
        };
        let (repository, project, artifacts, listed) =
            tokio::join!(repository, project, artifacts, listed);
        Observed {
            repository,
            project,
            artifacts,
            listed,
        }
    }
}
