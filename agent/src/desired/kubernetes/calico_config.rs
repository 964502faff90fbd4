//! What Calico's own configuration says about the overlay: `IPPool`s (which blocks VXLAN
//! carries) and `FelixConfiguration` (VNI, port, MTU, eBPF dataplane). Pure: compact cache
//! entries and the rules that turn them into [`ClusterSettings`] and a per-block verdict.
//!
//! Felix routes a block over VXLAN only when the IP pool containing it has `vxlanMode`
//! `Always` or `CrossSubnet`; blocks of IPIP or no-encap pools go via `tunl0` or the underlay,
//! and blocks that no pool covers any more (the pool was deleted) are not routed at all.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde_json::Value;

use super::LiteObject;
use crate::model::{ClusterSettings, DatastoreProblem, FelixVxlan};

/// How a pool's blocks travel between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolEncap {
    /// `vxlanMode: Always`.
    Vxlan,
    /// `vxlanMode: CrossSubnet`: VXLAN across subnets, direct via the underlay within one.
    VxlanCrossSubnet,
    /// `ipipMode` Always or CrossSubnet (and no VXLAN).
    Ipip,
    /// Neither: routed natively via the underlay.
    NoEncap,
}

impl PoolEncap {
    pub fn is_vxlan(self) -> bool {
        matches!(self, PoolEncap::Vxlan | PoolEncap::VxlanCrossSubnet)
    }

    fn describe(self) -> &'static str {
        match self {
            PoolEncap::Vxlan => "VXLAN",
            PoolEncap::VxlanCrossSubnet => "VXLAN CrossSubnet",
            PoolEncap::Ipip => "IPIP",
            PoolEncap::NoEncap => "no-encap",
        }
    }
}

/// An IPPool reduced to what routing depends on, still as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolInfo {
    pub cidr: Option<String>,
    pub vxlan_mode: Option<String>,
    pub ipip_mode: Option<String>,
}

impl PoolInfo {
    pub fn from_object(obj: &LiteObject) -> Self {
        let s = |k: &str| obj.spec.get(k).and_then(Value::as_str).map(str::to_string);
        // crd.projectcalico.org/v1 pools written by old Calico releases carry
        // `ipip: {enabled, mode}` instead of `ipipMode`.
        let legacy_ipip = obj.spec.get("ipip").and_then(|i| {
            let enabled = i.get("enabled").and_then(Value::as_bool).unwrap_or(false);
            enabled.then(|| {
                i.get("mode")
                    .and_then(Value::as_str)
                    .unwrap_or("Always")
                    .to_string()
            })
        });
        PoolInfo {
            cidr: s("cidr"),
            vxlan_mode: s("vxlanMode"),
            ipip_mode: s("ipipMode").or(legacy_ipip),
        }
    }
}

/// A FelixConfiguration's overlay settings, as written (`0` means "auto" for the MTUs).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FelixConfigInfo {
    pub vxlan_vni: Option<Value>,
    pub vxlan_port: Option<Value>,
    pub vxlan_mtu: Option<Value>,
    pub vxlan_mtu_v6: Option<Value>,
    pub bpf_enabled: Option<Value>,
}

impl FelixConfigInfo {
    pub fn from_object(obj: &LiteObject) -> Self {
        let v = |k: &str| obj.spec.get(k).filter(|v| !v.is_null()).cloned();
        FelixConfigInfo {
            vxlan_vni: v("vxlanVNI"),
            vxlan_port: v("vxlanPort"),
            vxlan_mtu: v("vxlanMTU"),
            vxlan_mtu_v6: v("vxlanMTUV6"),
            bpf_enabled: v("bpfEnabled"),
        }
    }
}

/// The pools, validated, most specific first.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    pools: Vec<(IpNet, PoolEncap, String)>,
}

