//! The typed settings built once, at start, from the command line ([`args`]): each value checked,
//! with a clear error naming its variable.

mod args;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use harbor_shared::broker::AmqpSettings;
use harbor_shared::config::{required_secret, secrets_from};
use harbor_shared::instances;
use secrecy::SecretString;
use url::Url;

use crate::clients::Http;
use crate::clients::port::PortBudget;
use crate::mapping::Mapping;
use crate::retry::RetryPolicy;
use crate::webhooks::Desired;

pub use args::*;

impl WebhookArgs {
    /// WEBHOOK_PUBLIC_URL and the payload format, if the keeping of our policies is on.
    fn target(&self) -> anyhow::Result<Option<(Url, bool)>> {
        let Some(raw) = self.webhook_public_url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        // Harbor sends the webhook secret there with every event.
        let url = credentials_url(raw, "WEBHOOK_PUBLIC_URL")?;
        let cloudevents = match self.webhook_payload_format.as_str() {
            "Default" => false,
            "CloudEvents" => true,
            other => bail!("WEBHOOK_PAYLOAD_FORMAT must be Default or CloudEvents (got {other})"),
        };
        Ok(Some((url, cloudevents)))
    }
}

/// One Harbor: where it is, how to log in, and our webhook policy in its projects.
#[derive(Debug, Clone)]
pub struct HarborSettings {
    /// Its name in HARBOR_INSTANCES_FILE; `None` for the single Harbor of HARBOR_URL (its
    /// entities' `harborInstance` is `default`).
    pub name: Option<String>,
    /// Harbor's address.
    pub url: Url,
    /// User name.
    pub username: String,
    /// Password.
    pub password: SecretString,
    /// Our webhook policy in its projects, kept when WEBHOOK_PUBLIC_URL is set.
    pub webhooks: Option<Desired>,
}

/// Where Port is and how to log in.
#[derive(Debug, Clone)]
pub struct PortSettings {
    /// The API's address.
    pub url: Url,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: SecretString,
    /// How Harbor's objects become entities.
    pub mapping: Arc<Mapping>,
    /// What the deployment may spend of Port's rate limits (`PORT_RATE_SHARE`), shared by its
    /// Port clients.
    pub budget: Arc<PortBudget>,
}

/// Everything the consuming worker needs, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker.
    pub amqp: AmqpSettings,
    /// The Harbors, each with its webhook policy.
    pub harbors: Vec<HarborSettings>,
    /// Port.
    pub port: PortSettings,
    /// Refreshes at once, and calls in flight at once.
    pub concurrency: u16,
    /// Deliveries held at once.
    pub prefetch: u16,
    /// Bytes of deliveries held past which nothing waits.
    pub max_held_bytes: usize,
    /// How long pulls wait to be folded.
    pub pull_window: Duration,
    /// Retry budget per event and spacing.
    pub retry: RetryPolicy,
    /// Where `/healthz`, `/readyz`, `/metrics` are served; port 0 picks one.
    pub metrics_addr: SocketAddr,
    /// The HTTP client to Harbor and Port.
    pub http: Http,
    /// Drain time on shutdown.
    pub shutdown_timeout: Duration,
    /// A delivery not settled this long after it arrived is parked: the broker's consumer
    /// timeout less a margin.
    pub max_hold: Duration,
    /// How often to resync, if at all.
    pub resync_interval: Option<Duration>,
    /// The share of this integration's entities above which a resync refuses to delete.
    pub deletion_threshold: f64,
}

/// The Harbors a command's `--instance` picks, by index: that one, or every one.
pub fn select(harbors: &[HarborSettings], instance: Option<&str>) -> anyhow::Result<Vec<usize>> {
    let Some(wanted) = instance else {
        return Ok((0..harbors.len()).collect());
    };
    match harbors
        .iter()
        .position(|h| h.name.as_deref() == Some(wanted))
    {
        Some(index) => Ok(vec![index]),
        None => {
            let names: Vec<&str> = harbors.iter().filter_map(|h| h.name.as_deref()).collect();
            bail!(
                "--instance {wanted}: HARBOR_INSTANCES_FILE has no such instance (it has: {})",
                names.join(", ")
            )
        }
    }
}

