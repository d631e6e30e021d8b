//! The three programs as separate processes, configured only through their environment, as
//! `docker compose` and `deploy/local/run.sh` run them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harbor_sync_tests::apps::wait_ready_within;
use harbor_sync_tests::processes::{Processes, binary, free_port};
use harbor_sync_tests::rabbit::{TestTopology, amqp_url};
use harbor_sync_tests::wait_until;
use serde_json::{Value, json};

const WEBHOOK_SECRET: &str = "process-test-webhook-secret";
const HARBOR_PASSWORD: &str = "process-test-harbor-password";
const PORT_CLIENT_SECRET: &str = "process-test-port-secret";

#[tokio::test]
async fn sandbox_ingest_and_worker_as_processes_carry_a_push_to_port_and_stop_cleanly_on_sigterm() {
    let broker = TestTopology::new().await;
    let (ingest_port, worker_port, sandbox_port) = (free_port(), free_port(), free_port());
    let sandbox = format!("http://127.0.0.1:{sandbox_port}");
    let mut processes = Processes::new(broker.topology().queue());

    let common = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("AMQP_URL", amqp_url()),
            ("AMQP_EXCHANGE", broker.topology().exchange().to_owned()),
            ("AMQP_QUEUE", broker.topology().queue().to_owned()),
            ("WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("HARBOR_USERNAME", "robot$sync".to_owned()),
            ("HARBOR_PASSWORD", HARBOR_PASSWORD.to_owned()),
            ("PORT_CLIENT_ID", "process-test-client".to_owned()),
            ("PORT_CLIENT_SECRET", PORT_CLIENT_SECRET.to_owned()),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    processes.spawn(
        "harbor-sandbox",
        "harbor-sandbox",
        &common(&[
            ("SANDBOX_LISTEN_ADDR", format!("127.0.0.1:{sandbox_port}")),
            (
                "SANDBOX_WEBHOOK_URL",
                format!("http://127.0.0.1:{ingest_port}/webhook"),
            ),
        ]),
    );
    processes.spawn(
        "harbor-ingest",
        "harbor-ingest",
        &common(&[("LISTEN_ADDR", format!("127.0.0.1:{ingest_port}"))]),
    );
    processes.spawn(
        "harbor-worker",
        "harbor-worker",
        &common(&[
            ("METRICS_ADDR", format!("127.0.0.1:{worker_port}")),
            ("HARBOR_URL", sandbox.clone()),
            ("PORT_API_URL", sandbox.clone()),
        ]),
    );

    // The health checks a container runtime would run.
    let healthy = |name: &'static str, var: &'static str, port: u16| {
        move || async move {
            Command::new(binary(name))
                .arg("healthcheck")
                .env_clear()
                .env(var, format!("127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success()
        }
    };
    wait_until(
        "the sandbox to be healthy",
        Duration::from_secs(20),
        healthy("harbor-sandbox", "SANDBOX_LISTEN_ADDR", sandbox_port),
    )
    .await;
    wait_until(
        "the ingest to be ready",
        Duration::from_secs(20),
        healthy("harbor-ingest", "LISTEN_ADDR", ingest_port),
    )
    .await;
    wait_until(
        "the worker to be ready",
        Duration::from_secs(20),
        healthy("harbor-worker", "METRICS_ADDR", worker_port),
    )
    .await;

    let pushed: Value = reqwest::Client::new()
        .post(format!("{sandbox}/sandbox/push"))
        .json(&json!({"repository": "library/nginx", "tag": "1.27"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pushed["webhook"]["status"], 202, "{pushed}");
    let artifact = format!("library/nginx@{}", pushed["digest"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let held: Value = reqwest::get(format!("{sandbox}/sandbox/port/entities"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let has = |blueprint: &str, id: &str| {
            held[blueprint]
                .as_array()
                .is_some_and(|all| all.iter().any(|e| e["identifier"] == id))
        };
        if has("harborArtifact", &artifact) && has("harborRepository", "library/nginx") {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "the entities never appeared: {held}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(held["harborArtifact"][0]["title"], "library/nginx:1.27");

    let codes = processes.terminate_all();
    let expected: Vec<(String, Option<i32>)> = ["harbor-sandbox", "harbor-ingest", "harbor-worker"]
        .into_iter()
        .map(|name| (name.to_owned(), Some(0)))
        .collect();
    assert_eq!(codes, expected);
    let worker_log = processes.log("harbor-worker");
    assert!(worker_log.contains("Event synced"), "{worker_log}");
    assert!(worker_log.contains("harbor-worker stopped"), "{worker_log}");
    for name in ["harbor-sandbox", "harbor-ingest", "harbor-worker"] {
        let log = processes.log(name);
        for secret in [
            WEBHOOK_SECRET,
            HARBOR_PASSWORD,
            PORT_CLIENT_SECRET,
            "Bearer ",
            "Basic ",
        ] {
            assert!(!log.contains(secret), "{name}'s log shows {secret:?}");
        }
        // The sandbox's access tokens are `sandbox-<32 hex digits>`.
        let token = log.match_indices("sandbox-").any(|(at, _)| {
            log[at + 8..]
                .chars()
                .take(32)
                .filter(char::is_ascii_hexdigit)
                .count()
                == 32
        });
        assert!(!token, "{name}'s log shows a Port access token");
    }
}

/// The resident set of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    harbor_sync_tests::processes::status_kib(pid, "VmRSS:")
}

/// Sends one signed push on `stream` (kept alive) and returns the answer's status line.
fn post_push(stream: &mut std::net::TcpStream) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let body =
        harbor_sync_tests::samples::push("library/nginx", &harbor_sync_tests::samples::digest(1));
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: ingest\r\nAuthorization: {WEBHOOK_SECRET}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    reader.read_exact(&mut vec![0; length]).unwrap();
    status.trim_end().to_owned()
}

/// `harbor-ingest` as a process on this topology with the test secret and one more setting, on
/// a free port (returned), once ready; `tag` names its logs.
async fn ingest_process(
    broker: &TestTopology,
    tag: &str,
    (name, value): (&'static str, &str),
) -> (Processes, u16) {
    let port = free_port();
    let mut processes = Processes::new(&format!("{}-{tag}", broker.topology().queue()));
    processes.spawn(
        "harbor-ingest",
        "harbor-ingest",
        &[
            ("AMQP_URL", amqp_url()),
            ("AMQP_EXCHANGE", broker.topology().exchange().to_owned()),
            ("AMQP_QUEUE", broker.topology().queue().to_owned()),
            ("WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            (name, value.to_owned()),
        ],
    );
    let ready = format!("http://127.0.0.1:{port}/readyz");
    wait_ready_within(&ready, Duration::from_secs(20)).await;
    (processes, port)
}

#[tokio::test]
async fn idle_connections_past_the_cap_wait_in_the_backlog_while_the_ingest_answers_the_others() {
    let broker = TestTopology::new().await;
    let (mut processes, port) = ingest_process(&broker, "cap", ("MAX_CONNECTIONS", "16")).await;
    let address = format!("127.0.0.1:{port}");
    let pid = processes.pid("harbor-ingest").unwrap();

    let (statuses, idle, grew_kib, late) = tokio::task::spawn_blocking(move || {
        let mut kept = std::net::TcpStream::connect(&address).unwrap();
        let first = post_push(&mut kept);
        let before = rss_kib(pid);
        // Far more idle connections than the cap: the kernel completes their handshakes and
        // queues them; the ingest takes 16 at a time.
        let idle: Vec<_> = (0..1000)
            .filter_map(|_| std::net::TcpStream::connect(&address).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(500)); // lets the ingest accept what it may
        let second = post_push(&mut kept);
        let grew_kib = rss_kib(pid).saturating_sub(before);
        let count = idle.len();
        drop(idle);
        // Once the idle ones close, a new connection is served.
        let late = post_push(&mut std::net::TcpStream::connect(&address).unwrap());
        ([first, second], count, grew_kib, late)
    })
    .await
    .unwrap();

    assert_eq!(statuses, ["HTTP/1.1 202 Accepted"; 2]);
    assert_eq!(late, "HTTP/1.1 202 Accepted");
    assert!(idle > 100, "only {idle} idle connections were opened");
    // Without the cap each accepted idle connection holds its buffers (about 16 KiB).
    assert!(
        grew_kib < 4096,
        "RSS grew {grew_kib} KiB with {idle} idle connections"
    );
    assert_eq!(broker.work_ready().await, 3);
    assert_eq!(processes.signal("harbor-ingest", "TERM"), Some(0));
}

#[tokio::test]
async fn slow_senders_of_fake_signatures_cannot_make_the_ingest_hold_their_bodies() {
    const SENDERS: usize = 100;
    const BODY: usize = 1_048_576;
    let broker = TestTopology::new().await;
    // Shorter than the default, so that the places to read a signed body turn over within the
    // test.
    let (mut processes, port) = ingest_process(&broker, "hmac", ("REQUEST_TIMEOUT", "2s")).await;
    let base = format!("http://127.0.0.1:{port}");
    let address = format!("127.0.0.1:{port}");
    let pid = processes.pid("harbor-ingest").unwrap();
    let before = rss_kib(pid);

    // Each claims an HMAC signature (the default `auto` mode must read the body to check it),
    // sends all of a 1 MiB body but its last bytes, and stalls.
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let address = address.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut stream = std::net::TcpStream::connect(&address).unwrap();
                stream
                    .set_write_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let head = format!(
                    "POST /webhook HTTP/1.1\r\nHost: ingest\r\nAuthorization: sha256={}\r\nContent-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n{{",
                    "ab".repeat(32)
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&vec![b' '; BODY - 100]);
                stream
            })
        })
        .collect();
    let streams: Vec<_> = senders.into_iter().map(|s| s.join().unwrap()).collect();

    // Meanwhile Harbor's webhooks, with the token, are answered.
    let accepted = tokio::task::spawn_blocking(move || {
        post_push(&mut std::net::TcpStream::connect(&address).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(accepted, "HTTP/1.1 202 Accepted");

    // Every sender answered: timed out reading (408) or told to come back (503).
    let metrics = format!("{base}/metrics");
    let outcome = |text: &str, outcome: &str| -> usize {
        text.lines()
            .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    };
    wait_until(
        "every slow sender answered",
        Duration::from_secs(30),
        || async {
            let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
            outcome(&text, "request_timeout") + outcome(&text, "busy") == SENDERS
        },
    )
    .await;
    let grew_kib = harbor_sync_tests::processes::status_kib(pid, "VmHWM:").saturating_sub(before);
    println!("peak RSS growth with {SENDERS} slow signed senders: {grew_kib} KiB");
    drop(streams);
    // Without the bound the ingest reads all 100 bodies at once: it grew by 135 MB here. With
    // it, 16 at a time (and the allocator keeps what each HTTP worker's thread freed): 49 MB.
    assert!(
        grew_kib < 64 * 1024,
        "peak RSS grew {grew_kib} KiB with {SENDERS} slow signed senders"
    );
    assert_eq!(broker.work_ready().await, 1);
    assert_eq!(processes.signal("harbor-ingest", "TERM"), Some(0));
}
