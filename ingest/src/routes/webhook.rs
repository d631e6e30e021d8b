//! `POST /webhook` (a single Harbor) or `POST /webhook/<instance>` (HARBOR_INSTANCES_FILE):
//! check, publish, answer.
//!
//! | case                                              | answer                 |
//! |---------------------------------------------------|------------------------|
//! | valid, broker confirmed                           | 202 + `message_id`     |
//! | no such endpoint (an instance not in the file)    | 404                    |
//! | missing or wrong `Authorization`                  | 401                    |
//! | not JSON, or no string `type`                     | 400                    |
//! | body over `MAX_BODY_BYTES`, or over 16 KiB for an | 413                    |
//! | event that names one resource (all but           |                        |
//! | `TAG_RETENTION` and `REPLICATION`)               |                        |
//! | body not received within `REQUEST_TIMEOUT`        | 408                    |
//! | broker down, nack, unroutable, no confirm in 5 s  | 503 + `Retry-After: 5` |
//!
//! The checks run in that order of cost: the endpoint, then the `Authorization` header (with the
//! endpoint's own secrets: one Harbor's secret is refused at another's endpoint) and the size
//! (from `Content-Length`), all before the body is read; then an HMAC against the body, then
//! parsing; nothing is published unless all pass. An instance's events carry its name
//! ([`message::INSTANCE_HEADER`]) and have it in their subject.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use bytes::BytesMut;
use futures_util::StreamExt;
use harbor_shared::event::{Envelope, EventError, SINGLE_EVENT_MAX_BYTES};
use harbor_shared::instances;
use harbor_shared::message;
use harbor_shared::publisher::{Outgoing, PublishError};
use harbor_shared::quote::{cut, quoted};
use harbor_shared::topology::Topology;
use serde_json::json;
use tracing::{debug, error, warn};

use crate::auth::{AuthError, Verdict};
use crate::link::CurrentPublisher;
use crate::settings::Endpoint;

/// The target of the per-webhook audit line, at `debug`: `RUST_LOG=info,harbor_ingest::audit=debug`
/// switches it on.
pub const AUDIT_TARGET: &str = "harbor_ingest::audit";

/// What the handler needs, shared by all workers.
pub struct WebhookState {
    /// The Harbors whose webhooks are taken, with their `Authorization` checks.
    pub endpoints: Vec<Endpoint>,
    /// The broker publisher, when connected.
    pub publisher: CurrentPublisher,
    /// Where to publish.
    pub topology: Topology,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Time for the body to arrive.
    pub request_timeout: std::time::Duration,
    /// Bodies being read to check a signature, at most [`SIGNED_READS_AT_ONCE`].
    pub signed_reads: tokio::sync::Semaphore,
}

/// How many bodies may be read at once to check an HMAC signature. Anyone can send a header
/// shaped like a signature, and only the whole body proves it wrong: without a bound, slow
/// senders of fake signatures on every connection (`MAX_CONNECTIONS`, 512 per HTTP worker)
/// could make the ingest hold that many bodies of up to `MAX_BODY_BYTES`. With it, at most
/// 16 MiB; the others wait without being read (up to `REQUEST_TIMEOUT`, then 503). Harbor itself
/// only ever sends a token, which is checked from the header alone.
pub const SIGNED_READS_AT_ONCE: usize = 16;

/// Why a webhook was not accepted; each variant is one status code.
#[derive(thiserror::Error, Debug)]
pub enum WebhookError {
    /// 404: `/webhook/<instance>` for an instance this ingest does not serve, or `/webhook`
    /// when it serves several.
    #[error("{0}")]
    NoEndpoint(String),
    /// 413: over `MAX_BODY_BYTES`, or over [`SINGLE_EVENT_MAX_BYTES`] for an event that names
    /// one resource.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// 400: the body could not be read (client went away, broken chunked encoding).
    #[error("request body could not be read")]
    Unreadable,
    /// 408: the body did not arrive within REQUEST_TIMEOUT (a slow client).
    #[error("request body did not arrive in time")]
    Timeout,
    /// 401
    #[error("{0}")]
    Unauthorized(AuthError),
    /// 400
    #[error("{0}")]
    NotAnEvent(EventError),
    /// 503
    #[error("the event could not be handed to the broker; retry later")]
    Unavailable(PublishError),
    /// 503: too many signed bodies are being read; retry later.
    #[error("too many signed webhooks are being read at once; retry later")]
    Busy,
}

/// Every outcome `harbor_ingest_requests_total` counts: `accepted`, and each
/// [`WebhookError::code`].
pub const OUTCOMES: [&str; 10] = [
    "accepted",
    "unauthorized",
    "unknown_instance",
    "invalid_json",
    "invalid_event",
    "payload_too_large",
    "request_timeout",
    "unreadable_body",
    "broker_unavailable",
    "busy",
];

