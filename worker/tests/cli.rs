//! The `harbor-worker` binary as an operator meets it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn worker() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_harbor-worker"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

#[test]
fn help_never_shows_secret_values() {
    let output = worker()
        .arg("--help")
        .env("HARBOR_PASSWORD", "hunter2-harbor")
        .env("PORT_CLIENT_SECRET", "hunter2-port")
        .env("AMQP_URL", "amqp://user:hunter2-amqp@rabbit:5672/%2f")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for var in [
        "HARBOR_PASSWORD",
        "PORT_CLIENT_SECRET",
        "AMQP_URL",
        "WORKER_CONCURRENCY",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
    assert!(!help.contains("hunter2"), "{help}");
}

#[test]
fn a_missing_setting_is_named_and_stops_it() {
    let output = worker()
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("HARBOR_URL", "https://harbor.example.com")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let log = String::from_utf8(output.stderr).unwrap();
    assert!(log.contains("HARBOR_USERNAME is required"), "{log}");
}

#[test]
fn healthcheck_fails_when_no_worker_is_ready() {
    let output = worker()
        .args(["healthcheck"])
        .env("METRICS_ADDR", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn mapping_check_accepts_the_default_and_names_what_is_wrong_in_a_bad_file() {
    let default = worker().args(["mapping", "check"]).output().unwrap();
    assert_eq!(default.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(default.stdout).unwrap().trim(),
        "the built-in mapping: ok"
    );

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/port/mapping.yaml");
    let output = worker()
        .args(["mapping", "check"])
        .env("MAPPING_FILE", shipped)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");

    let dir = std::env::temp_dir().join(format!("mapping-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "resources:\n  - kind: artifact\n    port: {entity: {mappings: {identifier: '.digest', blueprint: '\"b\"', properties: {size: '.size |'}}}}\n",
    )
    .unwrap();
    let output = worker()
        .args(["mapping", "check", "--mapping-file"])
        .arg(&bad)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(output.status.code(), Some(1));
    let log = String::from_utf8(output.stderr).unwrap();
    assert!(
        log.contains("bad.yaml: resource 0 (artifact), properties.size: `.size |` does not parse"),
        "{log}"
    );
}
