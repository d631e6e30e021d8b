//! Bad input against a running ingest: thousands of generated requests, slow clients. Nothing
//! rejected may reach the queue, and nothing may get a 5xx.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use harbor_sync_tests::apps::{SECRET, TestIngest, ingest_settings};
use harbor_sync_tests::rabbit::TestTopology;
use harbor_sync_tests::samples;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const LIMIT: usize = 1_048_576;

/// One generated request and the answer it must get.
struct Case {
    body: Vec<u8>,
    authorization: Option<Vec<u8>>,
    expected: u16,
    what: &'static str,
}

fn valid_events() -> Vec<Vec<u8>> {
    std::fs::read_dir(samples::dir())
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .map(|body| String::from_utf8(body).unwrap().trim().as_bytes().to_vec())
        .collect()
}

fn body(rng: &mut StdRng, events: &[Vec<u8>]) -> (Vec<u8>, bool, &'static str) {
    let event = &events[rng.random_range(0..events.len())];
    match rng.random_range(0..12) {
        0 => (event.clone(), true, "a real event"),
        1 => {
            let cut = rng.random_range(1..event.len());
            (event[..event.len() - cut].to_vec(), false, "truncated JSON")
        }
        2 => {
            // Valid JSON however deep: skipped without recursion, so it cannot overflow a stack.
            let depth = rng.random_range(200..50_000);
            let nested = format!(
                r#"{{"type":"REPLICATION","x":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            (nested.into_bytes(), true, "deeply nested JSON in a field")
        }
        3 => {
            let wrong = [
                json!(1),
                json!(null),
                json!(true),
                json!([]),
                json!({"a": 1}),
                json!(""),
            ];
            let t = &wrong[rng.random_range(0..wrong.len())];
            (
                serde_json::to_vec(&json!({"type": t, "event_data": {}})).unwrap(),
                false,
                "a type that is not a name",
            )
        }
        4 => (Vec::new(), false, "empty body"),
        5 => {
            let mut bytes = vec![0u8; rng.random_range(1..4096)];
            rng.fill(&mut bytes[..]);
            bytes[0] = b'\xff';
            (bytes, false, "random bytes")
        }
        6 => (
            b"{\"type\":\"PUSH_\xff\xfeARTIFACT\"}".to_vec(),
            false,
            "non-UTF-8 in a string",
        ),
        7 => {
            let huge = "x".repeat(rng.random_range(100_000..900_000));
            // Only an event that lists artifacts may be this long (one naming a single resource
            // is refused past 16 KiB).
            let event = json!({"type": "TAG_RETENTION", "operator": huge, "event_data": {}});
            (
                serde_json::to_vec(&event).unwrap(),
                true,
                "a huge string in a retention event",
            )
        }
        8 => (
            br#"{"type":"PUSH ARTIFACT"}"#.to_vec(),
            false,
            "a type with a space",
        ),
        9 => (
            br#"[{"type":"PUSH_ARTIFACT"}]"#.to_vec(),
            false,
            "an array, not an object",
        ),
        10 => {
            let unknown = format!(
                r#"{{"type":"CUSTOM_{}","data":{}}}"#,
                rng.random_range(0..1000),
                rng.random_range(0..9)
            );
            (unknown.into_bytes(), true, "an unknown event type")
        }
        _ => (
            br#"{"type":"PUSH_ARTIFACT","type":"PULL_ARTIFACT"}"#.to_vec(),
            false,
            "a duplicated type",
        ),
    }
}

fn authorization(rng: &mut StdRng, body: &[u8]) -> (Option<Vec<u8>>, bool) {
    let signature = hex::encode(harbor_ingest::auth::sign(&SECRET.to_owned().into(), body));
    match rng.random_range(0..10) {
        0..=2 => (Some(SECRET.as_bytes().to_vec()), true),
        3 => (Some(format!("sha256={signature}").into_bytes()), true),
        4 => (Some(format!("Bearer {SECRET}").into_bytes()), true),
        5 => (None, false),
        6 => (Some(b"wrong".to_vec()), false),
        7 => (
            Some(format!("sha256={}", "0".repeat(64)).into_bytes()),
            false,
        ),
        8 => {
            let mut bytes = vec![b'a'; rng.random_range(1..4000)];
            bytes[0] = 0xC3; // obs-text: not UTF-8 on its own
            (Some(bytes), false)
        }
        _ => (Some(SECRET.repeat(100).into_bytes()), false),
    }
}

fn corpus(count: usize) -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(0x4841_5242_4f52);
    let events = valid_events();
    let mut cases: Vec<Case> = (0..count)
        .map(|_| {
            let (body, valid_body, what) = body(&mut rng, &events);
            let (authorization, valid_auth) = authorization(&mut rng, &body);
            let expected = match (valid_auth, valid_body) {
                (false, _) => 401,
                (true, false) => 400,
                (true, true) => 202,
            };
            Case {
                body,
                authorization,
                expected,
                what,
            }
        })
        .collect();
    for depth in [400_000, 500_000] {
        let nested = format!(
            r#"{{"type":"TAG_RETENTION","x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        cases.push(Case {
            body: nested.into_bytes(),
            authorization: Some(SECRET.as_bytes().to_vec()),
            expected: 202,
            what: "nesting as deep as the size limit allows",
        });
        let nested = format!(
            r#"{{"type":{}"X"{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        cases.push(Case {
            body: nested.into_bytes(),
            authorization: Some(SECRET.as_bytes().to_vec()),
            expected: 400,
            what: "a deeply nested type",
        });
    }
    for _ in 0..10 {
        cases.push(Case {
            body: vec![b' '; LIMIT + 1],
            authorization: Some(SECRET.as_bytes().to_vec()),
            expected: 413,
            what: "a body over the limit",
        });
        cases.push(Case {
            body: vec![b'{'; LIMIT * 2],
            authorization: None,
            expected: 401,
            what: "an unauthenticated body over the limit (refused before it is read)",
        });
        cases.push(Case {
            body: vec![b'{'; LIMIT * 2],
            authorization: Some(b"not-the-secret".to_vec()),
            expected: 401,
            what: "a wrong token with a body over the limit (refused before it is read)",
        });
        cases.push(Case {
            body: vec![b'{'; LIMIT * 2],
            authorization: Some(format!("sha256={}", "ab".repeat(32)).into_bytes()),
            expected: 413,
            what: "an HMAC-shaped header with a body over the limit (it could be valid)",
        });
    }
    cases
}