impl WebhookError {
    fn code(&self) -> &'static str {
        match self {
            Self::NoEndpoint(_) => "unknown_instance",
            Self::TooLarge(_) => "payload_too_large",
            Self::Unreadable => "unreadable_body",
            Self::Timeout => "request_timeout",
            Self::Unauthorized(_) => "unauthorized",
            Self::NotAnEvent(EventError::NotJson(_)) => "invalid_json",
            Self::NotAnEvent(_) => "invalid_event",
            Self::Unavailable(_) => "broker_unavailable",
            Self::Busy => "busy",
        }
    }
}

impl ResponseError for WebhookError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::NoEndpoint(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unreadable | Self::NotAnEvent(_) => StatusCode::BAD_REQUEST,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Unavailable(_) | Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            Self::Unavailable(_) | Self::Busy => {
                response.insert_header((header::RETRY_AFTER, HeaderValue::from_static("5")));
            }
            Self::Unauthorized(_) => {
                response.insert_header((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Harbor-Secret"),
                ));
                // Its body may be unread: the connection cannot serve another request (and a
                // sender without the secret gets no second try on it).
                response.force_close();
            }
            _ => {}
        }
        response.json(json!({"error": self.code(), "message": self.to_string()}))
    }
}

/// The answer to an accepted webhook, serialized straight from the envelope.
#[derive(serde::Serialize)]
struct Accepted<'a> {
    status: &'static str,
    message_id: &'a str,
}

/// `POST /webhook`: a single Harbor's.
pub async fn webhook(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<WebhookState>,
) -> Result<HttpResponse, WebhookError> {
    answer(request, payload, &state, None).await
}

/// `POST /webhook/<instance>`: an instance's of HARBOR_INSTANCES_FILE.
pub async fn instance_webhook(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<WebhookState>,
    instance: web::Path<String>,
) -> Result<HttpResponse, WebhookError> {
    answer(request, payload, &state, Some(&instance)).await
}

async fn answer(
    request: HttpRequest,
    payload: web::Payload,
    state: &WebhookState,
    instance: Option<&str>,
) -> Result<HttpResponse, WebhookError> {
    let request_id = request_id(&request);
    let (harbor, outcome) = match endpoint(state, instance) {
        Ok(endpoint) => (
            endpoint.harbor(),
            accept(&request, payload, state, endpoint, &request_id).await,
        ),
        Err(error) => (instances::NO_INSTANCE, Err(error)),
    };
    let label = match &outcome {
        Ok(_) => "accepted",
        Err(error) => error.code(),
    };
    let harbor = harbor.to_owned();
    metrics::counter!("harbor_ingest_requests_total", "harbor" => harbor, "outcome" => label)
        .increment(1);
    let mut response = outcome?;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), value);
    }
    Ok(response)
}

/// The endpoint a path names.
fn endpoint<'a>(
    state: &'a WebhookState,
    instance: Option<&str>,
) -> Result<&'a Endpoint, WebhookError> {
    let found = state
        .endpoints
        .iter()
        .find(|e| e.instance.as_deref() == instance);
    found.ok_or_else(|| {
        WebhookError::NoEndpoint(match instance {
            None => "this ingest serves several Harbors: post to /webhook/<instance>".to_owned(),
            Some(name) if state.endpoints.iter().all(|e| e.instance.is_none()) => {
                format!(
                    "this ingest serves one Harbor, at /webhook (not /webhook/{})",
                    cut(name)
                )
            }
            Some(name) => format!("no Harbor instance named {} here", quoted(name)),
        })
    })
}