impl Pools {
    /// Bad pools are reported and left out: their blocks count as outside every pool.
    pub fn build(items: &BTreeMap<String, PoolInfo>, problems: &mut Vec<DatastoreProblem>) -> Self {
        let mut pools = Vec::new();
        for (name, p) in items {
            let object = format!("IPPool/{name}");
            let mut bad = |field: &str, message: String| {
                problems.push(DatastoreProblem {
                    object: object.clone(),
                    node: None,
                    field: field.to_string(),
                    message,
                })
            };
            let cidr = match p.cidr.as_deref().map(|c| c.trim().parse::<IpNet>()) {
                Some(Ok(c)) => c.trunc(),
                Some(Err(e)) => {
                    bad(
                        "spec.cidr",
                        format!("{:?} is not a CIDR: {e}", p.cidr.as_deref().unwrap_or("")),
                    );
                    continue;
                }
                None => {
                    bad("spec.cidr", "missing".to_string());
                    continue;
                }
            };
            let mode = |m: &Option<String>, field: &str, bad: &mut dyn FnMut(&str, String)| match m
                .as_deref()
                .map(str::trim)
            {
                None | Some("") | Some("Never") => Some(false),
                Some("Always") => Some(true),
                Some("CrossSubnet") => None,
                Some(other) => {
                    bad(
                        field,
                        format!("{other:?} is not Always, CrossSubnet or Never"),
                    );
                    Some(false)
                }
            };
            let encap = match mode(&p.vxlan_mode, "spec.vxlanMode", &mut bad) {
                Some(true) => PoolEncap::Vxlan,
                None => PoolEncap::VxlanCrossSubnet,
                Some(false) => match mode(&p.ipip_mode, "spec.ipipMode", &mut bad) {
                    Some(false) => PoolEncap::NoEncap,
                    _ => PoolEncap::Ipip,
                },
            };
            pools.push((cidr, encap, name.clone()));
        }
        pools.sort_by_key(|(net, _, _)| std::cmp::Reverse(net.prefix_len()));
        Pools { pools }
    }

    /// The pool a block (or a borrowed address) belongs to: the most specific one containing it.
    pub fn of(&self, net: &IpNet) -> Option<(PoolEncap, &str)> {
        self.pools
            .iter()
            .find(|(p, _, _)| p.contains(net))
            .map(|(_, e, name)| (*e, name.as_str()))
    }

    /// `None`: carried by VXLAN. `Some(why)`: not, and why (for logs and notes).
    pub fn off_overlay_reason(&self, net: &IpNet) -> Option<String> {
        match self.of(net) {
            Some((e, _)) if e.is_vxlan() => None,
            Some((e, name)) => Some(format!("in {} pool {name}", e.describe())),
            None => Some("in no IP pool (deleted pool)".to_string()),
        }
    }
}

/// FelixConfiguration `default`, overridden field by field by `node.<name>`; resolved for
/// `local_node` (again later if the local node is found by address).
pub fn cluster_settings(
    felix: &BTreeMap<String, FelixConfigInfo>,
    local_node: &str,
    problems: &mut Vec<DatastoreProblem>,
) -> ClusterSettings {
    let mut out = ClusterSettings::default();
    for (name, fc) in felix {
        let node = name.strip_prefix("node.");
        if name != "default" && node.is_none() {
            continue; // Other names are not Felix's to apply.
        }
        let settings = felix_vxlan(&format!("FelixConfiguration/{name}"), fc, problems);
        match node {
            Some(node) => {
                out.felix_nodes.insert(node.to_string(), settings);
            }
            None => out.felix_default = settings,
        }
    }
    out.resolve_for(local_node);
    if felix.contains_key("default") || !out.felix_nodes.is_empty() {
        out.notes.push(format!(
            "VXLAN settings from FelixConfiguration/default{} (they override the config keys)",
            if out.felix_nodes.is_empty() {
                String::new()
            } else {
                format!(" and {} node override(s)", out.felix_nodes.len())
            }
        ));
    }
    out
}

