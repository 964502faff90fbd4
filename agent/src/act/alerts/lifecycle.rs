//! Per-finding alert lifecycle — pure: no I/O, time passed in, so it is tested with a fake
//! clock.
//!
//! - A finding (warning or worse) pages only after it has stayed open `pending_for`, and only
//!   once the daemon has a complete picture (`in_sync`).
//! - A worse severity re-notifies (`Escalated`); `repeat_interval` re-notifies a still-open
//!   finding (`Repeat`); a cleared finding sends a resolve (`send_resolved`).
//! - **Flap damping.** A sent finding that has cleared [`FLAP_CLEARS`] (3) or more times within
//!   [`FLAP_WINDOW`] (10 min) is *flapping*: it is held open for [`FLAP_HOLD`] (2 min) after its
//!   last clear instead of resolving, and a reopen within the hold neither resolves nor
//!   re-pages. Otherwise a resolve is due the moment the finding clears.
//! - A finding fixed by repair (`repair.status = "applied"`) before it paged is reported once
//!   as `Repaired`, to chat and webhook sinks only.
//! - What has been sent is [`Alerted`], persisted by the caller: after a restart an open
//!   finding is not paged again, and one that cleared while the agent was down is resolved at
//!   the first in-sync evaluation.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::notification::{dedup_key, AlertState, Notification, Reason};
use crate::model::{Finding, Severity};

/// Clears within [`FLAP_WINDOW`] that make a finding flapping.
pub const FLAP_CLEARS: usize = 3;
pub const FLAP_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How long a flapping finding is held open after its last clear.
pub const FLAP_HOLD: Duration = Duration::from_secs(2 * 60);

/// The `[alerts]` timing that the lifecycle needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub pending_for: Duration,
    /// Zero: never.
    pub repeat_interval: Duration,
    pub send_resolved: bool,
}

/// What was sent for a finding: persisted, so a restart neither re-pages nor forgets to resolve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alerted {
    /// The finding as last sent.
    pub finding: Finding,
    /// Highest severity sent (a resolve goes to the sinks that got a trigger).
    pub severity: Severity,
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
    #[serde(with = "humantime_serde")]
    pub last_sent: SystemTime,
}

#[derive(Debug, Clone)]
struct Tracked {
    /// Shared with the open list it was last seen in: no copy per evaluation.
    finding: Arc<Finding>,
    /// When this open episode was first observed.
    opened_at: SystemTime,
    /// Set while closed.
    cleared_at: Option<SystemTime>,
    alerted: Option<Alerted>,
    /// Clear times of sent episodes within the flap window.
    clears: VecDeque<SystemTime>,
    /// Restored from disk and not yet seen in an in-sync evaluation.
    restored: bool,
}

impl Tracked {
    fn flapping(&self) -> bool {
        self.clears.len() >= FLAP_CLEARS
    }
}

/// A flapping finding held open (for status).
#[derive(Debug, Clone, PartialEq)]
pub struct Damped {
    pub dedup_key: String,
    pub finding: Finding,
    /// When its resolve is due if it stays clear.
    pub until: SystemTime,
}

/// All findings' lifecycles.
#[derive(Debug)]
pub struct Lifecycle {
    policy: Policy,
    node: String,
    tracked: BTreeMap<String, Tracked>,
    synced: bool,
    /// `alerted()` changed since the last [`Lifecycle::take_dirty`].
    dirty: bool,
}

impl Lifecycle {
    /// `restored`: what a previous run had sent and not resolved.
    pub fn new(policy: Policy, node: &str, restored: BTreeMap<String, Alerted>) -> Self {
        let tracked = restored
            .into_iter()
            .map(|(key, a)| {
                (
                    key,
                    Tracked {
                        finding: Arc::new(a.finding.clone()),
                        opened_at: a.started_at,
                        cleared_at: None,
                        alerted: Some(a),
                        clears: VecDeque::new(),
                        restored: true,
                    },
                )
            })
            .collect();
        Lifecycle {
            policy,
            node: node.to_string(),
            tracked,
            synced: false,
            dirty: false,
        }
    }

    /// The node the agent judges from, once known (found by address when the host name is no
    /// node's). Set before the first in-sync evaluation, it never changes a key already sent.
    pub fn set_node(&mut self, node: &str) {
        if !self.synced && self.node != node {
            self.node = node.to_string();
        }
    }

