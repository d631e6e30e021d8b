//! Command-line options (each with its environment variable) and the typed settings built from
//! them once, at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use harbor_shared::broker::AmqpSettings;
use harbor_shared::config::{AmqpArgs, LogArgs, secrets_from};
use harbor_shared::instances;

use crate::auth::{AuthMode, Authenticator};

/// Receives Harbor webhooks and publishes them, confirmed, to RabbitMQ.
#[derive(Parser, Debug)]
#[command(name = "harbor-ingest", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to serve `POST /webhook` (or `/webhook/<instance>`), `/healthz`, `/readyz` and
    /// `/metrics` on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// Webhook secret; several, comma-separated, are all accepted (for rotation). From the
    /// environment only (a flag would show it in the process list).
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// File holding the webhook secret(s), instead of WEBHOOK_SECRET.
    #[arg(long, env = "WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// Several Harbors: a YAML file naming each (docs/instances.md); each one's webhooks come
    /// to `/webhook/<name>`, checked with its own secrets (instead of WEBHOOK_SECRET).
    #[arg(long, env = "HARBOR_INSTANCES_FILE")]
    pub harbor_instances_file: Option<PathBuf>,

    /// Accepted `Authorization` forms: `auto` (any), `token` (the secret as sent by Harbor's
    /// Auth Header), `hmac` (a signature of the body), or `none` (no check: only behind a
    /// trusted proxy).
    #[arg(long, env = "WEBHOOK_AUTH_MODE", value_enum, default_value_t = AuthMode::Auto)]
    pub webhook_auth_mode: AuthMode,

    /// Larger request bodies are refused with 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,

    /// A client must send its request's headers within this time, or is cut off (slow clients).
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Threads serving HTTP. On two cores shared with the broker one did as well as two; with
    /// cores to spare, raise it or add replicas.
    #[arg(long, env = "HTTP_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub http_workers: u16,

    /// Open connections each HTTP worker serves at once; more wait in the listen backlog until
    /// one closes, so thousands of idle or slow clients cannot exhaust memory or descriptors.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    #[command(flatten)]
    pub amqp: AmqpArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// What to do; serving is the default.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Serve webhooks (the default).
    Serve,
    /// Exit 0 if the ingest on LISTEN_ADDR is ready, 1 if not (for container health checks).
    Healthcheck,
}

/// Confirm-mode channels the ingest publishes on, one batch in flight on each (see
/// `harbor_shared::publisher`): the webhooks that come while every channel waits for its
/// confirms go out together on the next one free. lapin's cost per write grows with the
/// channels a connection has, and batches make more of them useless.
pub const PUBLISHER_CHANNELS: usize = 8;

/// How long a publish waits for the broker's confirm before the answer is 503.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the ingest needs, checked.
#[derive(Debug)]
pub struct Settings {
    /// Where to listen; port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// The Harbors whose webhooks are taken, each with its `Authorization` check.
    pub endpoints: Vec<Endpoint>,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Time for a client to send its request headers.
    pub request_timeout: Duration,
    /// The broker.
    pub amqp: AmqpSettings,
    /// How long a publish may wait for the broker's confirm before the answer is 503.
    pub confirm_timeout: Duration,
    /// Confirm-mode channels publishes are spread over.
    pub publisher_channels: usize,
    /// Threads serving HTTP.
    pub http_workers: usize,
    /// Open connections per HTTP worker.
    pub max_connections: usize,
}

/// Where one Harbor's webhooks come in, and how they are checked.
#[derive(Debug)]
pub struct Endpoint {
    /// `None`: `/webhook`, a single Harbor's (its events carry no instance); else
    /// `/webhook/<instance>`.
    pub instance: Option<String>,
    /// Its `Authorization` check.
    pub auth: Authenticator,
}

impl Endpoint {
    /// The Harbor it serves, as the metrics name it: the instance, or `default` at `/webhook`
    /// (the `harborInstance` of a single Harbor's entities).
    pub fn harbor(&self) -> &str {
        self.instance
            .as_deref()
            .unwrap_or(instances::DEFAULT_INSTANCE)
    }
}

impl Cli {
    /// The endpoints: one at `/webhook`, or one per instance of HARBOR_INSTANCES_FILE.
    fn endpoints(&mut self) -> anyhow::Result<Vec<Endpoint>> {
        let mode = self.webhook_auth_mode;
        let Some(path) = &self.harbor_instances_file else {
            let secrets = secrets_from(
                self.webhook_secret.take(),
                self.webhook_secret_file.take(),
                "WEBHOOK_SECRET",
            )?;
            let auth = Authenticator::new(mode, secrets)?;
            return Ok(vec![Endpoint {
                instance: None,
                auth,
            }]);
        };
        if self.webhook_secret.is_some() || self.webhook_secret_file.is_some() {
            bail!(
                "WEBHOOK_SECRET is not used with HARBOR_INSTANCES_FILE: give each instance its \
                 webhook_secret (or webhook_secret_file) there"
            );
        }
        instances::load(path)?
            .into_iter()
            .map(|instance| {
                let secrets = instance.webhook_secrets()?;
                if mode != AuthMode::None && secrets.is_empty() {
                    bail!(
                        "{} (or webhook_secret_file) is required",
                        instance.var("webhook_secret")
                    );
                }
                Ok(Endpoint {
                    auth: Authenticator::new(mode, secrets)?,
                    instance: Some(instance.name),
                })
            })
            .collect()
    }

