//! The README's commands keep working. Its `sh` blocks are run here, as a newcomer would run
//! them: `deploy/local/run.sh` (on free ports, with this test's queues and binaries), the sandbox walk-through
//! and the payload example against it, `harbor-worker blueprints` against the sandbox's Port.
//! The ones that need Docker or a cluster, and the test command itself, are run by CI in the form
//! that works here (this test checks that CI still does). Every `harbor-worker ...` command the README names must exist
//! with the flags it shows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use harbor_sync_tests::apps::wait_ready_within;
use harbor_sync_tests::processes::{binary, free_port, stdout_of};
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::wait_until;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read(file: &str) -> String {
    std::fs::read_to_string(root().join(file)).unwrap()
}

/// The README's `sh` blocks, each as its commands: continuation lines joined, comments dropped.
fn blocks() -> Vec<Vec<String>> {
    let readme = read("README.md");
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```sh" {
            continue;
        }
        let mut commands: Vec<String> = Vec::new();
        let mut continued = false;
        for line in lines.by_ref() {
            let line = line.trim();
            if line == "```" {
                break;
            }
            let command = match line.find("  #") {
                Some(at) => line[..at].trim_end(),
                None => line,
            };
            let (command, continues) = match command.strip_suffix('\\') {
                Some(start) => (start.trim_end(), true),
                None => (command, false),
            };
            match commands.last_mut() {
                Some(last) if continued => {
                    last.push(' ');
                    last.push_str(command);
                }
                _ => commands.push(command.to_owned()),
            }
            continued = continues;
        }
        blocks.push(commands);
    }
    blocks
}

/// `deploy/local/run.sh` as the README starts it, on free ports and this test's queues; stopped
/// (SIGTERM, as Ctrl-C) when dropped.
struct RunSh {
    child: Child,
    ingest: String,
    sandbox: String,
    metrics: String,
}

impl RunSh {
    fn start(broker: &TestTopology) -> Self {
        let (ingest, sandbox, metrics) = (free_port(), free_port(), free_port());
        let child = Command::new(root().join("deploy/local/run.sh"))
            .env("AMQP_EXCHANGE", broker.topology().exchange())
            .env("AMQP_QUEUE", broker.topology().queue())
            .env("LISTEN_ADDR", format!("127.0.0.1:{ingest}"))
            .env("SANDBOX_LISTEN_ADDR", format!("127.0.0.1:{sandbox}"))
            .env("METRICS_ADDR", format!("127.0.0.1:{metrics}"))
            // The binaries this test run built: run.sh building its own, with another feature
            // set than the tests', would take minutes and replace the binaries other tests run.
            .env(
                "HARBOR_SYNC_BIN_DIR",
                binary("harbor-ingest").parent().unwrap(),
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            ingest: format!("127.0.0.1:{ingest}"),
            sandbox: format!("127.0.0.1:{sandbox}"),
            metrics: format!("127.0.0.1:{metrics}"),
        }
    }

    /// A README command pointed at this run's addresses.
    fn here(&self, command: &str) -> String {
        command
            .replace("127.0.0.1:8090", &self.sandbox)
            .replace("127.0.0.1:8080", &self.ingest)
            .replace("127.0.0.1:9090", &self.metrics)
    }
}

impl Drop for RunSh {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Runs a README block with bash, in the checkout; its output, once it succeeded.
fn bash(script: &str) -> String {
    stdout_of(
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(root()),
    )
}

#[tokio::test]
async fn the_readme_commands_run_as_written() {
    let blocks = blocks();
    let broker = TestTopology::new().await;
    let run = RunSh::start(&broker);
    for address in [&run.ingest, &run.metrics] {
        wait_ready_within(
            &format!("http://{address}/readyz"),
            Duration::from_secs(120),
        )
        .await;
    }

    let mut ran = 0;
    for block in &blocks {
        let first = block[0].as_str();
        if first.starts_with("S=") {
            // The sandbox walk-through: push, pull, scan and delete reach the ingest, and the
            // worker writes them to the sandbox's Port (faster than a person reads, but not as
            // fast as the next line runs).
            let output = bash(&run.here(&block.join("\n")));
            assert_eq!(output.matches("\"status\":202").count(), 4, "{output}");
            let requests = format!("http://{}/sandbox/port/requests", run.sandbox);
            wait_until(
                "the worker's writes to Port",
                Duration::from_secs(30),
                || async {
                    let written = reqwest::get(&requests).await.unwrap().text().await.unwrap();
                    written.contains("library/nginx@sha256:") && written.contains("\"DELETE\"")
                },
            )
            .await;
            ran += 1;
        } else if first.starts_with("curl -i -XPOST http://127.0.0.1:8080/webhook") {
            let output = bash(&run.here(first));
            assert!(output.starts_with("HTTP/1.1 202"), "{output}");
            assert!(output.contains("\"status\":\"accepted\""), "{output}");
            ran += 1;
        } else if first
            .starts_with("PORT_CLIENT_ID=... PORT_CLIENT_SECRET=... harbor-worker blueprints")
        {
            let command = first
                .replace("PORT_CLIENT_ID=...", "PORT_CLIENT_ID=sandbox-client")
                .replace(
                    "PORT_CLIENT_SECRET=...",
                    "PORT_CLIENT_SECRET=sandbox-secret",
                )
                .replace("harbor-worker", binary("harbor-worker").to_str().unwrap());
            let script = format!("PORT_API_URL=http://{} {command}", run.sandbox);
            bash(&script);
            ran += 1;
        } else {
            for command in block {
                assert_run_by_ci(command);
            }
        }
    }
    assert_eq!(
        ran, 3,
        "the README lost one of its runnable blocks: {blocks:?}"
    );
}

/// A README command this test cannot run (no Docker, no cluster, or CI itself) must be one CI
/// runs in the form that works here.
fn assert_run_by_ci(command: &str) {
    let (file, proof) = match command {
        "deploy/local/run.sh" => ("tests/tests/readme.rs", "deploy/local/run.sh"),
        "deploy/local/test.sh" => (".ci/run", "\ndeploy/local/test.sh\n"),
        "kubectl apply -k deploy/k8s/rabbitmq" => ("deploy/validate.sh", "deploy/k8s/rabbitmq;"),
        "kubectl apply -k deploy/k8s" => ("tests/tests/deployment.rs", "rendered(\"deploy/k8s\")"),
        other => panic!("no test or CI step runs this README command: {other}"),
    };
    assert!(
        read(file).contains(proof),
        "{file} no longer runs `{command}`"
    );
}

/// Each `harbor-worker <subcommand> ...` in the README's inline code: the subcommand exists and
/// takes the flags shown.
#[test]
fn every_harbor_worker_command_the_readme_names_exists_with_its_flags() {
    let readme = read("README.md");
    let mut checked = 0;
    for span in readme.split('`').skip(1).step_by(2) {
        let Some(rest) = span.strip_prefix("harbor-worker ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let subcommand: Vec<&str> = words
            .iter()
            .take_while(|w| {
                w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-')
            })
            .copied()
            .collect();
        let output = Command::new(binary("harbor-worker"))
            .args(&subcommand)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "`{span}`: harbor-worker {} --help failed",
            subcommand.join(" ")
        );
        for flag in words
            .iter()
            .filter_map(|w| w.trim_matches(['[', ']', '.']).strip_prefix("--"))
        {
            let flag = flag.split(['=', ']']).next().unwrap();
            assert!(
                help.contains(&format!("--{flag}")),
                "`{span}`: no --{flag} in\n{help}"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 8,
        "only {checked} harbor-worker commands found in the README"
    );
}
