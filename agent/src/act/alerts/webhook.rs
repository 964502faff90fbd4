//! The `webhook` sink: the documented JSON (DESIGN.md §7), signed per the Standard Webhooks
//! spec when a secret is set: `webhook-id` (the notification's spool id, identical on every
//! retry), `webhook-timestamp` (the attempt, Unix seconds) and `webhook-signature`
//! `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::notification::{rfc3339, Notification};

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Never includes the secret.
    #[error("the signing secret is not `whsec_` followed by base64")]
    BadSecret,
}

/// The key of a Standard Webhooks secret: the base64 after `whsec_` (the prefix is optional).
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, WebhookError> {
    let s = secret.trim();
    let b64 = s.strip_prefix("whsec_").unwrap_or(s);
    match STANDARD.decode(b64) {
        Ok(key) if !key.is_empty() => Ok(key),
        _ => Err(WebhookError::BadSecret),
    }
}

/// `v1,<base64 signature>` of `body` for `id` at `timestamp`.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The body: `{"version": 1, "status", "dedup_key", "node", "summary", "finding",
/// "started_at", "resolved_at", "test"}`.
pub fn body(n: &Notification) -> Value {
    json!({
        "version": 1,
        "status": n.status.as_str(),
        "dedup_key": n.dedup_key,
        "node": n.node,
        "summary": n.summary(),
        "finding": n.finding,
        "started_at": rfc3339(n.started_at),
        "resolved_at": n.resolved_at.map(rfc3339),
        "test": n.test,
    })
}

/// Headers for one attempt.
pub fn headers(id: &str, timestamp: u64, body: &[u8], key: Option<&[u8]>) -> Vec<(String, String)> {
    let mut h = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("webhook-id".to_string(), id.to_string()),
        ("webhook-timestamp".to_string(), timestamp.to_string()),
    ];
    if let Some(key) = key {
        h.push((
            "webhook-signature".to_string(),
            sign(key, id, timestamp, body),
        ));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::alerts::notification::{
        tests::{firing, incident},
        AlertState,
    };

    /// The example used by the Standard Webhooks reference libraries' tests; the expected value
    /// was recomputed independently with Python's `hmac`/`hashlib` (see docs/alerts.md).
    #[test]
    fn signature_matches_the_spec_example() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn bad_secrets_are_refused_without_echo() {
        let e = decode_secret("whsec_not base64!!").unwrap_err().to_string();
        assert!(!e.contains("not base64"));
        assert!(decode_secret("whsec_").is_err());
        assert_eq!(decode_secret("AAEC").unwrap(), [0, 1, 2]);
    }

    #[test]
    fn body_has_the_documented_fields() {
        let mut n = firing(incident());
        let b = body(&n);
        assert_eq!(b["version"], 1);
        assert_eq!(b["status"], "firing");
        assert_eq!(b["dedup_key"], n.dedup_key.as_str());
        assert_eq!(b["node"], "k8s01");
        assert_eq!(b["finding"]["check"], "gateway-wrong-vtep");
        assert_eq!(b["finding"]["expected_gateway"], "10.1.235.133");
        assert_eq!(b["started_at"], "2026-05-18T05:05:00Z");
        assert!(b["resolved_at"].is_null());
        assert_eq!(b["test"], false);
        n.status = AlertState::Resolved;
        n.resolved_at = Some(n.started_at + std::time::Duration::from_secs(60));
        let b = body(&n);
        assert_eq!(b["status"], "resolved");
        assert_eq!(b["resolved_at"], "2026-05-18T05:06:00Z");
        let h = headers("msg_1", 5, b"{}", Some(b"k"));
        assert_eq!(
            h.iter().filter(|(k, _)| k.starts_with("webhook-")).count(),
            3
        );
        assert_eq!(headers("msg_1", 5, b"{}", None).len(), 3);
    }
}
