//! The upserts of every refresh in flight, written together: each entity joins a queue, and a
//! bulk request (at most [`BULK_LIMIT`] entities of one blueprint) leaves once it is full or
//! nothing more is coming (no refresh in flight that has not written yet: [`Coming`]; at most
//! [`LINGER`] after its first entity came), and then as soon as a slot among [`IN_FLIGHT`]
//! requests is free and Port's budget admits it. What arrives meanwhile fills the next ones; a
//! lone refresh's entities leave at once. Each entity's refresh is told what Port answered for
//! it (a 207's per-entity error goes to its own refresh only).
//!
//! Order is kept where it matters: a refresh waits for Port's answer for each of its entities
//! before it is done, and the scheduler never runs two refreshes of a key at once, so a newer
//! write of an entity never leaves before an older one was answered. Two refreshes of
//! different keys may render the same entity (a mapping may): one request never carries it
//! twice.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::clients::CallError;
use crate::clients::port::{BULK_LIMIT, Family, PortClient};
use crate::entities::Entity;

/// Bulk requests in flight at once.
pub const IN_FLIGHT: usize = 4;

/// The longest a request that is not full waits for the refreshes still coming.
pub const LINGER: Duration = Duration::from_millis(20);

/// The refreshes in flight that may still write: a request that is not full waits for them.
#[derive(Debug, Default)]
pub struct Coming {
    count: AtomicUsize,
    changed: Notify,
}

/// One refresh that may still write; dropped once it has queued its writes (or has none).
pub struct Expected(Option<Arc<Coming>>);

impl Expected {
    /// For a catalog that does not wait for anyone.
    pub fn none() -> Self {
        Self(None)
    }
}

impl Coming {
    /// A refresh starts that may write.
    pub fn expect(self: &Arc<Self>) -> Expected {
        self.count.fetch_add(1, Ordering::AcqRel);
        Expected(Some(Arc::clone(self)))
    }

    fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        if let Some(coming) = self.0.take() {
            coming.count.fetch_sub(1, Ordering::AcqRel);
            coming.changed.notify_one();
        }
    }
}

/// One entity to upsert, and whom to tell.
struct Item {
    blueprint: String,
    entity: Entity,
    done: oneshot::Sender<Result<(), CallError>>,
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
        let answers: Vec<_> = entities
            .iter()
            .map(|entity| {
                let (done, answer) = oneshot::channel();
                let item = Item {
                    blueprint: blueprint.to_owned(),
                    entity: entity.clone(),
                    done,
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
    loop {
        if pending.is_empty() {
            match items.recv().await {
                Some(item) => pending.push_back(item),
                None => return,
            }
        }
        // Until the next request is full or nothing more is coming, within the linger.
        let until = Instant::now() + LINGER;
        loop {
            while let Ok(item) = items.try_recv() {
                pending.push_back(item);
            }
            if full(&pending) || !coming.any() || Instant::now() >= until {
                break;
            }
            tokio::select! {
                item = items.recv() => match item {
                    Some(item) => pending.push_back(item),
                    None => break,
                },
                () = coming.changed.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
        // Never closed: a slot is always granted.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        port.budget().admit(Family::BulkUpsert).await;
        while let Ok(item) = items.try_recv() {
            pending.push_back(item);
        }
        let (blueprint, batch) = next_batch(&mut pending);
        let port = Arc::clone(&port);
        tokio::spawn(async move {
            let entities: Vec<Entity> = batch.iter().map(|item| item.entity.clone()).collect();
            let answered = port.upsert_bulk(&blueprint, &entities, true).await;
            drop(slot);
            let each = match answered {
                Ok(each) => each,
                Err(error) => vec![Err(error); batch.len()],
            };
            for (item, result) in batch.into_iter().zip(each) {
                let _ = item.done.send(result);
            }
        });
    }
}

/// Whether the next request would be full.
fn full(pending: &VecDeque<Item>) -> bool {
    let Some(first) = pending.front() else {
        return false;
    };
    pending
        .iter()
        .filter(|item| item.blueprint == first.blueprint)
        .nth(BULK_LIMIT - 1)
        .is_some()
}

/// The next request: up to [`BULK_LIMIT`] entities of the blueprint of the entity waiting
/// longest, each identifier once, in the order they came; the rest keep theirs.
fn next_batch(pending: &mut VecDeque<Item>) -> (String, Vec<Item>) {
    let blueprint = pending
        .front()
        .map(|item| item.blueprint.clone())
        .unwrap_or_default();
    let mut batch = Vec::new();
    let mut identifiers = BTreeSet::new();
    let mut rest = VecDeque::with_capacity(pending.len());
    for item in pending.drain(..) {
        if batch.len() < BULK_LIMIT
            && item.blueprint == blueprint
            && identifiers.insert(item.entity.identifier.clone())
        {
            batch.push(item);
        } else {
            rest.push_back(item);
        }
    }
    *pending = rest;
    (blueprint, batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(blueprint: &str, identifier: &str) -> (Item, oneshot::Receiver<Result<(), CallError>>) {
        let (done, answer) = oneshot::channel();
        let entity = Entity {
            identifier: identifier.to_owned(),
            title: identifier.to_owned(),
            properties: serde_json::Map::new(),
            relations: serde_json::Map::new(),
        };
        let item = Item {
            blueprint: blueprint.to_owned(),
            entity,
            done,
        };
        (item, answer)
    }

    #[test]
    fn a_request_is_one_blueprint_each_identifier_once_at_most_twenty() {
        let mut pending = VecDeque::new();
        let mut answers = Vec::new();
        let mut add = |bp: &str, id: &str| {
            let (item, answer) = item(bp, id);
            pending.push_back(item);
            answers.push(answer);
        };
        add("harborArtifact", "a");
        add("harborRepository", "r");
        add("harborArtifact", "a");
        for n in 0..25 {
            add("harborArtifact", &format!("x{n}"));
        }
        let (blueprint, batch) = next_batch(&mut pending);
        assert_eq!(blueprint, "harborArtifact");
        let ids: Vec<&str> = batch.iter().map(|i| i.entity.identifier.as_str()).collect();
        assert_eq!(ids.len(), BULK_LIMIT);
        assert_eq!(ids[..3], ["a", "x0", "x1"]);
        // The rest keep their order: the repository first, then the second `a`.
        let left: Vec<&str> = pending
            .iter()
            .map(|i| i.entity.identifier.as_str())
            .collect();
        assert_eq!(left[..2], ["r", "a"]);
        assert_eq!(left.len(), 28 - BULK_LIMIT);
        let (blueprint, _) = next_batch(&mut pending);
        assert_eq!(blueprint, "harborRepository");
    }
}
