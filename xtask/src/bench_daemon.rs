//! `cargo xtask bench daemon`: detection latency, event throughput at 30,000 routes, resync vs
//! raw dump, RSS and idle CPU at 5,000 peers — of the real `watchdog run` (release build),
//! measured by `agent/examples/bench_daemon.rs` through the status API. Needs root.
//! `BENCH_INJECTIONS` and `BENCH_PEERS` shrink it for a quick look.
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{cargo, is_root, run as run_step, setup, workspace_root};

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the daemon benchmark builds network namespaces: run as root (sudo -E cargo xtask bench daemon)");
    }
    let env = setup::run()?;
    run_step(
        "build watchdog and the daemon benchmark (release)",
        &mut cargo(
            &env,
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
