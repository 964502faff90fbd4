//! Privileged tests of the eBPF accounting with real traffic in throwaway network namespaces.
//!
//! Need root and an agent built with bpf-linker on PATH (`cargo xtask test` does both). Run:
//! `cargo xtask test ebpf`
//!
//! The loader always runs in the test's own (root) namespace and targets a namespace by path;
//! traffic is sent from threads that `setns` into the namespace (never `ip netns exec` for the
//! loader, which remounts /sys).

use std::{
    collections::BTreeSet,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use dataplane_watchdog::ebpf::{
    DropCounterSource, DropSnapshot, EbpfDropCounters, EbpfState, HeaderRead, NeighTarget,
    TrafficClass, EBPF_OBJECT, RETIRED_IFINDEX,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists for the life of the value, deleted on drop (also on panic).
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!(
            "wdebpf-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    fn bridge(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("bridge", &full);
    }

    /// Writes `/proc/sys/<key>` inside the namespace (`key` as a path: device names have dots).
    fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{key}");
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sh",
                "-c",
                &format!("echo {value} > {path}"),
            ],
        );
    }

    fn ifindex(&self, dev: &str) -> u32 {
        let out = output("ip", &["-n", &self.name, "-o", "link", "show", "dev", dev]);
        out.split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex in {out:?}"))
    }

    /// Runs `f` on a thread that has entered this namespace.
    fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: plain syscall on a valid fd; only this thread changes namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// Sends `count` UDP datagrams to `dst:port` from inside the namespace (errors ignored:
    /// an unresolvable gateway makes some sends fail, which is the point).
    fn send_udp(&self, dst: impl Into<IpAddr>, port: u16, count: usize) {
        let dst = dst.into();
        self.run_in(move || {
            let any = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let sock = UdpSocket::bind(any).expect("bind");
            for _ in 0..count {
                let _ = sock.send_to(&[0u8; 200], (dst, port));
            }
        })
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
    let status = Command::new(cmd).args(args).status().expect("spawn");
    assert!(status.success(), "{cmd} {args:?} failed: {status}");
}

fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The incident's sender: `10.9.0.0/26 via 10.9.0.0 dev vxlan.calico onlink` with no neighbour
/// and no FDB entry. Resolution is sped up (2 probes, 100 ms apart, tiny queue).
fn broken_sender(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    // No IPv6 link-local chatter (MLD, router solicits): those would be counted too (class
    // ipv6, NO_TX_TARGET) and blur which namespace produced a drop.
    ns.sysctl("net/ipv6/conf/default/disable_ipv6", "1");
    ns.ip(&[
        "link",
        "add",
        "vxlan.calico",
        "type",
        "vxlan",
        "id",
        "4096",
        "dstport",
        "4789",
        "nolearning",
    ]);
    ns.ip(&["addr", "add", "10.9.1.0/32", "dev", "vxlan.calico"]);
    ns.ip(&["link", "set", "vxlan.calico", "up"]);
    ns.ip(&[
        "route",
        "add",
        "10.9.0.0/26",
        "via",
        "10.9.0.0",
        "dev",
        "vxlan.calico",
        "onlink",
    ]);
    ns.sysctl("net/ipv4/neigh/vxlan.calico/mcast_solicit", "2");
    ns.sysctl("net/ipv4/neigh/vxlan.calico/retrans_time_ms", "100");
    ns.sysctl("net/ipv4/neigh/vxlan.calico/unres_qlen_bytes", "2000");
    ns
}

fn load(ns: &Netns) -> EbpfDropCounters {
    assert!(
        !EBPF_OBJECT.is_empty(),
        "agent built without bpf-linker: put it on PATH and rebuild"
    );
    let counters = EbpfDropCounters::load(Some(&ns.path()))
        .unwrap_or_else(|status| panic!("eBPF unavailable: {status:?}"));
    let status = counters.status();
    assert_eq!(status.state, EbpfState::Attached, "{status:?}");
    counters
}

