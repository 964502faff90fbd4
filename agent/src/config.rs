//! Configuration file: serde structs with defaults, validation errors that name the key.
//!
//! Every key has a default (DESIGN.md §3), so a missing file at the default path means
//! "all defaults". Anything wrong is reported as one line naming the file and the key, e.g.
//! `config /x/config.toml: resync_interval: invalid duration "fast"`, so `main` can print it
//! and exit 2.

use std::{
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

mod alerts;
mod error;
pub use alerts::{AlertsConfig, SinkConfig, SinkKind, PAGERDUTY_EVENTS_URL};
use error::parse_error;
pub(crate) use error::toml_message;
pub use error::ConfigError;
mod renamed;
pub use renamed::{Deprecation, RenamedKey, RENAMED_KEYS};

/// Where `watchdog run` looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dataplane-watchdog/config.toml";

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// The whole agent configuration, fully resolved (defaults applied, validated).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Name of the local node in the datastore. Default: Calico's own record of it
    /// (`/var/lib/calico/nodename`), else the host name; and when that is not in the
    /// datastore, the node with this host's address.
    pub node_name: String,
    /// `node_name` was given (config or `--node`), not derived: then it is never replaced.
    pub node_name_configured: bool,
    /// Which overlay the node runs. Default: calico.
    pub profile: Profile,
    /// Overlay devices to watch. Default: from the profile (`vxlan.calico` / `flannel.1`).
    pub devices: Vec<String>,
    /// What to do about findings. Default: alert.
    pub mode: Mode,
    /// Full netlink dump + datastore reload even without events. Default: 60s.
    pub resync_interval: Duration,
    /// The VXLAN VNI the overlay uses. Default: the profile's (Calico 4096, flannel from the
    /// device name); a cluster migrated from flannel to Calico keeps 1.
    pub vxlan_vni: Option<u32>,
    /// The VXLAN UDP port. Default: the profile's (Calico 4789, flannel 8472).
    pub vxlan_port: Option<u16>,
    /// The overlay devices' MTU. Default: not checked (both CNIs derive it from the underlay).
    pub vxlan_mtu: Option<u32>,
    /// tracing `EnvFilter` directive. Default: "info".
    pub log_level: String,
    pub datastore: DatastoreConfig,
    pub status: StatusConfig,
    pub metrics: MetricsConfig,
    pub ebpf: EbpfConfig,
    pub repair: RepairConfig,
    pub netlink: NetlinkConfig,
    pub kubelet: KubeletConfig,
    pub alerts: AlertsConfig,
}

/// Overlay flavour; decides the default devices and how the datastore is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Calico,
    Flannel,
}

impl Profile {
    /// Devices this overlay creates (IPv4).
    pub fn default_devices(self) -> Vec<String> {
        match self {
            Profile::Calico => vec!["vxlan.calico".to_string()],
            Profile::Flannel => vec!["flannel.1".to_string()],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Calico => "calico",
            Profile::Flannel => "flannel",
        }
    }
}

/// How far the agent goes. Repair only ever happens in `repair`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Check and report (status, metrics) but send no alerts.
    Observe,
    /// Check, report and alert.
    #[default]
    Alert,
    /// Alert, and fix what the guard rails allow.
    Repair,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Observe => "observe",
            Mode::Alert => "alert",
            Mode::Repair => "repair",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where desired state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreSource {
    /// A YAML/TOML node list (DESIGN.md §6).
    #[default]
    File,
    /// Nodes + Calico IPAM objects from the API server.
    Kubernetes,
    /// No datastore: only checks that need none (device config, unresolved neighbours, drops).
    None,
}

impl DatastoreSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DatastoreSource::File => "file",
            DatastoreSource::Kubernetes => "kubernetes",
            DatastoreSource::None => "none",
        }
    }
}

