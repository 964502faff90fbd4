//! The snapshot aggregations behind the metrics, the peer blocks taken from the desired state,
//! and the status the API reports.

use super::*;

fn drop(ifindex: u32, reason: &str, class: TrafficClass, peer: Option<&str>, n: u64) -> DropCount {
    DropCount {
        ifindex,
        reason: reason.into(),
        class,
        peer: peer.map(str::to_string),
        packets: n,
    }
}

#[test]
fn snapshot_aggregations_separate_data_from_control() {
    let s = DropSnapshot {
        drops: vec![
            drop(5, "NEIGH_FAILED", TrafficClass::Ipv4, Some("k8s03"), 3),
            drop(5, "NEIGH_QUEUEFULL", TrafficClass::Ipv4, Some("k8s03"), 2),
            drop(5, "NO_TX_TARGET", TrafficClass::Arp, None, 7),
            drop(5, "NEIGH_FAILED", TrafficClass::Ipv4, Some("k8s02"), 1),
            drop(6, "NEIGH_FAILED", TrafficClass::Ipv4, Some("k8s03"), 100),
        ],
        // A peer that left: its drops stay in the device total, in no peer's.
        departed: vec![drop(5, "NEIGH_FAILED", TrafficClass::Ipv4, None, 10)],
        neighbour_transitions: vec![
            NeighTransitionCount {
                ifindex: 5,
                gateway: None,
                state: NeighTarget::Failed,
                transitions: 2,
            },
            NeighTransitionCount {
                ifindex: 5,
                gateway: Some(IpAddr::from([10, 9, 0, 0])),
                state: NeighTarget::Failed,
                transitions: 2,
            },
        ],
        overflow: Overflow::default(),
        link_stats: Vec::new(),
    };
    let k3 = s.data_drops_to_peer("k8s03");
    assert_eq!(k3.get("NEIGH_FAILED"), Some(&103));
    assert_eq!(k3.get("NEIGH_QUEUEFULL"), Some(&2));
    assert_eq!(k3.get("NO_TX_TARGET"), None);
    let dev5 = s.drops_by_reason(5);
    assert_eq!(dev5.get("NO_TX_TARGET"), Some(&7));
    assert_eq!(dev5.get("NEIGH_FAILED"), Some(&14));
    assert_eq!(s.neighbour_total(5, NeighTarget::Failed), 2);
    assert_eq!(s.neighbour_total(5, NeighTarget::Incomplete), 0);
    assert_eq!(
        s.neighbour_gateway(5, IpAddr::from([10, 9, 0, 0]), NeighTarget::Failed),
        2
    );
}

#[test]
fn peer_blocks_cover_remote_blocks_and_borrowed_in_both_families() {
    use crate::model::{v4, MacAddr, PeerNode};
    let node = |name: &str, blocks: &[&str], borrowed: &[&str]| PeerNode {
        name: name.into(),
        node_ip: v4(192, 168, 0, 1),
        vtep_ip: v4(10, 0, 0, 1),
        vtep_mac: MacAddr::default(),
        vtep_mac_derived: true,
        blocks: blocks.iter().map(|b| b.parse().unwrap()).collect(),
        borrowed: borrowed.iter().map(|b| b.parse().unwrap()).collect(),
        ipv6: None,
    };
    let mut d = DesiredState {
        local_node: "me".into(),
        ..Default::default()
    };
    for n in [
        node("me", &["10.1.0.0/26"], &[]),
        node("k8s03", &["10.1.235.128/26", "fd00::/64"], &["10.1.0.7/32"]),
    ] {
        d.nodes.insert(n.name.clone(), n);
    }
    let blocks = peer_blocks_from_desired(&d);
    assert_eq!(
        blocks,
        vec![
            ("k8s03".to_string(), "10.1.235.128/26".parse().unwrap()),
            ("k8s03".to_string(), "fd00::/64".parse().unwrap()),
            ("k8s03".to_string(), "10.1.0.7/32".parse().unwrap()),
        ],
        "both families go to the tries; the local node's blocks do not"
    );
}

#[test]
fn status_serializes_reason_for_the_status_api() {
    let s = EbpfStatus::unavailable(Missing::Object, "built without bpf-linker");
    assert_eq!(s.state, EbpfState::NotCompiledIn);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["state"], "not-compiled-in");
    assert_eq!(json["missing"], "object");
    assert!(!s.counting_drops());
}
