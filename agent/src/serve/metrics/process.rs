//! Standard, unprefixed `process_*` metrics read from /proc/self on every scrape, so stock
//! dashboards work.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

/// Reads /proc/self on every scrape.
#[derive(Debug)]
pub(super) struct ProcessCollector;

/// The fields of /proc/self/stat we export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    utime_ticks: u64,
    stime_ticks: u64,
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

/// Parse /proc/<pid>/stat. Fields are counted after the last `)`, since the command name in
/// parentheses may itself contain spaces and parentheses.
fn parse_proc_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" comes field 3 (state); field N is at index N - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        utime_ticks: get(14)?,
        stime_ticks: get(15)?,
        start_ticks: get(22)?,
        vsize_bytes: get(23)?,
        rss_pages: get(24)?,
    })
}

/// `btime` (boot time, seconds since the epoch) from /proc/stat.
fn parse_btime(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_proc_stat(&s))
        else {
            return Ok(());
        };
        // SAFETY: sysconf has no memory-safety preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let page = if page > 0 { page as u64 } else { 4096 };

        let cpu = ConstCounter::new((stat.utime_ticks + stat.stime_ticks) as f64 / ticks);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let rss = ConstGauge::new((stat.rss_pages * page) as i64);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory",
            "Resident memory size",
            Some(&Unit::Bytes),
            rss.metric_type(),
        )?)?;
        let vsize = ConstGauge::new(stat.vsize_bytes as i64);
        vsize.encode(encoder.encode_descriptor(
            "process_virtual_memory",
            "Virtual memory size",
            Some(&Unit::Bytes),
            vsize.metric_type(),
        )?)?;
        if let Some(btime) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_btime(&s))
        {
            let start = ConstGauge::new(btime as f64 + stat.start_ticks as f64 / ticks);
            start.encode(encoder.encode_descriptor(
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(&Unit::Seconds),
                start.metric_type(),
            )?)?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let open = ConstGauge::new(fds.count() as i64);
            open.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                open.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_odd_command_names() {
        let stat = "1234 (we ird) (name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 4 0 98765 123456789 2048 18446744073709551615";
        let p = parse_proc_stat(stat).unwrap();
        assert_eq!(
            p,
            ProcStat {
                utime_ticks: 250,
                stime_ticks: 50,
                start_ticks: 98765,
                vsize_bytes: 123456789,
                rss_pages: 2048
            }
        );
        assert!(parse_proc_stat("garbage").is_none());
        assert_eq!(parse_btime("cpu 1 2\nbtime 1700000000\n"), Some(1700000000));
    }
}
