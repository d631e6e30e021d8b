//! The destination the refreshes write to, as the worker needs it: find this integration's
//! entities by the Harbor object they come from (a `harborRef` prefix, optionally with a tag),
//! upsert a set of one blueprint, delete one. [`PortCatalog`] is Port's: its search language
//! and its bulk limit live here and nowhere else. Every entity this integration writes carries
//! [`INSTANCE_PROPERTY`], and only those are ever found.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::clients::CallError;
use crate::clients::port::PortClient;
use crate::entities::Entity;

mod coming;
mod reader;
mod writer;

use coming::Coming;
pub use coming::Expected;
use reader::Reader;
use writer::Writer;

/// The property every entity this integration writes carries: which Harbor it came from. It is
/// how the worker tells its entities from others when it deletes what Harbor no longer has.
pub const INSTANCE_PROPERTY: &str = "harborInstance";

/// The property that says which Harbor object an entity comes from ([`crate::harbor_ref`]),
/// whatever the mapping makes its identifier.
pub const REF_PROPERTY: &str = "harborRef";

/// The property that holds an artifact's tags, for finding the artifacts a pushed tag moved off.
pub const TAGS_PROPERTY: &str = "harborTags";

/// One of this integration's entities, as a search finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its identifier.
    pub identifier: String,
    /// Its blueprint.
    pub blueprint: String,
    /// Its `harborRef`; `None` on entities written before references existed.
    pub reference: Option<String>,
    /// Its `harborTags` (an artifact's).
    pub tags: Vec<String>,
    /// What the catalog holds of it (title, properties, relations), when the search asked.
    pub held: Option<Value>,
}

/// Which of this integration's entities to find: all of them, narrowed by each part given.
#[derive(Debug, Clone, Copy, Default)]
pub struct Search<'a> {
    /// Those whose `harborRef` is one of these.
    pub references: Option<&'a [&'a str]>,
    /// Those whose `harborRef` starts with this.
    pub under: Option<&'a str>,
    /// Those carrying any of these tags.
    pub tagged: Option<&'a BTreeSet<String>>,
    /// With what the catalog holds of each, to write only what differs.
    pub whole: bool,
}

/// What the worker needs of the catalog it writes to.
pub trait Catalog: Send + Sync + 'static {
    /// This integration's entities (of this Harbor) that `search` names.
    fn find(
        &self,
        search: Search<'_>,
    ) -> impl Future<Output = Result<Vec<Found>, CallError>> + Send;

    /// Every one of this integration's entities (of this Harbor) in `blueprints` (all of them:
    /// `None`), each with what the catalog holds of it (`held`: title, properties, relations),
    /// to compare with what the mapping makes.
    fn holdings(
        &self,
        blueprints: Option<&BTreeSet<String>>,
    ) -> impl Future<Output = Result<Vec<Found>, CallError>> + Send;

    /// Upserts entities of one blueprint; what became of each, in order.
    fn upsert(
        &self,
        blueprint: &str,
        entities: &[Entity],
    ) -> impl Future<Output = Vec<Result<(), CallError>>> + Send;

    /// A refresh starts that may write: the catalog may wait for its writes to send them
    /// with others, until the token is dropped (its writes are queued, or it has none).
    fn expect_writes(&self) -> Expected {
        Expected::none()
    }

    /// Deletes one entity; one already gone is deleted.
    fn delete(
        &self,
        blueprint: &str,
        identifier: &str,
    ) -> impl Future<Output = Result<(), CallError>> + Send;
}

/// Port, for one Harbor's entities.
pub struct PortCatalog {
    port: Arc<PortClient>,
    /// The value of [`INSTANCE_PROPERTY`] this Harbor's entities carry.
    instance: String,
    /// Its searches, asked together across refreshes; started with the first.
    reader: OnceLock<Reader>,
    /// Its upserts, in bulk across refreshes; started with the first.
    writer: OnceLock<Writer>,
    /// The refreshes in flight that may still write.
    coming: Arc<Coming>,
}

impl PortCatalog {
    /// Port's catalog of the entities of the Harbor named `instance`, for a worker running at
    /// most `concurrency` refreshes at once.
    pub fn new(port: PortClient, instance: &str, concurrency: usize) -> Self {
        Self {
            port: Arc::new(port),
            instance: instance.to_owned(),
            reader: OnceLock::new(),
            writer: OnceLock::new(),
            coming: Arc::new(Coming::new(concurrency)),
        }
    }

    fn writer(&self) -> &Writer {
        self.writer
            .get_or_init(|| Writer::start(Arc::clone(&self.port), Arc::clone(&self.coming)))
    }

