//! `harbor-worker`: consumes Harbor events from RabbitMQ, re-reads the current state of what
//! each names from the Harbor API, and writes it to Port. Failed calls are retried with backoff
//! within a per-event budget; what still fails is parked, with its reason, in the parked queue.
//!
//! [`handler`] holds the event logic of one Harbor and knows nothing of RabbitMQ; [`fleet`]
//! hands each event to its Harbor's handler; [`consumer`] holds the RabbitMQ loop and knows
//! nothing of Harbor.

pub mod backlog;
pub mod balance;
pub mod blueprints;
pub mod catalog;
pub mod clients;
pub mod commands;
pub mod consumer;
pub mod entities;
pub mod fleet;
pub mod handler;
pub mod harbor_ref;
pub mod mapping;
pub mod names;
pub mod parked;
pub mod plan;
pub mod resync;
pub mod retry;
pub mod schedule;
pub mod settings;
pub mod startup;
pub mod webhooks;
