//! Findings over time: `since` survives re-evaluations, and each finding is reported once when it
//! opens and once when it clears.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use crate::model::{CheckId, Finding};

type Key = (CheckId, String, Option<String>, Option<String>);

/// The open findings and when each was first seen (identity: [`Finding::key`]).
#[derive(Debug, Default)]
pub struct FindingTracker {
    since: BTreeMap<Key, SystemTime>,
    /// Shared with the published stream and the status API, and each finding with the
    /// evaluator's parts: one copy of 5,000 findings, not one per holder.
    open: Arc<Vec<Arc<Finding>>>,
}

/// What changed with one evaluation. Opened and changed findings are positions in the open
/// list the evaluation left ([`FindingTracker::open`]): a mass open (every peer failing at
/// startup) names 5,000 findings without copying them.
#[derive(Debug, Default, PartialEq)]
pub struct Transitions {
    /// Findings not open before this evaluation.
    pub opened: Vec<usize>,
    /// Findings open before and now, whose content changed (message, severity, evidence).
    pub changed: Vec<usize>,
    /// Findings open before and absent now (as they were last seen).
    pub cleared: Vec<Arc<Finding>>,
}

impl Transitions {
    pub fn is_empty(&self) -> bool {
        self.opened.is_empty() && self.changed.is_empty() && self.cleared.is_empty()
    }
}

impl FindingTracker {
    /// When the finding with `f`'s identity was first seen, as [`FindingTracker::update`] at
    /// `now` will say: the evaluator stamps what it computes with it, so that findings it
    /// shares need no copy here.
    pub fn first_seen(&self, f: &Finding, now: SystemTime) -> SystemTime {
        self.since.get(&f.key()).copied().unwrap_or(now)
    }

    /// Replace the open findings with a fresh evaluation made at `now`: known findings keep
    /// their `since`, new ones get `now`.
    pub fn update(&mut self, mut findings: Vec<Arc<Finding>>, now: SystemTime) -> Transitions {
        // The usual evaluation during a mass failure changes none of them: the evaluator hands
        // back the very findings the open list holds (see first_seen), in the same order, and
        // the few made afresh each time (the datastore's, the kubelet's) are equal once
        // stamped. What follows would find exactly that, at the price of three keys each.
        if findings.len() == self.open.len()
            && findings
                .iter()
                .zip(self.open.iter())
                .all(|(new, old)| Arc::ptr_eq(new, old) || self.same_once_stamped(new, old, now))
        {
            return Transitions::default();
        }
        // One key per finding, computed once: at 5,000 peers a mass open or clear must stay
        // linear (n log n), not compare every pair.
        let mut since: BTreeMap<Key, SystemTime> = BTreeMap::new();
        let mut opened = Vec::new();
        let before: BTreeMap<Key, &Finding> = self.open.iter().map(|f| (f.key(), &**f)).collect();
        let mut changed_keys: Vec<(Key, usize)> = Vec::new();
        for (i, f) in findings.iter_mut().enumerate() {
            let key = f.key();
            let first = match self.since.get(&key) {
                Some(t) => *t,
                None => match since.get(&key) {
                    // Duplicate keys in one evaluation open once.
                    Some(t) => *t,
                    None => {
                        opened.push(i);
                        now
                    }
                },
            };
            if f.since != Some(first) {
                // Copies a finding only if it is shared and was not stamped (see first_seen).
                Arc::make_mut(f).since = Some(first);
            }
            if before.get(&key).is_some_and(|old| *old != &**f) {
                changed_keys.push((key.clone(), i));
            }
            since.insert(key, first);
        }
        drop(before);
        let mut seen_changed = BTreeSet::new();
        let changed = changed_keys
            .into_iter()
            .filter(|(k, _)| seen_changed.insert(k.clone()))
            .map(|(_, i)| i)
            .collect();
        let mut cleared_keys: BTreeSet<Key> = BTreeSet::new();
        let mut cleared: Vec<Arc<Finding>> = self
            .open
            .iter()
            .filter(|f| {
                let key = f.key();
                !since.contains_key(&key) && cleared_keys.insert(key)
            })
            .cloned()
            .collect();
        // A list grown by doubling: no spare room while it travels.
        cleared.shrink_to_fit();
        self.since = since;
        let transitions = Transitions {
            opened,
            changed,
            cleared,
        };
        // Unchanged findings keep the list already shared (no second copy while the last
        // published one is still held).
        if !(transitions.is_empty() && *self.open == findings) {
            self.open = Arc::new(findings);
        }
        transitions
    }

