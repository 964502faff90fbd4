//! Pure half of the Kubernetes source: Kubernetes objects → compact cache entries → a validated
//! [`DesiredState`]. No I/O, so every rule here is unit-tested with plain JSON.
//!
//! The cache keeps only the few fields the checks need (a handful of strings per Node, a CIDR
//! and a list of borrowed ordinals per block), never whole objects: at 5,000 nodes a full Node
//! with its image list is tens of KiB, the compact entry well under one.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use kube::api::ObjectMeta;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::{
    desired::{RawField, RawNode},
    model::{DatastoreProblem, DesiredState, MacAddr},
};

pub const ANN_CALICO_VTEP: &str = "projectcalico.org/IPv4VXLANTunnelAddr";
pub const ANN_CALICO_ADDRESS: &str = "projectcalico.org/IPv4Address";
pub const ANN_CALICO_MAC: &str = "projectcalico.org/VXLANTunnelMACAddr";
pub const ANN_FLANNEL_BACKEND: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANN_FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";

/// Which CNI's annotations describe the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeProfile {
    /// Calico VXLAN: Node annotations + IPAMBlocks (+ BlockAffinities as a cross-check).
    #[default]
    Calico,
    /// flannel VXLAN: Node annotations + `spec.podCIDR`; no IPAM objects are watched.
    Flannel,
}

/// The part of any object we deserialize: metadata (without managedFields) and `spec`.
/// `status` and everything else is skipped by serde without being built.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct LiteObject {
    #[serde(default, deserialize_with = "meta_without_managed_fields")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}

fn meta_without_managed_fields<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let mut meta = ObjectMeta::deserialize(d)?;
    meta.managed_fields = None;
    Ok(meta)
}

impl LiteObject {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }
    fn annotation(&self, key: &str) -> Option<String> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Compact cache entries
// ---------------------------------------------------------------------------------------------

/// What a Node contributes, still as raw strings: validation happens when the desired state is
/// built, so a bad value is reported (and re-reported) as a problem rather than lost at ingest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub calico_vtep: Option<String>,
    pub calico_address: Option<String>,
    pub calico_mac: Option<String>,
    pub flannel_backend: Option<String>,
    pub flannel_public_ip: Option<String>,
    pub pod_cidr: Option<String>,
}

impl NodeInfo {
    pub fn from_object(obj: &LiteObject) -> Self {
        NodeInfo {
            calico_vtep: obj.annotation(ANN_CALICO_VTEP),
            calico_address: obj.annotation(ANN_CALICO_ADDRESS),
            calico_mac: obj.annotation(ANN_CALICO_MAC),
            flannel_backend: obj.annotation(ANN_FLANNEL_BACKEND),
            flannel_public_ip: obj.annotation(ANN_FLANNEL_PUBLIC_IP),
            pod_cidr: obj
                .spec
                .get("podCIDR")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }
}

/// An IPAMBlock reduced to ownership facts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockInfo {
    pub cidr: Option<String>,
    /// `spec.affinity` verbatim (`host:k8s03`).
    pub affinity: Option<String>,
    pub deleted: bool,
    /// (ordinal in the block, node using it) for allocations whose node is not the block's
    /// affine host: that node borrowed the address and is routed to as a /32.
    pub foreign: Vec<(u32, String)>,
    /// Problems found while reducing (field, message): reported at build time.
    pub problems: Vec<(String, String)>,
}

impl BlockInfo {
    pub fn from_object(obj: &LiteObject) -> Self {
        let spec = &obj.spec;
        let mut info = BlockInfo {
            cidr: spec.get("cidr").and_then(Value::as_str).map(str::to_string),
            affinity: spec
                .get("affinity")
                .and_then(Value::as_str)
                .map(str::to_string),
            deleted: truthy(spec.get("deleted")),
            ..Default::default()
        };
        let owner = info
            .affinity
            .as_deref()
            .and_then(|a| a.strip_prefix("host:"));
        let attributes = spec.get("attributes").and_then(Value::as_array);
        let Some(allocations) = spec.get("allocations").and_then(Value::as_array) else {
            return info;
        };
        for (ordinal, slot) in allocations.iter().enumerate() {
            let Some(attr_index) = slot.as_u64() else {
                if !slot.is_null() {
                    info.problems.push((
                        format!("spec.allocations[{ordinal}]"),
                        format!("expected an attribute index or null, found {slot}"),
                    ));
                }
                continue;
            };
            let Some(attr) = attributes.and_then(|a| a.get(attr_index as usize)) else {
                info.problems.push((
                    format!("spec.allocations[{ordinal}]"),
                    format!("refers to attribute {attr_index}, which does not exist"),
                ));
                continue;
            };
            // Calico writes the using node under `secondary.node`; accept a top-level `node`.
            let node = attr
                .get("secondary")
                .and_then(|s| s.get("node"))
                .or_else(|| attr.get("node"))
                .and_then(Value::as_str);
            if let Some(node) = node {
                if Some(node) != owner {
                    info.foreign.push((ordinal as u32, node.to_string()));
                }
            }
        }
        info
    }
}

