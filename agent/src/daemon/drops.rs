//! eBPF counters are monotonic since load; the checks want drops in a recent window. The window
//! keeps a short history of per-peer totals and reports what rose within it, so a peer whose
//! traffic is being dropped now is evidence and one that was dropped an hour ago is not.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    checks::{DropSummary, ExplainedDrops, PeerDrops},
    ebpf::{DropSnapshot, RETIRED_IFINDEX},
};

/// How far back "recent" drops reach by default.
pub const DEFAULT_DROP_WINDOW: Duration = Duration::from_secs(10);

/// Cumulative data drops toward one peer: device → reason → packets.
type PeerTotals = BTreeMap<String, BTreeMap<(String, String), u64>>;

/// Per-peer data drops in the last `window`, from successive snapshots.
#[derive(Debug)]
pub struct RecentDrops {
    window: Duration,
    history: VecDeque<(Instant, PeerTotals)>,
    /// Per peer, the totals up to which a finding explained the drops.
    acknowledged: PeerTotals,
}

impl RecentDrops {
    pub fn new(window: Duration) -> Self {
        RecentDrops {
            window,
            history: VecDeque::new(),
            acknowledged: BTreeMap::new(),
        }
    }

    /// Marks every drop toward `peer` counted so far as explained: only drops that come after
    /// this can be `unexplained`.
    pub fn acknowledge(&mut self, peer: &str) {
        if let Some(totals) = self.history.back().and_then(|(_, t)| t.get(peer)) {
            self.acknowledged.insert(peer.to_string(), totals.clone());
        }
    }

    /// [`Self::acknowledge`] for each peer in `explained`, walking whichever of it and the
    /// peers with drops is smaller (after a mass reconvergence every peer is explained).
    pub fn acknowledge_explained(&mut self, explained: &ExplainedDrops) {
        let Some((_, latest)) = self.history.back() else {
            return;
        };
        if explained.len() < latest.len() {
            for peer in explained.peers() {
                if let Some(totals) = latest.get(peer) {
                    self.acknowledged.insert(peer.to_string(), totals.clone());
                }
            }
        } else {
            for (peer, totals) in latest {
                if explained.contains(peer) {
                    self.acknowledged.insert(peer.clone(), totals.clone());
                }
            }
        }
    }

    /// Record a snapshot taken at `now`; `device_of` names a watched ifindex. Returns the data
    /// drops toward each peer since the oldest sample still inside the window (the first
    /// snapshot is the baseline: drops from before the daemon started are not recent).
    pub fn observe(
        &mut self,
        now: Instant,
        snapshot: &DropSnapshot,
        device_of: impl Fn(u32) -> Option<String>,
    ) -> DropSummary {
        let mut totals: PeerTotals = BTreeMap::new();
        // Retired devices' counts moved there when the device went: not new drops.
        for d in snapshot
            .drops
            .iter()
            .filter(|d| d.ifindex != RETIRED_IFINDEX)
        {
            let Some(peer) = d.peer.as_ref().filter(|_| d.class.is_data()) else {
                continue;
            };
            let device = device_of(d.ifindex).unwrap_or_else(|| format!("ifindex {}", d.ifindex));
            *totals
                .entry(peer.clone())
                .or_default()
                .entry((device, d.reason.clone()))
                .or_default() += d.packets;
        }
        // Keep one sample at or before the window's start as the baseline.
        while self.history.len() > 1 && now.duration_since(self.history[1].0) >= self.window {
            self.history.pop_front();
        }
        let baseline = self.history.front().map(|(_, t)| t);
        let mut summary = DropSummary::default();
        for (peer, now_totals) in &totals {
            let mut by_device: BTreeMap<&str, u64> = BTreeMap::new();
            let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
            let mut unexplained: BTreeMap<String, u64> = BTreeMap::new();
            let mut packets = 0;
            for ((device, reason), n) in now_totals {
                let key = (device.clone(), reason.clone());
                let acknowledged = self
                    .acknowledged
                    .get(peer)
                    .and_then(|m| m.get(&key))
                    .copied()
                    // A counter below its acknowledged value was reset (programs reloaded).
                    .filter(|a| a <= n)
                    .unwrap_or(0);
                let before = match baseline {
                    Some(b) => b
                        .get(peer)
                        .and_then(|m| m.get(&(device.clone(), reason.clone())))
                        .copied()
                        .unwrap_or(0),
                    None => *n,
                };
                let delta = n.saturating_sub(before);
                if delta > 0 {
                    *reasons.entry(reason.clone()).or_default() += delta;
                    *by_device.entry(device).or_default() += delta;
                    packets += delta;
                }
                let new = n.saturating_sub(before.max(acknowledged));
                if new > 0 {
                    *unexplained.entry(reason.clone()).or_default() += new;
                }
            }
            if packets > 0 {
                let device = by_device
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(d, _)| d.to_string())
                    .unwrap_or_default();
                summary.per_peer.insert(
                    peer.clone(),
                    PeerDrops {
                        device,
                        devices: by_device.keys().map(|d| d.to_string()).collect(),
                        packets,
                        reasons,
                        unexplained,
                    },
                );
            }
        }
        // A peer without counters any more (gone from the datastore, counters retired) has
        // nothing left to acknowledge: forget it, so node churn cannot grow this map.
        self.acknowledged
            .retain(|peer, _| totals.contains_key(peer));
        self.history.push_back((now, totals));
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::{DropCount, TrafficClass};

