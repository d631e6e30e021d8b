//! Options both binaries read, and the helpers that turn raw flags into typed settings.
//!
//! Every option is a `--flag` with an environment variable; the env names are part of the
//! contract (DESIGN.md). Values that carry credentials are hidden from `--help`, taken from the
//! environment only ([`parse_cli`]), and only ever held as [`SecretString`].

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Parser, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use crate::broker::{AmqpSettings, BrokerUrl};
use crate::topology::Topology;

/// Parses the command line as `C::parse()` does, and refuses a credential given as a flag: the
/// process list shows every process's arguments to every user of the machine. The credentials
/// are the options that hide their environment values; the error names the variable to use.
pub fn parse_cli<C: Parser>() -> C {
    try_parse_cli(std::env::args_os()).unwrap_or_else(|error| error.exit())
}

/// [`parse_cli`] of these arguments, the program's name first.
pub fn try_parse_cli<C: Parser>(
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
) -> Result<C, clap::Error> {
    let mut command = C::command();
    let matches = command.try_get_matches_from_mut(args)?;
    if let Some(message) = credential_flag(&command, &matches) {
        return Err(command.error(ErrorKind::ArgumentConflict, message));
    }
    C::from_arg_matches(&matches)
}

/// What is wrong with the first credential given on the command line, if one is.
fn credential_flag(command: &clap::Command, matches: &ArgMatches) -> Option<String> {
    let env_names: Vec<_> = command
        .get_arguments()
        .filter_map(clap::Arg::get_env)
        .collect();
    let found = command.get_arguments().find(|arg| {
        arg.is_hide_env_values_set()
            && matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine)
    });
    if let Some(arg) = found {
        let flag = arg.get_long().unwrap_or(arg.get_id().as_str());
        let var = arg
            .get_env()
            .map_or_else(String::new, |v| v.to_string_lossy().into_owned());
        let file = format!("{var}_FILE");
        let or_file = match env_names.iter().any(|name| *name == file.as_str()) {
            true => format!(" (or {file})"),
            false => String::new(),
        };
        return Some(format!(
            "--{flag} would show the credential to every user of the machine in the process \
             list; set {var}{or_file} in the environment instead"
        ));
    }
    let (name, sub) = matches.subcommand()?;
    credential_flag(command.find_subcommand(name)?, sub)
}

/// The broker when AMQP_URL is not set: a local one, as RabbitMQ installs it.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker a binary talks to and the names of the exchange and queue.
#[derive(Args, Debug, Clone)]
pub struct AmqpArgs {
    /// AMQP URL of the broker (`amqp://` or `amqps://`, with credentials and vhost; by default
    /// the local broker as RabbitMQ installs it: user guest at 127.0.0.1:5672, vhost /); from
    /// the environment or AMQP_URL_FILE only, as it holds the broker's password.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,

    /// A file holding AMQP_URL (its trailing newline dropped), in place of it.
    #[arg(long, env = "AMQP_URL_FILE")]
    pub amqp_url_file: Option<PathBuf>,

    /// Exchange the webhooks are published to (topic, durable).
    #[arg(long, env = "AMQP_EXCHANGE", default_value = "harbor.events")]
    pub amqp_exchange: String,

    /// Work queue; failed events go to `<queue>.parked` through the exchange `<queue>.dlx`.
    #[arg(long, env = "AMQP_QUEUE", default_value = "harbor.events")]
    pub amqp_queue: String,
}

impl AmqpArgs {
    /// Checks the URL and the names, naming the variable at fault.
    pub fn into_settings(self) -> anyhow::Result<AmqpSettings> {
        let url = secret_from(self.amqp_url, self.amqp_url_file, "AMQP_URL")?;
        let url = url
            .as_ref()
            .map_or(DEFAULT_AMQP_URL, ExposeSecret::expose_secret);
        Ok(AmqpSettings {
            url: BrokerUrl::parse(url).context("Invalid AMQP_URL")?,
            topology: Topology::new(&self.amqp_exchange, &self.amqp_queue)?,
        })
    }
}

/// How log lines are written.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line, for containers and log pipelines.
    #[default]
    Json,
    /// Human-readable lines, for a terminal.
    Pretty,
}

/// Logging options shared by both binaries.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format: `json` or `pretty`. The level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

