//! The Debian package on this machine (issue 17 acceptance; root, a throw-away CI machine).
//!
//! `cargo xtask test` builds two packages from one release build — the crate's version and a
//! later one whose conffile default changed — and runs this test with `WATCHDOG_DEB_V1` and
//! `WATCHDOG_DEB_V2` naming them. Without them (the plain integration-test run) it is skipped.
//!
//! Install with `dpkg -i`, `systemd-analyze verify` the installed unit, run the installed binary
//! (`--version`, `scan --datastore none` against a lab node), edit the config and put files in
//! the state directory as the agent would (alert spool, repair state), reinstall the same version
//! (`dpkg -i` and `apt-get install --reinstall`), upgrade (`--force-confold`, as unattended
//! upgrades do), then purge and check that nothing is left. A Drop guard purges on failure too.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use watchdog_lab::{Lab, LabSpec};

const PKG: &str = "dataplane-watchdog";
const BIN: &str = "/usr/bin/dataplane-watchdog";
const UNIT: &str = "/lib/systemd/system/dataplane-watchdog.service";
const CONFIG: &str = "/etc/dataplane-watchdog/config.toml";
const STATE: &str = "/var/lib/dataplane-watchdog";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/dataplane-watchdog.service";

fn output(cmd: &mut Command) -> Output {
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, panics with its output unless it succeeds; returns stdout.
fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dpkg(args: &[&str], deb: Option<&Path>) -> String {
    let mut cmd = Command::new("dpkg");
    cmd.args(args);
    if let Some(deb) = deb {
        cmd.arg(deb);
    }
    ok(&mut cmd)
}

/// The installed version, None when the package is not (fully) installed.
fn installed() -> Option<String> {
    let out = output(Command::new("dpkg-query").args([
        "-W",
        "-f",
        "${db:Status-Abbrev}|${Version}",
        PKG,
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('|')?;
    (status.trim() == "ii").then(|| version.to_string())
}

/// Installed, half-installed or only its conffiles left (`rc`): anything but purged.
fn known_to_dpkg() -> bool {
    let out = output(Command::new("dpkg-query").args(["-W", "-f", "${db:Status-Abbrev}", PKG]));
    let status = String::from_utf8_lossy(&out.stdout);
    !(status.trim().is_empty() || status.starts_with("un") || status.starts_with("pn"))
}

fn deb_version(deb: &Path) -> String {
    ok(Command::new("dpkg-deb")
        .arg("--field")
        .arg(deb)
        .arg("Version"))
    .trim()
    .to_string()
}

fn exists(path: &str) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Purges the package however the test ends, and never leaves the service running.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if systemd_running() {
            let _ = Command::new("systemctl")
                .args(["stop", "dataplane-watchdog.service"])
                .status();
        }
        if known_to_dpkg() {
            let _ = Command::new("dpkg")
                .args(["--purge", PKG])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
    }
}

/// What the agent keeps in its StateDirectory: the alert spool and repair state.
fn write_state() -> Vec<(PathBuf, String)> {
    let files = [
        (
            Path::new(STATE).join("alerts/0000000001.json"),
            r#"{"finding":"gateway-wrong-vtep","peer":"k8s03"}"#.to_string(),
        ),
        (
            Path::new(STATE).join("repair/ledger.json"),
            r#"{"contested":[]}"#.to_string(),
        ),
    ];
    fs::create_dir_all(STATE).unwrap();
    fs::set_permissions(STATE, fs::Permissions::from_mode(0o700)).unwrap();
    for (path, text) in &files {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    files.to_vec()
}

fn assert_state_kept(files: &[(PathBuf, String)], after: &str) {
    for (path, text) in files {
        let now = fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{} lost after {after}: {e}", path.display()));
        assert_eq!(&now, text, "{} changed after {after}", path.display());
    }
}

fn scan(netns: &Path, after: &str) {
    let out = output(
        Command::new(BIN)
            .args(["scan", "--datastore", "none", "--config", CONFIG, "--netns"])
            .arg(netns),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{BIN} scan --datastore none on a healthy lab node ({after}):\nstdout: {stdout}\nstderr: {stderr}"
    );
}

#[test]
fn the_package_installs_upgrades_keeps_config_and_state_and_purges_clean() {
    let (Some(v1), Some(v2)) = (
        std::env::var_os("WATCHDOG_DEB_V1").map(PathBuf::from),
        std::env::var_os("WATCHDOG_DEB_V2").map(PathBuf::from),
    ) else {
        eprintln!("skipped: WATCHDOG_DEB_V1/WATCHDOG_DEB_V2 not set (cargo xtask test sets them)");
        return;
    };
    assert!(
        installed().is_none(),
        "{PKG} is already installed here: this test installs and purges it, refusing"
    );
    let sbin_watchdog = exists("/usr/sbin/watchdog");
    let (v1_version, v2_version) = (deb_version(&v1), deb_version(&v2));
    let _purge = Purge;

    // First install: files where README says, enabled but not started.
    dpkg(&["-i"], Some(&v1));
    assert_eq!(installed().as_deref(), Some(v1_version.as_str()));
    let mode = fs::metadata(BIN).unwrap().permissions().mode();
    assert_eq!(mode & 0o755, 0o755, "{BIN} mode {mode:o}");
    assert!(
        !exists("/usr/bin/watchdog"),
        "the package must not install a `watchdog` command"
    );
    assert_eq!(exists("/usr/sbin/watchdog"), sbin_watchdog);
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f", "${Conffiles}", PKG]));
    assert!(conffiles.contains(CONFIG), "conffiles: {conffiles}");
    assert!(
        fs::read_link(WANTS).is_ok(),
        "{WANTS}: the service is enabled on first install"
    );
    if systemd_running() {
        let active = output(Command::new("systemctl").args(["is-active", PKG]));
        assert_ne!(
            String::from_utf8_lossy(&active.stdout).trim(),
            "active",
            "first install must not start the service"
        );
    } else {
        eprintln!("systemd is not running here: only the enable symlink is checked");
    }
    for doc in [
        "README.md",
        "rbac.yaml",
        "examples/netns.conf",
        "copyright",
        "changelog.Debian.gz",
    ] {
        let path = format!("/usr/share/doc/{PKG}/{doc}");
        assert!(exists(&path), "{path} missing");
    }

    // The installed unit verifies (the binary it names exists now).
    let verify = output(Command::new("systemd-analyze").args(["verify", UNIT]));
    let findings = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && findings.trim().is_empty(),
        "systemd-analyze verify {UNIT}: {findings}"
    );
    let unit = fs::read_to_string(UNIT).unwrap();
    assert!(unit.contains(&format!("ExecStart={BIN} run")), "{unit}");

    let version = ok(Command::new(BIN).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("dataplane-watchdog {}", env!("CARGO_PKG_VERSION"))
    );
    let lab = Lab::build(LabSpec::calico(2)).expect("building the lab");
    let netns = lab.netns_path("node1");
    scan(&netns, "first install");

    // The operator's edit and the agent's state.
    let edited = fs::read_to_string(CONFIG)
        .unwrap()
        .replace("mode = \"alert\"", "mode = \"observe\"")
        + "\n# edited by the operator\n";
    assert!(edited.contains("mode = \"observe\""));
    fs::write(CONFIG, &edited).unwrap();
    let state = write_state();

    // Reinstall the same version, both ways.
    dpkg(&["-i"], Some(&v1));
    assert_eq!(
        fs::read_to_string(CONFIG).unwrap(),
        edited,
        "dpkg -i same version"
    );
    assert_state_kept(&state, "dpkg -i of the same version");
    ok(Command::new("apt-get")
        .args([
            "install",
            "--reinstall",
            "-y",
            "-q",
            "-o",
            "Dpkg::Options::=--force-confold",
        ])
        .arg(&v1));
    assert_eq!(
        fs::read_to_string(CONFIG).unwrap(),
        edited,
        "apt-get --reinstall"
    );
    assert_state_kept(&state, "apt-get install --reinstall");

    // Upgrade to the version with a changed default: the operator's file stays, the new
    // default is put beside it.
    dpkg(&["--force-confold", "-i"], Some(&v2));
    assert_eq!(installed().as_deref(), Some(v2_version.as_str()));
    assert_eq!(fs::read_to_string(CONFIG).unwrap(), edited, "upgrade");
    let dist = fs::read_to_string(format!("{CONFIG}.dpkg-dist"))
        .expect("the new default beside the kept config");
    assert!(dist.contains("resync_interval = \"30s\""), "{dist}");
    assert_state_kept(&state, "the upgrade");
    assert!(
        fs::read_link(WANTS).is_ok(),
        "still enabled after the upgrade"
    );
    scan(&netns, "upgrade, operator's config");
    drop(lab);

    // Purge: nothing of the package's is left, not even the operator-edited conffile.
    dpkg(&["--purge", PKG], None);
    assert!(installed().is_none());
    assert!(!known_to_dpkg(), "dpkg still knows the package after purge");
    for path in [
        BIN,
        UNIT,
        WANTS,
        "/etc/dataplane-watchdog",
        STATE,
        "/run/dataplane-watchdog",
        "/usr/share/doc/dataplane-watchdog",
        "/usr/share/lintian/overrides/dataplane-watchdog",
        "/var/lib/systemd/deb-systemd-helper-enabled/dataplane-watchdog.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/dataplane-watchdog.service",
        "/var/lib/systemd/deb-systemd-helper-masked/dataplane-watchdog.service",
    ] {
        assert!(!exists(path), "{path} left after purge");
    }
    assert_eq!(exists("/usr/sbin/watchdog"), sbin_watchdog);
}
