//! `cargo xtask bench daemon`: the running agent (`watchdog run`, release build) measured from
//! the outside, through its status API, the way an operator sees it.
//!
//! 1. Detection latency on the incident lab: a bad route written (`ip route replace` returned)
//!    → the finding visible in `GET /findings`; and restore → cleared. p50/p99 over N rounds.
//! 2. Event throughput at 5,000 peers × 6 blocks = 30,000 routes: the routes are written
//!    (`ip -batch`) while the daemon runs; time until its findings are exactly those of the
//!    healthy node, against the time the kernel took to accept the writes.
//! 3. Full resync time vs raw netlink dumps of the same namespace (same run): the same dumps
//!    the resync makes (routes, neighbours, FDB, addresses) parsed and dropped, and the route
//!    dump alone.
//! 4. RSS and idle CPU of the daemon holding that 5,000-peer model.
//!
//! Needs root. Options via env: `BENCH_INJECTIONS` (default 1000), `BENCH_PEERS` (5000),
//! `BENCH_GROWTH` (route counts for the resync growth table, default `1000,10000,30000,100000`;
//! empty to skip), `BENCH_PERF=<file>`: record the daemon with `perf record -g` during the route storm (for
//! `perf report -i <file>`; needs Debian's `linux-perf`). `--heap-profile FILE`: only the
//! 5,000-peer startup and storm, the daemon under `heaptrack` (Debian's `heaptrack`).
//! `--growth`: only the resync growth table.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dataplane_watchdog::{
    model::Finding,
    observe::{KernelObserver, NetlinkObserver},
    serve::{client, Status},
};
use watchdog_lab::{Lab, LabSpec};

#[path = "common/mod.rs"]
mod common;
use common::{sh, Netns, SyntheticNode, DEVICE};

const BLOCKS: usize = 6;
/// Pause between two polls of `GET /findings` while waiting for a finding.
const POLL_GAP: Duration = Duration::from_micros(50);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn watchdog_bin() -> PathBuf {
    // target/release/examples/bench_daemon → target/release/watchdog
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("watchdog"))
        .expect("target dir")
}