    /// One evaluation: `open` is every open finding at `at` (the daemon's open list, kept
    /// without a copy). Before the first in-sync evaluation nothing is considered cleared
    /// (the picture is incomplete).
    pub fn observe(&mut self, open: &[Arc<Finding>], in_sync: bool, at: SystemTime) {
        let mut seen = std::collections::BTreeSet::new();
        for f in open.iter().filter(|f| f.severity >= Severity::Warning) {
            let key = dedup_key(&self.node, f);
            seen.insert(key.clone());
            match self.tracked.get_mut(&key) {
                Some(t) => {
                    t.finding = Arc::clone(f);
                    t.restored = false;
                    if t.cleared_at.take().is_some() && t.alerted.is_none() {
                        // A new episode of a finding that was resolved (or never sent).
                        t.opened_at = at;
                    }
                }
                None => {
                    self.tracked.insert(
                        key,
                        Tracked {
                            finding: Arc::clone(f),
                            opened_at: at,
                            cleared_at: None,
                            alerted: None,
                            clears: VecDeque::new(),
                            restored: false,
                        },
                    );
                }
            }
        }
        if in_sync {
            self.synced = true;
            for (key, t) in self.tracked.iter_mut() {
                if seen.contains(key) || t.cleared_at.is_some() {
                    continue;
                }
                t.cleared_at = Some(at);
                t.restored = false;
                if t.alerted.is_some() {
                    t.clears.push_back(at);
                }
            }
        }
    }

    /// The notifications due at `now`, in order; marks them sent.
    pub fn due(&mut self, now: SystemTime) -> Vec<Notification> {
        let mut out = Vec::new();
        if !self.synced {
            return out;
        }
        let policy = self.policy.clone();
        let node = self.node.clone();
        let mut forget = Vec::new();
        for (key, t) in self.tracked.iter_mut() {
            while t
                .clears
                .front()
                .is_some_and(|c| now.duration_since(*c).unwrap_or_default() > FLAP_WINDOW)
            {
                t.clears.pop_front();
            }
            let note = |status, reason, t: &Tracked| Notification {
                dedup_key: key.clone(),
                status,
                reason,
                node: node.clone(),
                finding: Finding::clone(&t.finding),
                started_at: t
                    .alerted
                    .as_ref()
                    .map(|a| a.started_at)
                    .or(t.finding.since)
                    .unwrap_or(t.opened_at),
                resolved_at: t.cleared_at,
                previous_severity: None,
                test: false,
            };
            match (&t.alerted, t.cleared_at) {
                // Open, not sent: page once it has been open long enough.
                (None, None) => {
                    if elapsed(t.opened_at, now) >= policy.pending_for {
                        let started_at = t.finding.since.unwrap_or(t.opened_at);
                        t.alerted = Some(Alerted {
                            finding: Finding::clone(&t.finding),
                            severity: t.finding.severity,
                            started_at,
                            last_sent: now,
                        });
                        out.push(note(AlertState::Firing, Reason::Opened, t));
                        self.dirty = true;
                    }
                }
                // Open and sent: escalate or repeat.
                (Some(a), None) => {
                    if t.finding.severity > a.severity {
                        let mut n = note(AlertState::Firing, Reason::Escalated, t);
                        n.previous_severity = Some(a.severity);
                        out.push(n);
                        let a = t.alerted.as_mut().expect("matched Some");
                        a.severity = t.finding.severity;
                        a.finding = Finding::clone(&t.finding);
                        a.last_sent = now;
                        self.dirty = true;
                    } else if !policy.repeat_interval.is_zero()
                        && elapsed(a.last_sent, now) >= policy.repeat_interval
                    {
                        out.push(note(AlertState::Firing, Reason::Repeat, t));
                        let a = t.alerted.as_mut().expect("matched Some");
                        a.finding = Finding::clone(&t.finding);
                        a.last_sent = now;
                        self.dirty = true;
                    }
                }
                // Cleared after it was sent: resolve, unless flapping and still held.
                (Some(a), Some(cleared)) => {
                    if t.flapping() && elapsed(cleared, now) < FLAP_HOLD {
                        continue;
                    }
                    if policy.send_resolved {
                        let mut n = note(AlertState::Resolved, Reason::Resolved, t);
                        // Resolve to every sink that got the highest severity sent.
                        n.finding.severity = a.severity;
                        out.push(n);
                    }
                    t.alerted = None;
                    self.dirty = true;
                }
                // Cleared before it was sent: reported once if repair fixed it, else nothing.
                (None, Some(_)) => {
                    let repaired = t
                        .finding
                        .repair
                        .as_ref()
                        .is_some_and(|r| r.status == "applied");
                    if repaired {
                        out.push(note(AlertState::Resolved, Reason::Repaired, t));
                        Arc::make_mut(&mut t.finding).repair = None;
                    }
                    if t.clears.is_empty() {
                        forget.push(key.clone());
                    }
                }
            }
        }
        for key in forget {
            self.tracked.remove(&key);
        }
        out
    }

