//! Benchmarks. Each reports ratios against a baseline measured in the same run, never absolute
//! pass/fail thresholds: the numbers go in the README.
use anyhow::{bail, Result};

use crate::{cargo, is_root, run, setup};

const ALL: [&str; 3] = ["scan", "daemon", "ebpf"];

pub fn run_bench(which: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!("benchmarks build network namespaces: run as root (sudo -E cargo xtask bench)");
    }
    let env = setup::run()?;
    let selected: Vec<&str> = match which {
        None => ALL.to_vec(),
        Some(w) if ALL.contains(&w) => vec![w],
        Some(other) => bail!(
            "unknown benchmark {other:?}: expected one of {}",
            ALL.join(", ")
        ),
    };
    for bench in selected {
        match bench {
            "scan" => scan(&env)?,
            "daemon" => crate::bench_daemon::run(&env)?,
            "ebpf" => crate::bench_ebpf::run(&env)?,
            _ => unreachable!("checked above"),
        }
    }
    Ok(())
}

fn scan(env: &setup::Toolchain) -> Result<()> {
    run(
        "bench scan (release build)",
        &mut cargo(
            env,
            &[
                "run",
                "--quiet",
                "--release",
                "-p",
                "dataplane-watchdog",
                "--example",
                "bench_scan",
            ],
        ),
    )
}
