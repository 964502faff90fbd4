//! The read-only status API: HTTP/1.1 on a Unix socket.
//!
//! Routes: `GET /status` (the whole [`Status`]), `GET /findings` (open findings),
//! `GET /healthz` (200 when the main loop ticked within `healthz_max_age`, else 503). Any
//! other method is 405: nothing reachable from here changes the daemon or the dataplane.

use std::{
    convert::Infallible,
    ffi::CString,
    future::Future,
    io,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::UnixListener;

use super::{
    http::{self, Body},
    status::{Status, StatusHandle},
    ServeError,
};

/// Default status socket (DESIGN.md §3 `[status] socket`).
pub const DEFAULT_SOCKET: &str = "/run/dataplane-watchdog/status.sock";
/// Default limit for `/healthz`: the main loop pings systemd at least every 15 s
/// (WatchdogSec=30), so four missed ticks is unhealthy.
pub const DEFAULT_HEALTHZ_MAX_AGE: Duration = Duration::from_secs(60);

/// How the status socket is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusServerOptions {
    pub socket: PathBuf,
    /// When set, the socket is chowned to this group (name or numeric gid) and made 0660 so
    /// its members can run `watchdog status`; otherwise 0600 (root only).
    pub group: Option<String>,
    /// `/healthz` answers 503 when the main loop has not ticked for this long.
    pub healthz_max_age: Duration,
}

impl Default for StatusServerOptions {
    fn default() -> Self {
        StatusServerOptions {
            socket: PathBuf::from(DEFAULT_SOCKET),
            group: None,
            healthz_max_age: DEFAULT_HEALTHZ_MAX_AGE,
        }
    }
}

/// A bound status socket, ready to [`run`](StatusServer::run).
#[derive(Debug)]
pub struct StatusServer {
    listener: UnixListener,
    path: PathBuf,
    /// Inode of the socket file we created, so shutdown never removes a successor's socket.
    inode: u64,
    healthz_max_age: Duration,
}

impl StatusServer {
    /// Create the parent directory, clear a stale socket (only if nothing listens on it),
    /// bind, and set permissions before the socket becomes visible at its final path.
    ///
    /// Must be called inside a tokio runtime.
    pub fn bind(opts: &StatusServerOptions) -> Result<Self, ServeError> {
        let path = opts.socket.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ServeError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        remove_stale(&path)?;

        // Bind under a temporary name and rename into place once the mode is right, so the
        // socket is never reachable with the umask's permissions.
        let tmp = tmp_path(&path);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(|source| ServeError::Bind {
            path: path.clone(),
            source,
        })?;
        let cleanup = |e: ServeError| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        let perm_err = |source| ServeError::Permissions {
            path: path.clone(),
            source,
        };
        let mode = match &opts.group {
            Some(group) => {
                let gid = resolve_group(group).map_err(cleanup)?;
                std::os::unix::fs::chown(&tmp, None, Some(gid))
                    .map_err(perm_err)
                    .map_err(cleanup)?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(perm_err)
            .map_err(cleanup)?;
        std::fs::rename(&tmp, &path)
            .map_err(|source| ServeError::Bind {
                path: path.clone(),
                source,
            })
            .map_err(cleanup)?;
        let inode = std::fs::symlink_metadata(&path)
            .map(|m| m.ino())
            .unwrap_or_default();
        tracing::info!(socket = %path.display(), mode = format_args!("{mode:o}"), "status API listening");
        Ok(StatusServer {
            listener,
            path,
            inode,
            healthz_max_age: opts.healthz_max_age,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve until `shutdown` completes, then remove the socket file.
    pub async fn run(
        self,
        status: StatusHandle,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let StatusServer {
            listener,
            path,
            inode,
            healthz_max_age,
        } = self;
        tokio::pin!(shutdown);
        let result = loop {
            let stream = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(error = %e, "status API accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(source) => break Err(ServeError::Accept { server: "status", source }),
                },
            };
            let status = status.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let status = status.clone();
                    async move { Ok::<_, Infallible>(route(&req, &status, healthz_max_age).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(http::HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "status API connection ended with an error");
                }
            });
        };
        // Only remove the file if it is still the socket we created.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == inode) {
            let _ = std::fs::remove_file(&path);
        }
        result
    }
}

/// Errors after which accept can simply be retried (fd exhaustion, aborted handshakes).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Remove `path` if it is a socket nobody listens on. A live socket or a non-socket file is
/// an error: we never take over another daemon's socket or delete someone's file.
fn remove_stale(path: &Path) -> Result<(), ServeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServeError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing stale status socket");
            std::fs::remove_file(path).map_err(|source| ServeError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(ServeError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Group name (or numeric gid) → gid.
fn resolve_group(group: &str) -> Result<u32, ServeError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || ServeError::UnknownGroup {
        group: group.to_string(),
    };
    let name = CString::new(group).map_err(|_| unknown())?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all pointers are valid for the call; `result` is either null or points at `grp`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(unknown());
    }
    Ok(grp.gr_gid)
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    /// Seconds since the main loop last ticked; absent before the first tick.
    last_tick_seconds: Option<f64>,
    max_age_seconds: f64,
}

/// Up to this many open findings, `GET /findings` is serialised right on the API thread.
const FINDINGS_INLINE_MAX: usize = 100;

/// Route one request. Public to the crate's tests through `StatusServer` only.
async fn route(
    req: &Request<Incoming>,
    status: &StatusHandle,
    healthz_max_age: Duration,
) -> Response<Body> {
    if let Some(r) = http::method_not_allowed(req.method()) {
        return r;
    }
    match req.uri().path() {
        // Snapshots that share the large lists: the lock is held for a few pointer copies,
        // not for the ~5 ms of serialising 5,000 peers, and the body streams.
        "/status" => http::json_snapshot(StatusCode::OK, status.read(Status::clone).await).await,
        "/findings" => {
            let findings = status.read(|s| Arc::clone(&s.findings)).await;
            // The usual answer is a handful: not worth a thread hand-off (pollers wait on it).
            if findings.len() <= FINDINGS_INLINE_MAX {
                http::json(StatusCode::OK, &findings)
            } else {
                http::json_snapshot(StatusCode::OK, findings).await
            }
        }
        "/healthz" => {
            let since = status.since_last_tick();
            let ok = since.is_some_and(|d| d <= healthz_max_age);
            let body = Health {
                status: if ok { "ok" } else { "stale" },
                last_tick_seconds: since.map(|d| d.as_secs_f64()),
                max_age_seconds: healthz_max_age.as_secs_f64(),
            };
            let code = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            http::json(code, &body)
        }
        other => http::error(
            StatusCode::NOT_FOUND,
            &format!("no route {other}: try /status, /findings or /healthz"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_path_is_a_sibling() {
        assert_eq!(
            tmp_path(Path::new("/run/x/status.sock")),
            PathBuf::from(format!("/run/x/status.sock.{}.tmp", std::process::id()))
        );
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(resolve_group("1234").unwrap(), 1234);
        assert!(matches!(
            resolve_group("no-such-group-xyz"),
            Err(ServeError::UnknownGroup { .. })
        ));
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("wd-serve-nas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("status.sock");
        std::fs::write(&f, "precious").unwrap();
        assert!(matches!(
            remove_stale(&f),
            Err(ServeError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "precious");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
