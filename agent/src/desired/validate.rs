//! Validation of raw records, in one place for every source: each source only reads strings
//! (and where they came from), so a rule — and the wording of its problem — cannot differ
//! between the file and the Kubernetes datastore.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::model::{DatastoreProblem, DesiredState, Ipv6Side, MacAddr, NonVxlanNode, PeerNode};

/// One value as a source found it, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawField {
    /// Field path used in problems even when the value is absent (`nodes[2].vtep_ip`,
    /// `metadata.annotations[projectcalico.org/IPv4VXLANTunnelAddr]`, `spec.cidr`).
    pub field: String,
    /// The value as text; `None` when absent.
    pub value: Option<String>,
    /// The object it came from when that differs from the node record's (`IPAMBlock/…`).
    pub object: Option<String>,
}

impl RawField {
    pub fn new(field: impl Into<String>, value: Option<String>) -> Self {
        RawField {
            field: field.into(),
            value,
            object: None,
        }
    }
}

/// One node as a source found it, before validation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawNode {
    /// Where the record lives (file path, `Node/k8s03`).
    pub object: String,
    pub name: RawField,
    /// Underlay address, plain IP (no prefix).
    pub node_ip: RawField,
    pub vtep_ip: RawField,
    /// Optional: absent → derived like Felix from the name.
    pub vtep_mac: RawField,
    /// CIDRs affine to the node; each must be a network address (no host bits).
    pub blocks: Vec<RawField>,
    /// Single addresses (`/32`, `/128`, or a bare IP) borrowed from other nodes' blocks.
    pub borrowed: Vec<RawField>,
    /// Dual stack: IPv6 underlay address, IPv6 VTEP, IPv6 VTEP MAC (absent → derived like
    /// Felix from `name + "-v6"`). All absent on a single-stack node.
    pub node_ipv6: RawField,
    pub vtep_ipv6: RawField,
    pub vtep_mac_v6: RawField,
}

/// A named record after its own checks, before the cross-node ones.
struct Candidate {
    index: usize,
    object: String,
    name: String,
    name_field: String,
    // `None` where the value was invalid (the node is then rejected, but its valid claims
    // still take part in the cross-node checks: they are in the datastore).
    node_ip: Option<IpAddr>,
    vtep_ip: Option<IpAddr>,
    vtep_field: String,
    vtep_mac: Option<MacAddr>,
    vtep_mac_derived: bool,
    vtep_mac_field: String,
    blocks: Vec<(IpNet, RawField)>,
    borrowed: Vec<(IpNet, RawField)>,
    node_ipv6: Option<IpAddr>,
    ipv6: Option<Ipv6Side>,
    vtep_ipv6_field: String,
    /// The IPv6 side was given but is unusable: the node's IPv6 claims cannot be judged.
    ipv6_invalid: bool,
    /// Failed a check that invalidates the whole node.
    rejected: bool,
}

