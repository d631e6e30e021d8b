//! Declaring the topology over queues an earlier version declared.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use harbor_shared::broker;
use harbor_sync_tests::rabbit::TestTopology;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

#[tokio::test]
async fn a_work_queue_declared_without_the_group_size_is_kept_as_it_is() {
    let broker = TestTopology::new().await;
    let topology = &broker.amqp.topology;
    let queue = topology.work_queue(0);
    let connection = broker::connect(&broker.amqp.url, "topology test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // As the versions before x-quorum-initial-group-size declared it.
    let args = topology.work_queue_arguments();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), durable, args)
        .await
        .unwrap();

    // The binaries declare everything again: the old queue is accepted, and the rest is done.
    topology.declare(&connection).await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for queue in [topology.work_queue(0), topology.workers_queue()] {
        let check = connection.create_channel().await.unwrap();
        check
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("{queue}: {e}"));
    }
    let _ = connection.close(200, "done".into()).await;
}
