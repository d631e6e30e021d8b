//! The refreshes: for a [`Key`], read what Harbor has now, render it through the mapping, and
//! write what differs to Port. Knows Harbor and Port, nothing of RabbitMQ; what to refresh is
//! [`crate::plan`]'s.
//!
//! An event only says *what to refresh*: Harbor gives no ordering and sends duplicates, so a
//! refresh always reads the current state from Harbor and writes that to Port. The
//! [`crate::schedule`] never runs two refreshes of one key at once, so a write never carries
//! state read before the state an earlier write of the same entity carried.
//!
//! What Harbor answers 404 for is gone: its entity is deleted, and a repository takes the
//! entities of all its artifacts with it, a project those of its repositories. Only entities
//! this integration wrote (its `harborInstance` property) are found and deleted that way.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use harbor_shared::instances::{self, DEFAULT_INSTANCE};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tracing::debug;

use crate::catalog::{Catalog, Expected, PortCatalog, Search};
use crate::clients::harbor::HarborClient;
use crate::harbor_ref::HarborRef;
use crate::mapping::{Kind, Mapping};
use crate::names::RepositoryName;
use crate::plan::{self, Key, Plan, Work};
use crate::schedule::{Judgement, Reconcile};

mod apply;
mod desire;
mod observe;
mod report;

pub use report::Report;

use apply::{Batch, Part};
use desire::Context;
use report::{Status, verdict};

/// Which Harbor a handler serves, as its events and its entities name it.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Its name in HARBOR_INSTANCES_FILE, which its events carry; `None` for the single Harbor
    /// of HARBOR_URL (its entities' `harborInstance` is `default`).
    pub name: Option<String>,
    /// Its entities' identifiers start with `<name>:` (when the deployment serves several
    /// Harbors, so that two `library/nginx` never collide); the mapping sees it as `.__prefix`,
    /// for the relations to Harbor's entities.
    pub prefixed: bool,
}

impl Identity {
    /// The value of [`crate::catalog::INSTANCE_PROPERTY`] its entities carry: its name, or `default`.
    pub fn instance(&self) -> &str {
        self.name.as_deref().unwrap_or(DEFAULT_INSTANCE)
    }
}

/// Turns events into refreshes, and refreshes into Port writes.
pub struct Handler<C = PortCatalog> {
    harbor: HarborClient,
    catalog: C,
    mapping: Arc<Mapping>,
    /// Its name in events, if named.
    name: Option<String>,
    /// The value of [`crate::catalog::INSTANCE_PROPERTY`], and `.__instance` in the mapping's objects.
    instance: Value,
    /// What identifiers start with (`.__prefix`: `""` when not prefixed).
    prefix: Value,
    /// `.__harbor` in the mapping's objects.
    harbor_meta: Value,
    /// How long a pull waits for more pulls of the same repository.
    pull_window: Duration,
    /// One permit per call to Harbor or Port in flight (shared by a deployment's handlers).
    calls: Arc<Semaphore>,
}

impl<C: Catalog> Handler<C> {
    /// A handler with its clients; a call to Harbor or the catalog takes one of `calls`'
    /// permits.
    pub fn new(
        harbor: HarborClient,
        catalog: C,
        mapping: Arc<Mapping>,
        identity: Identity,
        pull_window: Duration,
        calls: Arc<Semaphore>,
    ) -> Self {
        let url = harbor.base().as_str().trim_end_matches('/').to_owned();
        let instance = identity.instance();
        Self {
            harbor_meta: json!({"url": url, "name": instance}),
            instance: json!(instance),
            prefix: match identity.prefixed {
                true => json!(format!("{instance}:")),
                false => json!(""),
            },
            name: identity.name,
            harbor,
            catalog,
            mapping,
            pull_window,
            calls,
        }
    }

    /// The Harbor client, for commands that read Harbor directly.
    pub fn harbor(&self) -> &HarborClient {
        &self.harbor
    }

    /// The mapping it renders with.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The catalog it writes to.
    pub fn catalog(&self) -> &C {
        &self.catalog
    }

    /// Which Harbor this is (the value of [`crate::catalog::INSTANCE_PROPERTY`]).
    pub fn instance(&self) -> &str {
        self.instance.as_str().unwrap_or(DEFAULT_INSTANCE)
    }

    /// Its name in HARBOR_INSTANCES_FILE, which its events carry.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The subject of a project's events (the ingest's `x-subject`): the work queue that
    /// refreshes it.
    pub fn subject(&self, project: &str) -> String {
        instances::subject(self.name(), project)
    }

    async fn call<T>(&self, call: impl Future<Output = T>) -> T {
        // Never closed: the permit is always granted.
        let _permit = self.calls.acquire().await;
        call.await
    }

