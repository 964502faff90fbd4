//! Turns successive monotonic [`DropSnapshot`]s into what checks and status need: the drops of
//! the last window per peer ([`DropSummary`], for `traffic-blackholed`/`drops-unexplained`) and
//! per-peer/per-reason/per-device rates ([`DropRates`], for `watchdog status`).
//!
//! Pure: the caller passes the time and the ifindex → device name map (from the netlink
//! observer), so it is unit-tested without a kernel.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{DropSnapshot, NeighTarget, TrafficClass, RETIRED_IFINDEX};
use crate::{
    checks::{DropSummary, PeerDrops},
    model::ObservedState,
};

/// ifindex → name of the observed overlay devices: the `devices` argument of
/// [`DropWindow::observe`], and (its keys) what to pass to `set_watched_devices`.
pub fn device_names(observed: &ObservedState) -> BTreeMap<u32, String> {
    observed
        .devices
        .values()
        .map(|d| (d.link.ifindex, d.link.name.clone()))
        .collect()
}

/// Packets in a window and the rate they were dropped at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rate {
    pub packets: u64,
    pub per_second: f64,
}

impl Rate {
    fn add(&mut self, packets: u64, window: Duration) {
        self.packets += packets;
        self.per_second = per_second(self.packets, window);
    }
}

fn per_second(packets: u64, window: Duration) -> f64 {
    let secs = window.as_secs_f64();
    if secs > 0.0 {
        packets as f64 / secs
    } else {
        0.0
    }
}

/// Data packets dropped toward one peer in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PeerRates {
    /// The device most of them were dropped on.
    pub device: String,
    pub total: Rate,
    /// Kernel drop reason → packets and rate.
    pub reasons: BTreeMap<String, Rate>,
}

/// Everything dropped on one watched device in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceRates {
    /// IPv4 and IPv6 (data) drops, attributed to a peer or not.
    pub data: Rate,
    /// ARP, IPv6 to multicast groups (neighbour discovery) and other control traffic.
    pub control: Rate,
    /// Kernel drop reason → packets and rate, all classes.
    pub reasons: BTreeMap<String, Rate>,
    /// Neighbour entries that went INCOMPLETE / FAILED in the window.
    pub neighbour_incomplete: u64,
    pub neighbour_failed: u64,
    /// Gateways that went FAILED in the window (from the bounded per-gateway map).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_gateways: BTreeMap<IpAddr, u64>,
    /// Without eBPF: the device's own `tx_dropped` in the window (no reason, no peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_dropped: Option<Rate>,
}

/// Rates over the last window, for `watchdog status` (`drops`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DropRates {
    /// Length of the window; zero on the first observation (nothing to compare with).
    pub window_seconds: f64,
    pub peers: BTreeMap<String, PeerRates>,
    pub devices: BTreeMap<String, DeviceRates>,
    /// Drops the programs could not account precisely in the window (map full, unreadable
    /// header): non-zero means the per-peer numbers are a lower bound.
    pub imprecise: u64,
}

/// Remembers the previous snapshot; each [`DropWindow::observe`] reports what changed since.
#[derive(Debug, Clone, Default)]
pub struct DropWindow {
    previous: Option<(DropSnapshot, Instant)>,
}

type DropKey = (u32, String, TrafficClass, Option<String>);
type NeighKey = (u32, Option<IpAddr>, NeighTarget);

impl DropWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the first window at `snapshot` (e.g. right after attaching the programs).
    pub fn starting_at(snapshot: DropSnapshot, now: Instant) -> Self {
        DropWindow {
            previous: Some((snapshot, now)),
        }
    }

    /// Drops since the previous call (or since [`DropWindow::starting_at`]). The first call on
    /// a [`DropWindow::new`] only sets the baseline and reports nothing. `devices` maps
    /// ifindex → device name (unknown ifindexes are named `ifindex <n>`). Counters never go
    /// down within one source; if one does (a transient read race between two maps), the
    /// window counts nothing for it rather than a spurious burst. A new source (programs
    /// reloaded) needs a new window.
    pub fn observe(
        &mut self,
        snapshot: &DropSnapshot,
        now: Instant,
        devices: &BTreeMap<u32, String>,
    ) -> (DropSummary, DropRates) {
        let previous = self.previous.replace((snapshot.clone(), now));
        let Some((before, then)) = previous else {
            return (DropSummary::default(), DropRates::default());
        };
        window(
            &before,
            snapshot,
            now.saturating_duration_since(then),
            devices,
        )
    }
}

