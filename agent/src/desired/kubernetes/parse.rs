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

use super::calico_config::{cluster_settings, Pools};
pub use super::calico_config::{FelixConfigInfo, PoolEncap, PoolInfo};
use crate::{
    desired::{RawField, RawNode},
    model::{DatastoreProblem, DesiredState, MacAddr},
};

pub const ANN_CALICO_VTEP: &str = "projectcalico.org/IPv4VXLANTunnelAddr";
pub const ANN_CALICO_ADDRESS: &str = "projectcalico.org/IPv4Address";
pub const ANN_CALICO_MAC: &str = "projectcalico.org/VXLANTunnelMACAddr";
pub const ANN_CALICO_VTEP_V6: &str = "projectcalico.org/IPv6VXLANTunnelAddr";
pub const ANN_CALICO_ADDRESS_V6: &str = "projectcalico.org/IPv6Address";
pub const ANN_CALICO_MAC_V6: &str = "projectcalico.org/VXLANTunnelMACAddrV6";
pub const ANN_FLANNEL_BACKEND: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANN_FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const ANN_FLANNEL_BACKEND_V6: &str = "flannel.alpha.coreos.com/backend-v6-data";
pub const ANN_FLANNEL_PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";

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
    pub calico_vtep_v6: Option<String>,
    pub calico_address_v6: Option<String>,
    pub calico_mac_v6: Option<String>,
    pub flannel_backend: Option<String>,
    pub flannel_public_ip: Option<String>,
    pub flannel_backend_v6: Option<String>,
    pub flannel_public_ipv6: Option<String>,
    pub pod_cidr: Option<String>,
    /// `spec.podCIDRs`: on a dual-stack node, one CIDR per family.
    pub pod_cidrs: Vec<String>,
}

