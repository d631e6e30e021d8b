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
//! - one worker of the fleet at a time holds the resync lock ([`lock`]): it runs the resyncs
//!   `harbor-worker resync` asks for ([`asked`]) and, with `RESYNC_INTERVAL`, a periodic one,
//!   each followed by our webhook policy kept in every project when WEBHOOK_PUBLIC_URL is set,
//!   so that a project created since is covered within one interval.

use std::time::{Duration, Instant};

use anyhow::Context;
use harbor_shared::broker::AmqpSettings;
use harbor_shared::message;
use harbor_shared::publisher::{Outgoing, Publisher};
use harbor_shared::topology::Topology;
use lapin::Connection;
use serde::{Deserialize, Serialize};
use tracing::{Instrument, error, info};

use crate::fleet::Fleet;
use crate::handler::Handler;
use crate::plan::{REQUEST_TYPE, ResyncRequest};
use crate::retry::RetryPolicy;
use crate::webhooks;

/// How long a resync's requests may take to be confirmed by the broker, each.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How a resync runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Options {
    /// Refused when it would delete more than this share of this integration's entities.
    pub deletion_threshold: f64,
    /// Delete whatever share it takes.
    pub force: bool,
    /// Take stock and say what it would do, asking for nothing.
    pub dry_run: bool,
}

/// What a resync found and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

pub mod asked;
mod lock;
mod stock;

pub use lock::{Holding, hold, lock_queue};
use stock::{requests, take_stock};

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

/// Resyncs the fleet's members `chosen` (by place) in turn, keeping each one's webhook policies
/// after it (only saying what it would do when dry): what each resync found, or why it failed.
pub async fn resync_each(
    fleet: &Fleet,
    chosen: Vec<usize>,
    retry: RetryPolicy,
    options: Options,
    amqp: &AmqpSettings,
    connection: &Connection,
) -> Vec<asked::Outcome> {
    let mut outcomes = Vec::new();
    for member in chosen.into_iter().filter_map(|i| fleet.members().get(i)) {
        let handler = &member.handler;
        let done = resync(handler, retry, amqp, connection, options).await;
        if let Some(desired) = &member.webhooks {
            let span = tracing::info_span!("webhooks", instance = handler.instance());
            webhooks::keep(handler.harbor(), desired, options.dry_run)
                .instrument(span)
                .await;
        }
        outcomes.push(asked::Outcome::of(handler.instance(), done));
    }
    outcomes
}
