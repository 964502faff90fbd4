//! Real eBPF accounting: [`EbpfDropCounters`] owns the loaded object and the user-space mirror
//! of what was written into its maps. One job per file:
//! - `object`: the embedded ELF and the kfunc placeholder patched for this kernel;
//! - `attach`: prerequisites, loading (with the helper-path retry) and attaching;
//! - `maps`: writes of the configuration maps and reads of the counters;
//! - `batch`: the one batch lookup aya lacks, for the device counters.
//!
//! Raw map contents become a snapshot in `ebpf::snapshot` and peer names get ids in
//! `ebpf::peers`: both pure, unit-tested without a kernel.

mod attach;
mod batch;
mod maps;
mod object;

use std::collections::BTreeMap;

use agent_ebpf::{PeerDropKey, WATCHED_DEVICES_CAPACITY};
use aya::Ebpf;

use super::{
    offsets::DropReasons,
    peers::{PeerIds, TrieEntries},
    snapshot::RawDrop,
    EbpfStatus,
};
use attach::KernelLog;
pub use object::{HeaderRead, EBPF_OBJECT};

/// Real eBPF accounting: the loaded object, the reason table, and the user-space mirror of what
/// was written into the configuration maps.
pub struct EbpfDropCounters {
    bpf: Ebpf,
    status: EbpfStatus,
    /// How the programs read the inner IP header and neighbour addresses.
    header_read: HeaderRead,
    reasons: DropReasons,
    peers: PeerIds,
    /// Block → peer id currently in the LPM tries (IPv4 and IPv6).
    trie: TrieEntries,
    /// ifindex in each slot of the WATCHED_DEVICES array (0: free), as written.
    slots: [u32; WATCHED_DEVICES_CAPACITY as usize],
    /// Counts of devices no longer watched (their slot was reused), under
    /// [`super::RETIRED_IFINDEX`], so per-peer totals stay monotonic however often devices churn.
    retired: BTreeMap<RawDrop, u64>,
    /// Per (slot, class, reason): counts harvested from peers that left (their ids were
    /// reused). Still part of the device's total, attributed to no current peer.
    departed: BTreeMap<(u32, u32, u32), u64>,
    /// Value last written to CONFIG[CONFIG_PEER_GENERATION].
    generation: u32,
    /// Highest per-peer count reported so far: a read can miss a count the kernel is moving
    /// from PEER_PENDING into PEER_DROPS, and reported counters must never go backwards.
    peer_reported: std::sync::Mutex<BTreeMap<PeerDropKey, u64>>,
    /// Possible CPUs (per-CPU values come one per CPU), read once: aya reads and parses a
    /// sysfs file each time it is asked. None if it could not be read (entry-by-entry reads).
    possible_cpus: Option<usize>,
    /// Kernel diagnostics (aya-log), drained on every snapshot; None if the object has none.
    kernel_log: Option<std::sync::Mutex<aya_log::EbpfLogger<KernelLog>>>,
}

impl std::fmt::Debug for EbpfDropCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfDropCounters")
            .field("status", &self.status)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl EbpfDropCounters {
    /// How the loaded programs read the inner IPv4 header and neighbour addresses.
    pub fn header_read(&self) -> HeaderRead {
        self.header_read
    }

    /// Whether the kernel programs' diagnostics (aya-log) reach `tracing`.
    pub fn kernel_log_attached(&self) -> bool {
        self.kernel_log.is_some()
    }

    /// Peer ids allocated: bounded by the peers present at once, whatever the churn.
    pub fn peer_ids_allocated(&self) -> usize {
        self.peers.allocated()
    }
}
