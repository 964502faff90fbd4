//! Fallback drop accounting when eBPF is unavailable: the devices' own counters
//! (`IFLA_STATS64` over rtnetlink). Coarse — no reason, no peer — but VXLAN counts a packet it
//! cannot send (no FDB entry) in `tx_dropped`, so a blackhole still shows up as a rising number.

use std::{fs::File, os::fd::AsRawFd, path::Path};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use serde::Serialize;

use super::EbpfError;

/// Kernel drop/error counters of one device, since it was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkDropStats {
    pub ifindex: u32,
    pub name: String,
    pub tx_dropped: u64,
    pub rx_dropped: u64,
    pub tx_errors: u64,
}

/// Extracts the counters from link messages (pure; messages without stats are skipped).
pub fn link_drop_stats(messages: &[LinkMessage]) -> Vec<LinkDropStats> {
    messages
        .iter()
        .filter_map(|m| {
            let mut name = None;
            let mut stats = None;
            for attr in &m.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Stats64(s) => stats = Some(s),
                    _ => {}
                }
            }
            let stats = stats?;
            Some(LinkDropStats {
                ifindex: m.header.index,
                name: name.unwrap_or_default(),
                tx_dropped: stats.tx_dropped,
                rx_dropped: stats.rx_dropped,
                tx_errors: stats.tx_errors,
            })
        })
        .collect()
}

/// Dumps every link's counters in the network namespace at `netns` (None: our own). The dump
/// runs on a short-lived thread that enters the namespace, so the caller's thread never moves.
pub fn read_link_drop_stats(netns: Option<&Path>) -> Result<Vec<LinkDropStats>, EbpfError> {
    let netns = netns.map(Path::to_path_buf);
    std::thread::spawn(move || -> Result<Vec<LinkDropStats>, std::io::Error> {
        if let Some(path) = netns {
            let file = File::open(&path)?;
            // SAFETY: setns on a valid fd affects only this thread, which ends after the dump.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(link_drop_stats(&dump_links()?))
    })
    .join()
    .map_err(|_| EbpfError::LinkStats(std::io::Error::other("link dump thread panicked")))?
    .map_err(EbpfError::LinkStats)
}

fn dump_links() -> Result<Vec<LinkMessage>, std::io::Error> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    request.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut links = Vec::new();
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&receive[offset..size])
                    .map_err(|e| std::io::Error::other(format!("bad netlink message: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(links),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("link dump refused: {e:?}")))
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    links.push(link)
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::Stats64;

    use super::*;

    #[test]
    fn extracts_named_counters_and_skips_links_without_stats() {
        let mut with = LinkMessage::default();
        with.header.index = 7;
        with.attributes
            .push(LinkAttribute::IfName("vxlan.calico".into()));
        // Stats64 is non_exhaustive: fill a default.
        let mut counters = Stats64::default();
        counters.tx_dropped = 12;
        counters.rx_dropped = 3;
        counters.tx_errors = 1;
        with.attributes.push(LinkAttribute::Stats64(counters));
        let mut without = LinkMessage::default();
        without.header.index = 8;
        let stats = link_drop_stats(&[with, without]);
        assert_eq!(
            stats,
            vec![LinkDropStats {
                ifindex: 7,
                name: "vxlan.calico".into(),
                tx_dropped: 12,
                rx_dropped: 3,
                tx_errors: 1
            }]
        );
    }

    #[test]
    fn reads_loopback_in_own_namespace() {
        let stats = read_link_drop_stats(None).expect("link dump works unprivileged");
        assert!(
            stats.iter().any(|s| s.name == "lo" && s.ifindex == 1),
            "{stats:?}"
        );
    }
}