fn watch(counters: &mut EbpfDropCounters, ifindex: u32) {
    counters
        .set_watched_devices(&BTreeSet::from([ifindex]))
        .expect("watch device");
    counters
        .set_peer_blocks(&[
            ("k8s03".into(), "10.9.0.0/26".parse().unwrap()),
            ("k8s02".into(), "10.9.2.0/26".parse().unwrap()),
        ])
        .expect("peer blocks");
}

/// Polls until `done` holds for a snapshot, or returns the last one after `timeout`.
fn wait_for(
    counters: &EbpfDropCounters,
    timeout: Duration,
    done: impl Fn(&DropSnapshot) -> bool,
) -> DropSnapshot {
    let start = Instant::now();
    loop {
        let snap = counters.snapshot().expect("snapshot");
        if done(&snap) || start.elapsed() > timeout {
            return snap;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A 5,000-node cluster with 6 blocks per node (30,000 blocks, the benchmark's synthetic node)
/// must fit: over capacity, no drop at all would be attributed to a peer.
#[test]
fn peer_blocks_of_a_large_cluster_fit_and_attribute_drops() {
    let ns = broken_sender("big");
    let ifindex = ns.ifindex("vxlan.calico");
    let mut counters = load(&ns);
    counters
        .set_watched_devices(&BTreeSet::from([ifindex]))
        .expect("watch device");
    // 10.64.0.0/10 holds 65,536 /26 blocks: node i owns blocks 6i..6i+5.
    let mut blocks: Vec<(String, ipnet::IpNet)> = (0..5000u32 * 6)
        .map(|b| {
            let addr = Ipv4Addr::from(0x0a40_0000 + (b << 6));
            (
                format!("node{}", b / 6),
                ipnet::IpNet::new(addr.into(), 26).unwrap(),
            )
        })
        .collect();
    blocks.push(("k8s03".into(), "10.9.0.0/26".parse().unwrap()));
    counters
        .set_peer_blocks(&blocks)
        .expect("30,001 peer blocks");

    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 20);
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        s.data_drops_to_peer("k8s03").values().sum::<u64>() >= 20
    });
    assert_eq!(
        snap.data_drops_to_peer("k8s03").values().sum::<u64>(),
        20,
        "{snap:#?}"
    );
}

#[test]
fn unresolvable_gateway_counts_data_drops_per_peer_arp_as_control_and_neighbour_failures() {
    let ns = broken_sender("drop");
    let ifindex = ns.ifindex("vxlan.calico");
    let mut counters = load(&ns);
    watch(&mut counters, ifindex);

    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 50);
    let gateway = IpAddr::from([10, 9, 0, 0]);
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        s.data_drops_to_peer("k8s03").contains_key("NEIGH_FAILED")
            && s.neighbour_total(ifindex, NeighTarget::Failed) > 0
            && s.data_drops_to_peer("k8s03").values().sum::<u64>() >= 50
    });
    eprintln!("{snap:#?}");

    let data = snap.data_drops_to_peer("k8s03");
    let data_total: u64 = data.values().sum();
    assert!(
        data.contains_key("NEIGH_FAILED"),
        "no NEIGH_FAILED data drops: {data:?}"
    );
    assert!(
        data.contains_key("NEIGH_QUEUEFULL"),
        "no NEIGH_QUEUEFULL data drops: {data:?}"
    );
    // Every datagram is lost, each counted once, all on the right device and peer.
    assert_eq!(data_total, 50, "{data:?}");
    assert!(snap.drops.iter().all(|d| d.ifindex == ifindex));
    assert!(
        snap.data_drops_to_peer("k8s02").is_empty(),
        "misattributed to k8s02"
    );
    assert!(
        snap.drops
            .iter()
            .all(|d| !(d.class.is_data() && d.peer.is_none())),
        "IPv4 drop without a peer: {snap:?}"
    );

    let arp: Vec<_> = snap
        .drops
        .iter()
        .filter(|d| d.class == TrafficClass::Arp)
        .collect();
    assert!(!arp.is_empty(), "ARP solicits not counted");
    assert!(
        arp.iter()
            .all(|d| d.reason == "NO_TX_TARGET" && d.peer.is_none()),
        "{arp:?}"
    );

    assert_eq!(snap.neighbour_total(ifindex, NeighTarget::Incomplete), 1);
    assert_eq!(snap.neighbour_total(ifindex, NeighTarget::Failed), 1);
    assert_eq!(
        snap.neighbour_gateway(ifindex, gateway, NeighTarget::Incomplete),
        1
    );
    assert_eq!(
        snap.neighbour_gateway(ifindex, gateway, NeighTarget::Failed),
        1
    );
    assert_eq!(snap.overflow.header_unreadable, 0);

    // A second burst after FAILED restarts resolution: one more transition each, not 20.
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 20);
    // The queued packets are freed just after the FAILED transition is counted: wait for both.
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        s.neighbour_total(ifindex, NeighTarget::Failed) >= 2
            && s.data_drops_to_peer("k8s03").values().sum::<u64>() >= 70
    });
    assert_eq!(
        snap.neighbour_total(ifindex, NeighTarget::Incomplete),
        2,
        "{snap:#?}"
    );
    assert_eq!(
        snap.neighbour_total(ifindex, NeighTarget::Failed),
        2,
        "{snap:#?}"
    );
    assert_eq!(snap.data_drops_to_peer("k8s03").values().sum::<u64>(), 70);
}

