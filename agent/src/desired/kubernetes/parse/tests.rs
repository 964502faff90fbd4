use serde_json::json;

use super::*;
use crate::model::v4;

fn lite(v: Value) -> LiteObject {
    serde_json::from_value(v).unwrap()
}

fn calico_node(name: &str, vtep: &str, addr: &str) -> (String, NodeInfo) {
    let obj = lite(json!({"metadata": {"name": name, "annotations": {
        ANN_CALICO_VTEP: vtep, ANN_CALICO_ADDRESS: addr}}}));
    (name.to_string(), NodeInfo::from_object(&obj))
}

fn block(name: &str, spec: Value) -> (String, BlockInfo) {
    let obj = lite(json!({"metadata": {"name": name}, "spec": spec}));
    (name.to_string(), BlockInfo::from_object(&obj))
}

fn build(
    nodes: Vec<(String, NodeInfo)>,
    blocks: Vec<(String, BlockInfo)>,
    affs: Vec<(String, AffinityInfo)>,
) -> DesiredState {
    let mut d = build_calico_k8s01(
        nodes.into_iter().collect(),
        blocks.into_iter().collect(),
        affs.into_iter().collect(),
    );
    // These fixtures leave the local node out; that problem is not what they test.
    d.problems.retain(|p| p.field != "nodes");
    d
}

fn build_calico_k8s01(
    nodes: BTreeMap<String, NodeInfo>,
    blocks: BTreeMap<String, BlockInfo>,
    affinities: BTreeMap<String, AffinityInfo>,
) -> DesiredState {
    build_desired(
        KubeProfile::Calico,
        "k8s01",
        &CacheView::new(&nodes, &blocks, &affinities),
    )
}

#[test]
fn managed_fields_and_status_are_not_kept() {
    let obj = lite(
        json!({"metadata": {"name": "n", "managedFields": [{"manager": "x"}]},
        "status": {"images": [{"names": ["a"]}]}, "spec": {"podCIDR": "10.244.1.0/24"}}),
    );
    assert!(obj.metadata.managed_fields.is_none());
    assert_eq!(
        NodeInfo::from_object(&obj).pod_cidr.as_deref(),
        Some("10.244.1.0/24")
    );
}

/// (name, VTEP, node IP, blocks) of one node of a test cluster.
type TestNode<'a> = (&'a str, &'a str, &'a str, &'a [&'a str]);

/// The same cluster through the file and through Kubernetes: which nodes are accepted,
/// which are rejected, and which blocks are unverifiable must not depend on the source.
fn through_both(nodes: &[(&str, &str, &str, &[&str])]) -> (DesiredState, DesiredState) {
    let mut yaml = String::from("nodes:\n");
    let mut kube_nodes = vec![calico_node("k8s01", "10.1.1.0", "192.168.77.1/24")];
    let mut kube_blocks = vec![block(
        "local",
        json!({"cidr": "10.1.1.0/26", "affinity": "host:k8s01"}),
    )];
    yaml.push_str(
        "  - {name: k8s01, node_ip: 192.168.77.1, vtep_ip: 10.1.1.0, blocks: [10.1.1.0/26]}\n",
    );
    for (name, vtep, node_ip, blocks) in nodes {
        yaml.push_str(&format!(
            "  - {{name: {name}, node_ip: {node_ip}, vtep_ip: {vtep}, blocks: [{}]}}\n",
            blocks.join(", ")
        ));
        kube_nodes.push(calico_node(name, vtep, &format!("{node_ip}/24")));
        for (i, cidr) in blocks.iter().enumerate() {
            kube_blocks.push(block(
                &format!("{name}-{i}"),
                json!({"cidr": cidr, "affinity": format!("host:{name}")}),
            ));
        }
    }
    let file = crate::desired::file::parse(
        &yaml,
        crate::desired::file::FileFormat::Yaml,
        std::path::Path::new("/etc/nodes.yaml"),
        "k8s01",
    )
    .expect("valid YAML");
    let kube = build_calico_k8s01(
        kube_nodes.into_iter().collect(),
        kube_blocks.into_iter().collect(),
        BTreeMap::new(),
    );
    (file, kube)
}

