//! Which Harbor object an entity comes from: its `harborRef` property (`project:<name>`,
//! `repository:<project/repo>`, `artifact:<project/repo>@<digest>`), whatever the mapping makes
//! its identifier. The worker finds an object's entities, or a repository's artifacts', by it;
//! a reference it cannot read (written by hand, or by a later version) is kept and reported,
//! never taken for an object Harbor no longer has.

use std::fmt;

use crate::names::{Digest, RepositoryName, project_name};

/// A Harbor object, as an entity's `harborRef` names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum HarborRef {
    /// A project, by name.
    Project(String),
    /// A repository.
    Repository(RepositoryName),
    /// An artifact of a repository.
    Artifact(RepositoryName, Digest),
}

impl HarborRef {
    /// A project's reference.
    pub fn project(name: &str) -> Self {
        Self::Project(name.to_owned())
    }

    /// Reads a reference; `None` for anything that is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let (kind, rest) = text.split_once(':')?;
        match kind {
            "project" => project_name(rest).ok().map(Self::project),
            "repository" => RepositoryName::parse(rest).ok().map(Self::Repository),
            "artifact" => {
                let (repository, digest) = rest.rsplit_once('@')?;
                Some(Self::Artifact(
                    RepositoryName::parse(repository).ok()?,
                    Digest::parse(digest).ok()?,
                ))
            }
            _ => None,
        }
    }

    /// What the references of a project's repositories start with.
    pub fn repositories_of(project: &str) -> String {
        format!("repository:{project}/")
    }

    /// What the references of a repository's artifacts start with.
    pub fn artifacts_of(repository: &RepositoryName) -> String {
        format!("artifact:{repository}@")
    }

    /// The repository it is or belongs to, if any.
    pub fn repository(&self) -> Option<&RepositoryName> {
        match self {
            Self::Project(_) => None,
            Self::Repository(name) | Self::Artifact(name, _) => Some(name),
        }
    }
}

impl fmt::Display for HarborRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Project(name) => write!(f, "project:{name}"),
            Self::Repository(name) => write!(f, "repository:{name}"),
            Self::Artifact(name, digest) => write!(f, "{}{digest}", Self::artifacts_of(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    #[test]
    fn references_read_back_what_they_print() {
        let repository = RepositoryName::parse("team/app/api").unwrap();
        let digest = Digest::parse(DIGEST).unwrap();
        for reference in [
            HarborRef::project("team"),
            HarborRef::Repository(repository.clone()),
            HarborRef::Artifact(repository.clone(), digest.clone()),
        ] {
            assert_eq!(HarborRef::parse(&reference.to_string()), Some(reference));
        }
        let artifact = HarborRef::Artifact(repository.clone(), digest).to_string();
        assert!(artifact.starts_with(&HarborRef::artifacts_of(&repository)));
        assert!(
            HarborRef::Repository(repository)
                .to_string()
                .starts_with(&HarborRef::repositories_of("team"))
        );
    }

    #[test]
    fn what_is_not_a_reference_is_none() {
        for text in [
            "",
            "project:",
            "project:Bad Name",
            "repository:noslash",
            "artifact:team/app@",
            "artifact:team/app@latest",
            "artifact:team/app",
            "vulnerability:CVE-2024-1",
            &format!("artifact:team/app@{DIGEST}x"),
        ] {
            assert_eq!(HarborRef::parse(text), None, "{text}");
        }
    }
}
