//! The dashboard and the alert rules of `deploy/monitoring` name only series that exist: the
//! binaries' own, scraped from `/metrics` after an event went through, and RabbitMQ's, scraped
//! from its Prometheus plugin. (`deploy/validate.sh` checks the queries' syntax and runs the
//! rules' unit tests with promtool.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use harbor_sync_tests::apps::Stack;
use harbor_sync_tests::samples;
use serde_json::Value;

fn monitoring(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/monitoring")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The queries of the dashboard's panels, each with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&monitoring("grafana/dashboards/harbor-port-sync.json")).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap().to_owned();
            queries.push((title, target["expr"].as_str().unwrap().to_owned()));
        }
    }
    queries
}

/// The alert rules: name, expression, annotations.
fn alerts() -> Vec<serde_yaml_ng::Value> {
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&monitoring("alerts.yml")).unwrap();
    rules["groups"][0]["rules"].as_sequence().unwrap().clone()
}

/// The metric names an expression uses (ours and RabbitMQ's), label values left out.
fn metric_names(expr: &str) -> Vec<String> {
    let unquoted: String = expr.split('"').step_by(2).collect::<Vec<_>>().join(" ");
    let mut names = Vec::new();
    let mut rest = unquoted.as_str();
    while let Some(start) = ["harbor_", "rabbitmq_"]
        .iter()
        .filter_map(|prefix| rest.find(prefix))
        .min()
    {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The names of the samples of a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_series_the_dashboard_and_the_alerts_name_is_exported() {
    let stack = Stack::start().await;
    let body = samples::load("push_artifact.default.docs.json");
    let (repo, digest) = samples::subject(&body);
    stack.harbor.project_and_repository(&repo).await;
    stack.harbor.holds(&repo, &digest, &["latest"], None).await;
    stack.webhook(&body).await;
    stack.wait_for_outcome("synced", 1).await;

    let ingest = stack.ingest.metrics().await;
    // RabbitMQ shows a new queue's counts once it has collected its statistics (every 5 s).
    let parked = stack.broker.topology().parked_queue();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rabbitmq = loop {
        let text = reqwest::get("http://127.0.0.1:15692/metrics/per-object")
            .await
            .expect("RabbitMQ's rabbitmq_prometheus plugin (ensure-rabbitmq.sh enables it)")
            .text()
            .await
            .unwrap();
        let queue = format!("queue=\"{parked}\"");
        let listed =
            |l: &&str| l.starts_with("rabbitmq_queue_messages_ready") && l.contains(&queue);
        if text.lines().any(|l| listed(&l)) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "RabbitMQ shows no series of {parked}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut names = exported(&ingest);
    names.extend(exported(&stack.worker.metrics().await));
    names.extend(exported(&rabbitmq));

    let mut uses: Vec<(String, String)> = dashboard_queries();
    for alert in alerts() {
        let name = alert["alert"].as_str().unwrap().to_owned();
        uses.push((name, alert["expr"].as_str().unwrap().to_owned()));
    }
    let mut missing = Vec::new();
    for (what, expr) in &uses {
        let used = metric_names(expr);
        assert!(!used.is_empty(), "{what}: {expr} names no metric");
        missing.extend(
            used.into_iter()
                .filter(|n| !names.contains(n))
                .map(|n| format!("{what}: {n}")),
        );
    }
    assert!(missing.is_empty(), "not exported: {missing:?}");
}

#[test]
fn each_alert_says_what_it_means_and_what_to_do_first() {
    let alerts = alerts();
    assert!(alerts.len() >= 7);
    for alert in alerts {
        let name = alert["alert"].as_str().unwrap();
        let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
        let description = alert["annotations"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(!summary.is_empty(), "{name} has no summary");
        assert!(
            description.contains("First:"),
            "{name} does not say what to do first"
        );
        assert!(
            alert["labels"]["severity"].as_str().is_some(),
            "{name} has no severity"
        );
    }
}

#[test]
fn the_metric_names_of_a_query_are_found() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(harbor_ingest_publish_duration_seconds_bucket[5m]))) + rabbitmq_queue_consumers{queue="harbor_x"}"#
        ),
        [
            "harbor_ingest_publish_duration_seconds_bucket",
            "rabbitmq_queue_consumers"
        ]
    );
}