fn verdict(d: &DesiredState) -> (Vec<String>, Vec<String>, Vec<IpNet>) {
    let accepted = d.nodes.keys().cloned().collect();
    let mut rejected: Vec<String> = d.problems.iter().filter_map(|p| p.node.clone()).collect();
    rejected.sort();
    rejected.dedup();
    (accepted, rejected, d.unverifiable.clone())
}

#[test]
fn bad_clusters_give_the_same_verdict_through_file_and_kubernetes() {
    let cases: [&[TestNode]; 4] = [
        // Two nodes annotated with the same VTEP IP.
        &[
            ("k8s02", "10.1.2.0", "192.168.77.2", &["10.1.2.0/26"]),
            ("k8s03", "10.1.2.0", "192.168.77.3", &["10.1.3.0/26"]),
        ],
        // A block CIDR with host bits.
        &[("k8s02", "10.1.2.0", "192.168.77.2", &["10.1.2.5/26"])],
        // Two nodes claiming the same block.
        &[
            ("k8s02", "10.1.2.0", "192.168.77.2", &["10.1.2.0/26"]),
            (
                "k8s03",
                "10.1.3.0",
                "192.168.77.3",
                &["10.1.2.0/26", "10.1.3.0/26"],
            ),
        ],
        // A loopback VTEP.
        &[("k8s02", "127.0.0.1", "192.168.77.2", &["10.1.2.0/26"])],
    ];
    for (i, case) in cases.iter().enumerate() {
        let (file, kube) = through_both(case);
        assert!(
            !file.problems.is_empty(),
            "case {i}: the file path found nothing: {file:?}"
        );
        assert_eq!(
            verdict(&file),
            verdict(&kube),
            "case {i}:\nfile: {:?}\nkube: {:?}",
            file.problems,
            kube.problems
        );
    }
}

#[test]
fn calico_node_with_blocks_borrowed_and_derived_mac() {
    let d = build(
        vec![
            calico_node("k8s01", "10.1.73.0", "192.168.77.1/24"),
            calico_node("k8s03", "10.1.235.133", "192.168.77.3/24"),
        ],
        vec![
            block(
                "10-1-235-128-26",
                json!({"cidr": "10.1.235.128/26", "affinity": "host:k8s03", "deleted": false,
                "allocations": [0, null, 1, null],
                "attributes": [
                    {"handle_id": "vxlan-tunnel-addr-k8s03", "secondary": {"node": "k8s03"}},
                    {"handle_id": "k8s-pod-network.x", "secondary": {"node": "k8s01", "pod": "p"}}
                ]}),
            ),
            block(
                "10-1-236-0-26",
                json!({"cidr": "10.1.236.0/26", "affinity": "host:k8s03", "deleted": true}),
            ),
        ],
        vec![],
    );
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let k3 = &d.nodes["k8s03"];
    assert_eq!(k3.vtep_ip, v4(10, 1, 235, 133));
    assert_eq!(k3.node_ip, v4(192, 168, 77, 3));
    assert_eq!(k3.vtep_mac, MacAddr::derive_like_felix("k8s03"));
    assert!(k3.vtep_mac_derived);
    assert_eq!(k3.blocks, vec!["10.1.235.128/26".parse::<IpNet>().unwrap()]);
    let k1 = &d.nodes["k8s01"];
    assert_eq!(
        k1.borrowed,
        vec!["10.1.235.130/32".parse::<IpNet>().unwrap()]
    );
    assert_eq!(d.peers().count(), 1);
}