/// A BlockAffinity: which node claims which CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AffinityInfo {
    pub node: Option<String>,
    pub cidr: Option<String>,
    pub state: Option<String>,
    pub deleted: bool,
}

impl AffinityInfo {
    pub fn from_object(obj: &LiteObject) -> Self {
        let spec = &obj.spec;
        let s = |k: &str| spec.get(k).and_then(Value::as_str).map(str::to_string);
        AffinityInfo {
            node: s("node"),
            cidr: s("cidr"),
            state: s("state"),
            // A string ("true"/"false") in crd.projectcalico.org/v1, maybe a bool in v3.
            deleted: truthy(spec.get("deleted")),
        }
    }
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Building the desired state
// ---------------------------------------------------------------------------------------------

/// Everything the cache holds, borrowed for one build.
pub struct CacheView<'a> {
    pub nodes: &'a BTreeMap<String, NodeInfo>,
    pub blocks: &'a BTreeMap<String, BlockInfo>,
    pub affinities: &'a BTreeMap<String, AffinityInfo>,
}

/// Validates the cache into a [`DesiredState`]. Every bad value becomes a [`DatastoreProblem`]
/// naming the object and field, and the node it concerns is left out rather than guessed at.
pub fn build_desired(profile: KubeProfile, local_node: &str, view: &CacheView) -> DesiredState {
    let mut out = DesiredState {
        source: "kubernetes".to_string(),
        local_node: local_node.to_string(),
        ..Default::default()
    };
    match profile {
        KubeProfile::Calico => build_calico(view, &mut out),
        KubeProfile::Flannel => build_flannel(view, &mut out),
    }
    out
}

fn problem(object: String, node: Option<&str>, field: &str, message: String) -> DatastoreProblem {
    DatastoreProblem {
        object,
        node: node.map(str::to_string),
        field: field.to_string(),
        message,
    }
}

fn ann_field(key: &str) -> String {
    format!("metadata.annotations[{key}]")
}

/// Parses `10.0.0.1` or `10.0.0.1/24` (Calico's IPv4Address is a CIDR) to the address.
fn parse_ip_maybe_cidr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<IpNet>().ok().map(|n| n.addr()))
}

fn nth_address(net: &IpNet, ordinal: u32) -> Option<IpAddr> {
    let size_bits = net.max_prefix_len() - net.prefix_len();
    if size_bits < 32 && u64::from(ordinal) >= (1u64 << size_bits) {
        return None;
    }
    Some(match net.network() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).checked_add(ordinal)?)),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
            u128::from(a).checked_add(u128::from(ordinal))?,
        )),
    })
}

