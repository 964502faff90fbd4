//! Load and attach: the prerequisites (object, netns, BTF, capabilities), the verifier's
//! verdict with a fallback to the helper path, each program on its tracepoint, and a status
//! that says what is missing when something is.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use agent_ebpf::{globals, programs, WATCHED_DEVICES_CAPACITY};
use aya::{programs::BtfTracePoint, Ebpf, EbpfLoader};

use super::{EbpfDropCounters, HeaderRead, EBPF_OBJECT};
use crate::{
    ebpf::{
        bench::ProgramRunStats,
        btf::Btf,
        offsets::{DropReasons, KernelOffsets},
        peers::{PeerIds, TrieEntries},
        EbpfError, EbpfState, EbpfStatus, Missing, ProgramStatus,
    },
    observe,
};

/// The `net.ns.inum` the programs filter on: the watched namespace's inode, which the kernel
/// keeps as a u32 (an inode beyond that cannot be a namespace's number).
fn target_netns_inum(netns: Option<&Path>) -> Result<u32, EbpfStatus> {
    let unavailable = |reason: String| EbpfStatus::unavailable(Missing::Netns, reason);
    let ino = observe::netns_inode(netns).map_err(|e| unavailable(e.to_string()))?;
    u32::try_from(ino).map_err(|_| {
        unavailable(format!(
            "{}: inode {ino} exceeds the kernel's u32 net.ns.inum",
            observe::netns_label(netns)
        ))
    })
}