#[test]
fn malformed_annotations_become_problems_and_skip_the_node() {
    let mut bad_mac = calico_node("k8s04", "10.1.4.0", "192.168.77.4");
    bad_mac.1.calico_mac = Some("not-a-mac".into());
    let d = build(
        vec![
            calico_node("k8s02", "10.1.2.300", "192.168.77.2/24"),
            calico_node("k8s03", "10.1.3.0", "garbage"),
            bad_mac,
            calico_node("k8s05", "10.1.5.0", "192.168.77.5/24"),
        ],
        vec![block(
            "bad",
            json!({"cidr": "10.1.999.0/26", "affinity": "host:k8s05"}),
        )],
        vec![],
    );
    assert_eq!(d.nodes.keys().collect::<Vec<_>>(), vec!["k8s05"]);
    let fields: Vec<(&str, &str)> = d
        .problems
        .iter()
        .map(|p| (p.object.as_str(), p.field.as_str()))
        .collect();
    assert!(fields.contains(&("IPAMBlock/bad", "spec.cidr")));
    assert!(fields.contains(&(
        "Node/k8s02",
        "metadata.annotations[projectcalico.org/IPv4VXLANTunnelAddr]"
    )));
    assert!(fields.contains(&(
        "Node/k8s03",
        "metadata.annotations[projectcalico.org/IPv4Address]"
    )));
    assert!(fields.contains(&(
        "Node/k8s04",
        "metadata.annotations[projectcalico.org/VXLANTunnelMACAddr]"
    )));
}

#[test]
fn node_without_calico_is_skipped_quietly_unless_it_owns_blocks() {
    let plain = ("plain".to_string(), NodeInfo::default());
    let owner = ("owner".to_string(), NodeInfo::default());
    let d = build(
        vec![plain, owner],
        vec![block(
            "b",
            json!({"cidr": "10.1.9.0/26", "affinity": "host:owner"}),
        )],
        vec![],
    );
    assert!(d.nodes.is_empty());
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.problems[0].object, "Node/owner");
}

