use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use super::*;
use crate::model::{v4, MacAddr, PeerNode};

const PATH: &str = "/etc/dataplane-watchdog/nodes.yaml";

fn yaml(text: &str) -> DesiredState {
    parse(text, FileFormat::Yaml, Path::new(PATH), "k8s01").expect("file must parse")
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Two healthy nodes, then whatever the case appends under `nodes:`.
fn with_nodes(extra: &str) -> String {
    format!(
        "nodes:
  - name: k8s01
    node_ip: 192.168.77.1
    vtep_ip: 10.1.10.0
    blocks: [10.1.10.0/26]
  - name: k8s02
    node_ip: 192.168.77.2
    vtep_ip: 10.1.20.0
    blocks: [10.1.20.0/26]
{extra}"
    )
}

#[test]
fn good_file_round_trips_into_desired_state() {
    let text = "
nodes:
  - name: k8s01
    node_ip: 192.168.77.1
    vtep_ip: 10.1.10.0
    blocks: [10.1.10.0/26]
  - name: k8s03
    node_ip: 192.168.77.3
    vtep_ip: 10.1.235.133
    vtep_mac: 66:AA:bb:cc:dd:ee
    blocks: [10.1.235.128/26, 10.1.235.192/26, 'fd00:10::/122']
    borrowed: [10.1.240.7/32, 10.1.240.8]
";
    let got = yaml(text);
    let mut nodes = BTreeMap::new();
    nodes.insert(
        "k8s01".to_string(),
        PeerNode {
            name: "k8s01".into(),
            node_ip: v4(192, 168, 77, 1),
            vtep_ip: v4(10, 1, 10, 0),
            vtep_mac: MacAddr::derive_like_felix("k8s01"),
            vtep_mac_derived: true,
            blocks: vec![net("10.1.10.0/26")],
            borrowed: vec![],
            ipv6: None,
        },
    );
    nodes.insert(
        "k8s03".to_string(),
        PeerNode {
            name: "k8s03".into(),
            node_ip: v4(192, 168, 77, 3),
            vtep_ip: v4(10, 1, 235, 133),
            vtep_mac: MacAddr([0x66, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]),
            vtep_mac_derived: false,
            blocks: vec![
                net("10.1.235.128/26"),
                net("10.1.235.192/26"),
                net("fd00:10::/122"),
            ],
            borrowed: vec![net("10.1.240.7/32"), net("10.1.240.8/32")],
            ipv6: None,
        },
    );
    let want = DesiredState {
        source: format!("file:{PATH}"),
        local_node: "k8s01".into(),
        nodes,
        problems: vec![],
        unverifiable: vec![],
        non_vxlan: Default::default(),
        ..Default::default()
    };
    assert_eq!(got, want);
    assert_eq!(
        got.peers().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["k8s03"]
    );

    // The same data as TOML gives the same state.
    let toml_text = r#"
[[nodes]]
name = "k8s01"
node_ip = "192.168.77.1"
vtep_ip = "10.1.10.0"
blocks = ["10.1.10.0/26"]

[[nodes]]
name = "k8s03"
node_ip = "192.168.77.3"
vtep_ip = "10.1.235.133"
vtep_mac = "66:aa:bb:cc:dd:ee"
blocks = ["10.1.235.128/26", "10.1.235.192/26", "fd00:10::/122"]
borrowed = ["10.1.240.7/32", "10.1.240.8"]
"#;
    let t = parse(toml_text, FileFormat::Toml, Path::new(PATH), "k8s01").unwrap();
    assert_eq!(t, want);
    // Sniffed without a telling extension.
    assert_eq!(
        FileFormat::detect(Path::new("/x/nodes"), toml_text),
        FileFormat::Toml
    );
    assert_eq!(
        FileFormat::detect(Path::new("/x/nodes"), text),
        FileFormat::Yaml
    );
    assert_eq!(
        FileFormat::detect(Path::new("/x/n.TOML"), text),
        FileFormat::Toml
    );
    assert_eq!(
        FileFormat::detect(Path::new("/x/n.yml"), toml_text),
        FileFormat::Yaml
    );
}

#[test]
fn unquoted_all_digit_mac_stays_a_string() {
    // YAML 1.1 would read 12:34:56 as a base-60 number; node files are read as YAML 1.2.
    let s = yaml(&with_nodes(
        "  - name: k8s03
    node_ip: 192.168.77.3
    vtep_ip: 10.1.30.0
    vtep_mac: 12:34:56:12:34:56
    blocks: []
",
    ));
    assert_eq!(s.problems, vec![]);
    assert_eq!(
        s.nodes["k8s03"].vtep_mac,
        MacAddr([0x12, 0x34, 0x56, 0x12, 0x34, 0x56])
    );
}

#[test]
fn flannel_style_entries_need_no_special_code() {
    // node_ip = public-ip, vtep_ip = subnet .0, blocks = [podCIDR], vtep_mac = VtepMAC.
    let s = yaml(
        "nodes:
  - {name: k8s01, node_ip: 192.168.77.1, vtep_ip: 10.244.0.0, vtep_mac: 'ae:11:22:33:44:01', blocks: [10.244.0.0/24]}
  - {name: k8s02, node_ip: 192.168.77.2, vtep_ip: 10.244.1.0, vtep_mac: 'ae:11:22:33:44:02', blocks: [10.244.1.0/24]}
",
    );
    assert_eq!(s.problems, vec![]);
    let p = &s.nodes["k8s02"];
    assert_eq!(p.vtep_ip, v4(10, 244, 1, 0));
    assert_eq!(p.blocks, [net("10.244.1.0/24")]);
    assert!(!p.vtep_mac_derived);
}

/// One validation case: extra YAML under `nodes:`, the problems expected as
/// (node, field, message fragment), and which nodes must survive.
struct Case {
    what: &'static str,
    extra: &'static str,
    problems: &'static [(Option<&'static str>, &'static str, &'static str)],
    nodes: &'static [&'static str],
}