/// Turn raw records into a `DesiredState` for `local_node`. `problems` are ones the source
/// already found (unreadable entries); validation appends to them. Never fails.
pub fn build(
    source: impl Into<String>,
    local_node: &str,
    records: Vec<RawNode>,
    mut problems: Vec<DatastoreProblem>,
) -> DesiredState {
    let mut candidates: Vec<Candidate> = Vec::new();
    for (index, raw) in records.into_iter().enumerate() {
        if let Some(c) = validate_node(index, raw, &mut problems) {
            candidates.push(c);
        }
    }

    reject_duplicates(
        &mut candidates,
        &mut problems,
        |c| Some(c.name.clone()),
        |c| c.name_field.clone(),
        "node name",
    );
    reject_duplicates(
        &mut candidates,
        &mut problems,
        |c| c.vtep_ip.map(|ip| ip.to_string()),
        |c| c.vtep_field.clone(),
        "VTEP address",
    );
    reject_duplicates(
        &mut candidates,
        &mut problems,
        |c| c.ipv6.as_ref().map(|v| v.vtep_ip.to_string()),
        |c| c.vtep_ipv6_field.clone(),
        "IPv6 VTEP address",
    );
    // A derived MAC cannot collide in practice; a published one copied between nodes can,
    // and would make the FDB ambiguous.
    reject_duplicates(
        &mut candidates,
        &mut problems,
        |c| {
            c.vtep_mac
                .filter(|_| !c.vtep_mac_derived)
                .map(|m| m.to_string())
        },
        |c| c.vtep_mac_field.clone(),
        "VTEP MAC",
    );

    let mut unverifiable = Vec::new();
    drop_conflicting_claims(
        &mut candidates,
        &mut problems,
        &mut unverifiable,
        |c| &mut c.blocks,
        "block",
    );
    drop_conflicting_claims(
        &mut candidates,
        &mut problems,
        &mut unverifiable,
        |c| &mut c.borrowed,
        "borrowed address",
    );
    // A rejected node still claims its blocks: routes to them cannot be judged.
    for c in candidates.iter().filter(|c| c.rejected) {
        unverifiable.extend(c.blocks.iter().chain(&c.borrowed).map(|(net, _)| *net));
    }
    // So does a node whose IPv6 side is broken, for its IPv6 claims.
    for c in candidates.iter().filter(|c| c.ipv6_invalid) {
        unverifiable.extend(
            c.blocks
                .iter()
                .chain(&c.borrowed)
                .map(|(net, _)| *net)
                .filter(|n| n.addr().is_ipv6()),
        );
    }
    unverifiable.sort();
    unverifiable.dedup();

    let mut nodes = BTreeMap::new();
    let mut non_vxlan = BTreeMap::new();
    for c in candidates.into_iter().filter(|c| !c.rejected) {
        let Some(node_ip) = c.node_ip else {
            continue; // Unreachable: a missing value always sets `rejected`.
        };
        let Some(vtep_ip) = c.vtep_ip else {
            non_vxlan.insert(
                c.name.clone(),
                NonVxlanNode {
                    name: c.name,
                    node_ip,
                    node_ipv6: c.node_ipv6,
                    blocks: dedup(c.blocks),
                    borrowed: dedup(c.borrowed),
                },
            );
            continue;
        };
        let Some(vtep_mac) = c.vtep_mac else {
            continue; // Unreachable, as above.
        };
        nodes.insert(
            c.name.clone(),
            PeerNode {
                name: c.name,
                node_ip,
                vtep_ip,
                vtep_mac,
                vtep_mac_derived: c.vtep_mac_derived,
                blocks: dedup(c.blocks),
                borrowed: dedup(c.borrowed),
                ipv6: c.ipv6,
            },
        );
    }
    let source = source.into();
    if !local_node.is_empty()
        && !nodes.contains_key(local_node)
        && !non_vxlan.contains_key(local_node)
    {
        // Without its own entry the agent cannot tell local blocks from remote ones.
        let already = problems
            .iter()
            .any(|p| p.node.as_deref() == Some(local_node));
        let message = if already {
            format!("the local node {local_node:?} has an invalid entry (see above); local blocks are unknown")
        } else {
            format!("the local node {local_node:?} (config node_name) is not in the datastore; local blocks are unknown")
        };
        problems.push(DatastoreProblem {
            object: source.clone(),
            node: Some(local_node.to_string()),
            field: "nodes".to_string(),
            message,
        });
    }
    DesiredState {
        source,
        local_node: local_node.to_string(),
        nodes,
        problems,
        unverifiable,
        non_vxlan,
        ..Default::default()
    }
}

/// Keep the first of each network, in file order.
fn dedup(claims: Vec<(IpNet, RawField)>) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::with_capacity(claims.len());
    for (net, _) in claims {
        if !out.contains(&net) {
            out.push(net);
        }
    }
    out
}

