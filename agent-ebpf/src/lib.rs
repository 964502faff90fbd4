//! Types shared between the kernel programs (`main.rs`, BPF target) and user space (`user`
//! feature). Every struct is `#[repr(C)]`, `Copy`, and has no implicit padding (`u32` fields,
//! `u64` only 8-aligned), so the byte layout is identical on both sides and safe to hand to `aya::Pod`.
//!
//! Map sizes are bounded; what happens at the bound is documented per map. IPv4 addresses are
//! stored as the `u32` whose in-memory bytes are the address in network order
//! (`u32::from_ne_bytes(addr.octets())` in user space), exactly as the kernel holds them; IPv6
//! addresses as `[u32; 4]` whose in-memory bytes are the 16 address bytes in order.
#![no_std]

/// Key of the per-CPU hash of data (IPv4 and IPv6) drops per peer: one slot per (device slot,
/// class, reason, peer). Only drops whose inner destination is in a known block are in here;
/// the per-device totals are in [`DEVICE_DROPS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerDropKey {
    /// Slot of the device in [`WATCHED_DEVICES_MAP`].
    pub slot: u32,
    /// [`CLASS_IPV4`] or [`CLASS_IPV6`]: the family of the inner destination.
    pub class: u32,
    /// Raw `enum skb_drop_reason` value; user space names it from BTF (numbering differs
    /// between kernels).
    pub reason: u32,
    /// Peer id from [`PEER_BLOCKS_MAP`] / [`PEER_BLOCKS_V6_MAP`] for the inner destination
    /// (never [`PEER_UNKNOWN`]).
    pub peer: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerDropKey {}

/// Per-CPU array, one entry per device slot: the (reason, peer) of the last data drop counted on
/// that device by this CPU, and how many drops in a row went there that are not yet in
/// [`PEER_DROPS_MAP`]. Drops come in storms toward one peer, so most are one increment here
/// instead of a hash lookup; a different (reason, peer) first moves `count` into the hash.
/// A peer's total is its hash entry plus the pending entries with its key. The kernel zeroes
/// `count` before it moves it, so a reader that reads the hash first and the pending entries
/// second can miss a count in flight (transiently) but never sees it twice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerPending {
    pub class: u32,
    pub reason: u32,
    pub peer: u32,
    pub _pad: u32,
    /// 0: nothing pending (then `class`, `reason` and `peer` mean nothing).
    pub count: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerPending {}

/// Per-CPU one-entry cache in front of the LPM trie: drops come in storms toward one
/// destination. Valid while `generation` equals [`CONFIG_PEER_GENERATION`] in [`CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCache {
    pub daddr: u32,
    pub peer: u32,
    pub generation: u32,
    pub valid: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerCache {}

/// [`PeerCache`] for IPv6 destinations (in front of [`PEER_BLOCKS_V6_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCacheV6 {
    pub daddr: [u32; 4],
    pub peer: u32,
    pub generation: u32,
    pub valid: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerCacheV6 {}

/// Traffic class of a dropped skb, from `skb->protocol`. IPv4 and IPv6 are data loss toward a
/// peer; ARP is the control plane resolving a gateway (its drops are expected while a
/// neighbour is unresolved, e.g. NO_TX_TARGET on a VXLAN device without an FDB entry), and
/// [`CLASS_IPV6_MULTICAST`] holds its IPv6 twin.
pub const CLASS_OTHER: u32 = 0;
pub const CLASS_IPV4: u32 = 1;
pub const CLASS_ARP: u32 = 2;
pub const CLASS_IPV6: u32 = 3;
/// IPv6 to a multicast group (`ff00::/8`): neighbour solicitations for an unresolved gateway
/// (sent to its solicited-node group), router solicitations, multicast-listener reports. The
/// overlays route no pod multicast, so this is control, like ARP (a VXLAN device without an
/// FDB entry for the group drops it as NO_TX_TARGET on every healthy node).
pub const CLASS_IPV6_MULTICAST: u32 = 4;

/// Peer id for "no block matched" (user space numbers peers from 1).
pub const PEER_UNKNOWN: u32 = 0;

/// Key of the per-gateway neighbour transition map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighKey {
    /// ifindex of the watched device the neighbour entry belongs to.
    pub ifindex: u32,
    /// The state entered: [`NUD_INCOMPLETE`] or [`NUD_FAILED`]; in the last-state map, 0.
    pub state: u32,
    /// The neighbour's address: IPv6 (ARP's IPv6 twin, NDP), or IPv4 as the IPv4-mapped IPv6
    /// address `::ffff:a.b.c.d` (see [`ipv4_mapped`]); all zero in the per-device total map.
    pub addr: [u32; 4],
}

