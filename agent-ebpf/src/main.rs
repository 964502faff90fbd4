//! Kernel programs of dataplane-watchdog. Entry points are thin; the work is in `try_*`.
//!
//! Every program first filters on the watched network namespace (inode) and the watched
//! devices (ifindex), so traffic elsewhere on the host costs a few loads and nothing more.
//!
//! Cost matters on the drop path (a blackholed peer can mean 100k drops/s): the counted path
//! uses only direct loads (BTF-typed pointers, and the inner destination through the
//! `bpf_rdonly_cast` kfunc where the kernel has it, else one `bpf_probe_read_kernel`), array
//! maps (the verifier inlines their lookups), a per-CPU one-entry cache in front of the
//! LPM trie, and for the per-peer split a per-CPU pending (reason, peer, count) per device in
//! front of the hash map: only a change of (reason, peer) touches the hash.
//!
//! aya-log is used only where something went wrong that user space must hear about (a full map,
//! an unreadable header), and only the first time per CPU: never on the per-packet path.
#![no_std]
#![no_main]
// Inline asm emits the kfunc call aya cannot relocate (see `rdonly_cast`).
#![feature(asm_experimental_arch)]

use agent_ebpf::{
    device_drop_index, ipv4_mapped, NeighKey, PeerCache, PeerCacheV6, PeerDropKey, PeerPending,
    CLASS_ARP, CLASS_IPV4, CLASS_IPV6, CLASS_IPV6_MULTICAST, CLASS_OTHER, CONFIG_PEER_GENERATION,
    CONFIG_SLOTS, DEVICE_DROP_SLOTS, NEIGH_DEVICE_CAPACITY, NEIGH_GATEWAY_CAPACITY,
    NEIGH_LAST_STATE_CAPACITY, NUD_FAILED, NUD_INCOMPLETE, OVERFLOW_HEADER_UNREADABLE,
    OVERFLOW_NEIGH, OVERFLOW_PEER_DROPS, OVERFLOW_SLOTS, PEER_BLOCKS_CAPACITY,
    PEER_BLOCKS_V6_CAPACITY, PEER_DROPS_CAPACITY, PEER_UNKNOWN, RDONLY_CAST_PLACEHOLDER_INSN,
    WATCHED_DEVICES_CAPACITY,
};
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, map},
    maps::{
        lpm_trie::Key, Array, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap,
    },
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;

// Overridden by user space from BTF before load (see agent-ebpf/src/lib.rs `globals`).
#[no_mangle]
static TARGET_NETNS_INUM: u32 = 0;
#[no_mangle]
static OFFSET_SKB_DEV: u32 = 0;
#[no_mangle]
static OFFSET_SKB_HEAD: u32 = 0;
#[no_mangle]
static OFFSET_SKB_NETWORK_HEADER: u32 = 0;
#[no_mangle]
static OFFSET_SKB_PROTOCOL: u32 = 0;
#[no_mangle]
static OFFSET_DEV_IFINDEX: u32 = 0;
#[no_mangle]
static OFFSET_DEV_ND_NET: u32 = 0;
#[no_mangle]
static OFFSET_NET_NS_INUM: u32 = 0;
#[no_mangle]
static OFFSET_NEIGH_DEV: u32 = 0;
#[no_mangle]
static OFFSET_NEIGH_NUD_STATE: u32 = 0;
#[no_mangle]
static OFFSET_NEIGH_PRIMARY_KEY: u32 = 0;
#[no_mangle]
static OFFSET_NEIGH_TBL: u32 = 0;
#[no_mangle]
static OFFSET_NEIGH_TABLE_FAMILY: u32 = 0;
#[no_mangle]
static BTF_ID_IPHDR: u32 = 0;
#[no_mangle]
static BTF_ID_IN_ADDR: u32 = 0;
#[no_mangle]
static BTF_ID_IPV6HDR: u32 = 0;
#[no_mangle]
static BTF_ID_IN6_ADDR: u32 = 0;