fn problem(
    object: &str,
    node: Option<&str>,
    field: &RawField,
    message: String,
) -> DatastoreProblem {
    DatastoreProblem {
        object: field.object.clone().unwrap_or_else(|| object.to_string()),
        node: node.map(str::to_string),
        field: field.field.clone(),
        message,
    }
}

/// Per-record checks. `None` when the record cannot be identified or used at all.
fn validate_node(
    index: usize,
    raw: RawNode,
    problems: &mut Vec<DatastoreProblem>,
) -> Option<Candidate> {
    let obj = raw.object.as_str();
    let name = match raw.name.value.as_deref().map(str::trim) {
        None => {
            problems.push(problem(obj, None, &raw.name, "missing node name".into()));
            return None;
        }
        Some("") => {
            problems.push(problem(obj, None, &raw.name, "empty node name".into()));
            return None;
        }
        Some(n) if n.contains(char::is_whitespace) => {
            problems.push(problem(
                obj,
                None,
                &raw.name,
                format!("node name {n:?} contains whitespace"),
            ));
            return None;
        }
        Some(n) => n.to_string(),
    };
    let node = Some(name.as_str());

    let mut addr = |f: &RawField, what: &str| -> Option<IpAddr> {
        let Some(text) = f.value.as_deref() else {
            problems.push(problem(obj, node, f, format!("missing {what}")));
            return None;
        };
        match text.trim().parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() => {
                problems.push(problem(
                    obj,
                    node,
                    f,
                    format!("{what} {ip} is not a usable unicast address"),
                ));
                None
            }
            Ok(ip) => Some(ip),
            Err(_) if text.contains('/') => {
                problems.push(problem(
                    obj,
                    node,
                    f,
                    format!("{what} {text:?} must be a plain IP address, without a prefix length"),
                ));
                None
            }
            Err(_) => {
                problems.push(problem(
                    obj,
                    node,
                    f,
                    format!("{what} {text:?} is not an IP address"),
                ));
                None
            }
        }
    };
    let node_ip = addr(&raw.node_ip, "node address");
    // No VTEP at all is a node of an IPIP or no-encap pool, not a broken one.
    let without_vtep = raw.vtep_ip.value.is_none();
    let vtep_ip = if without_vtep {
        None
    } else {
        addr(&raw.vtep_ip, "VTEP address")
    };

    let (vtep_mac, vtep_mac_derived) = match raw.vtep_mac.value.as_deref().map(str::trim) {
        None => (Some(MacAddr::derive_like_felix(&name)), true),
        Some(text) => match text.parse::<MacAddr>() {
            Ok(mac) if mac.0[0] & 1 == 1 || mac == MacAddr::default() => {
                problems.push(problem(
                    obj,
                    node,
                    &raw.vtep_mac,
                    format!("VTEP MAC {mac} is not a unicast address"),
                ));
                (None, false)
            }
            Ok(mac) => (Some(mac), false),
            Err(e) => {
                // Never fall back to the derived MAC: the published one is what the peers use.
                problems.push(problem(obj, node, &raw.vtep_mac, e.to_string()));
                (None, false)
            }
        },
    };

    let (node_ipv6, ipv6, ipv6_invalid) = validate_ipv6(obj, &name, &raw, problems);

    let mut blocks: Vec<(IpNet, RawField)> = Vec::new();
    for f in raw.blocks {
        let text = f.value.as_deref().unwrap_or("").trim();
        let net = match text.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => {
                let message = if text.parse::<IpAddr>().is_ok() {
                    format!("block {text:?} has no prefix length (expected a CIDR like 10.1.235.128/26)")
                } else {
                    format!("block {text:?} is not a CIDR")
                };
                problems.push(problem(obj, node, &f, message));
                continue;
            }
        };
        if net.trunc() != net {
            problems.push(problem(
                obj,
                node,
                &f,
                format!(
                    "block {net} has host bits set (the network is {}); skipped, not guessed",
                    net.trunc()
                ),
            ));
            continue;
        }
        // Duplicates within the node stay until the conflict check (each may be reported).
        blocks.push((net, f));
    }

    let mut borrowed: Vec<(IpNet, RawField)> = Vec::new();
    for f in raw.borrowed {
        let text = f.value.as_deref().unwrap_or("").trim();
        let net = match text.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => match text.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    problems.push(problem(
                        obj,
                        node,
                        &f,
                        format!("borrowed address {text:?} is not an IP address"),
                    ));
                    continue;
                }
            },
        };
        if net.prefix_len() != net.max_prefix_len() {
            problems.push(problem(
                obj,
                node,
                &f,
                format!(
                    "borrowed address {net} must be a single address (/{})",
                    net.max_prefix_len()
                ),
            ));
            continue;
        }
        borrowed.push((net, f));
    }

    Some(Candidate {
        index,
        object: raw.object,
        name_field: raw.name.field,
        vtep_field: raw.vtep_ip.field,
        vtep_mac_field: raw.vtep_mac.field,
        name,
        rejected: node_ip.is_none() || (!without_vtep && (vtep_ip.is_none() || vtep_mac.is_none())),
        node_ip,
        vtep_ip,
        vtep_mac,
        vtep_mac_derived,
        blocks,
        borrowed,
        node_ipv6,
        ipv6,
        vtep_ipv6_field: raw.vtep_ipv6.field,
        ipv6_invalid,
    })
}