fn cidr(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn pool(name: &str, spec: Value) -> (String, PoolInfo) {
    let obj = lite(json!({"metadata": {"name": name}, "spec": spec}));
    (name.to_string(), PoolInfo::from_object(&obj))
}

fn build_with_pools(
    nodes: Vec<(String, NodeInfo)>,
    blocks: Vec<(String, BlockInfo)>,
    pools: Option<Vec<(String, PoolInfo)>>,
) -> DesiredState {
    let (nodes, blocks, affs): (BTreeMap<_, _>, BTreeMap<_, _>, BTreeMap<_, _>) = (
        nodes.into_iter().collect(),
        blocks.into_iter().collect(),
        BTreeMap::new(),
    );
    let pools: Option<BTreeMap<String, PoolInfo>> = pools.map(|p| p.into_iter().collect());
    build_desired(
        KubeProfile::Calico,
        "k8s01",
        &CacheView {
            pools: pools.as_ref(),
            ..CacheView::new(&nodes, &blocks, &affs)
        },
    )
}

fn addressed(name: &str, addr: &str) -> (String, NodeInfo) {
    let obj = lite(json!({"metadata": {"name": name, "annotations": {ANN_CALICO_ADDRESS: addr}}}));
    (name.to_string(), NodeInfo::from_object(&obj))
}

/// A node without a VTEP that owns only blocks of IPIP pools is an IPIP node, not a broken
/// VXLAN one; only with the pools known can a missing VTEP on a VXLAN block be called out.
#[test]
fn a_node_without_a_vtep_is_judged_by_its_pools() {
    let nodes = || {
        vec![
            calico_node("k8s01", "10.1.10.0", "192.168.77.1/24"),
            addressed("ipip1", "192.168.77.9/24"),
        ]
    };
    let blocks = || {
        vec![
            block(
                "l",
                json!({"cidr": "10.1.10.0/26", "affinity": "host:k8s01"}),
            ),
            block(
                "i",
                json!({"cidr": "10.9.0.0/26", "affinity": "host:ipip1"}),
            ),
        ]
    };
    let pools = |ipip_mode: &str| {
        Some(vec![
            pool("vx", json!({"cidr": "10.1.0.0/16", "vxlanMode": "Always"})),
            pool("ip", json!({"cidr": "10.9.0.0/16", "vxlanMode": ipip_mode})),
        ])
    };
    for d in [
        build_with_pools(nodes(), blocks(), None),
        build_with_pools(nodes(), blocks(), pools("Never")),
    ] {
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(d.non_vxlan["ipip1"].blocks, [cidr("10.9.0.0/26")]);
        assert_eq!(d.non_vxlan["ipip1"].node_ip.to_string(), "192.168.77.9");
    }
    // Its block is in a VXLAN pool: without a VTEP no node can reach it.
    let d = build_with_pools(nodes(), blocks(), pools("Always"));
    assert!(d.non_vxlan.is_empty());
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert_eq!(d.problems[0].object, "Node/ipip1");
    assert!(
        d.problems[0].message.contains("VXLAN pools"),
        "{:?}",
        d.problems
    );
}

/// Mixed pools: a VTEP node's IPIP and no-encap blocks, and blocks of a deleted pool, are not
/// expected on the overlay; its VXLAN and CrossSubnet blocks are. Local blocks stay local.
#[test]
fn blocks_outside_vxlan_pools_are_off_the_overlay() {
    let nodes = vec![
        calico_node("k8s01", "10.1.10.0", "192.168.77.1/24"),
        calico_node("k8s02", "10.1.20.0", "192.168.77.2/24"),
    ];
    let blocks = vec![
        block(
            "l1",
            json!({"cidr": "10.1.10.0/26", "affinity": "host:k8s01"}),
        ),
        block(
            "l2",
            json!({"cidr": "10.9.10.0/26", "affinity": "host:k8s01"}),
        ),
        block(
            "a",
            json!({"cidr": "10.1.20.0/26", "affinity": "host:k8s02"}),
        ),
        block(
            "b",
            json!({"cidr": "10.2.20.0/26", "affinity": "host:k8s02"}),
        ),
        block(
            "c",
            json!({"cidr": "10.9.20.0/26", "affinity": "host:k8s02"}),
        ),
        block(
            "d",
            json!({"cidr": "10.7.20.0/26", "affinity": "host:k8s02"}),
        ),
        block(
            "e",
            json!({"cidr": "172.16.0.0/26", "affinity": "host:k8s02"}),
        ),
    ];
    let pools = vec![
        pool("vx", json!({"cidr": "10.1.0.0/16", "vxlanMode": "Always"})),
        pool(
            "cross",
            json!({"cidr": "10.2.0.0/16", "vxlanMode": "CrossSubnet"}),
        ),
        pool("ip", json!({"cidr": "10.9.0.0/16", "ipipMode": "Always"})),
        pool("plain", json!({"cidr": "10.7.0.0/16"})),
    ];
    let d = build_with_pools(nodes.clone(), blocks.clone(), Some(pools));
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert!(d.cluster.pools_known);
    assert_eq!(
        d.nodes["k8s02"].blocks,
        [cidr("10.1.20.0/26"), cidr("10.2.20.0/26")]
    );
    assert_eq!(
        d.off_overlay,
        [
            cidr("10.7.20.0/26"),
            cidr("10.9.20.0/26"),
            cidr("172.16.0.0/26")
        ]
    );
    assert_eq!(
        d.nodes["k8s01"].blocks,
        [cidr("10.1.10.0/26"), cidr("10.9.10.0/26")]
    );
    // Without pools every block is VXLAN, as before; so with an empty pool list, which no
    // working cluster has (taking every block off the overlay would hide every fault).
    for pools in [None, Some(vec![])] {
        let d = build_with_pools(nodes.clone(), blocks.clone(), pools.clone());
        assert!(!d.cluster.pools_known);
        assert_eq!(d.nodes["k8s02"].blocks.len(), 5);
        assert!(d.off_overlay.is_empty());
        assert_eq!(
            d.cluster.notes.is_empty(),
            pools.is_none(),
            "{:?}",
            d.cluster
        );
    }
}

#[test]
fn affinity_deleted_is_a_string_and_conflicts_are_reported() {
    let obj = lite(json!({"metadata": {"name": "k8s02-10-1-9-0-26"}, "spec": {
        "node": "k8s02", "cidr": "10.1.9.0/26", "state": "confirmed", "deleted": "false"}}));
    let aff = AffinityInfo::from_object(&obj);
    assert!(!aff.deleted);
    let gone = AffinityInfo::from_object(&lite(json!({"spec": {"deleted": "true"}})));
    assert!(gone.deleted);
    let d = build(
        vec![calico_node("k8s03", "10.1.9.0", "192.168.77.3")],
        vec![block(
            "b",
            json!({"cidr": "10.1.9.0/26", "affinity": "host:k8s03"}),
        )],
        vec![("k8s02-10-1-9-0-26".into(), aff)],
    );
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert_eq!(d.problems[0].field, "spec.node");
    assert!(d.nodes.contains_key("k8s03"));
}

#[test]
fn bad_allocation_references_are_problems() {
    let d = build(
        vec![calico_node("k8s03", "10.1.9.0", "192.168.77.3")],
        vec![block(
            "b",
            json!({"cidr": "10.1.9.0/30", "affinity": "host:k8s03",
                "allocations": [5, "x", null, null], "attributes": []}),
        )],
        vec![],
    );
    assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
    assert!(d.nodes["k8s03"].borrowed.is_empty());
}

#[test]
fn flannel_profile_from_annotations() {
    let obj = lite(json!({"metadata": {"name": "f2", "annotations": {
        ANN_FLANNEL_BACKEND: "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:02\"}",
        ANN_FLANNEL_PUBLIC_IP: "192.168.88.2"}},
        "spec": {"podCIDR": "10.244.2.0/24"}}));
    let bad = lite(json!({"metadata": {"name": "f3", "annotations": {
        ANN_FLANNEL_BACKEND: "{not json", ANN_FLANNEL_PUBLIC_IP: "192.168.88.3"}},
        "spec": {"podCIDR": "10.244.3.0/24"}}));
    let nodes: BTreeMap<_, _> = [
        ("f2".to_string(), NodeInfo::from_object(&obj)),
        ("f3".to_string(), NodeInfo::from_object(&bad)),
    ]
    .into_iter()
    .collect();
    let empty_b = BTreeMap::new();
    let empty_a = BTreeMap::new();
    let d = build_desired(
        KubeProfile::Flannel,
        "f1",
        &CacheView::new(&nodes, &empty_b, &empty_a),
    );
    let f2 = &d.nodes["f2"];
    assert_eq!(f2.vtep_ip, v4(10, 244, 2, 0));
    assert_eq!(f2.node_ip, v4(192, 168, 88, 2));
    assert_eq!(f2.vtep_mac.to_string(), "aa:bb:cc:dd:ee:02");
    assert_eq!(f2.blocks, vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]);
    // The local node f1 is left out of this fixture; that problem is not what it tests.
    let problems: Vec<_> = d.problems.iter().filter(|p| p.field != "nodes").collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, "Node/f3");
}

