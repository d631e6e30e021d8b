//! Harbor names, checked once: a repository's full name and an artifact digest.

use std::fmt;

use harbor_shared::quote::quoted;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Why a name from an event is unusable.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Not `project/repository` in Harbor's character set (the name, quoted in part).
    #[error("invalid repository name {0}")]
    Repository(String),
    /// Not `algorithm:hex`.
    #[error("invalid digest {0}")]
    Digest(String),
}

/// A repository's full name, `project/name` where the name may itself contain `/`
/// (`myproj/team/api`). Components are lowercase letters, digits, `.`, `_` and `-`, starting and
/// ending with a letter or digit, as Harbor and the OCI distribution spec allow.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryName {
    full: String,
    slash: usize,
}

impl RepositoryName {
    /// Checks a full name.
    pub fn parse(full: &str) -> Result<Self, NameError> {
        match full.find('/') {
            Some(slash) if full.len() <= 255 && full.split('/').all(component_ok) => Ok(Self {
                full: full.to_owned(),
                slash,
            }),
            _ => Err(NameError::Repository(quoted(full))),
        }
    }

    /// `myproj/team/api`
    pub fn full(&self) -> &str {
        &self.full
    }

    /// `myproj`
    pub fn project(&self) -> &str {
        &self.full[..self.slash]
    }

    /// `team/api`: the name inside the project.
    pub fn name(&self) -> &str {
        &self.full[self.slash + 1..]
    }

    /// The name inside the project with `/` encoded once (`team%2Fapi`). Harbor's API wants it
    /// encoded twice in paths (`team%252Fapi`); pushing this value as a URL path segment adds
    /// the second encoding (`%` → `%25`).
    pub fn encoded_once(&self) -> String {
        utf8_percent_encode(self.name(), UNRESERVED_ONLY).to_string()
    }
}

/// One path component: lowercase letters, digits, `.`, `_` and `-`, starting and ending with a
/// letter or digit.
fn component_ok(component: &str) -> bool {
    let bytes = component.as_bytes();
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// Checks a project name (one component, as in a repository's full name).
pub fn project_name(name: &str) -> Result<&str, NameError> {
    if name.len() <= 255 && component_ok(name) {
        Ok(name)
    } else {
        Err(NameError::Repository(quoted(name)))
    }
}

/// Encodes everything but RFC 3986's unreserved characters.
const UNRESERVED_ONLY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// An artifact digest, `algorithm:hex` (`sha256:` followed by 64 lowercase hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Checks a digest: `sha256` with 64 hex digits or `sha512` with 128, lowercase.
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let valid = match raw.split_once(':') {
            Some(("sha256", hex)) => hex.len() == 64,
            Some(("sha512", hex)) => hex.len() == 128,
            _ => false,
        } && raw
            .split_once(':')
            .is_some_and(|(_, hex)| hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(NameError::Digest(quoted(raw)))
        }
    }

    /// `sha256:…`
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_repository_names_split_at_the_first_slash() {
        let name = RepositoryName::parse("myproj/team/api").unwrap();
        assert_eq!(name.project(), "myproj");
        assert_eq!(name.name(), "team/api");
        assert_eq!(name.encoded_once(), "team%2Fapi");
        let flat = RepositoryName::parse("library/nginx").unwrap();
        assert_eq!(flat.encoded_once(), "nginx");
    }

    #[test]
    fn pushing_the_encoded_name_as_a_path_segment_double_encodes_it() {
        let name = RepositoryName::parse("myproj/team/api").unwrap();
        let mut url = url::Url::parse("https://harbor.example.com/api/v2.0").unwrap();
        url.path_segments_mut().unwrap().extend([
            "projects",
            name.project(),
            "repositories",
            &name.encoded_once(),
        ]);
        assert_eq!(
            url.path(),
            "/api/v2.0/projects/myproj/repositories/team%252Fapi"
        );
    }

    #[test]
    fn bad_repository_names_are_refused() {
        for bad in [
            "nginx",
            "/nginx",
            "library/",
            "Library/nginx",
            "a//b",
            "a/../b",
            "a/-b",
            "a/b c",
            "a/b?x=1",
        ] {
            assert!(RepositoryName::parse(bad).is_err(), "{bad}");
        }
        assert!(RepositoryName::parse(&format!("a/{}", "b".repeat(254))).is_err());
    }

    #[test]
    fn digests_must_be_full_and_lowercase() {
        let hex = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
        assert!(Digest::parse(&format!("sha256:{hex}")).is_ok());
        assert!(Digest::parse(&format!("sha512:{hex}{hex}")).is_ok());
        for bad in [
            hex.to_owned(),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{}", hex.to_uppercase()),
            format!("md5:{hex}"),
            "latest".to_owned(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }
}
