//! Writing the kernel objects of a [`Remedy`]: the [`KernelWriter`] seam beside the observer.
//! [`NetlinkWriter`] sends them as rtnetlink requests (never a shell); [`RecordingWriter`]
//! records them and applies them to an in-memory [`ObservedState`], so repair logic is unit
//! tested without root (Felix's dataplane shims).

use std::{future::Future, net::IpAddr, path::Path};

use futures::TryStreamExt;
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteProtocol, RouteScope},
};
use rtnetlink::RouteMessageBuilder;

use super::{connect, Error, NetlinkConn, Result};
use crate::{
    checks::MAIN_TABLE,
    model::{FdbEntry, MacAddr, NeighState, Neighbour, ObservedState, Remedy, Route, RouteKind},
};

/// Applies remedies to the kernel of one network namespace.
pub trait KernelWriter {
    /// Writes the remedy's kernel object; `Ok` once the kernel acknowledged it.
    fn write(&mut self, remedy: &Remedy) -> impl Future<Output = Result<()>> + Send;
}

/// rtnetlink requests in one namespace.
#[derive(Debug)]
pub struct NetlinkWriter {
    conn: NetlinkConn,
}

impl NetlinkWriter {
    /// Connect in `netns` (`None`: the current namespace). Call inside a tokio runtime.
    pub fn new(netns: Option<&Path>) -> Result<Self> {
        Ok(NetlinkWriter {
            conn: connect(netns)?,
        })
    }

    async fn ifindex(&self, device: &str, what: &'static str) -> Result<u32> {
        let mut links = self
            .conn
            .handle()
            .link()
            .get()
            .match_name(device.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(self.no_device(device, what)),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.map(|c| -c.get()) == Some(libc::ENODEV) =>
            {
                Err(self.no_device(device, what))
            }
            Err(e) => Err(self.error(what, e)),
        }
    }

    fn no_device(&self, device: &str, what: &'static str) -> Error {
        Error::Kernel {
            netns: self.conn.netns().to_string(),
            what,
            source: std::io::Error::other(format!("device {device} does not exist")),
        }
    }

    fn error(&self, what: &'static str, e: rtnetlink::Error) -> Error {
        let netns = self.conn.netns().to_string();
        match e {
            rtnetlink::Error::NetlinkError(msg) => match msg.code {
                Some(code) => Error::Kernel {
                    netns,
                    what,
                    source: std::io::Error::from_raw_os_error(-code.get()),
                },
                None => Error::Request {
                    netns,
                    what,
                    message: msg.to_string(),
                },
            },
            other => Error::Request {
                netns,
                what,
                message: other.to_string(),
            },
        }
    }
}

/// `ip route … dev <ifindex> onlink` in the main table.
fn route_message(
    ifindex: u32,
    destination: ipnet::IpNet,
    gateway: Option<IpAddr>,
    protocol: u8,
    metric: Option<u32>,
) -> std::result::Result<netlink_packet_route::route::RouteMessage, String> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(destination.network(), destination.prefix_len())
        .map_err(|e| e.to_string())?
        .output_interface(ifindex)
        .table_id(MAIN_TABLE)
        .protocol(RouteProtocol::from(protocol))
        .scope(RouteScope::Universe);
    if let Some(gw) = gateway {
        b = b.gateway(gw).map_err(|e| e.to_string())?.onlink();
    }
    if let Some(m) = metric {
        b = b.priority(m);
    }
    Ok(b.build())
}

