//! Shared by the benchmarks: a network namespace removed on drop, a command runner, and the
//! synthetic large node they measure at scale.
#![allow(dead_code)] // each benchmark uses part of it

use std::{
    fmt::Write as _,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use dataplane_watchdog::model::MacAddr;

pub const DEVICE: &str = "vxlan.calico";

/// A network namespace, removed on drop (even when the benchmark fails half-way).
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
        sh("ip", &["netns", "add", &name], None)?;
        Ok(Netns(name))
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `cmd args` with `stdin` fed in; an error carries the command's stderr.
pub fn sh(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A node named `local` with `peers` remote nodes of `blocks` /26 blocks each, programmed
/// exactly as Felix does, as batch input for `ip`/`bridge`, plus the datastore describing it.
pub struct SyntheticNode {
    /// `ip -batch`: the VXLAN device, its address, a permanent neighbour per peer.
    pub setup: String,
    /// `ip -batch`: every block route, via the peer's VTEP, onlink.
    pub routes: String,
    /// `bridge -batch`: an FDB entry per peer.
    pub fdb: String,
    /// The datastore file (YAML) describing the whole cluster.
    pub yaml: String,
}

impl SyntheticNode {
    pub fn new(peers: usize, blocks: usize) -> Result<SyntheticNode> {
        let mut n = SyntheticNode {
            setup: String::new(),
            routes: String::new(),
            fdb: String::new(),
            yaml: String::from(
                "nodes:\n  - name: local\n    node_ip: 172.16.0.1\n    vtep_ip: 10.63.255.192\n    blocks: [10.63.255.192/26]\n",
            ),
        };
        writeln!(n.setup, "link set lo up")?;
        // As Felix creates it: the node's VTEP MAC (derived from its name) on the device.
        writeln!(
            n.setup,
            "link add {DEVICE} address {} type vxlan id 4096 dstport 4789 nolearning",
            MacAddr::derive_like_felix("local")
        )?;
        writeln!(n.setup, "addr add 10.63.255.192/32 dev {DEVICE}")?;
        writeln!(n.setup, "link set {DEVICE} up")?;
        for p in 0..peers {
            let name = format!("node{p}");
            let node_ip = std::net::Ipv4Addr::from(0xac10_0000u32 + 2 + p as u32);
            let mac = MacAddr::derive_like_felix(&name);
            let nets: Vec<String> = (0..blocks)
                .map(|b| {
                    let base = 0x0a40_0000u32 + ((p * blocks + b) as u32) * 64;
                    format!("{}/26", std::net::Ipv4Addr::from(base))
                })
                .collect();
            let vtep = nets[0].trim_end_matches("/26").to_string();
            for net in &nets {
                writeln!(n.routes, "route add {net} via {vtep} dev {DEVICE} onlink")?;
            }
            writeln!(
                n.setup,
                "neigh add {vtep} lladdr {mac} dev {DEVICE} nud permanent"
            )?;
            writeln!(
                n.fdb,
                "fdb append {mac} dev {DEVICE} dst {node_ip} self permanent"
            )?;
            writeln!(
                n.yaml,
                "  - name: {name}\n    node_ip: {node_ip}\n    vtep_ip: {vtep}\n    blocks: [{}]",
                nets.join(", ")
            )?;
        }
        Ok(n)
    }

    /// Programs device, neighbours and FDB into `ns`; routes too when `with_routes`.
    pub fn program(&self, ns: &Netns, with_routes: bool) -> Result<()> {
        sh("ip", &["-n", &ns.0, "-batch", "-"], Some(&self.setup))?;
        sh("bridge", &["-n", &ns.0, "-batch", "-"], Some(&self.fdb))?;
        if with_routes {
            self.program_routes(ns)?;
        }
        Ok(())
    }

    pub fn program_routes(&self, ns: &Netns) -> Result<()> {
        sh("ip", &["-n", &ns.0, "-batch", "-"], Some(&self.routes))
    }
}
