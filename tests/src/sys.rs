//! Thin wrappers over the tools and syscalls the lab needs: `ip`/`bridge` (batched per
//! namespace) and `setns` for threads that must live in a node's network namespace.

use std::{
    fs::File,
    io::Write,
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};

/// Runs `program args…`, failing with its stderr when it exits non-zero.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is iproute2 installed?)"))?;
    check(program, args, out)
}

/// Like [`run`] but with `input` on stdin (for `-batch -`).
pub(crate) fn run_stdin(program: &str, args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .with_context(|| format!("writing the batch to {program}"))?;
    let out = child.wait_with_output()?;
    check(program, args, out).with_context(|| format!("batch was:\n{input}"))
}

fn check(program: &str, args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n <netns> -batch -` with one command per line; stops at the first failure.
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    tracing::debug!(netns, commands = lines.len(), "ip batch");
    run_stdin(
        "ip",
        &["-n", netns, "-batch", "-"],
        &(lines.join("\n") + "\n"),
    )
    .map(drop)
}

/// Runs `bridge -n <netns> -batch -`.
pub(crate) fn bridge_batch(netns: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    tracing::debug!(netns, commands = lines.len(), "bridge batch");
    run_stdin(
        "bridge",
        &["-n", netns, "-batch", "-"],
        &(lines.join("\n") + "\n"),
    )
    .map(drop)
}

/// Moves the CALLING THREAD into the network namespace at `path`. Only call this on a thread
/// spawned for the purpose: the thread stays there until it exits.
pub(crate) fn enter_netns(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns on a valid, open namespace fd; affects only this thread's namespaces.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns({})", path.display()));
    }
    Ok(())
}

/// Fails clearly when not root: everything in the lab needs CAP_NET_ADMIN and CAP_SYS_ADMIN.
pub(crate) fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the network-namespace lab needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN): run it with sudo or via `cargo xtask`");
    }
    Ok(())
}