/// The IPv6 side of a dual-stack node: `(node_ipv6, endpoint, invalid)`. A problem here
/// leaves the node's IPv4 overlay alone: only its IPv6 claims become unverifiable.
fn validate_ipv6(
    obj: &str,
    name: &str,
    raw: &RawNode,
    problems: &mut Vec<DatastoreProblem>,
) -> (Option<IpAddr>, Option<Ipv6Side>, bool) {
    let node = Some(name);
    let mut invalid = false;
    let mut v6 = |f: &RawField, what: &str, invalid: &mut bool| -> Option<IpAddr> {
        let text = f.value.as_deref()?.trim();
        let message = match text.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V6(a))
                if !(a.is_unspecified() || a.is_multicast() || a.is_loopback()) =>
            {
                return Some(ip)
            }
            Ok(IpAddr::V4(_)) => format!("{what} {text} is not an IPv6 address"),
            Ok(ip) => format!("{what} {ip} is not a usable unicast address"),
            Err(_) if text.contains('/') => {
                format!("{what} {text:?} must be a plain IP address, without a prefix length")
            }
            Err(_) => format!("{what} {text:?} is not an IP address"),
        };
        problems.push(problem(obj, node, f, message));
        *invalid = true;
        None
    };
    let node_ipv6 = v6(&raw.node_ipv6, "IPv6 node address", &mut invalid);
    let vtep_ipv6 = v6(&raw.vtep_ipv6, "IPv6 VTEP address", &mut invalid);
    if raw.vtep_ipv6.value.is_none() {
        return (node_ipv6, None, invalid);
    }
    let vtep_mac = match raw.vtep_mac_v6.value.as_deref().map(str::trim) {
        None => Some((MacAddr::derive_like_felix(&format!("{name}-v6")), true)),
        Some(text) => match text.parse::<MacAddr>() {
            Ok(mac) if mac.0[0] & 1 == 0 && mac != MacAddr::default() => Some((mac, false)),
            Ok(mac) => {
                problems.push(problem(
                    obj,
                    node,
                    &raw.vtep_mac_v6,
                    format!("IPv6 VTEP MAC {mac} is not a unicast address"),
                ));
                None
            }
            Err(e) => {
                problems.push(problem(obj, node, &raw.vtep_mac_v6, e.to_string()));
                None
            }
        },
    };
    if raw.node_ipv6.value.is_none() {
        problems.push(problem(
            obj,
            node,
            &raw.node_ipv6,
            "missing IPv6 node address (the FDB destination of the IPv6 VTEP)".to_string(),
        ));
    }
    match (node_ipv6, vtep_ipv6, vtep_mac) {
        (Some(node_ip), Some(vtep_ip), Some((vtep_mac, vtep_mac_derived))) => (
            Some(node_ip),
            Some(Ipv6Side {
                node_ip,
                vtep_ip,
                vtep_mac,
                vtep_mac_derived,
            }),
            invalid,
        ),
        _ => (node_ipv6, None, true),
    }
}

