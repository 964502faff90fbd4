//! Benchmarks. Each reports ratios against a baseline measured in the same run, never absolute
//! pass/fail thresholds: the numbers go in the README.
//!
//! Each one is a release-built example of the agent crate, run directly (not under `cargo run`)
//! so nothing else shares its measurements:
//! - `scan` (`agent/examples/bench_scan.rs`): one `watchdog scan` pass against a raw netlink
//!   route dump, on the lab and on a synthetic 5,000-peer node.
//! - `daemon` (`agent/examples/bench_daemon.rs`): the real `watchdog run` through its status API:
//!   detection latency, event throughput at 30,000 routes, resync vs raw dumps, RSS and idle
//!   CPU at 5,000 peers. `BENCH_INJECTIONS` and `BENCH_PEERS` shrink it for a quick look.
//! - `ebpf` (`agent/examples/bench_ebpf.rs`): per-event cost of each kernel program (kernel
//!   run-time stats, calibrated by an empty program) and UDP flood throughput with and without
//!   the programs.
//!
//! - `evaluate` (`agent/examples/bench_evaluate.rs`): one evaluation after one route change at
//!   5,000 peers, every check from scratch vs the daemon's incremental evaluator.
//!
//! - `churn` (`bench_daemon --churn`, only when named: it runs an hour by default): the daemon's
//!   memory while nodes join and leave and the overlay device is re-created, sampled every
//!   10 s; `BENCH_CHURN_SECS` shortens it.
//!
//! `WATCHDOG_BENCH_ARGS` passes flags to the example (e.g. `--quick` for `ebpf`).
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{cargo, is_root, run, setup, workspace_root};

const ALL: [&str; 5] = ["scan", "daemon", "ebpf", "findings", "evaluate"];
/// Run only when named.
const LONG: [&str; 1] = ["churn"];

pub fn run_bench(which: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!("benchmarks build network namespaces: run as root (sudo -E cargo xtask bench)");
    }
    let env = setup::run()?;
    let selected: Vec<&str> = match which {
        None => ALL.to_vec(),
        Some(w) if ALL.contains(&w) || LONG.contains(&w) => vec![w],
        Some(other) => bail!(
            "unknown benchmark {other:?}: expected one of {}, {}",
            ALL.join(", "),
            LONG.join(", ")
        ),
    };
    for bench in selected {
        match bench {
            "scan" => run_example(&env, "bench_scan", &[])?,
            // The daemon benchmark drives the real binary.
            "daemon" => run_example(&env, "bench_daemon", &["--bin", "watchdog"])?,
            "ebpf" => run_example(&env, "bench_ebpf", &[])?,
            "findings" => run_example(&env, "bench_findings", &[])?,
            "evaluate" => run_example(&env, "bench_evaluate", &[])?,
            "churn" => {
                std::env::set_var(
                    "WATCHDOG_BENCH_ARGS",
                    format!(
                        "--churn {}",
                        std::env::var("WATCHDOG_BENCH_ARGS").unwrap_or_default()
                    ),
                );
                run_example(&env, "bench_daemon", &["--bin", "watchdog"])?
            }
            _ => unreachable!("checked above"),
        }
    }
    Ok(())
}

/// Builds `example` (plus `extra` build targets) in release and runs it.
fn run_example(env: &setup::Toolchain, example: &str, extra: &[&str]) -> Result<()> {
    let mut args = vec![
        "build",
        "--release",
        "--quiet",
        "-p",
        "dataplane-watchdog",
        "--example",
        example,
    ];
    args.extend_from_slice(extra);
    run(
        &format!("build {example} (release)"),
        &mut cargo(env, &args),
    )?;
    let bin = workspace_root()
        .join("target/release/examples")
        .join(example);
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
        bail!("{example} failed ({status})");
    }
    Ok(())
}