/// `watchdog run` as a child, killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(netns: &Path, node: &str, datastore: &Path, extra: &str) -> Result<Daemon> {
        let d = Self::spawn(netns, node, datastore, extra)?;
        d.wait_in_sync()?;
        Ok(d)
    }

    fn wait_in_sync(&self) -> Result<()> {
        let started = Instant::now();
        while !self.status().map(|s| s.in_sync).unwrap_or(false) {
            if started.elapsed() > Duration::from_secs(120) {
                bail!("daemon not in sync:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Started, not yet in sync.
    fn spawn(netns: &Path, node: &str, datastore: &Path, extra: &str) -> Result<Daemon> {
        Self::spawn_under(&[], netns, node, datastore, extra)
    }

    /// Started under `wrapper` (e.g. `heaptrack -o FILE`), not yet in sync.
    fn spawn_under(
        wrapper: &[&str],
        netns: &Path,
        node: &str,
        datastore: &Path,
        extra: &str,
    ) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("status.sock");
        let log = dir.path().join("agent.log");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "node_name = \"{node}\"\ndevices = [\"{DEVICE}\"]\n{extra}\n[datastore]\nsource = \"file\"\npath = \"{}\"\n[status]\nsocket = \"{}\"\n[metrics]\nlisten = \"off\"\n",
                datastore.display(),
                socket.display()
            ),
        )?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(watchdog_bin());
                c
            }
            None => Command::new(watchdog_bin()),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&config)
            .arg("--netns")
            .arg(netns)
            .env("WATCHDOG_LOG", "info,netlink_packet_route=error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting watchdog run (build it with --release first)")?;
        let d = Daemon {
            child,
            socket,
            log,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            _dir: dir,
        };
        Ok(d)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> Result<Status> {
        Ok(self
            .rt
            .block_on(client::fetch_status(&self.socket, Duration::from_secs(10)))?)
    }

    fn findings(&self) -> Result<Vec<Finding>> {
        let body = self.rt.block_on(client::fetch(
            &self.socket,
            "/findings",
            Duration::from_secs(10),
        ))?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Polls `/findings` until `pred`; returns the elapsed time since `from`.
    fn wait(
        &self,
        from: Instant,
        timeout: Duration,
        pred: impl Fn(&[Finding]) -> bool,
    ) -> Result<Duration> {
        loop {
            if pred(&self.findings()?) {
                return Ok(from.elapsed());
            }
            if from.elapsed() > timeout {
                bail!("condition not met within {timeout:?}");
            }
            // A poller that never sleeps takes one of the two cores from the daemon (and the
            // churn's writer); 50 µs between polls bounds what it adds to a measure.
            std::thread::sleep(POLL_GAP);
        }
    }

    /// (RSS bytes, CPU ticks utime+stime) from /proc.
    fn proc_usage(&self) -> Result<(u64, u64)> {
        let rss_kb = self.proc_status_kb("VmRSS")?;
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let after = &stat[stat.rfind(')').context("stat")? + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
        Ok((rss_kb * 1024, ticks))
    }
}

impl Daemon {
    /// A `kB` field of /proc/PID/status (VmRSS, RssAnon, RssFile, VmHWM…).
    fn proc_status_kb(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("{field} in /proc/PID/status"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /status` every 5 ms from another thread while the daemon works: what an operator's
/// `watchdog status` waits. Connection failures before the socket exists are not latencies.
struct StatusProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl StatusProbe {
    fn start(socket: &Path) -> StatusProbe {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, socket) = (stop.clone(), socket.to_path_buf());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut took = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let ok = rt
                    .block_on(client::fetch(&socket, "/status", Duration::from_secs(10)))
                    .is_ok();
                if ok {
                    took.push(t.elapsed());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            took
        });
        StatusProbe { stop, thread }
    }

    /// Stops and returns (samples, p50, p99, max).
    fn finish(self) -> (usize, Duration, Duration, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut took = self.thread.join().expect("probe thread");
        took.sort();
        if took.is_empty() {
            return (0, Duration::ZERO, Duration::ZERO, Duration::ZERO);
        }
        (
            took.len(),
            percentile(&took, 0.5),
            percentile(&took, 0.99),
            *took.last().unwrap(),
        )
    }
}

fn probe_line(what: &str, (n, p50, p99, max): (usize, Duration, Duration, Duration)) -> String {
    format!(
        "{what}: {n} requests, p50 {}, p99 {}, max {}",
        ms(p50),
        ms(p99),
        ms(max)
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// 1. Detection latency on the incident lab.
fn latency(rounds: usize, out: &mut String) -> Result<()> {
    let mut lab = Lab::build(LabSpec::incident())?;
    let datastore = lab.write_datastore()?;
    let netns = lab.netns_path("k8s01");
    let d = Daemon::start(&netns, "k8s01", &datastore, "")?;
    let ns = lab.node("k8s01").netns.clone();
    let bad = [
        "route",
        "replace",
        "10.1.235.128/26",
        "via",
        "10.1.235.128",
        "dev",
        DEVICE,
        "onlink",
    ];
    let good = [
        "route",
        "replace",
        "10.1.235.128/26",
        "via",
        "10.1.235.133",
        "dev",
        DEVICE,
        "onlink",
    ];
    let ip = |args: &[&str]| -> Result<()> {
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full, None)
    };
    let (mut detect, mut clear) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ip(&bad)?;
        let t = Instant::now();
        detect.push(d.wait(t, Duration::from_secs(5), |f| !f.is_empty())?);
        ip(&good)?;
        let t = Instant::now();
        clear.push(d.wait(t, Duration::from_secs(5), |f| f.is_empty())?);
    }
    detect.sort();
    clear.sort();
    let status = d.status()?;
    writeln!(
        out,
        "detection latency ({rounds} injections, route replace → finding in GET /findings):\n  \
         detect p50 {}  p99 {}  max {}\n  clear  p50 {}  p99 {}  max {}\n  \
         (resyncs during the run: {}, overruns: {})",
        ms(percentile(&detect, 0.5)),
        ms(percentile(&detect, 0.99)),
        ms(*detect.last().unwrap()),
        ms(percentile(&clear, 0.5)),
        ms(percentile(&clear, 0.99)),
        ms(*clear.last().unwrap()),
        status.resync.count,
        status.resync.overruns,
    )?;
    Ok(())
}

/// `perf record` of the daemon while it lives, when `BENCH_PERF` names a file (`suffix`
/// appended).
struct Perf(Option<Child>);

impl Perf {
    fn start(d: &Daemon, suffix: &str) -> Result<Perf> {
        let Some(file) = std::env::var_os("BENCH_PERF") else {
            return Ok(Perf(None));
        };
        let mut file = file;
        file.push(suffix);
        let child = Command::new("perf")
            .args(["record", "--call-graph", "dwarf,32768", "-F", "1000", "-o"])
            .arg(file)
            .arg("-p")
            .arg(d.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (apt-get install linux-perf)")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(Perf(Some(child)))
    }

    fn stop(self) -> Result<()> {
        if let Some(mut child) = self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            child.wait()?;
        }
        Ok(())
    }
}

struct ScaleLatency {
    detect_p50: Duration,
    detect_p99: Duration,
    detect_max: Duration,
    clear_p50: Duration,
    clear_p99: Duration,
}

/// `rounds` times: a block route of a peer (a different one each time) replaced via an
/// address that is nobody's VTEP, until the finding shows; then restored, until none.
fn detect_at_scale(d: &Daemon, ns: &Netns, peers: usize, rounds: usize) -> Result<ScaleLatency> {
    let (mut detect, mut clear) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let p = (i * 7919) % peers;
        let base = 0x0a40_0000u32 + ((p * BLOCKS) as u32) * 64;
        let block = format!("{}/26", std::net::Ipv4Addr::from(base));
        let vtep = std::net::Ipv4Addr::from(base).to_string();
        let wrong = std::net::Ipv4Addr::from(base + 63).to_string();
        let route = |via: &str| -> Result<()> {
            sh(
                "ip",
                &[
                    "-n", &ns.0, "route", "replace", &block, "via", via, "dev", DEVICE, "onlink",
                ],
                None,
            )
        };
        route(&wrong)?;
        let t = Instant::now();
        detect.push(d.wait(t, Duration::from_secs(10), |f| !f.is_empty())?);
        route(&vtep)?;
        let t = Instant::now();
        clear.push(d.wait(t, Duration::from_secs(10), |f| f.is_empty())?);
    }
    detect.sort();
    clear.sort();
    Ok(ScaleLatency {
        detect_p50: percentile(&detect, 0.5),
        detect_p99: percentile(&detect, 0.99),
        detect_max: *detect.last().expect("rounds > 0"),
        clear_p50: percentile(&clear, 0.5),
        clear_p99: percentile(&clear, 0.99),
    })
}

/// Unrelated route churn: `/32`s on `lo` added then deleted, `per_second` events a second,
/// through one `ip -batch` reading a pipe (no process per write).
struct Churn {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<f64>>,
}

impl Churn {
    fn start(ns: &Netns, per_second: u32) -> Result<Churn> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["-n", &ns.0, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ip -batch for the churn")?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<f64> {
            let mut stdin = child.stdin.take().context("ip stdin")?;
            let started = Instant::now();
            let (mut written, tick) = (0u64, Duration::from_millis(10));
            let per_tick = (per_second / 100).max(1) as u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut lines = String::new();
                for _ in 0..per_tick {
                    // 500 routes added, then the same 500 deleted: every line is one event.
                    let (round, i) = (written / 500, written % 500);
                    let verb = if round % 2 == 0 { "add" } else { "del" };
                    let _ = writeln!(
                        lines,
                        "route {verb} 10.200.{}.{}/32 dev lo",
                        i / 250,
                        i % 250
                    );
                    written += 1;
                }
                stdin.write_all(lines.as_bytes())?;
                let due = started + tick * (written / per_tick) as u32;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            let rate = written as f64 / started.elapsed().as_secs_f64();
            drop(stdin);
            child.wait()?;
            Ok(rate)
        });
        // Let the churn reach its pace before measuring.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Churn { stop, thread })
    }

    /// Stops; returns the rate written.
    fn stop(self) -> Result<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"))?
    }
}

/// 2–4 on a synthetic node with `peers` peers × 6 blocks.
fn scale(peers: usize, out: &mut String) -> Result<()> {
    let node = SyntheticNode::new(peers, BLOCKS)?;
    let ns = Netns::new(format!("wdbenchd{}", std::process::id()))?;
    let netns = ns.path();
    // Routes are written later, while the daemon runs.
    node.program(&ns, false)?;
    let dir = tempfile::tempdir()?;
    let datastore = dir.path().join("nodes.yaml");
    std::fs::write(&datastore, &node.yaml)?;
    let total_routes = peers * BLOCKS;

    // 2. Throughput: the daemon starts with every route missing; the routes are written while
    // it runs; done when its findings are exactly the healthy node's (none).
    // Status latency while the daemon starts: eBPF load (verifier), first dump, datastore.
    let d = Daemon::spawn(&netns, "local", &datastore, "")?;
    let probe = StatusProbe::start(&d.socket);
    d.wait_in_sync()?;
    let startup = probe.finish();
    let peak_at_startup = d.proc_status_kb("VmHWM")?;
    let missing = d.findings()?.len();
    let perf = Perf::start(&d, "")?;
    let t = Instant::now();
    node.program_routes(&ns)?;
    let written = t.elapsed();
    let done = d.wait(t, Duration::from_secs(300), |f| f.is_empty())?;
    perf.stop()?;
    let status = d.status()?;
    // Baseline: the same daemon idle in the healthy state the resync phase has.
    let probe = StatusProbe::start(&d.socket);
    std::thread::sleep(Duration::from_secs(2));
    let idle_probe = probe.finish();
    writeln!(
        out,
        "event throughput ({peers} peers × {BLOCKS} blocks = {total_routes} routes added while running; {missing} findings before):\n  \
         kernel accepted the writes in {} ({:.0} routes/s); daemon exact (0 findings) {} after the first write, {} after the last\n  \
         → {:.0} route events/s processed end to end; overruns {}, resyncs {}",
        ms(written),
        total_routes as f64 / written.as_secs_f64(),
        ms(done),
        ms(done.saturating_sub(written)),
        total_routes as f64 / done.as_secs_f64(),
        status.resync.overruns,
        status.resync.count,
    )?;

    // 2b. Detection at scale: one peer's route made wrong and restored, with the whole
    // 5,000-peer model loaded, quiet and then under 1,000 unrelated route events/s.
    let rounds = env_usize("BENCH_SCALE_INJECTIONS", 100);
    let perf = Perf::start(&d, "-detect")?;
    let quiet = detect_at_scale(&d, &ns, peers, rounds)?;
    perf.stop()?;
    let churn = Churn::start(&ns, 1000)?;
    let busy = detect_at_scale(&d, &ns, peers, rounds)?;
    let churned = churn.stop()?;
    writeln!(
        out,
        "detection at {peers} peers ({rounds} injections each: a block route via a non-VTEP → finding in GET /findings, and back):\n  \
         quiet:       detect p50 {}  p99 {}  max {}; clear p50 {}  p99 {}\n  \
         under churn: detect p50 {}  p99 {}  max {}; clear p50 {}  p99 {}  ({:.0} unrelated route events/s written)\n  \
         → detect p99 under churn {:.2}× quiet",
        ms(quiet.detect_p50),
        ms(quiet.detect_p99),
        ms(quiet.detect_max),
        ms(quiet.clear_p50),
        ms(quiet.clear_p99),
        ms(busy.detect_p50),
        ms(busy.detect_p99),
        ms(busy.detect_max),
        ms(busy.clear_p50),
        ms(busy.clear_p99),
        churned,
        busy.detect_p99.as_secs_f64() / quiet.detect_p99.as_secs_f64(),
    )?;

    // 4. RSS and idle CPU with the whole model loaded (no events; default 60 s resync).
    std::thread::sleep(Duration::from_secs(1));
    let (_, ticks0) = d.proc_usage()?;
    let idle = Duration::from_secs(10);
    std::thread::sleep(idle);
    let (rss, ticks1) = d.proc_usage()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mib = |kb: u64| kb as f64 / 1024.0;
    let ebpf = d.status()?.ebpf;
    let ebpf = match ebpf.error {
        Some(e) => format!("eBPF off: {e}"),
        None => format!("eBPF attached: {}", ebpf.attached.join(", ")),
    };
    writeln!(
        out,
        "footprint at {peers} peers ({total_routes} routes; {ebpf}):\n  RSS {:.1} MiB (anonymous {:.1}, file-backed {:.1}; peak {:.1}, of which {:.1} reached by startup: eBPF load, first dump, datastore), idle CPU {:.2}% of one core over {}s",
        rss as f64 / (1024.0 * 1024.0),
        mib(d.proc_status_kb("RssAnon")?),
        mib(d.proc_status_kb("RssFile")?),
        mib(d.proc_status_kb("VmHWM")?),
        mib(peak_at_startup),
        (ticks1 - ticks0) as f64 / hz / idle.as_secs_f64() * 100.0,
        idle.as_secs()
    )?;
    drop(d);

    // 3. Resync vs raw dump: periodic resyncs every second, durations from the daemon's log;
    // the raw dump measured in between, same namespace.
    let d = Daemon::start(&netns, "local", &datastore, "resync_interval = \"1s\"")?;
    let probe = StatusProbe::start(&d.socket);
    let timing = resync_timing(&d, &netns, 7)?;
    let resyncing = probe.finish();
    writeln!(
        out,
        "status API latency (GET /status every 5 ms) at {peers} peers, baseline idle first:\n  {}\n  {}\n  {}",
        probe_line("idle", idle_probe),
        probe_line("during startup (eBPF load + verifier, first dump, datastore)", startup),
        probe_line("during 1-per-second full resyncs", resyncing),
    )?;
    let ResyncTiming {
        resyncs,
        dumps,
        raw_m,
        same_m,
        snap_m,
        kernel_m,
        full_m,
    } = timing;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    writeln!(
        out,
        "resync at {total_routes} routes (median of {} resyncs vs {} raw dumps each):\n  \
         raw dumps of what a resync reads (addresses, routes, neighbours, FDB; parsed, dropped) {}; raw route dump alone {}\n  \
         resync kernel part (those dumps → model) {} = {:.2}× the same raw dumps, {:.2}× the route dump alone\n  \
         the same snapshot code run by the benchmark between its raw dumps {} = {:.2}× the raw dumps\n  \
         with the datastore re-read ({peers} nodes; unchanged file skipped) {} = {:.2}× the same raw dumps",
        resyncs,
        dumps,
        ms(same_m),
        ms(raw_m),
        ms(kernel_m),
        ratio(kernel_m, same_m),
        ratio(kernel_m, raw_m),
        ms(snap_m),
        ratio(snap_m, same_m),
        ms(full_m),
        ratio(full_m, same_m),
    )?;
    Ok(())
}

/// Medians of the daemon's periodic resyncs (from its log) and of raw dumps of the same
/// namespace taken in between.
struct ResyncTiming {
    resyncs: usize,
    dumps: usize,
    /// The route dump alone.
    raw_m: Duration,
    /// Every dump a resync makes (addresses, routes, neighbours, FDB), parsed and dropped.
    same_m: Duration,
    /// The snapshot (those dumps into the model) run by the benchmark itself, alternating
    /// with the raw dumps: the same code as the resync's kernel part without the daemon's
    /// other work around it.
    snap_m: Duration,
    /// The resync's kernel part: those dumps into the model.
    kernel_m: Duration,
    /// The whole resync (with the datastore re-read).
    full_m: Duration,
}

/// `dumps` rounds of raw dumps while `d` (started with `resync_interval = "1s"`) resyncs.
fn resync_timing(d: &Daemon, netns: &Path, dumps: usize) -> Result<ResyncTiming> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let observer = rt.block_on(async { NetlinkObserver::new(Some(netns)) })?;
    let devices = [DEVICE.to_string()];
    let (mut raw, mut same, mut snap) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..dumps {
        let t = Instant::now();
        rt.block_on(observer.dump_route_count())?;
        raw.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        rt.block_on(observer.dump_all_count())?;
        same.push(t.elapsed());
        // The snapshot code the resync runs, in this process right after the same dumps.
        let t = Instant::now();
        drop(rt.block_on(observer.snapshot(&devices))?);
        snap.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = d.log();
    let (mut kernel, mut full) = (Vec::new(), Vec::new());
    for line in log
        .lines()
        .filter(|l| l.contains("full resync") && l.contains("periodic"))
    {
        let field = |name: &str| -> Option<Duration> {
            let v = line
                .split(&format!(" {name}="))
                .nth(1)?
                .split_whitespace()
                .next()?;
            Some(Duration::from_secs_f64(
                v.trim_matches('"').parse::<f64>().ok()? / 1e3,
            ))
        };
        if let (Some(k), Some(f)) = (field("kernel_ms"), field("ms")) {
            kernel.push(k);
            full.push(f);
        }
    }
    if kernel.is_empty() {
        bail!("no periodic resync in the daemon log:\n{log}");
    }
    for v in [&mut raw, &mut same, &mut snap, &mut kernel, &mut full] {
        v.sort();
    }
    Ok(ResyncTiming {
        resyncs: kernel.len(),
        dumps: raw.len(),
        raw_m: percentile(&raw, 0.5),
        same_m: percentile(&same, 0.5),
        snap_m: percentile(&snap, 0.5),
        kernel_m: percentile(&kernel, 0.5),
        full_m: percentile(&full, 0.5),
    })
}

/// Goal 4's table: resync time and memory from 1,000 to 100,000 routes (`BENCH_GROWTH`, a
/// comma-separated list of route counts; empty to skip). Each size is a fresh node of
/// routes / 6 peers, its daemon resyncing every second.
fn resync_growth(out: &mut String) -> Result<()> {
    let sizes: Vec<usize> = std::env::var("BENCH_GROWTH")
        .unwrap_or_else(|_| "1000,10000,30000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if sizes.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "resync growth (fresh node per size, routes / 6 peers; medians of ~5 periodic resyncs):\n  \
         {:>7}  {:>9}  {:>11}  {:>6}  {:>9}  {:>9}  {:>9}  {:>11}  {:>6}",
        "routes", "raw dumps", "resync kern", "ratio", "µs/route", "RSS MiB", "anon MiB",
        "in-process", "ratio"
    )?;
    for routes in sizes {
        let peers = (routes / BLOCKS).max(1);
        let node = SyntheticNode::new(peers, BLOCKS)?;
        let ns = Netns::new(format!("wdgrow{}x{routes}", std::process::id()))?;
        node.program(&ns, true)?;
        let dir = tempfile::tempdir()?;
        let datastore = dir.path().join("nodes.yaml");
        std::fs::write(&datastore, &node.yaml)?;
        let d = Daemon::start(&ns.path(), "local", &datastore, "resync_interval = \"1s\"")?;
        let t = resync_timing(&d, &ns.path(), 5)?;
        let (rss, _) = d.proc_usage()?;
        let anon = d.proc_status_kb("RssAnon")?;
        let n = peers * BLOCKS;
        writeln!(
            out,
            "  {n:>7}  {:>9}  {:>11}  {:>5.2}×  {:>9.2}  {:>9.1}  {:>9.1}  {:>11}  {:>5.2}×",
            ms(t.same_m),
            ms(t.kernel_m),
            t.kernel_m.as_secs_f64() / t.same_m.as_secs_f64(),
            t.kernel_m.as_secs_f64() * 1e6 / n as f64,
            rss as f64 / (1024.0 * 1024.0),
            anon as f64 / 1024.0,
            ms(t.snap_m),
            t.snap_m.as_secs_f64() / t.same_m.as_secs_f64(),
        )?;
    }
    Ok(())
}

/// One synthetic peer's kernel state and datastore entry, as [`SyntheticNode`] lays them out
/// (peer `p`: blocks from 10.64.0.0 + p × 6 × 64, VTEP the first block's base).
struct ChurnPeer {
    neigh: String,
    routes: Vec<String>,
    fdb: String,
    yaml: String,
    vtep: String,
    mac: String,
}

impl ChurnPeer {
    fn new(p: usize, name: &str) -> ChurnPeer {
        let node_ip = std::net::Ipv4Addr::from(0xac10_0000u32 + 2 + p as u32);
        let mac = dataplane_watchdog::model::MacAddr::derive_like_felix(name).to_string();
        let nets: Vec<String> = (0..BLOCKS)
            .map(|b| {
                let base = 0x0a40_0000u32 + ((p * BLOCKS + b) as u32) * 64;
                format!("{}/26", std::net::Ipv4Addr::from(base))
            })
            .collect();
        let vtep = nets[0].trim_end_matches("/26").to_string();
        ChurnPeer {
            neigh: format!("neigh replace {vtep} lladdr {mac} dev {DEVICE} nud permanent"),
            routes: nets
                .iter()
                .map(|n| format!("route replace {n} via {vtep} dev {DEVICE} onlink"))
                .collect(),
            fdb: format!("fdb replace {mac} dev {DEVICE} dst {node_ip} self permanent"),
            yaml: format!(
                "  - name: {name}\n    node_ip: {node_ip}\n    vtep_ip: {vtep}\n    blocks: [{}]\n",
                nets.join(", ")
            ),
            vtep,
            mac,
        }
    }
}

/// Goal 5: the daemon's memory over `secs` of churn on a 1,000-peer node: every 2 s one peer
/// leaves (its routes, neighbour and FDB entry removed, the datastore rewritten without it)
/// and a new one joins; every 60 s the overlay device is deleted and re-created with
/// everything on it. RSS sampled every 10 s; summarised as first/min/max/last and the slope
/// over the second half (flat is the expectation).
fn churn(secs: u64, out: &mut String) -> Result<()> {
    let peers = env_usize("BENCH_CHURN_PEERS", 1000);
    let node = SyntheticNode::new(peers, BLOCKS)?;
    let ns = Netns::new(format!("wdchurn{}", std::process::id()))?;
    node.program(&ns, true)?;
    let dir = tempfile::tempdir()?;
    let datastore = dir.path().join("nodes.yaml");
    let header = "nodes:\n  - name: local\n    node_ip: 172.16.0.1\n    vtep_ip: 10.63.255.192\n    blocks: [10.63.255.192/26]\n";
    let mut live: std::collections::VecDeque<(usize, String)> =
        (0..peers).map(|p| (p, format!("node{p}"))).collect();
    let write_datastore = |live: &std::collections::VecDeque<(usize, String)>| -> Result<()> {
        let mut yaml = header.to_string();
        for (p, name) in live {
            yaml.push_str(&ChurnPeer::new(*p, name).yaml);
        }
        let tmp = datastore.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &datastore)?;
        Ok(())
    };
    write_datastore(&live)?;
    let d = Daemon::start(&ns.path(), "local", &datastore, "")?;
    let ip_batch = |lines: &str| sh("ip", &["-n", &ns.0, "-batch", "-"], Some(lines));
    let bridge_batch = |lines: &str| sh("bridge", &["-n", &ns.0, "-batch", "-"], Some(lines));
    let started = Instant::now();
    let (mut samples, mut next_sample) = (Vec::new(), Duration::ZERO);
    let (mut joined, mut recreated, mut next_recreate) = (0usize, 0usize, Duration::from_secs(60));
    let mut next_index = peers;
    while started.elapsed() < Duration::from_secs(secs) {
        // One leaves (the oldest), one joins.
        if let Some((p, name)) = live.pop_front() {
            let gone = ChurnPeer::new(p, &name);
            let mut lines = String::new();
            for r in &gone.routes {
                lines.push_str(&r.replacen("route replace", "route del", 1));
                lines.push('\n');
            }
            lines.push_str(&format!("neigh del {} dev {DEVICE}\n", gone.vtep));
            ip_batch(&lines)?;
            bridge_batch(&format!("fdb del {} dev {DEVICE}\n", gone.mac))?;
        }
        let name = format!("join{next_index}");
        let new = ChurnPeer::new(next_index, &name);
        ip_batch(&format!("{}\n{}\n", new.neigh, new.routes.join("\n")))?;
        bridge_batch(&format!("{}\n", new.fdb))?;
        live.push_back((next_index, name));
        next_index += 1;
        joined += 1;
        write_datastore(&live)?;
        if started.elapsed() >= next_recreate {
            // The device re-created (a Felix restart, an operator): everything reprogrammed.
            let mut lines = format!("link del {DEVICE}\n");
            lines.push_str(&format!(
                "link add {DEVICE} address {} type vxlan id 4096 dstport 4789 nolearning\naddr add 10.63.255.192/32 dev {DEVICE}\nlink set {DEVICE} up\n",
                dataplane_watchdog::model::MacAddr::derive_like_felix("local")
            ));
            let mut fdb = String::new();
            for (p, name) in &live {
                let c = ChurnPeer::new(*p, name);
                lines.push_str(&format!("{}\n{}\n", c.neigh, c.routes.join("\n")));
                fdb.push_str(&format!("{}\n", c.fdb));
            }
            ip_batch(&lines)?;
            bridge_batch(&fdb)?;
            recreated += 1;
            next_recreate += Duration::from_secs(60);
        }
        if started.elapsed() >= next_sample {
            let anon = d.proc_status_kb("RssAnon")?;
            let (rss, _) = d.proc_usage()?;
            samples.push((
                started.elapsed(),
                rss as f64 / 1048576.0,
                anon as f64 / 1024.0,
            ));
            next_sample += Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    // Healthy at the end: exactly the datastore's state, no findings.
    d.wait(Instant::now(), Duration::from_secs(120), |f| f.is_empty())?;
    let status = d.status()?;
    let (first, last) = (samples[0], *samples.last().expect("samples"));
    let min = samples.iter().map(|s| s.1).fold(f64::MAX, f64::min);
    let max = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    // Least-squares slope over the second half, MiB per hour.
    let half = &samples[samples.len() / 2..];
    let n = half.len() as f64;
    let (sx, sy) = half
        .iter()
        .fold((0.0, 0.0), |(x, y), s| (x + s.0.as_secs_f64(), y + s.1));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = half.iter().fold((0.0, 0.0), |(a, b), s| {
        let dx = s.0.as_secs_f64() - mx;
        (a + dx * (s.1 - my), b + dx * dx)
    });
    let slope = if den > 0.0 { num / den * 3600.0 } else { 0.0 };
    writeln!(
        out,
        "churn for {secs} s at {peers} peers ({joined} joins and as many leaves, device re-created {recreated} times; {} RSS samples):\n  \
         RSS first {:.1} MiB (anonymous {:.1}), min {min:.1}, max {max:.1}, last {:.1} (anonymous {:.1}); second-half slope {slope:+.2} MiB/hour\n  \
         at the end: 0 findings, resyncs {}, overruns {}",
        samples.len(),
        first.1,
        first.2,
        last.1,
        last.2,
        status.resync.count,
        status.resync.overruns,
    )?;
    Ok(())
}

/// `--heap-profile FILE`: the daemon under `heaptrack` through the 5,000-peer startup (5,000
/// findings open) and the 30,000-route storm, then stopped with SIGTERM; `heaptrack_print FILE`
/// says which allocations make the peak and what stays. Memory figures of this run are the
/// wrapper's, so it measures nothing else.
fn heap_profile(peers: usize, file: &str) -> Result<()> {
    let node = SyntheticNode::new(peers, BLOCKS)?;
    let ns = Netns::new(format!("wdbenchh{}", std::process::id()))?;
    node.program(&ns, false)?;
    let dir = tempfile::tempdir()?;
    let datastore = dir.path().join("nodes.yaml");
    std::fs::write(&datastore, &node.yaml)?;
    let d = Daemon::spawn_under(
        &["heaptrack", "-o", file],
        &ns.path(),
        "local",
        &datastore,
        "",
    )?;
    d.wait_in_sync()?;
    let t = Instant::now();
    node.program_routes(&ns)?;
    d.wait(t, Duration::from_secs(300), |f| f.is_empty())?;
    std::thread::sleep(Duration::from_secs(3));
    // The daemon is the wrapper's child: stop it so heaptrack writes its summary.
    let pid = d.child.id().to_string();
    sh("pkill", &["-TERM", "-P", &pid], None)?;
    let mut d = d;
    d.child.wait()?;
    println!("heap profile written next to {file} (heaptrack_print <file>.zst)");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(file) = args
        .iter()
        .position(|a| a == "--heap-profile")
        .and_then(|i| args.get(i + 1))
    {
        return heap_profile(env_usize("BENCH_PEERS", 5000), file);
    }
    if std::env::args().any(|a| a == "--churn") {
        let secs = env_usize("BENCH_CHURN_SECS", 3600) as u64;
        let mut out = String::new();
        churn(secs, &mut out)?;
        print!("{out}");
        return Ok(());
    }
    if std::env::args().any(|a| a == "--growth") {
        let mut growth = String::new();
        resync_growth(&mut growth)?;
        print!("{growth}");
        return Ok(());
    }
    let rounds = env_usize("BENCH_INJECTIONS", 1000);
    let peers = env_usize("BENCH_PEERS", 5000);
    let mut out = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    writeln!(
        out,
        "machine: {} CPUs, {cpu}; kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    )?;
    latency(rounds, &mut out)?;
    print!("{out}");
    let mut rest = String::new();
    scale(peers, &mut rest)?;
    print!("{rest}");
    let mut growth = String::new();
    resync_growth(&mut growth)?;
    print!("{growth}");
    Ok(())
}
