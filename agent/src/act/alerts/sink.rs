//! A configured sink with its secrets loaded: who gets which notification, and the HTTP
//! request for one attempt. Secrets come from `*_file` or `*_env` and are never logged, shown
//! or put in an error message.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use super::{
    alertmanager,
    delivery::HttpRequest,
    notification::{Notification, Reason},
    pagerduty,
    redact::redact_url,
    slack, webhook,
};
use crate::{
    config::{SinkConfig, SinkKind, PAGERDUTY_EVENTS_URL},
    model::Severity,
};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink {sink}: cannot read {what} from {}: {source}", path.display())]
    ReadFile {
        sink: String,
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("sink {sink}: {what} file {} is empty", path.display())]
    EmptyFile {
        sink: String,
        what: &'static str,
        path: std::path::PathBuf,
    },
    #[error("sink {sink}: environment variable {var} ({what}) is not set or empty")]
    MissingEnv {
        sink: String,
        what: &'static str,
        var: String,
    },
    #[error("sink {sink}: the url is not an http(s) URL (from {source_kind})")]
    BadUrl {
        sink: String,
        source_kind: &'static str,
    },
    #[error("sink {sink}: {source}")]
    Secret {
        sink: String,
        source: webhook::WebhookError,
    },
    #[error("sink {sink}: no url configured")]
    NoUrl { sink: String },
}

/// A sink ready to send. `Debug` shows no secret.
pub struct Sink {
    pub name: String,
    pub kind: SinkKind,
    pub min_severity: Severity,
    pub timeout: Duration,
    url: String,
    routing_key: Option<String>,
    signing_key: Option<Vec<u8>>,
    /// The raw secret strings, to scrub from any message.
    secrets: Vec<String>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.redacted_url())
            .finish_non_exhaustive()
    }
}

fn read_secret(
    sink: &str,
    what: &'static str,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<String>, SinkError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| SinkError::ReadFile {
            sink: sink.into(),
            what,
            path: path.to_path_buf(),
            source,
        })?;
        let t = text.trim();
        if t.is_empty() {
            return Err(SinkError::EmptyFile {
                sink: sink.into(),
                what,
                path: path.to_path_buf(),
            });
        }
        return Ok(Some(t.to_string()));
    }
    if let Some(var) = env {
        return match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
            _ => Err(SinkError::MissingEnv {
                sink: sink.into(),
                what,
                var: var.into(),
            }),
        };
    }
    Ok(None)
}

impl Sink {
    /// Loads the sink's secrets (files, environment).
    pub fn from_config(c: &SinkConfig) -> Result<Sink, SinkError> {
        let name = c.name.clone();
        let (url, source_kind) = match (
            &c.url,
            read_secret(&name, "url", c.url_file.as_deref(), c.url_env.as_deref())?,
        ) {
            (Some(u), _) => (u.trim().to_string(), "url"),
            (None, Some(u)) => (
                u,
                if c.url_file.is_some() {
                    "url_file"
                } else {
                    "url_env"
                },
            ),
            (None, None) if c.kind == SinkKind::Pagerduty => {
                (PAGERDUTY_EVENTS_URL.to_string(), "default")
            }
            (None, None) => return Err(SinkError::NoUrl { sink: name }),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(SinkError::BadUrl {
                sink: name,
                source_kind,
            });
        }
        let routing_key = read_secret(
            &name,
            "routing key",
            c.routing_key_file.as_deref(),
            c.routing_key_env.as_deref(),
        )?;
        let secret = read_secret(
            &name,
            "signing secret",
            c.secret_file.as_deref(),
            c.secret_env.as_deref(),
        )?;
        let signing_key = secret
            .as_deref()
            .map(webhook::decode_secret)
            .transpose()
            .map_err(|source| SinkError::Secret {
                sink: name.clone(),
                source,
            })?;
        let mut secrets = vec![url.clone()];
        if let Some((_, rest)) = url.split_once("://") {
            if let Some(i) = rest.find(['/', '?']) {
                secrets.push(rest[i..].to_string());
            }
        }
        secrets.extend(routing_key.clone());
        secrets.extend(secret);
        Ok(Sink {
            name,
            kind: c.kind,
            min_severity: c.min_severity,
            timeout: c.timeout,
            url,
            routing_key,
            signing_key,
            secrets,
        })
    }

    /// `scheme://host/…`, safe to show.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Strings to scrub from any message about this sink.
    pub fn secrets(&self) -> Vec<&str> {
        self.secrets.iter().map(String::as_str).collect()
    }

    /// Does this sink get `n`? Severity at or above `min_severity`; a `Repaired` report only
    /// to chat and webhook sinks (not the pager); a `Repeat` not to Alertmanager (it has its
    /// own re-posting).
    pub fn wants(&self, n: &Notification) -> bool {
        if n.finding.severity < self.min_severity && !n.test {
            return false;
        }
        match n.reason {
            Reason::Repaired => matches!(self.kind, SinkKind::Webhook | SinkKind::Slack),
            Reason::Repeat => self.kind != SinkKind::Alertmanager,
            _ => true,
        }
    }

