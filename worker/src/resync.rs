//! Resync: repairs what the webhooks missed, through the same queues.
//!
//! Webhooks drift: Harbor gives up on a webhook after 3 failed attempts, and sends none when a
//! tag is removed, garbage collection deletes untagged artifacts or a project is deleted. A
//! resync takes stock of Harbor (every project, repository and artifact) and of what this
//! integration wrote to Port (the entities with its `harborInstance`), and then asks, through
//! the work exchange, for a refresh of every project and repository either has: each request
//! goes to the work queue of its project, so the worker that handles that project's webhooks
//! refreshes it, one refresh of a key at a time, reading Harbor just before it writes. A list
//! taken minutes ago therefore never overwrites what a webhook wrote since; the stock-taking
//! only decides what to ask for, and whether to ask at all:
//!
//! - a resync that would delete more than the deletion threshold (90 % by default, as Port
//!   Ocean's `entityDeletionThreshold`) of this integration's entities is refused unless forced:
//!   a resync pointed at the wrong or an empty Harbor must not empty the catalog;
//! - with `RESYNC_INTERVAL` the workers run it periodically, one of them at a time: the one that
//!   holds the resync lock (an exclusive queue, released with its connection), and then keeps
//!   our webhook policy in every project when WEBHOOK_PUBLIC_URL is set, so that a project
//!   created since is covered within one interval.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use harbor_shared::broker;
use harbor_shared::broker::AmqpSettings;
use harbor_shared::message;
use harbor_shared::publisher::{Outgoing, Publisher};
use harbor_shared::topology::Topology;
use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

use crate::catalog::{Catalog, Search};
use crate::clients::CallError;
use crate::fleet::Fleet;
use crate::handler::Handler;
use crate::harbor_ref::HarborRef;
use crate::mapping::{Kind, Rendered};
use crate::names::{Digest, RepositoryName};
use crate::plan::{REQUEST_TYPE, ResyncRequest, Target};
use crate::retry::{Budget, RetryPolicy};
use crate::webhooks;

/// How long a resync's requests may take to be confirmed by the broker, each.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How a resync runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Refused when it would delete more than this share of this integration's entities.
    pub deletion_threshold: f64,
    /// Delete whatever share it takes.
    pub force: bool,
    /// Take stock and say what it would do, asking for nothing.
    pub dry_run: bool,
}

/// What a resync found and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Projects, repositories and artifacts in Harbor.
    pub harbor: usize,
    /// This integration's entities in Port.
    pub ours: usize,
    /// Of those, the ones Harbor no longer has: their refreshes will delete them.
    pub to_delete: usize,
    /// Refreshes asked for (projects and repositories); none when refused or dry.
    pub requested: usize,
    /// Refused: it would have deleted more than the threshold allows.
    pub refused: bool,
}

impl Summary {
    /// The share of this integration's entities the resync deletes.
    pub fn deleted_share(&self) -> f64 {
        if self.ours == 0 {
            0.0
        } else {
            self.to_delete as f64 / self.ours as f64
        }
    }
}

/// What the mapping makes of Harbor's objects, and what this integration has in Port.
#[derive(Default)]
struct Stock {
    /// The entities (blueprint, identifier) the mapping makes of Harbor's objects.
    expected: BTreeSet<(String, String)>,
    /// Objects the mapping failed on: their entities are not counted as to delete (their
    /// refreshes will park with the reason).
    unknown: BTreeSet<String>,
    projects: BTreeSet<String>,
    repositories: BTreeSet<String>,
    /// This integration's entities in Port: (blueprint, identifier, harborRef).
    ours: Vec<(String, String, Option<String>)>,
}

impl Stock {
    fn expect(&mut self, reference: String, rendered: Result<Rendered, String>) {
        match rendered {
            Ok(rendered) => self.expected.extend(
                rendered
                    .entities
                    .into_iter()
                    .map(|m| (m.blueprint, m.entity.identifier)),
            ),
            Err(reason) => {
                warn!(object = %reference, %reason, "Resync: the mapping failed on an object");
                self.unknown.insert(reference);
            }
        }
    }

    /// This integration's entities that the mapping no longer makes of anything in Harbor.
    fn to_delete(&self) -> usize {
        self.ours
            .iter()
            .filter(|(blueprint, id, reference)| {
                !self.expected.contains(&(blueprint.clone(), id.clone()))
                    && reference
                        .as_ref()
                        .is_some_and(|r| !self.unknown.contains(r))
            })
            .count()
    }
}

/// Takes stock, checks the deletion threshold, and (unless refused or dry) asks for the
/// refreshes through the work exchange.
pub async fn resync(
    handler: &Handler,
    retry: RetryPolicy,
    amqp: &AmqpSettings,
    connection: &Connection,
    options: Options,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let stock = take_stock(handler, retry).await?;
    let mut summary = Summary {
        harbor: stock.expected.len(),
        ours: stock.ours.len(),
        to_delete: stock.to_delete(),
        ..Summary::default()
    };
    if summary.deleted_share() > options.deletion_threshold && !options.force {
        summary.refused = true;
        error!(
            instance = handler.instance(),
            ours = summary.ours,
            to_delete = summary.to_delete,
            threshold = options.deletion_threshold,
            harbor = summary.harbor,
            "Resync refused: it would delete more of this integration's entities than the \
             deletion threshold allows (is HARBOR_URL the right Harbor, and can its robot account \
             see every project?); run `harbor-worker resync --force` to do it anyway"
        );
        return Ok(summary);
    }
    let requests = requests(&stock);
    if !options.dry_run {
        publish(&requests, handler, &amqp.topology, connection).await?;
        summary.requested = requests.len();
    }
    info!(
        instance = handler.instance(),
        harbor = summary.harbor,
        ours = summary.ours,
        to_delete = summary.to_delete,
        requested = summary.requested,
        dry_run = options.dry_run,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Resync requested"
    );
    Ok(summary)
}