    fn snap(entries: &[(&str, TrafficClass, Option<&str>, u64)]) -> DropSnapshot {
        DropSnapshot {
            drops: entries
                .iter()
                .map(|(reason, class, peer, n)| DropCount {
                    ifindex: 7,
                    reason: reason.to_string(),
                    class: *class,
                    peer: peer.map(str::to_string),
                    packets: *n,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn dev(i: u32) -> Option<String> {
        (i == 7).then(|| "vxlan.calico".to_string())
    }

    #[test]
    fn explained_peers_are_acknowledged_whichever_set_is_smaller() {
        let t0 = Instant::now();
        let ipv4 = TrafficClass::Ipv4;
        let fault = snap(&[
            ("NEIGH_FAILED", ipv4, Some("k8s02"), 40),
            ("NEIGH_FAILED", ipv4, Some("k8s03"), 90),
        ]);
        let few = {
            let mut e = ExplainedDrops::new(Duration::from_secs(10));
            e.note("k8s03", std::time::SystemTime::now());
            e
        };
        let many = {
            let mut e = ExplainedDrops::new(Duration::from_secs(10));
            for i in 0..100 {
                e.note(&format!("node-{i}"), std::time::SystemTime::now());
            }
            e.note("k8s03", std::time::SystemTime::now());
            e
        };
        for explained in [few, many] {
            let mut w = RecentDrops::new(Duration::from_secs(10));
            w.observe(t0, &snap(&[]), dev);
            w.observe(t0 + Duration::from_millis(100), &fault, dev);
            w.acknowledge_explained(&explained);
            let s = w.observe(t0 + Duration::from_millis(200), &fault, dev);
            assert!(s.per_peer["k8s03"].unexplained.is_empty(), "{s:?}");
            assert_eq!(s.per_peer["k8s02"].unexplained["NEIGH_FAILED"], 40);
        }
    }

    #[test]
    fn node_churn_does_not_grow_the_acknowledgements() {
        let t0 = Instant::now();
        let mut w = RecentDrops::new(Duration::from_secs(10));
        for round in 0..5u64 {
            let names: Vec<String> = (0..1000).map(|i| format!("node-{round}-{i}")).collect();
            let entries: Vec<(&str, TrafficClass, Option<&str>, u64)> = names
                .iter()
                .map(|n| ("NEIGH_FAILED", TrafficClass::Ipv4, Some(n.as_str()), 5))
                .collect();
            w.observe(t0 + Duration::from_secs(round * 2), &snap(&entries), dev);
            for n in &names {
                w.acknowledge(n);
            }
            assert_eq!(w.acknowledged.len(), 1000, "round {round}");
        }
        // Those peers left the cluster; their counters are gone from the snapshot.
        w.observe(t0 + Duration::from_secs(20), &snap(&[]), dev);
        assert!(w.acknowledged.is_empty());
    }

    #[test]
    fn reports_only_recent_data_drops() {
        let t0 = Instant::now();
        let mut w = RecentDrops::new(Duration::from_secs(10));
        let ipv4 = TrafficClass::Ipv4;
        // Drops from before the daemon started are the baseline, not evidence.
        let s = w.observe(t0, &snap(&[("NEIGH_FAILED", ipv4, Some("k8s03"), 50)]), dev);
        assert!(s.per_peer.is_empty());

        let s = w.observe(
            t0 + Duration::from_secs(1),
            &snap(&[
                ("NEIGH_FAILED", ipv4, Some("k8s03"), 53),
                ("NEIGH_QUEUEFULL", ipv4, Some("k8s03"), 2),
                // ARP solicits are control traffic, never data loss.
                ("NO_TX_TARGET", TrafficClass::Arp, Some("k8s03"), 9),
                ("NEIGH_FAILED", ipv4, None, 4),
            ]),
            dev,
        );
        let p = &s.per_peer["k8s03"];
        assert_eq!(p.packets, 5);
        assert_eq!(p.device, "vxlan.calico");
        assert_eq!(p.reasons["NEIGH_FAILED"], 3);
        assert_eq!(p.reasons["NEIGH_QUEUEFULL"], 2);
        assert_eq!(s.per_peer.len(), 1);

        // Still inside the window: still reported.
        let same = snap(&[
            ("NEIGH_FAILED", ipv4, Some("k8s03"), 53),
            ("NEIGH_QUEUEFULL", ipv4, Some("k8s03"), 2),
        ]);
        let s = w.observe(t0 + Duration::from_secs(5), &same, dev);
        assert_eq!(s.per_peer["k8s03"].packets, 5);
        // The window moved past the rise: nothing recent.
        let s = w.observe(t0 + Duration::from_millis(10_500), &same, dev);
        assert_eq!(
            s.per_peer["k8s03"].packets, 5,
            "baseline is t0 until t1 leaves"
        );
        let s = w.observe(t0 + Duration::from_secs(12), &same, dev);
        assert!(s.per_peer.is_empty(), "{s:?}");
    }

    #[test]
    fn acknowledged_drops_are_never_unexplained() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut w = RecentDrops::new(Duration::from_secs(10));
        let ipv4 = TrafficClass::Ipv4;
        w.observe(at(0), &snap(&[]), dev);
        // A fault drops 90 packets; a finding explains them, so the daemon acknowledges.
        let fault = snap(&[("NEIGH_FAILED", ipv4, Some("k8s03"), 90)]);
        let s = w.observe(at(100), &fault, dev);
        assert_eq!(s.per_peer["k8s03"].unexplained["NEIGH_FAILED"], 90);
        w.acknowledge("k8s03");
        // Repaired: the 90 are still in the window, but none of them is unexplained.
        let s = w.observe(at(200), &fault, dev);
        assert_eq!(s.per_peer["k8s03"].packets, 90);
        assert!(s.per_peer["k8s03"].unexplained.is_empty(), "{s:?}");
        // New drops after the acknowledgement are.
        let more = snap(&[
            ("NEIGH_FAILED", ipv4, Some("k8s03"), 95),
            ("NO_TX_TARGET", ipv4, Some("k8s03"), 2),
        ]);
        let s = w.observe(at(300), &more, dev);
        assert_eq!(s.per_peer["k8s03"].packets, 97);
        assert_eq!(
            s.per_peer["k8s03"].unexplained,
            BTreeMap::from([("NEIGH_FAILED".into(), 5), ("NO_TX_TARGET".into(), 2)])
        );
        // Counters reset (programs reloaded): an old acknowledgement must not hide new drops.
        let mut w = RecentDrops::new(Duration::from_secs(10));
        w.observe(at(0), &snap(&[]), dev);
        w.observe(at(100), &fault, dev);
        w.acknowledge("k8s03");
        let mut w2 = w;
        w2.history.clear();
        w2.observe(at(200), &snap(&[]), dev);
        let s = w2.observe(
            at(300),
            &snap(&[("NEIGH_FAILED", ipv4, Some("k8s03"), 4)]),
            dev,
        );
        assert_eq!(s.per_peer["k8s03"].unexplained["NEIGH_FAILED"], 4);
    }
}