#[test]
fn flannel_pod_cidr_with_host_bits_is_rejected_like_the_file_does() {
    let obj = lite(json!({"metadata": {"name": "f2", "annotations": {
        ANN_FLANNEL_BACKEND: "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:02\"}",
        ANN_FLANNEL_PUBLIC_IP: "192.168.88.2"}},
        "spec": {"podCIDR": "10.244.2.7/24"}}));
    let nodes: BTreeMap<_, _> = [("f2".to_string(), NodeInfo::from_object(&obj))]
        .into_iter()
        .collect();
    let (b, a) = (BTreeMap::new(), BTreeMap::new());
    let d = build_desired(KubeProfile::Flannel, "f2", &CacheView::new(&nodes, &b, &a));
    assert!(
        d.problems.iter().any(|p| p.field == "spec.podCIDR"),
        "{:?}",
        d.problems
    );
}

#[test]
fn calico_dual_stack_annotations_give_the_ipv6_side() {
    let dual = |name: &str, n: u8, mac_v6: Option<&str>| {
        let mut ann = json!({
            ANN_CALICO_VTEP: format!("10.1.{n}.0"), ANN_CALICO_ADDRESS: format!("192.168.77.{n}/24"),
            ANN_CALICO_VTEP_V6: format!("fd10:1:{n}::"), ANN_CALICO_ADDRESS_V6: format!("fd00:77::{n}/64"),
        });
        if let Some(m) = mac_v6 {
            ann[ANN_CALICO_MAC_V6] = json!(m);
        }
        let obj = lite(json!({"metadata": {"name": name, "annotations": ann}}));
        (name.to_string(), NodeInfo::from_object(&obj))
    };
    let d = build(
        vec![
            dual("k8s01", 1, None),
            dual("k8s03", 3, Some("66:aa:bb:cc:dd:06")),
        ],
        vec![
            block(
                "10-1-3-0-26",
                json!({"cidr": "10.1.3.0/26", "affinity": "host:k8s03"}),
            ),
            block(
                "fd10-1-3---122",
                json!({"cidr": "fd10:1:3::/122", "affinity": "host:k8s03"}),
            ),
        ],
        vec![],
    );
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let side = d.nodes["k8s03"].ipv6.clone().expect("IPv6 side");
    assert_eq!(side.node_ip, "fd00:77::3".parse::<IpAddr>().unwrap());
    assert_eq!(side.vtep_ip, "fd10:1:3::".parse::<IpAddr>().unwrap());
    assert_eq!(
        side.vtep_mac,
        "66:aa:bb:cc:dd:06".parse::<MacAddr>().unwrap()
    );
    assert!(!side.vtep_mac_derived);
    let k1 = d.nodes["k8s01"].ipv6.clone().unwrap();
    assert_eq!(k1.vtep_mac, MacAddr::derive_like_felix("k8s01-v6"));
    let v6 = d.ipv6();
    assert_eq!(
        v6.nodes["k8s03"].blocks,
        vec!["fd10:1:3::/122".parse::<IpNet>().unwrap()]
    );
    assert_eq!(v6.peers().count(), 1);

    // A broken IPv6 annotation is a problem naming it; the IPv4 overlay is still judged.
    let mut bad = dual("k8s03", 3, None);
    bad.1.calico_address_v6 = Some("not-an-address".into());
    let d = build(vec![dual("k8s01", 1, None), bad], vec![], vec![]);
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert_eq!(
        d.problems[0].field,
        format!("metadata.annotations[{ANN_CALICO_ADDRESS_V6}]")
    );
    assert!(d.nodes["k8s03"].ipv6.is_none());
    assert_eq!(d.nodes["k8s03"].vtep_ip, v4(10, 1, 3, 0));
}