/// Interleaved drops toward two peers on one CPU change (reason, peer) on almost every packet:
/// each change moves the per-CPU pending count into the hash. Totals must stay exact.
#[test]
fn interleaved_drops_toward_two_peers_are_counted_exactly() {
    let ns = broken_sender("alternate");
    ns.ip(&[
        "route",
        "add",
        "10.9.2.0/26",
        "via",
        "10.9.2.0",
        "dev",
        "vxlan.calico",
        "onlink",
    ]);
    let ifindex = ns.ifindex("vxlan.calico");
    let mut counters = load(&ns);
    watch(&mut counters, ifindex);

    ns.run_in(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..40 {
            let _ = sock.send_to(&[0u8; 200], (Ipv4Addr::new(10, 9, 0, 5), 9000));
            let _ = sock.send_to(&[0u8; 200], (Ipv4Addr::new(10, 9, 2, 5), 9000));
        }
    });
    let total = |s: &DropSnapshot, peer: &str| s.data_drops_to_peer(peer).values().sum::<u64>();
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        total(s, "k8s03") >= 40 && total(s, "k8s02") >= 40
    });
    assert_eq!(total(&snap, "k8s03"), 40, "{snap:#?}");
    assert_eq!(total(&snap, "k8s02"), 40, "{snap:#?}");
    assert!(
        snap.drops
            .iter()
            .all(|d| !(d.class.is_data() && d.peer.is_none())),
        "IPv4 drop without a peer: {snap:#?}"
    );
    assert_eq!(snap.overflow.drops_map_full, 0);
    // Nothing in flight any more: a second read gives the same data drops.
    let data = |s: &DropSnapshot| -> Vec<_> {
        s.drops
            .iter()
            .filter(|d| d.class.is_data())
            .cloned()
            .collect()
    };
    assert_eq!(data(&counters.snapshot().expect("snapshot")), data(&snap));
}

/// Kernels without the `bpf_rdonly_cast` kfunc read the inner header and the neighbour address
/// with `bpf_probe_read_kernel`: that path attributes drops and transitions the same way.
#[test]
fn probe_read_path_attributes_drops_like_the_direct_load() {
    let ns = broken_sender("probe");
    let ifindex = ns.ifindex("vxlan.calico");
    let mut counters = EbpfDropCounters::load_with_probe_read(Some(&ns.path()))
        .unwrap_or_else(|status| panic!("eBPF unavailable: {status:?}"));
    assert_eq!(counters.status().state, EbpfState::Attached);
    assert_eq!(counters.header_read(), HeaderRead::ProbeRead);
    watch(&mut counters, ifindex);
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 30);
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        s.data_drops_to_peer("k8s03").values().sum::<u64>() >= 30
    });
    assert_eq!(
        snap.data_drops_to_peer("k8s03").values().sum::<u64>(),
        30,
        "{snap:#?}"
    );
    assert!(snap.data_drops_to_peer("k8s02").is_empty());
    assert_eq!(snap.overflow.header_unreadable, 0);
    // The neighbour programs read the gateway address with the helper too.
    assert_eq!(
        snap.neighbour_gateway(ifindex, [10, 9, 0, 0].into(), NeighTarget::Incomplete),
        1,
        "{snap:#?}"
    );
}

