//! The `harbor-ingest` binary as an operator meets it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn ingest() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_harbor-ingest"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

#[test]
fn help_never_shows_secret_values() {
    let output = ingest()
        .arg("--help")
        .env("WEBHOOK_SECRET", "hunter2-webhook")
        .env("AMQP_URL", "amqp://user:hunter2-amqp@rabbit:5672/%2f")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(help.contains("WEBHOOK_SECRET"), "{help}");
    assert!(help.contains("AMQP_URL"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
    assert!(!help.contains("guest:guest"), "{help}");
}

#[test]
fn without_a_secret_it_refuses_to_start_and_says_why() {
    let output = ingest().env("LISTEN_ADDR", "127.0.0.1:0").output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let log = String::from_utf8(output.stderr).unwrap();
    assert!(
        log.contains("WEBHOOK_SECRET (or WEBHOOK_SECRET_FILE) is required"),
        "{log}"
    );
}

#[test]
fn healthcheck_fails_when_no_ingest_is_ready() {
    let output = ingest()
        .args(["healthcheck"])
        .env("LISTEN_ADDR", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn an_out_of_range_worker_count_is_refused_by_name() {
    let output = ingest()
        .env("WEBHOOK_SECRET", "s")
        .env("HTTP_WORKERS", "0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(
        error.contains("HTTP_WORKERS") && error.contains("1..=256"),
        "{error}"
    );
}
