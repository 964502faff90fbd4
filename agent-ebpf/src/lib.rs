//! Types shared between the kernel programs (`main.rs`, BPF target) and user space (`user`
//! feature). Every struct is `#[repr(C)]`, `Copy`, and has no implicit padding (only `u32`
//! fields), so the byte layout is identical on both sides and safe to hand to `aya::Pod`.
//!
//! Map sizes are bounded; what happens at the bound is documented per map. IPv4 addresses are
//! stored as the `u32` whose in-memory bytes are the address in network order
//! (`u32::from_ne_bytes(addr.octets())` in user space), exactly as the kernel holds them.
#![no_std]

/// Key of the per-CPU drop counter map: one slot per (device, reason, traffic class, peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    /// ifindex of the watched overlay device the skb was on when freed.
    pub ifindex: u32,
    /// Raw `enum skb_drop_reason` value; user space names it from BTF (numbering differs
    /// between kernels).
    pub reason: u32,
    /// One of the `CLASS_*` constants.
    pub class: u32,
    /// Peer id from [`PEER_BLOCKS_MAP`] for the inner IPv4 destination; [`PEER_UNKNOWN`] when
    /// the packet is not IPv4 or its destination is in no known block.
    pub peer: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for DropKey {}

/// Traffic class of a dropped skb, from `skb->protocol`. Only IPv4 is data loss toward a peer;
/// ARP is the control plane resolving a gateway (its drops are expected while a neighbour is
/// unresolved, e.g. NO_TX_TARGET on a VXLAN device without an FDB entry).
pub const CLASS_OTHER: u32 = 0;
pub const CLASS_IPV4: u32 = 1;
pub const CLASS_ARP: u32 = 2;
pub const CLASS_IPV6: u32 = 3;

/// Peer id for "no block matched" (user space numbers peers from 1).
pub const PEER_UNKNOWN: u32 = 0;

/// Key of the per-gateway neighbour transition map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighKey {
    /// ifindex of the watched device the neighbour entry belongs to.
    pub ifindex: u32,
    /// The neighbour's IPv4 address (network-order bytes); 0 in the per-device total map.
    pub addr: u32,
    /// The state entered: [`NUD_INCOMPLETE`] or [`NUD_FAILED`]; in the last-state map, 0.
    pub state: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for NeighKey {}

/// `NUD_*` bits (include/uapi/linux/neighbour.h) that the programs count transitions into.
pub const NUD_INCOMPLETE: u32 = 0x01;
pub const NUD_FAILED: u32 = 0x20;

/// Per-CPU hash map `DropKey -> u64 packets`. Full map: new keys are not inserted and counted in
/// [`OVERFLOW_MAP`] instead (slot [`OVERFLOW_DROPS`]), never silently lost.
pub const DROPS_MAP: &str = "DROPS";
/// Devices × reasons × classes × peers actually seen stays small; 4096 covers 64 peers × 16
/// reasons × 4 classes on one device.
pub const DROPS_MAP_CAPACITY: u32 = 4096;

/// Hash map `ifindex -> 1` of overlay devices to account, filled by user space.
pub const WATCHED_DEVICES_MAP: &str = "WATCHED_DEVICES";
pub const WATCHED_DEVICES_CAPACITY: u32 = 64;

/// LPM trie `(prefix, IPv4) -> peer id`, filled by user space from the desired state (blocks and
/// borrowed /32s; the longest prefix wins, as in the route table).
pub const PEER_BLOCKS_MAP: &str = "PEER_BLOCKS";
/// Blocks of all peers: a 5000-node cluster with 2 blocks each fits.
pub const PEER_BLOCKS_CAPACITY: u32 = 16384;

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
/// A drop that found [`DROPS_MAP`] full.
pub const OVERFLOW_DROPS: u32 = 0;
/// A device-level neighbour transition that found [`NEIGH_DEVICE_MAP`] full.
pub const OVERFLOW_NEIGH: u32 = 1;
/// An IPv4 drop whose inner header could not be read (peer left unknown).
pub const OVERFLOW_HEADER_UNREADABLE: u32 = 2;

/// Names of the tp_btf programs in the object and the tracepoints they attach to.
pub mod programs {
    /// (program name, tracepoint)
    pub const KFREE_SKB: (&str, &str) = ("kfree_skb", "kfree_skb");
    pub const NEIGH_UPDATE_DONE: (&str, &str) = ("neigh_update_done", "neigh_update_done");
    pub const NEIGH_TIMER_HANDLER: (&str, &str) = ("neigh_timer_handler", "neigh_timer_handler");
    pub const NEIGH_EVENT_SEND_DONE: (&str, &str) =
        ("neigh_event_send_done", "neigh_event_send_done");
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
    /// `offsetof(struct neighbour, primary_key)` (the IPv4 address for the ARP table).
    pub const OFFSET_NEIGH_PRIMARY_KEY: &str = "OFFSET_NEIGH_PRIMARY_KEY";
    /// `offsetof(struct neighbour, tbl)`.
    pub const OFFSET_NEIGH_TBL: &str = "OFFSET_NEIGH_TBL";
    /// `offsetof(struct neigh_table, family)` (int).
    pub const OFFSET_NEIGH_TABLE_FAMILY: &str = "OFFSET_NEIGH_TABLE_FAMILY";
}