/// The incident on an IPv6 overlay: `fd10:9::/122 via fd10:9:: dev vxlan-v6.calico onlink`
/// with no neighbour and no FDB entry; NDP sped up as ARP is in [`broken_sender`].
fn broken_sender_v6(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    let dev = "vxlan-v6.calico";
    ns.ip(&[
        "link",
        "add",
        dev,
        "type",
        "vxlan",
        "id",
        "4096",
        "dstport",
        "4789",
        "nolearning",
    ]);
    ns.ip(&["-6", "addr", "add", "fd10:9:1::/128", "dev", dev, "nodad"]);
    ns.ip(&["link", "set", dev, "up"]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "fd10:9::/122",
        "via",
        "fd10:9::",
        "dev",
        dev,
        "onlink",
    ]);
    ns.sysctl(&format!("net/ipv6/neigh/{dev}/mcast_solicit"), "2");
    ns.sysctl(&format!("net/ipv6/neigh/{dev}/retrans_time_ms"), "100");
    ns
}

/// IPv6 drops behind an unresolvable gateway are k8s03's (its IPv6 block, not its IPv4 one,
/// not k8s02's), the NDP entry's transitions are the gateway's, and the solicitations are
/// control: with the direct load and with the probe-read fallback.
#[test]
fn ipv6_drops_are_attributed_by_the_v6_trie_and_ndp_failures_name_the_gateway() {
    type Loader = fn(
        Option<&std::path::Path>,
    ) -> Result<EbpfDropCounters, dataplane_watchdog::ebpf::EbpfStatus>;
    let loaders: [(&str, Loader); 2] = [
        ("direct", EbpfDropCounters::load),
        ("probe", EbpfDropCounters::load_with_probe_read),
    ];
    for (tag, loader) in loaders {
        let ns = broken_sender_v6(&format!("v6{tag}"));
        let ifindex = ns.ifindex("vxlan-v6.calico");
        let mut counters =
            loader(Some(&ns.path())).unwrap_or_else(|status| panic!("{tag}: {status:?}"));
        assert_eq!(counters.status().state, EbpfState::Attached, "{tag}");
        counters
            .set_watched_devices(&BTreeSet::from([ifindex]))
            .unwrap();
        counters
            .set_peer_blocks(&[
                ("k8s03".into(), "10.9.0.0/26".parse().unwrap()),
                ("k8s03".into(), "fd10:9::/122".parse().unwrap()),
                ("k8s02".into(), "fd10:9:2::/122".parse().unwrap()),
                ("k8s02".into(), "fd10:9::/64".parse().unwrap()),
            ])
            .unwrap();
        ns.send_udp("fd10:9::5".parse::<Ipv6Addr>().unwrap(), 9000, 30);
        let gateway: IpAddr = "fd10:9::".parse().unwrap();
        let snap = wait_for(&counters, Duration::from_secs(5), |s| {
            s.data_drops_to_peer("k8s03").values().sum::<u64>() >= 30
                && s.neighbour_gateway(ifindex, gateway, NeighTarget::Failed) > 0
        });
        assert_eq!(
            snap.data_drops_to_peer("k8s03").values().sum::<u64>(),
            30,
            "{tag}: the longest prefix (k8s03's /122, not k8s02's /64) wins: {snap:#?}"
        );
        assert!(snap.data_drops_to_peer("k8s02").is_empty(), "{tag}");
        assert!(
            snap.drops
                .iter()
                .filter(|d| d.class.is_data())
                .all(|d| d.class == TrafficClass::Ipv6 && d.peer.as_deref() == Some("k8s03")),
            "{tag}: {snap:#?}"
        );
        let solicits: u64 = snap
            .drops
            .iter()
            .filter(|d| d.class == TrafficClass::Ipv6Multicast)
            .map(|d| d.packets)
            .sum();
        assert!(
            solicits > 0,
            "{tag}: neighbour solicitations not counted: {snap:#?}"
        );
        assert_eq!(
            snap.neighbour_gateway(ifindex, gateway, NeighTarget::Incomplete),
            1,
            "{tag}: {snap:#?}"
        );
        assert_eq!(
            snap.neighbour_gateway(ifindex, gateway, NeighTarget::Failed),
            1,
            "{tag}: {snap:#?}"
        );
        assert_eq!(snap.overflow.header_unreadable, 0, "{tag}");
    }
}