/// `::ffff:a.b.c.d` for the IPv4 address `v4` (network-order bytes in a `u32`), as
/// [`NeighKey::addr`] holds it.
#[inline(always)]
pub const fn ipv4_mapped(v4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4]
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for NeighKey {}

/// `NUD_*` bits (include/uapi/linux/neighbour.h) that the programs count transitions into.
pub const NUD_INCOMPLETE: u32 = 0x01;
pub const NUD_FAILED: u32 = 0x20;

/// Number of traffic classes (`CLASS_*`).
pub const CLASSES: u32 = 5;
/// Reasons are counted per device in slots `0..REASON_SLOTS - 1`; the last slot collects every
/// larger value (subsystem-encoded reasons such as mac80211's, which a VXLAN device never sees).
pub const REASON_SLOTS: u32 = 256;
/// The slot that collects reasons `>= REASON_SLOTS - 1`.
pub const REASON_OVERFLOW_SLOT: u32 = REASON_SLOTS - 1;

/// Per-CPU array of u64 packets per (device slot, class, reason), indexed by
/// [`device_drop_index`]: every drop on a watched device is counted here, never lost to a full
/// map (an array lookup is also what the verifier inlines: the cheapest counter there is).
pub const DEVICE_DROPS_MAP: &str = "DEVICE_DROPS";
pub const DEVICE_DROP_SLOTS: u32 = WATCHED_DEVICES_CAPACITY * CLASSES * REASON_SLOTS;

/// Index into [`DEVICE_DROPS_MAP`].
#[inline(always)]
pub const fn device_drop_index(slot: u32, class: u32, reason: u32) -> u32 {
    let reason = if reason < REASON_OVERFLOW_SLOT {
        reason
    } else {
        REASON_OVERFLOW_SLOT
    };
    (slot * CLASSES + class) * REASON_SLOTS + reason
}

/// Per-CPU hash `PeerDropKey -> u64 packets`: the per-peer split of IPv4 and IPv6 drops. Full map: the
/// drop stays counted per device (so it shows as "peer unknown") and [`OVERFLOW_PEER_DROPS`]
/// counts it.
pub const PEER_DROPS_MAP: &str = "PEER_DROPS";
/// Peers × reasons actually seen stays small; 4096 covers 256 peers × 16 reasons.
pub const PEER_DROPS_CAPACITY: u32 = 4096;

/// Per-CPU array of [`PeerPending`], indexed by device slot.
pub const PEER_PENDING_MAP: &str = "PEER_PENDING";

/// Array `slot -> ifindex` of the overlay devices to account (0: free slot), filled by user
/// space. A slot is a device's index in [`DEVICE_DROPS_MAP`] and [`PeerDropKey::slot`].
pub const WATCHED_DEVICES_MAP: &str = "WATCHED_DEVICES";
pub const WATCHED_DEVICES_CAPACITY: u32 = 8;

/// Array of u32 settings written by user space, indexed by the `CONFIG_*` constants.
pub const CONFIG_MAP: &str = "CONFIG";
pub const CONFIG_SLOTS: u32 = 1;
/// Bumped by user space after every change of [`PEER_BLOCKS_MAP`] or [`PEER_BLOCKS_V6_MAP`]
/// (invalidates the caches).
pub const CONFIG_PEER_GENERATION: u32 = 0;

/// Per-CPU array with one [`PeerCache`].
pub const PEER_CACHE_MAP: &str = "PEER_CACHE";
/// Per-CPU array with one [`PeerCacheV6`].
pub const PEER_CACHE_V6_MAP: &str = "PEER_CACHE_V6";

/// LPM trie `(prefix, IPv4) -> peer id`, filled by user space from the desired state (blocks and
/// borrowed /32s; the longest prefix wins, as in the route table).
pub const PEER_BLOCKS_MAP: &str = "PEER_BLOCKS";
/// Blocks and borrowed addresses of all peers. LPM tries are never preallocated (aya sets
/// `BPF_F_NO_PREALLOC`): the kernel allocates per entry in use, so this is only a ceiling —
/// 5,000 nodes with 6 blocks each plus 100,000 borrowed addresses fit. Above it the whole
/// update fails and no drop is attributed to any peer.
pub const PEER_BLOCKS_CAPACITY: u32 = 1 << 18;

