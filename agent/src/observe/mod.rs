//! Kernel state from netlink: dump and multicast monitor of overlay devices, routes, neighbours
//! and FDB → `model::ObservedState`.
//!
//! - [`NetlinkObserver`] (behind the [`KernelObserver`] trait) takes snapshots with dump
//!   requests, in any network namespace ([`connect`], [`run_in_netns`]).
//! - [`Monitor`] subscribes to change notifications; [`ObservedState::apply`] keeps a snapshot
//!   exact between resyncs, and says when only a resync can ([`Applied::ResyncNeeded`]).
//!
//! Route lists hold every route, any table, whose output device is the overlay device (also
//! the kernel's `local` table entries for the device's own addresses, kind `Local`), plus every
//! blackhole/unreachable/prohibit route (they have no device but decide the fate of overlay
//! traffic), repeated on each watched device.

mod dump;
mod events;
mod monitor;
mod netns;
pub mod parse;
mod write;

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
};

pub use dump::{dump_route_count, snapshot};
pub use events::{events_from_message, Applied, ObservedEvent};
pub use monitor::{parse_datagram, Monitor, MonitorOptions};
pub use netns::{connect, netns_inode, netns_label, run_in_netns, NetlinkConn};
pub use write::{apply_to_model, KernelWriter, NetlinkWriter, RecordingWriter};

use crate::model::ObservedState;

/// Errors of the observer, with the namespace and the request they concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}: {source}")]
    NetnsOpen { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    NetnsEnter { path: PathBuf, source: io::Error },
    #[error("cannot read the inode of network namespace {path}: {source}")]
    NetnsInode { path: PathBuf, source: io::Error },
    #[error("netlink socket in {netns}: {source}")]
    Socket { netns: String, source: io::Error },
    #[error("the thread that entered {netns} panicked")]
    ThreadPanicked { netns: String },
    #[error("netlink in {netns} needs a tokio runtime")]
    NoRuntime { netns: String },
    #[error("netlink {what} request in {netns} could not be sent: {message}")]
    Request {
        netns: String,
        what: &'static str,
        message: String,
    },
    #[error("netlink {what} request in {netns} failed: {source}")]
    Kernel {
        netns: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("netlink {what} dump in {netns} kept changing while being read")]
    Inconsistent { netns: String, what: &'static str },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Source of kernel snapshots; a fake in tests, [`NetlinkObserver`] for real.
pub trait KernelObserver {
    /// The watched `devices` as they are now; absent devices are left out.
    fn snapshot(&self, devices: &[String]) -> impl Future<Output = Result<ObservedState>> + Send;
}

/// Snapshots by netlink dump in one network namespace.
#[derive(Debug)]
pub struct NetlinkObserver {
    conn: NetlinkConn,
}

impl NetlinkObserver {
    /// Connect in `netns` (`None`: the current namespace). Call inside a tokio runtime.
    pub fn new(netns: Option<&Path>) -> Result<Self> {
        Ok(NetlinkObserver {
            conn: connect(netns)?,
        })
    }

    pub fn conn(&self) -> &NetlinkConn {
        &self.conn
    }

    /// Raw IPv4 + IPv6 route dump of all tables, counted (benchmark baseline).
    pub async fn dump_route_count(&self) -> Result<usize> {
        dump_route_count(&self.conn).await
    }

    /// Every dump a snapshot makes, counted, no model built (benchmark baseline).
    pub async fn dump_all_count(&self) -> Result<usize> {
        dump::dump_all_count(&self.conn).await
    }
}

impl KernelObserver for NetlinkObserver {
    fn snapshot(&self, devices: &[String]) -> impl Future<Output = Result<ObservedState>> + Send {
        snapshot(&self.conn, devices)
    }
}

/// A fixed state observes as itself (for tests of the layers above).
impl KernelObserver for ObservedState {
    fn snapshot(&self, devices: &[String]) -> impl Future<Output = Result<ObservedState>> + Send {
        let mut state = self.clone();
        state.devices.retain(|name, _| devices.contains(name));
        std::future::ready(Ok(state))
    }
}

#[cfg(test)]
mod tests;
