//! The data the checks reason about: what the kernel has ([`ObservedState`]), what the datastore
//! says it should have ([`DesiredState`]), and what is wrong ([`Finding`]). Plain data, no I/O.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
    time::SystemTime,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod remedy;
pub use remedy::{hint, Remedy, PROTO_BOOT};

/// An Ethernet address, printed and parsed as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Felix's VTEP MAC for a node that does not publish one: 0x66 followed by the first five
    /// bytes of sha1(seed), where seed is the node name (`name + "-v6"` for IPv6).
    pub fn derive_like_felix(seed: &str) -> Self {
        use sha1::{Digest, Sha1};
        let digest = Sha1::digest(seed.as_bytes());
        let mut mac = [0u8; 6];
        mac[0] = 0x66;
        mac[1..].copy_from_slice(&digest[..5]);
        MacAddr(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a MAC address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex bytes like 66:aa:bb:cc:dd:ee")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut mac {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// Observed (kernel) state
// ---------------------------------------------------------------------------------------------

/// Everything the checks need from one network namespace, per watched overlay device.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ObservedState {
    /// Keyed by device name (`vxlan.calico`). A watched device that does not exist is absent.
    pub devices: BTreeMap<String, ObservedDevice>,
    /// Main-table unicast routes with a gateway via devices that are NOT watched, by destination.
    /// Calico in CrossSubnet mode routes the blocks of same-subnet peers this way (`<block> via
    /// <node IP> dev eth0`), so a block missing from the overlay device may be routed here.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub direct_routes: BTreeMap<IpNet, DirectRoute>,
}

/// A main-table route via a non-overlay device: a direct route to a peer (with a gateway) or
/// a connected subnet (without).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DirectRoute {
    pub ifindex: u32,
    pub gateway: Option<IpAddr>,
}

/// One overlay device and the routes, neighbours and FDB entries that point out of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ObservedDevice {
    pub link: LinkInfo,
    /// Routes (any table) whose output interface is this device.
    pub routes: Vec<Route>,
    /// IPv4/IPv6 neighbour entries on this device.
    pub neighbours: Vec<Neighbour>,
    /// AF_BRIDGE forwarding entries on this device (VXLAN remote destinations).
    pub fdb: Vec<FdbEntry>,
}

/// Link attributes of an overlay device.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    /// `IFLA_INFO_KIND`, e.g. `vxlan`.
    pub kind: Option<String>,
    pub vni: Option<u32>,
    /// UDP destination port.
    pub port: Option<u16>,
    pub learning: Option<bool>,
    /// Local (source) underlay address of the tunnel, if set.
    pub local: Option<IpAddr>,
    /// Administratively and operationally up (IFF_UP).
    pub up: bool,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    /// Addresses configured on the device (Calico: the node's own VTEP as a /32).
    pub addresses: Vec<IpNet>,
    /// Flow-based (`external`, collect-metadata): the VNI and remote come per packet from a
    /// program (Calico's eBPF dataplane), so the device has no VNI and uses no FDB.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
}

/// Route type (`rtm_type`), only the ones that matter here are distinguished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteKind {
    Unicast,
    Blackhole,
    Unreachable,
    Prohibit,
    Local,
    Other,
}

/// A route whose output interface is an overlay device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub onlink: bool,
    /// `rtm_protocol` (3 = boot, Calico's default; 80 = Calico's own on newer releases).
    pub protocol: u8,
    pub table: u32,
    pub kind: RouteKind,
    pub metric: Option<u32>,
}

impl Route {
    /// The route as `ip route` prints it, for messages and fix hints.
    pub fn display(&self, device: &str) -> String {
        let mut s = match self.kind {
            RouteKind::Blackhole => format!("blackhole {}", self.destination),
            _ => self.destination.to_string(),
        };
        if let Some(gw) = self.gateway {
            s.push_str(&format!(" via {gw}"));
        }
        if self.kind != RouteKind::Blackhole {
            s.push_str(&format!(" dev {device}"));
        }
        if self.protocol != 3 {
            s.push_str(&format!(" proto {}", self.protocol));
        }
        if self.onlink {
            s.push_str(" onlink");
        }
        s
    }
}

