//! Declaring the topology over queues an earlier version declared.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use harbor_shared::broker;
use harbor_shared::topology::DELIVERY_LIMIT;
use harbor_sync_tests::rabbit::TestTopology;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

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
    let string = |s: &str| AMQPValue::LongString(s.into());
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        string(&topology.dead_letter_exchange()),
    );
    args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    args.insert("x-overflow".into(), string("reject-publish"));
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
