//! `cargo xtask bench ebpf`: per-event cost of each kernel program (kernel run-time stats) and
//! UDP flood throughput through the lab with and without the programs, as a ratio measured in
//! the same run. The measuring is done by `agent/examples/bench_ebpf.rs` (root, release build);
//! `WATCHDOG_BENCH_ARGS` passes it flags (`--json`, `--quick`, `--storm-only`).
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{cargo, run as run_step, setup, workspace_root};

/// Root and the toolchain are checked by `bench::run_bench` before dispatching here.
pub fn run(env: &setup::Toolchain) -> Result<()> {
    run_step(
        "build the eBPF benchmark (release)",
        &mut cargo(
            env,
            &[
                "build",
                "--release",
                "--quiet",
                "-p",
                "dataplane-watchdog",
                "--example",
                "bench_ebpf",
            ],
        ),
    )?;
    let bin = workspace_root().join("target/release/examples/bench_ebpf");
    let status = Command::new(&bin)
        .args(
            std::env::var("WATCHDOG_BENCH_ARGS")
                .ok()
                .as_deref()
                .map(str::split_whitespace)
                .into_iter()
                .flatten(),
        )
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !status.success() {
        bail!("eBPF benchmark failed ({status})");
    }
    Ok(())
}
