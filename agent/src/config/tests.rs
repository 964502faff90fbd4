use super::*;

const P: &str = "/x/config.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new(P))
}

fn err(text: &str) -> String {
    parse(text).expect_err("accepted bad config").to_string()
}

#[test]
fn empty_file_is_all_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.node_name, hostname());
    assert_eq!(c.devices, ["vxlan.calico"]);
    assert_eq!(c.mode, Mode::Alert);
    assert_eq!(c.resync_interval, Duration::from_secs(60));
    assert_eq!(c.datastore.source, DatastoreSource::File);
    assert_eq!(
        c.datastore.path,
        Path::new("/etc/dataplane-watchdog/nodes.yaml")
    );
    assert_eq!(c.datastore.relist_interval, Duration::from_secs(300));
    assert_eq!(c.datastore.stale_after, Duration::from_secs(600));
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert!(c.ebpf.enabled);
    assert!(!c.repair_enabled());
}

#[test]
fn full_example_parses() {
    let c = parse(
        r#"
node_name = "k8s01"
profile = "flannel"
devices = ["flannel.1", "flannel.2"]
mode = "repair"
resync_interval = "30s"
log_level = "debug,dataplane_watchdog=trace"
[datastore]
source = "kubernetes"
path = "nodes.toml"
kubeconfig = "/var/snap/microk8s/current/credentials/client.config"
relist_interval = "2m"
stale_after = "4m 30s"
publish_node_condition = true
publish_events = true
[status]
socket = "/run/wd.sock"
group = "adm"
[metrics]
listen = "[::1]:9000"
[ebpf]
enabled = false
[repair]
actions = ["route", "fdb"]
delete_stale_routes = true
max_repairs_per_minute = 3
min_finding_age = "5s"
contested_after = 4
contested_window = "2m"
contested_backoff = "1h"
"#,
    )
    .unwrap();
    assert_eq!(c.node_name, "k8s01");
    assert_eq!(c.profile, Profile::Flannel);
    assert_eq!(c.devices, ["flannel.1", "flannel.2"]);
    assert!(c.repair_enabled());
    assert_eq!(c.resync_interval, Duration::from_secs(30));
    assert_eq!(c.log_level, "debug,dataplane_watchdog=trace");
    assert_eq!(c.datastore.source, DatastoreSource::Kubernetes);
    // Relative datastore path resolves next to the config file.
    assert_eq!(c.datastore.path, Path::new("/x/nodes.toml"));
    assert_eq!(
        c.datastore.kubeconfig.as_deref(),
        Some(Path::new(
            "/var/snap/microk8s/current/credentials/client.config"
        ))
    );
    assert_eq!(c.datastore.relist_interval, Duration::from_secs(120));
    assert_eq!(c.datastore.stale_after, Duration::from_secs(270));
    assert!(c.datastore.publish_node_condition && c.datastore.publish_events);
    assert_eq!(c.status.socket, Path::new("/run/wd.sock"));
    assert_eq!(c.status.group.as_deref(), Some("adm"));
    assert_eq!(c.metrics.listen, Some("[::1]:9000".parse().unwrap()));
    assert!(!c.ebpf.enabled);
    assert_eq!(
        c.repair,
        RepairConfig {
            actions: vec![RepairKind::Route, RepairKind::Fdb],
            delete_stale_routes: true,
            max_repairs_per_minute: 3,
            min_finding_age: Duration::from_secs(5),
            contested_after: 4,
            contested_window: Duration::from_secs(120),
            contested_backoff: Duration::from_secs(3600),
            escalate: Escalate::None,
        }
    );
}

#[test]
fn flannel_profile_defaults_its_device() {
    let c = parse("profile = \"flannel\"").unwrap();
    assert_eq!(c.devices, ["flannel.1"]);
}

#[test]
fn metrics_can_be_disabled() {
    for v in ["\"\"", "\"off\"", "\"OFF\""] {
        let c = parse(&format!("[metrics]\nlisten = {v}")).unwrap();
        assert_eq!(c.metrics.listen, None, "{v}");
    }
}