#[tokio::test]
async fn thousands_of_generated_requests_get_the_right_4xx_and_only_valid_ones_are_queued() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let cases = corpus(2500);
    let client = reqwest::Client::new();
    let url = format!("{}/webhook", ingest.base);

    let outcomes: Vec<(u16, &Case)> = futures_util::stream::iter(&cases)
        .map(|case| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let mut request = client.post(url).body(case.body.clone());
                if let Some(value) = &case.authorization {
                    request = request.header(
                        "authorization",
                        reqwest::header::HeaderValue::from_bytes(value).unwrap(),
                    );
                }
                let status = match request.send().await {
                    Ok(response) => response.status().as_u16(),
                    // The server may close a connection early on a body it refuses without
                    // reading it (401, 413): the client may see that instead of the answer.
                    Err(_) if matches!(case.expected, 401 | 413) => case.expected,
                    Err(error) => panic!("{}: {error}", case.what),
                };
                (status, case)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;

    let mut accepted = 0;
    for (status, case) in &outcomes {
        assert!(*status < 500, "{}: answered {status}", case.what);
        assert_eq!(
            *status,
            case.expected,
            "{} with {:?}",
            case.what,
            case.authorization
                .as_ref()
                .map(|a| String::from_utf8_lossy(&a[..a.len().min(20)]).into_owned())
        );
        if *status == 202 {
            accepted += 1;
        }
    }
    assert!(
        accepted > 300,
        "the corpus has too few valid requests: {accepted}"
    );
    assert!(outcomes.iter().filter(|(s, _)| *s == 400).count() > 300);
    // Still alive, and exactly the accepted requests are on the queue.
    assert_eq!(
        reqwest::get(format!("{}/healthz", ingest.base))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(broker.work_ready().await, accepted);
}

fn short_timeout_ingest(broker: &TestTopology) -> harbor_ingest::settings::Settings {
    let mut settings = ingest_settings(&broker.amqp);
    settings.request_timeout = Duration::from_secs(1);
    settings
}

/// Reads until the server closed the connection or sent a whole answer (head and JSON body),
/// or `within` passed (then `None`).
fn read_answer(stream: &mut TcpStream, within: Duration) -> Option<String> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Some(String::from_utf8_lossy(&answer).into_owned()),
            Ok(n) => {
                answer.extend_from_slice(&buffer[..n]);
                let text = String::from_utf8_lossy(&answer).into_owned();
                if text.contains("\r\n\r\n") && text.ends_with('}') {
                    return Some(text);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&answer).into_owned());
            }
            Err(_) => return None,
        }
    }
}