#[test]
fn validation_cases() {
    let cases = [
        Case {
            what: "bad node_ip",
            extra: "  - {name: k8s03, node_ip: 192.168.77, vtep_ip: 10.1.30.0, blocks: []}\n",
            problems: &[(Some("k8s03"), "nodes[2].node_ip", "node address \"192.168.77\" is not an IP address")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "node_ip with a prefix",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3/24, vtep_ip: 10.1.30.0, blocks: []}\n",
            problems: &[(Some("k8s03"), "nodes[2].node_ip", "without a prefix length")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            // A node of an IPIP or no-encap pool: valid, with no VXLAN expectations.
            what: "no vtep_ip",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, blocks: []}\n",
            problems: &[],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "unspecified vtep_ip",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 0.0.0.0, blocks: []}\n",
            problems: &[(Some("k8s03"), "nodes[2].vtep_ip", "not a usable unicast address")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "missing name",
            extra: "  - {node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: []}\n",
            problems: &[(None, "nodes[2].name", "missing node name")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "name of the wrong type",
            extra: "  - {name: [a], node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: []}\n",
            problems: &[(None, "nodes[2].name", "expected a string, found a list")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "missing blocks",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0}\n",
            problems: &[(Some("k8s03"), "nodes[2].blocks", "missing blocks")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "blocks not a list",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: 10.1.30.0/26}\n",
            problems: &[(Some("k8s03"), "nodes[2].blocks", "expected a list")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "entry not a mapping",
            extra: "  - k8s03\n",
            problems: &[(None, "nodes[2]", "expected a mapping")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "unknown field (a typo must not become a derived MAC)",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, vtep_mca: '66:00:00:00:00:01', blocks: []}\n",
            problems: &[(Some("k8s03"), "nodes[2].vtep_mca", "unknown field `vtep_mca`")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "block with host bits set",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [10.1.30.0/26, 10.1.235.129/26]}\n",
            problems: &[(Some("k8s03"), "nodes[2].blocks[1]", "block 10.1.235.129/26 has host bits set (the network is 10.1.235.128/26)")],
            nodes: &["k8s01", "k8s02", "k8s03"],
        },
        Case {
            what: "block not a CIDR",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [10.1.300.0/26]}\n",
            problems: &[(Some("k8s03"), "nodes[2].blocks[0]", "block \"10.1.300.0/26\" is not a CIDR")],
            nodes: &["k8s01", "k8s02", "k8s03"],
        },
        Case {
            what: "block without prefix",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [10.1.30.0]}\n",
            problems: &[(Some("k8s03"), "nodes[2].blocks[0]", "has no prefix length")],
            nodes: &["k8s01", "k8s02", "k8s03"],
        },
        Case {
            what: "block entry of the wrong type",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [[10.1.30.0/26]]}\n",
            problems: &[(Some("k8s03"), "nodes[2].blocks[0]", "expected a string, found a list")],
            nodes: &["k8s01", "k8s02", "k8s03"],
        },
        Case {
            what: "duplicate node name",
            extra: "  - {name: k8s02, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: []}\n",
            problems: &[
                (Some("k8s02"), "nodes[1].name", "node name k8s02 is also used by entry #3 (nodes[2].name)"),
                (Some("k8s02"), "nodes[2].name", "node name k8s02 is also used by entry #2 (nodes[1].name)"),
            ],
            nodes: &["k8s01"],
        },
        Case {
            what: "same block on two nodes",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [10.1.30.0/26, 10.1.20.0/26]}\n",
            problems: &[
                (Some("k8s02"), "nodes[1].blocks[0]", "block 10.1.20.0/26 of node k8s02 conflicts with k8s03 (10.1.20.0/26)"),
                (Some("k8s03"), "nodes[2].blocks[1]", "block 10.1.20.0/26 of node k8s03 conflicts with k8s02 (10.1.20.0/26)"),
            ],
            nodes: &["k8s01", "k8s02", "k8s03"],
        },
        Case {
            what: "overlapping blocks on two nodes",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [10.1.0.0/16]}\n",
            problems: &[
                (Some("k8s01"), "nodes[0].blocks[0]", "conflicts with k8s03 (10.1.0.0/16)"),
                (Some("k8s02"), "nodes[1].blocks[0]", "conflicts with k8s03 (10.1.0.0/16)"),
                (Some("k8s03"), "nodes[2].blocks[0]", "block 10.1.0.0/16 of node k8s03 conflicts with k8s01 (10.1.10.0/26), k8s02 (10.1.20.0/26)"),
            ],
            nodes: &["k8s01", "k8s02", "k8s03"],
        },
        Case {
            what: "VTEP shared by two nodes",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.20.0, blocks: []}\n",
            problems: &[
                (Some("k8s02"), "nodes[1].vtep_ip", "VTEP address 10.1.20.0 is also used by node k8s03"),
                (Some("k8s03"), "nodes[2].vtep_ip", "VTEP address 10.1.20.0 is also used by node k8s02"),
            ],
            nodes: &["k8s01"],
        },
        Case {
            what: "published VTEP MAC shared by two nodes",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, vtep_mac: '66:00:00:00:00:01', blocks: []}\n  - {name: k8s04, node_ip: 192.168.77.4, vtep_ip: 10.1.40.0, vtep_mac: '66:00:00:00:00:01', blocks: []}\n",
            problems: &[
                (Some("k8s03"), "nodes[2].vtep_mac", "VTEP MAC 66:00:00:00:00:01 is also used by node k8s04"),
                (Some("k8s04"), "nodes[3].vtep_mac", "also used by node k8s03"),
            ],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "bad vtep_mac is not replaced by a derived one",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, vtep_mac: '66:aa:bb', blocks: []}\n",
            problems: &[(Some("k8s03"), "nodes[2].vtep_mac", "invalid MAC address \"66:aa:bb\"")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "multicast vtep_mac",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, vtep_mac: '01:00:5e:00:00:01', blocks: []}\n",
            problems: &[(Some("k8s03"), "nodes[2].vtep_mac", "is not a unicast address")],
            nodes: &["k8s01", "k8s02"],
        },
        Case {
            what: "borrowed range instead of an address",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [], borrowed: [10.1.10.7/32, 10.1.10.0/28, 'fd00::/64', 'fd00::7/128', junk]}\n",
            problems: &[
                (Some("k8s03"), "nodes[2].borrowed[1]", "borrowed address 10.1.10.0/28 must be a single address (/32)"),
                (Some("k8s03"), "nodes[2].borrowed[2]", "borrowed address fd00::/64 must be a single address (/128)"),
                (Some("k8s03"), "nodes[2].borrowed[4]", "borrowed address \"junk\" is not an IP address"),
            ],
            nodes: &["k8s01", "k8s02", "k8s03"],
        },
        Case {
            what: "same borrowed address on two nodes",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [], borrowed: [10.1.10.7]}\n  - {name: k8s04, node_ip: 192.168.77.4, vtep_ip: 10.1.40.0, blocks: [], borrowed: [10.1.10.7/32]}\n",
            problems: &[
                (Some("k8s03"), "nodes[2].borrowed[0]", "borrowed address 10.1.10.7/32 of node k8s03 conflicts with k8s04"),
                (Some("k8s04"), "nodes[3].borrowed[0]", "conflicts with k8s03"),
            ],
            nodes: &["k8s01", "k8s02", "k8s03", "k8s04"],
        },
        Case {
            what: "IPv4 VTEP with IPv6 blocks is fine",
            extra: "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: ['fd00:30::/122', 10.1.30.0/26]}\n",
            problems: &[],
            nodes: &["k8s01", "k8s02", "k8s03"],
        },
        Case {
            what: "healthy baseline",
            extra: "",
            problems: &[],
            nodes: &["k8s01", "k8s02"],
        },
    ];
    for case in cases {
        let s = yaml(&with_nodes(case.extra));
        let got: Vec<(Option<&str>, &str, &str)> = s
            .problems
            .iter()
            .map(|p| (p.node.as_deref(), p.field.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            got.len(),
            case.problems.len(),
            "{}: problems {got:#?}",
            case.what
        );
        for (want, got) in case.problems.iter().zip(&got) {
            assert!(
                want.0 == got.0 && want.1 == got.1 && got.2.contains(want.2),
                "{}:\n  got  {got:?}\n  want {want:?}",
                case.what
            );
        }
        for p in &s.problems {
            assert_eq!(p.object, PATH, "{}", case.what);
        }
        let names: Vec<&str> = s.nodes.keys().map(String::as_str).collect();
        assert_eq!(names, case.nodes, "{}", case.what);
    }
}

