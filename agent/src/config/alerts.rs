//! `[alerts]` and `[[alerts.sinks]]` (DESIGN.md §7). Secrets are named here (`*_file`,
//! `*_env`) but read only when the sinks start (`act::alerts::secrets`), so the config can be
//! parsed, shown and validated without them.

use std::{fmt, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::de_duration;
use crate::model::Severity;

/// `[alerts]` — delivery happens only in `mode = "alert"` and `"repair"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// A finding must stay open this long before it is sent: Felix's own programming of a new
    /// peer makes millisecond transients that must never page. `"0s"` sends at once.
    /// Default: 2s.
    #[serde(deserialize_with = "de_duration")]
    pub pending_for: Duration,
    /// Re-notify a still-open finding (chat, pager and webhook sinks); 0 = never. Default: 4h.
    #[serde(deserialize_with = "de_duration")]
    pub repeat_interval: Duration,
    /// Send a resolve when the finding clears. Default: true.
    pub send_resolved: bool,
    /// The durable queue and the record of alerted findings (the unit's StateDirectory).
    /// Default: /var/lib/dataplane-watchdog/alerts.
    pub spool_dir: PathBuf,
    /// Most notifications held; beyond it the oldest of the lowest severity are dropped.
    /// Default: 10000.
    pub spool_max_entries: usize,
    /// Where notifications go. Default: none (nothing is sent).
    pub sinks: Vec<SinkConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            pending_for: Duration::from_secs(2),
            repeat_interval: Duration::from_secs(4 * 3600),
            send_resolved: true,
            spool_dir: PathBuf::from("/var/lib/dataplane-watchdog/alerts"),
            spool_max_entries: 10_000,
            sinks: Vec::new(),
        }
    }
}

/// What a sink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// The documented JSON, signed per Standard Webhooks when a secret is set.
    Webhook,
    /// A Slack incoming webhook (Block Kit).
    Slack,
    /// PagerDuty Events API v2.
    Pagerduty,
    /// Prometheus Alertmanager `POST /api/v2/alerts`.
    Alertmanager,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Slack => "slack",
            SinkKind::Pagerduty => "pagerduty",
            SinkKind::Alertmanager => "alertmanager",
        }
    }
}

impl fmt::Display for SinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The PagerDuty Events API v2 endpoint, the `pagerduty` sink's default `url`.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// `[[alerts.sinks]]`. `Debug` never shows `url` (it may be a secret Slack URL).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique; appears in status, metrics and logs.
    pub name: String,
    pub kind: SinkKind,
    /// Endpoint. Exactly one of `url`, `url_file`, `url_env` (pagerduty: optional, default the
    /// Events API v2 enqueue URL).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    #[serde(default)]
    pub url_env: Option<String>,
    /// PagerDuty integration (routing) key: one of these two, required for `pagerduty`.
    #[serde(default)]
    pub routing_key_file: Option<PathBuf>,
    #[serde(default)]
    pub routing_key_env: Option<String>,
    /// Webhook signing secret (`whsec_<base64>`): optional, `webhook` only.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Findings below this are not sent to this sink: warning | critical. Default: warning.
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,
    /// Connect + total time allowed for one request. Default: 10s.
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