/// Where the kernel has the kfunc (this project's CI kernel does), the default load uses it.
#[test]
fn default_load_reads_headers_directly_when_the_kernel_allows() {
    let ns = broken_sender("direct");
    let counters = load(&ns);
    let btf = dataplane_watchdog::ebpf::btf::Btf::from_sys().expect("vmlinux BTF");
    if btf.func_id("bpf_rdonly_cast").is_none() {
        eprintln!("skipping: kernel has no bpf_rdonly_cast");
        return;
    }
    assert!(
        matches!(counters.header_read(), HeaderRead::DirectLoad { .. }),
        "{:?}",
        counters.header_read()
    );
}

#[test]
fn drops_in_another_netns_are_not_counted() {
    let watched = broken_sender("watched");
    let other = broken_sender("other");
    let ifindex = watched.ifindex("vxlan.calico");
    // Same device name and (in fresh namespaces) the same ifindex: only the netns filter
    // tells them apart.
    assert_eq!(other.ifindex("vxlan.calico"), ifindex);
    let mut counters = load(&watched);
    watch(&mut counters, ifindex);

    other.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 30);
    // Let the other namespace's neighbour fail completely.
    std::thread::sleep(Duration::from_millis(1500));
    let snap = counters.snapshot().unwrap();
    assert!(snap.drops.is_empty(), "counted another netns: {snap:#?}");
    assert!(snap.neighbour_transitions.is_empty(), "{snap:#?}");

    // Positive control: the same traffic in the watched namespace is seen.
    watched.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 5);
    let snap = wait_for(&counters, Duration::from_secs(5), |s| !s.drops.is_empty());
    assert!(!snap.drops.is_empty(), "watched netns drops not counted");
}

#[test]
fn unwatched_device_is_not_counted_and_rewatching_after_recreate_works() {
    let ns = broken_sender("rewatch");
    let old = ns.ifindex("vxlan.calico");
    let mut counters = load(&ns);
    watch(&mut counters, old + 100); // not the device
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 10);
    std::thread::sleep(Duration::from_millis(800));
    assert!(counters.snapshot().unwrap().drops.is_empty());

    // Watched: its drops are counted, and must survive the device being retired.
    watch(&mut counters, old);
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 10);
    wait_for(&counters, Duration::from_secs(5), |s| {
        s.data_drops_to_peer("k8s03").values().sum::<u64>() == 10
    });
    // Let the neighbour fail completely so no queued packet is freed after the retire.
    std::thread::sleep(Duration::from_millis(1500));
    let before_retire = counters.snapshot().unwrap();
    let old_total = before_retire
        .data_drops_to_peer("k8s03")
        .values()
        .sum::<u64>();
    assert!(old_total >= 10, "{before_retire:#?}");

    // Re-create the device (new ifindex) and update the watch set, as the daemon does.
    ns.ip(&["link", "del", "vxlan.calico"]);
    ns.ip(&[
        "link",
        "add",
        "vxlan.calico",
        "type",
        "vxlan",
        "id",
        "4096",
        "dstport",
        "4789",
        "nolearning",
    ]);
    ns.ip(&["addr", "add", "10.9.1.0/32", "dev", "vxlan.calico"]);
    ns.ip(&["link", "set", "vxlan.calico", "up"]);
    ns.ip(&[
        "route",
        "add",
        "10.9.0.0/26",
        "via",
        "10.9.0.0",
        "dev",
        "vxlan.calico",
        "onlink",
    ]);
    let new = ns.ifindex("vxlan.calico");
    assert_ne!(new, old);
    counters
        .set_watched_devices(&BTreeSet::from([new]))
        .unwrap();
    // The retired device's counts are kept.
    let retired = counters.snapshot().unwrap();
    assert_eq!(
        retired.data_drops_to_peer("k8s03").values().sum::<u64>(),
        old_total,
        "counts lost when the device was retired: {retired:#?}"
    );
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 10);
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        s.data_drops_to_peer("k8s03").values().sum::<u64>() == old_total + 10
    });
    assert_eq!(
        snap.data_drops_to_peer("k8s03").values().sum::<u64>(),
        old_total + 10,
        "{snap:#?}"
    );
    // The old device's counts are kept under RETIRED_IFINDEX, whatever its ifindex was.
    assert!(
        snap.drops
            .iter()
            .all(|d| d.ifindex == new || d.ifindex == RETIRED_IFINDEX),
        "{snap:#?}"
    );
    let new_data: u64 = snap
        .drops
        .iter()
        .filter(|d| d.ifindex == new && d.class.is_data() && d.peer.is_some())
        .map(|d| d.packets)
        .sum();
    assert_eq!(new_data, 10, "{snap:#?}");
}

