//! One notification: what every sink renders its request from. It is what the spool stores,
//! so a retry after a restart sends the same content with the same ids.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::model::{CheckId, Finding, Severity};

/// Firing or resolved, as every sink calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// Why it is sent; decides which sinks get it (`Sink::wants`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// Open for `pending_for`: the first page.
    Opened,
    /// Worse than what was sent.
    Escalated,
    /// Still open after `repeat_interval`.
    Repeat,
    /// Cleared after it was sent.
    Resolved,
    /// Fixed by repair before it paged: chat and webhook sinks only.
    Repaired,
    /// `watchdog alert test`.
    Test,
}

/// One notification of one finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Stable for the finding on this node ([`dedup_key`]).
    pub dedup_key: String,
    pub status: AlertState,
    pub reason: Reason,
    pub node: String,
    pub finding: Finding,
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
    #[serde(with = "humantime_serde", default)]
    pub resolved_at: Option<SystemTime>,
    /// The severity sent before an escalation (Alertmanager ends the old alert).
    #[serde(default)]
    pub previous_severity: Option<Severity>,
    #[serde(default)]
    pub test: bool,
}

/// Stable id of a finding on a node, for dedup at the receiver (PagerDuty `dedup_key`, the
/// webhook's `dedup_key`): `dpw-<check>-<12 hex of SHA-1 over node and Finding::key>`.
pub fn dedup_key(node: &str, finding: &Finding) -> String {
    let (check, device, peer, detail) = finding.key();
    let mut h = Sha1::new();
    for part in [
        node,
        check.as_str(),
        &device,
        peer.as_deref().unwrap_or(""),
        detail.as_deref().unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("dpw-{check}-{hex}")
}

impl Notification {
    /// One line: `[TEST] `/`RESOLVED: `/`REPAIRED: ` then severity, check, node and message.
    pub fn summary(&self) -> String {
        let f = &self.finding;
        let prefix = match (self.test, self.status, self.reason) {
            (true, _, _) => "[TEST] ",
            (_, _, Reason::Repaired) => "REPAIRED: ",
            (_, AlertState::Resolved, _) => "RESOLVED: ",
            _ => "",
        };
        let peer = f
            .peer_node
            .as_deref()
            .map(|p| format!(" (peer {p})"))
            .unwrap_or_default();
        format!(
            "{prefix}{} {} on {}{peer}: {}",
            f.severity, f.check, self.node, f.message
        )
    }

    /// The command that fixes it: the repair's command, else the finding's hint.
    pub fn fix_command(&self) -> Option<&str> {
        self.finding
            .repair
            .as_ref()
            .and_then(|r| r.command.as_deref())
            .or(self.finding.hint.as_deref())
    }

    /// The routes the finding covers, as one comma-separated string.
    pub fn routes(&self) -> String {
        let f = &self.finding;
        if !f.evidence.routes.is_empty() {
            f.evidence.routes.join(", ")
        } else {
            f.route.clone().unwrap_or_default()
        }
    }

    /// A marked test notification (`watchdog alert test`), firing or resolved.
    pub fn test(node: &str, status: AlertState, now: SystemTime) -> Self {
        let mut finding = Finding::new(
            CheckId::GatewayWrongVtep,
            Severity::Warning,
            "vxlan.calico",
            "test notification from dataplane-watchdog (`watchdog alert test`); no action needed"
                .to_string(),
        );
        finding.since = Some(now);
        Notification {
            dedup_key: format!("dpw-test-{node}"),
            status,
            reason: Reason::Test,
            node: node.to_string(),
            finding,
            started_at: now,
            resolved_at: (status == AlertState::Resolved).then_some(now),
            previous_severity: None,
            test: true,
        }
    }
}

/// `s` cut to at most `max` characters, ending in `…` when cut (Slack and PagerDuty limits).
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// RFC 3339 with seconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::model::{v4, RepairInfo};

    /// The incident's finding (k8s03's block via the wrong VTEP).
    pub fn incident() -> Finding {
        let mut f = Finding::new(
            CheckId::GatewayWrongVtep,
            Severity::Critical,
            "vxlan.calico",
            "route 10.1.235.128/26 via 10.1.235.128 is not k8s03's VTEP 10.1.235.133".into(),
        );
        f.route = Some("10.1.235.128/26".into());
        f.gateway = Some(v4(10, 1, 235, 128));
        f.expected_gateway = Some(v4(10, 1, 235, 133));
        f.peer_node = Some("k8s03".into());
        f.family = Some(crate::model::Family::V4);
        f.since = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_779_080_700));
        f.hint = Some(
            "ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink".into(),
        );
        f.evidence.routes = vec!["10.1.235.128/26".into()];
        f.evidence.drops = Some(1234);
        f
    }

    pub fn firing(f: Finding) -> Notification {
        Notification {
            dedup_key: dedup_key("k8s01", &f),
            status: AlertState::Firing,
            reason: Reason::Opened,
            node: "k8s01".into(),
            started_at: f.since.unwrap(),
            finding: f,
            resolved_at: None,
            previous_severity: None,
            test: false,
        }
    }

    #[test]
    fn dedup_key_is_stable_across_content_and_distinct_across_findings() {
        let a = incident();
        let mut b = a.clone();
        b.evidence.drops = Some(99_999);
        b.message = "other words".into();
        b.severity = Severity::Warning;
        assert_eq!(dedup_key("k8s01", &a), dedup_key("k8s01", &b));
        assert_ne!(dedup_key("k8s01", &a), dedup_key("k8s02", &a));
        let mut c = a.clone();
        c.peer_node = Some("k8s04".into());
        assert_ne!(dedup_key("k8s01", &a), dedup_key("k8s01", &c));
        let k = dedup_key("k8s01", &a);
        assert!(
            k.starts_with("dpw-gateway-wrong-vtep-") && k.len() == 35,
            "{k}"
        );
    }

    #[test]
    fn summaries_are_marked() {
        let mut n = firing(incident());
        assert!(n
            .summary()
            .starts_with("critical gateway-wrong-vtep on k8s01 (peer k8s03): route"));
        n.status = AlertState::Resolved;
        assert!(n.summary().starts_with("RESOLVED: critical"));
        n.reason = Reason::Repaired;
        assert!(n.summary().starts_with("REPAIRED: "));
        let t = Notification::test("k8s01", AlertState::Firing, SystemTime::UNIX_EPOCH);
        assert!(t.summary().starts_with("[TEST] "));
        assert!(t.test);
    }

    #[test]
    fn fix_prefers_the_repair_command() {
        let mut n = firing(incident());
        assert!(n.fix_command().unwrap().starts_with("ip route replace"));
        n.finding.repair = Some(RepairInfo {
            action: "route-replace".into(),
            status: "applied".into(),
            command: Some("ip route replace X".into()),
            reason: None,
        });
        assert_eq!(n.fix_command(), Some("ip route replace X"));
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
