//! Idempotent bootstrap of the build and test toolchain (DESIGN.md §5).
//!
//! - nightly `rust-src` (the BPF target builds `core` from source),
//! - bpf-linker 0.13.0 built against rustc's own LLVM 22 with an rpath to rustc's sysroot,
//!   installed in a per-user cache shared by every clone (rebuilding takes ~1 minute),
//! - iproute2 (`ip`, `bridge`) for the lab;
//! - Prometheus Alertmanager (Debian's `prometheus-alertmanager`) for the alert tests;
//! - for `cargo xtask package` only ([`packaging`]): cargo-deb 3.8.0 in the same cache, and
//!   Debian's dpkg-dev (dpkg-shlibdeps) and lintian.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Environment every cargo invocation of the xtask gets.
pub struct Toolchain {
    path: OsString,
}

impl Toolchain {
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("PATH", &self.path)
            // CI must never ship an agent without its kernel programs.
            .env("WATCHDOG_REQUIRE_EBPF", "1");
    }

    pub fn ebpf_clippy(&self) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.args([
            "+nightly",
            "clippy",
            "-p",
            "agent-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/bpf-clippy",
            "--",
            "-D",
            "warnings",
        ]);
        self.apply(&mut cmd);
        cmd
    }
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("WATCHDOG_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("dataplane-watchdog")
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn step(msg: &str) {
    println!("--> setup: {msg}");
}

pub fn run() -> Result<Toolchain> {
    ensure_nightly_rust_src()?;
    let tools_bin = ensure_bpf_linker()?;
    ensure_iproute2()?;
    ensure_alertmanager()?;
    let mut paths = vec![tools_bin];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    Ok(Toolchain {
        path: env::join_paths(paths).context("building PATH")?,
    })
}

fn ensure_nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "the eBPF programs need a nightly toolchain: `rustup toolchain install nightly` \
         (rustup and a nightly toolchain come with this machine image)",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step("installing rust-src for the nightly toolchain (BPF target builds core from source)");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("`rustup component add rust-src --toolchain nightly` failed");
    }
    Ok(())
}

/// Returns the directory holding `bpf-linker`.
fn ensure_bpf_linker() -> Result<PathBuf> {
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["--print", "sysroot"]))?);
    let version = output(Command::new("rustc").arg("--version"))?;
    // Keyed by rustc version: a toolchain update means a new LLVM and a rebuild.
    let key: String = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("unknown")
        .to_string();
    let root = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-rustc-{key}"));
    let bin_dir = root.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if linker.is_file()
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(bin_dir);
    }

    let libllvm = find_libllvm(&sysroot.join("lib")).with_context(|| {
        format!(
            "rustc's sysroot {} has no libLLVM.so.*: cannot build bpf-linker against rustc's LLVM",
            sysroot.display()
        )
    })?;
    let llvm_major = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .unwrap_or("22")
        .to_string();
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM {llvm_major} ({}); about a minute",
        libllvm.display()
    ));
    let prefix = root.join("llvm-prefix");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("symlinking {}", link.display()))?;
    let status = Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
            "--root",
        ])
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", sysroot.join("lib").display()),
        )
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!(
            "building bpf-linker failed; it needs crates.io access and rustc's libLLVM ({}). \
             See DESIGN.md §5 for the manual recipe",
            libllvm.display()
        );
    }
    Ok(bin_dir)
}

fn find_libllvm(lib: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect();
    found.sort();
    found.pop()
}

/// What `cargo xtask package` needs besides the build toolchain: the `cargo-deb` binary
/// (returned), dpkg-shlibdeps (dpkg-dev, for `Depends: $auto`) and lintian.
pub fn packaging() -> Result<PathBuf> {
    let root = cache_dir().join(format!("cargo-deb-{CARGO_DEB_VERSION}"));
    let bin = root.join("bin/cargo-deb");
    let works = |bin: &Path| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works(&bin) {
        step(&format!(
            "building cargo-deb {CARGO_DEB_VERSION} (cargo install --locked); a few minutes"
        ));
        let status = Command::new("cargo")
            .args([
                "install",
                &format!("cargo-deb@{CARGO_DEB_VERSION}"),
                "--locked",
                "--root",
            ])
            .arg(&root)
            .status()
            .context("running cargo install cargo-deb")?;
        if !status.success() || !works(&bin) {
            bail!("building cargo-deb {CARGO_DEB_VERSION} failed (it needs crates.io access)");
        }
    }
    let have = |tool: &str| which(tool).is_some();
    let missing: Vec<&str> = [("dpkg-shlibdeps", "dpkg-dev"), ("lintian", "lintian")]
        .into_iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| package)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(bin)
}

fn which(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn ensure_iproute2() -> Result<()> {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have("ip") && have("bridge") {
        return Ok(());
    }
    apt_install(&["iproute2"])
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "missing Debian packages: apt-get install {}",
            packages.join(" ")
        );
    }
    step(&format!("installing {} with apt-get", packages.join(" ")));
    let mut install = vec!["install", "-y", "-qq"];
    install.extend_from_slice(packages);
    for args in [&["update", "-qq"][..], &install[..]] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
    }
    Ok(())
}

/// The alert integration tests run the real Alertmanager (`tests/tests/alerts.rs`).
fn ensure_alertmanager() -> Result<()> {
    const BIN: &str = "/usr/bin/prometheus-alertmanager";
    if Path::new(BIN).exists() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!("{BIN} is missing: apt-get install prometheus-alertmanager");
    }
    step("installing prometheus-alertmanager with apt-get (alert integration tests)");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "prometheus-alertmanager"][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
    }
    Ok(())
}
