//! Builds the kernel programs in `agent-ebpf` with the nightly BPF toolchain and embeds the object.
//!
//! When bpf-linker is missing (a plain `cargo build` on a machine that never ran `cargo xtask
//! setup`) the agent still builds: it embeds an empty object and reports at run time that eBPF
//! accounting was not compiled in. `WATCHDOG_REQUIRE_EBPF=1` (set by `cargo xtask`) turns that
//! into a hard error so CI never ships a binary without its programs.
use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context as _};

const EBPF_PACKAGE: &str = "agent-ebpf";
const OBJECT_NAME: &str = "agent-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=WATCHDOG_REQUIRE_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let required = env::var("WATCHDOG_REQUIRE_EBPF").is_ok_and(|v| v == "1");

    if which_bpf_linker().is_none() {
        if required {
            return Err(anyhow!(
                "bpf-linker not found on PATH; run `cargo xtask setup` (it builds bpf-linker \
                 against rustc's own LLVM) or unset WATCHDOG_REQUIRE_EBPF"
            ));
        }
        println!(
            "cargo:warning=bpf-linker not found: building without eBPF programs \
             (run `cargo xtask setup` for the full agent)"
        );
        fs::write(out_dir.join(OBJECT_NAME), []).context("writing empty eBPF object")?;
        return Ok(());
    }

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} package not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} manifest has no parent directory"))?
        .as_str();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