async fn take_stock(handler: &Handler, retry: RetryPolicy) -> Result<Stock, CallError> {
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
    let found = Budget::start(retry)
        .run("port", || handler.catalog().find(Search::default()))
        .await?;
    stock.ours = found
        .into_iter()
        .map(|f| (f.blueprint, f.identifier, f.reference))
        .collect();
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

/// A refresh of every project and repository in Harbor or among this integration's entities;
/// artifacts are refreshed with their repositories.
fn requests(stock: &Stock) -> Vec<ResyncRequest> {
    let mut projects = stock.projects.clone();
    let mut repositories = stock.repositories.clone();
    for reference in stock.ours.iter().filter_map(|(_, _, r)| r.as_deref()) {
        match HarborRef::parse(reference) {
            Some(HarborRef::Project(project)) => {
                projects.insert(project);
            }
            Some(HarborRef::Repository(name) | HarborRef::Artifact(name, _)) => {
                repositories.insert(name.to_string());
            }
            None => {}
        }
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

/// Publishes the requests (confirmed), each with its project's subject and, when named, the
/// handler's instance.
async fn publish(
    requests: &[ResyncRequest],
    handler: &Handler,
    topology: &Topology,
    connection: &Connection,
) -> anyhow::Result<()> {
    let publisher = Publisher::open(connection, 2, CONFIRM_TIMEOUT).await?;
    let published = futures_util::future::try_join_all(requests.iter().map(|request| {
        let publisher = &publisher;
        async move {
            let body = serde_json::to_vec(request).context("Failed to encode a resync request")?;
            let properties = message::resync_request(
                &handler.subject(request.project()),
                handler.name(),
                &uuid::Uuid::new_v4().to_string(),
            );
            publisher
                .publish(Outgoing {
                    exchange: topology.exchange(),
                    routing_key: REQUEST_TYPE,
                    body: &body,
                    properties,
                })
                .await
                .context("Failed to publish a resync request")
        }
    }))
    .await;
    publisher.close().await;
    published.map(drop)
}

/// The name of the queue whose holder runs the periodic resync.
pub fn lock_queue(topology: &Topology) -> String {
    format!("{}.resync-lock", topology.queue())
}

/// How the workers resync by themselves.
#[derive(Debug, Clone)]
pub struct Periodic {
    /// How often.
    pub interval: Duration,
    /// The retry policy of its calls.
    pub retry: RetryPolicy,
    /// Its threshold.
    pub options: Options,
}

/// Runs a resync of each Harbor every `interval` while this worker holds the resync lock
/// (trying for it at start and then every `interval`), until shutdown; so the fleet resyncs
/// once per interval, whichever worker does it. A worker that takes the lock waits a whole
/// interval first. Each Harbor's resync is judged alone (its own deletion threshold), and its
/// webhook policies kept after it.
pub async fn every(
    periodic: &Periodic,
    fleet: &Fleet,
    amqp: &AmqpSettings,
    shutdown: &CancellationToken,
) {
    let Periodic {
        interval,
        retry,
        options,
    } = *periodic;
    let mut held: Option<Connection> = None;
    loop {
        if held.as_ref().is_none_or(|c| !c.status().connected()) {
            held = take_lock(amqp).await;
            if held.is_some() {
                info!("Holding the resync lock: this worker runs the periodic resync");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => break,
        }
        // Taken (again) during this interval: the first resync waits for the next.
        if held.as_ref().is_none_or(|c| !c.status().connected()) {
            continue;
        }
        let Some(connection) = &held else { continue };
        for member in fleet.members() {
            let handler = &member.handler;
            tokio::select! {
                done = resync(handler, retry, amqp, connection, options) => {
                    let outcome = match done {
                        Ok(summary) if summary.refused => "refused",
                        Ok(_) => "requested",
                        Err(error) => {
                            error!(
                                instance = handler.instance(),
                                error = format!("{error:#}"),
                                "Resync failed; the next interval tries again"
                            );
                            "failed"
                        }
                    };
                    metrics::counter!("harbor_worker_resyncs_total", "outcome" => outcome).increment(1);
                }
                () = shutdown.cancelled() => break,
            }
            if let Some(desired) = &member.webhooks {
                let span = tracing::info_span!("webhooks", instance = handler.instance());
                let kept = webhooks::keep(handler.harbor(), desired, false).instrument(span);
                tokio::select! {
                    () = kept => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    if let Some(connection) = held {
        let _ = connection.close(200, "stopping".into()).await;
    }
}

/// A connection holding the resync lock, or `None` if another worker holds it (or the broker
/// cannot be reached).
async fn take_lock(amqp: &AmqpSettings) -> Option<Connection> {
    let connection = broker::connect(&amqp.url, "harbor-worker resync")
        .await
        .ok()?;
    let channel = connection.create_channel().await.ok()?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = lock_queue(&amqp.topology);
    match channel
        .queue_declare(queue.as_str().into(), exclusive, FieldTable::default())
        .await
    {
        Ok(_) => Some(connection),
        Err(_) => {
            // RESOURCE_LOCKED: another worker's.
            let _ = connection.close(200, "lock held elsewhere".into()).await;
            None
        }
    }
}
