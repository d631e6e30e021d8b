//! Declaring the topology: what a new work queue gets, and queues an earlier version declared.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use harbor_shared::broker;
use harbor_shared::topology::{QUORUM_GROUP_SIZE, WORK_QUEUE_MAX_BYTES};
use harbor_sync_tests::rabbit::TestTopology;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

#[tokio::test]
async fn a_new_work_queue_refuses_publishes_past_its_size_limit() {
    let broker = TestTopology::new().await;
    let queue = broker.topology().work_queue(3);
    let arguments = broker.queue_arguments(&queue).await;
    assert_eq!(arguments["x-max-length-bytes"], WORK_QUEUE_MAX_BYTES);
    assert_eq!(arguments["x-overflow"], "reject-publish");
    assert_eq!(arguments["x-quorum-initial-group-size"], QUORUM_GROUP_SIZE);
}

#[tokio::test]
async fn work_queues_declared_by_earlier_versions_are_kept_as_they_are() {
    let broker = TestTopology::new().await;
    let topology = &broker.amqp.topology;
    let connection = broker::connect(&broker.amqp.url, "topology test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    // Queue 0 as the versions before x-quorum-initial-group-size declared it, queue 1 as those
    // before x-max-length-bytes did.
    for (queue, group_size) in [(0, false), (1, true)] {
        let queue = topology.work_queue(queue);
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        let mut args = topology.work_queue_arguments();
        if group_size {
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongLongInt(QUORUM_GROUP_SIZE),
            );
        }
        channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await
            .unwrap();
    }

    // The binaries declare everything again: the old queues are accepted, and the rest is done.
    topology.declare(&connection).await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for queue in [
        topology.work_queue(0),
        topology.work_queue(1),
        topology.workers_queue(),
    ] {
        let check = connection.create_channel().await.unwrap();
        check
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("{queue}: {e}"));
    }
    let old = broker.queue_arguments(&topology.work_queue(1)).await;
    assert_eq!(old.get("x-max-length-bytes"), None, "kept as it was");
    let _ = connection.close(200, "done".into()).await;
}
