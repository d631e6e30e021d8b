//! Desire: the entities the mapping makes of what Harbor has, with this integration's
//! bookkeeping properties (which Harbor, which object, an artifact's tags), into a refresh's
//! batch; and `mapping render`'s view of one object.

use serde_json::{Value, json};

use super::Handler;
use super::apply::{Batch, Part};
use super::observe::Observed;
use super::report::Status;
use crate::catalog::{Catalog, INSTANCE_PROPERTY, REF_PROPERTY, TAGS_PROPERTY};
use crate::clients::CallError;
use crate::clients::harbor::Artifact;
use crate::harbor_ref::HarborRef;
use crate::mapping::{Kind, Mapped, Rendered};
use crate::names::{Digest, RepositoryName};
use crate::plan::Work;

/// What an object's expressions see besides the object: its project and repository, as Harbor
/// answered them (when the mapping reads them).
#[derive(Clone, Copy, Default)]
pub(super) struct Context<'a> {
    pub(super) project: Option<&'a Value>,
    pub(super) repository: Option<&'a Value>,
}

pub(super) fn tag_names(artifact: &Artifact) -> impl Iterator<Item = String> + '_ {
    artifact.tags.iter().flatten().map(|t| t.name.clone())
}

impl<C: Catalog> Handler<C> {
    /// The entities the mapping makes of one object as Harbor has it now (`mapping render`):
    /// `None` when Harbor does not have it.
    pub async fn render_current(
        &self,
        kind: Kind,
        project: &str,
        repository: Option<&str>,
        reference: Option<&str>,
    ) -> Result<Option<Vec<Mapped>>, String> {
        let name = match (kind, repository) {
            (Kind::Project, _) => None,
            (_, None) => return Err(format!("a {kind} needs --repository")),
            (_, Some(r)) => {
                Some(RepositoryName::parse(&format!("{project}/{r}")).map_err(|e| e.to_string())?)
            }
        };
        let fail = |e: CallError| e.to_string();
        let project_raw = match self.harbor.project(project).await.map_err(fail)? {
            None => return Ok(None),
            Some(p) => p.raw,
        };
        let rendered = match (kind, name) {
            (Kind::Project, _) | (_, None) => self.render(
                Kind::Project,
                &project_raw,
                Context::default(),
                &HarborRef::project(project).to_string(),
                None,
            ),
            (Kind::Repository, Some(name)) => {
                let Some(repository) = self.harbor.repository(&name).await.map_err(fail)? else {
                    return Ok(None);
                };
                let context = Context {
                    project: Some(&project_raw),
                    repository: None,
                };
                let reference = HarborRef::Repository(name.clone()).to_string();
                self.render(Kind::Repository, &repository.raw, context, &reference, None)
            }
            (Kind::Artifact, Some(name)) => {
                let Some(at) = reference else {
                    return Err("an artifact needs --reference (a digest or a tag)".into());
                };
                let repository = self.harbor.repository(&name).await.map_err(fail)?;
                let artifact = self.harbor.artifact_at(&name, at).await.map_err(fail)?;
                let (Some(repository), Some(artifact)) = (repository, artifact) else {
                    return Ok(None);
                };
                let digest = Digest::parse(&artifact.digest).map_err(|e| e.to_string())?;
                let context = Context {
                    project: Some(&project_raw),
                    repository: Some(&repository.raw),
                };
                let tags = Some(tag_names(&artifact).collect());
                let reference = HarborRef::Artifact(name.clone(), digest.clone()).to_string();
                self.render(Kind::Artifact, &artifact.raw, context, &reference, tags)
            }
        };
        rendered.map(|rendered| Some(rendered.entities))
    }

    /// What the mapping makes of an object, with its project and repository as Harbor answered
    /// them, or why it cannot.
    pub fn render_object(
        &self,
        kind: Kind,
        raw: &Value,
        project: Option<&Value>,
        repository: Option<&Value>,
        reference: &str,
        tags: Option<Vec<String>>,
    ) -> Result<Rendered, String> {
        let context = Context {
            project,
            repository,
        };
        self.render(kind, raw, context, reference, tags)
    }

    /// Turns an object into its entities, marked as this integration's: `harborInstance`,
    /// `harborRef` (the object) and, for artifacts, `harborTags`; their identifiers prefixed
    /// when the deployment serves several Harbors.
    pub(super) fn render(
        &self,
        kind: Kind,
        raw: &Value,
        context: Context<'_>,
        reference: &str,
        tags: Option<Vec<String>>,
    ) -> Result<Rendered, String> {
        let mut extra = vec![
            ("__harbor", &self.harbor_meta),
            ("__instance", &self.instance),
            ("__prefix", &self.prefix),
        ];
        extra.extend(context.project.map(|p| ("__project", p)));
        extra.extend(context.repository.map(|r| ("__repository", r)));
        let mut rendered = self
            .mapping
            .render(kind, raw, &extra)
            .map_err(|error| format!("{reference}: {error}"))?;
        for mapped in &mut rendered.entities {
            if let Some(prefix) = self.prefix.as_str().filter(|p| !p.is_empty()) {
                mapped.entity.identifier.insert_str(0, prefix);
            }
            let properties = &mut mapped.entity.properties;
            properties.insert(INSTANCE_PROPERTY.to_owned(), self.instance.clone());
            properties.insert(REF_PROPERTY.to_owned(), json!(reference));
            if let Some(tags) = &tags {
                properties.insert(TAGS_PROPERTY.to_owned(), json!(tags));
            }
        }
        Ok(rendered)
    }