fn felix_vxlan(
    object: &str,
    fc: &FelixConfigInfo,
    problems: &mut Vec<DatastoreProblem>,
) -> FelixVxlan {
    let mut bad = |field: &str, message: String| {
        problems.push(DatastoreProblem {
            object: object.to_string(),
            node: None,
            field: format!("spec.{field}"),
            message,
        })
    };
    let mut num = |v: &Option<Value>, field: &str, min: u64, max: u64| -> Option<u64> {
        let v = v.as_ref()?;
        match v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        {
            Some(0) if field.contains("MTU") => None, // 0: auto-detected
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                bad(
                    field,
                    format!("{v} is not a number in {min}..={max}; ignored"),
                );
                None
            }
        }
    };
    let out = FelixVxlan {
        vxlan_vni: num(&fc.vxlan_vni, "vxlanVNI", 1, (1 << 24) - 1).map(|n| n as u32),
        vxlan_port: num(&fc.vxlan_port, "vxlanPort", 1, 65535).map(|n| n as u16),
        vxlan_mtu: num(&fc.vxlan_mtu, "vxlanMTU", 68, 65535).map(|n| n as u32),
        vxlan_mtu_v6: num(&fc.vxlan_mtu_v6, "vxlanMTUV6", 1280, 65535).map(|n| n as u32),
        bpf_enabled: match &fc.bpf_enabled {
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                bad("bpfEnabled", format!("{other} is not a boolean; ignored"));
                None
            }
            None => None,
        },
    };
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lite(spec: Value) -> LiteObject {
        serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": spec})).unwrap()
    }

    fn pools(items: &[(&str, Value)]) -> (Pools, Vec<DatastoreProblem>) {
        let items = items
            .iter()
            .map(|(n, spec)| (n.to_string(), PoolInfo::from_object(&lite(spec.clone()))))
            .collect();
        let mut problems = Vec::new();
        (Pools::build(&items, &mut problems), problems)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_are_classified_by_the_most_specific_pool() {
        let (p, problems) = pools(&[
            ("wide", json!({"cidr": "10.0.0.0/8", "vxlanMode": "Always"})),
            ("ipip", json!({"cidr": "10.2.0.0/16", "ipipMode": "Always"})),
            (
                "cross",
                json!({"cidr": "10.3.0.0/16", "vxlanMode": "CrossSubnet"}),
            ),
            ("plain", json!({"cidr": "10.4.0.0/16"})),
            (
                "legacy",
                json!({"cidr": "10.5.0.0/16", "ipip": {"enabled": true}}),
            ),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(p.of(&net("10.1.0.0/26")).unwrap().0, PoolEncap::Vxlan);
        assert_eq!(
            p.of(&net("10.2.3.0/26")).unwrap(),
            (PoolEncap::Ipip, "ipip")
        );
        assert_eq!(
            p.of(&net("10.3.0.64/26")).unwrap().0,
            PoolEncap::VxlanCrossSubnet
        );
        assert_eq!(p.of(&net("10.4.0.0/26")).unwrap().0, PoolEncap::NoEncap);
        assert_eq!(p.of(&net("10.5.0.0/26")).unwrap().0, PoolEncap::Ipip);
        assert_eq!(p.off_overlay_reason(&net("10.3.0.64/26")), None);
        assert_eq!(
            p.off_overlay_reason(&net("192.168.0.0/26")).as_deref(),
            Some("in no IP pool (deleted pool)")
        );
        assert_eq!(
            p.off_overlay_reason(&net("10.2.0.7/32")).as_deref(),
            Some("in IPIP pool ipip")
        );
    }

    #[test]
    fn a_bad_pool_is_a_problem_and_left_out() {
        let (p, problems) = pools(&[
            ("nocidr", json!({"vxlanMode": "Always"})),
            (
                "typo",
                json!({"cidr": "10.9.0.0/16", "vxlanMode": "Allways"}),
            ),
        ]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].object, "IPPool/nocidr");
        assert!(problems[1].message.contains("\"Allways\""), "{problems:?}");
        // A mode it cannot read is not taken as VXLAN: no expectations rather than false ones.
        assert_eq!(p.of(&net("10.9.0.0/26")).unwrap().0, PoolEncap::NoEncap);
    }

    #[test]
    fn the_node_configuration_overrides_the_default_field_by_field() {
        let felix: BTreeMap<String, FelixConfigInfo> = [
            (
                "default",
                json!({"vxlanVNI": 1, "vxlanPort": 8472, "vxlanMTU": 0, "bpfEnabled": false}),
            ),
            ("node.k8s01", json!({"vxlanMTU": 1400, "bpfEnabled": true})),
            ("node.k8s02", json!({"vxlanVNI": 7})),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), FelixConfigInfo::from_object(&lite(s))))
        .collect();
        let mut problems = Vec::new();
        let s = cluster_settings(&felix, "k8s01", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let f = s.felix;
        assert_eq!(f.vxlan_vni, Some(1));
        assert_eq!(f.vxlan_port, Some(8472));
        assert_eq!(f.vxlan_mtu, Some(1400));
        assert_eq!(f.bpf_enabled, Some(true));
        assert!(s.notes[0].contains("2 node override(s)"), "{s:?}");
        // Resolved again for another node (the local node found by address).
        let mut s = s;
        s.resolve_for("k8s02");
        assert_eq!((s.felix.vxlan_vni, s.felix.vxlan_mtu), (Some(7), None));
    }

    #[test]
    fn bad_felix_values_are_problems_not_settings() {
        let felix: BTreeMap<String, FelixConfigInfo> = [(
            "default".to_string(),
            FelixConfigInfo::from_object(&lite(
                json!({"vxlanVNI": 0, "vxlanPort": "http", "bpfEnabled": "yes"}),
            )),
        )]
        .into_iter()
        .collect();
        let mut problems = Vec::new();
        let s = cluster_settings(&felix, "k8s01", &mut problems);
        assert_eq!(
            (s.felix.vxlan_vni, s.felix.vxlan_port, s.felix.bpf_enabled),
            (None, None, None)
        );
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.vxlanVNI", "spec.vxlanPort", "spec.bpfEnabled"]
        );
    }
}
