//! Cost measurement for `cargo xtask bench ebpf`: the kernel's own per-program run counters.
//!
//! `BPF_ENABLE_STATS` (what `kernel.bpf_stats_enabled=1` does, but scoped to a file descriptor)
//! makes the kernel account `run_time_ns`/`run_cnt` for every program while the fd is open.

use std::{os::fd::OwnedFd, time::Duration};

use serde::Serialize;

use super::EbpfError;

/// Keeps kernel BPF run-time statistics enabled until dropped.
#[derive(Debug)]
pub struct StatsGuard {
    _fd: OwnedFd,
}

/// Turns on BPF run-time statistics for as long as the guard lives.
pub fn enable_stats() -> Result<StatsGuard, EbpfError> {
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| EbpfError::Stats(std::io::Error::other(e)))?;
    Ok(StatsGuard { _fd: fd })
}

/// Accumulated runs of one program since load (only while stats were enabled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgramRunStats {
    pub name: String,
    pub run_count: u64,
    pub run_time: Duration,
}

impl ProgramRunStats {
    /// Mean cost per invocation, None before the first run.
    pub fn mean(&self) -> Option<Duration> {
        (self.run_count > 0).then(|| {
            Duration::from_nanos((self.run_time.as_nanos() / u128::from(self.run_count)) as u64)
        })
    }

    /// Difference between two readings of the same program (for a measured interval).
    pub fn since(&self, earlier: &ProgramRunStats) -> ProgramRunStats {
        ProgramRunStats {
            name: self.name.clone(),
            run_count: self.run_count.saturating_sub(earlier.run_count),
            run_time: self.run_time.saturating_sub(earlier.run_time),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_delta() {
        let a = ProgramRunStats {
            name: "p".into(),
            run_count: 10,
            run_time: Duration::from_nanos(1000),
        };
        let b = ProgramRunStats {
            name: "p".into(),
            run_count: 30,
            run_time: Duration::from_nanos(5000),
        };
        let d = b.since(&a);
        assert_eq!(d.run_count, 20);
        assert_eq!(d.mean(), Some(Duration::from_nanos(200)));
        let zero = ProgramRunStats {
            name: "p".into(),
            run_count: 0,
            run_time: Duration::ZERO,
        };
        assert_eq!(zero.mean(), None);
    }
}