#[test]
fn bad_configs_name_file_and_key() {
    let cases: &[(&str, &str)] = &[
            (
                "resync_interval = \"fast\"",
                "config /x/config.toml: resync_interval: invalid duration \"fast\"",
            ),
            ("resync_interval = \"500ms\"", "config /x/config.toml: resync_interval: 500ms is too short"),
            ("resync_interval = 60", "config /x/config.toml: resync_interval: invalid type"),
            ("colour = \"blue\"", "config /x/config.toml: colour: unknown field `colour`"),
            ("[datastore]\nsorce = \"file\"", "config /x/config.toml: datastore.sorce: unknown field `sorce`"),
            ("[nope]\n", "config /x/config.toml: nope: unknown field `nope`"),
            ("mode = \"fix\"", "config /x/config.toml: mode: unknown variant `fix`"),
            ("profile = \"cilium\"", "config /x/config.toml: profile: unknown variant `cilium`"),
            ("devices = []", "config /x/config.toml: devices: must name at least one device"),
            ("devices = [\"a/b\"]", "config /x/config.toml: devices[0]: \"a/b\" is not a valid interface name"),
            ("devices = [\"averyveryverylongname\"]", "config /x/config.toml: devices[0]:"),
            ("node_name = \"\"", "config /x/config.toml: node_name: must not be empty"),
            ("log_level = \"info,[\"", "config /x/config.toml: log_level: invalid filter"),
            ("[datastore]\nsource = \"etcd\"", "config /x/config.toml: datastore.source: unknown variant `etcd`"),
            ("[datastore]\nrelist_interval = \"1h\"", "config /x/config.toml: datastore.stale_after: 10m is shorter than datastore.relist_interval (1h)"),
            ("[datastore]\nstale_after = \"soon\"", "config /x/config.toml: datastore.stale_after: invalid duration \"soon\""),
            ("[datastore]\npath = \"\"", "config /x/config.toml: datastore.path: must be set"),
            ("[status]\nsocket = \"run/x.sock\"", "config /x/config.toml: status.socket: \"run/x.sock\" must be an absolute path"),
            ("[status]\ngroup = \"\"", "config /x/config.toml: status.group: must not be empty"),
            ("[metrics]\nlisten = \"localhost\"", "config /x/config.toml: metrics.listen: invalid listen address \"localhost\""),
            ("[metrics]\nlisten = \"1.2.3.4:99999\"", "config /x/config.toml: metrics.listen: invalid listen address"),
            ("[ebpf]\nenabled = \"yes\"", "config /x/config.toml: ebpf.enabled: invalid type"),
            ("[repair]\nmax_repairs_per_minute = 0", "config /x/config.toml: repair.max_repairs_per_minute: must be at least 1"),
            ("[repair]\nmax_repairs_per_minute = -1", "config /x/config.toml: repair.max_repairs_per_minute:"),
            ("[repair]\ncontested_after = 0", "config /x/config.toml: repair.contested_after: must be at least 1"),
            ("[repair]\ncontested_window = \"0s\"", "config /x/config.toml: repair.contested_window: must be longer than 0s"),
            ("[repair]\nactions = [\"routes\"]", "config /x/config.toml: repair.actions[0]: unknown variant `routes`"),
            ("[repair]\nescalate = \"reboot\"", "config /x/config.toml: repair.escalate: unknown variant `reboot`"),
            ("[repair]\nescalate = \"restart-calico-node\"", "config /x/config.toml: repair.escalate: \"restart-calico-node\" needs datastore.source = \"kubernetes\""),
            ("profile = \"flannel\"\n[datastore]\nsource = \"kubernetes\"\n[repair]\nescalate = \"restart-calico-node\"", "config /x/config.toml: repair.escalate: \"restart-calico-node\" needs profile = \"calico\""),
            ("[repair]\nenabled = true", "config /x/config.toml: repair.enabled: unknown field `enabled`"),
            ("mode = ", "config /x/config.toml: line 1: invalid TOML (a value is missing"),
            ("\n\n[status\n", "config /x/config.toml: line 3: invalid table header; expected"),
            ("mode = \"alert\"\nmode = \"repair\"", "config /x/config.toml: line 2: duplicate key `mode`"),
        ];
    for (text, want) in cases {
        let got = err(text);
        assert!(
            got.starts_with(want),
            "config {text:?}\n  got:  {got}\n  want: {want}…"
        );
        assert!(!got.contains('\n'), "multi-line error for {text:?}: {got}");
    }
}

#[test]
fn missing_file_defaults_only_when_implicit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("config.toml");
    assert_eq!(Config::load(&missing, false).unwrap(), Config::default());
    let e = Config::load(&missing, true).unwrap_err();
    assert!(matches!(e, ConfigError::NotFound { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("config {}: file not found", missing.display())
    );
}

#[test]
fn load_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "node_name = \"n1\"\nmode = \"observe\"\n").unwrap();
    let c = Config::load(&path, true).unwrap();
    assert_eq!(c.node_name, "n1");
    assert_eq!(c.mode, Mode::Observe);
    // A directory is not a config file: an I/O error that still names the path.
    let e = Config::load(dir.path(), true).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    assert!(e.to_string().contains(&dir.path().display().to_string()));
}

