//! The `pagerduty` sink: Events API v2. `trigger` with a `dedup_key` stable for the finding,
//! `payload.summary` (≤ 1024), `source` = node, `severity`, `component` = device, `group` =
//! peer node, `class` = check, `custom_details` = the finding; `resolve` with the same key.

use serde_json::{json, Value};

use super::notification::{rfc3339, truncate, AlertState, Notification};
use crate::model::Severity;

const SUMMARY_MAX: usize = 1024;

pub fn body(n: &Notification, routing_key: &str) -> Value {
    if n.status == AlertState::Resolved {
        return json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": n.dedup_key,
        });
    }
    let f = &n.finding;
    let mut payload = json!({
        "summary": truncate(&n.summary(), SUMMARY_MAX),
        "source": n.node,
        "severity": match f.severity {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        },
        "timestamp": rfc3339(n.started_at),
        "component": f.device,
        "class": f.check.as_str(),
        "custom_details": f,
    });
    if let Some(peer) = &f.peer_node {
        payload["group"] = json!(peer);
    }
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": n.dedup_key,
        "payload": payload,
        "client": "dataplane-watchdog",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::alerts::notification::tests::{firing, incident};

    #[test]
    fn trigger_and_resolve_share_the_dedup_key() {
        let mut n = firing(incident());
        let t = body(&n, "R0UT1NGKEY");
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["routing_key"], "R0UT1NGKEY");
        assert_eq!(t["payload"]["source"], "k8s01");
        assert_eq!(t["payload"]["severity"], "critical");
        assert_eq!(t["payload"]["component"], "vxlan.calico");
        assert_eq!(t["payload"]["group"], "k8s03");
        assert_eq!(t["payload"]["class"], "gateway-wrong-vtep");
        assert_eq!(t["payload"]["custom_details"]["peer_node"], "k8s03");
        assert!(t["payload"]["summary"].as_str().unwrap().len() <= SUMMARY_MAX);
        n.status = AlertState::Resolved;
        let r = body(&n, "R0UT1NGKEY");
        assert_eq!(r["event_action"], "resolve");
        assert_eq!(r["dedup_key"], t["dedup_key"]);
        assert!(r.get("payload").is_none());
        let mut long = incident();
        long.message = "é".repeat(5000);
        let t = body(&firing(long), "k");
        assert!(t["payload"]["summary"].as_str().unwrap().chars().count() <= SUMMARY_MAX);
        let test = Notification::test(
            "k8s01",
            AlertState::Firing,
            std::time::SystemTime::UNIX_EPOCH,
        );
        assert!(body(&test, "k")["payload"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("[TEST]"));
    }
}