    /// Checks the options; the error names the variable at fault.
    pub fn into_settings(mut self) -> anyhow::Result<Settings> {
        let endpoints = self.endpoints()?;
        if self.max_body_bytes == 0 {
            bail!("MAX_BODY_BYTES must be at least 1");
        }
        if self.request_timeout.is_zero() {
            bail!("REQUEST_TIMEOUT must be more than 0");
        }
        Ok(Settings {
            listen_addr: self.listen_addr,
            endpoints,
            max_body_bytes: self.max_body_bytes,
            request_timeout: self.request_timeout,
            amqp: self.amqp.into_settings()?,
            confirm_timeout: CONFIRM_TIMEOUT,
            publisher_channels: PUBLISHER_CHANNELS,
            http_workers: usize::from(self.http_workers),
            max_connections: self.max_connections as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Settings> {
        let mut argv = vec!["harbor-ingest"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.into_settings()
    }

    #[test]
    fn refuses_to_start_without_a_secret() {
        let err = parse(&[]).unwrap_err().to_string();
        assert!(err.contains("WEBHOOK_SECRET"), "{err}");
        assert!(err.contains("WEBHOOK_AUTH_MODE=none"), "{err}");
    }

    #[test]
    fn starts_without_a_secret_only_when_none_is_asked_for() {
        let settings = parse(&["--webhook-auth-mode", "none"]).unwrap();
        assert_eq!(settings.endpoints[0].auth.mode(), AuthMode::None);
    }

    #[test]
    fn comma_separated_secrets_are_all_kept() {
        let settings = parse(&[
            "--webhook-secret",
            "an-old-secret-0123, a-new-secret-01234 ,",
        ])
        .unwrap();
        assert_eq!(settings.endpoints[0].auth.secret_count(), 2);
    }

    #[test]
    fn a_short_secret_is_refused_naming_the_variable() {
        let err = parse(&["--webhook-secret", "a-long-enough-secret, short"]).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("WEBHOOK_SECRET: secret 2 of 2 is shorter than 16"),
            "{err}"
        );
        assert!(
            !err.contains("short,") && !err.contains("\"short\""),
            "{err}"
        );
    }

    #[test]
    fn each_instance_of_the_file_is_an_endpoint_with_its_secrets() {
        let dir = std::env::temp_dir().join(format!("ingest-instances-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("instances.yaml");
        let text = "instances:\n  - name: eu\n    webhook_secret: eu-secret-a-0123456, eu-secret-b-0123456\n  - name: us\n    webhook_secret_file: us\n  - name: ap\n";
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.join("us"), "us-secret-c-0123456\n").unwrap();
        let file = path.to_str().unwrap();
        let missing = parse(&["--harbor-instances-file", file]).unwrap_err();
        assert!(
            format!("{missing:#}").contains("instance ap: webhook_secret"),
            "{missing:#}"
        );
        std::fs::write(&path, &text[..text.len() - "  - name: ap\n".len()]).unwrap();
        let both = parse(&[
            "--harbor-instances-file",
            file,
            "--webhook-secret",
            "a-long-enough-secret",
        ]);
        let settings = parse(&["--harbor-instances-file", file]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            both.unwrap_err()
                .to_string()
                .contains("not used with HARBOR_INSTANCES_FILE")
        );
        let endpoints: Vec<_> = settings
            .endpoints
            .iter()
            .map(|e| (e.instance.as_deref().unwrap(), e.auth.secret_count()))
            .collect();
        assert_eq!(endpoints, [("eu", 2), ("us", 1)]);
    }

    #[test]
    fn credentials_are_refused_as_flags() {
        for (flag, var) in [
            (
                "--webhook-secret",
                "WEBHOOK_SECRET (or WEBHOOK_SECRET_FILE)",
            ),
            ("--amqp-url", "AMQP_URL (or AMQP_URL_FILE)"),
        ] {
            let args = ["harbor-ingest", flag, "amqp://u:a-long-enough-secret@h/"];
            let err = harbor_shared::config::try_parse_cli::<Cli>(args).unwrap_err();
            assert!(err.to_string().contains(&format!("set {var} in")), "{err}");
        }
    }

    #[test]
    fn a_bad_amqp_url_is_named() {
        let err = parse(&[
            "--webhook-secret",
            "a-long-enough-secret",
            "--amqp-url",
            "http://x",
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("AMQP_URL"));
    }
}
