//! A resync's stock-taking: what the mapping makes of everything Harbor has, what this
//! integration holds in Port (whole, as Port answers it), and so which projects and
//! repositories need a refresh: those with an entity Port lacks, holds otherwise, or holds
//! though the mapping no longer makes it. A resync of an unchanged Harbor asks for nothing.
//! (A comparison with Port's answer now, not a memory of past writes: an edit someone made in
//! Port is put right.)

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use tracing::warn;

use crate::catalog::Catalog;
use crate::clients::CallError;
use crate::entities::Entity;
use crate::handler::Handler;
use crate::harbor_ref::HarborRef;
use crate::mapping::{Kind, Rendered};
use crate::names::{Digest, RepositoryName};
use crate::plan::{REQUEST_TYPE, ResyncRequest, Target};
use crate::retry::{Budget, RetryPolicy};

/// What the mapping makes of Harbor's objects, and what this integration has in Port.
#[derive(Default)]
pub(super) struct Stock {
    /// The entities (blueprint, identifier) the mapping makes of Harbor's objects, each with
    /// the reference of its object.
    pub(super) expected: BTreeMap<(String, String), (String, Entity)>,
    /// Objects the mapping failed on: their entities are not counted as to delete (their
    /// refreshes will park with the reason).
    unknown: BTreeSet<String>,
    projects: BTreeSet<String>,
    repositories: BTreeSet<String>,
    /// This integration's entities in Port: (blueprint, identifier, harborRef).
    pub(super) ours: Vec<(String, String, Option<String>)>,
    /// What Port holds of each of them.
    held: BTreeMap<(String, String), Value>,
}

impl Stock {
    fn expect(&mut self, reference: String, rendered: Result<Rendered, String>) {
        match rendered {
            Ok(rendered) => self.expected.extend(rendered.entities.into_iter().map(|m| {
                let key = (m.blueprint, m.entity.identifier.clone());
                (key, (reference.clone(), m.entity))
            })),
            Err(reason) => {
                warn!(object = %reference, %reason, "Resync: the mapping failed on an object");
                self.unknown.insert(reference);
            }
        }
    }

    /// This integration's entities that the mapping no longer makes of anything in Harbor.
    pub(super) fn to_delete(&self) -> usize {
        self.ours
            .iter()
            .filter(|(blueprint, id, reference)| {
                !self.expected.contains_key(&(blueprint.clone(), id.clone()))
                    && reference
                        .as_ref()
                        .is_some_and(|r| !self.unknown.contains(r))
            })
            .count()
    }
}

pub(super) async fn take_stock(handler: &Handler, retry: RetryPolicy) -> Result<Stock, CallError> {
    let harbor = handler.harbor();
    let mut stock = Stock::default();
    let projects = Budget::start(retry)
        .run("harbor", || harbor.projects())
        .await?;
    for project in &projects {
        stock.projects.insert(project.name.clone());
        let reference = HarborRef::project(&project.name).to_string();
        let rendered =
            handler.render_object(Kind::Project, &project.raw, None, None, &reference, None);
        stock.expect(reference, rendered);
        let repositories = Budget::start(retry)
            .run("harbor", || harbor.repositories(&project.name))
            .await?;
        for repository in repositories {
            let Ok(name) = RepositoryName::parse(&repository.name) else {
                warn!(repository = %repository.name, "Resync: skipping a repository with an unexpected name");
                continue;
            };
            let reference = HarborRef::Repository(name.clone()).to_string();
            let rendered = handler.render_object(
                Kind::Repository,
                &repository.raw,
                Some(&project.raw),
                None,
                &reference,
                None,
            );
            stock.expect(reference, rendered);
            let artifacts = Budget::start(retry)
                .run("harbor", || harbor.artifacts(&name))
                .await?;
            for artifact in artifacts {
                let Ok(digest) = Digest::parse(&artifact.digest) else {
                    continue;
                };
                let reference = HarborRef::Artifact(name.clone(), digest.clone()).to_string();
                let tags = artifact
                    .tags
                    .iter()
                    .flatten()
                    .map(|t| t.name.clone())
                    .collect();
                let rendered = handler.render_object(
                    Kind::Artifact,
                    &artifact.raw,
                    Some(&project.raw),
                    Some(&repository.raw),
                    &reference,
                    Some(tags),
                );
                stock.expect(reference, rendered);
            }
            stock.repositories.insert(name.full().to_owned());
        }
    }
    // Each blueprint the mapping writes, page by page; all of them at once when a resource's
    // blueprint depends on its object.
    let blueprints = handler.mapping().blueprints().map(|mut named| {
        named.extend(
            stock
                .expected
                .keys()
                .map(|(blueprint, _)| blueprint.clone()),
        );
        named
    });
    let held = Budget::start(retry)
        .run("port", || handler.catalog().holdings(blueprints.as_ref()))
        .await?;
    for found in held {
        let key = (found.blueprint.clone(), found.identifier.clone());
        stock.held.insert(key, found.held.unwrap_or_default());
        stock
            .ours
            .push((found.blueprint, found.identifier, found.reference));
    }
    let unreferenced = stock.ours.iter().filter(|(_, _, r)| r.is_none()).count();
    if unreferenced > 0 {
        warn!(
            count = unreferenced,
            "Resync: entities of this integration without harborRef (written by a version before \
             the mapping file); those whose objects still exist get it when refreshed, the others \
             are left for you to delete"
        );
    }
    Ok(stock)
}

/// A refresh of each project and repository with an entity Port lacks or holds otherwise than
/// the mapping makes it, or holds though the mapping no longer makes it (or fails on its
/// object); artifacts are refreshed with their repositories.
pub(super) fn requests(stock: &Stock) -> Vec<ResyncRequest> {
    let mut projects = BTreeSet::new();
    let mut repositories = BTreeSet::new();
    let mut refresh = |reference: &str| match HarborRef::parse(reference) {
        Some(HarborRef::Project(project)) => {
            projects.insert(project);
        }
        Some(HarborRef::Repository(name) | HarborRef::Artifact(name, _)) => {
            repositories.insert(name.to_string());
        }
        None => {}
    };
    for (key, (reference, entity)) in &stock.expected {
        if !stock.held.get(key).is_some_and(|held| entity.held_as(held)) {
            refresh(reference);
        }
    }
    for (blueprint, identifier, reference) in &stock.ours {
        let key = (blueprint.clone(), identifier.clone());
        if let Some(reference) = reference.as_deref()
            && !stock.expected.contains_key(&key)
        {
            refresh(reference);
        }
    }
    for reference in &stock.unknown {
        refresh(reference);
    }
    let request = |resync| ResyncRequest {
        kind: REQUEST_TYPE.to_owned(),
        resync,
    };
    projects
        .into_iter()
        .map(|p| request(Target::Project(p)))
        .chain(
            repositories
                .into_iter()
                .filter(|r| RepositoryName::parse(r).is_ok())
                .map(|r| request(Target::Repository(r))),
        )
        .collect()
}