#[map]
static DEVICE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEVICE_DROP_SLOTS, 0);

#[map]
static PEER_DROPS: PerCpuHashMap<PeerDropKey, u64> =
    PerCpuHashMap::with_max_entries(PEER_DROPS_CAPACITY, 0);

#[map]
static PEER_PENDING: PerCpuArray<PeerPending> =
    PerCpuArray::with_max_entries(WATCHED_DEVICES_CAPACITY, 0);

#[map]
static WATCHED_DEVICES: Array<u32> = Array::with_max_entries(WATCHED_DEVICES_CAPACITY, 0);

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(CONFIG_SLOTS, 0);

#[map]
static PEER_BLOCKS: LpmTrie<u32, u32> = LpmTrie::with_max_entries(PEER_BLOCKS_CAPACITY, 0);

#[map]
static PEER_CACHE: PerCpuArray<PeerCache> = PerCpuArray::with_max_entries(1, 0);

#[map]
static PEER_BLOCKS_V6: LpmTrie<[u32; 4], u32> =
    LpmTrie::with_max_entries(PEER_BLOCKS_V6_CAPACITY, 0);

#[map]
static PEER_CACHE_V6: PerCpuArray<PeerCacheV6> = PerCpuArray::with_max_entries(1, 0);

#[map]
static NEIGH_LAST_STATE: LruHashMap<NeighKey, u32> =
    LruHashMap::with_max_entries(NEIGH_LAST_STATE_CAPACITY, 0);

#[map]
static NEIGH_GATEWAY: LruPerCpuHashMap<NeighKey, u64> =
    LruPerCpuHashMap::with_max_entries(NEIGH_GATEWAY_CAPACITY, 0);

#[map]
static NEIGH_DEVICE: PerCpuHashMap<NeighKey, u64> =
    PerCpuHashMap::with_max_entries(NEIGH_DEVICE_CAPACITY, 0);

#[map]
static OVERFLOW: PerCpuArray<u64> = PerCpuArray::with_max_entries(OVERFLOW_SLOTS, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `offsetof(struct iphdr, daddr)`: a UAPI layout, stable across kernels.
const IPHDR_DADDR: usize = 16;
/// `offsetof(struct ipv6hdr, daddr)` (UAPI).
const IPV6HDR_DADDR: usize = 24;

/// Reads a global that user space patched; volatile so LLVM cannot fold the default 0.
#[inline(always)]
fn global(value: &'static u32) -> usize {
    unsafe { core::ptr::read_volatile(value) as usize }
}

/// Loads a value at `base + offset` from a BTF-typed kernel pointer. tp_btf programs may
/// dereference such pointers directly; the verifier turns faults into zero reads.
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, offset: usize) -> T {
    unsafe { core::ptr::read_volatile(base.add(offset) as *const T) }
}

/// Adds one to an overflow counter; true the first time on this CPU (the moment to log).
#[inline(always)]
fn overflow_first(slot: u32) -> bool {
    match OVERFLOW.get_ptr_mut(slot) {
        Some(count) => unsafe {
            *count += 1;
            *count == 1
        },
        None => false,
    }
}

/// Adds `n` to an overflow counter; true when it was 0 on this CPU (the moment to log).
#[inline(always)]
fn overflow_add(slot: u32, n: u64) -> bool {
    match OVERFLOW.get_ptr_mut(slot) {
        Some(count) => unsafe {
            let first = *count == 0;
            *count += n;
            first
        },
        None => false,
    }
}

/// Adds `n` to a per-CPU hash counter; false when the map is full.
#[inline(always)]
fn add<K>(map: &PerCpuHashMap<K, u64>, key: &K, n: u64) -> bool {
    match map.get_ptr_mut(key) {
        Some(count) => {
            unsafe { *count += n };
            true
        }
        None => map.insert(key, n, 0).is_ok(),
    }
}

/// Adds one to slot `index` of a per-CPU array (lookup inlined by the verifier).
#[inline(always)]
fn bump_array(map: &PerCpuArray<u64>, index: u32) {
    if let Some(count) = map.get_ptr_mut(index) {
        unsafe { *count += 1 };
    }
}

