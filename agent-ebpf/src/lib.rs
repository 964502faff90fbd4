//! Types shared between the kernel programs (`main.rs`, BPF target) and user space (`user`
//! feature). Every struct is `#[repr(C)]`, `Copy`, and has no implicit padding, so the byte
//! layout is identical on both sides and safe to hand to `aya::Pod`.
#![no_std]

/// Key of the per-CPU drop counter map: one slot per (device, drop reason, traffic class).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    /// ifindex of the watched overlay device the skb was on when freed.
    pub ifindex: u32,
    /// Raw `enum skb_drop_reason` value; user space names it from BTF.
    pub reason: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for DropKey {}

/// Name of the per-CPU hash map `DropKey -> u64 packets`.
pub const DROPS_MAP: &str = "DROPS";
/// Name of the hash map `ifindex -> 1` of overlay devices to account, filled by user space.
pub const WATCHED_DEVICES_MAP: &str = "WATCHED_DEVICES";
/// Capacity of the drop counter map: devices × reasons seen; overflow is counted, never silent.
pub const DROPS_MAP_CAPACITY: u32 = 4096;
/// Capacity of the watched-device map.
pub const WATCHED_DEVICES_CAPACITY: u32 = 64;

/// Read-only globals (names of `.rodata` symbols) that user space overrides at load time with
/// values parsed from `/sys/kernel/btf/vmlinux`: aya-ebpf has no CO-RE for Rust programs.
pub mod globals {
    /// Inode of the network namespace whose devices are watched (`net.ns.inum`).
    pub const TARGET_NETNS_INUM: &str = "TARGET_NETNS_INUM";
    /// `offsetof(struct sk_buff, dev)`.
    pub const OFFSET_SKB_DEV: &str = "OFFSET_SKB_DEV";
    /// `offsetof(struct net_device, ifindex)`.
    pub const OFFSET_DEV_IFINDEX: &str = "OFFSET_DEV_IFINDEX";
    /// `offsetof(struct net_device, nd_net)` (`possible_net_t`, whose first member is `net`).
    pub const OFFSET_DEV_ND_NET: &str = "OFFSET_DEV_ND_NET";
    /// `offsetof(struct net, ns) + offsetof(struct ns_common, inum)`.
    pub const OFFSET_NET_NS_INUM: &str = "OFFSET_NET_NS_INUM";
}
