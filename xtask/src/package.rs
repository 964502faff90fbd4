//! `cargo xtask package`: the Debian package, built by cargo-deb from `[package.metadata.deb]`
//! in agent/Cargo.toml (README "Install" says what goes where), then checked:
//!
//! - the eBPF object is embedded (the build runs with `WATCHDOG_REQUIRE_EBPF=1`, so a missing
//!   bpf-linker fails the build; the embedded object is looked for in the binary as well),
//! - `Depends: libc6 (>= X)` covers the newest `GLIBC_` symbol version the binary needs
//!   (`objdump -T`), X coming from dpkg-shlibdeps through cargo-deb's `$auto`,
//! - lintian reports no error.
//!
//! `cargo xtask test` (as root) also runs the install/upgrade/purge acceptance test on two
//! packages made from one release build ([`acceptance`]).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{cargo, run as run_step, setup, workspace_root};

/// The package name, as in `[package.metadata.deb] name`.
pub const NAME: &str = "dataplane-watchdog";

/// A built package and what was checked about it.
pub struct Deb {
    pub path: PathBuf,
    pub version: String,
    /// Newest GLIBC_ symbol version the binary needs.
    pub glibc_needed: String,
    /// X of `libc6 (>= X)` in Depends.
    pub libc6_depends: String,
}

/// `cargo xtask package`.
pub fn run(deb_version: Option<&str>, no_build: bool) -> Result<()> {
    let env = setup::run()?;
    let cargo_deb = setup::packaging()?;
    if !no_build {
        build_release(&env)?;
    }
    let deb = build_deb(&cargo_deb, deb_version, None)?;
    lintian(&deb.path)?;
    println!(
        "package   {} (version {}; needs GLIBC_{}, Depends: libc6 (>= {}))",
        deb.path.display(),
        deb.version,
        deb.glibc_needed,
        deb.libc6_depends
    );
    Ok(())
}

fn build_release(env: &setup::Toolchain) -> Result<()> {
    run_step(
        "build watchdog (release, eBPF required)",
        &mut cargo(
            env,
            &["build", "--release", "--quiet", "-p", "dataplane-watchdog"],
        ),
    )
}

fn release_binary() -> PathBuf {
    workspace_root().join("target/release/watchdog")
}