    /// The Port client, for commands that talk to Port directly (blueprints).
    pub fn port(&self) -> &PortClient {
        &self.port
    }
}

impl Catalog for PortCatalog {
    /// With the other searches waiting; a search of everything alone.
    async fn find(&self, search: Search<'_>) -> Result<Vec<Found>, CallError> {
        let reader = self.reader.get_or_init(|| {
            let coming = Arc::clone(&self.coming);
            Reader::start(Arc::clone(&self.port), self.instance.clone(), coming)
        });
        reader.find(search).await
    }

    /// Each blueprint's, page by page; without blueprints, in one search of them all.
    async fn holdings(
        &self,
        blueprints: Option<&BTreeSet<String>>,
    ) -> Result<Vec<Found>, CallError> {
        let everything = reader::query(&self.instance, &[&reader::Owned::default()]);
        let entities = match blueprints {
            None => self.port.search(&everything, &[]).await?,
            Some(blueprints) => {
                let mut entities = Vec::new();
                for blueprint in blueprints {
                    let found = self.port.search_blueprint(blueprint, &everything, &[]);
                    entities.extend(found.await?);
                }
                entities
            }
        };
        Ok(reader::found(&entities, true))
    }

    /// Through the bulk endpoint, with the upserts of the other refreshes in flight.
    async fn upsert(&self, blueprint: &str, entities: &[Entity]) -> Vec<Result<(), CallError>> {
        self.writer().upsert(blueprint, entities).await
    }

    fn expect_writes(&self) -> Expected {
        self.coming.expect()
    }

    /// Through the bulk delete, with the deletes of the other refreshes in flight.
    async fn delete(&self, blueprint: &str, identifier: &str) -> Result<(), CallError> {
        self.writer().delete(blueprint, identifier).await
    }
}

/// A catalog in memory, for the refreshes' unit tests: it holds what is upserted and finds as
/// Port's search does (by `harborRef` and `harborTags`).
#[cfg(test)]
#[derive(Default)]
pub struct MemoryCatalog {
    /// By blueprint and identifier.
    pub entities: std::sync::Mutex<std::collections::BTreeMap<(String, String), Entity>>,
}

#[cfg(test)]
impl Catalog for MemoryCatalog {
    async fn find(&self, search: Search<'_>) -> Result<Vec<Found>, CallError> {
        #[allow(clippy::unwrap_used)] // a test's lock, never poisoned
        let entities = self.entities.lock().unwrap();
        Ok(entities
            .iter()
            .filter(|(_, e)| {
                let reference = e.properties.get(REF_PROPERTY).and_then(Value::as_str);
                let tags = e.properties.get(TAGS_PROPERTY).and_then(Value::as_array);
                search
                    .references
                    .is_none_or(|refs| reference.is_some_and(|r| refs.contains(&r)))
                    && search
                        .under
                        .is_none_or(|prefix| reference.is_some_and(|r| r.starts_with(prefix)))
                    && search.tagged.is_none_or(|wanted| {
                        tags.into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .any(|t| wanted.contains(t))
                    })
            })
            .map(|((blueprint, identifier), e)| Found {
                identifier: identifier.clone(),
                blueprint: blueprint.clone(),
                reference: e
                    .properties
                    .get(REF_PROPERTY)
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                tags: e
                    .properties
                    .get(TAGS_PROPERTY)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                held: search
                    .whole
                    .then(|| serde_json::to_value(e).unwrap_or_default()),
            })
            .collect())
    }

    async fn holdings(
        &self,
        blueprints: Option<&BTreeSet<String>>,
    ) -> Result<Vec<Found>, CallError> {
        let whole = Search {
            whole: true,
            ..Search::default()
        };
        let mut found = self.find(whole).await?;
        found.retain(|f| blueprints.is_none_or(|b| b.contains(&f.blueprint)));
        Ok(found)
    }

    async fn upsert(&self, blueprint: &str, entities: &[Entity]) -> Vec<Result<(), CallError>> {
        #[allow(clippy::unwrap_used)] // a test's lock, never poisoned
        let mut held = self.entities.lock().unwrap();
        for entity in entities {
            held.insert(
                (blueprint.to_owned(), entity.identifier.clone()),
                entity.clone(),
            );
        }
        vec![Ok(()); entities.len()]
    }

    async fn delete(&self, blueprint: &str, identifier: &str) -> Result<(), CallError> {
        #[allow(clippy::unwrap_used)] // a test's lock, never poisoned
        let mut held = self.entities.lock().unwrap();
        held.remove(&(blueprint.to_owned(), identifier.to_owned()));
        Ok(())
    }
}
