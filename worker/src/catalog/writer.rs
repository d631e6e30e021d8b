//! The writes of every refresh in flight, sent together: each upsert or delete joins a queue,
//! and a bulk request (at most [`BULK_LIMIT`] upserts, or [`DELETE_LIMIT`] deletes, of one
//! blueprint) leaves once it is full or nothing more is coming (what [`Coming`] says), and then
//! as soon as a slot among [`IN_FLIGHT`] requests is free and Port's budget admits it. What
//! arrives meanwhile fills the next ones; a lone refresh's entities leave at once. Each
//! entity's refresh is told what Port answered for it (a 207's per-entity error goes to its
//! own refresh only). Port refuses a bulk delete whole
//! when one of its entities cannot go (dependents, say): each is then deleted alone, so that the
//! refusal is told to its own refresh.
//!
//! Order is kept where it matters: a refresh waits for Port's answer for each of its entities
//! before it is done, and the scheduler never runs two refreshes of a key at once, so a newer
//! write of an entity never leaves before an older one was answered. Two refreshes of
//! different keys may render the same entity (a mapping may): one request never carries it
//! twice.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::coming::{Coming, gather};
use crate::clients::CallError;
use crate::clients::port::{BULK_LIMIT, DELETE_LIMIT, Family, PortClient};
use crate::entities::Entity;

/// Bulk requests in flight at once.
pub const IN_FLIGHT: usize = 4;

/// A write.
#[derive(Debug, Clone)]
enum Op {
    Upsert(Entity),
    Delete(String),
}

impl Op {
    fn identifier(&self) -> &str {
        match self {
            Self::Upsert(entity) => &entity.identifier,
            Self::Delete(identifier) => identifier,
        }
    }

    fn is_delete(&self) -> bool {
        matches!(self, Self::Delete(_))
    }
}

/// One write, and whom to tell.
struct Item {
    blueprint: String,
    op: Op,
    done: oneshot::Sender<Result<(), CallError>>,
    /// When it came.
    since: Instant,
}

impl Item {
    /// Writes that may share a request: of one blueprint, all upserts or all deletes.
    fn goes_with(&self, other: &Self) -> bool {
        self.blueprint == other.blueprint && self.op.is_delete() == other.op.is_delete()
    }

    /// The most a request of its kind holds.
    fn limit(&self) -> usize {
        if self.op.is_delete() {
            DELETE_LIMIT
        } else {
            BULK_LIMIT
        }
    }
}

/// The queue of entities to upsert, and the task that writes them.
pub struct Writer {
    queue: mpsc::UnboundedSender<Item>,
}

impl Writer {
    /// Starts the task writing to `port`, waiting for what `coming` says is coming; it ends
    /// when the writer is dropped.
    pub fn start(port: Arc<PortClient>, coming: Arc<Coming>) -> Self {
        let (queue, items) = mpsc::unbounded_channel();
        tokio::spawn(run(port, items, coming));
        Self { queue }
    }

    /// Upserts entities of one blueprint, with whatever else is being written; what became of
    /// each, in order.
    pub async fn upsert(&self, blueprint: &str, entities: &[Entity]) -> Vec<Result<(), CallError>> {
        self.write(blueprint, entities.iter().cloned().map(Op::Upsert))
            .await
    }

    /// Deletes an entity (one already gone is deleted), with whatever else is being written.
    pub async fn delete(&self, blueprint: &str, identifier: &str) -> Result<(), CallError> {
        let mut done = self
            .write(blueprint, [Op::Delete(identifier.to_owned())])
            .await;
        done.pop().unwrap_or(Ok(()))
    }

    async fn write(
        &self,
        blueprint: &str,
        ops: impl IntoIterator<Item = Op>,
    ) -> Vec<Result<(), CallError>> {
        let answers: Vec<_> = ops
            .into_iter()
            .map(|op| {
                let (done, answer) = oneshot::channel();
                let item = Item {
                    blueprint: blueprint.to_owned(),
                    op,
                    done,
                    since: Instant::now(),
                };
                // A send fails only once the task is gone: the answer says so below.
                let _ = self.queue.send(item);
                answer
            })
            .collect();
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(answer.await.unwrap_or_else(|_| {
                Err(CallError::Transient {
                    reason: "the Port writer stopped before answering".into(),
                    retry_after: None,
                })
            }));
        }
        results
    }
}

async fn run(port: Arc<PortClient>, mut items: mpsc::UnboundedReceiver<Item>, coming: Arc<Coming>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut pending: VecDeque<Item> = VecDeque::new();
    let mut coming = coming.watch();
    loop {
        if pending.is_empty() {
            match items.recv().await {
                Some(item) => pending.push_back(item),
                None => return,
            }
        }
        // Until a request is full or nothing more is coming.
        gather(&mut items, &mut pending, &mut coming, |pending, flight| {
            let oldest = pending.front().map_or_else(Instant::now, |item| item.since);
            let wait = flight.wait_until(oldest, flight.count > 0, Instant::now());
            wait.filter(|_| full(pending).is_none())
        })
        .await;
        // Never closed: a slot is always granted.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let lead = full(&pending).unwrap_or(0);
        let deletes = pending.get(lead).is_some_and(|item| item.op.is_delete());
        let family = if deletes {
            Family::Entity
        } else {
            Family::BulkUpsert
        };
        port.budget().admit(family).await;
        while let Ok(item) = items.try_recv() {
            pending.push_back(item);
        }
        let batch = next_batch(&mut pending, lead);
        let port = Arc::clone(&port);
        tokio::spawn(async move {
            let each = send(&port, &batch).await;
            drop(slot);
            for (item, result) in batch.into_iter().zip(each) {
                let _ = item.done.send(result);
            }
        });
    }
}

