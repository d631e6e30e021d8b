//! HTTP clients for the two APIs the worker talks to. Each call is one attempt; retries are
//! [`crate::retry`]'s job, driven by the [`CallError`] a call returns.

pub mod harbor;
pub mod port;

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Response, StatusCode};
use serde::de::DeserializeOwned;

/// Why a call failed, and whether trying again may help.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Connect errors, timeouts, 408, 429, 5xx: worth retrying, after `retry_after` if the
    /// server said so.
    #[error("{reason}")]
    Transient {
        /// What happened, for logs and the parked message.
        reason: String,
        /// The server's `Retry-After` or `x-ratelimit-reset`.
        retry_after: Option<Duration>,
    },
    /// Any other 4xx, or an answer we cannot use: retrying would get the same.
    #[error("{reason}")]
    Permanent {
        /// What happened.
        reason: String,
    },
}

impl CallError {
    /// A permanent failure.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent {
            reason: reason.into(),
        }
    }

    /// The same failure, its reason saying first what led to the failed call.
    pub fn after(mut self, cause: &str) -> Self {
        let (Self::Transient { reason, .. } | Self::Permanent { reason }) = &mut self;
        *reason = format!("{cause}; then {reason}");
        self
    }
}

/// Whether a status is worth retrying.
pub fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// The worker's HTTP client: pooled keep-alive connections, a timeout per call, and a bound on
/// what an answer may hold, so that a misbehaving proxy in front of Harbor or Port cannot make
/// the worker allocate without limit.
#[derive(Clone, Debug)]
pub struct Http {
    client: reqwest::Client,
    max_answer_bytes: usize,
}

/// The default of `HTTP_MAX_RESPONSE_BYTES`: ample for Harbor's pages of 100 artifacts and for
/// Port's lists of a blueprint's identifiers.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

impl Http {
    /// A client whose calls time out after `timeout` and whose answers may hold at most
    /// `max_answer_bytes` (`HTTP_MAX_RESPONSE_BYTES`).
    pub fn new(timeout: Duration, max_answer_bytes: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("harbor-port-sync/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(90))
            // A redirect is answered, not followed: reqwest would send the body again (Port's
            // client secret, a webhook policy's auth header) to wherever a 307 or 308 points.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            max_answer_bytes,
        })
    }

    /// The answer's JSON body, read up to the bound: a longer one is a permanent failure (the
    /// same call would get the same answer), saying so.
    pub async fn json<T: DeserializeOwned>(
        &self,
        what: &str,
        mut response: Response,
    ) -> Result<T, CallError> {
        let limit = self.max_answer_bytes;
        let too_large = || {
            CallError::permanent(format!(
                "{what}: the answer is larger than {limit} bytes (HTTP_MAX_RESPONSE_BYTES)"
            ))
        };
        if response
            .content_length()
            .is_some_and(|length| length > limit as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| transport_error(what, &error))?
        {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|error| unreadable(what, &error))
    }
}

/// An answer that is not what the API sends.
fn unreadable(what: &str, error: &dyn std::fmt::Display) -> CallError {
    CallError::permanent(format!("{what}: unreadable answer: {error}"))
}

/// A transport error (no answer): always transient.
pub fn transport_error(what: &str, error: &reqwest::Error) -> CallError {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let detail = error_chain(error);
    CallError::Transient {
        reason: format!("{what} {kind}: {detail}"),
        retry_after: None,
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Passes a 2xx answer through; turns any other into a [`CallError`] carrying the status and
/// the start of the body.
pub async fn success(what: &str, response: Response) -> Result<Response, CallError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after(response.headers(), SystemTime::now());
    let reason = format!("{what} answered {status}: {}", excerpt(response).await);
    Err(if is_transient(status) {
        CallError::Transient {
            reason,
            retry_after,
        }
    } else {
        CallError::Permanent { reason }
    })
}

/// The start of an error answer's body, for the reason: at most [`EXCERPT_CHARS`] characters,
/// read a chunk at a time so that a huge error page is never held whole.
async fn excerpt(mut response: Response) -> String {
    let mut body = Vec::new();
    while body.len() < EXCERPT_CHARS * 4 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&body)
        .chars()
        .take(EXCERPT_CHARS)
        .collect()
}

/// How much of an error answer's body a reason quotes.
pub const EXCERPT_CHARS: usize = 300;

