//! Small shared pieces of the two HTTP servers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Response, StatusCode};
use serde::Serialize;

/// A client that has not sent its request headers by then is dropped.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type Body = Full<Bytes>;

pub(crate) fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(status, "application/json", body)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding JSON: {e}"),
        ),
    }
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message });
    respond(status, "application/json", format!("{body}\n"))
}

/// The servers are read-only: anything but GET (and HEAD, which hyper answers without a
/// body) is refused before routing.
pub(crate) fn method_not_allowed(method: &Method) -> Option<Response<Body>> {
    if method == Method::GET || method == Method::HEAD {
        return None;
    }
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} not allowed: this API is read-only"),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    Some(r)
}
