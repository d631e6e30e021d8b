//! Harbor's real webhook payloads (`tests/fixtures/harbor/webhook-samples/`, see its SOURCES.md).

use std::path::PathBuf;

/// The directory of the samples.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/harbor/webhook-samples")
}

/// The bytes of one sample, by file name.
pub fn load(name: &str) -> Vec<u8> {
    let path = dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A sample's `(repository full name, first digest)`.
pub fn subject(body: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap();
    let data = if value.get("event_data").is_some() {
        &value["event_data"]
    } else {
        &value["data"]
    };
    (
        data["repository"]["repo_full_name"]
            .as_str()
            .unwrap()
            .to_owned(),
        data["resources"][0]["digest"].as_str().unwrap().to_owned(),
    )
}

/// A push of `digest` to `repository` in Harbor's default format, as Harbor sends it.
pub fn push(repository: &str, digest: &str) -> Vec<u8> {
    event("PUSH_ARTIFACT", repository, digest, "latest")
}

/// An event of `kind` (`PUSH_ARTIFACT`, `DELETE_ARTIFACT`, ...) of one artifact, with its tag.
pub fn event(kind: &str, repository: &str, digest: &str, tag: &str) -> Vec<u8> {
    let (namespace, name) = repository.split_once('/').unwrap();
    serde_json::to_vec(&serde_json::json!({
        "type": kind,
        "occur_at": 1_724_140_800,
        "operator": "robot$ci",
        "event_data": {
            "resources": [{"digest": digest, "tag": tag, "resource_url": format!("harbor.example.com/{repository}:{tag}")}],
            "repository": {"date_created": 1_700_000_000, "name": name, "namespace": namespace, "repo_full_name": repository, "repo_type": "private"}
        }
    }))
    .unwrap()
}

/// A distinct, valid digest for each number.
pub fn digest(n: u64) -> String {
    use sha2::{Digest as _, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(n.to_be_bytes())))
}

/// `event` with its `operator` padded so that it is `bytes` long in all.
pub fn padded(event: &[u8], bytes: usize) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(event).unwrap();
    let len = serde_json::to_vec(&value).unwrap().len();
    let operator = value["operator"].as_str().unwrap().len();
    value["operator"] = serde_json::Value::String("x".repeat(bytes - len + operator));
    let padded = serde_json::to_vec(&value).unwrap();
    assert_eq!(padded.len(), bytes);
    padded
}
