//! `dataplane-watchdog` (the cargo binary and the development name: `watchdog`): parse the
//! command line, set up logging, dispatch. The program behaves the same under either name;
//! usage lines show the name it was invoked as, `--version` the package's name.
//!
//! Exit codes: `scan` 0 healthy, 1 warnings, 2 critical, 3 could not check (kernel or datastore
//! unreadable); `status` 3 when the daemon cannot be reached; `check` 0/1/2/3 per the Nagios
//! plugin guidelines. Bad flags or configuration: one line naming the problem, exit 2 (clap's
//! usage-error code, same as the daemon's).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use dataplane_watchdog::{
    config::{Config, Profile},
    daemon::{self, Daemon, DaemonError},
    scan::{self, DatastoreChoice},
    serve::{self, CheckArgs, StatusArgs},
};
use tracing_subscriber::EnvFilter;

const DEFAULT_CONFIG: &str = "/etc/dataplane-watchdog/config.toml";

#[derive(Parser)]
#[command(
    name = "dataplane-watchdog",
    version,
    about = "Proves this node's VXLAN overlay (routes, ARP neighbours, FDB) matches the cluster \
             datastore; counts the packets dropped when it doesn't; alerts or repairs.",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (normally under systemd).
    Run(RunArgs),
    /// One-shot check: snapshot kernel + datastore, print findings, exit 0 healthy / 1 warning /
    /// 2 critical / 3 could not check.
    Scan(ScanArgs),
    /// Ask the running daemon: node, peers, open findings, drops, repairs (exit 3 when it
    /// cannot be reached).
    Status(StatusCmd),
    /// Nagios/NRPE plugin: one line `WATCHDOG OK|WARNING|CRITICAL|UNKNOWN - …`, exit 0/1/2/3.
    Check(CheckCmd),
    /// Alert sinks: `watchdog alert test` after editing `[[alerts.sinks]]`.
    #[command(subcommand)]
    Alert(AlertCmd),
}

#[derive(Subcommand)]
enum AlertCmd {
    /// Send a marked test notification and its resolve through each sink; exit 0 if all got 2xx.
    ///
    /// The test is marked: webhook `"test": true`, Slack and PagerDuty summary `[TEST] …`,
    /// Alertmanager label `test="true"`. One line per sink; exit 0 only if every sink answered
    /// 2xx to both, 1 if any did not, 2 for a bad config or an unknown --sink. Sent directly (one
    /// attempt within the sink's timeout), not spooled. Secrets are read from their
    /// `*_file`/`*_env` and never printed; URLs show as scheme://host/….
    Test(AlertTestArgs),
}

#[derive(Args, Debug)]
struct AlertTestArgs {
    /// Configuration file holding `[[alerts.sinks]]`.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Only this sink (its `name`).
    #[arg(long, value_name = "NAME")]
    sink: Option<String>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ClientConfig {
    /// Configuration file, read only for `status.socket` when --socket is not given.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Args, Debug)]
struct StatusCmd {
    #[command(flatten)]
    client: ClientConfig,
    #[command(flatten)]
    args: StatusArgs,
}

#[derive(Args, Debug)]
struct CheckCmd {
    #[command(flatten)]
    client: ClientConfig,
    #[command(flatten)]
    args: CheckArgs,
}

#[derive(Args, Debug)]
struct CommonArgs {
    /// Configuration file. A missing file at the default path means all defaults; a missing
    /// file given explicitly is an error.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Network namespace to inspect (a path such as /run/netns/NAME or /proc/PID/ns/net).
    /// Default: the agent's own.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Name of this node in the datastore (overrides `node_name`; default: host name).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// Overlay profile (overrides `profile`): calico or flannel.
    #[arg(long, value_name = "PROFILE")]
    profile: Option<String>,
    /// Overlay device to check (repeatable; overrides `devices`).
    #[arg(long = "device", value_name = "NAME")]
    devices: Vec<String>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug)]
struct ScanArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Desired state source, overriding the config: `file:PATH` (or a bare PATH), `kubernetes`,
    /// or `none` (offline: only the checks that need no datastore).
    #[arg(long, value_name = "SOURCE")]
    datastore: Option<String>,
    /// Print the full report as JSON (findings per DESIGN.md §3) instead of tables.
    #[arg(long)]
    json: bool,
    /// kubeconfig for `--datastore kubernetes` (overrides `datastore.kubeconfig`; default:
    /// KUBECONFIG, ~/.kube/config, in-cluster, then MicroK8s's client.config).
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Also count kernel drops on the overlay devices for this long (eBPF, e.g. `10s`) and
    /// judge them per peer (`traffic-blackholed`, `drops-unexplained`); shown under `drops`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    drops: Option<std::time::Duration>,
    /// Also run the kubelet watch-stall check once (Kubernetes datastore only): pods the API
    /// server bound to this node longer than `[kubelet] threshold` that the kubelet does not
    /// list (`kubelet-watch-stalled`), and deleted pods it still runs (`pod-stuck-terminating`).
    /// Needs `pods` list and `nodes/proxy` get (systemd/rbac.yaml).
    #[arg(long)]
    kubelet: bool,
    /// Print the repair plan for the findings as the equivalent `ip route replace …` /
    /// `ip neigh replace …` / `bridge fdb replace …` commands (refused ones commented out, with
    /// the guard rail that refused them), and write nothing.
    #[arg(long, conflicts_with_all = ["repair", "drops"])]
    dry_run: bool,
    /// Apply that plan once, through the same guard rails as `mode = "repair"` except the
    /// finding's age ([repair] actions, delete_stale_routes, max_repairs_per_minute, overlay
    /// devices, datastore validity); report what was done, scan again, and exit with the
    /// verdict after the repair.
    #[arg(long, conflicts_with = "drops")]
    repair: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        // A report piped into `head` ends quietly, like any Unix tool, instead of panicking on
        // EPIPE. The daemon keeps Rust's default (SIGPIPE ignored: a write error, not a death).
        // SAFETY: restoring the default disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Scan(args) => scan_command(args),
        Command::Run(args) => run_command(args),
        Command::Status(mut cmd) => {
            if cmd.args.socket.is_none() {
                match client_socket(&cmd.client) {
                    Ok(socket) => cmd.args.socket = Some(socket),
                    Err(err) => {
                        eprintln!("watchdog status: {err}");
                        return ExitCode::from(2);
                    }
                }
            }
            exit(runtime().block_on(serve::run_status(cmd.args)))
        }
        Command::Check(mut cmd) => {
            if cmd.args.socket.is_none() {
                match client_socket(&cmd.client) {
                    Ok(socket) => cmd.args.socket = Some(socket),
                    Err(err) => {
                        // Nagios: a plugin that cannot even start is UNKNOWN.
                        println!("WATCHDOG UNKNOWN - {}", err.replace('|', "/"));
                        return ExitCode::from(3);
                    }
                }
            }
            exit(runtime().block_on(serve::run_check(cmd.args)))
        }
        Command::Alert(AlertCmd::Test(args)) => alert_test_command(args),
    }
}