/// LPM trie `(prefix, IPv6 as [u32; 4]) -> peer id`: [`PEER_BLOCKS_MAP`] for the IPv6 blocks
/// and borrowed /128s of dual-stack peers.
pub const PEER_BLOCKS_V6_MAP: &str = "PEER_BLOCKS_V6";
pub const PEER_BLOCKS_V6_CAPACITY: u32 = 1 << 18;

/// LRU hash `NeighKey{ifindex, addr, 0} -> last seen nud_state`, so transitions are counted
/// once, not once per event. Eviction only forgets a state: the next event then counts as a
/// transition if it is INCOMPLETE/FAILED.
pub const NEIGH_LAST_STATE_MAP: &str = "NEIGH_LAST_STATE";
pub const NEIGH_LAST_STATE_CAPACITY: u32 = 4096;

/// Per-CPU LRU hash `NeighKey -> transitions` per gateway. Least recently updated gateways are
/// evicted first; the per-device totals in [`NEIGH_DEVICE_MAP`] are never evicted.
pub const NEIGH_GATEWAY_MAP: &str = "NEIGH_GATEWAY";
pub const NEIGH_GATEWAY_CAPACITY: u32 = 1024;

/// Per-CPU hash `NeighKey{ifindex, 0, state} -> transitions` per device.
pub const NEIGH_DEVICE_MAP: &str = "NEIGH_DEVICE";
pub const NEIGH_DEVICE_CAPACITY: u32 = 2 * WATCHED_DEVICES_CAPACITY;

/// Per-CPU array of u64 overflow/diagnostic counters, indexed by the `OVERFLOW_*` constants.
pub const OVERFLOW_MAP: &str = "OVERFLOW";
pub const OVERFLOW_SLOTS: u32 = 4;
/// A data drop toward a known peer that found [`PEER_DROPS_MAP`] full (still counted per device).
pub const OVERFLOW_PEER_DROPS: u32 = 0;
/// A device-level neighbour transition that found [`NEIGH_DEVICE_MAP`] full.
pub const OVERFLOW_NEIGH: u32 = 1;
/// A data (IPv4 or IPv6) drop whose inner header could not be read (peer left unknown).
pub const OVERFLOW_HEADER_UNREADABLE: u32 = 2;

/// The kernel programs read the inner IPv4 or IPv6 destination with a direct load through the
/// `bpf_rdonly_cast` kfunc (the verifier turns the call into a register move; the load becomes
/// a fault-tolerant plain load) instead of the `bpf_probe_read_kernel` helper. aya 0.14 cannot
/// relocate kfunc calls, so the program carries this exact instruction (`call` with
/// `src_reg = BPF_PSEUDO_KFUNC_CALL`, placeholder `imm`), and user space rewrites it before
/// loading: `imm` := BTF id of `bpf_rdonly_cast` in vmlinux, or, on kernels without that kfunc,
/// the whole instruction := [`RDONLY_CAST_FALLBACK_INSN`] (that path is then dead code, as
/// the `globals::BTF_ID_*` type ids are 0).
pub const RDONLY_CAST_PLACEHOLDER_INSN: u64 = 0x5744_4b46_0000_2085;
/// `r0 = r1` (BPF_ALU64 | BPF_MOV | BPF_X): what the verifier makes of the kfunc call anyway.
pub const RDONLY_CAST_FALLBACK_INSN: u64 = 0x0000_0000_0000_10bf;
/// The BPF_PSEUDO_KFUNC_CALL `call` to a vmlinux kfunc with BTF id `btf_id`.
pub const fn kfunc_call_insn(btf_id: u32) -> u64 {
    (RDONLY_CAST_PLACEHOLDER_INSN & 0xffff_ffff) | ((btf_id as u64) << 32)
}

