//! Port's rate limits, as Port's API reference publishes them (2026): per organisation, per family
//! of routes, a token bucket of `burst` refilled at `limit` per 5 minutes. With
//! `SANDBOX_PORT_RATE_SCALE=n` the fake Port enforces them divided by `n` (a storm of N requests
//! then stands for one of N × n at Port's real limits), answers each request with the
//! `x-ratelimit-*` headers and refuses past the limit with 429 and `Retry-After`. Every request
//! to `/v1/...` is counted by family and outcome (`GET /sandbox/port/stats`), limits or not.

use std::collections::BTreeMap;
use std::time::Instant;

use actix_web::body::BoxBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpResponse, web};
use futures_util::future::LocalBoxFuture;
use serde_json::{Value, json};

use super::{Shared, lock};

/// The middleware: each request to `/v1/...` takes its family's token, or is refused 429.
pub fn enforce<S>(
    request: ServiceRequest,
    service: &S,
) -> LocalBoxFuture<'static, Result<ServiceResponse<BoxBody>, actix_web::Error>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
    S::Future: 'static,
{
    let verdict = match request.app_data::<web::Data<Shared>>() {
        Some(shared) if request.path().starts_with("/v1/") => {
            Some(lock(&shared.limits).take(Family::of(request.method(), request.path())))
        }
        _ => None,
    };
    let Some(verdict) = verdict else {
        return Box::pin(service.call(request));
    };
    let with_headers = move |mut response: ServiceResponse<BoxBody>| {
        for (name, value) in &verdict.headers {
            if let Ok(value) = HeaderValue::from_str(value) {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(name), value);
            }
        }
        response
    };
    if verdict.refused {
        let answer = HttpResponse::TooManyRequests().json(json!({
            "ok": false, "error": "rate_limit_exceeded", "message": "Too many requests"}));
        return Box::pin(async move { Ok(with_headers(request.into_response(answer))) });
    }
    let answered = service.call(request);
    Box::pin(async move { answered.await.map(with_headers) })
}

/// Port's period.
pub const PERIOD_SECONDS: f64 = 300.0;

/// A family of Port's routes: its name, limit per period and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// `POST /v1/blueprints/{bp}/entities`.
    Upsert,
    /// `POST /v1/blueprints/{bp}/entities/bulk`.
    BulkUpsert,
    /// Entity searches.
    Search,
    /// Other entity routes: delete, get, bulk delete.
    Entity,
    /// Everything else.
    Other,
}