/// Reject every node sharing a key that must be unique; one problem per node, naming the
/// others. Records already rejected still count (their claim is in the datastore).
fn reject_duplicates(
    candidates: &mut [Candidate],
    problems: &mut Vec<DatastoreProblem>,
    key: impl Fn(&Candidate) -> Option<String>,
    field: impl Fn(&Candidate) -> String,
    what: &str,
) {
    let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        if let Some(k) = key(c) {
            by_key.entry(k).or_default().push(i);
        }
    }
    for (k, idxs) in by_key.into_iter().filter(|(_, v)| v.len() > 1) {
        for &i in &idxs {
            let others: Vec<String> = idxs
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| describe_record(&candidates[j], what == "node name"))
                .collect();
            let c = &candidates[i];
            problems.push(DatastoreProblem {
                object: c.object.clone(),
                node: Some(c.name.clone()),
                field: field(c),
                message: format!(
                    "{what} {k} is also used by {}; all of them are skipped",
                    others.join(", ")
                ),
            });
        }
        for &i in &idxs {
            candidates[i].rejected = true;
        }
    }
}

fn describe_record(c: &Candidate, by_position: bool) -> String {
    if by_position {
        format!("entry #{} ({})", c.index + 1, c.name_field)
    } else {
        format!("node {}", c.name)
    }
}

