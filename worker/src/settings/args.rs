//! The command line: each command and option, with its environment variable. What the options
//! mean once checked is [`super`]'s.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use harbor_shared::config::{AmqpArgs, LogArgs};
use url::Url;

use crate::clients::MAX_ANSWER_BYTES;
use crate::clients::port::DEFAULT_RATE_SHARE;

/// Consumes Harbor events from RabbitMQ and keeps Port's catalog in sync with Harbor.
#[derive(Parser, Debug)]
#[command(name = "harbor-worker", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub amqp: AmqpArgs,

    #[command(flatten)]
    pub harbor: HarborArgs,

    #[command(flatten)]
    pub port: PortArgs,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub webhooks: WebhookArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// What to do; consuming is the default.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Consume events and sync them to Port (the default).
    Run,
    /// Create or update the harborProject, harborRepository and harborArtifact blueprints in
    /// Port, then exit.
    Blueprints,
    /// Exit 0 if the worker on METRICS_ADDR is consuming, 1 if not (for container health
    /// checks).
    Healthcheck,
    /// Take stock of Harbor and of this integration's entities in Port, and ask the workers to
    /// refresh every project and repository either has (writing what Harbor has, deleting what
    /// it no longer has); prints a summary. Safe while webhooks flow.
    Resync {
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Take stock and print what it would do; ask for nothing.
        #[arg(long)]
        dry_run: bool,
        /// Resync even if it deletes more than RESYNC_DELETION_THRESHOLD of this integration's
        /// entities.
        #[arg(long)]
        force: bool,
        /// Only this instance of HARBOR_INSTANCES_FILE (by default, each in turn).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Print how many events wait in the work and parked queues.
    Backlog {
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// The RabbitMQ management API (e.g. `http://rabbitmq:15672`), for the unacked counts.
        /// It may carry credentials, so it comes from the environment only.
        #[arg(long, env = "RABBITMQ_MANAGEMENT_URL", hide_env_values = true)]
        management_url: Option<Url>,
    },
    /// List or replay the parked events.
    Parked {
        #[command(subcommand)]
        action: ParkedAction,
    },
    /// Check the mapping file (MAPPING_FILE), or try it on Harbor's current data.
    Mapping {
        #[command(subcommand)]
        action: MappingAction,
    },
    /// Keep our webhook policy (`harbor-port-sync`) in every Harbor project, or show it
    /// (needs WEBHOOK_PUBLIC_URL and WEBHOOK_SECRET).
    Webhooks {
        #[command(subcommand)]
        action: WebhooksAction,
    },
}

/// What to do with Harbor's webhook policies.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum WebhooksAction {
    /// Make sure every project has our policy, as it should be: create what is missing,
    /// update what differs, leave every other policy alone; print what it did per project.
    /// Exits 1 if a project's policy could not be made right (the others are still done).
    Sync {
        /// Print what it would do; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Take our policy away from every project instead.
        #[arg(long)]
        remove: bool,
        /// Only this instance of HARBOR_INSTANCES_FILE (by default, each in turn).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Per project: whether our policy is there and as it should be, and the latest deliveries
    /// Harbor gave up on.
    Status {
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Only this instance of HARBOR_INSTANCES_FILE (by default, each in turn).
        #[arg(long)]
        instance: Option<String>,
    },
}

/// What to do with the mapping.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum MappingAction {
    /// Read and compile the mapping as the worker does at start; exit 1 with the reason if it
    /// cannot be used.
    Check,
    /// Print the entities (JSON, one per line) the mapping makes of one object as Harbor has it
    /// now; writes nothing.
    Render {
        /// `project`, `repository` or `artifact`.
        #[arg(long)]
        kind: String,
        /// The project's name.
        #[arg(long)]
        project: String,
        /// The repository's name within the project (for `repository` and `artifact`).
        #[arg(long)]
        repository: Option<String>,
        /// The artifact's digest or tag (for `artifact`).
        #[arg(long)]
        reference: Option<String>,
        /// The instance of HARBOR_INSTANCES_FILE to read (needed when it lists several).
        #[arg(long)]
        instance: Option<String>,
    },
}