/// `[datastore]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatastoreConfig {
    /// Default: file.
    pub source: DatastoreSource,
    /// Node list for `source = "file"`; a relative path is taken relative to the config
    /// file's directory. Default: /etc/dataplane-watchdog/nodes.yaml.
    pub path: PathBuf,
    /// kubeconfig for `source = "kubernetes"`. Default: none ($KUBECONFIG or ~/.kube/config,
    /// then in-cluster, then MicroK8s's client.config).
    pub kubeconfig: Option<PathBuf>,
    /// Full relist compared with the watch cache. Default: 5m.
    #[serde(deserialize_with = "de_duration")]
    pub relist_interval: Duration,
    /// No event/bookmark/relist success for this long → `datastore-stale`. Default: 10m.
    #[serde(deserialize_with = "de_duration")]
    pub stale_after: Duration,
    /// Set a `DataplaneHealthy`-style condition on our own Node object. Default: false.
    pub publish_node_condition: bool,
    /// Emit Kubernetes Events for findings. Default: false.
    pub publish_events: bool,
    /// Calico IPAM group/version to read (`crd.projectcalico.org/v1` or
    /// `projectcalico.org/v3`) instead of discovering it. Default: none (discover).
    pub ipam_api: Option<String>,
}

impl Default for DatastoreConfig {
    fn default() -> Self {
        DatastoreConfig {
            source: DatastoreSource::File,
            path: PathBuf::from("/etc/dataplane-watchdog/nodes.yaml"),
            kubeconfig: None,
            relist_interval: Duration::from_secs(5 * 60),
            stale_after: Duration::from_secs(10 * 60),
            publish_node_condition: false,
            publish_events: false,
            ipam_api: None,
        }
    }
}

/// `[status]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatusConfig {
    /// Unix socket of the status API. Default: /run/dataplane-watchdog/status.sock.
    pub socket: PathBuf,
    /// Group that may read the socket; when set the socket is mode 0660 with this group,
    /// otherwise 0600 (root only). Default: none.
    pub group: Option<String>,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            socket: PathBuf::from("/run/dataplane-watchdog/status.sock"),
            group: None,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus listener; `""` or `"off"` in the file disables it (→ `None`).
    /// Default: 127.0.0.1:9464.
    #[serde(deserialize_with = "de_listen")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

/// `[ebpf]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EbpfConfig {
    /// Attach the drop/neighbour tracepoints. Failure to attach is reported, never fatal.
    /// Default: true.
    pub enabled: bool,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        EbpfConfig { enabled: true }
    }
}

/// `[netlink]` — the kernel change subscription of `watchdog run`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetlinkConfig {
    /// Receive buffer of the multicast socket, in bytes (SO_RCVBUFFORCE). A burst of changes
    /// larger than this is lost (ENOBUFS) and repaired by an immediate full resync.
    /// Default: 4194304 (4 MiB, room for a Felix-sized burst of thousands of routes).
    pub receive_buffer: usize,
}

impl Default for NetlinkConfig {
    fn default() -> Self {
        NetlinkConfig {
            receive_buffer: 4 * 1024 * 1024,
        }
    }
}

/// `[repair]` — guard rails; repair itself is switched on only by `mode = "repair"` (DESIGN §8).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepairConfig {
    /// Which kinds of kernel object the agent may write. Default: all three.
    pub actions: Vec<RepairKind>,
    /// Allow `route-delete` of routes nothing in the datastore accounts for. Default: false.
    pub delete_stale_routes: bool,
    /// Node-wide budget of repairs (findings fixed, however many writes each takes); further
    /// ones in the same minute are refused. Default: 6.
    pub max_repairs_per_minute: u32,
    /// A finding must persist this long before it is repaired, so a transient state during
    /// Felix's own programming is left alone. Default: 1s.
    #[serde(deserialize_with = "de_duration")]
    pub min_finding_age: Duration,
    /// An object whose repair is undone this many times within `contested_window` (someone,
    /// usually a stale Felix, keeps putting the old state back) is `contested`. Default: 3.
    pub contested_after: u32,
    /// The window those reverts are counted in. Default: 10m.
    #[serde(deserialize_with = "de_duration")]
    pub contested_window: Duration,
    /// How long a contested object is left alone before it may be repaired again. Default: 10m.
    #[serde(deserialize_with = "de_duration")]
    pub contested_backoff: Duration,
    /// What to do about a contested repair besides reporting it. Default: none.
    pub escalate: Escalate,
}

