//! `watchdog`: parse the command line, set up logging, dispatch.
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
    scan::{self, DatastoreChoice},
};
use tracing_subscriber::EnvFilter;

const DEFAULT_CONFIG: &str = "/etc/dataplane-watchdog/config.toml";

#[derive(Parser)]
#[command(
    name = "watchdog",
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
    /// Also count kernel drops on the overlay devices for this long (eBPF, e.g. `10s`) and
    /// judge them per peer (`traffic-blackholed`, `drops-unexplained`); shown under `drops`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    drops: Option<std::time::Duration>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Scan(args) => scan_command(args),
        Command::Run(args) => {
            let _config = match load_config(&args.common) {
                Ok(c) => c,
                Err(code) => return code,
            };
            eprintln!("watchdog run: the daemon is not implemented yet (issue 4)");
            ExitCode::from(2)
        }
    }
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

fn init_logging(default: &str) {
    let filter =
        EnvFilter::try_from_env("WATCHDOG_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime")
}

fn scan_command(args: ScanArgs) -> ExitCode {
    let config = match load_config(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // A one-shot command prints its report; logs only for problems.
    init_logging("warn");
    let choice = args
        .datastore
        .as_deref()
        .map(DatastoreChoice::parse)
        .unwrap_or_else(|| DatastoreChoice::from_config(&config));
    let result = runtime().block_on(scan::scan_with_drops(
        &config,
        args.common.netns.as_deref(),
        &choice,
        args.drops,
    ));
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
            }
            ExitCode::from(out.summary.exit_code as u8)
        }
        Err(err) => {
            eprintln!("watchdog scan: {err}");
            ExitCode::from(3)
        }
    }
}
