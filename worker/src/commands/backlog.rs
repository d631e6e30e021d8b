//! `harbor-worker backlog`: how many events wait in the work and parked queues.

use url::Url;

use crate::backlog;
use crate::settings::Cli;

/// Prints the counts, as a table or as JSON.
pub async fn run(cli: Cli, json: bool, management_url: Option<Url>) -> anyhow::Result<()> {
    let amqp = cli.amqp.into_settings()?;
    let counts = backlog::backlog(&amqp, management_url.as_ref()).await?;
    if json {
        println!("{}", serde_json::json!({ "queues": counts }));
    } else {
        println!(
            "{:<40} {:>10} {:>10} {:>10}",
            "queue", "ready", "unacked", "consumers"
        );
        for q in counts {
            let unacked = q.unacked.map_or_else(|| "-".to_owned(), |n| n.to_string());
            println!(
                "{:<40} {:>10} {:>10} {:>10}",
                q.queue, q.ready, unacked, q.consumers
            );
        }
    }
    Ok(())
}
