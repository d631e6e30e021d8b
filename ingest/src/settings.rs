//! Command-line options (each with its environment variable) and the typed settings built from
//! them once, at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use harbor_shared::config::{AmqpArgs, AmqpSettings, LogArgs, secrets_from};

use crate::auth::{AuthMode, Authenticator};

/// Receives Harbor webhooks and publishes them, confirmed, to RabbitMQ.
#[derive(Parser, Debug)]
#[command(name = "harbor-ingest", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to serve `POST /webhook`, `/healthz`, `/readyz` and `/metrics` on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// Webhook secret; several, comma-separated, are all accepted (for rotation).
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// File holding the webhook secret(s), instead of WEBHOOK_SECRET.
    #[arg(long, env = "WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

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

/// Confirm-mode channels the ingest publishes on, one publish in flight on each (see
/// `harbor_shared::publisher`): at most this many webhooks wait for the broker's confirm at
/// once, the others for a free channel.
pub const PUBLISHER_CHANNELS: usize = 64;

/// How long a publish waits for the broker's confirm before the answer is 503.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the ingest needs, checked.
#[derive(Debug)]
pub struct Settings {
    /// Where to listen; port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// The `Authorization` check.
    pub auth: Authenticator,
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
}

impl Cli {
    /// Checks the options; the error names the variable at fault.
    pub fn into_settings(self) -> anyhow::Result<Settings> {
        let secrets = secrets_from(
            self.webhook_secret,
            self.webhook_secret_file,
            "WEBHOOK_SECRET",
        )?;
        if self.max_body_bytes == 0 {
            bail!("MAX_BODY_BYTES must be at least 1");
        }
        if self.request_timeout.is_zero() {
            bail!("REQUEST_TIMEOUT must be more than 0");
        }
        Ok(Settings {
            listen_addr: self.listen_addr,
            auth: Authenticator::new(self.webhook_auth_mode, secrets)?,
            max_body_bytes: self.max_body_bytes,
            request_timeout: self.request_timeout,
            amqp: self.amqp.into_settings()?,
            confirm_timeout: CONFIRM_TIMEOUT,
            publisher_channels: PUBLISHER_CHANNELS,
            http_workers: usize::from(self.http_workers),
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
        assert_eq!(settings.auth.mode(), AuthMode::None);
    }

    #[test]
    fn comma_separated_secrets_are_all_kept() {
        let settings = parse(&["--webhook-secret", "old, new ,"]).unwrap();
        assert_eq!(settings.auth.secret_count(), 2);
    }

    #[test]
    fn a_bad_amqp_url_is_named() {
        let err = parse(&["--webhook-secret", "s", "--amqp-url", "http://x"]).unwrap_err();
        assert!(format!("{err:#}").contains("AMQP_URL"));
    }
}
