//! What `harbor-ingest` and `harbor-worker` share: the options both read, the RabbitMQ topology
//! and the confirmed publisher they both use, the reconnecting broker session, the Harbor event
//! model, the Harbor instances served, short quotes of payloads in errors, and telemetry (logs,
//! metrics, health endpoints).

pub mod broker;
pub mod config;
pub mod event;
pub mod instances;
pub mod message;
pub mod ops;
pub mod publisher;
pub mod quote;
pub mod telemetry;
pub mod topology;
