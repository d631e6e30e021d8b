//! The searches of every refresh in flight, asked together: each search joins a queue, and
//! one request to Port asks for all those waiting (up to [`GROUP`], each a group of rules under
//! one `or`) once nothing more is coming (what [`Coming`] says), the previous request is
//! answered and Port's budget admits it. What Port finds is handed to each search it matches,
//! matched here by the same rules. A lone search leaves at
//! once; a search of everything leaves alone.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::coming::{Coming, gather};
use super::{Found, INSTANCE_PROPERTY, REF_PROPERTY, Search, TAGS_PROPERTY};
use crate::clients::CallError;
use crate::clients::port::{Family, PortClient};

/// The most searches one request asks for.
pub const GROUP: usize = 50;

/// A search, owned, as it waits in the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    references: Option<Vec<String>>,
    under: Option<String>,
    tagged: Option<BTreeSet<String>>,
    whole: bool,
}

impl From<Search<'_>> for Owned {
    fn from(search: Search<'_>) -> Self {
        Self {
            references: search
                .references
                .map(|r| r.iter().map(|s| (*s).to_owned()).collect()),
            under: search.under.map(str::to_owned),
            tagged: search.tagged.cloned(),
            whole: search.whole,
        }
    }
}

impl Owned {
    /// Its rules, this Harbor's aside.
    fn rules(&self) -> Vec<Value> {
        let mut rules = Vec::new();
        if let Some(references) = &self.references {
            rules.push(json!({"property": REF_PROPERTY, "operator": "in", "value": references}));
        }
        if let Some(prefix) = &self.under {
            rules
                .push(json!({"property": REF_PROPERTY, "operator": "beginsWith", "value": prefix}));
        }
        if let Some(tags) = &self.tagged {
            rules
                .push(json!({"property": TAGS_PROPERTY, "operator": "containsAny", "value": tags}));
        }
        rules
    }

    /// Whether an entity found is one it asks for, by the rules Port applied.
    fn matches(&self, found: &Found) -> bool {
        let reference = found.reference.as_deref();
        self.references
            .as_ref()
            .is_none_or(|refs| reference.is_some_and(|r| refs.iter().any(|x| x == r)))
            && self
                .under
                .as_ref()
                .is_none_or(|prefix| reference.is_some_and(|r| r.starts_with(prefix.as_str())))
            && self
                .tagged
                .as_ref()
                .is_none_or(|wanted| found.tags.iter().any(|t| wanted.contains(t)))
    }
}

/// Port's query for this Harbor's entities that any of `searches` asks for.
pub fn query(instance: &str, searches: &[&Owned]) -> Value {
    let mut rules =
        vec![json!({"property": INSTANCE_PROPERTY, "operator": "=", "value": instance})];
    match searches {
        [one] => rules.extend(one.rules()),
        many => {
            let groups: Vec<Value> = many
                .iter()
                .map(|s| json!({"combinator": "and", "rules": s.rules()}))
                .collect();
            rules.push(json!({"combinator": "or", "rules": groups}));
        }
    }
    json!({"combinator": "and", "rules": rules})
}

/// The entities of an answer, as found; `whole`: the answer holds them whole.
pub fn found(entities: &[Value], whole: bool) -> Vec<Found> {
    entities
        .iter()
        .filter_map(|e| found_one(e, whole))
        .collect()
}

/// An entity of an answer, as found (`None` without an identifier or a blueprint).
fn found_one(entity: &Value, whole: bool) -> Option<Found> {
    Some(Found {
        identifier: entity["identifier"].as_str()?.to_owned(),
        blueprint: entity["blueprint"].as_str()?.to_owned(),
        reference: entity["properties"][REF_PROPERTY]
            .as_str()
            .map(str::to_owned),
        tags: entity["properties"][TAGS_PROPERTY]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        held: whole.then(|| entity.clone()),
    })
}

/// The fields a search asks Port for.
pub const INCLUDE: [&str; 4] = [
    "identifier",
    "blueprint",
    "properties.harborRef",
    "properties.harborTags",
];

struct Ask {
    search: Owned,
    done: oneshot::Sender<Result<Vec<Found>, CallError>>,
    /// When it came.
    since: Instant,
}

/// The queue of searches, and the task that asks Port.
pub struct Reader {
    queue: mpsc::UnboundedSender<Ask>,
}

impl Reader {
    /// Starts the task searching this Harbor's entities (`instance`) in `port`, waiting for
    /// the searches of the refreshes `coming`.
    pub fn start(port: Arc<PortClient>, instance: String, coming: Arc<Coming>) -> Self {
        let (queue, asks) = mpsc::unbounded_channel();
        tokio::spawn(run(port, instance, asks, coming));
        Self { queue }
    }

    /// The entities `search` finds, asked with the other searches waiting.
    pub async fn find(&self, search: Search<'_>) -> Result<Vec<Found>, CallError> {
        let (done, answer) = oneshot::channel();
        let _ = self.queue.send(Ask {
            search: search.into(),
            done,
            since: Instant::now(),
        });
        answer.await.unwrap_or_else(|_| {
            Err(CallError::Transient {
                reason: "the Port reader stopped before answering".into(),
                retry_after: None,
            })
        })
    }
}

