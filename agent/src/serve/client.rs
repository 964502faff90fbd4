//! Clients of the status API: `watchdog status` and `watchdog check`.

use std::{
    fmt, io,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{client::conn::http1, header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::{
    api::DEFAULT_SOCKET,
    render::{self, NAGIOS_UNKNOWN},
    status::Status,
};

/// Default per-request timeout for the clients.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit code when the daemon cannot be asked (same as Nagios UNKNOWN).
pub const EXIT_UNREACHABLE: i32 = 3;

/// `watchdog status`: ask the running daemon.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StatusArgs {
    /// Status socket of the daemon [default: config `status.socket`, else
    /// /run/dataplane-watchdog/status.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the raw status JSON
    #[arg(long)]
    pub json: bool,
    /// Refresh every second until Ctrl-C
    #[arg(long)]
    pub watch: bool,
}

/// `watchdog check`: Nagios/NRPE plugin.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Status socket of the daemon [default: config `status.socket`, else
    /// /run/dataplane-watchdog/status.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// UNKNOWN when the daemon's status is older than this (a wedged main loop)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
    /// Give up on the daemon after this long
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl Default for CheckArgs {
    fn default() -> Self {
        CheckArgs {
            socket: None,
            stale_after: Duration::from_secs(60),
            timeout: CLIENT_TIMEOUT,
        }
    }
}

fn socket_or_default(socket: &Option<PathBuf>) -> PathBuf {
    socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach daemon at {}: {}", socket.display(), describe_connect(source))]
    Connect { socket: PathBuf, source: io::Error },
    #[error("daemon at {} did not answer within {timeout:?}", socket.display())]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("talking to daemon at {}: {source}", socket.display())]
    Http {
        socket: PathBuf,
        source: hyper::Error,
    },
    #[error("daemon at {} answered {status} for {path}: {body}", socket.display())]
    Status {
        socket: PathBuf,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("daemon at {} sent a status this client cannot read: {source}", socket.display())]
    Decode {
        socket: PathBuf,
        source: serde_json::Error,
    },
}

/// One line a human can act on, without the `(os error N)` noise.
fn describe_connect(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => {
            "No such file or directory (is dataplane-watchdog running?)".into()
        }
        io::ErrorKind::ConnectionRefused => {
            "Connection refused (stale socket: is dataplane-watchdog running?)".into()
        }
        io::ErrorKind::PermissionDenied => {
            "Permission denied (run as root or as a member of the socket's group, see status.group)"
                .into()
        }
        _ => format!("{e} (is dataplane-watchdog running?)"),
    }
}

/// GET `path` from the daemon; returns the body of a 2xx answer.
pub async fn fetch(socket: &Path, path: &str, timeout: Duration) -> Result<Bytes, ClientError> {
    let work = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let http_err = |source| ClientError::Http {
            socket: socket.to_path_buf(),
            source,
        };
        let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        let conn = tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, "localhost")
            .body(Empty::new())
            .expect("static request is valid");
        let resp = sender.send_request(req).await.map_err(http_err)?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(http_err)?
            .to_bytes();
        conn.abort();
        if !status.is_success() {
            return Err(ClientError::Status {
                socket: socket.to_path_buf(),
                path: path.to_string(),
                status,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout {
            socket: socket.to_path_buf(),
            timeout,
        })?
}

/// GET /status, decoded.
pub async fn fetch_status(socket: &Path, timeout: Duration) -> Result<Status, ClientError> {
    let body = fetch(socket, "/status", timeout).await?;
    serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
        socket: socket.to_path_buf(),
        source,
    })
}

/// What one `status` round shows.
enum View {
    Json(String),
    Human(String),
}

async fn one_view(socket: &Path, json: bool) -> Result<View, ClientError> {
    if json {
        let body = fetch(socket, "/status", CLIENT_TIMEOUT).await?;
        Ok(View::Json(String::from_utf8_lossy(&body).into_owned()))
    } else {
        let status = fetch_status(socket, CLIENT_TIMEOUT).await?;
        Ok(View::Human(render::render_status(
            &status,
            SystemTime::now(),
        )))
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            View::Json(s) | View::Human(s) => f.write_str(s),
        }
    }
}

/// `watchdog status`. Returns the process exit code: 0, or 3 when the daemon cannot be asked.
pub async fn run_status(args: StatusArgs) -> i32 {
    let socket = socket_or_default(&args.socket);
    let first = match one_view(&socket, args.json).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("watchdog status: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    if !args.watch {
        print!("{first}");
        let _ = io::stdout().flush();
        return 0;
    }
    let mut view = Ok(first);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        // Home + clear screen, then redraw, like watch(1).
        let mut frame = String::from("\x1b[H\x1b[2J");
        frame.push_str(&format!(
            "Every 1s: watchdog status --socket {}    {}\n\n",
            socket.display(),
            humantime::format_rfc3339_seconds(SystemTime::now())
        ));
        match &view {
            Ok(v) => frame.push_str(&v.to_string()),
            Err(e) => frame.push_str(&format!("watchdog status: {e}\n")),
        }
        print!("{frame}");
        let _ = io::stdout().flush();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                println!();
                return 0;
            }
            _ = ticker.tick() => {}
        }
        view = one_view(&socket, args.json).await;
    }
}

/// `watchdog check`: prints one Nagios plugin line on stdout and returns 0/1/2/3.
pub async fn run_check(args: CheckArgs) -> i32 {
    let socket = socket_or_default(&args.socket);
    let outcome = match fetch_status(&socket, args.timeout).await {
        Ok(status) => render::classify(&status, SystemTime::now(), args.stale_after),
        Err(ClientError::Connect { source, .. }) => {
            render::unreachable_outcome(&socket, &describe_connect(&source))
        }
        Err(e) => render::CheckOutcome {
            code: NAGIOS_UNKNOWN,
            line: format!("WATCHDOG UNKNOWN - {e}").replace('|', "/"),
        },
    };
    println!("{}", outcome.line);
    outcome.code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_read_as_one_clear_line() {
        let e = ClientError::Connect {
            socket: PathBuf::from("/run/dataplane-watchdog/status.sock"),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            e.to_string(),
            "cannot reach daemon at /run/dataplane-watchdog/status.sock: No such file or directory (is dataplane-watchdog running?)"
        );
        let e = ClientError::Connect {
            socket: PathBuf::from("/s"),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert!(e.to_string().contains("Permission denied (run as root"));
    }

    #[test]
    fn clap_args_parse_durations() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            check: CheckArgs,
        }
        let cli = Cli::try_parse_from(["x", "--stale-after", "2m", "--socket", "/tmp/s"]).unwrap();
        assert_eq!(cli.check.stale_after, Duration::from_secs(120));
        assert_eq!(cli.check.socket, Some(PathBuf::from("/tmp/s")));
        assert!(Cli::try_parse_from(["x", "--stale-after", "soon"]).is_err());
    }
}
