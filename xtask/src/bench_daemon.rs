//! `cargo xtask bench daemon`: detection latency, event throughput at 30,000 routes, resync vs
//! raw dump, RSS and idle CPU at 5,000 peers — of the real `watchdog run` (release build),
//! measured by `agent/examples/bench_daemon.rs` through the status API. Needs root.
//! `BENCH_INJECTIONS` and `BENCH_PEERS` shrink it for a quick look.
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{cargo, run as run_step, setup, workspace_root};

/// Root and the toolchain are checked by `bench::run_bench` before dispatching here.
pub fn run(env: &setup::Toolchain) -> Result<()> {
    run_step(
        "build watchdog and the daemon benchmark (release)",
        &mut cargo(
            env,
            &[
                "build",
                "--release",
                "--quiet",
                "-p",
                "dataplane-watchdog",
                "--bin",
                "watchdog",
                "--example",
                "bench_daemon",
            ],
        ),
    )?;
    let bin = workspace_root().join("target/release/examples/bench_daemon");
    let status = Command::new(&bin)
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !status.success() {
        bail!("daemon benchmark failed ({status})");
    }
    Ok(())
}
