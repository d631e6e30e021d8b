//! The Harbors one deployment serves. Without `HARBOR_INSTANCES_FILE` it is one, set by the
//! single-Harbor variables (`HARBOR_URL`, `WEBHOOK_SECRET`, ...): its webhooks come to
//! `/webhook` and its events carry no instance. With the file, each instance has a name, its
//! webhooks come to `/webhook/<name>` with its own secrets, and its events carry the name in
//! the [`crate::message::INSTANCE_HEADER`] and in their subject.
//!
//! ```yaml
//! instances:
//!   - name: eu                      # a-z, 0-9 and '-', at most 32
//!     url: https://harbor-eu.example.com
//!     username: robot$port-sync
//!     password_file: /run/secrets/harbor-eu-password     # or password: ...
//!     webhook_secret_file: /run/secrets/harbor-eu-webhook # or webhook_secret: ...
//! ```
//!
//! Each secret is given as a value or as a file (a relative path is read from the instances
//! file's folder), never both; a webhook secret may list several, comma-separated (rotation).
//! Each binary reads only what it needs: the ingest the webhook secrets, the worker the rest.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde::Deserialize;

use crate::config::{secret_from, secrets_from};

/// The `harborInstance` of a single Harbor's entities (set without `HARBOR_INSTANCES_FILE`).
pub const DEFAULT_INSTANCE: &str = "default";

/// The `harbor` metric label of a request or event that names no instance served here (no
/// instance name can be `-`).
pub const NO_INSTANCE: &str = "-";

/// The subject of a project's events: the project, after its instance's name when named.
pub fn subject(instance: Option<&str>, project: &str) -> String {
    match instance {
        Some(instance) => format!("{instance}/{project}"),
        None => project.to_owned(),
    }
}

/// One Harbor of the file, its secrets not yet read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Its name: in its endpoint, its events and its entities' `harborInstance`.
    pub name: String,
    /// Harbor's address.
    #[serde(default)]
    pub url: Option<String>,
    /// The Harbor user (a robot account).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    webhook_secret: Option<String>,
    #[serde(default)]
    webhook_secret_file: Option<PathBuf>,
    /// The folder relative secret files are read from.
    #[serde(skip)]
    folder: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    instances: Vec<Instance>,
}

impl Instance {
    /// Its Harbor password, if given.
    pub fn password(&self) -> anyhow::Result<Option<SecretString>> {
        let file = self.password_file.as_ref().map(|f| self.folder.join(f));
        secret_from(self.password.clone(), file, &self.var("password"))
    }

    /// Its webhook secrets (none if not given).
    pub fn webhook_secrets(&self) -> anyhow::Result<Vec<SecretString>> {
        let file = self
            .webhook_secret_file
            .as_ref()
            .map(|f| self.folder.join(f));
        secrets_from(
            self.webhook_secret.clone(),
            file,
            &self.var("webhook_secret"),
        )
    }

    /// How errors name one of its fields (`instance eu: password`).
    pub fn var(&self, field: &str) -> String {
        format!("HARBOR_INSTANCES_FILE instance {}: {field}", self.name)
    }
}

/// Reads and checks the instances file: at least one instance, names valid and unique.
pub fn load(path: &Path) -> anyhow::Result<Vec<Instance>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("Failed to read HARBOR_INSTANCES_FILE ({})", path.display()))?;
    let file: File = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("HARBOR_INSTANCES_FILE ({}) is not valid", path.display()))?;
    let folder = path.parent().map(Path::to_path_buf).unwrap_or_default();
    if file.instances.is_empty() {
        bail!(
            "HARBOR_INSTANCES_FILE ({}) lists no instance",
            path.display()
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    file.instances
        .into_iter()
        .map(|mut instance| {
            check_name(&instance.name)?;
            if !seen.insert(instance.name.clone()) {
                bail!(
                    "HARBOR_INSTANCES_FILE names instance {} twice",
                    instance.name
                );
            }
            instance.folder = folder.clone();
            Ok(instance)
        })
        .collect()
}

/// A name fit for a URL path, a header, a Port identifier prefix and a property value.
fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !valid {
        bail!(
            "HARBOR_INSTANCES_FILE: instance name {name:?} must be 1 to 32 of a-z, 0-9 and '-', \
             not starting or ending with '-'"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("instances-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("instances.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn secrets_are_read_from_values_or_files_beside_the_file() {
        let path = file(
            "ok",
            "instances:\n  - name: eu\n    url: https://eu.example.com\n    password_file: eu-pw\n    webhook_secret: an-old-secret-0123, a-new-secret-01234\n  - name: us-2\n    webhook_secret_file: us-hook\n",
        );
        let folder = path.parent().unwrap();
        std::fs::write(folder.join("eu-pw"), "pw\n").unwrap();
        std::fs::write(folder.join("us-hook"), "us-secret-0123456789\n").unwrap();
        let instances = load(&path).unwrap();
        let password = instances[0].password().unwrap().unwrap();
        let secrets = instances[1].webhook_secrets().unwrap();
        std::fs::remove_dir_all(folder).unwrap();
        assert_eq!(password.expose_secret(), "pw");
        assert_eq!(instances[0].webhook_secrets().unwrap().len(), 2);
        assert_eq!(instances[1].name, "us-2");
        assert_eq!(secrets[0].expose_secret(), "us-secret-0123456789");
        assert!(instances[1].password().unwrap().is_none());
    }

    #[test]
    fn bad_files_are_named_clearly() {
        for (case, text, expected) in [
            ("empty", "instances: []\n", "lists no instance"),
            ("twice", "instances:\n  - name: a\n  - name: a\n", "twice"),
            ("bad-name", "instances:\n  - name: EU\n", "must be 1 to 32"),
            (
                "unknown",
                "instances:\n  - name: a\n    pasword: x\n",
                "not valid",
            ),
        ] {
            let path = file(case, text);
            let error = format!("{:#}", load(&path).unwrap_err());
            std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
            assert!(error.contains(expected), "{case}: {error}");
        }
        let both = Instance {
            name: "a".into(),
            url: None,
            username: None,
            password: Some("hunter2".into()),
            password_file: Some("/x".into()),
            webhook_secret: None,
            webhook_secret_file: None,
            folder: PathBuf::new(),
        };
        let error = both.password().unwrap_err().to_string();
        assert!(error.contains("instance a: password and"), "{error}");
        assert!(
            error.contains("instance a: password_file are both set"),
            "{error}"
        );
        assert!(!error.contains("hunter2"));
    }

    #[test]
    fn subjects_carry_the_instance_when_named() {
        assert_eq!(subject(None, "library"), "library");
        assert_eq!(subject(Some("eu"), "library"), "eu/library");
    }
}
