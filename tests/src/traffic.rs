//! Real pod-to-pod packets: a UDP sender thread in one node's namespace, a receiver thread in
//! another's, every packet tagged with a per-run nonce so nothing from another run is counted.

use std::{
    collections::HashSet,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{lab::Lab, sys};

const MAGIC: &[u8; 4] = b"WDL1";
const PAYLOAD_LEN: usize = 4 + 8 + 2 + 4;
/// Upper bound on the whole measurement, whatever happens.
const HARD_TIMEOUT: Duration = Duration::from_secs(10);

static NONCE: AtomicU64 = AtomicU64::new(0);

/// What one `src → dst` flow delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationReport {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Packets attempted (including those `sendto` refused).
    pub sent: u32,
    /// Distinct packets that arrived on a socket bound to `dst` with source `src`.
    pub received: u32,
    /// `sendto` failures (e.g. ENETUNREACH when the route is gone).
    pub send_errors: u32,
}

/// What a traffic run between two nodes delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficReport {
    pub from: String,
    pub to: String,
    pub sent: u32,
    pub received: u32,
    pub per_destination: Vec<DestinationReport>,
}

impl TrafficReport {
    pub fn all_delivered(&self) -> bool {
        self.sent > 0 && self.received == self.sent
    }

    pub fn none_delivered(&self) -> bool {
        self.received == 0
    }

    pub fn lost(&self) -> u32 {
        self.sent - self.received
    }
}

impl std::fmt::Display for TrafficReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {}: sent {}, received {} ({:.0}% delivered)",
            self.from,
            self.to,
            self.sent,
            self.received,
            if self.sent == 0 {
                0.0
            } else {
                100.0 * f64::from(self.received) / f64::from(self.sent)
            }
        )
    }
}

impl Lab {
    /// Sends `count` packets from the first pod of `from` to EVERY workload address of `to`
    /// (one pod per block and then some, plus borrowed addresses), and counts arrivals.
    pub fn traffic(&self, from: &str, to: &str, count: u32) -> Result<TrafficReport> {
        let src = *self
            .node(from)
            .pods
            .first()
            .ok_or_else(|| anyhow!("node {from} has no pod address"))?;
        let dsts = self.node(to).workload_ips();
        self.traffic_flows(from, src, to, &dsts, count)
    }

    /// `count` packets from `src` (an address in `from`) to each of `dsts` (addresses in `to`).
    pub fn traffic_flows(
        &self,
        from: &str,
        src: Ipv4Addr,
        to: &str,
        dsts: &[Ipv4Addr],
        count: u32,
    ) -> Result<TrafficReport> {
        if dsts.is_empty() {
            bail!("traffic {from} -> {to}: no destination");
        }
        let counts = measure(
            self.netns_path(from),
            src.into(),
            self.netns_path(to),
            dsts.iter().map(|d| IpAddr::V4(*d)).collect(),
            count,
            self.traffic_grace,
        )
        .with_context(|| format!("traffic {from} ({src}) -> {to}"))?;
        let per: Vec<DestinationReport> = dsts
            .iter()
            .zip(counts)
            .map(|(dst, c)| DestinationReport {
                src,
                dst: *dst,
                sent: c.sent,
                received: c.received,
                send_errors: c.send_errors,
            })
            .collect();
        Ok(TrafficReport {
            from: from.to_string(),
            to: to.to_string(),
            sent: per.iter().map(|d| d.sent).sum(),
            received: per.iter().map(|d| d.received).sum(),
            per_destination: per,
        })
    }

    /// [`Lab::traffic`] for every ordered pair of distinct nodes, run concurrently.
    pub fn traffic_matrix(&self, count: u32) -> Result<Vec<TrafficReport>> {
        let pairs: Vec<(&str, &str)> = self
            .nodes()
            .iter()
            .flat_map(|a| {
                self.nodes()
                    .iter()
                    .filter(move |b| b.name != a.name)
                    .map(move |b| (a.name.as_str(), b.name.as_str()))
            })
            .collect();
        thread::scope(|s| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|(a, b)| s.spawn(move || self.traffic(a, b, count)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("traffic thread panicked"))?)
                .collect()
        })
    }
}

/// Per destination, in order: what was sent, what arrived, what `sendto` refused.
pub(crate) struct Counts {
    pub(crate) sent: u32,
    pub(crate) received: u32,
    pub(crate) send_errors: u32,
}

