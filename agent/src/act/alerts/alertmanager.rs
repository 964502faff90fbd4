//! The `alertmanager` sink: `POST {url}/api/v2/alerts`. Labels `alertname="DataplaneWatchdog"`,
//! `check`, `severity`, `node`, `peer_node` (when there is one), `device`, `family` (`ipv4` or
//! `ipv6`, for findings about an overlay device), plus `dedup_key` so
//! two findings never share an alert (and `test="true"` for a test); annotations `summary`,
//! `description`, `fix`; `startsAt` = the finding's `since`. Alertmanager forgets alerts that
//! are not re-sent, so firing alerts are re-posted every [`REFRESH`] with `endsAt` = now +
//! [`FIRING_FOR`], and a resolve (`endsAt` = when it cleared) is re-posted for [`RESOLVED_FOR`].

use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use super::notification::{rfc3339, AlertState, Notification};
use crate::model::Severity;

pub const REFRESH: Duration = Duration::from_secs(60);
pub const FIRING_FOR: Duration = Duration::from_secs(4 * 60);
pub const RESOLVED_FOR: Duration = Duration::from_secs(15 * 60);

/// `{url}/api/v2/alerts`.
pub fn endpoint(base: &str) -> String {
    format!("{}/api/v2/alerts", base.trim_end_matches('/'))
}

fn alert(n: &Notification, severity: Severity, ends_at: SystemTime) -> Value {
    let f = &n.finding;
    let mut labels = Map::new();
    labels.insert("alertname".into(), json!("DataplaneWatchdog"));
    labels.insert("check".into(), json!(f.check.as_str()));
    labels.insert("severity".into(), json!(severity.to_string()));
    labels.insert("node".into(), json!(n.node));
    if let Some(peer) = &f.peer_node {
        labels.insert("peer_node".into(), json!(peer));
    }
    labels.insert("device".into(), json!(f.device));
    if let Some(family) = f.family {
        labels.insert("family".into(), json!(family.as_str()));
    }
    labels.insert("dedup_key".into(), json!(n.dedup_key));
    if n.test {
        labels.insert("test".into(), json!("true"));
    }
    let mut description = f.message.clone();
    let routes = n.routes();
    if !routes.is_empty() {
        description.push_str(&format!(" Routes: {routes}."));
    }
    if let Some(d) = f.evidence.drops {
        description.push_str(&format!(" Drops so far: {d}."));
    }
    json!({
        "labels": labels,
        "annotations": {
            "summary": n.summary(),
            "description": description,
            "fix": n.fix_command().unwrap_or(""),
        },
        "startsAt": rfc3339(n.started_at),
        "endsAt": rfc3339(ends_at),
    })
}

/// The alerts to post for `n` at `now`: firing → `endsAt` now + 4 min (and, after an
/// escalation, the alert under the old severity ended now); resolved → `endsAt` = cleared.
pub fn body(n: &Notification, now: SystemTime) -> Value {
    let mut alerts = Vec::new();
    match n.status {
        AlertState::Firing => {
            if let Some(prev) = n.previous_severity.filter(|p| *p != n.finding.severity) {
                alerts.push(alert(n, prev, now));
            }
            alerts.push(alert(n, n.finding.severity, now + FIRING_FOR));
        }
        AlertState::Resolved => {
            let ended = n.resolved_at.unwrap_or(now).min(now).max(n.started_at);
            alerts.push(alert(n, n.finding.severity, ended));
        }
    }
    Value::Array(alerts)
}

/// One POST re-sending many notifications (the refresh).
pub fn batch<'a>(ns: impl IntoIterator<Item = &'a Notification>, now: SystemTime) -> Value {
    Value::Array(
        ns.into_iter()
            .flat_map(|n| match body(n, now) {
                Value::Array(a) => a,
                _ => Vec::new(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::alerts::notification::tests::{firing, incident};

    #[test]
    fn firing_and_resolved_alerts() {
        let mut n = firing(incident());
        let now = n.started_at + Duration::from_secs(10);
        let b = body(&n, now);
        let a = &b[0];
        assert_eq!(a["labels"]["alertname"], "DataplaneWatchdog");
        assert_eq!(a["labels"]["check"], "gateway-wrong-vtep");
        assert_eq!(a["labels"]["severity"], "critical");
        assert_eq!(a["labels"]["node"], "k8s01");
        assert_eq!(a["labels"]["peer_node"], "k8s03");
        assert_eq!(a["labels"]["device"], "vxlan.calico");
        assert_eq!(a["labels"]["family"], "ipv4");
        assert!(a["labels"].get("test").is_none());
        assert!(a["annotations"]["fix"]
            .as_str()
            .unwrap()
            .starts_with("ip route replace"));
        assert!(a["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("Drops so far: 1234"));
        assert_eq!(a["startsAt"], "2026-05-18T05:05:00Z");
        assert_eq!(a["endsAt"], "2026-05-18T05:09:10Z");
        n.status = AlertState::Resolved;
        n.resolved_at = Some(n.started_at + Duration::from_secs(5));
        assert_eq!(body(&n, now)[0]["endsAt"], "2026-05-18T05:05:05Z");
        assert_eq!(
            endpoint("http://127.0.0.1:9093/"),
            "http://127.0.0.1:9093/api/v2/alerts"
        );
    }

    #[test]
    fn the_family_label_names_the_overlay_and_is_absent_without_one() {
        let mut f = incident();
        f.device = "vxlan-v6.calico".into();
        f.family = Some(crate::model::Family::V6);
        let n = firing(f);
        assert_eq!(body(&n, n.started_at)[0]["labels"]["family"], "ipv6");
        let mut stale = incident();
        stale.family = None;
        let n = firing(stale);
        assert!(body(&n, n.started_at)[0]["labels"].get("family").is_none());
    }

    #[test]
    fn escalation_ends_the_old_severity_and_tests_are_labelled() {
        let mut n = firing(incident());
        n.previous_severity = Some(Severity::Warning);
        let now = n.started_at + Duration::from_secs(10);
        let b = body(&n, now);
        assert_eq!(b.as_array().unwrap().len(), 2);
        assert_eq!(b[0]["labels"]["severity"], "warning");
        assert_eq!(b[0]["endsAt"], rfc3339(now));
        assert_eq!(b[1]["labels"]["severity"], "critical");
        let t = Notification::test("k8s01", AlertState::Firing, now);
        assert_eq!(body(&t, now)[0]["labels"]["test"], "true");
        assert_eq!(batch([&n, &t], now).as_array().unwrap().len(), 3);
    }
}
