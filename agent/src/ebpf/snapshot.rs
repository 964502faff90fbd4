//! Raw map contents → named counters. Pure, unit-tested without a kernel; the loader reads the
//! maps and hands their contents here.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
};

use agent_ebpf::{NeighKey, NUD_FAILED, NUD_INCOMPLETE, REASON_OVERFLOW_SLOT};

use super::{
    offsets::DropReasons, peers::PeerIds, DropCount, DropSnapshot, NeighTarget,
    NeighTransitionCount, Overflow, TrafficClass,
};

/// Peer id, in user space only, of counts harvested from peers that left: reported in
/// [`DropSnapshot::departed`], never in a peer's totals.
pub(crate) const PEER_DEPARTED: u32 = u32::MAX;

/// One drop counter as user space reports it: per device (ifindex), reason, class and peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RawDrop {
    pub ifindex: u32,
    pub reason: u32,
    pub class: u32,
    pub peer: u32,
}

/// The device counters' reason slot for a raw reason: subsystem-encoded (large) reasons share
/// the last one, as in the programs.
pub(crate) fn reason_slot(reason: u32) -> u32 {
    reason.min(REASON_OVERFLOW_SLOT)
}

/// Slots to free (their device is no longer wanted) and ifindexes to add.
pub(crate) fn diff_slots(slots: &[u32], desired: &BTreeSet<u32>) -> (Vec<u32>, Vec<u32>) {
    let remove = slots
        .iter()
        .enumerate()
        .filter(|(_, ifindex)| **ifindex != 0 && !desired.contains(ifindex))
        .map(|(slot, _)| slot as u32)
        .collect();
    let add = desired
        .iter()
        .filter(|ifindex| !slots.contains(ifindex))
        .copied()
        .collect();
    (remove, add)
}