#[test]
fn conflicting_blocks_are_removed_from_both_nodes() {
    let s = yaml(&with_nodes(
        "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [10.1.30.0/26, 10.1.20.0/26]}\n",
    ));
    assert_eq!(s.nodes["k8s02"].blocks, Vec::<IpNet>::new());
    assert_eq!(s.nodes["k8s03"].blocks, [net("10.1.30.0/26")]);
    // A bad block leaves the rest of the node usable.
    let s = yaml(&with_nodes(
        "  - {name: k8s03, node_ip: 192.168.77.3, vtep_ip: 10.1.30.0, blocks: [10.1.30.1/26, 10.1.31.0/26]}\n",
    ));
    assert_eq!(s.nodes["k8s03"].blocks, [net("10.1.31.0/26")]);
}

#[test]
fn invalid_node_still_claims_its_blocks() {
    // k8s03 is unusable (bad node_ip) but the datastore still says it owns 10.1.20.0/26:
    // k8s02's claim is ambiguous, so it is not checked either.
    let s = yaml(&with_nodes(
        "  - {name: k8s03, node_ip: nope, vtep_ip: 10.1.30.0, blocks: [10.1.20.0/26]}\n",
    ));
    assert!(!s.nodes.contains_key("k8s03"));
    assert_eq!(s.nodes["k8s02"].blocks, Vec::<IpNet>::new());
    assert_eq!(s.problems.len(), 3, "{:#?}", s.problems);
}