async fn run(
    port: Arc<PortClient>,
    instance: String,
    mut asks: mpsc::UnboundedReceiver<Ask>,
    coming: Arc<Coming>,
) {
    let mut pending: VecDeque<Ask> = VecDeque::new();
    let mut coming = coming.watch();
    loop {
        if pending.is_empty() {
            match asks.recv().await {
                Some(ask) => pending.push_back(ask),
                None => return,
            }
        }
        // Until nothing more is coming (a refresh asks once or twice at a time) or the group
        // is full.
        gather(&mut asks, &mut pending, &mut coming, |pending, flight| {
            let oldest = pending.front().map_or_else(Instant::now, |ask| ask.since);
            let unheard = pending.len() < flight.count;
            let wait = flight
                .searching()
                .wait_until(oldest, unheard, Instant::now());
            wait.filter(|_| pending.len() < GROUP)
        })
        .await;
        port.budget().admit(Family::Search).await;
        while let Ok(ask) = asks.try_recv() {
            pending.push_back(ask);
        }
        let group = next_group(&mut pending);
        let searches: Vec<&Owned> = group.iter().map(|a| &a.search).collect();
        // Whole entities when one of the searches asks.
        let whole = searches.iter().any(|s| s.whole);
        let include: &[&str] = if whole { &[] } else { &INCLUDE };
        let answer = port
            .search_admitted(&query(&instance, &searches), include)
            .await;
        let found = answer.map(|entities| found(&entities, whole));
        for ask in group {
            let mine = match &found {
                Ok(all) => Ok(all
                    .iter()
                    .filter(|f| ask.search.matches(f))
                    .map(|f| Found {
                        held: f.held.clone().filter(|_| ask.search.whole),
                        ..f.clone()
                    })
                    .collect()),
                Err(error) => Err(error.clone()),
            };
            let _ = ask.done.send(mine);
        }
    }
}

/// The next request's searches: up to [`GROUP`] in the order they came; a search of
/// everything alone.
fn next_group(pending: &mut VecDeque<Ask>) -> Vec<Ask> {
    let everything = |a: &Ask| {
        Owned {
            whole: a.search.whole,
            ..Owned::default()
        } == a.search
    };
    match pending.front() {
        Some(first) if everything(first) => pending.pop_front().into_iter().collect(),
        _ => {
            let mut group = Vec::new();
            let mut rest = VecDeque::with_capacity(pending.len());
            for ask in pending.drain(..) {
                if group.len() < GROUP && !everything(&ask) {
                    group.push(ask);
                } else {
                    rest.push_back(ask);
                }
            }
            *pending = rest;
            group
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(reference: &str, tags: &[&str]) -> Found {
        Found {
            held: None,
            identifier: reference.to_owned(),
            blueprint: "b".to_owned(),
            reference: Some(reference.to_owned()),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    #[test]
    fn searches_asked_together_are_one_query_and_each_gets_its_own() {
        let tags: BTreeSet<String> = ["v1".to_owned()].into();
        let under_a: Owned = Search {
            under: Some("artifact:p/a@"),
            ..Search::default()
        }
        .into();
        let tagged_b: Owned = Search {
            under: Some("artifact:p/b@"),
            tagged: Some(&tags),
            ..Search::default()
        }
        .into();
        assert_eq!(
            query("eu", &[&under_a, &tagged_b]),
            json!({"combinator": "and", "rules": [
                {"property": "harborInstance", "operator": "=", "value": "eu"},
                {"combinator": "or", "rules": [
                    {"combinator": "and", "rules": [
                        {"property": "harborRef", "operator": "beginsWith", "value": "artifact:p/a@"}]},
                    {"combinator": "and", "rules": [
                        {"property": "harborRef", "operator": "beginsWith", "value": "artifact:p/b@"},
                        {"property": "harborTags", "operator": "containsAny", "value": ["v1"]}]}]}]})
        );
        assert!(under_a.matches(&found("artifact:p/a@sha256:1", &[])));
        assert!(!under_a.matches(&found("artifact:p/b@sha256:1", &["v1"])));
        assert!(tagged_b.matches(&found("artifact:p/b@sha256:1", &["v0", "v1"])));
        assert!(!tagged_b.matches(&found("artifact:p/b@sha256:2", &["v2"])));
    }

    #[test]
    fn a_search_of_everything_goes_alone() {
        let ask = |search: Owned| {
            let (done, _) = oneshot::channel();
            Ask {
                search,
                done,
                since: Instant::now(),
            }
        };
        let under: Owned = Search {
            under: Some("x"),
            ..Search::default()
        }
        .into();
        let mut pending: VecDeque<Ask> = [
            ask(under.clone()),
            ask(Owned::default()),
            ask(under.clone()),
        ]
        .into();
        assert_eq!(next_group(&mut pending).len(), 2);
        assert_eq!(next_group(&mut pending).len(), 1);
        assert!(pending.is_empty());
    }
}