/// Sends one request (its first attempt admitted); what became of each write.
async fn send(port: &PortClient, batch: &[Item]) -> Vec<Result<(), CallError>> {
    let Some(first) = batch.first() else {
        return Vec::new();
    };
    let blueprint = first.blueprint.as_str();
    if !first.op.is_delete() {
        let entities: Vec<Entity> = batch
            .iter()
            .filter_map(|item| match &item.op {
                Op::Upsert(entity) => Some(entity.clone()),
                Op::Delete(_) => None,
            })
            .collect();
        return match port.upsert_bulk(blueprint, &entities, true).await {
            Ok(each) => each,
            Err(error) => vec![Err(error); batch.len()],
        };
    }
    let identifiers: Vec<&str> = batch.iter().map(|item| item.op.identifier()).collect();
    match port.delete_bulk(blueprint, &identifiers, true).await {
        Ok(()) => vec![Ok(()); batch.len()],
        Err(error @ CallError::Transient { .. }) => vec![Err(error); batch.len()],
        // Refused whole: each alone, so that each refresh hears of its own.
        Err(CallError::Permanent { .. }) => {
            let alone = identifiers.iter().map(|id| port.delete(blueprint, id));
            futures_util::future::join_all(alone).await
        }
    }
}

/// The oldest write whose request would be full, if any.
fn full(pending: &VecDeque<Item>) -> Option<usize> {
    let mut seen: Vec<&Item> = Vec::new();
    pending.iter().enumerate().find_map(|(at, item)| {
        if seen.iter().any(|other| other.goes_with(item)) {
            return None;
        }
        seen.push(item);
        let mut fill = pending
            .iter()
            .skip(at)
            .filter(|other| other.goes_with(item));
        fill.nth(item.limit() - 1).map(|_| at)
    })
}

/// The next request: up to its kind's limit of the writes that go with the one at `lead`,
/// each identifier once, in the order they came; the rest keep theirs.
fn next_batch(pending: &mut VecDeque<Item>, lead: usize) -> Vec<Item> {
    let Some(first) = pending.remove(lead) else {
        return Vec::new();
    };
    let limit = first.limit();
    let mut identifiers = BTreeSet::from([first.op.identifier().to_owned()]);
    let mut batch = vec![first];
    let mut rest = VecDeque::with_capacity(pending.len());
    for item in pending.drain(..) {
        if batch.len() < limit
            && item.goes_with(&batch[0])
            && identifiers.insert(item.op.identifier().to_owned())
        {
            batch.push(item);
        } else {
            rest.push_back(item);
        }
    }
    *pending = rest;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(blueprint: &str, identifier: &str) -> (Item, oneshot::Receiver<Result<(), CallError>>) {
        let (done, answer) = oneshot::channel();
        let op = match identifier.strip_prefix("-") {
            Some(deleted) => Op::Delete(deleted.to_owned()),
            None => Op::Upsert(Entity {
                identifier: identifier.to_owned(),
                title: identifier.to_owned(),
                properties: serde_json::Map::new(),
                relations: serde_json::Map::new(),
            }),
        };
        let item = Item {
            blueprint: blueprint.to_owned(),
            op,
            done,
            since: Instant::now(),
        };
        (item, answer)
    }

    #[test]
    fn a_request_is_one_kind_of_one_blueprint_each_identifier_once_at_most_its_limit() {
        let mut pending = VecDeque::new();
        let mut answers = Vec::new();
        let mut add = |bp: &str, id: &str| {
            let (item, answer) = item(bp, id);
            pending.push_back(item);
            answers.push(answer);
        };
        add("harborArtifact", "a");
        add("harborRepository", "r");
        add("harborArtifact", "-gone");
        add("harborArtifact", "a");
        for n in 0..25 {
            add("harborArtifact", &format!("x{n}"));
        }
        assert_eq!(full(&pending), Some(0));
        let batch = next_batch(&mut pending, 0);
        assert_eq!(batch[0].blueprint, "harborArtifact");
        let ids: Vec<&str> = batch.iter().map(|i| i.op.identifier()).collect();
        assert_eq!(ids.len(), BULK_LIMIT);
        assert_eq!(ids[..3], ["a", "x0", "x1"]);
        // The rest keep their order: the repository, the delete, then the second `a`.
        let left: Vec<&str> = pending.iter().map(|i| i.op.identifier()).collect();
        assert_eq!(left[..3], ["r", "gone", "a"]);
        assert_eq!(left.len(), 29 - BULK_LIMIT);
        assert_eq!(full(&pending), None);
        assert_eq!(next_batch(&mut pending, 0)[0].blueprint, "harborRepository");
        let deletes = next_batch(&mut pending, 0);
        assert!(deletes.len() == 1 && deletes[0].op.is_delete());
    }

    #[test]
    fn a_full_request_leaves_before_an_older_one_that_is_not() {
        let mut pending = VecDeque::new();
        let mut answers = Vec::new();
        for (bp, id) in [("harborRepository", "r"), ("harborArtifact", "-gone")] {
            let (item, answer) = item(bp, id);
            pending.push_back(item);
            answers.push(answer);
        }
        for n in 0..BULK_LIMIT {
            let (item, answer) = item("harborArtifact", &format!("x{n}"));
            pending.push_back(item);
            answers.push(answer);
        }
        assert_eq!(full(&pending), Some(2));
        let batch = next_batch(&mut pending, 2);
        assert_eq!(batch.len(), BULK_LIMIT);
        assert!(batch.iter().all(|i| !i.op.is_delete()));
        let left: Vec<&str> = pending.iter().map(|i| i.op.identifier()).collect();
        assert_eq!(left, ["r", "gone"]);
    }
}