/// Nodes leave and join: a leaving peer's counters are harvested (its id handed out again),
/// never moved to the peer that takes over its block, and the device totals stay exact; churn
/// of many nodes keeps the id space flat.
#[test]
fn leaving_peers_are_harvested_without_moving_counts_and_churn_stays_flat() {
    let ns = broken_sender("churn");
    let ifindex = ns.ifindex("vxlan.calico");
    let mut counters = load(&ns);
    watch(&mut counters, ifindex);
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 10);
    wait_for(&counters, Duration::from_secs(5), |s| {
        s.data_drops_to_peer("k8s03").values().sum::<u64>() == 10
    });
    // Let the neighbour fail completely so no queued packet is freed later.
    std::thread::sleep(Duration::from_millis(1500));
    let device_total = |s: &DropSnapshot| s.drops_by_reason(ifindex).values().sum::<u64>();
    let unattributed_data = |s: &DropSnapshot| -> u64 {
        s.drops
            .iter()
            .filter(|d| d.ifindex == ifindex && d.class.is_data() && d.peer.is_none())
            .map(|d| d.packets)
            .sum()
    };
    let before = counters.snapshot().unwrap();
    assert_eq!(before.data_drops_to_peer("k8s03").values().sum::<u64>(), 10);

    // k8s03 leaves; after the grace period k8s09 takes over its block.
    let k8s02 = ("k8s02".to_string(), "10.9.2.0/26".parse().unwrap());
    counters
        .set_peer_blocks(std::slice::from_ref(&k8s02))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    counters
        .set_peer_blocks(&[
            k8s02.clone(),
            ("k8s09".into(), "10.9.0.0/26".parse().unwrap()),
        ])
        .unwrap();
    let after = counters.snapshot().unwrap();
    assert!(
        after.data_drops_to_peer("k8s09").is_empty(),
        "the new peer inherited the old one's counts: {after:#?}"
    );
    assert_eq!(device_total(&after), device_total(&before), "{after:#?}");
    assert_eq!(
        unattributed_data(&after),
        unattributed_data(&before),
        "harvested counts became unattributed: {after:#?}"
    );
    // Either harvested (departed) or, while a CPU still holds a pending count for it, still
    // reported under its name: never both, never lost.
    let departed: u64 = after.departed.iter().map(|d| d.packets).sum();
    let still_named: u64 = after.data_drops_to_peer("k8s03").values().sum();
    assert_eq!(departed + still_named, 10, "{after:#?}");

    // New drops toward the block are k8s09's, exactly.
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 5);
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        s.data_drops_to_peer("k8s09").values().sum::<u64>() == 5
    });
    assert_eq!(
        snap.data_drops_to_peer("k8s09").values().sum::<u64>(),
        5,
        "{snap:#?}"
    );
    let device_data = |s: &DropSnapshot| -> u64 {
        s.drops
            .iter()
            .chain(&s.departed)
            .filter(|d| d.ifindex == ifindex && d.class.is_data())
            .map(|d| d.packets)
            .sum()
    };
    assert_eq!(device_data(&snap), device_data(&before) + 5, "{snap:#?}");

    // Churn: three waves of 500 nodes replacing each other.
    for wave in 0..3u32 {
        let blocks: Vec<(String, ipnet::IpNet)> = (0..500u32)
            .map(|i| {
                let addr = Ipv4Addr::from(0x0a40_0000 + (i << 6));
                (
                    format!("wave{wave}-node{i}"),
                    ipnet::IpNet::new(addr.into(), 26).unwrap(),
                )
            })
            .chain([k8s02.clone()])
            .collect();
        counters.set_peer_blocks(&blocks).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
    }
    counters
        .set_peer_blocks(std::slice::from_ref(&k8s02))
        .unwrap();
    assert!(
        counters.peer_ids_allocated() <= 1000 + 4,
        "id space grew with churn: {}",
        counters.peer_ids_allocated()
    );
    assert_eq!(
        device_total(&counters.snapshot().unwrap()),
        device_total(&snap)
    );
}

