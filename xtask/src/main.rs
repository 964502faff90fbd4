//! Developer tasks: `cargo xtask setup | test | lab | bench | install | package`.
//!
//! Every task bootstraps what it needs first (idempotent, seconds on the second run), so a fresh
//! machine needs nothing but this repository and the Rust toolchains.

mod bench;
mod install;
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "dataplane-watchdog developer tasks", long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: nightly rust-src, bpf-linker built against
    /// rustc's own LLVM, iproute2. Idempotent.
    Setup,
    /// The one test command: fmt, clippy (host and BPF), unit tests, privileged integration
    /// tests in network namespaces, the Debian package install/upgrade/purge test (needs root).
    Test {
        /// Skip the privileged integration tests (for non-root development).
        #[arg(long)]
        unprivileged: bool,
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
    },
    /// Replay the k8s03 incident in a network-namespace lab and show the agent catch it.
    Lab {
        /// Extra arguments for the lab demo (see `cargo xtask lab -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (numbers for the README): `scan`, `daemon`, `ebpf`, `findings`, `evaluate`, or all of
    /// those; `churn` (an hour of node churn, memory sampled) only when named.
    Bench {
        /// Which benchmark to run; all when omitted.
        which: Option<String>,
    },
    /// Build the Debian package (cargo-deb) into target/debian/ and check it: eBPF embedded,
    /// libc6 dependency against the binary's GLIBC_ symbols, lintian without errors.
    Package {
        /// Package version instead of the crate's (including the Debian revision).
        #[arg(long)]
        deb_version: Option<String>,
        /// Package the existing target/release build instead of building first.
        #[arg(long)]
        no_build: bool,
    },
    /// Install the binary (as /usr/local/bin/dataplane-watchdog), the systemd unit and the
    /// example config.
    Install {
        /// Only list what would be written.
        #[arg(long)]
        dry_run: bool,
        /// Install under this root instead of `/`.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run().map(|_| ()),
        Task::Test {
            unprivileged,
            filter,
        } => test(unprivileged, filter.as_deref()),
        Task::Lab { args } => lab(&args),
        Task::Bench { which } => bench::run_bench(which.as_deref()),
        Task::Install { dry_run, root } => install::run(&root, dry_run),
        Task::Package {
            deb_version,
            no_build,
        } => package::run(deb_version.as_deref(), no_build),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command in the workspace with the toolchain environment, echoing it first.
pub fn run(step: &str, cmd: &mut Command) -> Result<()> {
    let started = Instant::now();
    println!("==> {step}");
    cmd.current_dir(workspace_root());
    let status = cmd
        .status()
        .with_context(|| format!("{step}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    println!("    {step}: ok in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub fn cargo(env: &setup::Toolchain, args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args);
    env.apply(&mut cmd);
    cmd
}

fn test(unprivileged: bool, filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let env = setup::run()?;
    run(
        "cargo fmt --check",
        &mut cargo(&env, &["fmt", "--all", "--check"]),
    )?;
    run(
        "clippy (host crates, -D warnings)",
        &mut cargo(
            &env,
            &[
                "clippy",
                "--workspace",
                "--exclude",
                "agent-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
    )?;
    run(
        "clippy (eBPF crate, BPF target, -D warnings)",
        &mut env.ebpf_clippy(),
    )?;
    let mut unit = vec![
        "test",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--lib",
        "--bins",
    ];
    if let Some(f) = filter {
        unit.push(f);
    }
    run("unit tests", &mut cargo(&env, &unit))?;
    if unprivileged {
        println!("==> privileged integration tests: skipped (--unprivileged)");
    } else {
        if !is_root() {
            bail!(
                "the integration tests build network namespaces and load eBPF: run as root \
                 (sudo -E cargo xtask test) or pass --unprivileged"
            );
        }
        let mut it = vec![
            "test",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--test",
            "*",
        ];
        it.push("--");
        if let Some(f) = filter {
            it.push(f);
        }
        // Tests share kernel state (tracepoints, sysctls): one at a time.
        it.push("--test-threads=1");
        run(
            "privileged integration tests (network namespaces, eBPF)",
            &mut cargo(&env, &it),
        )?;
        // A release build and dpkg on this machine: only when asked for or with no filter.
        if filter.is_none_or(|f| f.contains("deb") || f.contains("package")) {
            package::acceptance(&env)?;
        }
    }
    println!(
        "all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn lab(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the lab builds network namespaces: run as root (sudo -E cargo xtask lab)");
    }
    let env = setup::run()?;
    run(
        "build watchdog and the lab (release)",
        &mut cargo(
            &env,
            &[
                "build",
                "--release",
                "--quiet",
                "-p",
                "dataplane-watchdog",
                "-p",
                "watchdog-lab",
            ],
        ),
    )?;
    let target = workspace_root().join("target/release");
    let mut cmd = Command::new(target.join("watchdog-lab"));
    cmd.args(args).env("WATCHDOG_BIN", target.join("watchdog"));
    let status = cmd.status().context("starting the lab demo")?;
    if !status.success() {
        bail!("lab demo failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_passes_flags_through() {
        let cli = Cli::try_parse_from(["xtask", "lab", "--datastore", "kubernetes"]).unwrap();
        match cli.task {
            Task::Lab { args } => assert_eq!(args, ["--datastore", "kubernetes"]),
            _ => panic!("not the lab task"),
        }
    }
}