    /// The request for one attempt of `n`; `id` is its notification id (the same on every
    /// retry), `now` the attempt time.
    pub fn request(&self, n: &Notification, id: &str, now: SystemTime) -> HttpRequest {
        let (url, body, headers) = match self.kind {
            SinkKind::Webhook => {
                let body = json_bytes(&webhook::body(n));
                let ts = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let headers = webhook::headers(id, ts, &body, self.signing_key.as_deref());
                (self.url.clone(), body, headers)
            }
            SinkKind::Slack => (
                self.url.clone(),
                json_bytes(&slack::body(n)),
                json_headers(),
            ),
            SinkKind::Pagerduty => (
                self.url.clone(),
                json_bytes(&pagerduty::body(
                    n,
                    self.routing_key.as_deref().unwrap_or(""),
                )),
                json_headers(),
            ),
            SinkKind::Alertmanager => (
                alertmanager::endpoint(&self.url),
                json_bytes(&alertmanager::body(n, now)),
                json_headers(),
            ),
        };
        HttpRequest {
            url,
            headers,
            body,
            timeout: self.timeout,
        }
    }

    /// An Alertmanager re-post of many notifications.
    pub fn refresh_request<'a>(
        &self,
        ns: impl IntoIterator<Item = &'a Notification>,
        now: SystemTime,
    ) -> HttpRequest {
        HttpRequest {
            url: alertmanager::endpoint(&self.url),
            headers: json_headers(),
            body: json_bytes(&alertmanager::batch(ns, now)),
            timeout: self.timeout,
        }
    }
}

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a JSON value always serializes")
}

fn json_headers() -> Vec<(String, String)> {
    vec![("content-type".to_string(), "application/json".to_string())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::alerts::notification::tests::{firing, incident};

    fn config(kind: SinkKind) -> SinkConfig {
        SinkConfig {
            name: "s".into(),
            kind,
            url: None,
            url_file: None,
            url_env: None,
            routing_key_file: None,
            routing_key_env: None,
            secret_file: None,
            secret_env: None,
            min_severity: Severity::Warning,
            timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn secrets_load_from_files_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(
            &url_file,
            "https://hooks.slack.com/services/T0/B0/XXXXSECRET\n",
        )
        .unwrap();
        let mut c = config(SinkKind::Slack);
        c.url_file = Some(url_file);
        let s = Sink::from_config(&c).unwrap();
        assert_eq!(s.redacted_url(), "https://hooks.slack.com/…");
        assert!(!format!("{s:?}").contains("XXXXSECRET"));
        assert!(s.secrets().iter().any(|x| x.contains("XXXXSECRET")));
        let req = s.request(&firing(incident()), "msg_1", SystemTime::UNIX_EPOCH);
        assert!(req.url.ends_with("XXXXSECRET"));
        assert!(!format!("{req:?}").contains("XXXXSECRET"));

        let mut c = config(SinkKind::Pagerduty);
        c.routing_key_file = Some(dir.path().join("missing"));
        let e = Sink::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("cannot read routing key"), "{e}");
        let key = dir.path().join("key");
        std::fs::write(&key, "R0UT1NGKEY").unwrap();
        c.routing_key_file = Some(key);
        let s = Sink::from_config(&c).unwrap();
        assert_eq!(s.redacted_url(), "https://events.pagerduty.com/…");
        let req = s.request(&firing(incident()), "msg_1", SystemTime::UNIX_EPOCH);
        assert!(String::from_utf8(req.body).unwrap().contains("R0UT1NGKEY"));

        let mut c = config(SinkKind::Webhook);
        c.url = Some("http://127.0.0.1:1/x".into());
        c.secret_env = Some("DPW_TEST_UNSET_SECRET_VAR".into());
        let e = Sink::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("DPW_TEST_UNSET_SECRET_VAR"), "{e}");
    }

    #[test]
    fn who_gets_what() {
        let mk = |kind, min| {
            let mut c = config(kind);
            c.url = Some("http://h/".into());
            c.routing_key_env = None;
            c.min_severity = min;
            Sink {
                name: "x".into(),
                kind,
                min_severity: min,
                timeout: c.timeout,
                url: "http://h/".into(),
                routing_key: Some("k".into()),
                signing_key: None,
                secrets: vec![],
            }
        };
        let mut n = firing(incident());
        n.finding.severity = Severity::Warning;
        assert!(mk(SinkKind::Webhook, Severity::Warning).wants(&n));
        assert!(!mk(SinkKind::Pagerduty, Severity::Critical).wants(&n));
        n.finding.severity = Severity::Critical;
        assert!(mk(SinkKind::Pagerduty, Severity::Critical).wants(&n));
        n.reason = Reason::Repaired;
        assert!(mk(SinkKind::Slack, Severity::Warning).wants(&n));
        assert!(mk(SinkKind::Webhook, Severity::Warning).wants(&n));
        assert!(!mk(SinkKind::Pagerduty, Severity::Warning).wants(&n));
        assert!(!mk(SinkKind::Alertmanager, Severity::Warning).wants(&n));
        n.reason = Reason::Repeat;
        assert!(!mk(SinkKind::Alertmanager, Severity::Warning).wants(&n));
        assert!(mk(SinkKind::Pagerduty, Severity::Warning).wants(&n));
    }
}
