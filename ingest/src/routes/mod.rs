//! HTTP routes of the ingest; `/healthz`, `/readyz` and `/metrics` come from
//! [`harbor_shared::ops`].

pub mod webhook;
