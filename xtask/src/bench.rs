//! Benchmarks. Each reports ratios against a baseline measured in the same run, never absolute
//! pass/fail thresholds: the numbers go in the README.
use anyhow::{bail, Result};

pub fn run(which: Option<&str>) -> Result<()> {
    match which {
        Some("ebpf") => crate::bench_ebpf::run(),
        None | Some("scan") | Some("daemon") => {
            bail!("benchmarks are not implemented yet (issues 3, 4, 5)")
        }
        Some(other) => bail!("unknown benchmark {other:?}: expected scan, daemon or ebpf"),
    }
}