/// Adds one to a per-CPU hash counter; false when the map is full.
#[inline(always)]
fn bump<K>(map: &PerCpuHashMap<K, u64>, key: &K) -> bool {
    add(map, key, 1)
}

/// (slot, ifindex) of `dev` if it is a watched device in the watched namespace. User space
/// fills the slots from 0 without gaps, so the scan stops at the first empty one.
#[inline(always)]
fn watched_slot(dev: *const u8) -> Option<(u32, u32)> {
    if dev.is_null() {
        return None;
    }
    let net: *const u8 = unsafe { load(dev, global(&OFFSET_DEV_ND_NET)) };
    if net.is_null() {
        return None;
    }
    let inum: u32 = unsafe { load(net, global(&OFFSET_NET_NS_INUM)) };
    if inum != global(&TARGET_NETNS_INUM) as u32 {
        return None;
    }
    let ifindex: u32 = unsafe { load(dev, global(&OFFSET_DEV_IFINDEX)) };
    for slot in 0..WATCHED_DEVICES_CAPACITY {
        match WATCHED_DEVICES.get(slot) {
            Some(&watched) if watched == ifindex => return Some((slot, ifindex)),
            Some(&0) | None => return None,
            Some(_) => {}
        }
    }
    None
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx);
    0
}

/// Does nothing: attached only by the benchmark (never by the daemon) next to [`kfree_skb`], so
/// the cost the run-time statistics add to every program (two clock reads) can be subtracted.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_baseline(_ctx: BtfTracePointContext) -> i32 {
    0
}

fn try_kfree_skb(ctx: &BtfTracePointContext) -> Result<(), ()> {
    // TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk)
    let skb: *const u8 = ctx.arg(0);
    let reason: u32 = ctx.arg::<u64>(2) as u32;
    if skb.is_null() {
        return Err(());
    }
    let dev: *const u8 = unsafe { load(skb, global(&OFFSET_SKB_DEV)) };
    let (slot, _) = watched_slot(dev).ok_or(())?;
    let protocol = u16::from_be(unsafe { load::<u16>(skb, global(&OFFSET_SKB_PROTOCOL)) });
    // None: a data packet whose inner header could not be read.
    let (class, peer) = match protocol {
        ETH_P_IP => (CLASS_IPV4, network_header(skb).and_then(peer_of_v4)),
        ETH_P_IPV6 => match network_header(skb).and_then(ipv6_destination) {
            Some(daddr) if is_multicast(&daddr) => (CLASS_IPV6_MULTICAST, Some(PEER_UNKNOWN)),
            Some(daddr) => (CLASS_IPV6, Some(peer_of_v6(&daddr))),
            None => (CLASS_IPV6, None),
        },
        ETH_P_ARP => (CLASS_ARP, Some(PEER_UNKNOWN)),
        _ => (CLASS_OTHER, Some(PEER_UNKNOWN)),
    };
    bump_array(&DEVICE_DROPS, device_drop_index(slot, class, reason));
    let Some(peer) = peer else {
        if overflow_first(OVERFLOW_HEADER_UNREADABLE) {
            warn!(
                ctx,
                "data drop on a watched device with an unreadable inner header: its peer stays unknown"
            );
        }
        return Ok(());
    };
    if peer == PEER_UNKNOWN {
        return Ok(());
    }
    let pending = PEER_PENDING.get_ptr_mut(slot).ok_or(())?;
    // SAFETY: a per-CPU map value; the program does not nest on one CPU (the kernel skips a
    // recursive run), so nothing else writes it meanwhile.
    let p = unsafe { &mut *pending };
    if p.count != 0 && p.reason == reason && p.peer == peer && p.class == class {
        p.count += 1;
        return Ok(());
    }
    let moving = p.count;
    if moving != 0 {
        // Zero before adding to the hash: a reader (hash first, pending second) may then miss
        // the count for a moment, but never sees it twice. Volatile keeps the store order.
        unsafe { core::ptr::write_volatile(&mut p.count, 0) };
        let key = PeerDropKey {
            slot,
            class: p.class,
            reason: p.reason,
            peer: p.peer,
        };
        if !add(&PEER_DROPS, &key, moving) && overflow_add(OVERFLOW_PEER_DROPS, moving) {
            warn!(
                ctx,
                "PEER_DROPS map full ({} entries): new (peer, reason) pairs are counted per device only",
                PEER_DROPS_CAPACITY
            );
        }
    }
    unsafe {
        core::ptr::write_volatile(&mut p.class, class);
        core::ptr::write_volatile(&mut p.reason, reason);
        core::ptr::write_volatile(&mut p.peer, peer);
        core::ptr::write_volatile(&mut p.count, 1);
    }
    Ok(())
}