fn delta(now: u64, before: u64) -> u64 {
    now.saturating_sub(before)
}

fn device_name(devices: &BTreeMap<u32, String>, ifindex: u32) -> String {
    devices
        .get(&ifindex)
        .cloned()
        .unwrap_or_else(|| format!("ifindex {ifindex}"))
}

/// The pure core: what happened between `before` and `after`, `elapsed` apart.
pub fn window(
    before: &DropSnapshot,
    after: &DropSnapshot,
    elapsed: Duration,
    devices: &BTreeMap<u32, String>,
) -> (DropSummary, DropRates) {
    let old: BTreeMap<DropKey, u64> = before
        .drops
        .iter()
        .map(|d| {
            (
                (d.ifindex, d.reason.clone(), d.class, d.peer.clone()),
                d.packets,
            )
        })
        .collect();
    let mut rates = DropRates {
        window_seconds: elapsed.as_secs_f64(),
        ..Default::default()
    };
    // peer → device → packets, to name the device most drops happened on.
    let mut peer_devices: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for d in after.drops.iter().filter(|d| d.ifindex != RETIRED_IFINDEX) {
        let key = (d.ifindex, d.reason.clone(), d.class, d.peer.clone());
        let n = delta(d.packets, old.get(&key).copied().unwrap_or(0));
        if n == 0 {
            continue;
        }
        let device = device_name(devices, d.ifindex);
        let dev = rates.devices.entry(device.clone()).or_default();
        dev.reasons
            .entry(d.reason.clone())
            .or_default()
            .add(n, elapsed);
        if d.class.is_data() {
            dev.data.add(n, elapsed);
        } else {
            dev.control.add(n, elapsed);
        }
        if let (true, Some(peer)) = (d.class.is_data(), &d.peer) {
            let p = rates.peers.entry(peer.clone()).or_default();
            p.total.add(n, elapsed);
            p.reasons
                .entry(d.reason.clone())
                .or_default()
                .add(n, elapsed);
            *peer_devices
                .entry(peer.clone())
                .or_default()
                .entry(device)
                .or_default() += n;
        }
    }
    for (peer, per_device) in &peer_devices {
        if let (Some(p), Some((device, _))) = (
            rates.peers.get_mut(peer),
            per_device.iter().max_by_key(|(_, n)| **n),
        ) {
            p.device = device.clone();
        }
    }

    let old_neigh: BTreeMap<NeighKey, u64> = before
        .neighbour_transitions
        .iter()
        .map(|n| ((n.ifindex, n.gateway, n.state), n.transitions))
        .collect();
    for n in &after.neighbour_transitions {
        let d = delta(
            n.transitions,
            old_neigh
                .get(&(n.ifindex, n.gateway, n.state))
                .copied()
                .unwrap_or(0),
        );
        if d == 0 {
            continue;
        }
        let dev = rates
            .devices
            .entry(device_name(devices, n.ifindex))
            .or_default();
        match (n.gateway, n.state) {
            (None, NeighTarget::Incomplete) => dev.neighbour_incomplete += d,
            (None, NeighTarget::Failed) => dev.neighbour_failed += d,
            (Some(gw), NeighTarget::Failed) => *dev.failed_gateways.entry(gw).or_default() += d,
            (Some(_), NeighTarget::Incomplete) => {}
        }
    }

    for link in &after.link_stats {
        let previous = before
            .link_stats
            .iter()
            .find(|l| l.ifindex == link.ifindex)
            .map(|l| l.tx_dropped)
            .unwrap_or(link.tx_dropped);
        let d = delta(link.tx_dropped, previous);
        let name = devices
            .get(&link.ifindex)
            .cloned()
            .unwrap_or_else(|| link.name.clone());
        let dev = rates.devices.entry(name).or_default();
        dev.tx_dropped
            .get_or_insert_with(Rate::default)
            .add(d, elapsed);
    }

    let o = (&after.overflow, &before.overflow);
    rates.imprecise = delta(o.0.drops_map_full, o.1.drops_map_full)
        + delta(o.0.header_unreadable, o.1.header_unreadable);

    let summary = DropSummary {
        per_peer: rates
            .peers
            .iter()
            .map(|(peer, p)| {
                (peer.clone(), {
                    let reasons: BTreeMap<String, u64> = p
                        .reasons
                        .iter()
                        .map(|(r, n)| (r.clone(), n.packets))
                        .collect();
                    PeerDrops {
                        device: p.device.clone(),
                        devices: peer_devices
                            .get(peer)
                            .map(|d| d.keys().cloned().collect())
                            .unwrap_or_default(),
                        packets: p.total.packets,
                        unexplained: reasons.clone(),
                        reasons,
                    }
                })
            })
            .collect(),
    };
    (summary, rates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::{DropCount, LinkDropStats, NeighTransitionCount, Overflow};

    fn d(ifindex: u32, reason: &str, class: TrafficClass, peer: Option<&str>, n: u64) -> DropCount {
        DropCount {
            ifindex,
            reason: reason.into(),
            class,
            peer: peer.map(str::to_string),
            packets: n,
        }
    }

    fn neigh(gateway: Option<[u8; 4]>, state: NeighTarget, n: u64) -> NeighTransitionCount {
        NeighTransitionCount {
            ifindex: 4,
            gateway: gateway.map(|g: [u8; 4]| IpAddr::from(g)),
            state,
            transitions: n,
        }
    }

    fn devices() -> BTreeMap<u32, String> {
        BTreeMap::from([(4, "vxlan.calico".to_string())])
    }

    #[test]
    fn first_observation_is_a_baseline() {
        let mut w = DropWindow::new();
        let snap = DropSnapshot {
            drops: vec![d(4, "NEIGH_FAILED", TrafficClass::Ipv4, Some("k8s03"), 100)],
            ..Default::default()
        };
        let (summary, rates) = w.observe(&snap, Instant::now(), &devices());
        assert!(summary.per_peer.is_empty());
        assert_eq!(rates, DropRates::default());
    }

    #[test]
    fn window_reports_deltas_per_peer_and_reason_with_rates() {
        let t0 = Instant::now();
        let before = DropSnapshot {
            drops: vec![
                d(4, "NEIGH_FAILED", TrafficClass::Ipv4, Some("k8s03"), 100),
                d(4, "NO_TX_TARGET", TrafficClass::Arp, None, 7),
                d(4, "NEIGH_FAILED", TrafficClass::Ipv4, Some("k8s02"), 5),
            ],
            neighbour_transitions: vec![
                neigh(None, NeighTarget::Incomplete, 1),
                neigh(None, NeighTarget::Failed, 1),
            ],
            ..Default::default()
        };
        let mut w = DropWindow::starting_at(before, t0);
        let after = DropSnapshot {
            drops: vec![
                d(4, "NEIGH_FAILED", TrafficClass::Ipv4, Some("k8s03"), 140),
                d(4, "NEIGH_QUEUEFULL", TrafficClass::Ipv4, Some("k8s03"), 60),
                d(4, "NO_TX_TARGET", TrafficClass::Arp, None, 9),
                // k8s02 unchanged: not in the window.
                d(4, "NEIGH_FAILED", TrafficClass::Ipv4, Some("k8s02"), 5),
                // IPv4 toward no known block: device data, no peer.
                d(4, "NEIGH_FAILED", TrafficClass::Ipv4, None, 3),
            ],
            neighbour_transitions: vec![
                neigh(None, NeighTarget::Incomplete, 3),
                neigh(None, NeighTarget::Failed, 2),
                neigh(Some([10, 1, 235, 128]), NeighTarget::Failed, 2),
            ],
            overflow: Overflow {
                header_unreadable: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let (summary, rates) = w.observe(&after, t0 + Duration::from_secs(2), &devices());

        assert_eq!(summary.per_peer.len(), 1, "{summary:?}");
        let k3 = &summary.per_peer["k8s03"];
        assert_eq!(k3.device, "vxlan.calico");
        assert_eq!(k3.packets, 100);
        assert_eq!(
            k3.reasons,
            BTreeMap::from([
                ("NEIGH_FAILED".to_string(), 40),
                ("NEIGH_QUEUEFULL".to_string(), 60)
            ])
        );

        assert_eq!(rates.window_seconds, 2.0);
        let p = &rates.peers["k8s03"];
        assert_eq!(p.total.packets, 100);
        assert_eq!(p.total.per_second, 50.0);
        assert_eq!(p.reasons["NEIGH_QUEUEFULL"].per_second, 30.0);
        let dev = &rates.devices["vxlan.calico"];
        assert_eq!(dev.data.packets, 103);
        assert_eq!(dev.control.packets, 2);
        assert_eq!(dev.reasons["NO_TX_TARGET"].packets, 2);
        assert_eq!(dev.reasons["NEIGH_FAILED"].packets, 43);
        assert_eq!(dev.neighbour_incomplete, 2);
        assert_eq!(dev.neighbour_failed, 1);
        assert_eq!(dev.failed_gateways[&IpAddr::from([10, 1, 235, 128])], 2);
        assert_eq!(rates.imprecise, 1);

        // The next window starts where this one ended: nothing new, nothing reported.
        let (summary, rates) = w.observe(&after, t0 + Duration::from_secs(3), &devices());
        assert!(summary.per_peer.is_empty());
        assert!(rates.devices.is_empty() && rates.peers.is_empty());
        assert_eq!(rates.window_seconds, 1.0);
    }

    #[test]
    fn decreasing_counters_count_nothing_and_unknown_devices_get_a_name() {
        let t0 = Instant::now();
        let mut w = DropWindow::starting_at(
            DropSnapshot {
                drops: vec![d(9, "NEIGH_FAILED", TrafficClass::Ipv4, Some("a"), 500)],
                ..Default::default()
            },
            t0,
        );
        let after = DropSnapshot {
            drops: vec![d(9, "NEIGH_FAILED", TrafficClass::Ipv4, Some("a"), 20)],
            ..Default::default()
        };
        let (summary, _) = w.observe(&after, t0 + Duration::from_secs(1), &devices());
        assert!(summary.per_peer.is_empty(), "{summary:?}");
        let more = DropSnapshot {
            drops: vec![d(9, "NEIGH_FAILED", TrafficClass::Ipv4, Some("a"), 26)],
            ..Default::default()
        };
        let (summary, _) = w.observe(&more, t0 + Duration::from_secs(2), &devices());
        assert_eq!(summary.per_peer["a"].packets, 6);
        assert_eq!(summary.per_peer["a"].device, "ifindex 9");
    }

    #[test]
    fn peer_device_is_where_most_drops_happened() {
        let devices = BTreeMap::from([(4, "vxlan.calico".to_string()), (5, "flannel.1".into())]);
        let after = DropSnapshot {
            drops: vec![
                d(4, "NEIGH_FAILED", TrafficClass::Ipv4, Some("a"), 2),
                d(5, "NEIGH_FAILED", TrafficClass::Ipv4, Some("a"), 9),
            ],
            ..Default::default()
        };
        let (summary, _) = window(&DropSnapshot::default(), &after, Duration::ZERO, &devices);
        assert_eq!(summary.per_peer["a"].device, "flannel.1");
        assert_eq!(summary.per_peer["a"].packets, 11);
    }

    #[test]
    fn fallback_link_stats_become_device_tx_dropped_rates() {
        let link = |n| LinkDropStats {
            ifindex: 4,
            name: "vxlan.calico".into(),
            tx_dropped: n,
            rx_dropped: 0,
            tx_errors: 0,
        };
        let before = DropSnapshot {
            link_stats: vec![link(10)],
            ..Default::default()
        };
        let after = DropSnapshot {
            link_stats: vec![link(30)],
            ..Default::default()
        };
        let (summary, rates) = window(&before, &after, Duration::from_secs(4), &devices());
        assert!(summary.per_peer.is_empty(), "no peer without eBPF");
        let tx = rates.devices["vxlan.calico"].tx_dropped.unwrap();
        assert_eq!((tx.packets, tx.per_second), (20, 5.0));
    }
}