    /// `new` is `old` once given the `since` update would give it.
    fn same_once_stamped(&self, new: &Finding, old: &Finding, now: SystemTime) -> bool {
        if new.since.is_some() {
            return new == old;
        }
        let mut stamped = new.clone();
        stamped.since = Some(self.first_seen(new, now));
        stamped == *old
    }

    /// The open findings, each with `since`, in evaluation order.
    pub fn open(&self) -> &[Arc<Finding>] {
        &self.open
    }

    /// The same list, shared.
    pub fn open_shared(&self) -> Arc<Vec<Arc<Finding>>> {
        Arc::clone(&self.open)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::Severity;

    fn finding(check: CheckId, peer: &str, route: &str) -> Finding {
        let mut f = Finding::new(check, Severity::Critical, "vxlan.calico", "m".into());
        f.peer_node = Some(peer.into());
        f.route = Some(route.into());
        f
    }

    fn shared(findings: Vec<Finding>) -> Vec<Arc<Finding>> {
        findings.into_iter().map(Arc::new).collect()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn unchanged_findings_keep_the_shared_list() {
        let mut t = FindingTracker::default();
        let a = finding(CheckId::GatewayNotAVtep, "k8s03", "10.1.235.128/26");
        t.update(shared(vec![a.clone()]), at(10));
        let published = t.open_shared();
        assert!(t.update(shared(vec![a.clone()]), at(20)).is_empty());
        assert!(
            Arc::ptr_eq(&published, &t.open_shared()),
            "no copy when nothing changed"
        );
        let mut a2 = a.clone();
        a2.message = "other words".into();
        assert_eq!(t.update(shared(vec![a2]), at(30)).changed, [0]);
        assert!(!Arc::ptr_eq(&published, &t.open_shared()));
        assert_eq!(
            published[0].message, "m",
            "a published list never changes under its holder"
        );
        assert_eq!(t.open()[0].message, "other words");
    }

    #[test]
    fn findings_stamped_with_first_seen_are_shared_not_copied() {
        let mut t = FindingTracker::default();
        let mut a = finding(CheckId::GatewayNotAVtep, "k8s03", "10.1.235.128/26");
        a.since = Some(t.first_seen(&a, at(10)));
        // Held by the evaluator's parts as well as the report.
        let part = Arc::new(a);
        t.update(vec![part.clone()], at(10));
        assert!(Arc::ptr_eq(&t.open()[0], &part));
        assert!(t.update(vec![part.clone()], at(20)).is_empty());
        assert!(Arc::ptr_eq(&t.open()[0], &part));
        assert_eq!(t.first_seen(&part, at(30)), at(10));

        // Not stamped: the tracker's copy gets `since`, the holder's is left alone.
        let b = Arc::new(finding(CheckId::FdbMissing, "k8s02", "10.1.140.64/26"));
        t.update(vec![part.clone(), b.clone()], at(30));
        assert_eq!(t.open()[1].since, Some(at(30)));
        assert_eq!(b.since, None);
    }

    #[test]
    fn since_survives_and_clears() {
        let mut t = FindingTracker::default();
        let a = finding(CheckId::GatewayNotAVtep, "k8s03", "10.1.235.128/26");
        let b = finding(CheckId::FdbMissing, "k8s02", "10.1.140.64/26");

        let tr = t.update(shared(vec![a.clone()]), at(10));
        assert_eq!(tr.opened.len(), 1);
        assert!(tr.cleared.is_empty());
        assert_eq!(t.open()[0].since, Some(at(10)));

        // Same problem, new message and severity: same finding, same since, changed.
        let mut a2 = a.clone();
        a2.message = "other words".into();
        a2.severity = Severity::Warning;
        let tr = t.update(shared(vec![a2, b.clone()]), at(20));
        assert_eq!(
            tr.opened
                .iter()
                .map(|&i| t.open()[i].check)
                .collect::<Vec<_>>(),
            [CheckId::FdbMissing]
        );
        assert_eq!(tr.changed, [0], "the changed finding is the first open one");
        assert!(tr.cleared.is_empty());
        assert_eq!(t.open()[0].since, Some(at(10)));
        assert_eq!(t.open()[0].message, "other words");
        assert_eq!(t.open()[1].since, Some(at(20)));

        let tr = t.update(shared(vec![b.clone()]), at(30));
        assert!(tr.opened.is_empty());
        assert_eq!(tr.cleared.len(), 1);
        assert_eq!(tr.cleared[0].check, CheckId::GatewayNotAVtep);
        assert_eq!(tr.cleared[0].since, Some(at(10)), "cleared as last seen");

        // Reappearing later is a new finding with a new since.
        let tr = t.update(shared(vec![a, b]), at(40));
        assert_eq!(tr.opened.len(), 1);
        assert_eq!(t.open()[0].since, Some(at(40)));
        assert_eq!(t.open()[1].since, Some(at(20)));

        let tr = t.update(shared(vec![]), at(50));
        assert_eq!(tr.cleared.len(), 2);
        assert!(t.open().is_empty());
        assert!(t.update(shared(vec![]), at(60)).is_empty());
    }

    #[test]
    fn a_different_route_or_peer_is_a_different_finding() {
        let mut t = FindingTracker::default();
        t.update(
            shared(vec![finding(CheckId::RouteStale, "k8s03", "10.9.0.0/26")]),
            at(1),
        );
        let tr = t.update(
            shared(vec![finding(CheckId::RouteStale, "k8s03", "10.9.0.64/26")]),
            at(2),
        );
        assert_eq!((tr.opened.len(), tr.cleared.len()), (1, 1));
    }

    #[test]
    fn a_peer_group_repaired_route_by_route_stays_one_finding() {
        let mut t = FindingTracker::default();
        let group = |first: &str| {
            let mut f = finding(CheckId::GatewayWrongVtep, "k8s03", first);
            f.gateway = Some("10.1.235.128".parse().unwrap());
            f
        };
        t.update(shared(vec![group("10.1.235.128/26")]), at(1));
        // The first route was repaired; the finding now names the next one.
        let tr = t.update(shared(vec![group("10.1.235.192/26")]), at(2));
        assert!(tr.opened.is_empty() && tr.cleared.is_empty(), "{tr:?}");
        assert_eq!(tr.changed.len(), 1, "the same finding, with other content");
        assert_eq!(t.open()[0].since, Some(at(1)));
        // Another wrong gateway for the same peer is another problem.
        let mut other = group("10.1.236.0/26");
        other.gateway = Some("10.1.140.64".parse().unwrap());
        let tr = t.update(shared(vec![group("10.1.235.192/26"), other]), at(3));
        assert_eq!((tr.opened.len(), tr.cleared.len()), (1, 0));
    }

    #[test]
    fn duplicate_keys_open_once_with_one_since() {
        let mut t = FindingTracker::default();
        let a = finding(CheckId::RouteStale, "k8s03", "10.9.0.0/26");
        let tr = t.update(shared(vec![a.clone(), a.clone()]), at(5));
        assert_eq!(tr.opened, [0], "the first of the two");
        assert!(t.open().iter().all(|f| f.since == Some(at(5))));
        let tr = t.update(shared(vec![a]), at(6));
        assert!(tr.is_empty());
    }
}
