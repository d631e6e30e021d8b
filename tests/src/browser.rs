//! A headless Chromium driven over the DevTools protocol, for tests of the sandbox's page:
//! load a page, run JavaScript in it (click a button, read the DOM), wait for what it shows.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A Chromium showing one page; killed, its profile deleted, when dropped.
pub struct Browser {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _process: Process,
}

/// The Chromium process and its profile folder (which holds its temporary files too).
struct Process {
    child: Child,
    profile: PathBuf,
}

impl Browser {
    /// Starts Debian's `chromium` headless on `url`.
    pub async fn open(url: &str) -> Self {
        // Short: Chromium's singleton socket lives under it, and a socket's path is at most 107
        // bytes long.
        let random = uuid::Uuid::new_v4().simple().to_string();
        let profile = std::env::temp_dir().join(format!("chromium-{}", &random[..8]));
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            // A group of its own, for all of its processes to end together.
            .process_group(0)
            // Its singleton socket and other temporary files go with the profile.
            .env("TMPDIR", &profile)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (Debian's `chromium` package; .ci/run installs it)");
        let process = Process { child, profile };
        let profile = &process.profile;
        // Chromium writes the port it picked, then the browser's path, into the profile.
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            let written = std::fs::read_to_string(profile.join("DevToolsActivePort"));
            if let Some(port) = written
                .ok()
                .and_then(|t| t.lines().next()?.parse::<u16>().ok())
            {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let page_socket = loop {
            let targets: Value =
                match reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await {
                    Ok(answer) => answer.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
            let page = targets
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned));
            if let Some(page) = page {
                break page;
            }
            assert!(Instant::now() < deadline, "chromium shows no page");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(page_socket).await.unwrap();
        Self {
            socket,
            next_id: 0,
            _process: process,
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true, "awaitPromise": true},
        });
        self.socket
            .send(Message::text(call.to_string()))
            .await
            .unwrap();
        while let Some(message) = self.socket.next().await {
            let Message::Text(text) = message.unwrap() else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                assert!(
                    answer["result"]["exceptionDetails"].is_null(),
                    "{expression}: {answer}"
                );
                return answer["result"]["result"]["value"].clone();
            }
        }
        panic!("chromium closed the connection");
    }

    /// Waits until `expression` is true in the page.
    pub async fn wait_for(&mut self, what: &str, expression: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.eval(expression).await != Value::Bool(true) {
            assert!(Instant::now() < deadline, "the page never showed {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // The whole group: the renderers and helpers write to the profile until they end.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Command::new("kill")
            .args(["-0", "--", &group])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
