//! The binaries as child processes, configured only through their environment.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary (`harbor-ingest`, `harbor-worker`, `harbor-sandbox`). Test executables run
/// from `target/<profile>/deps/`, other binaries from `target/<profile>/`, where they all sit, built by the test command
/// (each package's CLI tests make cargo build its binary).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` (the test command builds it)",
        path.display()
    );
    path
}

/// Child processes with their logs in files; killed if the test ends before it stopped them.
pub struct Processes {
    children: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Processes {
    /// Logs go to `<temp>/harbor-processes-<tag>/<name>.log`, removed when dropped (a failing
    /// test prints their last lines first).
    pub fn new(tag: &str) -> Self {
        let logs = std::env::temp_dir().join(format!("harbor-processes-{tag}"));
        std::fs::create_dir_all(&logs).unwrap();
        Self {
            children: Vec::new(),
            logs,
        }
    }

    /// Starts `binary` as `name` with exactly this environment (plus `PATH`), JSON logs.
    pub fn spawn(&mut self, name: &str, binary_name: &str, env: &[(&str, String)]) {
        self.spawn_with_args(name, binary_name, &[], env);
    }

    /// [`spawn`](Self::spawn) with command-line arguments.
    pub fn spawn_with_args(
        &mut self,
        name: &str,
        binary_name: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
        let child = Command::new(binary(binary_name))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.children.push((name.to_owned(), child));
    }

    /// Sends a signal (`KILL`, `TERM`) to one process; with `TERM`, waits until it exits and
    /// returns its exit code.
    pub fn signal(&mut self, name: &str, signal: &str) -> Option<i32> {
        let index = self.children.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut child) = self.children.remove(index);
        Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() >= deadline {
                // Killed before the panic: it is no longer among the children dropped.
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not stop within 30 s of SIG{signal}; killed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to each, in the order started; their exit codes.
    pub fn terminate_all(&mut self) -> Vec<(String, Option<i32>)> {
        let names: Vec<String> = self.children.iter().map(|(n, _)| n.clone()).collect();
        names
            .into_iter()
            .map(|name| (name.clone(), self.signal(&name, "TERM")))
            .collect()
    }

    /// The process id of a running process.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, child)| child.id())
    }

    /// Everything a process logged.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failing test shows the end of each log in its output; nothing stays behind.
        if std::thread::panicking() {
            for log in std::fs::read_dir(&self.logs)
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                eprintln!(
                    "--- the end of {}:\n{}",
                    log.path().display(),
                    tail(&text, 60)
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// Runs `command` to its end; its stdout, once it exited with success (else the test fails,
/// showing the command and both outputs).
pub fn stdout_of(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A size line of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A port nothing listens on right now, for a process to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment of a `harbor-worker` process on this topology, reading the fake Harbor and
/// writing the fake Port with their credentials, serving its metrics on `metrics_port`.
pub fn worker_env(
    broker: &crate::rabbit::TestTopology,
    harbor: &crate::fakes::FakeHarbor,
    port: &crate::fakes::FakePort,
    metrics_port: u16,
) -> Vec<(&'static str, String)> {
    use crate::fakes::{HARBOR_PASSWORD, HARBOR_USER, PORT_CLIENT_ID, PORT_CLIENT_SECRET};
    vec![
        ("AMQP_URL", crate::rabbit::amqp_url()),
        ("AMQP_EXCHANGE", broker.topology().exchange().to_owned()),
        ("AMQP_QUEUE", broker.topology().queue().to_owned()),
        ("HARBOR_URL", harbor.url()),
        ("HARBOR_USERNAME", HARBOR_USER.to_owned()),
        ("HARBOR_PASSWORD", HARBOR_PASSWORD.to_owned()),
        ("PORT_API_URL", port.url()),
        ("PORT_CLIENT_ID", PORT_CLIENT_ID.to_owned()),
        ("PORT_CLIENT_SECRET", PORT_CLIENT_SECRET.to_owned()),
        ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
    ]
}

/// The environment of a `harbor-worker` process on this topology, reading and writing the
/// sandbox (its Harbor and its Port) with its credentials.
pub fn sandbox_worker_env(
    broker: &crate::rabbit::TestTopology,
    sandbox: &crate::apps::TestSandbox,
    metrics_port: u16,
) -> Vec<(&'static str, String)> {
    let (username, password) = sandbox.harbor_login();
    vec![
        ("AMQP_URL", crate::rabbit::amqp_url()),
        ("AMQP_EXCHANGE", broker.topology().exchange().to_owned()),
        ("AMQP_QUEUE", broker.topology().queue().to_owned()),
        ("HARBOR_URL", sandbox.base.clone()),
        ("HARBOR_USERNAME", username.to_owned()),
        ("HARBOR_PASSWORD", password.to_owned()),
        ("PORT_API_URL", sandbox.base.clone()),
        ("PORT_CLIENT_ID", "sandbox-client".to_owned()),
        ("PORT_CLIENT_SECRET", "sandbox-secret".to_owned()),
        ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
    ]
}