impl KernelWriter for NetlinkWriter {
    async fn write(&mut self, remedy: &Remedy) -> Result<()> {
        let what = remedy.action();
        let ifindex = self.ifindex(remedy.device(), what).await?;
        let handle = self.conn.handle();
        let invalid = |message: String| Error::Request {
            netns: self.conn.netns().to_string(),
            what,
            message,
        };
        let sent = match remedy {
            Remedy::RouteReplace {
                destination,
                gateway,
                protocol,
                metric,
                ..
            } => {
                let msg = route_message(ifindex, *destination, Some(*gateway), *protocol, *metric)
                    .map_err(invalid)?;
                handle.route().add(msg).replace().execute().await
            }
            Remedy::RouteAdd {
                destination,
                gateway,
                ..
            } => {
                let msg = route_message(
                    ifindex,
                    *destination,
                    Some(*gateway),
                    crate::model::PROTO_BOOT,
                    None,
                )
                .map_err(invalid)?;
                handle.route().add(msg).execute().await
            }
            Remedy::RouteDelete {
                destination,
                gateway,
                protocol,
                metric,
                ..
            } => {
                let msg = route_message(ifindex, *destination, *gateway, *protocol, *metric)
                    .map_err(invalid)?;
                handle.route().del(msg).execute().await
            }
            Remedy::NeighReplace { ip, mac, .. } => {
                handle
                    .neighbours()
                    .add(ifindex, *ip)
                    .link_local_address(&mac.0)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            Remedy::FdbReplace {
                mac, destination, ..
            } => {
                let mut req = handle
                    .neighbours()
                    .add_bridge(ifindex, &mac.0)
                    .state(NeighbourState::Permanent)
                    .flags(NeighbourFlags::Own)
                    .replace();
                req.message_mut()
                    .attributes
                    .push(NeighbourAttribute::Destination(match destination {
                        IpAddr::V4(v4) => NeighbourAddress::Inet(*v4),
                        IpAddr::V6(v6) => NeighbourAddress::Inet6(*v6),
                    }));
                req.execute().await
            }
        };
        sent.map_err(|e| self.error(what, e))
    }
}

/// Records every write and applies it to `state` the way the kernel would, for unit tests.
#[derive(Debug, Default)]
pub struct RecordingWriter {
    pub written: Vec<Remedy>,
    pub state: ObservedState,
}

impl RecordingWriter {
    pub fn new(state: ObservedState) -> Self {
        RecordingWriter {
            written: Vec::new(),
            state,
        }
    }
}

impl KernelWriter for RecordingWriter {
    async fn write(&mut self, remedy: &Remedy) -> Result<()> {
        self.written.push(remedy.clone());
        apply_to_model(&mut self.state, remedy).map_err(|message| Error::Kernel {
            netns: "recording writer".into(),
            what: remedy.action(),
            source: std::io::Error::other(message),
        })
    }
}

/// The kernel's semantics of each write, on the model: replace matches a route by destination
/// and metric in the main table, a neighbour by address, an FDB entry by MAC.
pub fn apply_to_model(
    state: &mut ObservedState,
    remedy: &Remedy,
) -> std::result::Result<(), String> {
    let device = remedy.device();
    let dev = state
        .devices
        .get_mut(device)
        .ok_or_else(|| format!("device {device} does not exist"))?;
    let same_route = |r: &Route, dst: &ipnet::IpNet, metric: &Option<u32>| {
        r.destination == *dst && r.table == MAIN_TABLE && r.metric == *metric
    };
    let unicast = |destination, gateway, protocol, metric| Route {
        destination,
        gateway: Some(gateway),
        onlink: true,
        protocol,
        table: MAIN_TABLE,
        kind: RouteKind::Unicast,
        metric,
    };
    match remedy {
        Remedy::RouteReplace {
            destination,
            gateway,
            protocol,
            metric,
            ..
        } => {
            dev.routes.retain(|r| !same_route(r, destination, metric));
            dev.routes
                .push(unicast(*destination, *gateway, *protocol, *metric));
        }
        Remedy::RouteAdd {
            destination,
            gateway,
            ..
        } => {
            if dev.routes.iter().any(|r| same_route(r, destination, &None)) {
                return Err(format!("route {destination} exists (EEXIST)"));
            }
            dev.routes.push(unicast(
                *destination,
                *gateway,
                crate::model::PROTO_BOOT,
                None,
            ));
        }
        Remedy::RouteDelete {
            destination,
            metric,
            ..
        } => {
            let before = dev.routes.len();
            dev.routes.retain(|r| !same_route(r, destination, metric));
            if dev.routes.len() == before {
                return Err(format!("no route {destination} (ESRCH)"));
            }
        }
        Remedy::NeighReplace { ip, mac, .. } => {
            dev.neighbours.retain(|n| n.ip != *ip);
            dev.neighbours.push(Neighbour {
                ip: *ip,
                mac: Some(*mac),
                state: NeighState(NeighState::PERMANENT),
            });
        }
        Remedy::FdbReplace {
            mac, destination, ..
        } => {
            dev.fdb.retain(|e| e.mac != *mac);
            dev.fdb.push(FdbEntry {
                mac: MacAddr(mac.0),
                destination: Some(*destination),
                permanent: true,
            });
        }
    }
    Ok(())
}