    async fn refresh_project(&self, name: &str, expected: &mut Expected) -> Report {
        let mut report = Report::default();
        match self.call(self.harbor.project(name)).await {
            Err(error) => report.main = Status::of::<()>(&Err(error)),
            Ok(Some(project)) => {
                let mut batch = Batch::default();
                let rendered = self.render(
                    Kind::Project,
                    &project.raw,
                    Context::default(),
                    &HarborRef::project(name).to_string(),
                    None,
                );
                batch.add(Part::Main, HarborRef::project(name).to_string(), rendered);
                self.execute(batch, &mut report, expected).await;
            }
            Ok(None) => {
                // Gone: its repositories go first (each through its own refresh), then it.
                let repositories = HarborRef::repositories_of(name);
                match self.find_under(&repositories).await {
                    Err(error) => report.main = Status::of::<()>(&Err(error)),
                    Ok(repositories) if !repositories.is_empty() => {
                        let names: BTreeSet<RepositoryName> = repositories
                            .iter()
                            .filter_map(|(reference, _)| match HarborRef::parse(reference) {
                                Some(HarborRef::Repository(name)) => Some(name),
                                _ => None,
                            })
                            .collect();
                        report.first = names
                            .into_iter()
                            .map(|r| {
                                let work = Work {
                                    repository: true,
                                    ..Work::default()
                                };
                                (Key::Repository(r), work)
                            })
                            .collect();
                    }
                    Ok(_) => {
                        let mut batch = Batch::default();
                        batch
                            .clear
                            .push((Part::Main, HarborRef::project(name).to_string()));
                        self.execute(batch, &mut report, expected).await;
                    }
                }
            }
        }
        report
    }

    async fn refresh_repository(
        &self,
        name: &RepositoryName,
        work: &Work,
        expected: &mut Expected,
    ) -> Report {
        let observed = self.observe_repository(name, work).await;
        if let Some(Ok(None)) = observed.repository {
            expected.written();
            return self.repository_gone(name, work).await;
        }
        let mut report = Report::default();
        if let Some(Err(error)) = &observed.project {
            // Every part needs it: each is told.
            let failed = Status::of::<()>(&Err(error.clone()));
            report.main = failed.clone();
            report.moved_tags = failed.clone();
            report.every_artifact = failed.clone();
            for digest in &work.artifacts {
                report.artifacts.insert(digest.clone(), failed.clone());
            }
            return report;
        }
        if let Some(Err(error)) = &observed.repository {
            report.main = Status::of::<()>(&Err(error.clone()));
        }
        let batch = self.desire_repository(name, work, observed);
        self.execute(batch, &mut report, expected).await;
        report
    }

    /// The repository is gone: the entities of all its artifacts (this integration's) and its
    /// own are deleted, the artifacts' first.
    async fn repository_gone(&self, name: &RepositoryName, work: &Work) -> Report {
        let mut report = Report::default();
        let prefix = HarborRef::artifacts_of(name);
        let own = HarborRef::Repository(name.clone()).to_string();
        let own = [own.as_str()];
        let own = Search {
            references: Some(&own),
            ..Search::default()
        };
        let searches = tokio::join!(self.find_under(&prefix), self.find(own));
        let status = match searches {
            (Err(error), _) | (_, Err(error)) => Status::of::<()>(&Err(error)),
            (Ok(artifacts), Ok(own)) => {
                let deletes = join_all(artifacts.iter().map(|(_, a)| self.delete(a))).await;
                report.deleted = deletes.len();
                // The repository's entities last, once nothing of it is left to relate to them.
                match Status::all(&deletes) {
                    Status::Done => {
                        let own = join_all(own.iter().map(|(_, r)| self.delete(r))).await;
                        report.deleted += own.len();
                        Status::all(&own)
                    }
                    failed => failed,
                }
            }
        };
        debug!(repository = %name, deleted = report.deleted, "Repository gone");
        report.main = status.clone();
        report.moved_tags = status.clone();
        report.every_artifact = status.clone();
        for digest in &work.artifacts {
            report.artifacts.insert(digest.clone(), status.clone());
        }
        report
    }
}

impl<C: Catalog> Reconcile for Handler<C> {
    type Key = Key;
    type Work = Work;
    type Report = Report;

    async fn run(&self, key: &Key, work: &Work) -> Report {
        // In flight until the report is made.
        let mut expected = self.catalog.expect_writes();
        let report = match key {
            Key::Project(name) => self.refresh_project(name, &mut expected).await,
            Key::Repository(name) => self.refresh_repository(name, work, &mut expected).await,
        };
        debug!(
            ?key,
            upserted = report.upserted,
            deleted = report.deleted,
            "Refreshed"
        );
        report
    }

    fn judge(&self, report: &Report, asked: &Work) -> Judgement<Key, Work> {
        verdict(report, asked)
    }
}

impl<C: Catalog> Handler<C> {
    /// The subject whose work queue refreshes `key`.
    pub fn subject_of(&self, key: &Key) -> String {
        match key {
            Key::Project(name) => self.subject(name),
            Key::Repository(name) => self.subject(name.project()),
        }
    }