/// The longest wait a server may ask for. A delivery held past RabbitMQ's consumer timeout
/// (30 minutes) closes its channel, so no wait is worth more; a larger ask (a proxy's typo, or
/// an attack: `Retry-After: 10000000000000000000`) is read as this, which is past any retry
/// budget, so the event is parked instead of the deadline arithmetic overflowing.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(30 * 60);

/// How long the server asked us to wait, at most [`MAX_SERVER_WAIT`]: `Retry-After` (seconds or
/// an HTTP date), else `x-ratelimit-reset` (seconds to wait, or a Unix time when it is that
/// large).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let until = |at: SystemTime| at.duration_since(now).unwrap_or_default();
    let asked = 'asked: {
        if let Some(value) = header(RETRY_AFTER.as_str()) {
            if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                // Digits beyond u64 are still a number of seconds: a very long one.
                break 'asked Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
            }
            if let Ok(at) = httpdate(value) {
                break 'asked Some(until(at));
            }
        }
        let reset = header("x-ratelimit-reset")?.parse::<f64>().ok()?;
        if !reset.is_finite() || reset < 0.0 {
            return None;
        }
        const UNIX_TIME_THRESHOLD: f64 = 1_000_000_000.0;
        let seconds = Duration::try_from_secs_f64(reset).unwrap_or(Duration::MAX);
        if reset >= UNIX_TIME_THRESHOLD {
            Some(
                SystemTime::UNIX_EPOCH
                    .checked_add(seconds)
                    .map_or(Duration::MAX, until),
            )
        } else {
            Some(seconds)
        }
    };
    asked.map(|wait| wait.min(MAX_SERVER_WAIT))
}

fn httpdate(value: &str) -> Result<SystemTime, humantime::TimestampError> {
    // humantime reads RFC 3339; HTTP dates (`Wed, 21 Oct 2015 07:28:00 GMT`) are converted.
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return humantime::parse_rfc3339(value);
    };
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = months.iter().position(|m| m == month).map_or(0, |m| m + 1);
    humantime::parse_rfc3339(&format!("{year}-{month:02}-{day:0>2}T{time}Z"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_str(value).unwrap());
        map
    }

    #[test]
    fn transient_statuses_are_408_429_and_5xx() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 413, 422] {
            assert!(!is_transient(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_rate_limit_resets() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470);
        assert_eq!(
            retry_after(&headers("retry-after", "7"), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(
                &headers("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
                now
            ),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after(&headers("x-ratelimit-reset", "3"), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(&headers("x-ratelimit-reset", "1445412475"), now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(retry_after(&headers("retry-after", "soon"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_so_a_body_never_goes_to_another_host() {
        use wiremock::matchers::any;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let elsewhere = MockServer::start().await;
        let server = MockServer::start().await;
        let to = format!("{}/collect", elsewhere.uri());
        Mock::given(any())
            .respond_with(ResponseTemplate::new(307).insert_header("location", to.as_str()))
            .mount(&server)
            .await;
        let http = Http::new(Duration::from_secs(5), 1 << 20).unwrap();
        let answer = http
            .client
            .post(format!("{}/v1/auth/access_token", server.uri()))
            .body(r#"{"clientSecret":"s3cret"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 307);
        assert!(matches!(
            success("Port token", answer).await,
            Err(CallError::Permanent { .. })
        ));
        assert!(elsewhere.received_requests().await.unwrap().is_empty());
    }

    #[test]
    fn a_wait_asked_past_the_consumer_timeout_is_read_as_the_longest_wait() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_000);
        for (name, value) in [
            ("retry-after", "10000000000000000000"),
            ("retry-after", "99999999999999999999999999999"),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ("x-ratelimit-reset", "1e300"),
            ("x-ratelimit-reset", "999999999"),
            ("x-ratelimit-reset", "18446744073709551616"),
        ] {
            assert_eq!(
                retry_after(&headers(name, value), now),
                Some(MAX_SERVER_WAIT),
                "{name}: {value}"
            );
        }
        assert_eq!(
            retry_after(&headers("retry-after", "1800"), now),
            Some(MAX_SERVER_WAIT)
        );
        assert_eq!(
            retry_after(&headers("retry-after", "1799"), now),
            Some(Duration::from_secs(1799))
        );
    }
}