fn default_min_severity() -> Severity {
    Severity::Warning
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_file", &self.url_file)
            .field("url_env", &self.url_env)
            .field("routing_key_file", &self.routing_key_file)
            .field("routing_key_env", &self.routing_key_env)
            .field("secret_file", &self.secret_file)
            .field("secret_env", &self.secret_env)
            .field("min_severity", &self.min_severity)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl AlertsConfig {
    /// Checks beyond types: `Err((key, message))`, the key relative to the file root.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: String, message: &str| Err((key, message.to_string()));
        if self.spool_max_entries == 0 {
            return bad("alerts.spool_max_entries".into(), "must be at least 1");
        }
        if self.spool_dir.as_os_str().is_empty() || !self.spool_dir.is_absolute() {
            return bad("alerts.spool_dir".into(), "must be an absolute path");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            let key = |k: &str| format!("alerts.sinks[{i}].{k}");
            let name = sink.name.trim();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return bad(
                    key("name"),
                    "must be 1-64 characters of letters, digits, '-', '_' or '.'",
                );
            }
            if !names.insert(name) {
                return Err((key("name"), format!("{name:?} is used by another sink")));
            }
            if sink.min_severity == Severity::Info {
                return bad(key("min_severity"), "must be \"warning\" or \"critical\"");
            }
            if sink.timeout < Duration::from_millis(100) {
                return bad(key("timeout"), "is too short: at least 100ms");
            }
            let urls = [
                sink.url.is_some(),
                sink.url_file.is_some(),
                sink.url_env.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if urls > 1 {
                return bad(key("url"), "give only one of url, url_file and url_env");
            }
            if urls == 0 && sink.kind != SinkKind::Pagerduty {
                return bad(
                    key("url"),
                    "missing: give url, url_file or url_env for this sink",
                );
            }
            if let Some(url) = &sink.url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    // Never echo the value: it may be a secret URL.
                    return bad(key("url"), "must start with http:// or https://");
                }
            }
            let keys = sink.routing_key_file.is_some() as u8 + sink.routing_key_env.is_some() as u8;
            match sink.kind {
                SinkKind::Pagerduty if keys == 0 => {
                    return bad(
                        key("routing_key_file"),
                        "missing: a pagerduty sink needs routing_key_file or routing_key_env",
                    )
                }
                SinkKind::Pagerduty if keys > 1 => {
                    return bad(
                        key("routing_key_file"),
                        "give only one of routing_key_file and routing_key_env",
                    )
                }
                SinkKind::Pagerduty => {}
                _ if keys > 0 => {
                    return bad(key("routing_key_file"), "only a pagerduty sink has one")
                }
                _ => {}
            }
            let secrets = sink.secret_file.is_some() as u8 + sink.secret_env.is_some() as u8;
            if secrets > 0 && sink.kind != SinkKind::Webhook {
                return bad(key("secret_file"), "only a webhook sink is signed");
            }
            if secrets > 1 {
                return bad(
                    key("secret_file"),
                    "give only one of secret_file and secret_env",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/x/config.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("accepted bad config").to_string()
    }

    #[test]
    fn defaults_match_the_contract() {
        let a = parse("").unwrap().alerts;
        assert_eq!(a.pending_for, std::time::Duration::from_secs(2));
        assert_eq!(a.repeat_interval, std::time::Duration::from_secs(4 * 3600));
        assert!(a.send_resolved);
        assert_eq!(a.spool_dir, Path::new("/var/lib/dataplane-watchdog/alerts"));
        assert_eq!(a.spool_max_entries, 10_000);
        assert!(a.sinks.is_empty());
    }

    #[test]
    fn every_sink_kind_parses() {
        let c = parse(
            r#"
[alerts]
pending_for = "0s"
repeat_interval = "0s"
send_resolved = false
spool_dir = "/tmp/spool"
spool_max_entries = 5
[[alerts.sinks]]
name = "oncall"
kind = "pagerduty"
routing_key_env = "PD_KEY"
min_severity = "critical"
[[alerts.sinks]]
name = "chat"
kind = "slack"
url_file = "/etc/dataplane-watchdog/secrets/slack-url"
timeout = "3s"
[[alerts.sinks]]
name = "hook"
kind = "webhook"
url = "https://example.net/hook"
secret_env = "HOOK_SECRET"
[[alerts.sinks]]
name = "am"
kind = "alertmanager"
url = "http://127.0.0.1:9093"
"#,
        )
        .unwrap();
        let a = c.alerts;
        assert_eq!(a.pending_for, std::time::Duration::ZERO);
        assert!(!a.send_resolved);
        assert_eq!(a.sinks.len(), 4);
        assert_eq!(a.sinks[0].kind, super::SinkKind::Pagerduty);
        assert_eq!(a.sinks[0].min_severity, crate::model::Severity::Critical);
        assert_eq!(a.sinks[1].timeout, std::time::Duration::from_secs(3));
        assert_eq!(a.sinks[2].timeout, std::time::Duration::from_secs(10));
        assert_eq!(a.sinks[3].min_severity, crate::model::Severity::Warning);
    }

    #[test]
    fn bad_sinks_name_the_key() {
        let sink = |body: &str| format!("[[alerts.sinks]]\n{body}\n");
        assert_eq!(
            err(&sink("name = \"a\"\nkind = \"slack\"")),
            "config /x/config.toml: alerts.sinks[0].url: missing: give url, url_file or url_env for this sink"
        );
        let dup = format!(
            "{}{}",
            sink("name = \"a\"\nkind = \"webhook\"\nurl = \"http://h/\""),
            sink("name = \"a\"\nkind = \"webhook\"\nurl = \"http://h/\"")
        );
        assert!(err(&dup).contains("alerts.sinks[1].name: \"a\" is used by another sink"));
        assert!(err(&sink("name = \"p\"\nkind = \"pagerduty\""))
            .contains("alerts.sinks[0].routing_key_file: missing"));
        assert!(err(&sink(
            "name = \"s\"\nkind = \"slack\"\nurl = \"http://h\"\nsecret_env = \"X\""
        ))
        .contains("alerts.sinks[0].secret_file: only a webhook sink is signed"));
        assert!(
            err(&sink("name = \"x\"\nkind = \"email\"\nurl = \"http://h\""))
                .contains("alerts.sinks[0].kind")
        );
        assert!(err(&sink(
            "name = \"w\"\nkind = \"webhook\"\nurl = \"http://h\"\nmin_severity = \"info\""
        ))
        .contains("min_severity"));
        assert!(err("[alerts]\nspool_max_entries = 0").contains("alerts.spool_max_entries"));
    }

    #[test]
    fn a_bad_url_is_refused_without_echoing_it() {
        let e = err("[[alerts.sinks]]\nname = \"s\"\nkind = \"slack\"\nurl = \"hooks.slack.com/services/T0/B0/SECRET\"");
        assert!(
            e.contains("alerts.sinks[0].url: must start with http"),
            "{e}"
        );
        assert!(!e.contains("SECRET"), "{e}");
        let c = parse("[[alerts.sinks]]\nname = \"s\"\nkind = \"slack\"\nurl = \"https://hooks.slack.com/services/T0/B0/SECRET\"").unwrap();
        assert!(!format!("{c:?}").contains("SECRET"));
    }

    #[test]
    fn the_example_sinks_parse_when_uncommented() {
        let text = include_str!("../../../systemd/config.example.toml");
        let start = text.find("# [[alerts.sinks]]").expect("example sinks");
        let end = text[start..].find("\n[").map_or(text.len(), |e| start + e);
        let sinks: String = text[start..end]
            .lines()
            .map(|l| l.trim_start_matches('#').trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&sinks).unwrap_or_else(|e| panic!("{e}\n{sinks}"));
        let kinds: Vec<_> = c.alerts.sinks.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["pagerduty", "slack", "webhook", "alertmanager"]);
    }
}
