//! One `BPF_MAP_LOOKUP_BATCH` over a range of a per-CPU array of `u64` (aya has no batch
//! operations). The device drop counters are 1,280 entries per device (5 classes × 256
//! reasons); reading them one by one cost 1,280 syscalls a second per device, each copying
//! every CPU's value — most of the agent's idle CPU.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

/// `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`; the kernel zero-fills the rest of the union.
#[repr(C)]
#[derive(Debug, Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries `first..first + count` of the per-CPU `u64` array `map`, each summed over the
/// `cpus` possible CPUs. Needs Linux 5.6 (batch operations on arrays); an older kernel
/// answers `EINVAL`, and the caller reads entry by entry.
pub(super) fn per_cpu_sums(
    map: impl AsFd,
    first: u32,
    count: u32,
    cpus: usize,
) -> io::Result<Vec<u64>> {
    let len = count as usize;
    let mut keys = vec![0u32; len];
    // A per-CPU value is rounded up to 8 bytes per CPU: a u64 is exactly that.
    let mut values = vec![0u64; len * cpus];
    // The kernel starts after the key `in_batch` names (none: at the first).
    let before = first.wrapping_sub(1);
    let mut next = 0u32;
    let mut attr = BatchAttr {
        in_batch: if first == 0 {
            0
        } else {
            &before as *const u32 as u64
        },
        out_batch: &mut next as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: every pointer in `attr` is to a live local buffer sized for `count` keys of 4
    // bytes and `count` values of 8 bytes per CPU, which is what the kernel writes for a
    // per-CPU array with 4-byte keys and 8-byte values; `attr` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // ENOENT: the range ran to the end of the array; `count` says how far it got.
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    let in_order = keys.iter().zip(first..).all(|(k, want)| *k == want);
    if attr.count != count || !in_order {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "batch lookup of {count} entries from {first} returned {} (in order: {in_order})",
                attr.count
            ),
        ));
    }
    Ok(values.chunks_exact(cpus).map(|c| c.iter().sum()).collect())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};

    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct UpdateAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is the member of `union bpf_attr` that `cmd` reads, and its pointers
        // (if any) are to buffers the caller keeps alive.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// A per-CPU array where entry `i` holds `i * 10 + cpu` on each CPU; `None` where this
    /// process may not create maps (and WATCHDOG_REQUIRE_EBPF is not set).
    fn filled_array(entries: u32, cpus: usize) -> Option<OwnedFd> {
        let mut create = CreateAttr {
            map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: entries,
            ..CreateAttr::default()
        };
        let fd = match bpf(BPF_MAP_CREATE, &mut create) {
            Ok(fd) => fd as i32,
            Err(e) if std::env::var_os("WATCHDOG_REQUIRE_EBPF").is_none() => {
                eprintln!("skipped: cannot create a BPF map: {e}");
                return None;
            }
            Err(e) => panic!("cannot create a BPF map: {e}"),
        };
        // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for key in 0..entries {
            let value: Vec<u64> = (0..cpus as u64)
                .map(|cpu| u64::from(key) * 10 + cpu)
                .collect();
            let mut update = UpdateAttr {
                map_fd: fd.as_raw_fd() as u32,
                key: &key as *const u32 as u64,
                value: value.as_ptr() as u64,
                ..UpdateAttr::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut update).expect("update");
        }
        Some(fd)
    }

    fn expected(range: std::ops::Range<u32>, cpus: usize) -> Vec<u64> {
        let cpu_sum: u64 = (0..cpus as u64).sum();
        range
            .map(|i| u64::from(i) * 10 * cpus as u64 + cpu_sum)
            .collect()
    }

    #[test]
    fn reads_a_range_summed_over_cpus() {
        let cpus = aya::util::nr_cpus().expect("possible CPUs");
        let Some(map) = filled_array(40, cpus) else {
            return;
        };
        // From the first entry, from the middle, and up to the last (ENOENT from the kernel).
        for (first, count) in [(0, 10), (13, 7), (30, 10), (0, 40)] {
            assert_eq!(
                per_cpu_sums(&map, first, count, cpus).unwrap(),
                expected(first..first + count, cpus),
                "entries {first}..{}",
                first + count
            );
        }
        let past_the_end = per_cpu_sums(&map, 35, 10, cpus).unwrap_err();
        assert_eq!(
            past_the_end.kind(),
            io::ErrorKind::InvalidData,
            "{past_the_end}"
        );
    }
}