/// The skb's network header. On the VXLAN device before encapsulation it is the inner
/// (pod-to-pod) IP header.
#[inline(always)]
fn network_header(skb: *const u8) -> Option<*const u8> {
    // `head` is a plain `unsigned char *`: the verifier treats it as a scalar, so the packet
    // bytes need bpf_rdonly_cast or bpf_probe_read_kernel rather than a direct load.
    let head: *const u8 = unsafe { load(skb, global(&OFFSET_SKB_HEAD)) };
    let network_header: u16 = unsafe { load(skb, global(&OFFSET_SKB_NETWORK_HEADER)) };
    if head.is_null() || network_header == u16::MAX {
        return None;
    }
    Some(unsafe { head.add(network_header as usize) })
}

/// The current trie generation: user space bumps it after every change of a trie, which
/// invalidates the per-CPU caches.
#[inline(always)]
fn peer_generation() -> u32 {
    CONFIG.get(CONFIG_PEER_GENERATION).copied().unwrap_or(0)
}

/// Peer id of the IPv4 destination ([`PEER_UNKNOWN`] outside every block), None when the
/// header cannot be read.
#[inline(always)]
fn peer_of_v4(iphdr: *const u8) -> Option<u32> {
    let iphdr_btf_id = global(&BTF_ID_IPHDR) as u32;
    let daddr = if iphdr_btf_id != 0 {
        // A constant from .rodata: the verifier keeps only one of these two branches. This one
        // is a plain load (a fault reads 0.0.0.0, never a pod address: unreadable); the other
        // a helper call, ~45 ns more per counted drop.
        let iphdr = unsafe { rdonly_cast(iphdr, iphdr_btf_id) };
        match unsafe { load::<u32>(iphdr, IPHDR_DADDR) } {
            0 => return None,
            daddr => daddr,
        }
    } else {
        let daddr_ptr = unsafe { iphdr.add(IPHDR_DADDR) } as *const u32;
        unsafe { bpf_probe_read_kernel(daddr_ptr) }.ok()?
    };
    // Drops come in storms toward one destination: remember the last answer per CPU.
    let generation = peer_generation();
    let cache = PEER_CACHE.get_ptr_mut(0);
    if let Some(cache) = cache {
        let c = unsafe { &*cache };
        if c.generation == generation && c.daddr == daddr && c.valid != 0 {
            return Some(c.peer);
        }
    }
    let peer = PEER_BLOCKS
        .get(Key::new(32, daddr))
        .copied()
        .unwrap_or(PEER_UNKNOWN);
    if let Some(cache) = cache {
        unsafe {
            *cache = PeerCache {
                daddr,
                peer,
                generation,
                valid: 1,
            }
        };
    }
    Some(peer)
}