    /// The writes a repository refresh wants of what it observed: the repository's entities
    /// (when its work asks), each artifact's as Harbor has it now, those of an artifact gone
    /// cleared, and the parts that could not be observed told so.
    pub(super) fn desire_repository(
        &self,
        name: &RepositoryName,
        work: &Work,
        observed: Observed,
    ) -> Batch {
        let Observed {
            repository,
            project,
            artifacts,
            failed,
            held,
        } = observed;
        let project = project.and_then(|p| p.ok().flatten()).map(|p| p.raw);
        let repository = repository.and_then(|r| r.ok().flatten()).map(|r| r.raw);
        let context = Context {
            project: project.as_ref(),
            repository: repository.as_ref(),
        };
        let mut batch = Batch {
            held,
            ..Batch::default()
        };
        if let Some(raw) = repository.as_ref().filter(|_| work.repository) {
            let reference = HarborRef::Repository(name.clone()).to_string();
            let alone = Context {
                repository: None,
                ..context
            };
            let rendered = self.render(Kind::Repository, raw, alone, &reference, None);
            batch.add(Part::Main, reference, rendered);
        }
        for (part, digest, found) in artifacts {
            match found {
                Ok(Some(artifact)) => {
                    self.add_artifact(&mut batch, part, name, &digest, &artifact, context)
                }
                Ok(None) => batch
                    .clear
                    .push((part, HarborRef::Artifact(name.clone(), digest).to_string())),
                Err(error) => batch.failed.push((part, Status::of::<()>(&Err(error)))),
            }
        }
        for (part, error) in failed {
            batch.failed.push((part, Status::of::<()>(&Err(error))));
        }
        batch
    }

    /// Adds an artifact's entities to a batch.
    pub(super) fn add_artifact(
        &self,
        batch: &mut Batch,
        part: Part,
        name: &RepositoryName,
        digest: &Digest,
        artifact: &Artifact,
        context: Context<'_>,
    ) {
        let reference = HarborRef::Artifact(name.clone(), digest.clone()).to_string();
        let tags = Some(tag_names(artifact).collect());
        let rendered = self.render(Kind::Artifact, &artifact.raw, context, &reference, tags);
        batch.add(part, reference, rendered);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{D1, harbor_without_anything, in_memory};
    use super::*;
    use crate::clients::harbor::Repository;

    #[tokio::test]
    async fn an_objects_entities_carry_the_bookkeeping_and_a_gone_artifact_is_cleared() {
        let handler = in_memory(&harbor_without_anything().await);
        let name = RepositoryName::parse("library/nginx").unwrap();
        let d2 = Digest::parse(&D1.replace("0a1b", "ffff")).unwrap();
        let raw = json!({"id": 1, "project_id": 1, "repository_name": "library/nginx",
            "digest": D1, "tags": [{"name": "v1"}]});
        let mut artifact: Artifact = serde_json::from_value(raw.clone()).unwrap();
        artifact.raw = raw;
        let raw = json!({"id": 1, "project_id": 1, "name": "library/nginx"});
        let mut repository: Repository = serde_json::from_value(raw.clone()).unwrap();
        repository.raw = raw;
        let observed = Observed {
            repository: Some(Ok(Some(repository))),
            project: None,
            artifacts: vec![
                (Part::Every, Digest::parse(D1).unwrap(), Ok(Some(artifact))),
                (Part::Moved, d2.clone(), Ok(None)),
            ],
            failed: Vec::new(),
            held: Default::default(),
        };
        let work = Work {
            every_artifact: true,
            ..Work::default()
        };
        let batch = handler.desire_repository(&name, &work, observed);

        let failed: Vec<String> = batch.failed.iter().map(|(_, s)| format!("{s:?}")).collect();
        assert_eq!(batch.upserts.len(), 1, "{failed:?}");
        let (part, mapped) = &batch.upserts[0];
        assert_eq!(*part, Part::Every);
        let properties = &mapped.entity.properties;
        assert_eq!(properties[INSTANCE_PROPERTY], "default");
        assert_eq!(
            properties[REF_PROPERTY],
            format!("artifact:library/nginx@{D1}")
        );
        assert_eq!(properties[TAGS_PROPERTY], json!(["v1"]));
        assert_eq!(
            batch.clear,
            [(Part::Moved, format!("artifact:library/nginx@{d2}"))]
        );
    }
}
