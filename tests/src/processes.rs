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
    /// Logs go to `<temp>/harbor-processes-<tag>/<name>.log`.
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
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
        let child = Command::new(binary(binary_name))
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
            assert!(
                Instant::now() < deadline,
                "{name} did not stop within 30 s of SIG{signal}"
            );
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
    }
}
