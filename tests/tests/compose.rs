//! `docker-compose.yml` is safe to point at a real Harbor and Port: every port is published on
//! 127.0.0.1 only (the ingest's may be opened on purpose), a real install must give every
//! credential (none has a default), the sandbox (whose control API has no authentication) runs
//! only in its profile with credentials of its own, and `.env` is neither committed nor copied
//! into an image. (`deploy/validate.sh` checks the file with a compose parser, both ways.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_yaml_ng::Value;

fn read(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn services() -> serde_yaml_ng::Mapping {
    let compose: Value = serde_yaml_ng::from_str(&read("docker-compose.yml")).unwrap();
    compose["services"].as_mapping().unwrap().clone()
}

fn environment(service: &Value) -> Vec<(String, String)> {
    service["environment"]
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                other => serde_yaml_ng::to_string(other).unwrap().trim().to_owned(),
            };
            (k.as_str().unwrap().to_owned(), value)
        })
        .collect()
}

#[test]
fn every_port_is_published_on_localhost_only() {
    for (name, service) in services() {
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(
                port.starts_with("127.0.0.1:") || port.starts_with("${INGEST_PUBLISH:-127.0.0.1}:"),
                "{name:?} publishes {port} beyond this machine"
            );
        }
    }
}

#[test]
fn a_real_install_gives_every_credential_and_the_sandbox_never_gets_them() {
    let services = services();
    let credentials = [
        "WEBHOOK_SECRET",
        "HARBOR_URL",
        "HARBOR_USERNAME",
        "HARBOR_PASSWORD",
        "PORT_CLIENT_ID",
        "PORT_CLIENT_SECRET",
    ];
    for name in ["ingest", "worker"] {
        for (key, value) in environment(&services[name]) {
            if credentials.contains(&key.as_str()) {
                assert!(
                    value.starts_with(&format!("${{{key}:?")),
                    "{name}'s {key} has a default or another source: {value}"
                );
            }
        }
    }
    let sandbox = &services["sandbox"];
    assert_eq!(sandbox["profiles"][0], "sandbox");
    for (key, value) in environment(sandbox) {
        for credential in credentials {
            assert!(
                !value.contains(&format!("${{{credential}")),
                "the sandbox's {key} takes the real {credential}"
            );
        }
    }
    assert!(!read("docker-compose.yml").contains("change-me-to-a-long-secret"));
    let sandbox_env = read("deploy/compose/sandbox.env");
    assert!(sandbox_env.lines().any(|l| l == "COMPOSE_PROFILES=sandbox"));
    for credential in credentials {
        assert!(
            sandbox_env
                .lines()
                .any(|l| l.starts_with(&format!("{credential}="))),
            "sandbox.env lacks {credential}: the sandbox run would refuse to start"
        );
    }
}

#[test]
fn the_env_file_is_neither_committed_nor_copied_into_an_image() {
    for file in [".gitignore", ".dockerignore"] {
        assert!(
            read(file).lines().any(|l| l.trim() == ".env"),
            "{file} does not ignore .env"
        );
    }
}