fn build_calico(view: &CacheView, out: &mut DesiredState) {
    // Block ownership from IPAMBlocks: what Felix routes by.
    // The CIDR as written (host bits are the shared validation's to reject), and where.
    let mut blocks_of: BTreeMap<String, Vec<RawField>> = BTreeMap::new();
    let mut borrowed_of: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
    let mut owner_of_cidr: BTreeMap<IpNet, String> = BTreeMap::new();
    for (name, block) in view.blocks {
        let object = format!("IPAMBlock/{name}");
        if block.deleted {
            continue;
        }
        let owner = block
            .affinity
            .as_deref()
            .and_then(|a| a.strip_prefix("host:"));
        for (field, message) in &block.problems {
            out.problems
                .push(problem(object.clone(), owner, field, message.clone()));
        }
        let cidr = match block.cidr.as_deref().map(|c| c.trim().parse::<IpNet>()) {
            Some(Ok(c)) => c.trunc(),
            Some(Err(e)) => {
                out.problems.push(problem(
                    object,
                    owner,
                    "spec.cidr",
                    format!(
                        "{:?} is not a CIDR: {e}",
                        block.cidr.as_deref().unwrap_or("")
                    ),
                ));
                continue;
            }
            None => {
                out.problems
                    .push(problem(object, owner, "spec.cidr", "missing".to_string()));
                continue;
            }
        };
        if let Some(owner) = owner {
            blocks_of
                .entry(owner.to_string())
                .or_default()
                .push(RawField {
                    field: "spec.cidr".to_string(),
                    value: block.cidr.as_deref().map(|c| c.trim().to_string()),
                    object: Some(object.clone()),
                });
            owner_of_cidr.insert(cidr, owner.to_string());
        }
        for (ordinal, node) in &block.foreign {
            match nth_address(&cidr, *ordinal) {
                Some(ip) => borrowed_of
                    .entry(node.clone())
                    .or_default()
                    .push(IpNet::from(ip)),
                None => out.problems.push(problem(
                    object.clone(),
                    Some(node),
                    &format!("spec.allocations[{ordinal}]"),
                    format!("ordinal {ordinal} lies outside block {cidr}"),
                )),
            }
        }
    }

    // BlockAffinities only cross-check: a confirmed claim that disagrees with the block's own
    // affinity means Calico's IPAM is inconsistent, and routes may follow either.
    for (name, aff) in view.affinities {
        if aff.deleted || aff.state.as_deref() != Some("confirmed") {
            continue;
        }
        let object = format!("BlockAffinity/{name}");
        let node = aff.node.as_deref();
        let cidr = match aff.cidr.as_deref().map(|c| c.trim().parse::<IpNet>()) {
            Some(Ok(c)) => c.trunc(),
            _ => {
                out.problems.push(problem(
                    object,
                    node,
                    "spec.cidr",
                    format!("{:?} is not a CIDR", aff.cidr.as_deref().unwrap_or("")),
                ));
                continue;
            }
        };
        if let (Some(node), Some(owner)) = (node, owner_of_cidr.get(&cidr)) {
            if node != owner {
                out.problems.push(problem(
                    object,
                    Some(node),
                    "spec.node",
                    format!(
                        "affinity for {cidr} is confirmed for {node} but the IPAMBlock is affine \
                         to {owner}"
                    ),
                ));
            }
        }
    }

    // Annotation format is checked here; the values themselves, and everything across
    // nodes (duplicate VTEPs, conflicting blocks, host bits), by the validation every source
    // shares.
    let mut records: Vec<RawNode> = Vec::new();
    for (name, info) in view.nodes {
        let object = format!("Node/{name}");
        let blocks = blocks_of.remove(name).unwrap_or_default();
        let borrowed = sorted(borrowed_of.remove(name).unwrap_or_default());
        let Some(vtep_raw) = info.calico_vtep.as_deref() else {
            // No VTEP and no blocks: not (yet) a Calico VXLAN node, nothing to check.
            if !blocks.is_empty() {
                out.problems.push(problem(
                    object,
                    Some(name),
                    &ann_field(ANN_CALICO_VTEP),
                    format!(
                        "missing, but the node owns {} IPAM block(s): routes to them cannot \
                         be verified",
                        blocks.len()
                    ),
                ));
            }
            continue;
        };
        let node_ip = match info.calico_address.as_deref() {
            None => {
                out.problems.push(problem(
                    object,
                    Some(name),
                    &ann_field(ANN_CALICO_ADDRESS),
                    "missing: the FDB destination of this node's VTEP is unknown".to_string(),
                ));
                continue;
            }
            Some(raw) => match parse_ip_maybe_cidr(raw) {
                Some(ip) => ip,
                None => {
                    out.problems.push(problem(
                        object,
                        Some(name),
                        &ann_field(ANN_CALICO_ADDRESS),
                        format!("{raw:?} is not an IP address or CIDR"),
                    ));
                    continue;
                }
            },
        };
        records.push(RawNode {
            object,
            name: RawField::new("metadata.name", Some(name.clone())),
            node_ip: RawField::new(ann_field(ANN_CALICO_ADDRESS), Some(node_ip.to_string())),
            vtep_ip: RawField::new(
                ann_field(ANN_CALICO_VTEP),
                Some(vtep_raw.trim().to_string()),
            ),
            vtep_mac: RawField::new(
                ann_field(ANN_CALICO_MAC),
                info.calico_mac.as_deref().map(|m| m.trim().to_string()),
            ),
            blocks,
            borrowed: borrowed
                .iter()
                .map(|b| RawField {
                    field: "spec.attributes[secondary]".to_string(),
                    value: Some(b.to_string()),
                    object: None,
                })
                .collect(),
        });
    }
    validate(view, records, out);
}

/// The validation every source shares (`desired::build`), over the records this source's
/// annotation checks accepted.
fn validate(view: &CacheView, records: Vec<RawNode>, out: &mut DesiredState) {
    let problems = std::mem::take(&mut out.problems);
    let built = crate::desired::build(out.source.clone(), &out.local_node, records, problems);
    out.nodes = built.nodes;
    out.problems = built.problems;
    out.unverifiable = built.unverifiable;
    if view.nodes.contains_key(&out.local_node) && !out.nodes.contains_key(&out.local_node) {
        // The local Node exists but has no VXLAN tunnel (yet): it is in the datastore, and
        // has no VXLAN blocks to be confused with a peer's.
        let local = out.local_node.clone();
        out.problems
            .retain(|p| !(p.field == "nodes" && p.node.as_deref() == Some(local.as_str())));
    }
}