/// The object kinds of `[repair] actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepairKind {
    /// `route-replace`, `route-add` (and `route-delete` with `delete_stale_routes`).
    Route,
    /// `neigh-replace`.
    Neighbour,
    /// `fdb-replace`.
    Fdb,
}

impl RepairKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairKind::Route => "route",
            RepairKind::Neighbour => "neighbour",
            RepairKind::Fdb => "fdb",
        }
    }
}

/// `[repair] escalate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Escalate {
    /// Report the contested repair (`repair-contested`), nothing more.
    #[default]
    None,
    /// Also delete this node's calico-node pod (its DaemonSet recreates it and Felix resyncs),
    /// at most once per `contested_backoff`.
    RestartCalicoNode,
}

/// `[kubelet]` — the watch-stall check (DESIGN §9): the pods the API server bound to this node
/// against the pods its kubelet knows. Needs the Kubernetes datastore.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeletConfig {
    /// Default: false (it needs `pods` list and the powerful `nodes/proxy` get).
    pub enabled: bool,
    /// How often both lists are read. Default: 30s.
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// A pod bound (or deleted) longer than this that the kubelet does not know (or still
    /// runs) is a finding. Default: 120s.
    #[serde(deserialize_with = "de_duration")]
    pub threshold: Duration,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        KubeletConfig {
            enabled: false,
            interval: Duration::from_secs(30),
            threshold: Duration::from_secs(120),
        }
    }
}

impl Default for RepairConfig {
    fn default() -> Self {
        RepairConfig {
            actions: vec![RepairKind::Route, RepairKind::Neighbour, RepairKind::Fdb],
            delete_stale_routes: false,
            max_repairs_per_minute: 6,
            min_finding_age: Duration::from_secs(1),
            contested_after: 3,
            contested_window: Duration::from_secs(10 * 60),
            contested_backoff: Duration::from_secs(10 * 60),
            escalate: Escalate::None,
        }
    }
}

impl Default for Config {
    /// What a missing config file means: every key at its default, the node name derived.
    fn default() -> Self {
        RawConfig::default().resolve()
    }
}

impl Config {
    /// All defaults for the given node name (tests and callers that know the name).
    pub fn with_node_name(node_name: impl Into<String>) -> Self {
        let profile = Profile::default();
        Config {
            node_name: node_name.into(),
            node_name_configured: true,
            profile,
            devices: profile.default_devices(),
            mode: Mode::default(),
            resync_interval: Duration::from_secs(60),
            vxlan_vni: None,
            vxlan_port: None,
            vxlan_mtu: None,
            log_level: "info".to_string(),
            datastore: DatastoreConfig::default(),
            status: StatusConfig::default(),
            metrics: MetricsConfig::default(),
            ebpf: EbpfConfig::default(),
            repair: RepairConfig::default(),
            netlink: NetlinkConfig::default(),
            kubelet: KubeletConfig::default(),
            alerts: AlertsConfig::default(),
        }
    }

    /// What each watched device should look like: the profile's conventions with the
    /// `vxlan_*` overrides.
    pub fn device_specs(&self) -> Vec<crate::checks::DeviceSpec> {
        self.devices
            .iter()
            .map(|d| {
                crate::checks::DeviceSpec::for_name(d).with_overrides(
                    self.vxlan_vni,
                    self.vxlan_port,
                    self.vxlan_mtu,
                )
            })
            .collect()
    }

    /// True only in `mode = "repair"`.
    pub fn repair_enabled(&self) -> bool {
        self.mode == Mode::Repair
    }

    /// Load and validate `path`. A missing file means defaults unless the path was given
    /// explicitly (`explicit = true`, i.e. `--config`), where it is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => {
                tracing::debug!(path = %path.display(), "no config file, using defaults");
                let config = Config::default();
                config.validate(path)?;
                return Ok(config);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ConfigError::NotFound {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Config::from_toml(&text, path)
    }

