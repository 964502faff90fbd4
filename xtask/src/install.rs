//! `cargo xtask install`: binary, systemd unit, example config (never over an existing one),
//! README; then `systemd-analyze verify` on the installed unit when systemd-analyze exists.
//!
//! The layout is the .deb's (`cargo xtask package`) moved to /usr/local, as a from-source
//! install should be: `/usr/local/bin/dataplane-watchdog` (never `watchdog`: Debian's
//! `watchdog` package owns `/usr/sbin/watchdog`), the unit in /etc/systemd/system with its
//! `/usr/bin/dataplane-watchdog` rewritten to that path, docs in /usr/local/share/doc.
//!
//! Files are written to a temporary name and renamed into place, so replacing the binary of a
//! running agent neither fails (ETXTBSY) nor leaves a half-written file.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, is_root, run as run_step, setup, workspace_root};

/// One file to install.
struct Item {
    src: PathBuf,
    /// Absolute path on the target system (joined to `--root`).
    dst: &'static str,
    mode: u32,
    /// Replace an existing file (false: the admin's copy wins).
    replace: bool,
    /// Rewrite the package's /usr paths to /usr/local (unit and drop-in).
    relocate: bool,
}

const UNIT: &str = "/etc/systemd/system/dataplane-watchdog.service";
const BIN: &str = "/usr/local/bin/dataplane-watchdog";
/// Where the .deb puts the binary; the unit in the repository names this path.
const PACKAGE_BIN: &str = "/usr/bin/dataplane-watchdog";
/// What earlier versions of this task installed.
const OLD_BIN: &str = "/usr/local/bin/watchdog";

fn items(ws: &Path) -> Vec<Item> {
    let mut items = vec![
        Item {
            src: ws.join("target/release/watchdog"),
            dst: BIN,
            mode: 0o755,
            replace: true,
            relocate: false,
        },
        Item {
            src: ws.join("systemd/dataplane-watchdog.service"),
            dst: UNIT,
            mode: 0o644,
            replace: true,
            relocate: true,
        },
        Item {
            src: ws.join("systemd/config.example.toml"),
            dst: "/etc/dataplane-watchdog/config.toml",
            mode: 0o644,
            replace: false,
            relocate: false,
        },
    ];
    items.push(Item {
        src: ws.join("systemd/netns.conf"),
        dst: "/usr/local/share/doc/dataplane-watchdog/netns.conf",
        mode: 0o644,
        replace: true,
        relocate: true,
    });
    let readme = ws.join("README.md");
    if readme.exists() {
        items.push(Item {
            src: readme,
            dst: "/usr/local/share/doc/dataplane-watchdog/README.md",
            mode: 0o644,
            replace: true,
            relocate: false,
        });
    }
    items
}

/// `dst` under `root`.
fn target(root: &Path, dst: &str) -> PathBuf {
    root.join(dst.trim_start_matches('/'))
}

pub fn run(root: &Path, dry_run: bool) -> Result<()> {
    let ws = workspace_root();
    let items = items(&ws);
    if dry_run {
        println!("cargo xtask install --dry-run: nothing is written");
        println!(
            "would build: cargo build --release -p dataplane-watchdog (→ {})",
            items[0].src.display()
        );
        for item in &items {
            let dst = target(root, item.dst);
            if dst.exists() && !item.replace {
                println!("would keep    {} (exists)", dst.display());
            } else {
                let verb = if dst.exists() { "replace" } else { "install" };
                println!(
                    "would {verb:<7} {} (mode {:o}) from {}",
                    dst.display(),
                    item.mode,
                    item.src.display()
                );
            }
        }
        if which("systemd-analyze").is_some() {
            println!(
                "would verify  systemd-analyze verify {}",
                target(root, UNIT).display()
            );
        }
        return Ok(());
    }
    if !is_root() && root == Path::new("/") {
        bail!("installing into / needs root (sudo -E cargo xtask install), or pass --root DIR");
    }
    let env = setup::run()?;
    run_step(
        "build watchdog (release)",
        &mut cargo(
            &env,
            &["build", "--release", "--quiet", "-p", "dataplane-watchdog"],
        ),
    )?;
    for item in &items {
        let dst = target(root, item.dst);
        if dst.exists() && !item.replace {
            println!(
                "kept      {} (exists; the example is not installed over it)",
                dst.display()
            );
            continue;
        }
        if item.relocate {
            let text = fs::read_to_string(&item.src)
                .with_context(|| format!("reading {}", item.src.display()))?;
            install_bytes(relocate(&text).as_bytes(), &dst, item.mode)?;
        } else {
            install_file(&item.src, &dst, item.mode)?;
        }
        println!("installed {}", dst.display());
    }
    if target(root, OLD_BIN).exists() {
        println!(
            "note      {} is left from an earlier install (the command is now {BIN}): remove it",
            target(root, OLD_BIN).display()
        );
    }
    verify_unit(root)?;
    if root == Path::new("/") {
        println!(
            "next: edit /etc/dataplane-watchdog/config.toml, then\n  systemctl daemon-reload && systemctl enable --now dataplane-watchdog"
        );
    }
    Ok(())
}