/// Sends `bytes` on a new connection to `address` and reads the answer ([`read_answer`]).
async fn send_raw(address: &str, bytes: Vec<u8>, within: Duration) -> Option<String> {
    let address = address.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.write_all(&bytes).unwrap();
        read_answer(&mut stream, within)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(short_timeout_ingest(&broker), true).await;
    let address = ingest.base.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    let head = b"POST /webhook HTTP/1.1\r\nHost: ingest\r\nAuthor".to_vec();
    let answer = send_raw(&address, head, Duration::from_secs(10))
        .await
        .expect("the connection was still open after 10 s");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(broker.work_ready().await, 0);
}

#[tokio::test]
async fn a_client_that_sends_its_body_too_slowly_gets_408_and_nothing_is_queued() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(short_timeout_ingest(&broker), true).await;
    let address = ingest.base.trim_start_matches("http://").to_owned();
    let body = samples::load("push_artifact.default.docs.json");
    let mut sent = format!(
        "POST /webhook HTTP/1.1\r\nHost: ingest\r\nAuthorization: {SECRET}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    sent.extend_from_slice(&body[..10]);
    let answer = send_raw(&address, sent, Duration::from_secs(10))
        .await
        .expect("the connection was still open after 10 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(broker.work_ready().await, 0);
}

#[tokio::test]
async fn a_request_that_cannot_be_authorized_is_refused_before_its_body_is_sent() {
    // Headers announcing a gigabyte, and no body at all: a header that cannot match is answered
    // 401 at once (waiting for the body would end in a 408, reading it in a 413).
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let address = ingest.base.trim_start_matches("http://").to_owned();
    let headers = [
        String::new(),
        "Authorization: not-the-secret\r\n".to_owned(),
        "Authorization: Bearer not-the-secret\r\n".to_owned(),
        "Authorization: Harbor-Secret not-the-secret\r\n".to_owned(),
        "Authorization: sha256=not-hex\r\n".to_owned(),
        format!("Authorization: sha256={}\r\n", "ab".repeat(31)),
    ];
    for header in headers {
        let head = format!(
            "POST /webhook HTTP/1.1\r\nHost: ingest\r\n{header}Content-Length: 1000000000\r\n\r\n"
        );
        let answer = send_raw(&address, head.into_bytes(), Duration::from_secs(30))
            .await
            .expect("no answer within 30 s");
        assert!(answer.starts_with("HTTP/1.1 401"), "{header:?}: {answer}");
        assert!(answer.contains("unauthorized"), "{header:?}: {answer}");
    }
    assert_eq!(broker.work_ready().await, 0);
}

#[tokio::test]
async fn an_answer_quotes_a_huge_name_only_in_part() {
    let broker = TestTopology::new().await;
    let ingest = TestIngest::start(ingest_settings(&broker.amqp), true).await;
    let name = "n".repeat(4000);
    let response = reqwest::Client::new()
        .post(format!("{}/webhook/{name}", ingest.base))
        .header("authorization", SECRET)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let answer = response.text().await.unwrap();
    assert!(answer.contains("/webhook/nnnn"), "{answer}");
    assert!(answer.len() < 1000, "{} bytes: {answer}", answer.len());
    assert_eq!(broker.work_ready().await, 0);
}
