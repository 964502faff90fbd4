//! Multicast subscription to link, address, route and neighbour (incl. FDB) changes in one
//! network namespace, as a stream of [`ObservedEvent`]s.

use std::{
    io,
    os::fd::AsRawFd,
    path::Path,
    pin::Pin,
    task::{Context, Poll},
};

use futures::Stream;
use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::{debug, warn};

use super::{
    events::{events_from_message, ObservedEvent},
    netns::{netns_label, raw_socket},
    Error, Result,
};

/// Groups every watched change arrives on. RTNLGRP_NEIGH also carries AF_BRIDGE FDB events.
const GROUPS: [u32; 6] = [
    libc::RTNLGRP_LINK,
    libc::RTNLGRP_NEIGH,
    libc::RTNLGRP_IPV4_IFADDR,
    libc::RTNLGRP_IPV6_IFADDR,
    libc::RTNLGRP_IPV4_ROUTE,
    libc::RTNLGRP_IPV6_ROUTE,
];

/// Larger than any rtnetlink notification (they are at most a page or two).
const RECV_BUFFER: usize = 64 * 1024;

/// Monitor settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorOptions {
    /// Socket receive buffer (SO_RCVBUF, forced past rmem_max when privileged). `None` keeps
    /// the system default. A burst larger than this is lost and reported as
    /// [`ObservedEvent::Overrun`].
    pub recv_buffer: Option<usize>,
    /// Events queued between the socket reader and the consumer. When the consumer falls
    /// behind, the socket buffer fills and the kernel reports an overrun: the honest signal.
    pub queue: usize,
}

impl Default for MonitorOptions {
    fn default() -> Self {
        MonitorOptions {
            // Felix-sized bursts (thousands of routes on resync) fit in 4 MiB.
            recv_buffer: Some(4 * 1024 * 1024),
            queue: 4096,
        }
    }
}

/// A running subscription. Dropping it stops the reader task and closes the socket.
#[derive(Debug)]
pub struct Monitor {
    events: mpsc::Receiver<ObservedEvent>,
    task: JoinHandle<()>,
    netns: String,
}

fn set_recv_buffer(socket: &netlink_sys::Socket, size: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    let set = |opt| {
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    // SO_RCVBUFFORCE ignores rmem_max but needs CAP_NET_ADMIN; fall back to the capped one.
    if set(libc::SO_RCVBUFFORCE) == 0 || set(libc::SO_RCVBUF) == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A non-blocking rtnetlink socket in `netns` subscribed to every group the monitor reads.
fn subscribed_socket(
    netns: Option<&Path>,
    recv_buffer: Option<usize>,
) -> Result<netlink_sys::Socket> {
    raw_socket(netns, move |socket| {
        for group in GROUPS {
            socket.add_membership(group)?;
        }
        if let Some(size) = recv_buffer {
            set_recv_buffer(socket, size)?;
        }
        Ok(())
    })
}

impl Monitor {
    /// Subscribe in `netns` (`None`: the current namespace). Must be called from within a
    /// tokio runtime. Start it before taking the snapshot it will update, so no change falls
    /// between the two.
    pub fn start(netns: Option<&Path>, options: &MonitorOptions) -> Result<Monitor> {
        let socket = subscribed_socket(netns, options.recv_buffer)?;
        Self::with_socket(socket, netns_label(netns), options)
    }

    /// [`Monitor::start`] for the daemon's loop: the namespace thread is awaited on a blocking
    /// thread, never joined on the runtime.
    pub async fn start_off_loop(netns: Option<&Path>, options: &MonitorOptions) -> Result<Monitor> {
        let owned = netns.map(Path::to_path_buf);
        let recv_buffer = options.recv_buffer;
        let socket =
            tokio::task::spawn_blocking(move || subscribed_socket(owned.as_deref(), recv_buffer))
                .await
                .map_err(|_| Error::ThreadPanicked {
                    netns: netns_label(netns),
                })??;
        Self::with_socket(socket, netns_label(netns), options)
    }

    fn with_socket(
        socket: netlink_sys::Socket,
        label: String,
        options: &MonitorOptions,
    ) -> Result<Monitor> {
        // SAFETY: the socket owns its fd and is neither closed nor replaced while registered.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(|source| Error::Socket {
            netns: label.clone(),
            source: source.into(),
        })?;
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let task = tokio::spawn(read_loop(fd, tx, label.clone()));
        debug!(netns = %label, ?options, "netlink monitor started");
        Ok(Monitor {
            events: rx,
            task,
            netns: label,
        })
    }

    /// The next event; `None` once the reader stopped (socket error, already logged).
    pub async fn next(&mut self) -> Option<ObservedEvent> {
        self.events.recv().await
    }

    /// An event if one is queued, without waiting.
    pub fn try_next(&mut self) -> Option<ObservedEvent> {
        self.events.try_recv().ok()
    }

    /// `netns /run/netns/x` or `host netns`.
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

impl Stream for Monitor {
    type Item = ObservedEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_loop(
    fd: AsyncFd<netlink_sys::Socket>,
    tx: mpsc::Sender<ObservedEvent>,
    netns: String,
) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let mut guard = match fd.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                warn!(%netns, error = %e, "netlink monitor socket failed, stopping");
                return;
            }
        };
        let received = guard.try_io(|inner| {
            // SAFETY: buf is valid for buf.len() bytes; MSG_TRUNC makes the kernel report the
            // real datagram length so truncation is detectable.
            let n = unsafe {
                libc::recv(
                    inner.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        let events = match received {
            Err(_would_block) => continue,
            Ok(Ok(n)) if n > buf.len() => {
                debug!(%netns, len = n, "netlink notification truncated");
                vec![ObservedEvent::Overrun]
            }
            Ok(Ok(n)) => parse_datagram(&buf[..n]),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                debug!(%netns, "netlink monitor overrun (ENOBUFS)");
                vec![ObservedEvent::Overrun]
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => {
                warn!(%netns, error = %e, "netlink monitor receive failed, stopping");
                let _ = tx.send(ObservedEvent::Overrun).await;
                return;
            }
        };
        for event in events {
            if tx.send(event).await.is_err() {
                return; // Monitor dropped.
            }
        }
    }
}

/// Every event in one datagram (which may hold several netlink messages). Messages that do
/// not decode are skipped with a debug log.
pub fn parse_datagram(mut bytes: &[u8]) -> Vec<ObservedEvent> {
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let len = match NetlinkBuffer::new_checked(bytes) {
            Ok(buf) => buf.length() as usize,
            Err(e) => {
                debug!(error = %e, "malformed netlink header, rest of datagram skipped");
                break;
            }
        };
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len]) {
            Ok(msg) => match &msg.payload {
                NetlinkPayload::InnerMessage(inner) => {
                    events.extend(events_from_message(inner, msg.header.flags))
                }
                NetlinkPayload::Overrun(_) => events.push(ObservedEvent::Overrun),
                other => debug!(?other, "netlink control message on monitor, skipped"),
            },
            Err(e) => debug!(error = %e, "undecodable netlink notification, skipped"),
        }
        // Messages are 4-byte aligned within a datagram.
        let next = (len + 3) & !3;
        bytes = bytes.get(next..).unwrap_or_default();
    }
    events
}