/// What to do with the parked events.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum ParkedAction {
    /// Print the parked events (oldest first): id, type, when, attempts, why. Removes nothing.
    List {
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send parked events back to the work queue; each leaves the parked queue only once the
    /// broker confirmed its republish.
    Replay {
        /// Every parked event.
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        all: bool,
        /// The event with this message id (repeatable).
        #[arg(long = "id", value_name = "MESSAGE_ID")]
        ids: Vec<String>,
        /// Take them from this queue instead of the parked one: the single work queue
        /// (`AMQP_QUEUE`) that versions before the 16 work queues consumed.
        #[arg(long, value_name = "QUEUE")]
        from: Option<String>,
    },
}

/// The Harbor API: one Harbor (HARBOR_URL, ...), or several (HARBOR_INSTANCES_FILE).
#[derive(Args, Debug, Clone)]
pub struct HarborArgs {
    /// Several Harbors: a YAML file naming each, with its URL, credentials and webhook secret
    /// (docs/instances.md); instead of HARBOR_URL, HARBOR_USERNAME, HARBOR_PASSWORD and
    /// WEBHOOK_SECRET.
    #[arg(long, env = "HARBOR_INSTANCES_FILE", global = true)]
    pub harbor_instances_file: Option<PathBuf>,

    /// Harbor's address, e.g. `https://harbor.example.com` (the API is under `/api/v2.0`).
    #[arg(long, env = "HARBOR_URL")]
    pub harbor_url: Option<String>,

    /// Harbor user; a robot account (`robot$project+name`) with read access is enough.
    #[arg(long, env = "HARBOR_USERNAME")]
    pub harbor_username: Option<String>,

    /// Harbor password or robot secret; from the environment only (a flag would show it in the
    /// process list).
    #[arg(long, env = "HARBOR_PASSWORD", hide_env_values = true)]
    pub harbor_password: Option<String>,

    /// File holding the Harbor password, instead of HARBOR_PASSWORD.
    #[arg(long, env = "HARBOR_PASSWORD_FILE")]
    pub harbor_password_file: Option<PathBuf>,
}

/// The Port API.
#[derive(Args, Debug, Clone)]
pub struct PortArgs {
    /// Port's API: `https://api.port.io` (EU) or `https://api.us.port.io` (US).
    #[arg(long, env = "PORT_API_URL", default_value = "https://api.port.io")]
    pub port_api_url: String,

    /// Port client id (Port → Credentials).
    #[arg(long, env = "PORT_CLIENT_ID")]
    pub port_client_id: Option<String>,

    /// Port client secret; from the environment only.
    #[arg(long, env = "PORT_CLIENT_SECRET", hide_env_values = true)]
    pub port_client_secret: Option<String>,

    /// File holding the Port client secret, instead of PORT_CLIENT_SECRET.
    #[arg(long, env = "PORT_CLIENT_SECRET_FILE")]
    pub port_client_secret_file: Option<PathBuf>,

    /// How Harbor's objects become Port entities: a port-app-config YAML file (the default is
    /// deploy/port/mapping.yaml, built in). Read at start: a change takes a restart.
    #[arg(long, env = "MAPPING_FILE", global = true)]
    pub mapping_file: Option<PathBuf>,

    /// The share of each of Port's rate limits (per organisation, shared with its other
    /// integrations) this deployment spends, divided among its workers: 0 < share ≤ 1.
    #[arg(long, env = "PORT_RATE_SHARE", default_value_t = DEFAULT_RATE_SHARE)]
    pub port_rate_share: f64,
}