impl Family {
    /// Which family a request to Port's API is in.
    pub fn of(method: &Method, path: &str) -> Self {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("POST", ["v1", "blueprints", _, "entities"]) => Self::Upsert,
            ("POST", ["v1", "blueprints", _, "entities", "bulk"]) => Self::BulkUpsert,
            ("POST", ["v1", "entities", "search"])
            | ("POST", ["v1", "blueprints", _, "entities", "search"]) => Self::Search,
            (_, ["v1", "blueprints", _, "entities", ..])
            | (_, ["v1", "blueprints", _, "bulk", "entities", ..]) => Self::Entity,
            _ => Self::Other,
        }
    }

    /// Its name in the stats.
    pub fn name(self) -> &'static str {
        match self {
            Self::Upsert => "upsert",
            Self::BulkUpsert => "bulk_upsert",
            Self::Search => "search",
            Self::Entity => "entity",
            Self::Other => "other",
        }
    }

    /// Port's limit per 5 minutes, and burst.
    fn published(self) -> (f64, f64) {
        match self {
            Self::Upsert => (10_000.0, 200.0),
            Self::BulkUpsert | Self::Search | Self::Entity => (35_000.0, 3_500.0),
            Self::Other => (15_000.0, 1_500.0),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The buckets (when enforced) and the counts.
#[derive(Debug, Default)]
pub struct Limits {
    /// Port's limits divided by this, when enforced.
    scale: Option<f64>,
    buckets: BTreeMap<Family, Bucket>,
    /// Requests by family, then outcome (`answered`, `refused`).
    counts: BTreeMap<Family, BTreeMap<&'static str, u64>>,
}

/// What a request may do: go on with these headers, or be refused with them.
pub struct Verdict {
    /// `x-ratelimit-*` (and `retry-after` when refused).
    pub headers: Vec<(&'static str, String)>,
    /// Refused (429).
    pub refused: bool,
}

impl Limits {
    /// Port's limits divided by `scale`, or none enforced.
    pub fn new(scale: Option<f64>) -> Self {
        Self {
            scale: scale.filter(|s| s.is_finite() && *s > 0.0),
            ..Self::default()
        }
    }

    /// Takes a token of the family's bucket, and counts the request.
    pub fn take(&mut self, family: Family) -> Verdict {
        let verdict = match self.scale {
            None => Verdict {
                headers: Vec::new(),
                refused: false,
            },
            Some(scale) => {
                let (limit, burst) = family.published();
                let (limit, burst) = (limit / scale, (burst / scale).max(1.0));
                let rate = limit / PERIOD_SECONDS;
                let now = Instant::now();
                let bucket = self.buckets.entry(family).or_insert(Bucket {
                    tokens: burst,
                    updated: now,
                });
                let elapsed = now.duration_since(bucket.updated).as_secs_f64();
                bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
                bucket.updated = now;
                let refused = bucket.tokens < 1.0;
                if !refused {
                    bucket.tokens -= 1.0;
                }
                let mut headers = vec![
                    ("x-ratelimit-period", format!("{PERIOD_SECONDS}")),
                    ("x-ratelimit-limit", format!("{limit}")),
                    (
                        "x-ratelimit-remaining",
                        format!("{}", bucket.tokens.floor()),
                    ),
                    (
                        "x-ratelimit-reset",
                        format!("{}", ((burst - bucket.tokens) / rate).ceil()),
                    ),
                ];
                if refused {
                    let next = ((1.0 - bucket.tokens) / rate).ceil().max(1.0);
                    headers.push(("retry-after", format!("{next}")));
                }
                Verdict { headers, refused }
            }
        };
        let outcome = if verdict.refused {
            "refused"
        } else {
            "answered"
        };
        *self
            .counts
            .entry(family)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
        verdict
    }

    /// The counts, and the scale enforced.
    pub fn stats(&self) -> Value {
        let requests: serde_json::Map<String, Value> = self
            .counts
            .iter()
            .map(|(family, outcomes)| (family.name().to_owned(), json!(outcomes)))
            .collect();
        json!({"scale": self.scale, "requests": requests})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_fall_in_ports_families() {
        let post = Method::POST;
        assert_eq!(
            Family::of(&post, "/v1/blueprints/a/entities"),
            Family::Upsert
        );
        assert_eq!(
            Family::of(&post, "/v1/blueprints/a/entities/bulk"),
            Family::BulkUpsert
        );
        assert_eq!(Family::of(&post, "/v1/entities/search"), Family::Search);
        assert_eq!(
            Family::of(&post, "/v1/blueprints/a/entities/search"),
            Family::Search
        );
        assert_eq!(
            Family::of(&Method::DELETE, "/v1/blueprints/a/entities/x"),
            Family::Entity
        );
        assert_eq!(
            Family::of(&post, "/v1/blueprints/a/bulk/entities/delete"),
            Family::Entity
        );
        assert_eq!(Family::of(&post, "/v1/auth/access_token"), Family::Other);
    }

    #[test]
    fn past_the_burst_a_family_is_refused_and_told_when_to_come_back() {
        // Scaled by 1,000: single upserts burst 1 and refill at 10,000 / 1,000 per 300 s.
        let mut limits = Limits::new(Some(1000.0));
        assert!(!limits.take(Family::Upsert).refused);
        let refused = limits.take(Family::Upsert);
        assert!(refused.refused);
        assert!(
            refused
                .headers
                .iter()
                .any(|(n, v)| *n == "retry-after" && v == "30")
        );
        assert!(!limits.take(Family::BulkUpsert).refused, "families apart");
        assert_eq!(
            limits.stats()["requests"]["upsert"],
            json!({"answered": 1, "refused": 1})
        );
    }
}