/// A [`NeighKey::addr`] as an address: IPv4 for an IPv4-mapped one, None for the per-device
/// total (all zero).
fn neighbour_address(words: [u32; 4]) -> Option<IpAddr> {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(bytes);
    if v6.is_unspecified() {
        return None;
    }
    Some(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

/// Turns raw map contents into named counters. Pure, so it is unit-tested without a kernel.
pub(crate) fn build_snapshot(
    reasons: &DropReasons,
    peers: &PeerIds,
    raw_drops: Vec<(RawDrop, u64)>,
    raw_neigh: Vec<(NeighKey, u64)>,
    overflow: Overflow,
) -> DropSnapshot {
    let (raw_departed, raw_drops): (Vec<_>, Vec<_>) = raw_drops
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .partition(|(k, _)| k.peer == PEER_DEPARTED);
    let name_reason = |reason: u32| {
        if reason == REASON_OVERFLOW_SLOT && !reasons.contains(reason) {
            "OTHER_SUBSYSTEM".to_string()
        } else {
            reasons.name(reason)
        }
    };
    let departed = raw_departed
        .into_iter()
        .map(|(k, packets)| DropCount {
            ifindex: k.ifindex,
            reason: name_reason(k.reason),
            class: TrafficClass::from_raw(k.class),
            peer: None,
            packets,
        })
        .collect();
    let mut drops: Vec<DropCount> = raw_drops
        .into_iter()
        .map(|(k, packets)| DropCount {
            ifindex: k.ifindex,
            reason: name_reason(k.reason),
            class: TrafficClass::from_raw(k.class),
            peer: peers.name(k.peer).map(str::to_string),
            packets,
        })
        .collect();
    drops.sort_by(|a, b| {
        (a.ifindex, &a.reason, a.class, &a.peer).cmp(&(b.ifindex, &b.reason, b.class, &b.peer))
    });
    let mut neighbour_transitions: Vec<NeighTransitionCount> = raw_neigh
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .filter_map(|(k, transitions)| {
            let state = match k.state {
                NUD_INCOMPLETE => NeighTarget::Incomplete,
                NUD_FAILED => NeighTarget::Failed,
                _ => return None,
            };
            Some(NeighTransitionCount {
                ifindex: k.ifindex,
                gateway: neighbour_address(k.addr),
                state,
                transitions,
            })
        })
        .collect();
    neighbour_transitions.sort_by_key(|n| (n.ifindex, n.gateway, n.state));
    DropSnapshot {
        drops,
        departed,
        neighbour_transitions,
        overflow,
        link_stats: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use agent_ebpf::{
        device_drop_index, CLASSES, CLASS_ARP, CLASS_IPV4, REASON_SLOTS, WATCHED_DEVICES_CAPACITY,
    };

    use super::*;

    #[test]
    fn device_slots_are_reused_and_kept_stable() {
        let slots = [3, 5, 0, 0, 0, 0, 0, 0];
        let want: BTreeSet<u32> = [5, 9].into();
        // ifindex 3 leaves slot 0; 5 keeps slot 1; 9 is new.
        assert_eq!(diff_slots(&slots, &want), (vec![0], vec![9]));
        assert_eq!(diff_slots(&slots, &[3, 5].into()), (vec![], vec![]));
    }

    #[test]
    fn device_drop_index_is_dense_and_clamps_reasons() {
        assert_eq!(device_drop_index(0, 0, 0), 0);
        assert_eq!(device_drop_index(0, 1, 58), REASON_SLOTS + 58);
        assert_eq!(
            device_drop_index(0, 0, 0x10000),
            device_drop_index(0, 0, REASON_OVERFLOW_SLOT)
        );
        assert_eq!(
            device_drop_index(WATCHED_DEVICES_CAPACITY - 1, CLASSES - 1, u32::MAX),
            agent_ebpf::DEVICE_DROP_SLOTS - 1
        );
        assert_eq!(reason_slot(300), REASON_OVERFLOW_SLOT);
    }

    #[test]
    fn snapshot_names_reasons_classes_peers_and_gateways() {
        let reasons = DropReasons::from_values([
            ("SKB_DROP_REASON_NEIGH_FAILED".to_string(), 73),
            ("SKB_DROP_REASON_NO_TX_TARGET".to_string(), 90),
        ]);
        let mut peers = PeerIds::default();
        let id = peers.id("k8s03");
        let snap = build_snapshot(
            &reasons,
            &peers,
            vec![
                (
                    RawDrop {
                        ifindex: 4,
                        reason: 90,
                        class: CLASS_ARP,
                        peer: 0,
                    },
                    6,
                ),
                (
                    RawDrop {
                        ifindex: 4,
                        reason: 73,
                        class: CLASS_IPV4,
                        peer: id,
                    },
                    3,
                ),
                (
                    RawDrop {
                        ifindex: 4,
                        reason: 73,
                        class: CLASS_IPV4,
                        peer: 0,
                    },
                    0,
                ),
            ],
            vec![
                (
                    NeighKey {
                        ifindex: 4,
                        state: NUD_FAILED,
                        addr: agent_ebpf::ipv4_mapped(u32::from_ne_bytes([10, 9, 0, 0])),
                    },
                    2,
                ),
                (
                    NeighKey {
                        ifindex: 7,
                        state: NUD_FAILED,
                        addr: v6_words("fd10:3::1"),
                    },
                    4,
                ),
                (
                    NeighKey {
                        ifindex: 4,
                        state: NUD_INCOMPLETE,
                        addr: [0; 4],
                    },
                    3,
                ),
            ],
            Overflow::default(),
        );
        assert_eq!(snap.drops.len(), 2, "zero counters are dropped");
        assert_eq!(
            snap.data_drops_to_peer("k8s03").get("NEIGH_FAILED"),
            Some(&3)
        );
        let arp = snap
            .drops
            .iter()
            .find(|d| d.class == TrafficClass::Arp)
            .unwrap();
        assert_eq!(arp.reason, "NO_TX_TARGET");
        assert_eq!(arp.peer, None);
        assert_eq!(
            snap.neighbour_gateway(4, "10.9.0.0".parse().unwrap(), NeighTarget::Failed),
            2
        );
        assert_eq!(
            snap.neighbour_gateway(7, "fd10:3::1".parse().unwrap(), NeighTarget::Failed),
            4,
            "an NDP gateway keeps its IPv6 address"
        );
        assert_eq!(snap.neighbour_total(4, NeighTarget::Incomplete), 3);
    }

    /// An IPv6 address as the kernel's `[u32; 4]` (memory order = address bytes).
    fn v6_words(addr: &str) -> [u32; 4] {
        let bytes = addr.parse::<Ipv6Addr>().unwrap().octets();
        let mut words = [0u32; 4];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *word = u32::from_ne_bytes(chunk.try_into().unwrap());
        }
        words
    }

    #[test]
    fn ipv4_mapped_neighbour_keys_read_back_as_ipv4() {
        let key = agent_ebpf::ipv4_mapped(u32::from_ne_bytes([10, 1, 235, 128]));
        assert_eq!(
            neighbour_address(key),
            Some("10.1.235.128".parse().unwrap())
        );
        assert_eq!(neighbour_address([0; 4]), None);
        assert_eq!(
            neighbour_address(v6_words("fd10:3::1")),
            Some("fd10:3::1".parse().unwrap())
        );
    }
}
