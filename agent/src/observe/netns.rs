//! Netlink sockets inside another network namespace without moving the process: a
//! short-lived thread enters the namespace and creates the socket there. A netlink socket stays
//! bound to the namespace it was created in, so the tokio runtime can use it from any thread.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use rtnetlink::Handle;
use tokio::task::JoinHandle;
use tracing::debug;

use super::{Error, Result};

/// Human label of a namespace for messages: its path, or `host netns`.
pub fn netns_label(netns: Option<&Path>) -> String {
    match netns {
        Some(path) => format!("netns {}", path.display()),
        None => "host netns".to_string(),
    }
}

/// Inode number of a network namespace (what the kernel calls `net.ns.inum`): of the file at
/// `netns`, or of this process's own namespace.
pub fn netns_inode(netns: Option<&Path>) -> Result<u64> {
    let path = netns.unwrap_or(Path::new("/proc/self/ns/net"));
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| Error::NetnsInode {
            path: path.to_path_buf(),
            source,
        })
}

/// Run `f` on a short-lived thread that has entered `netns` (or directly, for `None`). Only
/// that thread changes namespace; use it to create sockets that must live in `netns`.
pub fn run_in_netns<T, F>(netns: Option<&Path>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let Some(path) = netns else {
        return f().map_err(|source| Error::Socket {
            netns: netns_label(None),
            source,
        });
    };
    let file = File::open(path).map_err(|source| Error::NetnsOpen {
        path: path.to_path_buf(),
        source,
    })?;
    let owned: PathBuf = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("netns-enter".into())
        .spawn(move || -> Result<T> {
            // SAFETY: setns only changes this thread's namespace; the fd is valid while `file`
            // lives, and the thread ends right after `f`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(Error::NetnsEnter {
                    path: owned,
                    source: io::Error::last_os_error(),
                });
            }
            f().map_err(|source| Error::Socket {
                netns: netns_label(Some(&owned)),
                source,
            })
        })
        .map_err(|source| Error::NetnsEnter {
            path: path.to_path_buf(),
            source,
        })?;
    thread.join().map_err(|_| Error::ThreadPanicked {
        netns: netns_label(Some(path)),
    })?
}

/// An rtnetlink connection bound to one network namespace. Dropping it stops the connection
/// task.
#[derive(Debug)]
pub struct NetlinkConn {
    handle: Handle,
    netns: String,
    task: JoinHandle<()>,
}

impl NetlinkConn {
    /// A handle for requests (cheap to clone).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// `netns /run/netns/x` or `host netns`, for messages.
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

impl Drop for NetlinkConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Open an rtnetlink connection in `netns` (`None`: the current namespace). Must be called
/// from within a tokio runtime (the socket registers with its reactor).
pub fn connect(netns: Option<&Path>) -> Result<NetlinkConn> {
    let label = netns_label(netns);
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime {
        netns: label.clone(),
    })?;
    let (conn, handle, _unsolicited) = run_in_netns(netns, move || {
        // The socket (created by new_connection) is registered with the runtime's reactor,
        // which works from any thread once we enter the runtime context.
        let _guard = runtime.enter();
        rtnetlink::new_connection()
    })?;
    let task = tokio::spawn(conn);
    debug!(netns = %label, "rtnetlink connection opened");
    Ok(NetlinkConn {
        handle,
        netns: label,
        task,
    })
}

/// A plain (not yet async) rtnetlink socket created in `netns`, for callers that drive it
/// themselves (the monitor).
pub(crate) fn raw_socket(
    netns: Option<&Path>,
    setup: impl FnOnce(&netlink_sys::Socket) -> io::Result<()> + Send + 'static,
) -> Result<netlink_sys::Socket> {
    run_in_netns(netns, move || {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
        socket.bind_auto()?;
        setup(&socket)?;
        socket.set_non_blocking(true)?;
        Ok(socket)
    })
}