/// Drop every block (or borrowed address) that two different nodes claim, or that overlaps
/// another node's, from both; one problem per dropped entry naming the other node.
fn drop_conflicting_claims(
    candidates: &mut [Candidate],
    problems: &mut Vec<DatastoreProblem>,
    unverifiable: &mut Vec<IpNet>,
    claims: impl Fn(&mut Candidate) -> &mut Vec<(IpNet, RawField)>,
    what: &str,
) {
    // (node position, net) for every claim; sorted so overlaps are adjacent-ish and the
    // output order is stable.
    let mut all: Vec<(IpNet, usize)> = Vec::new();
    for (i, c) in candidates.iter_mut().enumerate() {
        for (net, _) in claims(c).iter() {
            all.push((*net, i));
        }
    }
    all.sort();
    // Conflicting (node position, net) → the names of the other claimants.
    let mut conflicts: BTreeMap<(usize, IpNet), BTreeSet<String>> = BTreeMap::new();
    for (a_pos, &(a, ai)) in all.iter().enumerate() {
        // Sorted by network address then prefix: everything `a` contains follows it, and
        // stops at the first net whose network address is outside `a`.
        for &(b, bi) in &all[a_pos + 1..] {
            if !a.contains(&b.network()) {
                break;
            }
            if candidates[ai].name == candidates[bi].name {
                continue; // Same node (or a duplicate record, already rejected).
            }
            let (an, bn) = (candidates[ai].name.clone(), candidates[bi].name.clone());
            conflicts
                .entry((ai, a))
                .or_default()
                .insert(format!("{bn} ({b})"));
            conflicts
                .entry((bi, b))
                .or_default()
                .insert(format!("{an} ({a})"));
        }
    }
    for ((i, net), others) in conflicts {
        let c = &mut candidates[i];
        let (name, object) = (c.name.clone(), c.object.clone());
        let list = claims(c);
        let others: Vec<String> = others.into_iter().collect();
        // Every entry for that network (a node may list it twice), each reported.
        let (gone, kept): (Vec<_>, Vec<_>) = list.drain(..).partition(|(n, _)| *n == net);
        *list = kept;
        unverifiable.push(net);
        for (_, f) in gone {
            let message = format!(
                "{what} {net} of node {name} conflicts with {}; skipped for all of them, not guessed",
                others.join(", ")
            );
            problems.push(problem(&object, Some(&name), &f, message));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record shaped the way a Kubernetes source would build it: fields named by their
    /// annotation, blocks coming from separate IPAMBlock objects.
    fn kube_node(name: &str, node_ip: &str, vtep: &str, blocks: &[(&str, &str)]) -> RawNode {
        let ann = |k: &str| format!("metadata.annotations[projectcalico.org/{k}]");
        RawNode {
            object: format!("Node/{name}"),
            name: RawField::new("metadata.name", Some(name.to_string())),
            node_ip: RawField::new(ann("IPv4Address"), Some(node_ip.to_string())),
            vtep_ip: RawField::new(ann("IPv4VXLANTunnelAddr"), Some(vtep.to_string())),
            vtep_mac: RawField::new(ann("VXLANTunnelMACAddr"), None),
            blocks: blocks
                .iter()
                .map(|(obj, cidr)| RawField {
                    field: "spec.cidr".into(),
                    value: Some(cidr.to_string()),
                    object: Some(format!("IPAMBlock/{obj}")),
                })
                .collect(),
            borrowed: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn problems_name_the_object_and_field_each_value_came_from() {
        let s = build(
            "kubernetes",
            "a",
            vec![
                kube_node("a", "192.168.1.1", "10.0.0.0", &[("b1", "10.0.0.0/26")]),
                kube_node("b", "192.168.1.2/24", "10.0.1.0", &[("b2", "10.0.1.0/26")]),
                kube_node("c", "192.168.1.3", "10.0.2.0", &[("b3", "10.0.2.1/26")]),
            ],
            vec![],
        );
        assert_eq!(
            s.problems,
            vec![
                DatastoreProblem {
                    object: "Node/b".into(),
                    node: Some("b".into()),
                    field: "metadata.annotations[projectcalico.org/IPv4Address]".into(),
                    message: "node address \"192.168.1.2/24\" must be a plain IP address, without a prefix length".into(),
                },
                DatastoreProblem {
                    object: "IPAMBlock/b3".into(),
                    node: Some("c".into()),
                    field: "spec.cidr".into(),
                    message: "block 10.0.2.1/26 has host bits set (the network is 10.0.2.0/26); skipped, not guessed".into(),
                },
            ]
        );
        assert_eq!(s.nodes.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert!(s.nodes["c"].blocks.is_empty());
        assert_eq!(s.nodes["a"].vtep_mac, MacAddr::derive_like_felix("a"));
        assert!(s.nodes["a"].vtep_mac_derived);
        assert_eq!(s.source, "kubernetes");
    }

    #[test]
    fn invalid_local_node_is_reported_as_such() {
        let s = build(
            "kubernetes",
            "a",
            vec![kube_node("a", "nope", "10.0.0.0", &[])],
            vec![],
        );
        assert!(s.nodes.is_empty());
        assert_eq!(s.problems.len(), 2);
        assert_eq!(s.problems[1].field, "nodes");
        assert!(s.problems[1].message.contains("has an invalid entry"));
    }

    #[test]
    fn problems_from_the_source_are_kept_first() {
        let earlier = DatastoreProblem {
            object: "IPAMBlock/x".into(),
            node: None,
            field: "spec.affinity".into(),
            message: "affinity \"zone:x\" is not host:<node>".into(),
        };
        let s = build(
            "kubernetes",
            "a",
            vec![kube_node("a", "192.168.1.1", "10.0.0.0", &[])],
            vec![earlier.clone()],
        );
        assert_eq!(s.problems, vec![earlier]);
    }
}
