//! eBPF: BTF offsets, load/attach, drop and neighbour counters.
//!
//! The daemon and checks see only [`DropCounterSource`]: [`open`] returns the real eBPF source
//! when it could be loaded, or a [`Disabled`] source whose [`EbpfStatus`] says exactly what is
//! missing (not compiled in, no BTF, no privilege, a tracepoint absent, verifier refusal).
//! [`FakeDropCounters`] serves tests.
//!
//! Without eBPF, [`Disabled`] still reports each watched device's own `tx_dropped`/`rx_dropped`
//! (rtnetlink IFLA_STATS64) in [`DropSnapshot::link_stats`]: no reason or peer, but a rising
//! number on the overlay device.
//!
//! Measured on the dev kernel (6.18, 2 vCPU; `agent/tests/ebpf.rs`, BPF run-time stats):
//! - incident scenario (onlink gateway with no neighbour/FDB): data packets dropped on the
//!   sender's vxlan device as NEIGH_QUEUEFULL (queue overflow while INCOMPLETE) and
//!   NEIGH_FAILED (queue flushed on failure), each packet exactly once; ARP solicits as
//!   NO_TX_TARGET (class `arp`), which equals the device's own `tx_dropped` delta; one
//!   INCOMPLETE and one FAILED transition per resolution attempt, not per packet.
//! - `enum skb_drop_reason` numbering here: NEIGH_FAILED=58, NEIGH_QUEUEFULL=59,
//!   NO_TX_TARGET=113 (other builds differ: always resolve from BTF).
//! - cost per event (`cargo xtask bench ebpf`, drop storm of ~150k drops/s into the incident's
//!   blackhole, kernel run-time stats; interleaved runs of old and new objects): kfree_skb
//!   counted 405 ns → 270 ns (mean of 3 each) after moving device counters to a per-CPU
//!   array, device slots to an array and putting a per-CPU cache in front of the LPM trie;
//!   filtered out (other netns) 80–90 ns either way, which is also the floor of the
//!   measurement (stats clock reads + trampoline). What is left on the counted path, measured
//!   by removing it: ~45 ns the bpf_probe_read_kernel helper, ~55 ns the cold packet cache
//!   line it reads (the inner destination), ~50 ns array/cache work. neigh_event_send_done
//!   (per packet while unresolved) 250 → 190 ns counted, 80 ns filtered. A cache keyed by
//!   `skb->hash` did not help: locally sent UDP has no flow hash at drop time.
//! - a fresh vxlan device with IPv6 enabled emits MLD/RS that VXLAN drops as NO_TX_TARGET
//!   (class `ipv6`) when there is no default FDB entry.

pub mod bench;
pub mod btf;
pub mod linkstats;
mod loader;
pub mod offsets;
mod peers;
mod snapshot;
pub mod window;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Serialize;

use crate::model::DesiredState;
pub use linkstats::{read_link_drop_stats, LinkDropStats};
pub use loader::{EbpfDropCounters, HeaderRead, EBPF_OBJECT};
pub use window::{device_names, DeviceRates, DropRates, DropWindow, PeerRates, Rate};

/// Errors of the eBPF layer. Load-time problems do not surface here but as an [`EbpfStatus`].
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF map {map}: {source}")]
    MapIo {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("{count} peer blocks exceed the map capacity {capacity}")]
    TooManyBlocks { count: usize, capacity: u32 },
    #[error("{count} watched devices exceed the map capacity {capacity}")]
    TooManyDevices { count: usize, capacity: u32 },
    #[error("program {program}: {source}")]
    Program {
        program: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("reading device counters over rtnetlink: {0}")]
    LinkStats(#[source] std::io::Error),
    #[error("enabling BPF run-time stats: {0}")]
    Stats(#[source] std::io::Error),
    #[error("attaching the benchmark baseline program: {0}")]
    Bench(String),
}

/// What a dropped skb was, from `skb->protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrafficClass {
    /// IPv4: data toward a peer. Its drops are data loss.
    Ipv4,
    /// ARP: gateway resolution (control). Dropped solicits mean an unresolvable neighbour.
    Arp,
    /// IPv6 to a unicast address: data toward a peer, as IPv4.
    Ipv6,
    /// IPv6 to a multicast group: neighbour solicitations (ARP's IPv6 twin), router
    /// solicitations, listener reports. Control: the overlays route no pod multicast.
    Ipv6Multicast,
    Other,
}