/// How the consumer runs.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Refreshes at once, and calls to Harbor and Port in flight at once, 1-1000.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 100)]
    pub worker_concurrency: u16,

    /// Deliveries held at once per work queue (each consumer's prefetch): handled, or waiting to
    /// be folded into one refresh with others of the same subject (a flood of pulls waits for
    /// its window). At least WORKER_CONCURRENCY.
    #[arg(long, env = "WORKER_PREFETCH", default_value_t = 5000)]
    pub worker_prefetch: u16,

    /// Bytes of event bodies held at once, past which nothing waits: pulls waiting for their
    /// window are refreshed at once, and so is every event that arrives, until the deliveries
    /// held are back under it (at least 1 MiB).
    #[arg(long, env = "WORKER_MAX_HELD_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub worker_max_held_bytes: usize,

    /// A pull is refreshed this long after the last pull of the same artifacts, so that the
    /// pull count written is Harbor's (it counts pulls about every 10 s); the pulls in between
    /// are folded into that one refresh. `0s` refreshes at once.
    #[arg(long, env = "PULL_COALESCE_WINDOW", default_value = "11s", value_parser = duration)]
    pub pull_coalesce_window: Duration,

    /// Time budget for refreshing one event again after failed calls before the event is
    /// parked, counted from its first refresh.
    #[arg(long, env = "RETRY_MAX_ELAPSED", default_value = "60s", value_parser = duration)]
    pub retry_max_elapsed: Duration,

    /// The broker's consumer timeout (RabbitMQ's `consumer_timeout`, 30 minutes unless the
    /// broker is configured otherwise): a delivery held longer is taken back and the channel
    /// closed. Every delivery is settled at least a minute before it; set this if the broker's
    /// differs.
    #[arg(long, env = "CONSUMER_TIMEOUT", default_value = "30m", value_parser = duration)]
    pub consumer_timeout: Duration,

    /// Address to serve `/healthz`, `/readyz` and `/metrics` on.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Timeout of one HTTP call to Harbor or Port.
    #[arg(long, env = "HTTP_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub http_timeout: Duration,

    /// The most a Harbor or Port answer may hold; a larger one fails the call (and parks the
    /// event), so that a misbehaving proxy in front of either cannot exhaust the worker's memory.
    #[arg(long, env = "HTTP_MAX_RESPONSE_BYTES", default_value_t = MAX_ANSWER_BYTES)]
    pub http_max_response_bytes: usize,

    /// Also resync (see `resync`) this often, e.g. `6h`, at least `5s`; off by default. One
    /// worker of the fleet at a time does it (the holder of the resync lock on the broker).
    #[arg(long, env = "RESYNC_INTERVAL", value_parser = duration)]
    pub resync_interval: Option<Duration>,

    /// A resync that would delete more than this share (0 to 1) of this integration's entities
    /// is refused (`resync --force` overrides it). The mapping file's entityDeletionThreshold,
    /// when it sets one, takes its place.
    #[arg(long, env = "RESYNC_DELETION_THRESHOLD", default_value_t = 0.9)]
    pub resync_deletion_threshold: f64,

    /// On SIGTERM, how long events in flight may take to finish before the worker exits anyway
    /// (they are then redelivered).
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub shutdown_timeout: Duration,
}

/// Harbor's webhook policies, kept by `webhooks sync` and each resync.
#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    /// The ingest's address as Harbor reaches it, e.g. `https://harbor-sync.example.com`:
    /// turns on keeping our webhook policy, which posts to `<this>/webhook`, in every project.
    #[arg(long, env = "WEBHOOK_PUBLIC_URL")]
    pub webhook_public_url: Option<String>,

    /// The ingest's webhook secret(s), comma-separated: the first is our policies' auth header.
    /// From the environment only.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// File holding the webhook secret(s), instead of WEBHOOK_SECRET.
    #[arg(long, env = "WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// Payload format of our policies: `Default` or `CloudEvents` (the ingest reads both).
    #[arg(long, env = "WEBHOOK_PAYLOAD_FORMAT", default_value = "Default")]
    pub webhook_payload_format: String,
}

/// A duration option (`30s`, `10m`), at most a week: the worker adds them to clock readings
/// and to each other, which a value of centuries would overflow.
pub(super) fn duration(value: &str) -> Result<Duration, String> {
    const LONGEST: Duration = Duration::from_secs(7 * 24 * 3600);
    let parsed = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if parsed > LONGEST {
        return Err("at most 7days".into());
    }
    Ok(parsed)
}
