//! Kernel programs of dataplane-watchdog. Entry points are thin; the work is in `try_*`.
#![no_std]
#![no_main]

use agent_ebpf::{DropKey, DROPS_MAP_CAPACITY, WATCHED_DEVICES_CAPACITY};
use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuHashMap},
    programs::BtfTracePointContext,
};

// Overridden by user space from BTF before load (see agent-ebpf/src/lib.rs `globals`).
#[no_mangle]
static TARGET_NETNS_INUM: u32 = 0;
#[no_mangle]
static OFFSET_SKB_DEV: u32 = 0;
#[no_mangle]
static OFFSET_DEV_IFINDEX: u32 = 0;
#[no_mangle]
static OFFSET_DEV_ND_NET: u32 = 0;
#[no_mangle]
static OFFSET_NET_NS_INUM: u32 = 0;

#[map]
static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(DROPS_MAP_CAPACITY, 0);

#[map]
static WATCHED_DEVICES: HashMap<u32, u32> = HashMap::with_max_entries(WATCHED_DEVICES_CAPACITY, 0);

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

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx);
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
    if dev.is_null() {
        return Err(());
    }
    let net: *const u8 = unsafe { load(dev, global(&OFFSET_DEV_ND_NET)) };
    if net.is_null() {
        return Err(());
    }
    let inum: u32 = unsafe { load(net, global(&OFFSET_NET_NS_INUM)) };
    if inum != global(&TARGET_NETNS_INUM) as u32 {
        return Ok(());
    }
    let ifindex: u32 = unsafe { load(dev, global(&OFFSET_DEV_IFINDEX)) };
    if unsafe { WATCHED_DEVICES.get(&ifindex) }.is_none() {
        return Ok(());
    }
    let key = DropKey { ifindex, reason };
    match DROPS.get_ptr_mut(&key) {
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = DROPS.insert(&key, &1, 0);
        }
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