/// Names of the tp_btf programs in the object and the tracepoints they attach to.
pub mod programs {
    /// (program name, tracepoint)
    pub const KFREE_SKB: (&str, &str) = ("kfree_skb", "kfree_skb");
    pub const NEIGH_UPDATE_DONE: (&str, &str) = ("neigh_update_done", "neigh_update_done");
    pub const NEIGH_TIMER_HANDLER: (&str, &str) = ("neigh_timer_handler", "neigh_timer_handler");
    pub const NEIGH_EVENT_SEND_DONE: (&str, &str) =
        ("neigh_event_send_done", "neigh_event_send_done");
    /// An empty program on `kfree_skb` that only the benchmark attaches: its measured cost is
    /// the measuring overhead. Not in [`ALL`], so the daemon never loads it.
    pub const KFREE_SKB_BASELINE: (&str, &str) = ("kfree_skb_baseline", "kfree_skb");
    /// The programs the agent loads and attaches.
    pub const ALL: [(&str, &str); 4] = [
        KFREE_SKB,
        NEIGH_UPDATE_DONE,
        NEIGH_TIMER_HANDLER,
        NEIGH_EVENT_SEND_DONE,
    ];
}

/// Read-only globals (names of `.rodata` symbols) that user space overrides at load time with
/// values parsed from `/sys/kernel/btf/vmlinux`: aya-ebpf has no CO-RE for Rust programs.
/// All are `u32`.
pub mod globals {
    /// Inode of the network namespace whose devices are watched (`net.ns.inum`).
    pub const TARGET_NETNS_INUM: &str = "TARGET_NETNS_INUM";
    /// `offsetof(struct sk_buff, dev)`.
    pub const OFFSET_SKB_DEV: &str = "OFFSET_SKB_DEV";
    /// `offsetof(struct sk_buff, head)`.
    pub const OFFSET_SKB_HEAD: &str = "OFFSET_SKB_HEAD";
    /// `offsetof(struct sk_buff, network_header)` (u16, offset from `head`).
    pub const OFFSET_SKB_NETWORK_HEADER: &str = "OFFSET_SKB_NETWORK_HEADER";
    /// `offsetof(struct sk_buff, protocol)` (__be16).
    pub const OFFSET_SKB_PROTOCOL: &str = "OFFSET_SKB_PROTOCOL";
    /// `offsetof(struct net_device, ifindex)`.
    pub const OFFSET_DEV_IFINDEX: &str = "OFFSET_DEV_IFINDEX";
    /// `offsetof(struct net_device, nd_net)` (`possible_net_t`, whose first member is `net`).
    pub const OFFSET_DEV_ND_NET: &str = "OFFSET_DEV_ND_NET";
    /// `offsetof(struct net, ns) + offsetof(struct ns_common, inum)`.
    pub const OFFSET_NET_NS_INUM: &str = "OFFSET_NET_NS_INUM";
    /// `offsetof(struct neighbour, dev)`.
    pub const OFFSET_NEIGH_DEV: &str = "OFFSET_NEIGH_DEV";
    /// `offsetof(struct neighbour, nud_state)` (u8).
    pub const OFFSET_NEIGH_NUD_STATE: &str = "OFFSET_NEIGH_NUD_STATE";
    /// `offsetof(struct neighbour, primary_key)` (the IPv4 address for the ARP table, the IPv6
    /// address for the NDP table).
    pub const OFFSET_NEIGH_PRIMARY_KEY: &str = "OFFSET_NEIGH_PRIMARY_KEY";
    /// `offsetof(struct neighbour, tbl)`.
    pub const OFFSET_NEIGH_TBL: &str = "OFFSET_NEIGH_TBL";
    /// `offsetof(struct neigh_table, family)` (int).
    pub const OFFSET_NEIGH_TABLE_FAMILY: &str = "OFFSET_NEIGH_TABLE_FAMILY";
    /// BTF id of `struct iphdr` in vmlinux when `bpf_rdonly_cast` is usable, else 0 (then the
    /// programs read the header with `bpf_probe_read_kernel`). See
    /// [`super::RDONLY_CAST_PLACEHOLDER_INSN`].
    pub const BTF_ID_IPHDR: &str = "BTF_ID_IPHDR";
    /// BTF id of `struct in_addr` in vmlinux (a neighbour's IPv4 `primary_key`) when
    /// `bpf_rdonly_cast` is usable, else 0; as [`BTF_ID_IPHDR`].
    pub const BTF_ID_IN_ADDR: &str = "BTF_ID_IN_ADDR";
    /// BTF id of `struct ipv6hdr` (the inner IPv6 header of a dropped skb); as [`BTF_ID_IPHDR`].
    pub const BTF_ID_IPV6HDR: &str = "BTF_ID_IPV6HDR";
    /// BTF id of `struct in6_addr` (a neighbour's IPv6 `primary_key`); as [`BTF_ID_IPHDR`].
    pub const BTF_ID_IN6_ADDR: &str = "BTF_ID_IN6_ADDR";
}