    /// Parse and validate TOML text; `path` is used for messages and to resolve a relative
    /// `datastore.path`.
    /// A key renamed in [`RENAMED_KEYS`] is accepted under its old name with a deprecation
    /// warning on stderr (the journal, under systemd).
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let (config, deprecations) = Config::from_toml_renamed(text, path, RENAMED_KEYS)?;
        for d in &deprecations {
            tracing::warn!(path = %path.display(), "{d}");
            eprintln!("watchdog: config {}: {d}", path.display());
        }
        Ok(config)
    }

    /// [`Config::from_toml`] with the given renames, returning the deprecations found.
    pub fn from_toml_renamed(
        text: &str,
        path: &Path,
        renames: &[RenamedKey],
    ) -> Result<(Config, Vec<Deprecation>), ConfigError> {
        let (rewritten, deprecations) = renamed::apply(text, path, renames)?;
        let text = rewritten.as_deref().unwrap_or(text);
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| parse_error(path, text, e))?;
        let mut config = raw.resolve();
        if config.datastore.path.is_relative() && !config.datastore.path.as_os_str().is_empty() {
            if let Some(dir) = path.parent() {
                config.datastore.path = dir.join(&config.datastore.path);
            }
        }
        config.validate(path)?;
        Ok((config, deprecations))
    }

    /// Checks that need more than one key or more than a type.
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: key.to_string(),
                message,
            })
        };
        if self.node_name.trim().is_empty() {
            return bad(
                "node_name",
                "must not be empty (and the host name could not be read)".into(),
            );
        }
        if self.devices.is_empty() {
            return bad("devices", "must name at least one device".into());
        }
        for (i, dev) in self.devices.iter().enumerate() {
            if dev.is_empty()
                || dev.len() > MAX_IFNAME
                || dev.contains(|c: char| c == '/' || c.is_whitespace())
            {
                return bad(
                    &format!("devices[{i}]"),
                    format!("{dev:?} is not a valid interface name (1-{MAX_IFNAME} bytes, no '/' or spaces)"),
                );
            }
        }
        if let Some(vni) = self.vxlan_vni.filter(|v| *v == 0 || *v > 0xff_ffff) {
            return bad("vxlan_vni", format!("{vni} is not a VNI (1-16777215)"));
        }
        if self.vxlan_port == Some(0) {
            return bad("vxlan_port", "0 is not a UDP port (1-65535)".into());
        }
        if let Some(mtu) = self.vxlan_mtu.filter(|m| !(68..=65535).contains(m)) {
            return bad("vxlan_mtu", format!("{mtu} is not an MTU (68-65535)"));
        }
        if self.resync_interval < Duration::from_secs(1) {
            return bad(
                "resync_interval",
                format!(
                    "{} is too short: at least 1s",
                    humantime::format_duration(self.resync_interval)
                ),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return bad(
                "log_level",
                format!("invalid filter {:?}: {e}", self.log_level),
            );
        }
        let ds = &self.datastore;
        if ds.relist_interval < Duration::from_secs(1) {
            return bad(
                "datastore.relist_interval",
                format!(
                    "{} is too short: at least 1s",
                    humantime::format_duration(ds.relist_interval)
                ),
            );
        }
        if ds.stale_after < ds.relist_interval {
            return bad(
                "datastore.stale_after",
                format!(
                    "{} is shorter than datastore.relist_interval ({}): the datastore would look stale between relists",
                    humantime::format_duration(ds.stale_after),
                    humantime::format_duration(ds.relist_interval)
                ),
            );
        }
        if ds.source == DatastoreSource::File && ds.path.as_os_str().is_empty() {
            return bad(
                "datastore.path",
                "must be set when datastore.source = \"file\"".into(),
            );
        }
        if !self.status.socket.is_absolute() {
            return bad(
                "status.socket",
                format!("{:?} must be an absolute path", self.status.socket),
            );
        }
        if let Some(group) = &self.status.group {
            if group.trim().is_empty() {
                return bad("status.group", "must not be empty when set".into());
            }
        }
        if self.repair.max_repairs_per_minute == 0 {
            return bad(
                "repair.max_repairs_per_minute",
                "must be at least 1 (use mode = \"alert\" to disable repair)".into(),
            );
        }
        if self.repair.contested_after == 0 {
            return bad("repair.contested_after", "must be at least 1".into());
        }
        if self.kubelet.enabled && self.datastore.source != DatastoreSource::Kubernetes {
            return bad(
                "kubelet.enabled",
                "needs [datastore] source = \"kubernetes\" (the pods come from the API server)"
                    .into(),
            );
        }
        if self.kubelet.enabled && self.kubelet.interval < Duration::from_secs(1) {
            return bad("kubelet.interval", "must be at least 1s".into());
        }
        for (key, d) in [
            ("repair.contested_window", self.repair.contested_window),
            ("repair.contested_backoff", self.repair.contested_backoff),
        ] {
            if d.is_zero() {
                return bad(key, "must be longer than 0s".into());
            }
        }
        if self.repair.escalate == Escalate::RestartCalicoNode {
            if self.profile != Profile::Calico {
                return bad(
                    "repair.escalate",
                    "\"restart-calico-node\" needs profile = \"calico\"".into(),
                );
            }
            if self.datastore.source != DatastoreSource::Kubernetes {
                return bad(
                    "repair.escalate",
                    "\"restart-calico-node\" needs datastore.source = \"kubernetes\" (it deletes the pod through the API)".into(),
                );
            }
        }
        if self.netlink.receive_buffer < 1024 {
            return bad(
                "netlink.receive_buffer",
                format!(
                    "{} bytes is too small: at least 1024",
                    self.netlink.receive_buffer
                ),
            );
        }
        if let Err((key, message)) = self.alerts.validate() {
            return bad(&key, message);
        }
        Ok(())
    }
}