impl TrafficClass {
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            agent_ebpf::CLASS_IPV4 => TrafficClass::Ipv4,
            agent_ebpf::CLASS_ARP => TrafficClass::Arp,
            agent_ebpf::CLASS_IPV6 => TrafficClass::Ipv6,
            agent_ebpf::CLASS_IPV6_MULTICAST => TrafficClass::Ipv6Multicast,
            _ => TrafficClass::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TrafficClass::Ipv4 => "ipv4",
            TrafficClass::Arp => "arp",
            TrafficClass::Ipv6 => "ipv6",
            TrafficClass::Ipv6Multicast => "ipv6-multicast",
            TrafficClass::Other => "other",
        }
    }

    /// Whether drops of this class are data loss (as opposed to control traffic).
    pub fn is_data(self) -> bool {
        matches!(self, TrafficClass::Ipv4 | TrafficClass::Ipv6)
    }
}

/// Packets dropped on one watched device, for one reason, class and peer, since load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DropCount {
    pub ifindex: u32,
    /// Kernel name without prefix (`NEIGH_FAILED`), resolved from this kernel's BTF.
    pub reason: String,
    pub class: TrafficClass,
    /// Peer node whose block holds the inner IPv4/IPv6 destination; None when unknown or not
    /// data.
    pub peer: Option<String>,
    pub packets: u64,
}

/// Neighbour state a transition went into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NeighTarget {
    Incomplete,
    Failed,
}

/// Transitions of neighbour entries on a watched device into INCOMPLETE or FAILED, since load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NeighTransitionCount {
    pub ifindex: u32,
    /// The neighbour (gateway) address; None for the per-device total, which is never evicted
    /// (per-gateway entries live in a bounded LRU map).
    pub gateway: Option<IpAddr>,
    pub state: NeighTarget,
    pub transitions: u64,
}

/// Events the programs could not account precisely (map full, header unreadable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Overflow {
    pub drops_map_full: u64,
    pub neigh_map_full: u64,
    pub header_unreadable: u64,
}

/// Monotonic counters since the programs were loaded, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DropSnapshot {
    /// Per device (ifindex; [`RETIRED_IFINDEX`] for devices no longer watched), reason,
    /// class and peer.
    pub drops: Vec<DropCount>,
    /// Counts of peers that left the datastore, per device, reason and class (no peer): part
    /// of the device totals, in no window (they moved here, they did not just happen).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub departed: Vec<DropCount>,
    pub neighbour_transitions: Vec<NeighTransitionCount>,
    pub overflow: Overflow,
    /// Device counters of the watched devices; filled only by the fallback ([`Disabled`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub link_stats: Vec<LinkDropStats>,
}

/// The ifindex under which counts of devices no longer watched are kept: per-peer totals stay
/// monotonic when an overlay device is re-created, and windows skip them (moved, not new).
pub const RETIRED_IFINDEX: u32 = 0;

impl DropSnapshot {
    /// Data (IPv4 and IPv6) packets dropped toward `peer`, by reason.
    pub fn data_drops_to_peer(&self, peer: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for d in &self.drops {
            if d.class.is_data() && d.peer.as_deref() == Some(peer) {
                *out.entry(d.reason.clone()).or_default() += d.packets;
            }
        }
        out
    }

