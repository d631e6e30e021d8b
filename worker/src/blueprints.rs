//! `harbor-worker blueprints`: makes a Port account ready in one command by creating (or
//! updating) the three blueprints of `deploy/port/blueprints.json`, in relation order.

use anyhow::Context;
use serde_json::Value;
use tracing::info;

use crate::clients::port::PortClient;
use crate::retry::{Budget, RetryPolicy};

/// `deploy/port/blueprints.json`, built into the binary.
pub const BLUEPRINTS: &str = include_str!("../../deploy/port/blueprints.json");

/// The blueprints, in the order they must be created (relation targets first).
pub fn definitions() -> anyhow::Result<Vec<(String, Value)>> {
    let all: Vec<Value> = serde_json::from_str(BLUEPRINTS).context("blueprints.json is invalid")?;
    all.into_iter()
        .map(|blueprint| {
            let id = blueprint["identifier"]
                .as_str()
                .context("a blueprint has no identifier")?
                .to_owned();
            Ok((id, blueprint))
        })
        .collect()
}

/// Creates or updates every blueprint; retries transient failures.
pub async fn apply(port: &PortClient, retry: RetryPolicy) -> anyhow::Result<()> {
    for (identifier, blueprint) in definitions()? {
        let budget = Budget::start(retry);
        let applied = budget
            .run("port", || port.apply_blueprint(&identifier, &blueprint))
            .await
            .with_context(|| format!("Failed to apply blueprint {identifier}"))?;
        info!(blueprint = %identifier, ?applied, "Blueprint applied");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entities::{ARTIFACT, PROJECT, REPOSITORY};

    #[test]
    fn the_blueprints_come_in_relation_order_and_match_the_mapping() {
        let ids: Vec<String> = definitions()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, [PROJECT, REPOSITORY, ARTIFACT]);
        let all = definitions().unwrap();
        assert_eq!(all[1].1["relations"]["project"]["target"], PROJECT);
        assert_eq!(all[2].1["relations"]["repository"]["target"], REPOSITORY);
    }
}
