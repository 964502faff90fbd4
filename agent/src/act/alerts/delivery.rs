//! HTTP delivery behind a small trait ([`Transport`]; a fake in tests, reqwest in the agent)
//! and the pure rules around it: which outcomes are retried ([`classify`]), `Retry-After`
//! ([`parse_retry_after`]) and the backoff schedule ([`backoff`]).

use std::{
    future::Future,
    time::{Duration, SystemTime},
};

use super::redact::{redact_url, scrub};

/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5 * 60);
/// A `Retry-After` beyond this is capped (a receiver asking for a day would silence pages).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// One POST.
#[derive(Clone)]
pub struct HttpRequest {
    /// May hold a secret: never log it; use [`HttpRequest::redacted_url`].
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Connect and total time allowed.
    pub timeout: Duration,
}

impl HttpRequest {
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl std::fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRequest")
            .field("url", &self.redacted_url())
            .field("body_bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// The parts of a response delivery cares about.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    pub retry_after: Option<String>,
    /// The start of the body, for error messages.
    pub body: String,
}

/// Why no response came back. Messages never contain the URL.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    #[error("timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

/// Sends one request. Implementations must not follow redirects.
pub trait Transport: Send + Sync + 'static {
    fn post(
        &self,
        req: HttpRequest,
    ) -> impl Future<Output = Result<HttpResponse, TransportError>> + Send;
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx: remove from the spool.
    Delivered,
    /// Try again; `after` is the receiver's `Retry-After` when it gave one.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Other 4xx (and anything else not retryable): shown, counted, not retried.
    Permanent { reason: String },
}

/// Connection errors, timeouts, 408, 429 and 5xx are retried; any other non-2xx is permanent.
pub fn classify(result: &Result<HttpResponse, TransportError>, now: SystemTime) -> Outcome {
    match result {
        Err(e) => Outcome::Retry {
            after: None,
            reason: e.to_string(),
        },
        Ok(r) if (200..300).contains(&r.status) => Outcome::Delivered,
        Ok(r) => {
            let reason = if r.body.trim().is_empty() {
                format!("HTTP {}", r.status)
            } else {
                format!("HTTP {}: {}", r.status, r.body.trim())
            };
            match r.status {
                408 | 429 | 500..=599 => Outcome::Retry {
                    after: r
                        .retry_after
                        .as_deref()
                        .and_then(|v| parse_retry_after(v, now)),
                    reason,
                },
                _ => Outcome::Permanent { reason },
            }
        }
    }
}

/// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`, as a delay from `now`
/// (a date in the past is zero), capped at [`MAX_RETRY_AFTER`]. `None` when unparseable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(now).unwrap_or_default()
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// The delay before retry number `attempt` (1 = the first retry): 1 s doubling to 5 min,
/// with "equal jitter" (`jitter` in [0, 1): the delay is between half and all of the step),
/// so many agents failing together do not retry together.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let step = MIN_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(MAX_BACKOFF);
    let jitter = jitter.clamp(0.0, 1.0);
    step.mul_f64(0.5 + 0.5 * jitter)
}

/// The delay before the next attempt: the receiver's `Retry-After` when given (never less),
/// else [`backoff`].
pub fn next_delay(attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    match retry_after {
        Some(after) => after,
        None => backoff(attempt, jitter),
    }
}

/// reqwest with rustls (ring provider, the system's roots), no redirects.
pub struct ReqwestTransport {
    client: reqwest::Client,
}

impl ReqwestTransport {
    /// `connect_timeout` bounds the TCP+TLS connect; each request has its own total timeout.
    pub fn new(connect_timeout: Duration) -> Result<Self, TransportError> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dataplane-watchdog/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TransportError::Other(e.without_url().to_string()))?;
        Ok(ReqwestTransport { client })
    }
}

