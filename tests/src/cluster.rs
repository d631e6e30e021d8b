//! A three-node RabbitMQ cluster for tests and the soak program, or one node alone:
//! `deploy/local/cluster.sh` on ports of its own, in a folder of its own, stopped and removed when
//! dropped.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running cluster.
pub struct Cluster {
    folder: PathBuf,
    port_base: u16,
    size: u16,
}

impl Cluster {
    /// Starts one whose nodes listen on `port_base` + 1 to 3 (AMQP), + 10,001 to 10,003
    /// (management), + 10,091 to 10,093 (Prometheus) and + 20,001 to 20,003 (distribution).
    pub fn start(port_base: u16) -> Self {
        Self::of_size(port_base, 3)
    }

    /// Starts node 1 alone, on the ports `start` gives it: a throwaway broker.
    pub fn single(port_base: u16) -> Self {
        Self::of_size(port_base, 1)
    }

    fn of_size(port_base: u16, size: u16) -> Self {
        let folder =
            std::env::temp_dir().join(format!("harbor-cluster-{port_base}-{}", std::process::id()));
        let cluster = Self {
            folder,
            port_base,
            size,
        };
        assert!(
            cluster.script(&["start"]),
            "deploy/local/cluster.sh start failed"
        );
        cluster
    }

    /// The environment RabbitMQ's command-line tools need to act on node `n`: the HOME that
    /// holds the nodes' `.erlang.cookie`, and the node's enabled-plugins file.
    pub fn cli_env(&self, n: u16) -> [(&'static str, PathBuf); 2] {
        [
            ("HOME", self.folder.join("home")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.folder.join(format!("node{n}/enabled_plugins")),
            ),
        ]
    }

    /// Runs the script on this cluster; whether it succeeded.
    pub fn script(&self, args: &[&str]) -> bool {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/cluster.sh");
        Command::new(script)
            .args(args)
            .env("CLUSTER_DIR", &self.folder)
            .env("CLUSTER_PORT_BASE", self.port_base.to_string())
            .env("CLUSTER_SIZE", self.size.to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops node `n` (1-3): its RabbitMQ application, as a crash would end its connections.
    pub fn stop_node(&self, n: u16) -> bool {
        self.script(&["stop-node", &n.to_string()])
    }

    /// Starts node `n` again, and waits until it runs.
    pub fn start_node(&self, n: u16) -> bool {
        self.script(&["start-node", &n.to_string()])
    }

    /// The AMQP_URL listing the nodes.
    pub fn url(&self) -> String {
        (1..=self.size)
            .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port_base + n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The number (1-3) of a node named `hsync<n>@...`.
    pub fn node_number(node: &str) -> u16 {
        node.strip_prefix("hsync")
            .and_then(|n| n.split('@').next()?.parse().ok())
            .unwrap_or_else(|| panic!("not a node of the cluster: {node}"))
    }

    /// A management API answer, from the first node that answers.
    pub async fn management(&self, path: &str) -> Value {
        for n in 1..=self.size {
            let url = format!("http://127.0.0.1:{}/api{path}", self.port_base + 10_000 + n);
            let answer = reqwest::Client::new()
                .get(url)
                .basic_auth("guest", Some("guest"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if let Ok(answer) = answer
                && answer.status().is_success()
            {
                return answer.json().await.unwrap();
            }
        }
        panic!("no node's management API answers");
    }

    /// The node (1-3) of the connection whose name starts with `name`, once the management API
    /// lists it (it lists new connections with a delay).
    pub async fn node_of(&self, name: &str) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let connections = self.management("/connections").await;
            let found = connections.as_array().unwrap().iter().find(|c| {
                c["client_properties"]["connection_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name))
            });
            if let Some(connection) = found {
                return Self::node_number(connection["node"].as_str().unwrap());
            }
            assert!(Instant::now() < deadline, "no connection named {name}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The node that leads a queue.
    pub async fn leader_of(&self, queue: &str) -> u16 {
        let queue = self.management(&format!("/queues/%2f/{queue}")).await;
        Self::node_number(queue["leader"].as_str().unwrap())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.script(&["stop"]);
    }
}