/// Two namespaces joined by a veth underlay, each with a vxlan.calico configured like Felix's
/// (permanent neighbour + FDB for the other): a healthy pair.
#[test]
fn healthy_pair_shows_no_data_drops() {
    let a = Netns::new("ha");
    let b = Netns::new("hb");
    a.ip(&[
        "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &b.name,
    ]);
    for (ns, underlay, mac, vtep, peer_vtep, peer_mac, peer_underlay, peer_block) in [
        (
            &a,
            "192.168.77.1/24",
            "66:00:00:00:00:01",
            "10.9.1.0/32",
            "10.9.0.0",
            "66:00:00:00:00:02",
            "192.168.77.2",
            "10.9.0.0/26",
        ),
        (
            &b,
            "192.168.77.2/24",
            "66:00:00:00:00:02",
            "10.9.0.0/32",
            "10.9.1.0",
            "66:00:00:00:00:01",
            "192.168.77.1",
            "10.9.1.0/26",
        ),
    ] {
        ns.ip(&["addr", "add", underlay, "dev", "ul0"]);
        ns.ip(&["link", "set", "ul0", "up"]);
        let local = underlay.split('/').next().unwrap();
        ns.ip(&[
            "link",
            "add",
            "vxlan.calico",
            "address",
            mac,
            "type",
            "vxlan",
            "id",
            "4096",
            "dstport",
            "4789",
            "nolearning",
            "local",
            local,
            "dev",
            "ul0",
        ]);
        ns.ip(&["addr", "add", vtep, "dev", "vxlan.calico"]);
        ns.ip(&["link", "set", "vxlan.calico", "up"]);
        ns.ip(&[
            "neigh",
            "add",
            peer_vtep,
            "lladdr",
            peer_mac,
            "dev",
            "vxlan.calico",
            "nud",
            "permanent",
        ]);
        ns.bridge(&[
            "fdb",
            "add",
            peer_mac,
            "dev",
            "vxlan.calico",
            "dst",
            peer_underlay,
            "self",
            "permanent",
        ]);
        ns.ip(&[
            "route",
            "add",
            peer_block,
            "via",
            peer_vtep,
            "dev",
            "vxlan.calico",
            "onlink",
        ]);
    }
    b.ip(&["addr", "add", "10.9.0.5/32", "dev", "lo"]);
    let ifindex = a.ifindex("vxlan.calico");
    let mut counters = load(&a);
    watch(&mut counters, ifindex);

    let receiver = {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = b.path();
        let handle = std::thread::spawn(move || {
            let file = File::open(&path).unwrap();
            // SAFETY: see Netns::run_in.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let sock = UdpSocket::bind("10.9.0.5:9000").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            tx.send(()).unwrap();
            let mut got = 0;
            let mut buf = [0u8; 512];
            while got < 50 && sock.recv(&mut buf).is_ok() {
                got += 1;
            }
            got
        });
        rx.recv().unwrap();
        handle
    };
    a.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 50);
    let received = receiver.join().unwrap();
    assert_eq!(
        received, 50,
        "the healthy pair lost datagrams: the fixture is wrong"
    );
    std::thread::sleep(Duration::from_millis(300));
    let snap = counters.snapshot().unwrap();
    let data_drops: u64 = snap
        .drops
        .iter()
        .filter(|d| d.class.is_data())
        .map(|d| d.packets)
        .sum();
    assert_eq!(data_drops, 0, "{snap:#?}");
    assert!(snap.neighbour_transitions.is_empty(), "{snap:#?}");
}