fn alert_test_command(args: AlertTestArgs) -> ExitCode {
    use dataplane_watchdog::act::alerts::{self, ReqwestTransport};
    let explicit = args.config != Path::new(DEFAULT_CONFIG);
    let config = match Config::load(&args.config, explicit) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("watchdog alert test: {err}");
            return ExitCode::from(2);
        }
    };
    let sinks = &config.alerts.sinks;
    if sinks.is_empty() {
        eprintln!(
            "watchdog alert test: no [[alerts.sinks]] in {}",
            args.config.display()
        );
        return ExitCode::from(2);
    }
    if let Some(name) = &args.sink {
        if !sinks.iter().any(|s| &s.name == name) {
            let names: Vec<&str> = sinks.iter().map(|s| s.name.as_str()).collect();
            eprintln!(
                "watchdog alert test: --sink: no sink named {name:?} (configured: {})",
                names.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    let connect = sinks.iter().map(|s| s.timeout).min().unwrap_or_default();
    let transport = match ReqwestTransport::new(connect) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("watchdog alert test: HTTP client: {e}");
            return ExitCode::from(1);
        }
    };
    let results = runtime().block_on(alerts::send_test(
        &config.alerts,
        &config.node_name,
        args.sink.as_deref(),
        &transport,
    ));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).unwrap_or_default()
        );
    } else {
        let code = |c: Option<u16>| c.map_or("-".to_string(), |c| c.to_string());
        for r in &results {
            println!(
                "{} {} ({}, {}): firing {}, resolve {}{}",
                if r.ok { "ok    " } else { "FAILED" },
                r.sink,
                r.kind,
                if r.url.is_empty() { "-" } else { &r.url },
                code(r.firing),
                code(r.resolved),
                r.error
                    .as_deref()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default(),
            );
        }
    }
    if results.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(3))
}

/// The status socket from the config (a missing default config means the default socket).
fn client_socket(client: &ClientConfig) -> Result<PathBuf, String> {
    let explicit = client.config != Path::new(DEFAULT_CONFIG);
    Config::load(&client.config, explicit)
        .map(|c| c.status.socket)
        .map_err(|e| e.to_string())
}

