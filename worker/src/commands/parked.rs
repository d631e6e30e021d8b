//! `harbor-worker parked list|replay`.

use harbor_shared::quote::printable;

use crate::parked::{self, Selection};
use crate::settings::Cli;

/// Prints the parked events, as lines or as JSON.
pub async fn list(cli: Cli, json: bool, limit: usize) -> anyhow::Result<()> {
    let events = parked::list(&cli.amqp.into_settings()?, limit).await?;
    if json {
        println!("{}", serde_json::json!({ "parked": events }));
    } else {
        for e in &events {
            // Each from a message: printable, so that one cannot forge a line.
            let show = |v: &Option<String>| v.as_deref().map_or_else(|| "-".into(), printable);
            let attempts = e.attempts.map_or_else(|| "-".into(), |n| n.to_string());
            let event_type = match &e.instance {
                Some(instance) => format!("{instance}: {}", e.event_type),
                None => e.event_type.clone(),
            };
            let event_type = printable(&event_type);
            println!(
                "{}  {}  {}  attempts={}  {}",
                show(&e.failed_at),
                show(&e.message_id),
                event_type,
                attempts,
                show(&e.reason)
            );
        }
        println!("{} parked event(s) shown", events.len());
    }
    Ok(())
}

/// Sends parked events back to the work queues.
pub async fn replay(
    cli: Cli,
    all: bool,
    ids: Vec<String>,
    from: Option<String>,
) -> anyhow::Result<()> {
    let selection = if all {
        Selection::All
    } else {
        Selection::Ids(ids)
    };
    let amqp = cli.amqp.into_settings()?;
    let done = parked::replay(&amqp, &selection, from.as_deref()).await?;
    println!("replayed {}, still parked {}", done.replayed, done.kept);
    if !done.not_found.is_empty() {
        println!("not found: {}", done.not_found.join(", "));
    }
    Ok(())
}