#[test]
fn a_key_given_twice_skips_that_entry_only() {
    // Which of the two values is meant is a guess: the entry is reported and skipped, the rest
    // of the file still counts (it used to fail the whole file).
    let s = yaml(&with_nodes(
        "  - name: k8s03
    node_ip: 192.168.77.3
    vtep_ip: 10.1.30.0
    vtep_ip: 10.1.31.0
    blocks: [10.1.30.0/26]
",
    ));
    assert!(!s.nodes.contains_key("k8s03"));
    assert_eq!(s.nodes.len(), 2, "the other nodes are still usable");
    assert_eq!(s.problems.len(), 1, "{:#?}", s.problems);
    let p = &s.problems[0];
    assert_eq!(p.node.as_deref(), Some("k8s03"));
    assert_eq!(p.field, "nodes[2].vtep_ip");
    assert!(p.message.contains("more than once"), "{}", p.message);
}

#[test]
fn deeply_nested_input_is_an_error_not_a_crash() {
    // No event budget (a large cluster's file is large), but nesting stays limited, well
    // before a test thread's stack runs out (an unoptimised build's frames are large).
    for (format, text) in [
        format!("nodes: [{}]\n", "[".repeat(100_000)),
        format!(
            "nodes:\n{}",
            (0..2_000)
                .map(|i| format!("{}-\n", " ".repeat(2 + 2 * i)))
                .collect::<String>()
        ),
    ]
    .into_iter()
    .map(|t| (FileFormat::Yaml, t))
    .chain([(
        FileFormat::Toml,
        format!("nodes = {}\n", "[".repeat(100_000)),
    )]) {
        let e = parse(&text, format, Path::new(PATH), "a").expect_err("deep");
        // The parsers' own limits on brackets, or ours on any nesting.
        let e = e.to_string();
        assert!(
            e.contains("levels deep") || e.contains("recursion limit"),
            "{e}"
        );
    }
}