fn run_command(args: RunArgs) -> ExitCode {
    let config = match load_config(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log_level);
    let datastore = match daemon::datastore_from_config(&config) {
        Ok(d) => d,
        Err(err) => {
            eprintln!("watchdog: config: {err}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %config.node_name,
        profile = config.profile.as_str(),
        mode = %config.mode,
        devices = ?config.devices,
        netns = %args.common.netns.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "own".into()),
        resync_interval = %humantime::format_duration(config.resync_interval),
        "starting"
    );
    let daemon = Daemon::new(config, args.common.netns.clone(), datastore);
    let result = runtime().block_on(async move {
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("watchdog run: cannot install signal handlers: {e}");
                return Err(None);
            }
        };
        daemon.run(shutdown).await.map_err(Some)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Some(err)) => {
            tracing::error!(error = %err, "cannot start");
            eprintln!("watchdog run: {err}");
            match err {
                DaemonError::UnsupportedDatastore(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
        Err(None) => ExitCode::FAILURE,
    }
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Config file + command-line overrides; errors are printed as one line, exit 2.
fn load_config(common: &CommonArgs) -> Result<Config, ExitCode> {
    let explicit = common.config != Path::new(DEFAULT_CONFIG);
    let mut config = match Config::load(&common.config, explicit) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("watchdog: {err}");
            return Err(ExitCode::from(2));
        }
    };
    if let Some(node) = &common.node {
        config.node_name = node.clone();
        config.node_name_configured = true;
    }
    if let Some(profile) = &common.profile {
        config.profile = match profile.as_str() {
            "calico" => Profile::Calico,
            "flannel" => Profile::Flannel,
            other => {
                eprintln!(
                    "watchdog: --profile: unknown profile {other:?} (expected calico or flannel)"
                );
                return Err(ExitCode::from(2));
            }
        };
        if common.devices.is_empty() {
            config.devices = config.profile.default_devices();
        }
    }
    if !common.devices.is_empty() {
        config.devices = common.devices.clone();
    }
    Ok(config)
}

/// Logs on stderr: `WATCHDOG_LOG` overrides the configured filter; colours only on a
/// terminal; no timestamps under journald (it stamps every line itself).
fn init_logging(default: &str) {
    use std::io::IsTerminal;
    // netlink-packet-route warns on every dump about attributes newer than the crate.
    let quiet = if default.contains("netlink_packet_route") {
        String::new()
    } else {
        ",netlink_packet_route=error".to_string()
    };
    let filter = EnvFilter::try_from_env("WATCHDOG_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default}{quiet}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime")
}

fn scan_command(args: ScanArgs) -> ExitCode {
    let mut config = match load_config(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(path) = &args.kubeconfig {
        config.datastore.kubeconfig = Some(path.clone());
    }
    // A one-shot command prints its report; logs only for problems. kube's client logs every
    // failed request at ERROR: scan reports the failure itself, as one line.
    init_logging("warn,kube_client=off");
    let choice = args
        .datastore
        .as_deref()
        .map(DatastoreChoice::parse)
        .unwrap_or_else(|| DatastoreChoice::from_config(&config));
    if args.kubelet && choice != DatastoreChoice::Kubernetes {
        eprintln!(
            "watchdog scan: --kubelet needs the Kubernetes datastore (--datastore kubernetes)"
        );
        return ExitCode::from(3);
    }
    let netns = args.common.netns.as_deref();
    let result = runtime().block_on(async {
        let mut out = if args.dry_run || args.repair {
            scan::scan_and_repair(&config, netns, &choice, args.dry_run).await?
        } else {
            scan::scan_with_drops(&config, netns, &choice, args.drops).await?
        };
        if args.kubelet {
            scan::add_kubelet_check(&mut out, &config).await?;
        }
        Ok::<_, scan::ScanError>(out)
    });
    match result {
        Ok(out) => {
            if args.json {
                match serde_json::to_string_pretty(&out) {
                    Ok(json) => println!("{json}"),
                    Err(err) => {
                        eprintln!("watchdog scan: cannot encode JSON: {err}");
                        return ExitCode::from(3);
                    }
                }
            } else {
                print!("{}", scan::render_text(&out));
                if let Some(repair) = &out.repair {
                    print!("{}", scan::render_repair(repair));
                }
            }
            ExitCode::from(out.summary.exit_code as u8)
        }
        Err(err) => {
            eprintln!("watchdog scan: {err}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn either_name_parses_the_same_and_usage_names_the_invoked_one() {
        for (argv0, shown) in [
            ("/usr/bin/dataplane-watchdog", "dataplane-watchdog"),
            ("target/release/watchdog", "watchdog"),
        ] {
            let cli = Cli::try_parse_from([argv0, "scan", "--datastore", "none"]).unwrap();
            assert!(
                matches!(cli.command, Command::Scan(ref a) if a.datastore.as_deref() == Some("none"))
            );
            let help = Cli::try_parse_from([argv0, "--help"])
                .err()
                .unwrap()
                .to_string();
            assert!(
                help.contains(&format!("Usage: {shown} <COMMAND>")),
                "{help}"
            );
            let sub = Cli::try_parse_from([argv0, "status", "--help"])
                .err()
                .unwrap()
                .to_string();
            assert!(sub.contains(&format!("Usage: {shown} status")), "{sub}");
        }
        assert_eq!(
            Cli::command().render_version().trim(),
            format!("dataplane-watchdog {}", env!("CARGO_PKG_VERSION"))
        );
    }
}