/// Neighbour cache state (`NUD_*` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct NeighState(pub u16);

impl NeighState {
    pub const INCOMPLETE: u16 = 0x01;
    pub const REACHABLE: u16 = 0x02;
    pub const STALE: u16 = 0x04;
    pub const DELAY: u16 = 0x08;
    pub const PROBE: u16 = 0x10;
    pub const FAILED: u16 = 0x20;
    pub const NOARP: u16 = 0x40;
    pub const PERMANENT: u16 = 0x80;

    /// A usable link-layer address: permanent, reachable, or one the kernel still sends to
    /// while it re-verifies (stale/delay/probe).
    pub fn is_resolved(self) -> bool {
        self.0
            & (Self::PERMANENT
                | Self::REACHABLE
                | Self::STALE
                | Self::DELAY
                | Self::PROBE
                | Self::NOARP)
            != 0
    }

    pub fn is_permanent(self) -> bool {
        self.0 & Self::PERMANENT != 0
    }

    /// Lower-case name as `ip neigh` prints it (`incomplete`, `failed`, `permanent`, …).
    pub fn name(self) -> String {
        const NAMES: [(u16, &str); 8] = [
            (NeighState::INCOMPLETE, "incomplete"),
            (NeighState::REACHABLE, "reachable"),
            (NeighState::STALE, "stale"),
            (NeighState::DELAY, "delay"),
            (NeighState::PROBE, "probe"),
            (NeighState::FAILED, "failed"),
            (NeighState::NOARP, "noarp"),
            (NeighState::PERMANENT, "permanent"),
        ];
        let names: Vec<&str> = NAMES
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, n)| *n)
            .collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(",")
        }
    }
}

/// A neighbour (ARP/NDP) entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Option<MacAddr>,
    pub state: NeighState,
}

/// A VXLAN forwarding entry: frames for `mac` are encapsulated to `destination`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub destination: Option<IpAddr>,
    pub permanent: bool,
}

// ---------------------------------------------------------------------------------------------
// Desired (datastore) state
// ---------------------------------------------------------------------------------------------

/// What the datastore says the overlay should look like, seen from `local_node`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DesiredState {
    /// Where this came from (`file:/etc/...`, `kubernetes`), for messages.
    pub source: String,
    pub local_node: String,
    /// Every node, including the local one, keyed by name.
    pub nodes: BTreeMap<String, PeerNode>,
    /// Datastore entries that failed validation: their peers are skipped, never checked
    /// against garbage, and each one is reported.
    pub problems: Vec<DatastoreProblem>,
    /// Networks claimed by entries that failed validation (a rejected node's blocks, a block
    /// two nodes claim). Routes to them are neither expected nor stray: they are not judged.
    pub unverifiable: Vec<IpNet>,
    /// Nodes without a VTEP (IPIP or no-encap pools only): no VXLAN expectations, but their
    /// blocks must never be routed over the overlay.
    pub non_vxlan: BTreeMap<String, NonVxlanNode>,
    /// Blocks of nodes with a VTEP that the overlay does not carry: their IP pool is IPIP or
    /// no-encap, or no pool covers them any more (a deleted pool). Felix routes them elsewhere
    /// or not at all, so they are neither expected on the overlay nor judged there.
    pub off_overlay: Vec<IpNet>,
    /// What the cluster's own configuration says about the overlay, where it was read.
    pub cluster: ClusterSettings,
    /// The IPv6 overlay seen as its own desired state, built on first use ([`Self::ipv6`]).
    /// A state is built, then only read: whoever changes `nodes` afterwards resets this.
    #[serde(skip)]
    pub ipv6_view: Ipv6View,
}

/// A cache of [`DesiredState::ipv6`]: derived data, so it never makes two states differ.
#[derive(Debug, Clone, Default)]
pub struct Ipv6View(std::sync::OnceLock<Box<DesiredState>>);

impl PartialEq for Ipv6View {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The overlay's settings as the cluster configures them (Calico `FelixConfiguration`, read
/// with the Kubernetes datastore: `node.<name>` over `default`). `None`: not set there, or
/// not readable; the config keys and the profile's defaults apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FelixVxlan {
    pub vxlan_vni: Option<u32>,
    pub vxlan_port: Option<u16>,
    pub vxlan_mtu: Option<u32>,
    pub vxlan_mtu_v6: Option<u32>,
    /// Calico's eBPF dataplane (`bpfEnabled`): a flow-based `vxlan.calico`, no FDB.
    pub bpf_enabled: Option<bool>,
}