/// `count` packets from `src` in `from_ns` to each of `dsts` in `to_ns`, either family.
pub(crate) fn measure(
    from_ns: PathBuf,
    src: IpAddr,
    to_ns: PathBuf,
    dsts: Vec<IpAddr>,
    count: u32,
    grace: Duration,
) -> Result<Vec<Counts>> {
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32)
        ^ NONCE.fetch_add(1, Ordering::Relaxed);

    let (port_tx, port_rx) = mpsc::channel::<Result<u16>>();
    let (deadline_tx, deadline_rx) = mpsc::channel::<Instant>();
    let n_dst = dsts.len();
    let recv_dsts = dsts.clone();
    let receiver = thread::spawn(move || -> Result<Vec<u32>> {
        let sockets = match bind_receivers(&to_ns, &recv_dsts) {
            Ok((port, socks)) => {
                let _ = port_tx.send(Ok(port));
                socks
            }
            Err(e) => {
                let _ = port_tx.send(Err(anyhow!("{e:#}")));
                return Err(e);
            }
        };
        receive(&sockets, src, nonce, count, deadline_rx)
    });
    let port = match port_rx.recv() {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(e.context("receiver setup")),
        Err(_) => bail!("receiver thread died during setup"),
    };

    let send_dsts = dsts.clone();
    let sender = thread::spawn(move || -> Result<Vec<u32>> {
        sys::enter_netns(&from_ns)?;
        let sock = UdpSocket::bind(SocketAddr::new(src, 0))
            .with_context(|| format!("bind sender to {src}"))?;
        let mut errors = vec![0u32; send_dsts.len()];
        for seq in 0..count {
            for (i, dst) in send_dsts.iter().enumerate() {
                let payload = encode(nonce, i as u16, seq);
                if sock.send_to(&payload, SocketAddr::new(*dst, port)).is_err() {
                    errors[i] += 1;
                }
            }
        }
        Ok(errors)
    });
    let send_result = sender.join().map_err(|_| anyhow!("sender thread panicked"));
    // Whatever the sender did, release the receiver.
    let _ = deadline_tx.send(Instant::now() + grace);
    let received = receiver
        .join()
        .map_err(|_| anyhow!("receiver thread panicked"))??;
    let errors = send_result??;
    Ok((0..n_dst)
        .map(|i| Counts {
            sent: count,
            received: received[i],
            send_errors: errors[i],
        })
        .collect())
}

/// One non-blocking socket per destination, all on the same port.
fn bind_receivers(netns: &std::path::Path, dsts: &[IpAddr]) -> Result<(u16, Vec<UdpSocket>)> {
    sys::enter_netns(netns)?;
    'retry: for _ in 0..20 {
        let first = UdpSocket::bind(SocketAddr::new(dsts[0], 0))
            .with_context(|| format!("bind receiver to {}", dsts[0]))?;
        let port = first.local_addr()?.port();
        let mut socks = vec![first];
        for dst in &dsts[1..] {
            match UdpSocket::bind(SocketAddr::new(*dst, port)) {
                Ok(s) => socks.push(s),
                Err(e) if e.kind() == ErrorKind::AddrInUse => continue 'retry,
                Err(e) => return Err(e).with_context(|| format!("bind receiver to {dst}")),
            }
        }
        for s in &socks {
            s.set_nonblocking(true)?;
        }
        return Ok((port, socks));
    }
    bail!("no common free UDP port for {} receivers", dsts.len())
}

fn receive(
    sockets: &[UdpSocket],
    src: IpAddr,
    nonce: u64,
    count: u32,
    deadline_rx: mpsc::Receiver<Instant>,
) -> Result<Vec<u32>> {
    let started = Instant::now();
    let expected = sockets.len() * count as usize;
    let mut seen: HashSet<(usize, u32)> = HashSet::new();
    let mut deadline: Option<Instant> = None;
    let mut buf = [0u8; 64];
    loop {
        for (i, s) in sockets.iter().enumerate() {
            loop {
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        // Only our run's packets from the expected source, on the socket of
                        // the destination they were addressed to.
                        if let Some((nn, idx, seq)) = decode(&buf[..n]) {
                            if nn == nonce && idx as usize == i && from.ip() == src && seq < count {
                                seen.insert((i, seq));
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("receive"),
                }
            }
        }
        if seen.len() == expected {
            break;
        }
        if deadline.is_none() {
            deadline = deadline_rx.try_recv().ok();
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) || now - started > HARD_TIMEOUT {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let mut per = vec![0u32; sockets.len()];
    for (i, _) in seen {
        per[i] += 1;
    }
    Ok(per)
}

fn encode(nonce: u64, idx: u16, seq: u32) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    p[..4].copy_from_slice(MAGIC);
    p[4..12].copy_from_slice(&nonce.to_be_bytes());
    p[12..14].copy_from_slice(&idx.to_be_bytes());
    p[14..18].copy_from_slice(&seq.to_be_bytes());
    p
}

fn decode(p: &[u8]) -> Option<(u64, u16, u32)> {
    if p.len() != PAYLOAD_LEN || &p[..4] != MAGIC {
        return None;
    }
    Some((
        u64::from_be_bytes(p[4..12].try_into().ok()?),
        u16::from_be_bytes(p[12..14].try_into().ok()?),
        u32::from_be_bytes(p[14..18].try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_rejects_foreign_data() {
        let p = encode(0xdead_beef_0102_0304, 7, 42);
        assert_eq!(decode(&p), Some((0xdead_beef_0102_0304, 7, 42)));
        assert_eq!(decode(&p[..10]), None);
        let mut q = p;
        q[0] = b'X';
        assert_eq!(decode(&q), None);
    }
}