fn sorted(mut v: Vec<IpNet>) -> Vec<IpNet> {
    v.sort();
    v.dedup();
    v
}

#[derive(Deserialize)]
struct FlannelBackend {
    #[serde(rename = "VtepMAC")]
    vtep_mac: Option<String>,
}

fn build_flannel(view: &CacheView, out: &mut DesiredState) {
    let mut records: Vec<RawNode> = Vec::new();
    for (name, info) in view.nodes {
        let object = format!("Node/{name}");
        let (Some(backend_raw), Some(public_raw)) = (
            info.flannel_backend.as_deref(),
            info.flannel_public_ip.as_deref(),
        ) else {
            if info.flannel_backend.is_some() || info.flannel_public_ip.is_some() {
                let missing = if info.flannel_backend.is_none() {
                    ANN_FLANNEL_BACKEND
                } else {
                    ANN_FLANNEL_PUBLIC_IP
                };
                out.problems.push(problem(
                    object,
                    Some(name),
                    &ann_field(missing),
                    "missing while the other flannel annotation is present".to_string(),
                ));
            }
            // Neither: flannel has not registered this node; nothing to check.
            continue;
        };
        let vtep_mac = match serde_json::from_str::<FlannelBackend>(backend_raw) {
            Ok(FlannelBackend {
                vtep_mac: Some(mac),
            }) => match mac.parse::<MacAddr>() {
                Ok(m) => m,
                Err(e) => {
                    out.problems.push(problem(
                        object,
                        Some(name),
                        &format!("{}.VtepMAC", ann_field(ANN_FLANNEL_BACKEND)),
                        e.to_string(),
                    ));
                    continue;
                }
            },
            Ok(FlannelBackend { vtep_mac: None }) => {
                out.problems.push(problem(
                    object,
                    Some(name),
                    &format!("{}.VtepMAC", ann_field(ANN_FLANNEL_BACKEND)),
                    "missing".to_string(),
                ));
                continue;
            }
            Err(e) => {
                out.problems.push(problem(
                    object,
                    Some(name),
                    &ann_field(ANN_FLANNEL_BACKEND),
                    format!("not the expected JSON {{\"VNI\":…,\"VtepMAC\":…}}: {e}"),
                ));
                continue;
            }
        };
        let Some(node_ip) = parse_ip_maybe_cidr(public_raw) else {
            out.problems.push(problem(
                object,
                Some(name),
                &ann_field(ANN_FLANNEL_PUBLIC_IP),
                format!("{public_raw:?} is not an IP address"),
            ));
            continue;
        };
        let pod_cidr = match info.pod_cidr.as_deref().map(|c| c.trim().parse::<IpNet>()) {
            Some(Ok(c)) => c.trunc(),
            other => {
                let msg = match other {
                    Some(Err(e)) => format!(
                        "{:?} is not a CIDR: {e}",
                        info.pod_cidr.as_deref().unwrap_or("")
                    ),
                    _ => "missing: the node's subnet is unknown".to_string(),
                };
                out.problems
                    .push(problem(object, Some(name), "spec.podCIDR", msg));
                continue;
            }
        };
        records.push(RawNode {
            object,
            name: RawField::new("metadata.name", Some(name.clone())),
            node_ip: RawField::new(ann_field(ANN_FLANNEL_PUBLIC_IP), Some(node_ip.to_string())),
            // flannel routes `S via S.0 onlink`: the subnet's network address is the VTEP.
            vtep_ip: RawField::new("spec.podCIDR", Some(pod_cidr.network().to_string())),
            vtep_mac: RawField::new(
                format!("{}.VtepMAC", ann_field(ANN_FLANNEL_BACKEND)),
                Some(vtep_mac.to_string()),
            ),
            blocks: vec![RawField::new(
                "spec.podCIDR",
                info.pod_cidr.as_deref().map(|c| c.trim().to_string()),
            )],
            borrowed: Vec::new(),
        });
    }
    validate(view, records, out);
}

#[cfg(test)]
mod tests {
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
            &CacheView {
                nodes: &nodes,
                blocks: &blocks,
                affinities: &affinities,
            },
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
            &CacheView {
                nodes: &nodes,
                blocks: &empty_b,
                affinities: &empty_a,
            },
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
        let d = build_desired(
            KubeProfile::Flannel,
            "f2",
            &CacheView {
                nodes: &nodes,
                blocks: &b,
                affinities: &a,
            },
        );
        assert!(
            d.problems.iter().any(|p| p.field == "spec.podCIDR"),
            "{:?}",
            d.problems
        );
    }
}