impl FelixVxlan {
    /// Each field of `self`, else `base`'s.
    pub fn over(self, base: &FelixVxlan) -> FelixVxlan {
        FelixVxlan {
            vxlan_vni: self.vxlan_vni.or(base.vxlan_vni),
            vxlan_port: self.vxlan_port.or(base.vxlan_port),
            vxlan_mtu: self.vxlan_mtu.or(base.vxlan_mtu),
            vxlan_mtu_v6: self.vxlan_mtu_v6.or(base.vxlan_mtu_v6),
            bpf_enabled: self.bpf_enabled.or(base.bpf_enabled),
        }
    }
}

/// What the cluster's own configuration says about the overlay, and what could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterSettings {
    /// In effect for the local node: its `node.<name>` FelixConfiguration over `default`.
    pub felix: FelixVxlan,
    /// `FelixConfiguration/default`.
    pub felix_default: FelixVxlan,
    /// `FelixConfiguration/node.<name>`, per node: the local node may be known only later
    /// (found by address).
    pub felix_nodes: BTreeMap<String, FelixVxlan>,
    /// IP pools were read: blocks outside VXLAN pools are [`DesiredState::off_overlay`].
    pub pools_known: bool,
    /// What was read from where, and what could not be read and why (status shows these).
    pub notes: Vec<String>,
}

impl ClusterSettings {
    /// The settings in effect for `node`.
    pub fn resolve_for(&mut self, node: &str) {
        self.felix = self
            .felix_nodes
            .get(node)
            .map_or(self.felix_default, |n| n.over(&self.felix_default));
    }
}

/// A node the overlay does not reach: it has no VTEP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonVxlanNode {
    pub name: String,
    pub node_ip: IpAddr,
    /// IPv6 underlay address on a dual-stack node, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ipv6: Option<IpAddr>,
    pub blocks: Vec<IpNet>,
    pub borrowed: Vec<IpNet>,
}

impl DesiredState {
    /// Remote nodes (every node except the local one).
    pub fn peers(&self) -> impl Iterator<Item = &PeerNode> {
        self.nodes
            .values()
            .filter(move |n| n.name != self.local_node)
    }

    /// The IPv6 overlay (`vxlan-v6.calico`, `flannel-v6.<VNI>`) as a desired state of its own:
    /// each dual-stack node with its IPv6 node address, VTEP and VTEP MAC, and only its IPv6
    /// blocks; a node without an IPv6 VTEP is a non-VXLAN node there. The checks then judge
    /// the v6 device exactly as the v4 one. Without any dual-stack node this is `self` (an
    /// IPv6-only cluster publishes its VTEP as the node's only one).
    pub fn ipv6(&self) -> &DesiredState {
        if !self.nodes.values().any(|n| n.ipv6.is_some()) {
            return self;
        }
        self.ipv6_view
            .0
            .get_or_init(|| Box::new(self.build_ipv6_view()))
    }

    fn build_ipv6_view(&self) -> DesiredState {
        let v6 = |nets: &[IpNet]| -> Vec<IpNet> {
            nets.iter()
                .filter(|n| n.addr().is_ipv6())
                .copied()
                .collect()
        };
        let mut nodes = BTreeMap::new();
        let mut non_vxlan = BTreeMap::new();
        for n in self.nodes.values() {
            match &n.ipv6 {
                Some(side) => {
                    nodes.insert(
                        n.name.clone(),
                        PeerNode {
                            name: n.name.clone(),
                            node_ip: side.node_ip,
                            vtep_ip: side.vtep_ip,
                            vtep_mac: side.vtep_mac,
                            vtep_mac_derived: side.vtep_mac_derived,
                            blocks: v6(&n.blocks),
                            borrowed: v6(&n.borrowed),
                            ipv6: None,
                        },
                    );
                }
                None => {
                    non_vxlan.insert(
                        n.name.clone(),
                        NonVxlanNode {
                            name: n.name.clone(),
                            node_ip: n.node_ip,
                            node_ipv6: None,
                            blocks: v6(&n.blocks),
                            borrowed: v6(&n.borrowed),
                        },
                    );
                }
            }
        }
        for n in self.non_vxlan.values() {
            non_vxlan.insert(
                n.name.clone(),
                NonVxlanNode {
                    name: n.name.clone(),
                    node_ip: n.node_ipv6.unwrap_or(n.node_ip),
                    node_ipv6: None,
                    blocks: v6(&n.blocks),
                    borrowed: v6(&n.borrowed),
                },
            );
        }
        DesiredState {
            source: self.source.clone(),
            local_node: self.local_node.clone(),
            nodes,
            // Reported once, with the whole state.
            problems: Vec::new(),
            unverifiable: v6(&self.unverifiable),
            non_vxlan,
            off_overlay: v6(&self.off_overlay),
            cluster: self.cluster.clone(),
            ipv6_view: Ipv6View::default(),
        }
    }