impl NodeInfo {
    pub fn from_object(obj: &LiteObject) -> Self {
        NodeInfo {
            calico_vtep: obj.annotation(ANN_CALICO_VTEP),
            calico_address: obj.annotation(ANN_CALICO_ADDRESS),
            calico_mac: obj.annotation(ANN_CALICO_MAC),
            calico_vtep_v6: obj.annotation(ANN_CALICO_VTEP_V6),
            calico_address_v6: obj.annotation(ANN_CALICO_ADDRESS_V6),
            calico_mac_v6: obj.annotation(ANN_CALICO_MAC_V6),
            flannel_backend: obj.annotation(ANN_FLANNEL_BACKEND),
            flannel_public_ip: obj.annotation(ANN_FLANNEL_PUBLIC_IP),
            flannel_backend_v6: obj.annotation(ANN_FLANNEL_BACKEND_V6),
            flannel_public_ipv6: obj.annotation(ANN_FLANNEL_PUBLIC_IPV6),
            pod_cidrs: obj
                .spec
                .get("podCIDRs")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
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
#[derive(Clone, Copy)]
pub struct CacheView<'a> {
    pub nodes: &'a BTreeMap<String, NodeInfo>,
    pub blocks: &'a BTreeMap<String, BlockInfo>,
    pub affinities: &'a BTreeMap<String, AffinityInfo>,
    /// `None`: IPPools are not read (not served, or forbidden): every block is taken as VXLAN.
    pub pools: Option<&'a BTreeMap<String, PoolInfo>>,
    /// `None`: FelixConfigurations are not read: the config keys apply.
    pub felix: Option<&'a BTreeMap<String, FelixConfigInfo>>,
    /// What could not be read and why, for the status.
    pub notes: &'a [String],
}

impl<'a> CacheView<'a> {
    /// Nodes, blocks and affinities only (flannel, or Calico without its configuration).
    pub fn new(
        nodes: &'a BTreeMap<String, NodeInfo>,
        blocks: &'a BTreeMap<String, BlockInfo>,
        affinities: &'a BTreeMap<String, AffinityInfo>,
    ) -> Self {
        CacheView {
            nodes,
            blocks,
            affinities,
            pools: None,
            felix: None,
            notes: &[],
        }
    }
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

/// `projectcalico.org/IPv6Address` is a CIDR (`fd00:77::3/64`): the address, or the raw text
/// for the validation to reject with its field.
fn calico_v6_address(info: &NodeInfo) -> RawField {
    let value = info.calico_address_v6.as_deref().map(|raw| {
        parse_ip_maybe_cidr(raw).map_or_else(|| raw.trim().to_string(), |ip| ip.to_string())
    });
    RawField::new(ann_field(ANN_CALICO_ADDRESS_V6), value)
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
    out.cluster.notes.extend(view.notes.iter().cloned());
    if let Some(felix) = view.felix {
        let notes = std::mem::take(&mut out.cluster.notes);
        out.cluster = cluster_settings(felix, &out.local_node, &mut out.problems);
        out.cluster.notes.splice(0..0, notes);
    }
    // No pool at all cannot be a working Calico cluster: more likely a partial install or a
    // read that saw nothing. Judging every block as off the overlay would hide every fault.
    let pools = match view.pools {
        Some(p) if p.is_empty() => {
            out.cluster
                .notes
                .push("no IPPools listed: every block is taken as VXLAN".to_string());
            None
        }
        Some(p) => Some(Pools::build(p, &mut out.problems)),
        None => None,
    };
    out.cluster.pools_known = pools.is_some();
    // Block ownership from IPAMBlocks: what Felix routes by.
    // The CIDR as written (host bits are the shared validation's to reject), and where.
    let mut blocks_of: BTreeMap<String, Vec<RawField>> = BTreeMap::new();
    let mut borrowed_of: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
    // Blocks (and borrowed addresses) whose pool is not VXLAN, per node.
    let mut off_overlay_of: BTreeMap<String, Vec<RawField>> = BTreeMap::new();
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
        let off_overlay = pools.as_ref().and_then(|p| p.off_overlay_reason(&cidr));
        if let Some(owner) = owner {
            let field = RawField {
                field: "spec.cidr".to_string(),
                value: block.cidr.as_deref().map(|c| c.trim().to_string()),
                object: Some(object.clone()),
            };
            match &off_overlay {
                None => blocks_of.entry(owner.to_string()).or_default().push(field),
                Some(why) => {
                    tracing::debug!(block = %cidr, node = owner, why = %why, "block not carried by VXLAN");
                    off_overlay_of
                        .entry(owner.to_string())
                        .or_default()
                        .push(field);
                }
            }
            owner_of_cidr.insert(cidr, owner.to_string());
        }
        for (ordinal, node) in &block.foreign {
            match nth_address(&cidr, *ordinal) {
                Some(ip) if off_overlay.is_some() => off_overlay_of
                    .entry(node.clone())
                    .or_default()
                    .push(RawField {
                        field: "spec.attributes[secondary]".to_string(),
                        value: Some(IpNet::from(ip).to_string()),
                        object: Some(object.clone()),
                    }),
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
    let mut off_overlay_nets: Vec<IpNet> = Vec::new();
    for (name, info) in view.nodes {
        let object = format!("Node/{name}");
        let mut blocks = blocks_of.remove(name).unwrap_or_default();
        let borrowed = sorted(borrowed_of.remove(name).unwrap_or_default());
        let off_overlay = off_overlay_of.remove(name).unwrap_or_default();
        let Some(vtep_raw) = info.calico_vtep.as_deref() else {
            if pools.is_some() && !blocks.is_empty() {
                // Its blocks are in VXLAN pools, but without a VTEP no node can reach them.
                out.problems.push(problem(
                    object,
                    Some(name),
                    &ann_field(ANN_CALICO_VTEP),
                    format!(
                        "missing, but the node owns {} block(s) of VXLAN pools: Felix cannot \
                         route to them, and routes to them cannot be verified",
                        blocks.len()
                    ),
                ));
                continue;
            }
            // A node of IPIP or no-encap pools (or pools unknown): no VXLAN expectations,
            // but its blocks must never be sent over the overlay.
            if blocks.is_empty() && off_overlay.is_empty() && borrowed.is_empty() {
                continue; // Not (yet) a Calico node: nothing to check.
            }
            let Some(node_ip) = info.calico_address.as_deref().and_then(parse_ip_maybe_cidr) else {
                out.problems.push(problem(
                    object,
                    Some(name),
                    &ann_field(ANN_CALICO_VTEP),
                    format!(
                        "missing, and so is a valid {ANN_CALICO_ADDRESS}, but the node owns {} \
                         IPAM block(s): routes to them cannot be verified",
                        blocks.len() + off_overlay.len()
                    ),
                ));
                continue;
            };
            let (off_borrowed, off_blocks): (Vec<RawField>, Vec<RawField>) = off_overlay
                .into_iter()
                .partition(|f| f.field == "spec.attributes[secondary]");
            blocks.extend(off_blocks);
            records.push(RawNode {
                object,
                name: RawField::new("metadata.name", Some(name.clone())),
                node_ip: RawField::new(ann_field(ANN_CALICO_ADDRESS), Some(node_ip.to_string())),
                vtep_ip: RawField::new(ann_field(ANN_CALICO_VTEP), None),
                vtep_mac: RawField::new(ann_field(ANN_CALICO_MAC), None),
                node_ipv6: calico_v6_address(info),
                vtep_ipv6: RawField::new(ann_field(ANN_CALICO_VTEP_V6), None),
                vtep_mac_v6: RawField::new(ann_field(ANN_CALICO_MAC_V6), None),
                blocks,
                borrowed: borrowed
                    .iter()
                    .map(|b| RawField::new("spec.attributes[secondary]", Some(b.to_string())))
                    .chain(off_borrowed)
                    .collect(),
            });
            continue;
        };
        if name == &out.local_node {
            // Local blocks are local whatever their pool: never a peer's, never on the overlay.
            blocks.extend(off_overlay.into_iter().filter(|f| f.field == "spec.cidr"));
        } else {
            off_overlay_nets.extend(
                off_overlay
                    .iter()
                    .filter_map(|f| f.value.as_deref()?.parse::<IpNet>().ok()),
            );
        }
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
            node_ipv6: calico_v6_address(info),
            vtep_ipv6: RawField::new(
                ann_field(ANN_CALICO_VTEP_V6),
                info.calico_vtep_v6.as_deref().map(|v| v.trim().to_string()),
            ),
            vtep_mac_v6: RawField::new(
                ann_field(ANN_CALICO_MAC_V6),
                info.calico_mac_v6.as_deref().map(|m| m.trim().to_string()),
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
    out.off_overlay = sorted(off_overlay_nets);
}

/// The validation every source shares (`desired::build`), over the records this source's
/// annotation checks accepted.
fn validate(view: &CacheView, records: Vec<RawNode>, out: &mut DesiredState) {
    let problems = std::mem::take(&mut out.problems);
    let built = crate::desired::build(out.source.clone(), &out.local_node, records, problems);
    out.nodes = built.nodes;
    out.problems = built.problems;
    out.unverifiable = built.unverifiable;
    out.non_vxlan = built.non_vxlan;
    if view.nodes.contains_key(&out.local_node)
        && !out.nodes.contains_key(&out.local_node)
        && !out.non_vxlan.contains_key(&out.local_node)
    {
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

/// flannel's IPv6 side of a dual-stack node (`backend-v6-data`, `public-ipv6`, the IPv6 entry
/// of `spec.podCIDRs`): `(node_ipv6, vtep_ipv6, vtep_mac_v6, IPv6 subnet)` as raw fields for
/// the shared validation, or `None` on a single-stack node. A broken IPv6 side is a problem
/// and its subnet is returned in `unverifiable`.
fn flannel_v6(
    object: &str,
    name: &str,
    info: &NodeInfo,
    problems: &mut Vec<DatastoreProblem>,
    unverifiable: &mut Vec<IpNet>,
) -> Option<[RawField; 4]> {
    let subnet = info
        .pod_cidrs
        .iter()
        .filter_map(|c| c.trim().parse::<IpNet>().ok())
        .find(|c| c.addr().is_ipv6())
        .map(|c| c.trunc());
    // host-gw and single-stack nodes publish "null" or nothing.
    let backend = info
        .flannel_backend_v6
        .as_deref()
        .filter(|b| !matches!(b.trim(), "" | "null"))?;
    let mac_field = format!("{}.VtepMAC", ann_field(ANN_FLANNEL_BACKEND_V6));
    let broken = |field: &str, message: String, problems: &mut Vec<DatastoreProblem>| {
        problems.push(problem(object.to_string(), Some(name), field, message));
    };
    let Some(subnet) = subnet else {
        broken(
            "spec.podCIDRs",
            format!("no IPv6 CIDR, but {ANN_FLANNEL_BACKEND_V6} is set"),
            problems,
        );
        return None;
    };
    let mac = match serde_json::from_str::<FlannelBackend>(backend) {
        Ok(FlannelBackend { vtep_mac: Some(m) }) => m,
        Ok(FlannelBackend { vtep_mac: None }) => {
            broken(&mac_field, "missing".to_string(), problems);
            unverifiable.push(subnet);
            return None;
        }
        Err(e) => {
            broken(
                &ann_field(ANN_FLANNEL_BACKEND_V6),
                format!("not the expected JSON {{\"VNI\":…,\"VtepMAC\":…}}: {e}"),
                problems,
            );
            unverifiable.push(subnet);
            return None;
        }
    };
    Some([
        RawField::new(
            ann_field(ANN_FLANNEL_PUBLIC_IPV6),
            info.flannel_public_ipv6
                .as_deref()
                .map(|v| v.trim().to_string()),
        ),
        // As for IPv4: the subnet's network address is the VTEP.
        RawField::new("spec.podCIDRs", Some(subnet.network().to_string())),
        RawField::new(mac_field, Some(mac.trim().to_string())),
        RawField::new("spec.podCIDRs", Some(subnet.to_string())),
    ])
}

fn build_flannel(view: &CacheView, out: &mut DesiredState) {
    let mut records: Vec<RawNode> = Vec::new();
    let mut unverifiable_v6: Vec<IpNet> = Vec::new();
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
        let v6 = flannel_v6(&object, name, info, &mut out.problems, &mut unverifiable_v6);
        let mut blocks = vec![RawField::new(
            "spec.podCIDR",
            info.pod_cidr.as_deref().map(|c| c.trim().to_string()),
        )];
        let [node_ipv6, vtep_ipv6, vtep_mac_v6] = match v6 {
            Some([node_ipv6, vtep_ipv6, vtep_mac_v6, subnet]) => {
                blocks.push(subnet);
                [node_ipv6, vtep_ipv6, vtep_mac_v6]
            }
            None => Default::default(),
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
            blocks,
            borrowed: Vec::new(),
            node_ipv6,
            vtep_ipv6,
            vtep_mac_v6,
        });
    }
    validate(view, records, out);
    out.unverifiable.extend(unverifiable_v6);
    out.unverifiable.sort();
    out.unverifiable.dedup();
}

#[cfg(test)]
mod tests;