/// Reads a secret given either directly (`<VAR>`) or as a file (`<VAR>_FILE`), never both.
///
/// A file's trailing newline is dropped, since `echo secret > file` is how most are written.
/// `var` is the variable's name (or, lowercase, a field's: `password` and `password_file`),
/// used in error messages; the value itself never is.
pub fn secret_from(
    value: Option<String>,
    file: Option<PathBuf>,
    var: &str,
) -> anyhow::Result<Option<SecretString>> {
    let suffix = match var.bytes().any(|b| b.is_ascii_lowercase()) {
        true => "_file",
        false => "_FILE",
    };
    let raw = match (value, file) {
        (Some(_), Some(_)) => bail!("{var} and {var}{suffix} are both set; set only one"),
        (Some(value), None) => value,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .with_context(|| format!("Failed to read {var}{suffix} ({})", path.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if raw.is_empty() {
        bail!("{var} is set but empty");
    }
    Ok(Some(SecretString::from(raw)))
}

/// The secrets of a comma-separated list, as [`secret_from`] reads it (`WEBHOOK_SECRET`:
/// several are accepted, for rotation; the first is the one Harbor is given). None when unset.
pub fn secrets_from(
    value: Option<String>,
    file: Option<PathBuf>,
    var: &str,
) -> anyhow::Result<Vec<SecretString>> {
    let Some(raw) = secret_from(value, file, var)? else {
        return Ok(Vec::new());
    };
    let secrets: Vec<&str> = raw
        .expose_secret()
        .split(',')
        .map(str::trim)
        .filter(|secret| !secret.is_empty())
        .collect();
    if let Some(short) = secrets
        .iter()
        .position(|s| s.chars().count() < MIN_SECRET_CHARS)
    {
        bail!(
            "{var}: secret {} of {} is shorter than {MIN_SECRET_CHARS} characters; Harbor sends \
             whatever its policy holds, and a short secret is guessable",
            short + 1,
            secrets.len()
        );
    }
    Ok(secrets
        .into_iter()
        .map(|secret| SecretString::from(secret.to_owned()))
        .collect())
}

/// The shortest webhook secret accepted.
pub const MIN_SECRET_CHARS: usize = 16;

/// Like [`secret_from`], for a secret the program cannot run without.
pub fn required_secret(
    value: Option<String>,
    file: Option<PathBuf>,
    var: &str,
) -> anyhow::Result<SecretString> {
    secret_from(value, file, var)?.with_context(|| format!("{var} (or {var}_FILE) is required"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[derive(Parser, Debug)]
    struct Broker {
        #[command(flatten)]
        amqp: AmqpArgs,
    }

    #[test]
    fn the_broker_url_comes_from_the_environment_or_a_file_never_both() {
        let file = std::env::temp_dir().join(format!("amqp-url-{}", std::process::id()));
        std::fs::write(&file, "amqp://sync:from-a-file@rabbit:5672/%2f\n").unwrap();
        let parse = |args: &[&str]| {
            // Whatever this process's environment says of the broker aside.
            let command = <Broker as clap::CommandFactory>::command()
                .mut_arg("amqp_url", |a| a.env(None))
                .mut_arg("amqp_url_file", |a| a.env(None));
            let matches = command
                .try_get_matches_from(["x"].iter().chain(args))
                .unwrap();
            let cli = <Broker as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
            cli.amqp.into_settings().map(|s| format!("{:?}", s.url))
        };
        let from_file = parse(&["--amqp-url-file", file.to_str().unwrap()]).unwrap();
        assert!(from_file.contains("rabbit"), "{from_file}");
        let default = parse(&[]).unwrap();
        assert!(default.contains("127.0.0.1"), "{default}");
        let both = parse(&[
            "--amqp-url",
            "amqp://h/",
            "--amqp-url-file",
            file.to_str().unwrap(),
        ]);
        assert!(both.unwrap_err().to_string().contains("both set"));
        std::fs::remove_file(file).unwrap();
    }

    #[derive(Parser, Debug)]
    struct Toy {
        #[arg(long, env = "TOY_SECRET", hide_env_values = true)]
        secret: Option<String>,
        #[arg(long, env = "TOY_SECRET_FILE")]
        secret_file: Option<PathBuf>,
        #[arg(long, env = "TOY_NAME")]
        name: Option<String>,
    }

    #[test]
    fn a_credential_flag_is_refused_naming_the_variable_but_not_the_value() {
        let err = try_parse_cli::<Toy>(["toy", "--secret", "hunter2"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("--secret would show the credential")
                && text.contains("set TOY_SECRET (or TOY_SECRET_FILE) in the environment"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        let toy = try_parse_cli::<Toy>(["toy", "--name", "n", "--secret-file", "/f"]).unwrap();
        assert_eq!((toy.name.as_deref(), toy.secret), (Some("n"), None));
    }

    #[test]
    fn a_secret_file_loses_its_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("secret-{}", std::process::id()));
        std::fs::write(&dir, "s3cret\n").unwrap();
        let secret = secret_from(None, Some(dir.clone()), "X").unwrap().unwrap();
        std::fs::remove_file(dir).unwrap();
        assert_eq!(secret.expose_secret(), "s3cret");
    }

    #[test]
    fn value_and_file_together_are_refused_without_showing_the_value() {
        let err = secret_from(Some("hunter2".into()), Some("/x".into()), "WEBHOOK_SECRET")
            .unwrap_err()
            .to_string();
        assert!(err.contains("WEBHOOK_SECRET_FILE"), "{err}");
        assert!(!err.contains("hunter2"));
    }

    #[test]
    fn an_empty_or_missing_required_secret_names_the_variable() {
        let err = required_secret(None, None, "PORT_CLIENT_SECRET").unwrap_err();
        assert!(err.to_string().contains("PORT_CLIENT_SECRET"));
        let err = required_secret(Some(String::new()), None, "HARBOR_PASSWORD").unwrap_err();
        assert!(err.to_string().contains("HARBOR_PASSWORD is set but empty"));
    }

    #[test]
    fn a_missing_secret_file_is_a_clear_error() {
        let err =
            secret_from(None, Some("/nonexistent/secret".into()), "HARBOR_PASSWORD").unwrap_err();
        assert!(format!("{err:#}").contains("Failed to read HARBOR_PASSWORD_FILE"));
    }
}