    /// What has been sent and not resolved, to persist.
    pub fn alerted(&self) -> BTreeMap<String, Alerted> {
        self.tracked
            .iter()
            .filter_map(|(k, t)| t.alerted.clone().map(|a| (k.clone(), a)))
            .collect()
    }

    /// Sent findings currently open (Alertmanager re-posts them).
    pub fn firing(&self) -> impl Iterator<Item = (&str, &Alerted, &Finding)> {
        self.tracked.iter().filter_map(|(k, t)| {
            let a = t.alerted.as_ref()?;
            (t.cleared_at.is_none()).then_some((k.as_str(), a, &*t.finding))
        })
    }

    /// The daemon has had a complete picture at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// True once since the alerted set last changed.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Flapping findings held open now.
    pub fn damped(&self, now: SystemTime) -> Vec<Damped> {
        self.tracked
            .iter()
            .filter(|(_, t)| t.alerted.is_some() && t.flapping())
            .map(|(k, t)| Damped {
                dedup_key: k.clone(),
                finding: Finding::clone(&t.finding),
                until: t.cleared_at.unwrap_or(now) + FLAP_HOLD,
            })
            .collect()
    }

    /// Restored findings not yet confirmed by an in-sync evaluation.
    pub fn restored_pending(&self) -> usize {
        self.tracked.values().filter(|t| t.restored).count()
    }
}