/// The package's paths (`/usr/bin/dataplane-watchdog`, `/usr/share/doc/…`) as a from-source
/// install has them, under /usr/local.
fn relocate(text: &str) -> String {
    text.replace(PACKAGE_BIN, BIN)
        .replace("file:///usr/share/doc/", "file:///usr/local/share/doc/")
}

fn install_bytes(bytes: &[u8], dst: &Path, mode: u32) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("xtask-install-{}", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let result = install_file(&tmp, dst, mode);
    let _ = fs::remove_file(&tmp);
    result
}

fn install_file(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    let dir = dst
        .parent()
        .with_context(|| format!("{} has no parent directory", dst.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.xtask-{}",
        dst.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    fs::copy(src, &tmp)
        .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, dst).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("renaming {} to {}", tmp.display(), dst.display())
    })?;
    Ok(())
}

/// `systemd-analyze verify` on the installed unit; a finding fails the install.
fn verify_unit(root: &Path) -> Result<()> {
    let Some(analyze) = which("systemd-analyze") else {
        println!("skipped   systemd-analyze verify (systemd-analyze not installed)");
        return Ok(());
    };
    let unit = target(root, UNIT);
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .context("running systemd-analyze verify")?;
    // Under --root the binary is not at its final path yet: that one message is expected
    // (the file was installed under the root just above).
    let bin_missing = format!("Command {BIN} is not executable");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let messages: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| root == Path::new("/") || !l.contains(&bin_missing))
        .collect();
    if !messages.is_empty() {
        bail!(
            "systemd-analyze verify {} failed ({}):\n{}",
            unit.display(),
            out.status,
            messages.join("\n")
        );
    }
    println!(
        "verified  {} (systemd-analyze verify: no findings)",
        unit.display()
    );
    // The exposure score, for the record (`--offline` needs systemd 250+).
    if let Ok(out) = Command::new(&analyze)
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| l.contains("Overall exposure level")) {
            println!("security  {}", line.trim_start_matches(['→', ' ']).trim());
        }
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `systemd-analyze security --offline` of the unit in `dir` (drop-ins included): the
    /// lines for the settings `--netns` depends on.
    fn exposure(dir: &Path) -> Option<String> {
        let analyze = which("systemd-analyze")?;
        let out = Command::new(analyze)
            .args(["security", "--offline=yes"])
            .arg(dir.join("dataplane-watchdog.service"))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Some(
            text.lines()
                .filter(|l| l.contains("RestrictNamespaces=~net") || l.contains("=~CAP_SYS_ADMIN"))
                .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }

    fn verify(dir: &Path) -> Vec<String> {
        let Some(analyze) = which("systemd-analyze") else {
            return Vec::new();
        };
        let out = Command::new(analyze)
            .arg("verify")
            .arg(dir.join("dataplane-watchdog.service"))
            .output()
            .expect("systemd-analyze runs");
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty()
                    && !l.contains(&format!("Command {BIN} is not executable"))
                    && !l.contains(&format!("Command {PACKAGE_BIN} is not executable"))
            })
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_unit_forbids_setns_and_the_netns_drop_in_allows_exactly_it() {
        let ws = workspace_root();
        let dir = std::env::temp_dir().join(format!("watchdog-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(
            ws.join("systemd/dataplane-watchdog.service"),
            dir.join("dataplane-watchdog.service"),
        )
        .unwrap();
        let Some(base) = exposure(&dir) else {
            eprintln!("systemd-analyze not installed: skipped");
            return;
        };
        assert_eq!(verify(&dir), Vec::<String>::new());
        assert!(base.contains("✓ RestrictNamespaces=~net"), "{base}");
        assert!(
            base.contains("✓ CapabilityBoundingSet=~CAP_SYS_ADMIN"),
            "{base}"
        );

        let d = dir.join("dataplane-watchdog.service.d");
        fs::create_dir(&d).unwrap();
        fs::copy(ws.join("systemd/netns.conf"), d.join("netns.conf")).unwrap();
        assert_eq!(verify(&dir), Vec::<String>::new());
        let with = exposure(&dir).unwrap();
        assert!(with.contains("✗ RestrictNamespaces=~net"), "{with}");
        assert!(
            with.contains("✗ CapabilityBoundingSet=~CAP_SYS_ADMIN"),
            "{with}"
        );
        let text = fs::read_to_string(ws.join("systemd/netns.conf")).unwrap();
        assert!(text.contains("--netns ${WATCHDOG_NETNS}"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_from_source_install_names_the_usr_local_binary_never_watchdog() {
        let ws = workspace_root();
        for file in ["systemd/dataplane-watchdog.service", "systemd/netns.conf"] {
            let text = fs::read_to_string(ws.join(file)).unwrap();
            assert!(
                text.contains(&format!("ExecStart={PACKAGE_BIN} run")),
                "{file}"
            );
            let moved = relocate(&text);
            assert!(moved.contains(&format!("ExecStart={BIN} run")), "{file}");
            assert!(!moved.contains(PACKAGE_BIN), "{file}");
            assert!(!moved.contains("bin/watchdog "), "{file}");
        }
        let unit =
            relocate(&fs::read_to_string(ws.join("systemd/dataplane-watchdog.service")).unwrap());
        assert!(
            unit.contains("Documentation=file:///usr/local/share/doc/dataplane-watchdog/README.md")
        );
        assert!(items(&ws).iter().all(|i| !i.dst.ends_with("/watchdog")));
    }
}
