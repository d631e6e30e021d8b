//! `harbor-worker mapping check|render`.

use std::time::Duration;

use anyhow::bail;

use crate::mapping::Kind;
use crate::settings::{Cli, select};
use crate::startup::fleet;

/// Reads the mapping file and says whether it is fine.
pub fn check(cli: Cli) -> anyhow::Result<()> {
    cli.port.mapping()?;
    let file = cli.port.mapping_file.as_ref();
    let file = file.map_or_else(
        || "the built-in mapping".into(),
        |f| f.display().to_string(),
    );
    println!("{file}: ok");
    Ok(())
}

/// Prints what the mapping makes of one object as Harbor has it now.
pub async fn render(
    cli: Cli,
    kind: String,
    project: String,
    repository: Option<String>,
    reference: Option<String>,
    instance: Option<String>,
) -> anyhow::Result<()> {
    let Some(kind) = Kind::parse(&kind) else {
        bail!("--kind must be project, repository or artifact (got {kind})");
    };
    let harbors = cli.harbor.into_settings(cli.webhooks)?;
    let chosen = select(&harbors, instance.as_deref())?;
    let &[index] = chosen.as_slice() else {
        bail!("HARBOR_INSTANCES_FILE lists several instances: name one with --instance");
    };
    let port = cli.port.into_settings()?;
    let http = cli.run.http()?;
    let fleet = fleet(&harbors, &port, http, Duration::ZERO, 1);
    let handler = &fleet.members()[index].handler;
    let rendered = handler
        .render_current(kind, &project, repository.as_deref(), reference.as_deref())
        .await
        .map_err(anyhow::Error::msg)?;
    let Some(entities) = rendered else {
        bail!("Harbor has no such {kind}");
    };
    for mapped in entities {
        println!(
            "{}",
            serde_json::json!({"blueprint": mapped.blueprint, "entity": mapped.entity})
        );
    }
    Ok(())
}