/// cargo-deb on the existing release build (`--no-build`: the build above ran with the
/// toolchain environment; cargo-deb's own `cargo build` would not).
fn build_deb(cargo_deb: &Path, deb_version: Option<&str>, variant: Option<&str>) -> Result<Deb> {
    let binary = release_binary();
    ensure!(
        binary.is_file(),
        "{} is missing: build it first (cargo xtask package without --no-build)",
        binary.display()
    );
    check_ebpf_embedded(&binary)?;
    let out_dir = workspace_root().join("target/debian");
    fs::create_dir_all(&out_dir)?;
    let mut cmd = Command::new(cargo_deb);
    // --strip: the release profile keeps line tables for backtraces (debug = 1); the package
    // ships the stripped binary, target/release keeps the full one.
    cmd.args(["-p", NAME, "--no-build", "--strip", "--output"])
        .arg(&out_dir);
    if let Some(v) = deb_version {
        cmd.args(["--deb-version", v]);
    }
    if let Some(v) = variant {
        cmd.args(["--variant", v]);
    }
    let out = cmd
        .current_dir(workspace_root())
        .output()
        .context("running cargo-deb")?;
    if !out.status.success() {
        bail!(
            "cargo-deb failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // cargo-deb prints the path of the package it wrote, last.
    let printed = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(
        printed
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.ends_with(".deb"))
            .with_context(|| format!("cargo-deb printed no .deb path: {printed}"))?,
    );
    let version = dpkg_field(&path, "Version")?;
    let depends = dpkg_field(&path, "Depends")?;
    let libc6_depends = libc6_minimum(&depends)
        .with_context(|| format!("{}: Depends has no libc6 (>= X): {depends}", path.display()))?;
    let glibc_needed = max_glibc(&binary)?;
    ensure!(
        version_le(&glibc_needed, &libc6_depends),
        "{}: the binary needs GLIBC_{glibc_needed} but Depends says libc6 (>= {libc6_depends})",
        path.display()
    );
    Ok(Deb {
        path,
        version,
        glibc_needed,
        libc6_depends,
    })
}

/// The agent embeds its kernel programs (an ELF object for EM_BPF) in the binary; a build
/// without bpf-linker would embed an empty one.
fn check_ebpf_embedded(binary: &Path) -> Result<()> {
    const EM_BPF: u16 = 247;
    let bytes = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let embedded = bytes
        .windows(4)
        .enumerate()
        .skip(1)
        .filter(|(_, w)| *w == b"\x7fELF")
        .any(|(i, _)| {
            bytes
                .get(i + 18..i + 20)
                .is_some_and(|m| u16::from_le_bytes([m[0], m[1]]) == EM_BPF)
        });
    ensure!(
        embedded,
        "{} has no eBPF object embedded: refusing to package a degraded agent (build with \
         WATCHDOG_REQUIRE_EBPF=1 and bpf-linker, as cargo xtask does)",
        binary.display()
    );
    Ok(())
}

fn dpkg_field(deb: &Path, field: &str) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .arg("--field")
        .arg(deb)
        .arg(field)
        .output()
        .context("running dpkg-deb")?;
    ensure!(
        out.status.success(),
        "dpkg-deb --field {} failed",
        deb.display()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// X in `libc6 (>= X)`.
fn libc6_minimum(depends: &str) -> Option<String> {
    depends.split(',').map(str::trim).find_map(|dep| {
        let rest = dep.strip_prefix("libc6")?.trim();
        let inner = rest.strip_prefix("(>=")?.strip_suffix(')')?;
        Some(inner.trim().to_string())
    })
}

/// Newest `GLIBC_x.y[.z]` version among the binary's dynamic symbols.
fn max_glibc(binary: &Path) -> Result<String> {
    let out = Command::new("objdump")
        .arg("-T")
        .arg(binary)
        .output()
        .context("running objdump -T (binutils)")?;
    ensure!(
        out.status.success(),
        "objdump -T {} failed",
        binary.display()
    );
    newest_glibc(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("{} needs no GLIBC_ symbol?", binary.display()))
}

fn newest_glibc(objdump: &str) -> Option<String> {
    objdump
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .max_by(|a, b| version_cmp(a, b))
        .map(str::to_string)
}

fn version_parts(v: &str) -> Vec<u64> {
    // "2.34" or a Debian version like "2.34" / "2.36-9": compare the upstream numbers.
    v.split(['-', '+', '~'])
        .next()
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    version_parts(a).cmp(&version_parts(b))
}

fn version_le(a: &str, b: &str) -> bool {
    version_cmp(a, b) != std::cmp::Ordering::Greater
}

/// lintian: errors fail, warnings are printed (the justified ones are in
/// packaging/deb/lintian-overrides).
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        println!("lintian   {line}");
    }
    if !out.status.success() {
        bail!(
            "lintian found errors in {} ({}){}",
            deb.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("lintian   {}: no errors", deb.display());
    Ok(())
}

/// The acceptance test of issue 17, as a step of `cargo xtask test` (root): one release build,
/// two packages (the second a later version whose conffile default changed), then the
/// privileged test `tests/tests/deb_package.rs` installs, upgrades and purges them.
pub fn acceptance(env: &setup::Toolchain) -> Result<()> {
    let cargo_deb = setup::packaging()?;
    build_release(env)?;
    let mut v1 = build_deb(&cargo_deb, None, None)?;
    lintian(&v1.path)?;
    // cargo-deb deletes the package's other versions from target/debian when it writes one.
    let dir = workspace_root().join("target/deb-upgrade-test");
    fs::create_dir_all(&dir)?;
    let kept = dir.join(v1.path.file_name().context("a .deb file name")?);
    fs::copy(&v1.path, &kept).with_context(|| format!("copying {}", v1.path.display()))?;
    v1.path = kept;
    // The second version's conffile default: the example with a changed resync_interval.
    let example = fs::read_to_string(workspace_root().join("systemd/config.example.toml"))?;
    let changed = example.replace("resync_interval = \"60s\"", "resync_interval = \"30s\"");
    ensure!(
        changed != example,
        "the example config has no resync_interval = \"60s\""
    );
    fs::write(dir.join("config.toml"), changed)?;
    let v2_version = format!("{}+upgradetest1", v1.version);
    let v2 = build_deb(&cargo_deb, Some(&v2_version), Some("upgrade-test"))?;
    println!(
        "packages  {} and {} (needs GLIBC_{}, Depends: libc6 (>= {}))",
        v1.path.display(),
        v2.path.display(),
        v1.glibc_needed,
        v1.libc6_depends
    );
    // The workspace selection of the integration-test step, so nothing is rebuilt.
    let args = [
        "test",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--test",
        "deb_package",
        "--",
        "--test-threads=1",
    ];
    let mut cmd = cargo(env, &args);
    cmd.env("WATCHDOG_DEB_V1", &v1.path)
        .env("WATCHDOG_DEB_V2", &v2.path);
    run_step(
        "package acceptance (dpkg -i, upgrade, reinstall, purge)",
        &mut cmd,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_glibc_symbol_version_is_found() {
        let objdump = "\
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.2.5) memcpy
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.34) __libc_start_main
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.9)  pipe2
0000000000000000  w   DF *UND*  0000000000000000 (GLIBC_PRIVATE) _dl_x
0000000000000000      DF *UND*  0000000000000000  GLIBC_2.28  statx
";
        assert_eq!(newest_glibc(objdump).as_deref(), Some("2.34"));
        assert_eq!(newest_glibc("nothing"), None);
    }

    #[test]
    fn the_libc6_minimum_is_read_from_depends() {
        assert_eq!(
            libc6_minimum("libc6 (>= 2.34), init-system-helpers (>= 1.54~)").as_deref(),
            Some("2.34")
        );
        assert_eq!(
            libc6_minimum("libgcc-s1 (>= 4.2), libc6 (>= 2.36)").as_deref(),
            Some("2.36")
        );
        assert_eq!(libc6_minimum("libc6, foo"), None);
        assert!(version_le("2.34", "2.34"));
        assert!(version_le("2.9", "2.34"));
        assert!(!version_le("2.35", "2.34"));
    }
}