#[test]
fn example_config_is_the_defaults() {
    let text = include_str!("../../../systemd/config.example.toml");
    let c = Config::from_toml(text, Path::new("/etc/dataplane-watchdog/config.toml"))
        .expect("systemd/config.example.toml must parse");
    // The example leaves node_name commented out: it is the host name here.
    assert_eq!(c, Config::default());
    // Every key in the example exists: uncommenting each commented `key = value` line
    // must still parse (a typo in the example would be an unknown key).
    let uncommented: String = text
        .lines()
        .map(
            |l| match l.strip_prefix("# ").and_then(|r| r.split_once(" = ")) {
                Some((key, value))
                    if !key.is_empty()
                        && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        && toml::from_str::<toml::Value>(&format!("v = {value}")).is_ok() =>
                {
                    &l[2..]
                }
                _ => l,
            },
        )
        .collect::<Vec<_>>()
        .join("\n");
    let all = Config::from_toml(
        &uncommented,
        Path::new("/etc/dataplane-watchdog/config.toml"),
    )
    .unwrap_or_else(|e| panic!("uncommented example: {e}"));
    // The optional keys shown commented out really were uncommented and read.
    assert_eq!(all.node_name, "k8s01");
    assert_eq!(all.status.group.as_deref(), Some("adm"));
    assert!(all.datastore.kubeconfig.is_some());
}

#[test]
fn hostname_is_readable() {
    assert!(!hostname().is_empty());
}

#[test]
fn vxlan_overrides_reach_the_device_specs_and_bad_ones_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "node_name = \"k8s01\"\nvxlan_vni = 1\nvxlan_port = 8472\nvxlan_mtu = 1400\n",
    )
    .unwrap();
    let c = Config::load(&path, true).unwrap();
    let spec = &c.device_specs()[0];
    assert_eq!(
        (spec.vni, spec.port, spec.mtu),
        (Some(1), Some(8472), Some(1400))
    );
    // Unset: the profile's conventions, MTU unchecked.
    let d = Config::with_node_name("k8s01").device_specs();
    assert_eq!(
        (d[0].vni, d[0].port, d[0].mtu),
        (Some(4096), Some(4789), None)
    );
    for (text, key) in [
        ("vxlan_vni = 16777216", "vxlan_vni"),
        ("vxlan_port = 0", "vxlan_port"),
        ("vxlan_mtu = 20", "vxlan_mtu"),
    ] {
        std::fs::write(&path, format!("node_name = \"k8s01\"\n{text}\n")).unwrap();
        let e = Config::load(&path, true).unwrap_err().to_string();
        assert!(e.contains(key), "{text}: {e}");
    }
}

#[test]
fn an_unset_node_name_is_derived_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "profile = \"flannel\"\n").unwrap();
    let c = Config::load(&path, true).unwrap();
    assert!(!c.node_name_configured);
    assert_eq!(c.node_name, hostname());
    std::fs::write(&path, "node_name = \"k8s01\"\n").unwrap();
    assert!(Config::load(&path, true).unwrap().node_name_configured);
    // Calico's own record of the node's name, trimmed; empty means none.
    let file = dir.path().join("nodename");
    std::fs::write(&file, "ip-10-0-1-5.ec2.internal\n").unwrap();
    assert_eq!(
        calico_nodename(&file).as_deref(),
        Some("ip-10-0-1-5.ec2.internal")
    );
    std::fs::write(&file, "  \n").unwrap();
    assert_eq!(calico_nodename(&file), None);
}

#[test]
fn the_kubelet_check_needs_the_kubernetes_datastore() {
    let path = Path::new("/etc/dataplane-watchdog/config.toml");
    let c = Config::from_toml(
        "[datastore]\nsource = \"kubernetes\"\n[kubelet]\nenabled = true\nthreshold = \"5m\"\n",
        path,
    )
    .unwrap();
    assert!(c.kubelet.enabled);
    assert_eq!(c.kubelet.threshold, Duration::from_secs(300));
    assert_eq!(c.kubelet.interval, Duration::from_secs(30));
    let e = Config::from_toml("[kubelet]\nenabled = true\n", path).unwrap_err();
    assert!(e.to_string().contains("kubelet.enabled"), "{e}");
    assert!(e.to_string().contains("kubernetes"), "{e}");
}