#[test]
fn missing_local_node_is_a_problem() {
    let s = parse(&with_nodes(""), FileFormat::Yaml, Path::new(PATH), "k8s09").unwrap();
    assert_eq!(s.problems.len(), 1);
    assert_eq!(s.problems[0].node.as_deref(), Some("k8s09"));
    assert_eq!(s.problems[0].field, "nodes");
    assert!(s.problems[0].message.contains("not in the datastore"));
    assert_eq!(s.nodes.len(), 2, "the other nodes are still usable");
}

#[test]
fn unknown_top_level_key_is_reported_not_fatal() {
    let s = yaml(&format!("version: 2\n{}", with_nodes("")));
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.problems.len(), 1);
    assert_eq!(s.problems[0].field, "version");
}

#[test]
fn unparsable_files_are_errors_with_position() {
    let cases: &[(FileFormat, &str, &str)] = &[
        (
            FileFormat::Yaml,
            "nodes:\n  - name: a\n   bad: [\n",
            "datastore file /etc/dataplane-watchdog/nodes.yaml: line 3 column ",
        ),
        (
            FileFormat::Yaml,
            "nodes: 7\n",
            "datastore file /etc/dataplane-watchdog/nodes.yaml: line 1 column 1: invalid type: integer `7`, expected a list of node entries under `nodes`",
        ),
        (
            FileFormat::Yaml,
            "nodes: []\nnodes: []\n",
            "datastore file /etc/dataplane-watchdog/nodes.yaml: duplicate field `nodes`",
        ),
        (
            FileFormat::Yaml,
            "noodles: []\n",
            "datastore file /etc/dataplane-watchdog/nodes.yaml: line 1 column 1: missing field `nodes`",
        ),
        (FileFormat::Yaml, "", "datastore file /etc/dataplane-watchdog/nodes.yaml: "),
        (
            FileFormat::Toml,
            "[[nodes]]\nname = \"a\"\nnode_ip = \n",
            "datastore file /etc/dataplane-watchdog/nodes.yaml: line 3 column 11: invalid string; expected",
        ),
        (
            FileFormat::Toml,
            "nodes = \"x\"\n",
            "datastore file /etc/dataplane-watchdog/nodes.yaml: line 1 column 9: invalid type",
        ),
    ];
    for (format, text, want) in cases {
        let e = parse(text, *format, Path::new(PATH), "a").expect_err(text);
        let got = e.to_string();
        assert!(matches!(e, DatastoreError::Parse { .. }), "{got}");
        assert!(
            got.starts_with(want),
            "{text:?}\n  got:  {got}\n  want: {want}…"
        );
        assert!(!got.contains('\n'), "{got}");
    }
}

#[tokio::test]
async fn load_reads_the_file_and_reports_unreadable_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nodes.toml");
    std::fs::write(
        &path,
        "[[nodes]]\nname = \"a\"\nnode_ip = \"192.168.1.1\"\nvtep_ip = \"10.0.0.0\"\nblocks = [\"10.0.0.0/26\"]\n",
    )
    .unwrap();
    let mut ds = FileDatastore::new(&path, "a");
    assert_eq!(ds.describe(), format!("file:{}", path.display()));
    let s = ds.load().await.unwrap();
    assert_eq!(s.nodes["a"].vtep_ip, IpAddr::from([10, 0, 0, 0]));
    assert_eq!(s.source, ds.describe());

    let missing = dir.path().join("gone.yaml");
    let e = FileDatastore::new(&missing, "a").load().await.unwrap_err();
    assert!(matches!(e, DatastoreError::Read { .. }));
    assert!(e.to_string().starts_with(&format!(
        "datastore file {}: cannot read:",
        missing.display()
    )));
}

