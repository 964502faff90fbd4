//! sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET`.
//!
//! The daemon sends `READY=1` after its first full sync, `STATUS=…` for `systemctl status`,
//! and `WATCHDOG=1` from its main loop at least every half of [`watchdog_interval`].

use std::{
    ffi::OsString,
    io,
    os::unix::{ffi::OsStrExt, net::UnixDatagram},
    path::PathBuf,
    time::Duration,
};

/// Errors sending a notification.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={socket:?} is not a usable socket address: {source}")]
    Address { socket: OsString, source: io::Error },
    #[error("sending {state:?} to NOTIFY_SOCKET={socket:?}: {source}")]
    Send {
        socket: OsString,
        state: String,
        source: io::Error,
    },
}

/// Send `state` (newline-separated `KEY=VALUE` assignments) to the service manager.
/// Returns `Ok(false)` when not running under systemd (no `$NOTIFY_SOCKET`).
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Send to an explicit socket: a path, or `@name` for the abstract namespace.
pub fn notify_to(socket: &OsString, state: &str) -> Result<(), NotifyError> {
    let addr_err = |source| NotifyError::Address {
        socket: socket.clone(),
        source,
    };
    let send_err = |source| NotifyError::Send {
        socket: socket.clone(),
        state: state.to_string(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(addr_err)?;
    let bytes = socket.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(addr_err)?;
        sock.send_to_addr(state.as_bytes(), &addr)
            .map_err(send_err)?;
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(socket))
            .map_err(send_err)?;
    }
    Ok(())
}

/// `READY=1` plus a status line.
pub fn ready(status: &str) -> Result<bool, NotifyError> {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)))
}

/// `STATUS=…`, shown by `systemctl status`.
pub fn status(status: &str) -> Result<bool, NotifyError> {
    notify(&format!("STATUS={}", one_line(status)))
}

/// `WATCHDOG=1`: the main loop is alive.
pub fn watchdog() -> Result<bool, NotifyError> {
    notify("WATCHDOG=1")
}

/// `STOPPING=1`, at the start of a clean shutdown.
pub fn stopping() -> Result<bool, NotifyError> {
    notify("STOPPING=1")
}

/// The unit's `WatchdogSec=` as passed in `$WATCHDOG_USEC`, if it is meant for this process
/// (`$WATCHDOG_PID` unset or ours). Ping at half this interval.
pub fn watchdog_interval() -> Option<Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// A newline would start a new assignment: keep STATUS to one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let path = std::env::temp_dir().join(format!("wd-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(&path.clone().into_os_string(), "READY=1\nSTATUS=in sync").unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=in sync");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("wd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&OsString::from(format!("@{name}")), "WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn missing_socket_is_an_error_naming_it() {
        let e = notify_to(&OsString::from("/nonexistent/notify.sock"), "READY=1").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/notify.sock"));
    }

    #[test]
    fn watchdog_env_is_honoured_only_for_us() {
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_watchdog(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(None, None, 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(one_line("a\nb"), "a b");
    }
}