    /// All packets dropped on `ifindex`, by reason (the `vxlan_drops_total{device,reason}` metric).
    pub fn drops_by_reason(&self, ifindex: u32) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for d in self
            .drops
            .iter()
            .chain(&self.departed)
            .filter(|d| d.ifindex == ifindex)
        {
            *out.entry(d.reason.clone()).or_default() += d.packets;
        }
        out
    }

    /// Per-device total of transitions into `state` (the `neighbour_unresolved_total` metric
    /// counts `Failed`).
    pub fn neighbour_total(&self, ifindex: u32, state: NeighTarget) -> u64 {
        self.neighbour_transitions
            .iter()
            .filter(|n| n.ifindex == ifindex && n.gateway.is_none() && n.state == state)
            .map(|n| n.transitions)
            .sum()
    }

    /// Transitions into `state` for one gateway on `ifindex` (0 if evicted or never seen).
    pub fn neighbour_gateway(&self, ifindex: u32, gateway: IpAddr, state: NeighTarget) -> u64 {
        self.neighbour_transitions
            .iter()
            .filter(|n| n.ifindex == ifindex && n.gateway == Some(gateway) && n.state == state)
            .map(|n| n.transitions)
            .sum()
    }
}

/// Overall state of eBPF accounting, for `status --json` (`ebpf`) and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EbpfState {
    /// Every program attached.
    Attached,
    /// Some programs attached (see `programs` for which failed and why).
    Partial,
    /// The agent was built without bpf-linker: the embedded object is empty.
    NotCompiledIn,
    /// Nothing attached; `missing` and `reason` say why.
    Unavailable,
}

/// The prerequisite that was missing when eBPF accounting is unavailable or partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missing {
    /// Built without bpf-linker.
    Object,
    /// `/sys/kernel/btf/vmlinux` absent or lacking a needed type/member.
    Btf,
    /// No CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN), or the kernel refused map/program creation.
    Privilege,
    /// A tracepoint does not exist on this kernel.
    Tracepoint,
    /// The verifier or the kernel rejected a program.
    Load,
    /// The watched network namespace could not be identified.
    Netns,
}

/// One program and whether it is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub tracepoint: String,
    pub attached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What eBPF accounting is doing, or exactly why it is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EbpfStatus {
    pub state: EbpfState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<Missing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub programs: Vec<ProgramStatus>,
}

impl EbpfStatus {
    pub fn unavailable(missing: Missing, reason: impl Into<String>) -> Self {
        EbpfStatus {
            state: if missing == Missing::Object {
                EbpfState::NotCompiledIn
            } else {
                EbpfState::Unavailable
            },
            missing: Some(missing),
            reason: Some(reason.into()),
            programs: Vec::new(),
        }
    }

    /// True when at least the drop counter (kfree_skb) is attached.
    pub fn counting_drops(&self) -> bool {
        self.programs
            .iter()
            .any(|p| p.attached && p.name == agent_ebpf::programs::KFREE_SKB.0)
    }
}

/// Source of kernel drop and neighbour counters. The daemon updates the watched devices (when
/// devices are re-created their ifindex changes) and the peer blocks (when the desired state
/// changes), and reads snapshots.
pub trait DropCounterSource: Send {
    fn status(&self) -> EbpfStatus;
    /// [`Self::status`]'s state alone (asked every drop poll: no copy of the program list).
    fn state(&self) -> EbpfState {
        self.status().state
    }
    /// Replaces the set of watched overlay device ifindexes (in the watched netns).
    fn set_watched_devices(&mut self, ifindexes: &BTreeSet<u32>) -> Result<(), EbpfError>;
    /// Replaces the block → peer mapping (IPv4 and IPv6 blocks, borrowed /32s and /128s).
    /// Peer names keep stable ids for the lifetime of the source, so counters never move
    /// between peers.
    fn set_peer_blocks(&mut self, blocks: &[(String, IpNet)]) -> Result<(), EbpfError>;
    fn snapshot(&self) -> Result<DropSnapshot, EbpfError>;
}