    /// When the local node's name (host name) is not in the datastore (clouds name nodes
    /// differently), the one node whose `node_ip` is an address of this host is the local
    /// node: it must never be judged as its own peer. Returns the name adopted, if any.
    pub fn adopt_local_by_address(&mut self, local_addresses: &[IpAddr]) -> Option<&str> {
        if self.nodes.contains_key(&self.local_node)
            || self.non_vxlan.contains_key(&self.local_node)
        {
            return None;
        }
        let mut mine = self
            .nodes
            .values()
            .map(|n| (&n.name, n.node_ip))
            .chain(self.non_vxlan.values().map(|n| (&n.name, n.node_ip)))
            .filter(|(_, ip)| local_addresses.contains(ip));
        let found = mine.next()?.0.clone();
        if mine.next().is_some() {
            // Ambiguous (two nodes claim one of our addresses): leave it to datastore-invalid.
            return None;
        }
        // The validation could not find the host name among the nodes; now it is found.
        let old = std::mem::replace(&mut self.local_node, found);
        self.ipv6_view = Ipv6View::default();
        self.cluster.resolve_for(&self.local_node);
        self.problems
            .retain(|p| !(p.field == "nodes" && p.node.as_deref() == Some(old.as_str())));
        Some(&self.local_node)
    }
}

/// One node as the datastore describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerNode {
    pub name: String,
    /// Underlay address: the FDB destination for this node's VTEP MAC.
    pub node_ip: IpAddr,
    /// Tunnel endpoint address: the gateway of routes to this node's blocks.
    pub vtep_ip: IpAddr,
    pub vtep_mac: MacAddr,
    /// True when `vtep_mac` was derived like Felix rather than published.
    pub vtep_mac_derived: bool,
    /// Pod address blocks affine to this node.
    pub blocks: Vec<IpNet>,
    /// Single addresses this node uses from other nodes' blocks (routed as /32).
    pub borrowed: Vec<IpNet>,
    /// The node's IPv6 overlay endpoint, on a dual-stack node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Side>,
}

/// A dual-stack node's IPv6 overlay endpoint (Calico `IPv6Address`, `IPv6VXLANTunnelAddr`,
/// `VXLANTunnelMACAddrV6`; file `node_ipv6`, `vtep_ipv6`, `vtep_mac_v6`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ipv6Side {
    /// IPv6 underlay address: the FDB destination of the IPv6 VTEP MAC.
    pub node_ip: IpAddr,
    pub vtep_ip: IpAddr,
    pub vtep_mac: MacAddr,
    /// Derived like Felix from `name + "-v6"` rather than published.
    pub vtep_mac_derived: bool,
}

/// A datastore entry that could not be used, with enough context to find and fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatastoreProblem {
    /// Where: file path or Kubernetes object (`Node/k8s03`).
    pub object: String,
    /// The node it concerns, if known.
    pub node: Option<String>,
    /// The field at fault (`vtep_ip`, `blocks[2]`, `metadata.annotations[...]`).
    pub field: String,
    pub message: String,
}

/// IPv4 network base address of a block (`10.1.235.128` for `10.1.235.128/26`).
pub fn network_address(net: &IpNet) -> IpAddr {
    net.network()
}