/// Forwards the kernel programs' aya-log records (rare diagnostics only) into `tracing`.
pub(super) struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error => tracing::error!(target: "watchdog::ebpf::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "watchdog::ebpf::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "watchdog::ebpf::kernel", "{message}"),
            _ => tracing::debug!(target: "watchdog::ebpf::kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF bit numbers (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities from /proc/self/status, or None when unreadable.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Whether `caps` allows loading tracing programs: CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN.
pub(crate) fn caps_allow_tracing(caps: u64) -> bool {
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

fn looks_like_permission(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return true;
            }
        }
        let text = e.to_string();
        if text.contains("Operation not permitted") || text.contains("Permission denied") {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Full error chain on one line (aya's errors nest the useful part).
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cur = error.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

impl EbpfDropCounters {
    /// Loads and attaches the programs for the netns at `netns` (default: our own). The error
    /// is the status to report: what is missing and why.
    pub fn load(netns: Option<&Path>) -> Result<Self, EbpfStatus> {
        Self::load_object(EBPF_OBJECT, netns)
    }

    /// As [`Self::load`] with an explicit object (tests pass an empty one).
    pub fn load_object(object: &[u8], netns: Option<&Path>) -> Result<Self, EbpfStatus> {
        Self::load_inner(object, netns, false)
    }

    /// As [`Self::load`], but reading packet headers with `bpf_probe_read_kernel` as on kernels
    /// without the `bpf_rdonly_cast` kfunc (for tests of that path).
    #[doc(hidden)]
    pub fn load_with_probe_read(netns: Option<&Path>) -> Result<Self, EbpfStatus> {
        Self::load_inner(EBPF_OBJECT, netns, true)
    }

    fn load_inner(
        object: &[u8],
        netns: Option<&Path>,
        probe_read_only: bool,
    ) -> Result<Self, EbpfStatus> {
        if object.is_empty() {
            return Err(EbpfStatus::unavailable(
                Missing::Object,
                "eBPF programs not compiled in: the agent was built without bpf-linker on PATH \
                 (run `cargo xtask setup` and rebuild)",
            ));
        }
        let inum = target_netns_inum(netns)?;
        let btf = Btf::from_sys().map_err(|e| {
            EbpfStatus::unavailable(Missing::Btf, format!("kernel BTF unusable: {e}"))
        })?;
        let offsets = KernelOffsets::from_btf(&btf).map_err(|e| {
            EbpfStatus::unavailable(
                Missing::Btf,
                format!("kernel BTF lacks a needed field: {e}"),
            )
        })?;
        let reasons = DropReasons::from_btf(&btf).map_err(|e| {
            EbpfStatus::unavailable(Missing::Btf, format!("kernel BTF lacks drop reasons: {e}"))
        })?;
        if let Some(caps) = effective_caps() {
            if !caps_allow_tracing(caps) {
                return Err(EbpfStatus::unavailable(
                    Missing::Privilege,
                    format!(
                        "effective capabilities {caps:#x} lack CAP_BPF+CAP_PERFMON (or \
                         CAP_SYS_ADMIN) needed to load tracing programs"
                    ),
                ));
            }
        }

        let globals_values: Vec<(&'static str, u32)> = offsets
            .globals()
            .into_iter()
            .chain([(globals::TARGET_NETNS_INUM, inum)])
            .collect();
        let mut header_read = if probe_read_only {
            HeaderRead::ProbeRead
        } else {
            HeaderRead::detect(&btf)
        };
        let tracepoints = present_tracepoints(&btf, &programs::ALL);
        // Everything needed from our parse is taken: free it before aya parses the same BTF
        // for its relocations, so the two (tens of MiB each) never coexist.
        drop(btf);
        let (mut bpf, status) = loop {
            let result = load_and_attach(object, &globals_values, header_read, &tracepoints);
            let status = match &result {
                Err(status) | Ok((_, status)) => status,
            };
            // A program the verifier refused (not a missing tracepoint or privilege): the
            // helper path is older and accepted everywhere, so try once more with it.
            let refused =
                status.state != EbpfState::Attached && status.missing == Some(Missing::Load);
            match header_read {
                HeaderRead::DirectLoad { .. } if refused => {
                    tracing::warn!(
                        error = status.reason.as_deref().unwrap_or("?"),
                        "programs using bpf_rdonly_cast refused; using bpf_probe_read_kernel"
                    );
                    header_read = HeaderRead::ProbeRead;
                }
                _ => break result?,
            }
        };
        let kernel_log = match aya_log::EbpfLogger::init_with_logger(&mut bpf, KernelLog) {
            Ok(logger) => Some(std::sync::Mutex::new(logger)),
            Err(e) => {
                tracing::debug!(error = %e, "eBPF object has no kernel log");
                None
            }
        };
        tracing::debug!(
            ?offsets,
            netns_inum = inum,
            reasons = reasons.len(),
            "eBPF programs attached"
        );
        Ok(EbpfDropCounters {
            bpf,
            status,
            header_read,
            reasons,
            peers: PeerIds::default(),
            trie: TrieEntries::default(),
            slots: [0; WATCHED_DEVICES_CAPACITY as usize],
            retired: BTreeMap::new(),
            departed: BTreeMap::new(),
            generation: 0,
            peer_reported: std::sync::Mutex::new(BTreeMap::new()),
            possible_cpus: aya::util::nr_cpus().ok(),
            kernel_log,
        })
    }

    /// Benchmark only: loads and attaches the empty `kfree_skb_baseline` program next to the
    /// real ones, so the measuring overhead of the run-time statistics can be subtracted. The
    /// daemon never calls this.
    pub fn attach_bench_baseline(&mut self) -> Result<(), EbpfError> {
        let (name, tracepoint) = programs::KFREE_SKB_BASELINE;
        let btf = Btf::from_sys().map_err(|e| EbpfError::Bench(e.to_string()))?;
        let tracepoints = present_tracepoints(&btf, &[programs::KFREE_SKB_BASELINE]);
        drop(btf);
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| EbpfError::Bench(chain(&e)))?;
        attach_one(&mut self.bpf, &tracepoints, &aya_btf, name, tracepoint)
            .map_err(|(_, e)| EbpfError::Bench(format!("{name}: {e}")))
    }

    /// Run-time statistics of each attached program (needs [`crate::ebpf::bench::enable_stats`]),
    /// including the benchmark's baseline program when it was attached.
    pub fn program_stats(&self) -> Result<Vec<ProgramRunStats>, EbpfError> {
        let mut out = Vec::new();
        for (name, _) in programs::ALL
            .into_iter()
            .chain([programs::KFREE_SKB_BASELINE])
        {
            let Some(program) = self.bpf.program(name) else {
                continue;
            };
            let Ok(tp) = <&BtfTracePoint>::try_from(program) else {
                continue;
            };
            let info = match tp.info() {
                Ok(info) => info,
                // Not loaded (its tracepoint was missing): nothing to report.
                Err(_) => continue,
            };
            out.push(ProgramRunStats {
                name: name.to_string(),
                run_count: info.run_count(),
                run_time: info.run_time(),
            });
        }
        Ok(out)
    }
}

/// Loads the object (its kfunc placeholder resolved per `header_read`, globals overridden) and
/// attaches every program. Err when nothing could be attached.
/// The tracepoints of `programs` this kernel has (a `btf_trace_<name>` typedef in its BTF).
fn present_tracepoints(btf: &Btf, programs: &[(&str, &'static str)]) -> BTreeSet<&'static str> {
    programs
        .iter()
        .map(|(_, tracepoint)| *tracepoint)
        .filter(|tracepoint| btf.has_typedef(&format!("btf_trace_{tracepoint}")))
        .collect()
}

fn load_and_attach(
    object: &[u8],
    globals_values: &[(&'static str, u32)],
    header_read: HeaderRead,
    tracepoints: &BTreeSet<&'static str>,
) -> Result<(Ebpf, EbpfStatus), EbpfStatus> {
    let object = header_read
        .patch(object)
        .map_err(|e| EbpfStatus::unavailable(Missing::Load, format!("eBPF object: {e}")))?;
    // One parse of the kernel's BTF (~15 MiB of heap parsed) serves aya's relocations and
    // the attach. EbpfLoader::new() parses its own, which it cannot lend out: it is dropped
    // before ours is made, or both would be held at once (the daemon's peak memory).
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    let aya_btf = aya::Btf::from_sys_fs().map_err(|e| {
        EbpfStatus::unavailable(
            Missing::Btf,
            format!("aya cannot read kernel BTF: {}", chain(&e)),
        )
    })?;
    loader.btf(Some(&aya_btf));
    for (name, value) in globals_values {
        loader.override_global(name, value, true);
    }
    let type_ids = header_read.type_ids();
    for (name, value) in &type_ids {
        loader.override_global(name, value, true);
    }
    let mut bpf = loader.load(object.as_bytes()).map_err(|e| {
        let missing = if looks_like_permission(&e) {
            Missing::Privilege
        } else {
            Missing::Load
        };
        EbpfStatus::unavailable(missing, format!("loading the eBPF object: {}", chain(&e)))
    })?;

    let mut programs_status = Vec::new();
    let mut first_failure: Option<Missing> = None;
    for (name, tracepoint) in programs::ALL {
        let result = attach_one(&mut bpf, tracepoints, &aya_btf, name, tracepoint);
        if let Err((missing, _)) = &result {
            first_failure.get_or_insert(*missing);
        }
        programs_status.push(ProgramStatus {
            name: name.to_string(),
            tracepoint: tracepoint.to_string(),
            attached: result.is_ok(),
            error: result.err().map(|(_, e)| e),
        });
    }
    let attached = programs_status.iter().filter(|p| p.attached).count();
    let status = if attached == programs_status.len() {
        EbpfStatus {
            state: EbpfState::Attached,
            missing: None,
            reason: None,
            programs: programs_status,
        }
    } else {
        let failed: Vec<String> = programs_status
            .iter()
            .filter(|p| !p.attached)
            .map(|p| format!("{}: {}", p.name, p.error.as_deref().unwrap_or("?")))
            .collect();
        EbpfStatus {
            state: if attached == 0 {
                EbpfState::Unavailable
            } else {
                EbpfState::Partial
            },
            missing: first_failure,
            reason: Some(failed.join("; ")),
            programs: programs_status,
        }
    };
    if status.state == EbpfState::Unavailable {
        return Err(status);
    }
    tracing::debug!(?header_read, "eBPF object loaded");
    Ok((bpf, status))
}

fn attach_one(
    bpf: &mut Ebpf,
    tracepoints: &BTreeSet<&'static str>,
    aya_btf: &aya::Btf,
    name: &str,
    tracepoint: &str,
) -> Result<(), (Missing, String)> {
    if !tracepoints.contains(tracepoint) {
        return Err((
            Missing::Tracepoint,
            format!("tracepoint {tracepoint} does not exist on this kernel"),
        ));
    }
    let program = bpf.program_mut(name).ok_or_else(|| {
        (
            Missing::Load,
            format!("program {name} missing from the object"),
        )
    })?;
    let tp: &mut BtfTracePoint = program
        .try_into()
        .map_err(|e: aya::programs::ProgramError| (Missing::Load, chain(&e)))?;
    let classify = |e: aya::programs::ProgramError| {
        let missing = if looks_like_permission(&e) {
            Missing::Privilege
        } else {
            Missing::Load
        };
        (missing, chain(&e))
    };
    tp.load(tracepoint, aya_btf).map_err(classify)?;
    tp.attach().map_err(classify)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_reports_not_compiled_in() {
        let status = EbpfDropCounters::load_object(&[], None).unwrap_err();
        assert_eq!(status.state, EbpfState::NotCompiledIn);
        assert_eq!(status.missing, Some(Missing::Object));
        assert!(status.reason.unwrap().contains("bpf-linker"));
    }

    #[test]
    fn missing_netns_is_reported_as_such() {
        let status = EbpfDropCounters::load_object(&[1, 2, 3], Some(Path::new("/nonexistent/ns")))
            .unwrap_err();
        assert_eq!(status.missing, Some(Missing::Netns));
        assert!(status.reason.unwrap().contains("/nonexistent/ns"));
    }

    #[test]
    fn capability_check() {
        assert!(caps_allow_tracing(1 << CAP_SYS_ADMIN));
        assert!(caps_allow_tracing(1 << CAP_BPF | 1 << CAP_PERFMON));
        assert!(!caps_allow_tracing(1 << CAP_BPF));
        assert!(!caps_allow_tracing(0));
    }
}