#[test]
fn flannel_dual_stack_annotations_give_the_ipv6_side() {
    let node = |name: &str, n: u8, v6_backend: &str| {
        let obj = lite(json!({"metadata": {"name": name, "annotations": {
            ANN_FLANNEL_BACKEND: format!("{{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:0{n}\"}}"),
            ANN_FLANNEL_PUBLIC_IP: format!("192.168.88.{n}"),
            ANN_FLANNEL_BACKEND_V6: v6_backend,
            ANN_FLANNEL_PUBLIC_IPV6: format!("fd00:88::{n}")}},
            "spec": {"podCIDR": format!("10.244.{n}.0/24"),
                     "podCIDRs": [format!("10.244.{n}.0/24"), format!("fd00:244:{n}::/64")]}}));
        (name.to_string(), NodeInfo::from_object(&obj))
    };
    let nodes: BTreeMap<_, _> = [
        node("f1", 1, "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:61\"}"),
        node("f2", 2, "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:62\"}"),
        node("f3", 3, "{broken"),
        node("f4", 4, "null"),
    ]
    .into_iter()
    .collect();
    let (b, a) = (BTreeMap::new(), BTreeMap::new());
    let d = build_desired(KubeProfile::Flannel, "f1", &CacheView::new(&nodes, &b, &a));
    let side = d.nodes["f2"].ipv6.clone().expect("IPv6 side");
    assert_eq!(side.node_ip, "fd00:88::2".parse::<IpAddr>().unwrap());
    assert_eq!(side.vtep_ip, "fd00:244:2::".parse::<IpAddr>().unwrap());
    assert_eq!(side.vtep_mac.to_string(), "aa:bb:cc:dd:ee:62");
    assert_eq!(
        d.ipv6().nodes["f2"].blocks,
        vec!["fd00:244:2::/64".parse::<IpNet>().unwrap()]
    );
    // A broken IPv6 backend is a problem; its IPv6 subnet is not judged; IPv4 stays.
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert_eq!(d.problems[0].object, "Node/f3");
    assert!(d.nodes["f3"].ipv6.is_none());
    assert_eq!(
        d.unverifiable,
        vec!["fd00:244:3::/64".parse::<IpNet>().unwrap()]
    );
    // "null" (host-gw, or single stack) is no IPv6 side and no problem.
    assert!(d.nodes["f4"].ipv6.is_none());
}