/// Convenience for tests and the file source.
pub fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

// ---------------------------------------------------------------------------------------------
// Findings
// ---------------------------------------------------------------------------------------------

/// Stable check identifiers (DESIGN.md §3). Serialized in kebab-case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckId {
    GatewayWrongVtep,
    GatewayNotAVtep,
    GatewayIsNetworkAddress,
    NeighbourUnresolved,
    NeighbourMacMismatch,
    FdbMissing,
    FdbWrongDestination,
    RouteMissing,
    RouteStale,
    TrafficBlackholed,
    DropsUnexplained,
    DeviceMissing,
    DeviceMisconfigured,
    DatastoreInvalid,
    DatastoreStale,
    KubeletWatchStalled,
    PodStuckTerminating,
    KubeletUnverifiable,
    RouteWrongDevice,
    /// Raised by repair, not by a check: something keeps undoing a repair (DESIGN §8).
    RepairContested,
}

impl CheckId {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckId::GatewayWrongVtep => "gateway-wrong-vtep",
            CheckId::GatewayNotAVtep => "gateway-not-a-vtep",
            CheckId::GatewayIsNetworkAddress => "gateway-is-network-address",
            CheckId::NeighbourUnresolved => "neighbour-unresolved",
            CheckId::NeighbourMacMismatch => "neighbour-mac-mismatch",
            CheckId::FdbMissing => "fdb-missing",
            CheckId::FdbWrongDestination => "fdb-wrong-destination",
            CheckId::RouteMissing => "route-missing",
            CheckId::RouteStale => "route-stale",
            CheckId::TrafficBlackholed => "traffic-blackholed",
            CheckId::DropsUnexplained => "drops-unexplained",
            CheckId::DeviceMissing => "device-missing",
            CheckId::DeviceMisconfigured => "device-misconfigured",
            CheckId::DatastoreInvalid => "datastore-invalid",
            CheckId::DatastoreStale => "datastore-stale",
            CheckId::KubeletWatchStalled => "kubelet-watch-stalled",
            CheckId::PodStuckTerminating => "pod-stuck-terminating",
            CheckId::KubeletUnverifiable => "kubelet-unverifiable",
            CheckId::RouteWrongDevice => "route-wrong-device",
            CheckId::RepairContested => "repair-contested",
        }
    }
}

impl fmt::Display for CheckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ordered so that `max()` is the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        })
    }
}

/// Supporting facts for a finding. Every field is optional; absent ones are not serialized.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neighbour_state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neighbour_mac: Option<MacAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_mac: Option<MacAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fdb_destination: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_fdb_destination: Option<IpAddr>,
    /// Every route this finding covers (one peer-level problem may span several blocks).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub routes: Vec<String>,
    /// Packets dropped toward the peer since the problem was first seen (eBPF).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drops: Option<u64>,
    /// Drop reasons seen, by kernel name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub drop_reasons: BTreeMap<String, u64>,
    /// Free-form facts that do not fit above (`vni`, `port`, `datastore field`, …).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub details: BTreeMap<String, String>,
}

/// What repair did, or would do, about a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairInfo {
    /// `route-replace`, `neigh-replace`, `fdb-replace`, …
    pub action: String,
    /// `planned`, `applied`, `failed`, `refused`, `contested`.
    pub status: String,
    /// The equivalent `ip`/`bridge` command, for a human to run or audit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One problem, with everything an SRE needs to act on it.
/// Address family an overlay device carries (`vxlan.calico` IPv4, `vxlan-v6.calico` IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    #[serde(rename = "ipv4")]
    V4,
    #[serde(rename = "ipv6")]
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub check: CheckId,
    pub severity: Severity,
    pub device: String,
    /// The family of the overlay the finding is about (`ipv4`, `ipv6`); None for findings
    /// about no overlay device (the datastore, the kubelet).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub family: Option<Family>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_gateway: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_node: Option<String>,
    /// When the problem was first seen (set by whoever tracks findings over time).
    #[serde(
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub since: Option<SystemTime>,
    pub message: String,
    /// The exact command that would fix it, when one is known (rendered from `remedies` when
    /// there are any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The kernel writes that fix it, in order; empty when no write can (device down,
    /// datastore problems, drops).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub remedies: Vec<Remedy>,
    pub evidence: Evidence,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairInfo>,
}