/// Destination of an IPv6 header, None when it cannot be read (a fault reads `::`, never a
/// destination).
#[inline(always)]
fn ipv6_destination(ipv6hdr: *const u8) -> Option<[u32; 4]> {
    let ipv6hdr_btf_id = global(&BTF_ID_IPV6HDR) as u32;
    let daddr = if ipv6hdr_btf_id != 0 {
        let h = unsafe { rdonly_cast(ipv6hdr, ipv6hdr_btf_id) };
        unsafe {
            [
                load::<u32>(h, IPV6HDR_DADDR),
                load::<u32>(h, IPV6HDR_DADDR + 4),
                load::<u32>(h, IPV6HDR_DADDR + 8),
                load::<u32>(h, IPV6HDR_DADDR + 12),
            ]
        }
    } else {
        let daddr_ptr = unsafe { ipv6hdr.add(IPV6HDR_DADDR) } as *const [u32; 4];
        unsafe { bpf_probe_read_kernel(daddr_ptr) }.ok()?
    };
    if daddr[0] | daddr[1] | daddr[2] | daddr[3] == 0 {
        return None;
    }
    Some(daddr)
}

/// `ff00::/8`.
#[inline(always)]
fn is_multicast(daddr: &[u32; 4]) -> bool {
    daddr[0].to_ne_bytes()[0] == 0xff
}

/// Peer id of an IPv6 destination ([`PEER_UNKNOWN`] outside every block), behind a per-CPU
/// cache as for IPv4.
#[inline(always)]
fn peer_of_v6(daddr: &[u32; 4]) -> u32 {
    let generation = peer_generation();
    let cache = PEER_CACHE_V6.get_ptr_mut(0);
    if let Some(cache) = cache {
        let c = unsafe { &*cache };
        if c.generation == generation
            && c.valid != 0
            && c.daddr[0] == daddr[0]
            && c.daddr[1] == daddr[1]
            && c.daddr[2] == daddr[2]
            && c.daddr[3] == daddr[3]
        {
            return c.peer;
        }
    }
    let peer = PEER_BLOCKS_V6
        .get(Key::new(128, *daddr))
        .copied()
        .unwrap_or(PEER_UNKNOWN);
    if let Some(cache) = cache {
        unsafe {
            *cache = PeerCacheV6 {
                daddr: *daddr,
                peer,
                generation,
                valid: 1,
                _pad: 0,
            }
        };
    }
    peer
}

/// `bpf_rdonly_cast(ptr, btf_id)`: `ptr` as an untrusted read-only pointer to the vmlinux type
/// `btf_id`, which the program may load from directly (faults read as zero). The call is a
/// placeholder instruction that user space patches (see [`RDONLY_CAST_PLACEHOLDER_INSN`]).
#[inline(always)]
unsafe fn rdonly_cast(ptr: *const u8, btf_id: u32) -> *const u8 {
    let out: *const u8;
    unsafe {
        core::arch::asm!(
            ".quad {insn}",
            insn = const RDONLY_CAST_PLACEHOLDER_INSN,
            inout("r1") ptr => _,
            inout("r2") u64::from(btf_id) => _,
            lateout("r0") out,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, readonly),
        );
    }
    out
}

// Neighbour transitions. Each hook reads the entry's current state and compares it with the
// last state seen for that (device, address): one count per transition into INCOMPLETE or
// FAILED, however many packets or timer runs happen while it stays there.
// NONE/FAILED→INCOMPLETE happens in __neigh_event_send (neigh_event_send_done), INCOMPLETE→FAILED
// in neigh_timer_handler, administrative changes in __neigh_update (neigh_update_done).

#[btf_tracepoint(function = "neigh_update_done")]
pub fn neigh_update_done(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct neighbour *neigh, int err)
    let _ = observe_neigh(&ctx, ctx.arg(0));
    0
}

#[btf_tracepoint(function = "neigh_timer_handler")]
pub fn neigh_timer_handler(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct neighbour *neigh, int err)
    let _ = observe_neigh(&ctx, ctx.arg(0));
    0
}

#[btf_tracepoint(function = "neigh_event_send_done")]
pub fn neigh_event_send_done(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct neighbour *neigh, int err)
    let _ = observe_neigh(&ctx, ctx.arg(0));
    0
}