#[test]
fn dual_stack_fields_give_the_ipv6_side_with_a_felix_derived_mac() {
    let got = yaml(&with_nodes(
        "  - name: k8s03
    node_ip: 192.168.77.3
    vtep_ip: 10.1.235.133
    node_ipv6: fd00:77::3
    vtep_ipv6: 'fd10:1:235::80'
    blocks: [10.1.235.128/26, 'fd10:1:235::80/122']
    borrowed: ['fd10:1:240::7/128']
",
    ));
    assert!(got.problems.is_empty(), "{:#?}", got.problems);
    let side = got.nodes["k8s03"].ipv6.clone().expect("IPv6 side");
    assert_eq!(side.node_ip, "fd00:77::3".parse::<IpAddr>().unwrap());
    assert_eq!(side.vtep_ip, "fd10:1:235::80".parse::<IpAddr>().unwrap());
    assert_eq!(side.vtep_mac, MacAddr::derive_like_felix("k8s03-v6"));
    assert!(side.vtep_mac_derived);
    let v6 = got.ipv6();
    assert_eq!(v6.nodes["k8s03"].blocks, vec![net("fd10:1:235::80/122")]);
    assert_eq!(v6.nodes["k8s03"].borrowed, vec![net("fd10:1:240::7/128")]);
    assert_eq!(v6.nodes["k8s03"].vtep_mac, side.vtep_mac);
    // The single-stack nodes are no IPv6 peers.
    assert!(v6.non_vxlan.contains_key("k8s02") && !v6.nodes.contains_key("k8s02"));
}

#[test]
fn a_bad_ipv6_side_is_a_problem_and_leaves_the_ipv4_overlay_alone() {
    let cases = [
        ("node_ipv6: fd00:77::3\n    vtep_ipv6: 10.1.235.140", "vtep_ipv6", "not an IPv6 address"),
        ("vtep_ipv6: 'fd10:1:235::80'", "node_ipv6", "missing IPv6 node address"),
        ("node_ipv6: fd00:77::3/64\n    vtep_ipv6: 'fd10:1:235::80'", "node_ipv6", "without a prefix length"),
        (
            "node_ipv6: fd00:77::3\n    vtep_ipv6: 'fd10:1:235::80'\n    vtep_mac_v6: 01:00:5e:00:00:01",
            "vtep_mac_v6",
            "not a unicast address",
        ),
    ];
    for (fields, field, message) in cases {
        let got = yaml(&with_nodes(&format!(
            "  - name: k8s03
    node_ip: 192.168.77.3
    vtep_ip: 10.1.235.133
    {fields}
    blocks: [10.1.235.128/26, 'fd10:1:235::80/122']
"
        )));
        assert_eq!(got.problems.len(), 1, "{fields}: {:#?}", got.problems);
        let p = &got.problems[0];
        assert!(
            p.field.ends_with(field) && p.message.contains(message),
            "{fields}: {p:#?}"
        );
        let k8s03 = &got.nodes["k8s03"];
        assert!(k8s03.ipv6.is_none(), "{fields}");
        assert_eq!(k8s03.vtep_ip, v4(10, 1, 235, 133), "the IPv4 side is kept");
        assert_eq!(
            got.unverifiable,
            vec![net("fd10:1:235::80/122")],
            "{fields}"
        );
    }
}

#[test]
fn two_nodes_with_one_ipv6_vtep_are_both_rejected() {
    let got = yaml(&with_nodes(
        "  - name: k8s03
    node_ip: 192.168.77.3
    vtep_ip: 10.1.235.133
    node_ipv6: fd00:77::3
    vtep_ipv6: 'fd10:1::1'
    blocks: []
  - name: k8s04
    node_ip: 192.168.77.4
    vtep_ip: 10.1.236.133
    node_ipv6: fd00:77::4
    vtep_ipv6: 'fd10:1::1'
    blocks: []
",
    ));
    assert_eq!(got.problems.len(), 2, "{:#?}", got.problems);
    assert!(got
        .problems
        .iter()
        .all(|p| p.message.contains("IPv6 VTEP address")));
    assert!(!got.nodes.contains_key("k8s03") && !got.nodes.contains_key("k8s04"));
}