impl Transport for ReqwestTransport {
    async fn post(&self, req: HttpRequest) -> Result<HttpResponse, TransportError> {
        let mut builder = self
            .client
            .post(&req.url)
            .timeout(req.timeout)
            .body(req.body.clone());
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        let secret_parts = url_secret_parts(&req.url);
        let fail = |e: reqwest::Error| {
            let timeout = e.is_timeout();
            let connect = e.is_connect();
            let msg = scrub(&error_chain(&e.without_url()), &secret_parts);
            if timeout {
                TransportError::Timeout
            } else if connect {
                TransportError::Connect(msg)
            } else {
                TransportError::Other(msg)
            }
        };
        let resp = builder.send().await.map_err(fail)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // The body only matters for errors; bounded either way.
        let body = match tokio::time::timeout(req.timeout, resp.bytes()).await {
            Ok(Ok(b)) => String::from_utf8_lossy(&b[..b.len().min(512)]).into_owned(),
            _ => String::new(),
        };
        Ok(HttpResponse {
            status,
            retry_after,
            body: scrub(&body, &secret_parts),
        })
    }
}

/// The error and its sources, one line (`hyper` hides the useful part in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        src = s.source();
    }
    out
}

/// The parts of a URL after the host, which may be secret (path segments, query values).
fn url_secret_parts(url: &str) -> Vec<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let Some(idx) = rest.find(['/', '?', '#']) else {
        return Vec::new();
    };
    rest[idx..]
        .split(['/', '?', '#', '&', '='])
        .filter(|p| p.len() >= 4)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, retry_after: Option<&str>) -> Result<HttpResponse, TransportError> {
        Ok(HttpResponse {
            status,
            retry_after: retry_after.map(str::to_string),
            body: String::new(),
        })
    }

    fn now() -> SystemTime {
        // Wed, 21 Oct 2015 07:28:00 GMT
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)
    }

    #[test]
    fn retry_classification() {
        for ok in [200, 201, 202, 204] {
            assert_eq!(classify(&resp(ok, None), now()), Outcome::Delivered, "{ok}");
        }
        for retry in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(
                    classify(&resp(retry, None), now()),
                    Outcome::Retry { after: None, .. }
                ),
                "{retry}"
            );
        }
        for permanent in [301, 400, 401, 403, 404, 410, 413, 422] {
            assert!(
                matches!(
                    classify(&resp(permanent, None), now()),
                    Outcome::Permanent { .. }
                ),
                "{permanent}"
            );
        }
        for err in [
            TransportError::Timeout,
            TransportError::Connect("refused".into()),
            TransportError::Other("reset".into()),
        ] {
            assert!(matches!(classify(&Err(err), now()), Outcome::Retry { .. }));
        }
        assert_eq!(
            classify(&resp(429, Some("2")), now()),
            Outcome::Retry {
                after: Some(Duration::from_secs(2)),
                reason: "HTTP 429".into()
            }
        );
        // Retry-After on a permanent failure changes nothing.
        assert!(matches!(
            classify(&resp(400, Some("2")), now()),
            Outcome::Permanent { .. }
        ));
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        assert_eq!(
            parse_retry_after("120", now()),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now()), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now()),
            Some(Duration::from_secs(30))
        );
        // In the past: retry now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("999999", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now()), None);
        assert_eq!(parse_retry_after("-5", now()), None);
    }

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes_with_jitter() {
        assert_eq!(backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(9, 1.0), Duration::from_secs(256));
        assert_eq!(backoff(10, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(1000, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(10, 0.0), MAX_BACKOFF / 2);
        for a in 1..12 {
            let d = backoff(a, 0.37);
            assert!(d >= backoff(a, 0.0) && d <= backoff(a, 1.0));
        }
        assert_eq!(
            next_delay(1, Some(Duration::from_secs(2)), 0.0),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn secret_url_parts_are_found() {
        let parts = url_secret_parts(
            "https://hooks.slack.com/services/T000/B000/XXXXSECRET?token=abcd1234",
        );
        assert!(parts.contains(&"XXXXSECRET"));
        assert!(parts.contains(&"abcd1234"));
        assert!(!parts.contains(&"hooks.slack.com"));
        assert!(url_secret_parts("http://127.0.0.1:9093").is_empty());
        let dbg = format!(
            "{:?}",
            HttpRequest {
                url: "https://hooks.slack.com/services/T/B/XXXXSECRET".into(),
                headers: vec![],
                body: vec![],
                timeout: Duration::from_secs(1)
            }
        );
        assert!(!dbg.contains("XXXXSECRET"), "{dbg}");
    }
}