#[inline(always)]
fn observe_neigh(ctx: &BtfTracePointContext, neigh: *const u8) -> Result<(), ()> {
    if neigh.is_null() {
        return Err(());
    }
    let dev: *const u8 = unsafe { load(neigh, global(&OFFSET_NEIGH_DEV)) };
    let (_, ifindex) = watched_slot(dev).ok_or(())?;
    let tbl: *const u8 = unsafe { load(neigh, global(&OFFSET_NEIGH_TBL)) };
    if tbl.is_null() {
        return Err(());
    }
    let family: u32 = unsafe { load(tbl, global(&OFFSET_NEIGH_TABLE_FAMILY)) };
    // primary_key is a flexible array of u8: the verifier refuses a typed load from it, so
    // read it as a `struct in_addr` / `struct in6_addr` (direct load, a fault reads zeros: no
    // gateway), or with the helper on kernels without bpf_rdonly_cast.
    let key_ptr = unsafe { neigh.add(global(&OFFSET_NEIGH_PRIMARY_KEY)) };
    let addr = match family {
        AF_INET => ipv4_mapped(neighbour_ipv4(key_ptr)?),
        AF_INET6 => neighbour_ipv6(key_ptr)?,
        _ => return Ok(()),
    };
    let state = u32::from(unsafe { load::<u8>(neigh, global(&OFFSET_NEIGH_NUD_STATE)) });

    let last_key = NeighKey {
        ifindex,
        addr,
        state: 0,
    };
    let previous = unsafe { NEIGH_LAST_STATE.get(last_key) }.copied();
    if previous == Some(state) {
        return Ok(());
    }
    let _ = NEIGH_LAST_STATE.insert(last_key, state, 0);
    if state != NUD_INCOMPLETE && state != NUD_FAILED {
        return Ok(());
    }
    let gateway_key = NeighKey {
        ifindex,
        addr,
        state,
    };
    match NEIGH_GATEWAY.get_ptr_mut(gateway_key) {
        Some(count) => unsafe { *count += 1 },
        None => {
            // An LRU map evicts instead of failing.
            let _ = NEIGH_GATEWAY.insert(gateway_key, 1, 0);
        }
    }
    let device_key = NeighKey {
        ifindex,
        state,
        addr: [0; 4],
    };
    if !bump(&NEIGH_DEVICE, &device_key) && overflow_first(OVERFLOW_NEIGH) {
        warn!(
            ctx,
            "NEIGH_DEVICE map full: neighbour transitions on ifindex {} not counted", ifindex
        );
    }
    Ok(())
}

/// An ARP entry's IPv4 address (network-order bytes in a u32).
#[inline(always)]
fn neighbour_ipv4(key_ptr: *const u8) -> Result<u32, ()> {
    let in_addr_btf_id = global(&BTF_ID_IN_ADDR) as u32;
    if in_addr_btf_id != 0 {
        let in_addr = unsafe { rdonly_cast(key_ptr, in_addr_btf_id) };
        match unsafe { load::<u32>(in_addr, 0) } {
            0 => Err(()),
            addr => Ok(addr),
        }
    } else {
        unsafe { bpf_probe_read_kernel(key_ptr as *const u32) }.map_err(|_| ())
    }
}

/// An NDP entry's IPv6 address.
#[inline(always)]
fn neighbour_ipv6(key_ptr: *const u8) -> Result<[u32; 4], ()> {
    let in6_addr_btf_id = global(&BTF_ID_IN6_ADDR) as u32;
    let addr = if in6_addr_btf_id != 0 {
        let a = unsafe { rdonly_cast(key_ptr, in6_addr_btf_id) };
        unsafe {
            [
                load::<u32>(a, 0),
                load::<u32>(a, 4),
                load::<u32>(a, 8),
                load::<u32>(a, 12),
            ]
        }
    } else {
        unsafe { bpf_probe_read_kernel(key_ptr as *const [u32; 4]) }.map_err(|_| ())?
    };
    if addr[0] | addr[1] | addr[2] | addr[3] == 0 {
        return Err(());
    }
    Ok(addr)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
