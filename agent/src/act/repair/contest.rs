//! Contested repair, pure: noticing that something undoes what the agent wrote (DESIGN §8).
//!
//! A revert is an object the agent wrote and read back as right (`applied`) that a later
//! fresh kernel read shows wrong again, re-derived from the datastore. `contested_after`
//! reverts within `contested_window` make the object contested: it is not written again for
//! `contested_backoff`, after which its history starts over.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use super::ObjectKey;

/// What the agent knows about one object.
#[derive(Debug, Clone, Default)]
struct History {
    /// The agent's last write was read back as right, and nothing has undone it since.
    holds_ours: bool,
    /// Reverts within the window, oldest first.
    reverts: VecDeque<Instant>,
    /// Contested until then.
    until: Option<Instant>,
    /// Identifies the fight for the `repair-contested` finding.
    contest: Option<Contest>,
}

/// One contested object, for the `repair-contested` finding and the escalation.
#[derive(Debug, Clone, PartialEq)]
pub struct Contest {
    pub object: ObjectKey,
    /// The `ip …` command the agent kept writing.
    pub command: String,
    pub device: String,
    pub peer_node: Option<String>,
    pub reverts: usize,
    pub since: SystemTime,
    /// When repairs may resume.
    pub until: SystemTime,
}

/// What a revert did to the object.
#[derive(Debug, Clone, PartialEq)]
pub enum Revert {
    /// Counted; repairing it once more is fine.
    Counted(usize),
    /// This revert made it contested.
    Contested(Contest),
}

/// Per-object write history.
#[derive(Debug)]
pub struct ContestTracker {
    after: u32,
    window: Duration,
    backoff: Duration,
    objects: BTreeMap<ObjectKey, History>,
}

impl ContestTracker {
    pub fn new(after: u32, window: Duration, backoff: Duration) -> Self {
        ContestTracker {
            after: after.max(1),
            window,
            backoff,
            objects: BTreeMap::new(),
        }
    }

    /// The agent wrote `object` and read it back as right.
    pub fn applied(&mut self, object: &ObjectKey) {
        self.objects.entry(object.clone()).or_default().holds_ours = true;
    }

    /// The agent is about to write `object` again: if its last write held, that write was
    /// undone, and this counts as a revert.
    pub fn was_ours(&self, object: &ObjectKey) -> bool {
        self.objects.get(object).is_some_and(|h| h.holds_ours)
    }

    /// Records a revert of `object` seen at `now` (`wall`: the same instant on the wall clock).
    pub fn reverted(
        &mut self,
        object: &ObjectKey,
        now: Instant,
        wall: SystemTime,
        describe: impl FnOnce() -> (String, String, Option<String>),
    ) -> Revert {
        let (after, window, backoff) = (self.after, self.window, self.backoff);
        let h = self.objects.entry(object.clone()).or_default();
        h.holds_ours = false;
        h.reverts.push_back(now);
        while h
            .reverts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            h.reverts.pop_front();
        }
        if h.reverts.len() < after as usize {
            return Revert::Counted(h.reverts.len());
        }
        let (command, device, peer_node) = describe();
        let contest = Contest {
            object: object.clone(),
            command,
            device,
            peer_node,
            reverts: h.reverts.len(),
            since: wall,
            until: wall + backoff,
        };
        h.until = Some(now + backoff);
        h.contest = Some(contest.clone());
        Revert::Contested(contest)
    }

    /// How long `object` is still left alone, if it is contested. A backoff that has run
    /// out is forgotten here, with the object's whole history.
    pub fn contested(&mut self, object: &ObjectKey, now: Instant) -> Option<Duration> {
        let h = self.objects.get(object)?;
        let until = h.until?;
        if now >= until {
            self.objects.remove(object);
            return None;
        }
        Some(until - now)
    }

    /// Every contest whose backoff runs at `now`; expired ones are forgotten.
    pub fn active(&mut self, now: Instant) -> Vec<Contest> {
        self.objects.retain(|_, h| h.until.is_none_or(|u| now < u));
        self.objects
            .values()
            .filter_map(|h| h.contest.clone())
            .collect()
    }

    /// Forget objects with nothing to remember (no revert in the window, not contested, not
    /// holding a write of ours), so the map stays as small as the fights.
    pub fn prune(&mut self, now: Instant) {
        let window = self.window;
        self.objects.retain(|_, h| {
            h.reverts
                .retain(|t| now.saturating_duration_since(*t) <= window);
            h.until.is_some_and(|u| now < u) || h.holds_ours || !h.reverts.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj() -> ObjectKey {
        ObjectKey("route 10.1.235.128/26 dev vxlan.calico".into())
    }

    fn describe() -> (String, String, Option<String>) {
        (
            "ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink".into(),
            "vxlan.calico".into(),
            Some("k8s03".into()),
        )
    }

    #[test]
    fn three_reverts_in_the_window_contest_the_object_until_the_backoff_ends() {
        let mut c = ContestTracker::new(3, Duration::from_secs(60), Duration::from_secs(600));
        let t = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let o = obj();
        assert!(!c.was_ours(&o));
        for i in 1..=2usize {
            c.applied(&o);
            assert!(c.was_ours(&o));
            let at = t + Duration::from_secs(i as u64);
            assert_eq!(c.reverted(&o, at, wall, describe), Revert::Counted(i));
            assert!(!c.was_ours(&o));
            assert_eq!(c.contested(&o, at), None);
        }
        c.applied(&o);
        let third = t + Duration::from_secs(3);
        let Revert::Contested(contest) = c.reverted(&o, third, wall, describe) else {
            panic!("the third revert must contest the object");
        };
        assert_eq!(contest.reverts, 3);
        assert_eq!(contest.peer_node.as_deref(), Some("k8s03"));
        assert_eq!(contest.until, wall + Duration::from_secs(600));
        assert_eq!(
            c.contested(&o, third + Duration::from_secs(10)),
            Some(Duration::from_secs(590))
        );
        assert_eq!(c.active(third + Duration::from_secs(10)).len(), 1);
        // The backoff ends: the object may be repaired again, from a clean history.
        let later = third + Duration::from_secs(600);
        assert_eq!(c.contested(&o, later), None);
        assert!(c.active(later).is_empty());
        assert_eq!(c.reverted(&o, later, wall, describe), Revert::Counted(1));
    }

    #[test]
    fn reverts_outside_the_window_do_not_add_up() {
        let mut c = ContestTracker::new(2, Duration::from_secs(10), Duration::from_secs(60));
        let t = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let o = obj();
        assert_eq!(c.reverted(&o, t, wall, describe), Revert::Counted(1));
        // Eleven seconds later the first one is out of the window.
        assert_eq!(
            c.reverted(&o, t + Duration::from_secs(11), wall, describe),
            Revert::Counted(1)
        );
        assert!(matches!(
            c.reverted(&o, t + Duration::from_secs(12), wall, describe),
            Revert::Contested(_)
        ));
        // Pruning keeps contested and recent objects, forgets idle ones.
        c.prune(t + Duration::from_secs(13));
        assert_eq!(c.active(t + Duration::from_secs(13)).len(), 1);
        let other = ObjectKey("neigh 10.1.235.133 dev vxlan.calico".into());
        c.reverted(&other, t, wall, describe);
        c.prune(t + Duration::from_secs(30));
        assert!(!c.objects.contains_key(&other));
    }
}