fn elapsed(from: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(from).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        act::alerts::notification::tests::incident,
        model::{CheckId, RepairInfo},
    };

    const T0: u64 = 1_800_000_000;

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0) + Duration::from_millis(ms)
    }

    fn policy() -> Policy {
        Policy {
            pending_for: Duration::from_secs(2),
            repeat_interval: Duration::from_secs(4 * 3600),
            send_resolved: true,
        }
    }

    fn lc() -> Lifecycle {
        Lifecycle::new(policy(), "k8s01", BTreeMap::new())
    }

    /// Observes `open` at `ms` and returns what is due then.
    fn step(l: &mut Lifecycle, open: &[Finding], ms: u64) -> Vec<(AlertState, Reason)> {
        l.observe(&crate::model::shared(open), true, t(ms));
        l.due(t(ms))
            .into_iter()
            .map(|n| (n.status, n.reason))
            .collect()
    }

    fn tick(l: &mut Lifecycle, ms: u64) -> Vec<(AlertState, Reason)> {
        l.due(t(ms))
            .into_iter()
            .map(|n| (n.status, n.reason))
            .collect()
    }

    const FIRE: (AlertState, Reason) = (AlertState::Firing, Reason::Opened);

    /// The host name is no node's; the daemon found the node by address before its first
    /// in-sync evaluation: pages name that node, and the name never changes afterwards (it is
    /// part of every dedup key already sent).
    #[test]
    fn the_node_found_by_address_names_the_pages() {
        let mut l = Lifecycle::new(policy(), "ip-10-0-1-5", BTreeMap::new());
        l.set_node("k8s01");
        let f = incident();
        l.observe(&crate::model::shared(std::slice::from_ref(&f)), true, t(0));
        let sent = l.due(t(2500));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].node, "k8s01");
        assert_eq!(
            sent[0].dedup_key,
            crate::act::alerts::notification::dedup_key("k8s01", &f)
        );
        l.set_node("other");
        l.observe(
            &crate::model::shared(std::slice::from_ref(&f)),
            true,
            t(3000),
        );
        assert!(
            l.due(t(6000)).is_empty(),
            "no second page under another name"
        );
    }
    const RESOLVE: (AlertState, Reason) = (AlertState::Resolved, Reason::Resolved);

    #[test]
    fn a_transient_shorter_than_pending_for_never_pages() {
        let mut l = lc();
        let f = incident();
        assert!(step(&mut l, std::slice::from_ref(&f), 0).is_empty());
        assert!(step(&mut l, &[], 50).is_empty());
        for ms in [1000, 2000, 5000, 60_000] {
            assert!(tick(&mut l, ms).is_empty(), "paged at {ms}");
        }
        assert!(l.alerted().is_empty());
        // Reopening later starts a fresh pending period.
        assert!(step(&mut l, std::slice::from_ref(&f), 70_000).is_empty());
        assert!(tick(&mut l, 71_999).is_empty());
        assert_eq!(tick(&mut l, 72_000), [FIRE]);
    }

    #[test]
    fn pages_once_after_pending_for_then_resolves_at_once() {
        let mut l = lc();
        let f = incident();
        assert!(step(&mut l, std::slice::from_ref(&f), 0).is_empty());
        assert!(tick(&mut l, 1999).is_empty());
        assert_eq!(tick(&mut l, 2000), [FIRE]);
        assert!(l.take_dirty());
        assert!(
            step(&mut l, std::slice::from_ref(&f), 3000).is_empty(),
            "paged twice"
        );
        let mut l2 = l;
        l2.observe(&crate::model::shared(&[]), true, t(10_000));
        let out = l2.due(t(10_000));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].status, AlertState::Resolved);
        assert_eq!(out[0].resolved_at, Some(t(10_000)));
        assert_eq!(out[0].started_at, f.since.unwrap());
        assert!(l2.alerted().is_empty());
        assert!(tick(&mut l2, 20_000).is_empty());
    }

    #[test]
    fn pending_for_zero_sends_at_once_and_not_before_in_sync() {
        let mut l = Lifecycle::new(
            Policy {
                pending_for: Duration::ZERO,
                ..policy()
            },
            "k8s01",
            BTreeMap::new(),
        );
        l.observe(&crate::model::shared(&[incident()]), false, t(0));
        assert!(l.due(t(0)).is_empty(), "paged before in sync");
        assert_eq!(step(&mut l, &[incident()], 10), [FIRE]);
    }

    #[test]
    fn escalation_renotifies_and_deescalation_does_not() {
        let mut l = lc();
        let mut f = incident();
        f.severity = Severity::Warning;
        step(&mut l, std::slice::from_ref(&f), 0);
        assert_eq!(tick(&mut l, 2000), [FIRE]);
        f.severity = Severity::Critical;
        l.observe(
            &crate::model::shared(std::slice::from_ref(&f)),
            true,
            t(3000),
        );
        let out = l.due(t(3000));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, Reason::Escalated);
        assert_eq!(out[0].previous_severity, Some(Severity::Warning));
        assert_eq!(out[0].finding.severity, Severity::Critical);
        f.severity = Severity::Warning;
        assert!(step(&mut l, std::slice::from_ref(&f), 4000).is_empty());
        // The resolve reaches the sinks that got the critical page.
        l.observe(&crate::model::shared(&[]), true, t(5000));
        let out = l.due(t(5000));
        assert_eq!(out[0].finding.severity, Severity::Critical);
    }

    #[test]
    fn repeat_interval_renotifies_a_still_open_finding() {
        let mut l = Lifecycle::new(
            Policy {
                repeat_interval: Duration::from_secs(60),
                ..policy()
            },
            "k8s01",
            BTreeMap::new(),
        );
        step(&mut l, &[incident()], 0);
        assert_eq!(tick(&mut l, 2000), [FIRE]);
        assert!(tick(&mut l, 61_999).is_empty());
        assert_eq!(tick(&mut l, 62_000), [(AlertState::Firing, Reason::Repeat)]);
        assert!(tick(&mut l, 62_500).is_empty());
        assert_eq!(
            tick(&mut l, 122_000),
            [(AlertState::Firing, Reason::Repeat)]
        );
        // repeat_interval = 0: never.
        let mut l = lc();
        l.policy.repeat_interval = Duration::ZERO;
        step(&mut l, &[incident()], 0);
        assert_eq!(tick(&mut l, 2000), [FIRE]);
        assert!(tick(&mut l, 100 * 3600 * 1000).is_empty());
    }

    #[test]
    fn send_resolved_false_sends_no_resolve_but_forgets() {
        let mut l = lc();
        l.policy.send_resolved = false;
        step(&mut l, &[incident()], 0);
        assert_eq!(tick(&mut l, 2000), [FIRE]);
        assert!(step(&mut l, &[], 3000).is_empty());
        assert!(l.alerted().is_empty());
    }

    #[test]
    fn a_flapping_finding_is_held_open_then_resolved_once() {
        let mut l = lc();
        let f = incident();
        step(&mut l, std::slice::from_ref(&f), 0);
        assert_eq!(tick(&mut l, 2000), [FIRE]);
        // Clear 1 and 2 resolve normally... but reopen quickly each time: each reopen of a
        // resolved finding is a new episode that needs pending_for again.
        assert_eq!(step(&mut l, &[], 10_000), [RESOLVE]);
        step(&mut l, std::slice::from_ref(&f), 11_000);
        assert_eq!(tick(&mut l, 13_000), [FIRE]);
        assert_eq!(step(&mut l, &[], 20_000), [RESOLVE]);
        step(&mut l, std::slice::from_ref(&f), 21_000);
        assert_eq!(tick(&mut l, 23_000), [FIRE]);
        // Third clear within 10 min: flapping, held open for 2 min.
        assert!(
            step(&mut l, &[], 30_000).is_empty(),
            "resolved while flapping"
        );
        let damped = l.damped(t(30_000));
        assert_eq!(damped.len(), 1);
        assert_eq!(damped[0].until, t(30_000 + 120_000));
        // Reopen and clear within the hold: no page, no resolve.
        assert!(step(&mut l, std::slice::from_ref(&f), 40_000).is_empty());
        assert!(step(&mut l, &[], 50_000).is_empty());
        assert!(tick(&mut l, 169_999).is_empty());
        assert_eq!(tick(&mut l, 170_000), [RESOLVE]);
        assert!(tick(&mut l, 300_000).is_empty());
    }

    #[test]
    fn repaired_before_it_paged_is_reported_once() {
        let mut l = lc();
        let mut f = incident();
        step(&mut l, std::slice::from_ref(&f), 0);
        f.repair = Some(RepairInfo {
            action: "route-replace".into(),
            status: "applied".into(),
            command: None,
            reason: None,
        });
        step(&mut l, std::slice::from_ref(&f), 500);
        let out = {
            l.observe(&crate::model::shared(&[]), true, t(800));
            l.due(t(800))
        };
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, Reason::Repaired);
        assert_eq!(out[0].status, AlertState::Resolved);
        assert!(tick(&mut l, 900).is_empty(), "reported twice");
        assert!(tick(&mut l, 5000).is_empty(), "paged after the repair");
        assert!(l.alerted().is_empty());
    }

    #[test]
    fn restart_does_not_repage_and_resolves_what_cleared_while_down() {
        let mut l = lc();
        let a = incident();
        let mut b = incident();
        b.peer_node = Some("k8s04".into());
        step(&mut l, &[a.clone(), b.clone()], 0);
        assert_eq!(tick(&mut l, 2000), [FIRE, FIRE]);
        let saved = l.alerted();
        assert_eq!(saved.len(), 2);

        // "Restart": a new lifecycle from what was persisted; b cleared while down.
        let mut l = Lifecycle::new(policy(), "k8s01", saved);
        l.observe(
            &crate::model::shared(std::slice::from_ref(&a)),
            false,
            t(60_000),
        );
        assert!(l.due(t(60_000)).is_empty(), "acted before in sync");
        assert_eq!(l.restored_pending(), 1);
        l.observe(
            &crate::model::shared(std::slice::from_ref(&a)),
            true,
            t(61_000),
        );
        let out = l.due(t(61_000));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].status, AlertState::Resolved);
        assert_eq!(out[0].finding.peer_node.as_deref(), Some("k8s04"));
        assert!(tick(&mut l, 70_000).is_empty(), "re-paged an open finding");
        assert_eq!(l.alerted().len(), 1);
    }

    #[test]
    fn info_findings_never_page() {
        let mut l = lc();
        let mut f = Finding::new(
            CheckId::DropsUnexplained,
            Severity::Info,
            "vxlan.calico",
            "x".into(),
        );
        f.since = Some(t(0));
        step(&mut l, &[f], 0);
        assert!(tick(&mut l, 10_000).is_empty());
    }
}