    /// What a delivery's body asks for.
    pub fn plan(&self, body: &[u8]) -> Plan<Key, Work> {
        plan::plan(body, self.pull_window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{INSTANCE_PROPERTY, REF_PROPERTY};
    use crate::entities::Entity;

    pub(super) const D1: &str =
        "sha256:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    /// A handler of the default mapping, reading the Harbor at `harbor`, writing to memory.
    pub(super) fn in_memory(
        harbor: &wiremock::MockServer,
    ) -> Handler<crate::catalog::MemoryCatalog> {
        let http = crate::clients::Http::new(Duration::from_secs(5), 1 << 20).unwrap();
        Handler::new(
            HarborClient::new(
                http,
                url::Url::parse(&harbor.uri()).unwrap(),
                "robot$sync".into(),
                secrecy::SecretString::from("password"),
            ),
            crate::catalog::MemoryCatalog::default(),
            Arc::new(Mapping::default_mapping()),
            Identity {
                name: None,
                prefixed: false,
            },
            Duration::ZERO,
            Arc::new(Semaphore::new(4)),
        )
    }

    pub(super) fn ours(reference: &str) -> Entity {
        Entity {
            identifier: reference.to_owned(),
            title: reference.to_owned(),
            properties: json!({INSTANCE_PROPERTY: "default", REF_PROPERTY: reference})
                .as_object()
                .unwrap()
                .clone(),
            relations: serde_json::Map::new(),
        }
    }

    /// A Harbor that answers every read with its 404: it has nothing.
    pub(super) async fn harbor_without_anything() -> wiremock::MockServer {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let harbor = MockServer::start().await;
        let not_found = json!({"errors": [{"code": "NOT_FOUND", "message": "not found"}]});
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(404).set_body_json(not_found))
            .mount(&harbor)
            .await;
        harbor
    }

    /// A Harbor answering each of `routes` (a path, and its answer) to a GET.
    pub(super) async fn harbor_answering(
        routes: impl IntoIterator<Item = (String, Value)>,
    ) -> wiremock::MockServer {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let harbor = MockServer::start().await;
        for (route, body) in routes {
            Mock::given(method("GET"))
                .and(path(route))
                .respond_with(ResponseTemplate::new(200).set_body_json(body))
                .mount(&harbor)
                .await;
        }
        harbor
    }

    #[tokio::test]
    async fn a_repository_harbor_no_longer_has_takes_its_artifacts_entities_with_it() {
        let harbor = harbor_without_anything().await;
        let handler = in_memory(&harbor);
        let d2 = D1.replace("0a1b", "ffff");
        for (blueprint, reference) in [
            ("harborRepository", "repository:library/nginx".to_owned()),
            ("harborArtifact", format!("artifact:library/nginx@{D1}")),
            ("harborArtifact", format!("artifact:library/nginx@{d2}")),
            ("harborArtifact", format!("artifact:library/redis@{D1}")),
        ] {
            handler.catalog.upsert(blueprint, &[ours(&reference)]).await;
        }

        let name = RepositoryName::parse("library/nginx").unwrap();
        let work = Work {
            repository: true,
            ..Work::default()
        };
        let report = handler.run(&Key::Repository(name), &work).await;

        assert_eq!(verdict(&report, &work), Judgement::Done);
        assert_eq!(report.deleted, 3);
        let left: Vec<String> = handler
            .catalog
            .entities
            .lock()
            .unwrap()
            .keys()
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(left, [format!("artifact:library/redis@{D1}")]);
    }

    /// An every-artifact refresh reads what the catalog holds: a second one, Harbor unchanged,
    /// writes nothing; an entity edited in the catalog is put right.
    #[tokio::test]
    async fn an_every_artifact_refresh_writes_only_what_differs_from_the_catalog() {
        let nginx = "/api/v2.0/projects/library/repositories/nginx";
        let artifact = |digest: &str| {
            json!({"id": 1, "project_id": 1, "repository_name": "library/nginx",
                   "digest": digest, "tags": [{"name": "v1"}]})
        };
        let d2 = D1.replace("0a1b", "ffff");
        let routes = [
            (
                nginx.to_owned(),
                json!({"id": 1, "project_id": 1, "name": "library/nginx"}),
            ),
            (
                format!("{nginx}/artifacts"),
                json!([artifact(D1), artifact(&d2)]),
            ),
            (
                "/api/v2.0/projects/library".to_owned(),
                json!({"project_id": 1, "name": "library"}),
            ),
        ];
        let harbor = harbor_answering(routes).await;
        let handler = in_memory(&harbor);
        let key = Key::Repository(RepositoryName::parse("library/nginx").unwrap());
        let work = Work {
            every_artifact: true,
            ..Work::default()
        };

        let first = handler.run(&key, &work).await;
        assert_eq!(
            (verdict(&first, &work), first.upserted),
            (Judgement::Done, 2)
        );
        let again = handler.run(&key, &work).await;
        assert_eq!(
            (verdict(&again, &work), again.upserted),
            (Judgement::Done, 0)
        );

        let edited = format!("library/nginx@{D1}");
        handler
            .catalog
            .entities
            .lock()
            .unwrap()
            .get_mut(&("harborArtifact".to_owned(), edited))
            .unwrap()
            .title = "edited in Port".into();
        let repaired = handler.run(&key, &work).await;
        assert_eq!(repaired.upserted, 1);
    }
}