async fn accept(
    request: &HttpRequest,
    payload: web::Payload,
    state: &WebhookState,
    endpoint: &Endpoint,
    request_id: &str,
) -> Result<HttpResponse, WebhookError> {
    // An address, not a string: nothing is allocated unless a refusal is logged.
    let peer = request
        .peer_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
    let refused = |error: WebhookError| {
        warn!(%request_id, harbor = endpoint.harbor(), %peer, %error, "Webhook refused");
        error
    };
    // The header first: a request that cannot be authorized is refused before its body is read,
    // whatever its Content-Length.
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let verdict = match endpoint.auth.check_header(authorization) {
        Ok(verdict) => verdict,
        Err(error) => {
            discard_small_body(request, payload, state.request_timeout).await;
            return Err(refused(WebhookError::Unauthorized(error)));
        }
    };
    // A claimed signature: its body is read only when one of the few places is free.
    let signed_read = match verdict {
        Verdict::Signed(_) => {
            let place = tokio::time::timeout(state.request_timeout, state.signed_reads.acquire());
            match place.await {
                Ok(Ok(permit)) => Some(permit),
                _ => {
                    discard_small_body(request, payload, state.request_timeout).await;
                    return Err(refused(WebhookError::Busy));
                }
            }
        }
        Verdict::Authorized => None,
    };
    // The body must arrive within REQUEST_TIMEOUT too (actix times the headers only).
    let read = read_body(request, payload, state.max_body_bytes);
    let body = tokio::time::timeout(state.request_timeout, read)
        .await
        .unwrap_or(Err(WebhookError::Timeout))
        .map_err(refused)?;
    if let Verdict::Signed(signature) = verdict {
        endpoint
            .auth
            .check_signature(&signature, &body)
            .map_err(|error| refused(WebhookError::Unauthorized(error)))?;
    }
    drop(signed_read);
    let envelope =
        Envelope::parse(&body).map_err(|error| refused(WebhookError::NotAnEvent(error)))?;
    if !envelope.event_type.lists_artifacts() && body.len() > SINGLE_EVENT_MAX_BYTES {
        return Err(refused(WebhookError::TooLarge(SINGLE_EVENT_MAX_BYTES)));
    }

    let publisher = state.publisher.borrow().clone();
    let started = Instant::now();
    let published = match publisher {
        None => Err(PublishError::NotConnected),
        Some(publisher) => {
            // Publish once the webhooks read in the same turn of the event loop have been
            // checked too, so that they reach lapin together rather than one HTTP request's
            // work apart. At a steady 40 % of the broker's ceiling this cut the p99 by half or
            // more, with the same throughput at saturation (README, Performance).
            tokio::task::yield_now().await;
            publisher
                .publish(Outgoing {
                    exchange: state.topology.exchange(),
                    routing_key: envelope.event_type.as_str(),
                    body: &body,
                    properties: message::webhook(
                        &envelope,
                        endpoint.instance.as_deref(),
                        request_id,
                    ),
                })
                .await
        }
    };
    metrics::histogram!("harbor_ingest_publish_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    match published {
        Ok(()) => {
            // The audit trail, off by default: at full load the line cost about a tenth of
            // the throughput (README, Performance); every webhook is counted in
            // harbor_ingest_requests_total.
            debug!(
                target: AUDIT_TARGET,
                %request_id,
                message_id = %envelope.message_id,
                event_type = %envelope.event_type,
                format = envelope.format.as_str(),
                bytes = body.len(),
                "Webhook accepted"
            );
            Ok(HttpResponse::Accepted().json(Accepted {
                status: "accepted",
                message_id: &envelope.message_id,
            }))
        }
        Err(error) => {
            error!(
                %request_id,
                message_id = %envelope.message_id,
                event_type = %envelope.event_type,
                error = %error,
                "Webhook not accepted: publish failed"
            );
            Err(WebhookError::Unavailable(error))
        }
    }
}

/// The largest body of a refused request that is read (and thrown away) before the answer, so
/// that the client's connection stays usable for its next request; a larger one is not read at
/// all, and the connection closes after the answer.
const DISCARDED_BODY_BYTES: usize = 16 * 1024;

/// Reads and drops the body of a refused request if it declares at most
/// [`DISCARDED_BODY_BYTES`] and arrives in time; nothing is kept.
async fn discard_small_body(request: &HttpRequest, mut payload: web::Payload, timeout: Duration) {
    let declared = declared_length(request);
    if declared.is_none_or(|length| length > DISCARDED_BODY_BYTES) {
        return;
    }
    let mut seen = 0;
    let discard = async {
        while let Some(Ok(chunk)) = payload.next().await {
            seen += chunk.len();
            if seen > DISCARDED_BODY_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, discard).await;
}

/// The body's length as its `Content-Length` declares it, if it does.
fn declared_length(request: &HttpRequest) -> Option<usize> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse().ok())
}

/// Reads the body, refusing it as soon as it is known to be too large.
async fn read_body(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<BytesMut, WebhookError> {
    let declared = declared_length(request);
    if declared.is_some_and(|length| length > limit) {
        return Err(WebhookError::TooLarge(limit));
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(8192).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| WebhookError::Unreadable)?;
        if body.len() + chunk.len() > limit {
            return Err(WebhookError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    if declared.is_some_and(|length| body.len() < length) {
        // The client went away mid-body.
        return Err(WebhookError::Unreadable);
    }
    Ok(body)
}

/// The sender's `X-Request-Id` when it is a sane token, else a new one.
fn request_id(request: &HttpRequest) -> String {
    request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_is_an_outcome_registered_at_start() {
        let errors = [
            WebhookError::NoEndpoint(String::new()),
            WebhookError::TooLarge(1),
            WebhookError::Unreadable,
            WebhookError::Timeout,
            WebhookError::Unauthorized(AuthError::Missing),
            WebhookError::NotAnEvent(EventError::NotJson(String::new())),
            WebhookError::NotAnEvent(EventError::BadType),
            WebhookError::Unavailable(PublishError::NotConnected),
            WebhookError::Busy,
        ];
        let mut codes: Vec<&str> = errors.iter().map(WebhookError::code).collect();
        codes.push("accepted");
        codes.sort_unstable();
        codes.dedup();
        let mut outcomes = OUTCOMES.to_vec();
        outcomes.sort_unstable();
        assert_eq!(codes, outcomes);
    }
}