/// (peer name, block) for every remote peer's blocks and borrowed addresses, both families.
pub fn peer_blocks_from_desired(desired: &DesiredState) -> Vec<(String, IpNet)> {
    let mut out = Vec::new();
    for peer in desired.peers() {
        for net in peer.blocks.iter().chain(&peer.borrowed) {
            out.push((peer.name.clone(), net.trunc()));
        }
    }
    out
}

/// Opens eBPF accounting for the network namespace at `netns` (default: the agent's own).
/// Never fails: when the programs cannot run, the returned source is [`Disabled`] and its
/// status says why.
pub fn open(netns: Option<&Path>) -> Box<dyn DropCounterSource> {
    match EbpfDropCounters::load(netns) {
        Ok(counters) => {
            let status = counters.status();
            tracing::info!(state = ?status.state, programs = ?status.programs, "eBPF accounting loaded");
            Box::new(counters)
        }
        Err(status) => {
            tracing::warn!(missing = ?status.missing, reason = ?status.reason, "eBPF accounting unavailable; falling back to device counters");
            Box::new(Disabled::new(status, netns))
        }
    }
}

/// A source without eBPF: the reason in its status, and snapshots holding only the watched
/// devices' own counters ([`DropSnapshot::link_stats`]).
#[derive(Debug, Clone)]
pub struct Disabled {
    pub status: EbpfStatus,
    netns: Option<PathBuf>,
    watched: BTreeSet<u32>,
}

impl Disabled {
    pub fn new(status: EbpfStatus, netns: Option<&Path>) -> Self {
        Disabled {
            status,
            netns: netns.map(Path::to_path_buf),
            watched: BTreeSet::new(),
        }
    }
}

impl DropCounterSource for Disabled {
    fn status(&self) -> EbpfStatus {
        self.status.clone()
    }
    fn set_watched_devices(&mut self, ifindexes: &BTreeSet<u32>) -> Result<(), EbpfError> {
        self.watched = ifindexes.clone();
        Ok(())
    }
    fn set_peer_blocks(&mut self, _: &[(String, IpNet)]) -> Result<(), EbpfError> {
        Ok(())
    }
    fn snapshot(&self) -> Result<DropSnapshot, EbpfError> {
        if self.watched.is_empty() {
            return Ok(DropSnapshot::default());
        }
        let link_stats = read_link_drop_stats(self.netns.as_deref())?
            .into_iter()
            .filter(|l| self.watched.contains(&l.ifindex))
            .collect();
        Ok(DropSnapshot {
            link_stats,
            ..Default::default()
        })
    }
}

/// Test double: returns whatever snapshot the test put in, records what the daemon set.
#[derive(Debug, Clone)]
pub struct FakeDropCounters {
    pub status: EbpfStatus,
    pub snapshot: DropSnapshot,
    pub watched: BTreeSet<u32>,
    pub blocks: Vec<(String, IpNet)>,
}

impl Default for FakeDropCounters {
    fn default() -> Self {
        FakeDropCounters {
            status: EbpfStatus {
                state: EbpfState::Attached,
                missing: None,
                reason: None,
                programs: Vec::new(),
            },
            snapshot: DropSnapshot::default(),
            watched: BTreeSet::new(),
            blocks: Vec::new(),
        }
    }
}

impl DropCounterSource for FakeDropCounters {
    fn status(&self) -> EbpfStatus {
        self.status.clone()
    }
    fn set_watched_devices(&mut self, ifindexes: &BTreeSet<u32>) -> Result<(), EbpfError> {
        self.watched = ifindexes.clone();
        Ok(())
    }
    fn set_peer_blocks(&mut self, blocks: &[(String, IpNet)]) -> Result<(), EbpfError> {
        self.blocks = blocks.to_vec();
        Ok(())
    }
    fn snapshot(&self) -> Result<DropSnapshot, EbpfError> {
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests;