/// Bench helper smoke test: run-time stats move when the program runs.
#[test]
fn program_stats_count_runs() {
    let ns = broken_sender("stats");
    let ifindex = ns.ifindex("vxlan.calico");
    let _stats = dataplane_watchdog::ebpf::bench::enable_stats().expect("enable stats");
    let mut counters = load(&ns);
    watch(&mut counters, ifindex);
    let before = counters.program_stats().unwrap();
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 20);
    wait_for(&counters, Duration::from_secs(5), |s| !s.drops.is_empty());
    let after = counters.program_stats().unwrap();
    let kfree = after
        .iter()
        .find(|p| p.name == "kfree_skb")
        .expect("kfree_skb stats");
    let kfree_before = before.iter().find(|p| p.name == "kfree_skb").unwrap();
    let delta = kfree.since(kfree_before);
    assert!(delta.run_count >= 20, "{delta:?}");
    eprintln!(
        "program stats: {after:#?}; kfree_skb mean {:?}",
        delta.mean()
    );
}

/// Without eBPF the fallback still sees the overlay device's own drop counter move, and it
/// agrees with the eBPF count of what VXLAN itself dropped (ARP solicits with no FDB entry).
#[test]
fn fallback_reports_device_tx_dropped_matching_ebpf_no_tx_target() {
    use dataplane_watchdog::ebpf::{Disabled, EbpfStatus, Missing};
    let ns = broken_sender("fallback");
    let ifindex = ns.ifindex("vxlan.calico");
    let mut fallback = Disabled::new(
        EbpfStatus::unavailable(Missing::Privilege, "test"),
        Some(&ns.path()),
    );
    fallback
        .set_watched_devices(&BTreeSet::from([ifindex]))
        .unwrap();
    let before = fallback.snapshot().unwrap();
    assert_eq!(before.link_stats.len(), 1, "{before:?}");
    assert_eq!(before.link_stats[0].name, "vxlan.calico");
    assert!(before.drops.is_empty());

    let mut counters = load(&ns);
    watch(&mut counters, ifindex);
    ns.send_udp(Ipv4Addr::new(10, 9, 0, 5), 9000, 10);
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        s.neighbour_total(ifindex, NeighTarget::Failed) > 0
    });
    let no_tx_target: u64 = snap
        .drops
        .iter()
        .filter(|d| d.reason == "NO_TX_TARGET")
        .map(|d| d.packets)
        .sum();
    let after = fallback.snapshot().unwrap();
    let delta = after.link_stats[0].tx_dropped - before.link_stats[0].tx_dropped;
    assert!(delta > 0, "device tx_dropped did not move: {after:?}");
    assert_eq!(
        delta, no_tx_target,
        "device counter vs eBPF: {after:?} {snap:#?}"
    );
}

/// Child half of the test below: prints the load outcome as JSON when asked to.
#[test]
#[ignore = "helper run by unprivileged_load_reports_missing_privilege"]
fn child_print_load_status() {
    if std::env::var_os("WDEBPF_CHILD").is_none() {
        return;
    }
    let status = match EbpfDropCounters::load(None) {
        Ok(c) => c.status(),
        Err(status) => status,
    };
    println!("STATUS {}", serde_json::to_string(&status).unwrap());
}

/// Without capabilities the loader returns a status naming the missing privilege (the daemon
/// keeps running), not an error or a crash.
#[test]
fn unprivileged_load_reports_missing_privilege() {
    assert!(!EBPF_OBJECT.is_empty(), "agent built without bpf-linker");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "child_print_load_status",
            "--nocapture",
        ])
        .env("WDEBPF_CHILD", "1")
        .output()
        .expect("setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("STATUS "))
        .unwrap_or_else(|| {
            panic!(
                "child printed no status: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let status: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(status["state"], "unavailable", "{status}");
    assert_eq!(status["missing"], "privilege", "{status}");
    assert!(
        status["reason"].as_str().unwrap().contains("CAP_BPF"),
        "{status}"
    );
}
