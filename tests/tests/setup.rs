//! `deploy/local/setup.sh`, the set-up the two quick-start commands do: it turns on RabbitMQ's
//! plugins on a broker that has them off (a throwaway node, not the broker the other tests use),
//! does nothing when everything is in place, skips Chromium and cargo-nextest when present, and
//! stops with one line naming the fix when a step cannot be done.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use harbor_sync_tests::cluster::Cluster;

/// Ports 5951 (AMQP), 15951 (management), 16041 (Prometheus), 25951: apart from the default
/// broker's and the other tests' clusters.
const PORT_BASE: u16 = 5950;
const PLUGINS: [&str; 3] = [
    "rabbitmq_management",
    "rabbitmq_consistent_hash_exchange",
    "rabbitmq_prometheus",
];
/// Where the throwaway node's command-line tools are: the real ones, not Debian's wrappers
/// (which would swap HOME and lose the node's Erlang cookie), as `cluster.sh` runs them.
const SBIN: &str = "/usr/lib/rabbitmq/bin";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/local")
        .join(name)
}

/// `setup.sh` with `args`, aimed at the throwaway node, with `env` on top.
fn setup(node: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(script("setup.sh"))
        .args(args)
        .envs(node.cli_env(1))
        .env("RABBITMQ_NODENAME", "hsync1@localhost")
        .env("RABBITMQ_SBIN", SBIN)
        .env("RABBITMQ_AMQP_PORT", (PORT_BASE + 1).to_string())
        .env("RABBITMQ_MANAGEMENT_PORT", (PORT_BASE + 10_001).to_string())
        .env("RABBITMQ_PROMETHEUS_PORT", (PORT_BASE + 10_091).to_string())
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The node's plugins, explicitly or implicitly enabled.
fn enabled_plugins(node: &Cluster) -> Vec<String> {
    let output = Command::new(format!("{SBIN}/rabbitmq-plugins"))
        .args(["-n", "hsync1@localhost", "-q", "list", "-e", "-m"])
        .envs(node.cli_env(1))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn answers(url: &str) -> bool {
    let client = reqwest::Client::new();
    client
        .get(url)
        .basic_auth("guest", Some("guest"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test]
async fn the_setup_turns_on_the_plugins_of_a_broker_that_has_them_off_and_then_does_nothing() {
    let node = Cluster::single(PORT_BASE);
    let disabled = Command::new(format!("{SBIN}/rabbitmq-plugins"))
        .args(["-n", "hsync1@localhost", "-q", "disable"])
        .args(PLUGINS)
        .envs(node.cli_env(1))
        .output()
        .unwrap();
    assert!(disabled.status.success(), "{}", stderr(&disabled));
    let management = format!("http://127.0.0.1:{}/api/overview", PORT_BASE + 10_001);
    let prometheus = format!("http://127.0.0.1:{}/metrics", PORT_BASE + 10_091);
    assert!(
        !answers(&management).await,
        "the management API still answers"
    );
    assert!(
        !answers(&prometheus).await,
        "the Prometheus endpoint still answers"
    );

    let first = setup(&node, &["rabbitmq"], &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(
        stderr(&first).trim(),
        "setup: enabling RabbitMQ's plugins rabbitmq_management \
         rabbitmq_consistent_hash_exchange rabbitmq_prometheus (rabbitmq-plugins enable)",
        "one line for the one step taken"
    );
    let enabled = enabled_plugins(&node);
    for plugin in PLUGINS {
        assert!(
            enabled.iter().any(|p| p == plugin),
            "{plugin} is off: {enabled:?}"
        );
    }
    assert!(
        answers(&management).await,
        "no management API after the set-up"
    );
    assert!(
        answers(&prometheus).await,
        "no Prometheus endpoint after the set-up"
    );

    let again = setup(&node, &["rabbitmq"], &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        stderr(&again).trim(),
        "setup: nothing to do (rabbitmq in place)"
    );
}

/// A folder whose `apt-get` and `cargo install` record that they ran and fail, put first on PATH:
/// the set-up must not call them for what is present.
struct Shims {
    dir: PathBuf,
}

impl Shims {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("setup-shims-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let calls = dir.join("calls");
        let apt = format!(
            "#!/bin/sh\necho \"apt-get $*\" >>'{}'\necho 'E: Could not resolve the mirror' >&2\nexit 100\n",
            calls.display()
        );
        let cargo = format!(
            "#!/bin/sh\nif [ \"$1\" = install ]; then echo \"cargo $*\" >>'{}'; exit 101; fi\nexec '{}' \"$@\"\n",
            calls.display(),
            real("cargo").display()
        );
        for (name, body) in [("apt-get", apt), ("cargo", cargo)] {
            let path = dir.join(name);
            std::fs::write(&path, body).unwrap();
            Command::new("chmod").arg("+x").arg(&path).status().unwrap();
        }
        Self { dir }
    }

    fn path(&self) -> String {
        format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap())
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("calls")).unwrap_or_default()
    }
}

impl Drop for Shims {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where `name` is on PATH.
fn real(name: &str) -> PathBuf {
    let output = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

fn run_setup(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(script("setup.sh"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn chromium_and_nextest_are_not_installed_again_when_present() {
    let shims = Shims::new();
    let output = run_setup(&["chromium", "nextest"], &[("PATH", &shims.path())]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(shims.calls(), "", "an installer ran for what is present");
    assert_eq!(
        stderr(&output).trim(),
        "setup: nothing to do (chromium nextest in place)"
    );
}

#[test]
fn a_step_that_cannot_be_done_stops_at_once_with_one_line_naming_the_fix() {
    let shims = Shims::new();
    let output = run_setup(
        &["chromium", "nextest"],
        &[("PATH", &shims.path()), ("CHROMIUM", "no-such-chromium")],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    // Said what it tried, then why it stopped and what would fix it; nextest is not reached.
    let lines: Vec<String> = stderr(&output).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[0],
        "setup: installing Chromium (apt-get install -y chromium)"
    );
    assert!(
        lines[1].starts_with("setup: apt-get could not install chromium (E: Could not resolve")
            && lines[1].ends_with("Then: apt-get install -y chromium"),
        "{}",
        lines[1]
    );
    assert_eq!(shims.calls(), "apt-get update -qq\n");

    let unknown = run_setup(&["postgres"], &[]);
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(
        stderr(&unknown).trim(),
        "setup: no such step: postgres (rabbitmq, chromium, nextest)"
    );
}
