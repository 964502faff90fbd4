//! Repair outcomes for people: the status record, the structured log line, and the critical
//! `repair-contested` finding that says who is probably fighting and what to do.

use std::time::Duration;

use tracing::{error, info, warn};

use super::{Contest, Outcome, RepairResult};
use crate::{
    config::Profile,
    model::{CheckId, Finding, Severity},
    serve::status::RepairRecord,
};

/// Repair records kept in status (`repairs`, most recent first).
pub const STATUS_REPAIRS: usize = 100;

/// The status API's record of an outcome.
pub fn record(o: &Outcome) -> RepairRecord {
    RepairRecord {
        at: o.at,
        action: o.remedy.action().to_string(),
        result: o.result.as_str().to_string(),
        peer_node: o.peer_node.clone(),
        command: Some(o.remedy.to_string()),
        message: Some(o.message.clone()),
    }
}

/// Newest first, bounded.
pub fn push_records(list: &mut Vec<RepairRecord>, outcomes: &[Outcome]) {
    for o in outcomes {
        list.insert(0, record(o));
    }
    list.truncate(STATUS_REPAIRS);
}

/// One structured line per outcome: info when applied or planned, warn when refused or
/// contested, error when a write failed.
pub fn log(o: &Outcome) {
    let peer = o.peer_node.as_deref().unwrap_or("-");
    let command = o.remedy.to_string();
    macro_rules! line {
        ($level:ident) => {
            $level!(
                action = o.remedy.action(),
                result = o.result.as_str(),
                object = %o.object,
                check = %o.check,
                peer,
                command = %command,
                "repair {}: {}", o.result, o.message
            )
        };
    }
    match o.result {
        RepairResult::Applied | RepairResult::Planned => line!(info),
        RepairResult::Refused | RepairResult::Contested => line!(warn),
        RepairResult::Failed => line!(error),
    }
}

/// The `repair-contested` finding for a running contest.
pub fn contested_finding(c: &Contest, profile: Profile, node: &str) -> Finding {
    let d = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    let backoff = c.until.duration_since(c.since).unwrap_or_default();
    let (fighter, remedy) = match profile {
        Profile::Calico => (
            "most likely Felix (calico-node) with a stale view of the datastore, re-applying \
             its in-memory state (it does so every 90 s, and on its own events)",
            format!(
                "restart calico-node on this node so Felix resyncs from the datastore: kubectl -n \
                 calico-system delete pod -l k8s-app=calico-node --field-selector \
                 spec.nodeName={node} (namespace kube-system on manifest installs)"
            ),
        ),
        Profile::Flannel => (
            "most likely flanneld with a stale view of the datastore",
            format!(
                "restart flannel on this node: kubectl -n kube-flannel delete pod -l app=flannel \
                 --field-selector spec.nodeName={node}"
            ),
        ),
    };
    let mut f = Finding::new(
        CheckId::RepairContested,
        Severity::Critical,
        &c.device,
        format!(
            "repair of {} was undone {} times; {fighter}. The agent stops repairing it for {} \
             (until {}).",
            c.object,
            c.reverts,
            d(backoff),
            humantime::format_rfc3339_seconds(c.until)
        ),
    );
    f.route = Some(c.object.to_string());
    f.peer_node = c.peer_node.clone();
    f.hint = Some(remedy);
    f.evidence
        .details
        .insert("object".into(), c.object.to_string());
    f.evidence
        .details
        .insert("repair".into(), c.command.clone());
    f.evidence
        .details
        .insert("reverts".into(), c.reverts.to_string());
    f.evidence.details.insert(
        "contested_until".into(),
        humantime::format_rfc3339_seconds(c.until).to_string(),
    );
    f.since = Some(c.since);
    f
}
