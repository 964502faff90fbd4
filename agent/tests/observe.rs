//! Privileged tests of the netlink observer against real kernel state in throwaway network
//! namespaces. They need root (CI runs as root); as another user they say so and skip.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use dataplane_watchdog::{
    model::{FdbEntry, MacAddr, NeighState, Neighbour, ObservedState, Route, RouteKind},
    observe::{
        dump_route_count, netns_inode, Applied, KernelObserver, Monitor, MonitorOptions,
        NetlinkObserver, ObservedEvent,
    },
};

const DEV: &str = "vxlan.calico";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: needs root to create network namespaces");
            return;
        }
    };
}

/// A network namespace that is deleted when the test ends, even by panic.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wdobs-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &str) {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        run("ip", &full);
    }

    fn bridge(&self, args: &str) {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        run("bridge", &full);
    }

    /// `ip -batch` of many commands at once (fast enough to overrun a small socket buffer).
    fn ip_batch(&self, commands: &str) {
        let file = std::env::temp_dir().join(format!("{}.batch", self.name));
        std::fs::write(&file, commands).unwrap();
        run("ip", &["-n", &self.name, "-batch", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(file);
    }

    /// The Calico-like node of these tests: veth underlay, vxlan.calico with VNI 4096, port
    /// 4789, no learning, one onlink route per table, a blackhole, a permanent neighbour and
    /// an FDB entry.
    fn calico_node() -> Netns {
        let ns = Netns::new();
        ns.ip("link set lo up");
        ns.ip("link add veth0 type veth peer name veth1");
        ns.ip("addr add 192.168.77.1/24 dev veth0");
        ns.ip("link set veth0 up");
        ns.ip("link set veth1 up");
        ns.ip(&format!(
            "link add {DEV} type vxlan id 4096 dstport 4789 nolearning local 192.168.77.1 dev veth0"
        ));
        // No IPv6 link-local address: keeps kernel-made IPv6 entries out of the picture.
        ns.ip(&format!("link set {DEV} addrgenmode none"));
        ns.ip(&format!(
            "link set {DEV} mtu 1450 address 66:01:02:03:04:05 up"
        ));
        ns.ip(&format!("addr add 10.1.1.0/32 dev {DEV}"));
        ns.ip(&format!(
            "route add 10.1.235.128/26 via 10.1.235.133 dev {DEV} onlink"
        ));
        ns.ip(&format!(
            "route add 10.1.240.0/26 via 10.1.240.0 dev {DEV} onlink table 1000 proto 80 metric 20"
        ));
        ns.ip("route add blackhole 10.1.1.0/26 proto 80");
        ns.ip(&format!(
            "neigh add 10.1.235.133 lladdr 66:aa:bb:cc:dd:ee dev {DEV} nud permanent"
        ));
        ns.bridge(&format!(
            "fdb add 66:aa:bb:cc:dd:ee dev {DEV} dst 192.168.77.3 self permanent"
        ));
        ns.ip(&format!("-6 route add fd00:10::/64 dev {DEV}"));
        ns.ip(&format!(
            "-6 neigh add fd00:10::5 lladdr 66:aa:bb:cc:dd:ef dev {DEV} nud permanent"
        ));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn route(dst: &str, gw: Option<&str>, proto: u8, table: u32, kind: RouteKind) -> Route {
    Route {
        destination: dst.parse().unwrap(),
        gateway: gw.map(ip),
        onlink: gw.is_some(),
        protocol: proto,
        table,
        kind,
        metric: None,
    }
}

fn devices() -> Vec<String> {
    vec![DEV.to_string(), "flannel.1".to_string()]
}

#[tokio::test]
async fn snapshot_matches_what_was_programmed() {
    require_root!();
    let ns = Netns::calico_node();
    let observer = NetlinkObserver::new(Some(&ns.path())).expect("connect in netns");
    let state = observer.snapshot(&devices()).await.expect("snapshot");

    assert_eq!(
        state.devices.keys().collect::<Vec<_>>(),
        vec![DEV],
        "absent flannel.1 is left out"
    );
    let dev = &state.devices[DEV];
    let link = &dev.link;
    assert_eq!(link.name, DEV);
    assert!(link.ifindex > 0);
    assert_eq!(link.kind.as_deref(), Some("vxlan"));
    assert_eq!(link.vni, Some(4096));
    assert_eq!(link.port, Some(4789));
    assert_eq!(link.learning, Some(false));
    assert_eq!(link.local, Some(ip("192.168.77.1")));
    assert!(link.up);
    assert_eq!(link.mac, Some(mac("66:01:02:03:04:05")));
    assert_eq!(link.mtu, Some(1450));
    assert_eq!(link.addresses, vec!["10.1.1.0/32".parse().unwrap()]);

    let mut expected_routes = vec![
        route(
            "10.1.235.128/26",
            Some("10.1.235.133"),
            3,
            254,
            RouteKind::Unicast,
        ),
        route("10.1.1.0/26", None, 80, 254, RouteKind::Blackhole),
        route("10.1.1.0/32", None, 2, 255, RouteKind::Local),
        Route {
            metric: Some(20),
            ..route(
                "10.1.240.0/26",
                Some("10.1.240.0"),
                80,
                1000,
                RouteKind::Unicast,
            )
        },
        Route {
            metric: Some(1024),
            ..route("fd00:10::/64", None, 3, 254, RouteKind::Unicast)
        },
        // The kernel's own IPv6 multicast route for an IPv6-enabled device.
        Route {
            metric: Some(256),
            ..route("ff00::/8", None, 2, 255, RouteKind::Other)
        },
    ];
    let mut got_routes = dev.routes.clone();
    let key = |r: &Route| (r.table, r.destination);
    expected_routes.sort_by_key(key);
    got_routes.sort_by_key(key);
    assert_eq!(got_routes, expected_routes);

    // IPv6 may add multicast (ff02::) entries of its own; everything else is exact.
    let neighbours: Vec<&Neighbour> = dev
        .neighbours
        .iter()
        .filter(|n| !matches!(n.ip, IpAddr::V6(v6) if v6.is_multicast()))
        .collect();
    assert_eq!(
        neighbours,
        vec![
            &Neighbour {
                ip: ip("10.1.235.133"),
                mac: Some(mac("66:aa:bb:cc:dd:ee")),
                state: NeighState(NeighState::PERMANENT),
            },
            &Neighbour {
                ip: ip("fd00:10::5"),
                mac: Some(mac("66:aa:bb:cc:dd:ef")),
                state: NeighState(NeighState::PERMANENT),
            },
        ]
    );
    assert_eq!(
        dev.fdb,
        vec![FdbEntry {
            mac: mac("66:aa:bb:cc:dd:ee"),
            destination: Some(ip("192.168.77.3")),
            permanent: true,
        }]
    );

    // Namespace identity for the eBPF side: the netns file's inode, not ours.
    let inode = netns_inode(Some(&ns.path())).unwrap();
    assert_ne!(inode, netns_inode(None).unwrap());
    assert!(dump_route_count(observer.conn()).await.unwrap() >= expected_routes.len());
}

#[tokio::test]
async fn missing_namespace_is_a_clear_error() {
    require_root!();
    let err = NetlinkObserver::new(Some(std::path::Path::new("/run/netns/does-not-exist-wd")))
        .unwrap_err();
    assert!(err.to_string().contains("does-not-exist-wd"), "{err}");
}

#[tokio::test]
async fn host_namespace_and_impossible_names_are_just_absent() {
    require_root!();
    let observer = NetlinkObserver::new(None).expect("connect in host netns");
    let names = vec![
        "wd-no-such-dev".to_string(),
        "a-name-longer-than-ifnamsiz".to_string(),
        String::new(),
    ];
    let state = observer.snapshot(&names).await.expect("snapshot");
    assert!(state.devices.is_empty(), "{state:?}");
    let lo = observer.snapshot(&["lo".to_string()]).await.unwrap();
    assert_eq!(lo.devices["lo"].link.ifindex, 1);
    assert!(lo.devices["lo"].link.up);
}

/// Wait for the first event matching `pred`, skipping others.
async fn wait_for(monitor: &mut Monitor, pred: impl Fn(&ObservedEvent) -> bool) -> ObservedEvent {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, monitor.next()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("monitor stopped"),
            Err(_) => panic!("no matching event within 10 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_reports_route_add_and_remove() {
    require_root!();
    let ns = Netns::calico_node();
    let mut monitor = Monitor::start(Some(&ns.path()), &MonitorOptions::default()).unwrap();
    ns.ip(&format!(
        "route add 10.9.0.0/24 via 10.1.235.133 dev {DEV} onlink"
    ));
    let dst = "10.9.0.0/24".parse().unwrap();
    let added = wait_for(
        &mut monitor,
        |e| matches!(e, ObservedEvent::RouteAdded { route, .. } if route.destination == dst),
    )
    .await;
    let ObservedEvent::RouteAdded { ifindex, route, .. } = added else {
        unreachable!()
    };
    assert!(ifindex > 0);
    assert_eq!(route.gateway, Some(ip("10.1.235.133")));
    assert!(route.onlink);
    ns.ip(&format!("route del 10.9.0.0/24 dev {DEV}"));
    wait_for(
        &mut monitor,
        |e| matches!(e, ObservedEvent::RouteRemoved { route, .. } if route.destination == dst),
    )
    .await;
}

/// Drain events until none arrived for `quiet`.
async fn apply_until_quiet(
    monitor: &mut Monitor,
    state: &mut ObservedState,
    quiet: Duration,
) -> Vec<Applied> {
    let mut outcomes = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(quiet, monitor.next()).await {
        outcomes.push(state.apply(&event, &devices()));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_applied_to_a_snapshot_equal_a_fresh_snapshot() {
    require_root!();
    let ns = Netns::calico_node();
    let mut monitor = Monitor::start(Some(&ns.path()), &MonitorOptions::default()).unwrap();
    let observer = NetlinkObserver::new(Some(&ns.path())).unwrap();
    let mut state = observer.snapshot(&devices()).await.unwrap();

    // What Felix does on a bad day, and what a repair does after.
    ns.ip(&format!(
        "route replace 10.1.235.128/26 via 10.1.235.128 dev {DEV} onlink"
    ));
    ns.ip(&format!(
        "route add 10.1.236.0/26 via 10.1.236.0 dev {DEV} onlink"
    ));
    ns.ip(&format!("route del 10.1.240.0/26 table 1000 dev {DEV}"));
    ns.ip("route add blackhole 10.1.2.0/26 proto 80");
    ns.ip("route del blackhole 10.1.1.0/26");
    ns.ip(&format!(
        "neigh replace 10.1.235.133 lladdr 66:aa:bb:cc:dd:00 dev {DEV} nud permanent"
    ));
    ns.ip(&format!(
        "neigh add 10.1.236.0 lladdr 66:aa:bb:cc:dd:01 dev {DEV} nud permanent"
    ));
    ns.bridge(&format!(
        "fdb replace 66:aa:bb:cc:dd:ee dev {DEV} dst 192.168.77.9 self permanent"
    ));
    ns.bridge(&format!(
        "fdb add 66:aa:bb:cc:dd:01 dev {DEV} dst 192.168.77.4 self permanent"
    ));
    ns.ip(&format!("addr add 10.1.1.1/32 dev {DEV}"));
    ns.ip("route add 10.50.0.0/16 via 192.168.77.2 dev veth0");

    let outcomes = apply_until_quiet(&mut monitor, &mut state, Duration::from_millis(500)).await;
    assert!(outcomes.contains(&Applied::Changed), "{outcomes:?}");
    assert!(!outcomes.contains(&Applied::ResyncNeeded), "{outcomes:?}");
    let fresh = observer.snapshot(&devices()).await.unwrap();
    assert_eq!(state, fresh);

    // Taking the device down flushes IPv4 routes silently: apply must ask for a resync.
    ns.ip(&format!("link set {DEV} down"));
    let outcomes = apply_until_quiet(&mut monitor, &mut state, Duration::from_millis(500)).await;
    assert!(outcomes.contains(&Applied::ResyncNeeded), "{outcomes:?}");

    // Deleting the device removes it from the model.
    ns.ip(&format!("link del {DEV}"));
    apply_until_quiet(&mut monitor, &mut state, Duration::from_millis(500)).await;
    assert!(state.devices.is_empty());
    assert_eq!(observer.snapshot(&devices()).await.unwrap(), state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_receive_buffer_reports_overrun() {
    require_root!();
    let ns = Netns::calico_node();
    let options = MonitorOptions {
        recv_buffer: Some(1), // the kernel rounds up to its minimum, a couple of KiB
        queue: 1,
    };
    let mut monitor = Monitor::start(Some(&ns.path()), &options).unwrap();
    ns.ip_batch(&route_burst(0));
    let event = wait_for(&mut monitor, |e| matches!(e, ObservedEvent::Overrun)).await;
    assert_eq!(event, ObservedEvent::Overrun);
    // The monitor survives an overrun: later changes still arrive.
    ns.ip(&format!("route add 10.9.9.0/24 dev {DEV}"));
    let dst = "10.9.9.0/24".parse().unwrap();
    wait_for(
        &mut monitor,
        |e| matches!(e, ObservedEvent::RouteAdded { route, .. } if route.destination == dst),
    )
    .await;
}

/// 4000 /32 routes in 10.<first>.0.0/16 out of the vxlan device.
fn route_burst(first: u8) -> String {
    (0..4000)
        .map(|i| {
            format!(
                "route add 10.{first}.{}.{}/32 dev {DEV}\n",
                i / 256,
                i % 256
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_buffer_absorbs_a_felix_sized_burst() {
    require_root!();
    let ns = Netns::calico_node();
    let mut monitor = Monitor::start(Some(&ns.path()), &MonitorOptions::default()).unwrap();
    ns.ip_batch(&route_burst(201));
    let last = "10.201.15.159/32".parse().unwrap();
    let mut routes = 0;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), monitor.next())
            .await
            .expect("burst delivered within 10 s")
            .expect("monitor alive");
        match event {
            ObservedEvent::Overrun => panic!("overrun after {routes} routes"),
            ObservedEvent::RouteAdded { route, .. } => {
                routes += 1;
                if route.destination == last {
                    break;
                }
            }
            _ => {}
        }
    }
    assert_eq!(routes, 4000);
}

/// Every remedy kind written through netlink gives exactly the state the recording writer's
/// model predicts: unit tests of repair logic on the model stand for the real kernel.
#[tokio::test]
async fn netlink_writes_agree_with_the_recording_model() {
    use dataplane_watchdog::{
        model::Remedy,
        observe::{apply_to_model, KernelWriter, NetlinkWriter},
    };
    require_root!();
    let ns = Netns::calico_node();
    let observer = NetlinkObserver::new(Some(&ns.path())).expect("connect in netns");
    let mut writer = NetlinkWriter::new(Some(&ns.path())).expect("writer in netns");
    let mut model = observer.snapshot(&devices()).await.expect("snapshot");
    let d = || DEV.to_string();
    let remedies = [
        // The incident's fix: the existing route re-pointed, its protocol kept.
        Remedy::RouteReplace {
            device: d(),
            destination: "10.1.235.128/26".parse().unwrap(),
            gateway: ip("10.1.235.140"),
            protocol: 3,
            metric: None,
        },
        Remedy::RouteReplace {
            device: d(),
            destination: "10.1.237.0/26".parse().unwrap(),
            gateway: ip("10.1.237.1"),
            protocol: 80,
            metric: Some(50),
        },
        Remedy::RouteAdd {
            device: d(),
            destination: "10.1.236.0/26".parse().unwrap(),
            gateway: ip("10.1.236.1"),
        },
        Remedy::RouteAdd {
            device: d(),
            destination: "10.1.238.0/26".parse().unwrap(),
            gateway: ip("10.1.238.1"),
        },
        Remedy::RouteDelete {
            device: d(),
            destination: "10.1.238.0/26".parse().unwrap(),
            gateway: Some(ip("10.1.238.1")),
            protocol: 3,
            metric: None,
        },
        Remedy::NeighReplace {
            device: d(),
            ip: ip("10.1.235.133"),
            mac: mac("66:aa:bb:cc:dd:01"),
        },
        Remedy::NeighReplace {
            device: d(),
            ip: ip("10.1.236.1"),
            mac: mac("66:aa:bb:cc:dd:02"),
        },
        Remedy::FdbReplace {
            device: d(),
            mac: mac("66:aa:bb:cc:dd:ee"),
            destination: ip("192.168.77.9"),
        },
        Remedy::FdbReplace {
            device: d(),
            mac: mac("66:aa:bb:cc:dd:02"),
            destination: ip("192.168.77.4"),
        },
    ];
    for r in &remedies {
        writer.write(r).await.unwrap_or_else(|e| panic!("{r}: {e}"));
        apply_to_model(&mut model, r).unwrap_or_else(|e| panic!("model {r}: {e}"));
    }
    let mut kernel = observer.snapshot(&devices()).await.expect("snapshot");
    kernel.normalize();
    model.normalize();
    assert_eq!(kernel.devices[DEV].routes, model.devices[DEV].routes);
    assert_eq!(
        kernel.devices[DEV].neighbours,
        model.devices[DEV].neighbours
    );
    assert_eq!(kernel.devices[DEV].fdb, model.devices[DEV].fdb);

    // Both refuse to add a route that exists, and to write to a device that does not.
    let again = &remedies[2];
    let err = writer.write(again).await.unwrap_err().to_string();
    assert!(err.contains("route-add") && err.contains("exists"), "{err}");
    assert!(apply_to_model(&mut model, again).is_err());
    let missing = Remedy::NeighReplace {
        device: "flannel.1".into(),
        ip: ip("10.1.9.1"),
        mac: mac("66:aa:bb:cc:dd:03"),
    };
    let err = writer.write(&missing).await.unwrap_err().to_string();
    assert!(err.contains("flannel.1 does not exist"), "{err}");
    assert!(apply_to_model(&mut model, &missing).is_err());
}

/// Calico's eBPF dataplane makes `vxlan.calico` flow-based (`external`): the observer must say
/// so, since such a device has no VNI of its own and uses no FDB.
#[tokio::test]
async fn a_flow_based_vxlan_device_is_observed_as_external() {
    require_root!();
    let ns = Netns::new();
    ns.ip(&format!(
        "link add {DEV} type vxlan external dstport 4789 nolearning"
    ));
    ns.ip(&format!("link set {DEV} up"));
    let observer = NetlinkObserver::new(Some(&ns.path())).expect("connect in netns");
    let state = observer.snapshot(&devices()).await.expect("snapshot");
    let link = &state.devices[DEV].link;
    assert!(link.external, "{link:?}");
    assert_eq!(link.port, Some(4789));

    let ns = Netns::calico_node();
    let state = NetlinkObserver::new(Some(&ns.path()))
        .unwrap()
        .snapshot(&devices())
        .await
        .unwrap();
    assert!(
        !state.devices[DEV].link.external,
        "a VNI device is not external"
    );
}
