//! Applying a refresh's writes to the catalog: the entities rendered are upserted by blueprint,
//! the objects gone (or left out by a selector) have this integration's entities deleted, and
//! each write is told to the part of the refresh it belongs to.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::join_all;

use super::Handler;
use super::report::{Report, Status};
use crate::catalog::{Catalog, Expected, Found, Search};
use crate::clients::CallError;
use crate::entities::Entity;
use crate::mapping::{Mapped, Rendered};
use crate::names::Digest;

/// Which part of a refresh a write belongs to, to tell it what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Part {
    Main,
    Artifact(Digest),
    Every,
    Moved,
}

/// The writes of one refresh, done together by [`Handler::execute`].
#[derive(Default)]
pub(super) struct Batch {
    pub(super) upserts: Vec<(Part, Mapped)>,
    /// Objects whose entities (this integration's) go, but those the batch upserts.
    pub(super) clear: Vec<(Part, String)>,
    /// Parts that failed before writing anything (a read, the mapping).
    pub(super) failed: Vec<(Part, Status)>,
    /// What the catalog holds of entities the refresh read it for: those it holds as they
    /// are upserted are not written again.
    pub(super) held: BTreeMap<(String, String), serde_json::Value>,
}

impl Batch {
    /// An object's entities; if a selector left it out, its other entities go.
    pub(super) fn add(
        &mut self,
        part: Part,
        reference: String,
        rendered: Result<Rendered, String>,
    ) {
        match rendered {
            Err(reason) => self.failed.push((part, Status::Failed(reason))),
            Ok(rendered) => {
                if rendered.excluded {
                    self.clear.push((part.clone(), reference));
                }
                self.upserts
                    .extend(rendered.entities.into_iter().map(|m| (part.clone(), m)));
            }
        }
    }
}

impl<C: Catalog> Handler<C> {
    /// Upserts entities of one blueprint; what became of each, in order. Not one of the
    /// `calls`: the catalog queues them at once (the first poll) and bounds its own requests.
    pub(super) async fn upsert_all(&self, blueprint: &str, entities: Vec<Entity>) -> Vec<Status> {
        let done = self.catalog.upsert(blueprint, &entities).await;
        done.iter().map(Status::of).collect()
    }

    pub(super) async fn delete(&self, found: &Found) -> Status {
        Status::of(
            &self
                .call(self.catalog.delete(&found.blueprint, &found.identifier))
                .await,
        )
    }

    /// This integration's entities a search finds, with the reference each was found by.
    pub(super) async fn find(&self, search: Search<'_>) -> Result<Vec<(String, Found)>, CallError> {
        let found = self.call(self.catalog.find(search)).await?;
        Ok(found
            .into_iter()
            .filter_map(|f| Some((f.reference.clone()?, f)))
            .collect())
    }

    /// This integration's entities of the objects whose `harborRef` starts with `prefix`.
    pub(super) async fn find_under(&self, prefix: &str) -> Result<Vec<(String, Found)>, CallError> {
        self.find(Search {
            under: Some(prefix),
            ..Search::default()
        })
        .await
    }

    /// Does a batch's writes: the upserts (by blueprint, in bulk) and the deletes of the
    /// entities of the objects to clear (all of this integration's entities of each, but those
    /// the batch upserts). Each part of the report is told what became of its own. `expected`
    /// (this refresh may still write) is written once its upserts are queued.
    pub(super) async fn execute(&self, batch: Batch, report: &mut Report, expected: &mut Expected) {
        let Batch {
            mut upserts,
            clear,
            failed,
            held,
        } = batch;
        let mut outcomes: Vec<(Part, Status)> = failed;
        let upserted: BTreeSet<(String, String)> = upserts
            .iter()
            .map(|(_, m)| (m.blueprint.clone(), m.entity.identifier.clone()))
            .collect();
        // Only what differs from what the catalog holds is written; the rest is done (and, being
        // in `upserted`, still kept from the deletes below).
        upserts.retain(|(_, m)| {
            let key = (m.blueprint.clone(), m.entity.identifier.clone());
            !held.get(&key).is_some_and(|h| m.entity.held_as(h))
        });
        let cleared = async {
            if clear.is_empty() {
                return Vec::new();
            }
            let references: Vec<&str> = clear.iter().map(|(_, r)| r.as_str()).collect();
            let search = Search {
                references: Some(&references),
                ..Search::default()
            };
            match self.find(search).await {
                Err(error) => {
                    let status = Status::of::<()>(&Err(error));
                    clear
                        .iter()
                        .map(|(p, _)| (p.clone(), status.clone()))
                        .collect()
                }
                Ok(found) => {
                    let found: Vec<(Part, Found)> = found
                        .into_iter()
                        .filter(|(_, f)| {
                            !upserted.contains(&(f.blueprint.clone(), f.identifier.clone()))
                        })
                        .filter_map(|(reference, f)| {
                            let part = clear.iter().find(|(_, r)| *r == reference)?.0.clone();
                            Some((part, f))
                        })
                        .collect();
                    let done = join_all(found.iter().map(|(_, f)| self.delete(f))).await;
                    found.into_iter().map(|(p, _)| p).zip(done).collect()
                }
            }
        };
        let mut by_blueprint: BTreeMap<String, Vec<(Part, Entity)>> = BTreeMap::new();
        for (part, mapped) in upserts {
            by_blueprint
                .entry(mapped.blueprint)
                .or_default()
                .push((part, mapped.entity));
        }
        let upserted = join_all(
            by_blueprint
                .into_iter()
                .map(|(blueprint, list)| async move {
                    let (parts, entities): (Vec<Part>, Vec<Entity>) = list.into_iter().unzip();
                    let statuses = self.upsert_all(&blueprint, entities).await;
                    parts.into_iter().zip(statuses).collect::<Vec<_>>()
                }),
        );
        let upserted = async move {
            let mut upserted = std::pin::pin!(upserted);
            // The first poll queues every upsert: nothing more is coming from this refresh.
            let first = futures_util::poll!(&mut upserted);
            expected.written();
            match first {
                std::task::Poll::Ready(done) => done,
                std::task::Poll::Pending => upserted.await,
            }
        };
        let (cleared, upserted) = tokio::join!(cleared, upserted);
        let upserted: Vec<(Part, Status)> = upserted.into_iter().flatten().collect();
        report.upserted += upserted.len();
        report.deleted += cleared.len();
        outcomes.extend(cleared);
        outcomes.extend(upserted);
        for (part, status) in outcomes {
            let slot = match part {
                Part::Main => &mut report.main,
                Part::Artifact(digest) => report.artifacts.entry(digest).or_default(),
                Part::Every => &mut report.every_artifact,
                Part::Moved => &mut report.moved_tags,
            };
            *slot = std::mem::take(slot).and(&status);
        }
    }
}