/// An `http(s)://` base URL without credentials, query or fragment.
fn base_url(raw: &str, var: &str) -> anyhow::Result<Url> {
    let url =
        Url::parse(raw.trim_end_matches('/')).with_context(|| format!("{var} is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!("{var} must be an http:// or https:// address");
    }
    if !url.username().is_empty() || url.password().is_some() {
        bail!("{var} must not carry credentials; use the username and password settings");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("{var} must not have a query or fragment");
    }
    Ok(url)
}

/// A [`base_url`] the worker sends credentials to: over plain `http://` to anything but a
/// loopback address, one warning says so (at start, when the settings are read).
fn credentials_url(raw: &str, var: &str) -> anyhow::Result<Url> {
    let url = base_url(raw, var)?;
    if plain_http_off_this_machine(&url) {
        tracing::warn!(
            variable = var,
            host = url.host_str().unwrap_or_default(),
            "{var} is plain http:// to another machine: credentials travel unencrypted"
        );
    }
    Ok(url)
}

/// `http://` to a host that is not a loopback address.
fn plain_http_off_this_machine(url: &Url) -> bool {
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    url.scheme() == "http" && !loopback
}

fn required(value: Option<String>, var: &str) -> anyhow::Result<String> {
    value
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{var} is required"))
}

impl HarborArgs {
    /// The Harbors, each with our webhook policy when WEBHOOK_PUBLIC_URL is set.
    pub fn into_settings(self, webhooks: WebhookArgs) -> anyhow::Result<Vec<HarborSettings>> {
        let target = webhooks.target()?;
        let desired = |name: Option<&str>, secrets: Vec<SecretString>, var: &str| {
            let Some((url, cloudevents)) = &target else {
                return Ok(None);
            };
            let Some(secret) = secrets.into_iter().next() else {
                bail!(
                    "{var} is required with WEBHOOK_PUBLIC_URL: Harbor's webhook policies send \
                     it, and the ingest checks it"
                );
            };
            Ok(Some(Desired::new(url, name, secret, *cloudevents)))
        };
        let Some(path) = self.harbor_instances_file else {
            let secrets = secrets_from(
                webhooks.webhook_secret,
                webhooks.webhook_secret_file,
                "WEBHOOK_SECRET",
            )?;
            return Ok(vec![HarborSettings {
                name: None,
                url: credentials_url(&required(self.harbor_url, "HARBOR_URL")?, "HARBOR_URL")?,
                username: required(self.harbor_username, "HARBOR_USERNAME")?,
                password: required_secret(
                    self.harbor_password,
                    self.harbor_password_file,
                    "HARBOR_PASSWORD",
                )?,
                webhooks: desired(None, secrets, "WEBHOOK_SECRET (or WEBHOOK_SECRET_FILE)")?,
            }]);
        };
        let single = [
            ("HARBOR_URL", self.harbor_url.is_some()),
            ("HARBOR_USERNAME", self.harbor_username.is_some()),
            ("HARBOR_PASSWORD", self.harbor_password.is_some()),
            ("HARBOR_PASSWORD_FILE", self.harbor_password_file.is_some()),
            ("WEBHOOK_SECRET", webhooks.webhook_secret.is_some()),
            (
                "WEBHOOK_SECRET_FILE",
                webhooks.webhook_secret_file.is_some(),
            ),
        ];
        if let Some((var, _)) = single.iter().find(|(_, set)| *set) {
            bail!(
                "{var} is not used with HARBOR_INSTANCES_FILE: each instance's URL, credentials \
                 and webhook secret are given there"
            );
        }
        instances::load(&path)?
            .into_iter()
            .map(|instance| {
                let field = |name: &str| instance.var(name);
                let url = required(instance.url.clone(), &field("url"))?;
                let secrets = instance.webhook_secrets()?;
                let var = format!("{} (or webhook_secret_file)", field("webhook_secret"));
                Ok(HarborSettings {
                    url: credentials_url(&url, &field("url"))?,
                    username: required(instance.username.clone(), &field("username"))?,
                    password: instance.password()?.with_context(|| {
                        format!("{} (or password_file) is required", field("password"))
                    })?,
                    webhooks: desired(Some(&instance.name), secrets, &var)?,
                    name: Some(instance.name),
                })
            })
            .collect()
    }
}

impl PortArgs {
    /// The mapping: MAPPING_FILE, compiled, or the built-in default.
    pub fn mapping(&self) -> anyhow::Result<Mapping> {
        match &self.mapping_file {
            None => Ok(Mapping::default_mapping()),
            Some(path) => Ok(Mapping::load(path)?),
        }
    }

    /// Checks the Port options.
    pub fn into_settings(self) -> anyhow::Result<PortSettings> {
        let share = self.port_rate_share;
        if !(share > 0.0 && share <= 1.0) {
            bail!("PORT_RATE_SHARE must be more than 0 and at most 1 (got {share})");
        }
        Ok(PortSettings {
            budget: Arc::new(PortBudget::new(share)),
            mapping: Arc::new(self.mapping()?),
            url: credentials_url(&self.port_api_url, "PORT_API_URL")?,
            client_id: required(self.port_client_id, "PORT_CLIENT_ID")?,
            client_secret: required_secret(
                self.port_client_secret,
                self.port_client_secret_file,
                "PORT_CLIENT_SECRET",
            )?,
        })
    }
}

impl Cli {
    /// Checks everything the consuming worker needs.
    pub fn into_settings(self) -> anyhow::Result<Settings> {
        let run = self.run;
        if !(1..=1000).contains(&run.worker_concurrency) {
            bail!("WORKER_CONCURRENCY must be between 1 and 1000");
        }
        if run.worker_max_held_bytes < 1024 * 1024 {
            bail!("WORKER_MAX_HELD_BYTES must be at least 1048576 (1 MiB)");
        }
        if run.worker_prefetch < run.worker_concurrency {
            bail!("WORKER_PREFETCH must be at least WORKER_CONCURRENCY");
        }
        let http = run.http()?;
        let max_hold = max_hold(&run)?;
        if run
            .resync_interval
            .is_some_and(|i| i < Duration::from_secs(5))
        {
            bail!("RESYNC_INTERVAL must be at least 5s");
        }
        let amqp = self.amqp.into_settings()?;
        let harbors = self.harbor.into_settings(self.webhooks)?;
        let port = self.port.into_settings()?;
        let threshold = run.deletion_threshold(&port.mapping)?;
        Ok(Settings {
            amqp,
            harbors,
            port,
            concurrency: run.worker_concurrency,
            prefetch: run.worker_prefetch,
            max_held_bytes: run.worker_max_held_bytes,
            pull_window: run.pull_coalesce_window,
            retry: RetryPolicy::with_budget(run.retry_max_elapsed),
            metrics_addr: run.metrics_addr,
            http,
            shutdown_timeout: run.shutdown_timeout,
            resync_interval: run.resync_interval,
            deletion_threshold: threshold,
            max_hold,
        })
    }
}

impl RunArgs {
    /// The HTTP client to Harbor and Port, for HTTP_TIMEOUT and HTTP_MAX_RESPONSE_BYTES.
    pub fn http(&self) -> anyhow::Result<Http> {
        if self.http_timeout.is_zero() {
            bail!("HTTP_TIMEOUT must be more than 0");
        }
        if self.http_max_response_bytes < 1024 {
            bail!("HTTP_MAX_RESPONSE_BYTES must be at least 1024");
        }
        Http::new(self.http_timeout, self.http_max_response_bytes)
            .context("Failed to build the HTTP client")
    }

    /// The mapping's `entityDeletionThreshold`, or else `RESYNC_DELETION_THRESHOLD`, checked.
    pub fn deletion_threshold(&self, mapping: &Mapping) -> anyhow::Result<f64> {
        if let Some(threshold) = mapping.deletion_threshold {
            return Ok(threshold);
        }
        let threshold = self.resync_deletion_threshold;
        if !(0.0..=1.0).contains(&threshold) {
            bail!("RESYNC_DELETION_THRESHOLD must be between 0 and 1 (got {threshold})");
        }
        Ok(threshold)
    }
}

/// How long a delivery may be held: the consumer timeout less a minute for parking and acking.
/// Refused when an event's normal course does not fit in it: five pull windows of waiting, the
/// retry budget, and one last refresh of two calls.
fn max_hold(run: &RunArgs) -> anyhow::Result<Duration> {
    const MARGIN: Duration = Duration::from_secs(60);
    let max_hold = run
        .consumer_timeout
        .checked_sub(MARGIN)
        .filter(|hold| !hold.is_zero())
        .context("CONSUMER_TIMEOUT must be more than 1m")?;
    let course = run.pull_coalesce_window * 5 + run.retry_max_elapsed + run.http_timeout * 2;
    if course >= max_hold {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        bail!(
            "5 × PULL_COALESCE_WINDOW + RETRY_MAX_ELAPSED + 2 × HTTP_TIMEOUT ({}) must be less than \
             CONSUMER_TIMEOUT less 1m ({}): the broker takes back a delivery held longer than \
             its consumer timeout, so an event must be settled well before",
            show(course),
            show(max_hold)
        );
    }
    Ok(max_hold)
}

#[cfg(test)]
mod tests;
