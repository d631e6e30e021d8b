//! `harbor-ingest`: the HTTP endpoint Harbor's webhooks are sent to. It checks each request's
//! `Authorization` (a shared secret or an HMAC-SHA256 signature of the body), checks that the
//! body is a Harbor event, and publishes the raw body to RabbitMQ, answering `202` only once the
//! broker confirmed the message. It never calls Harbor or Port.

pub mod auth;
pub mod link;
pub mod routes;
pub mod settings;
pub mod startup;