impl Finding {
    pub fn new(check: CheckId, severity: Severity, device: &str, message: String) -> Self {
        Finding {
            check,
            severity,
            device: device.to_string(),
            family: None,
            route: None,
            gateway: None,
            expected_gateway: None,
            peer_node: None,
            since: None,
            message,
            hint: None,
            remedies: Vec::new(),
            evidence: Evidence::default(),
            repair: None,
        }
    }

    /// Sets the kernel writes that fix this finding, and the hint rendered from them.
    pub fn set_remedies(&mut self, remedies: Vec<Remedy>) {
        self.hint = hint(&remedies);
        self.remedies = remedies;
    }

    /// Identity of a finding across re-evaluations (so `since` survives): check, device, and
    /// the peer with the gateway that is wrong for it, or the route when no peer is involved.
    /// A per-peer finding groups all of the peer's routes; which one it names first changes as
    /// they are repaired one by one, and that must not make it a new problem.
    pub fn key(&self) -> (CheckId, String, Option<String>, Option<String>) {
        let detail = match (&self.peer_node, self.check) {
            // A stale route is a problem of its own, even when it shadows a peer's block; a
            // contested repair is one per object.
            (Some(_), check)
                if check != CheckId::RouteStale && check != CheckId::RepairContested =>
            {
                self.gateway.map(|g| g.to_string())
            }
            _ => self.route.clone(),
        };
        (
            self.check,
            self.device.clone(),
            self.peer_node.clone(),
            detail,
        )
    }
}

/// Findings as the daemon's open list holds them (tests).
#[cfg(test)]
pub(crate) fn shared(findings: &[Finding]) -> Vec<std::sync::Arc<Finding>> {
    findings.iter().cloned().map(std::sync::Arc::new).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac: MacAddr = "66:0a:BB:cc:dd:ee".parse().unwrap();
        assert_eq!(mac.to_string(), "66:0a:bb:cc:dd:ee");
        for bad in [
            "",
            "66:aa",
            "66:aa:bb:cc:dd:ee:ff",
            "zz:aa:bb:cc:dd:ee",
            "666:a:b:c:d:e",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn felix_mac_derivation_matches_sha1_prefix() {
        let mac = MacAddr::derive_like_felix("k8s03");
        assert_eq!(mac.0[0], 0x66);
        use sha1::{Digest, Sha1};
        let d = Sha1::digest(b"k8s03");
        assert_eq!(&mac.0[1..], &d[..5]);
        assert_ne!(mac, MacAddr::derive_like_felix("k8s03-v6"));
    }

    #[test]
    fn neighbour_state_classification() {
        assert!(!NeighState(NeighState::INCOMPLETE).is_resolved());
        assert!(!NeighState(NeighState::FAILED).is_resolved());
        assert!(!NeighState(0).is_resolved());
        assert!(NeighState(NeighState::PERMANENT).is_resolved());
        assert!(NeighState(NeighState::STALE).is_resolved());
        assert_eq!(NeighState(NeighState::INCOMPLETE).name(), "incomplete");
    }

    #[test]
    fn route_displays_like_ip_route() {
        let r = Route {
            destination: "10.1.235.128/26".parse().unwrap(),
            gateway: Some(v4(10, 1, 235, 128)),
            onlink: true,
            protocol: 3,
            table: 254,
            kind: RouteKind::Unicast,
            metric: None,
        };
        assert_eq!(
            r.display("vxlan.calico"),
            "10.1.235.128/26 via 10.1.235.128 dev vxlan.calico onlink"
        );
    }

    #[test]
    fn finding_json_uses_contract_names() {
        let mut f = Finding::new(
            CheckId::GatewayWrongVtep,
            Severity::Critical,
            "vxlan.calico",
            "x".into(),
        );
        f.expected_gateway = Some(v4(10, 1, 235, 133));
        let j = serde_json::to_value(&f).unwrap();
        assert_eq!(j["check"], "gateway-wrong-vtep");
        assert_eq!(j["severity"], "critical");
        assert_eq!(j["expected_gateway"], "10.1.235.133");
    }
}
