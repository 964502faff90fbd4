fn mem(tag: &str) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    eprintln!(
        "{tag:30} rss {:>7} kB  hwm {:>7} kB",
        get("VmRSS:"),
        get("VmHWM:")
    );
}
fn main() {
    mem("start");
    let b = dataplane_watchdog::ebpf::btf::Btf::from_sys().unwrap();
    mem("own parse");
    drop(b);
    mem("own dropped");
    if std::env::args().nth(1).as_deref() == Some("aya") {
        let a = aya::Btf::from_sys_fs().unwrap();
        mem("aya parse");
        drop(a);
        mem("aya dropped");
    }
    let c = dataplane_watchdog::ebpf::EbpfDropCounters::load(None);
    mem("load");
    unsafe { libc::malloc_trim(0) };
    mem("trimmed");
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    eprintln!("{s}");
    eprintln!("{:?}", c.as_ref().map(|_| ()).map_err(|e| e.reason.clone()));
}