/// The file's shape: keys whose default depends on other keys are optional here.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    node_name: Option<String>,
    profile: Profile,
    devices: Option<Vec<String>>,
    mode: Mode,
    #[serde(deserialize_with = "de_opt_duration")]
    resync_interval: Option<Duration>,
    vxlan_vni: Option<u32>,
    vxlan_port: Option<u16>,
    vxlan_mtu: Option<u32>,
    log_level: Option<String>,
    datastore: DatastoreConfig,
    status: StatusConfig,
    metrics: MetricsConfig,
    ebpf: EbpfConfig,
    repair: RepairConfig,
    netlink: NetlinkConfig,
    kubelet: KubeletConfig,
    alerts: AlertsConfig,
}

impl RawConfig {
    fn resolve(self) -> Config {
        let configured = self.node_name.is_some();
        let node_name = self
            .node_name
            .or_else(|| match self.profile {
                Profile::Calico => calico_nodename(Path::new(CALICO_NODENAME)),
                Profile::Flannel => None,
            })
            .unwrap_or_else(hostname);
        let defaults = Config::with_node_name(node_name);
        Config {
            devices: self
                .devices
                .unwrap_or_else(|| self.profile.default_devices()),
            profile: self.profile,
            mode: self.mode,
            resync_interval: self.resync_interval.unwrap_or(defaults.resync_interval),
            vxlan_vni: self.vxlan_vni,
            vxlan_port: self.vxlan_port,
            vxlan_mtu: self.vxlan_mtu,
            log_level: self.log_level.unwrap_or(defaults.log_level),
            datastore: self.datastore,
            status: self.status,
            metrics: self.metrics,
            ebpf: self.ebpf,
            repair: self.repair,
            netlink: self.netlink,
            kubelet: self.kubelet,
            alerts: self.alerts,
            node_name: defaults.node_name,
            node_name_configured: configured,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|_| {
        format!("invalid duration {s:?}: expected a number and a unit, like \"60s\" or \"5m\"")
    })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    let t = s.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid listen address {s:?}: expected ip:port like \"127.0.0.1:9464\", or \"off\""
        ))
    })
}

/// Where calico-node records the name it registered this node under (Felix's `NODENAME`).
pub const CALICO_NODENAME: &str = "/var/lib/calico/nodename";

/// The name in Calico's nodename file, if there is one.
pub fn calico_nodename(path: &Path) -> Option<String> {
    let name = std::fs::read_to_string(path).ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The kernel's host name, or "" if it cannot be read (validation then asks for node_name).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success when
    // the name fits, and we cap at the buffer length regardless.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[cfg(test)]
mod tests;
