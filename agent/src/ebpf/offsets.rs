//! Kernel struct offsets and the drop reason name table, both read from BTF at run time:
//! layouts and `enum skb_drop_reason` numbering differ between kernel builds.

use std::collections::BTreeMap;

use agent_ebpf::globals;

use super::btf::{Btf, BtfError};

/// Byte offsets the kernel programs read at, as `.rodata` globals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_dev: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_protocol: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
    pub neigh_dev: u32,
    pub neigh_nud_state: u32,
    pub neigh_primary_key: u32,
    pub neigh_tbl: u32,
    pub neigh_table_family: u32,
}

impl KernelOffsets {
    /// Resolves every offset and checks each member has the width the programs load.
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let sized = |container: &str, path: &str, expected: u32| {
            let m = btf.member(container, path)?;
            if m.size != expected {
                return Err(BtfError::UnexpectedSize {
                    path: format!("{container}.{path}"),
                    expected,
                    found: m.size,
                });
            }
            Ok(m.offset)
        };
        Ok(KernelOffsets {
            skb_dev: sized("sk_buff", "dev", 8)?,
            skb_head: sized("sk_buff", "head", 8)?,
            skb_network_header: sized("sk_buff", "network_header", 2)?,
            skb_protocol: sized("sk_buff", "protocol", 2)?,
            dev_ifindex: sized("net_device", "ifindex", 4)?,
            // possible_net_t is a struct whose only member is `net` (absent without
            // CONFIG_NET_NS, which this agent does not support).
            dev_nd_net: sized("net_device", "nd_net.net", 8)?,
            net_ns_inum: sized("net", "ns.inum", 4)?,
            neigh_dev: sized("neighbour", "dev", 8)?,
            neigh_nud_state: sized("neighbour", "nud_state", 1)?,
            neigh_primary_key: btf.offset_of("neighbour", "primary_key")?,
            neigh_tbl: sized("neighbour", "tbl", 8)?,
            neigh_table_family: sized("neigh_table", "family", 4)?,
        })
    }

    /// (global name, value) pairs for `EbpfLoader::override_global`.
    pub fn globals(&self) -> [(&'static str, u32); 12] {
        [
            (globals::OFFSET_SKB_DEV, self.skb_dev),
            (globals::OFFSET_SKB_HEAD, self.skb_head),
            (globals::OFFSET_SKB_NETWORK_HEADER, self.skb_network_header),
            (globals::OFFSET_SKB_PROTOCOL, self.skb_protocol),
            (globals::OFFSET_DEV_IFINDEX, self.dev_ifindex),
            (globals::OFFSET_DEV_ND_NET, self.dev_nd_net),
            (globals::OFFSET_NET_NS_INUM, self.net_ns_inum),
            (globals::OFFSET_NEIGH_DEV, self.neigh_dev),
            (globals::OFFSET_NEIGH_NUD_STATE, self.neigh_nud_state),
            (globals::OFFSET_NEIGH_PRIMARY_KEY, self.neigh_primary_key),
            (globals::OFFSET_NEIGH_TBL, self.neigh_tbl),
            (globals::OFFSET_NEIGH_TABLE_FAMILY, self.neigh_table_family),
        ]
    }
}

const REASON_PREFIX: &str = "SKB_DROP_REASON_";

/// `enum skb_drop_reason` value → name without the `SKB_DROP_REASON_` prefix (`NEIGH_FAILED`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropReasons(BTreeMap<u32, String>);

impl DropReasons {
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        Ok(Self::from_values(btf.enum_values("skb_drop_reason")?))
    }

    /// Builds the table from enumerators; the `*_MAX` sentinel is not a reason.
    pub fn from_values(values: impl IntoIterator<Item = (String, i64)>) -> Self {
        DropReasons(
            values
                .into_iter()
                .filter(|(name, _)| name != "SKB_DROP_REASON_MAX")
                .filter_map(|(name, value)| {
                    let code = u32::try_from(value).ok()?;
                    let short = name.strip_prefix(REASON_PREFIX).unwrap_or(&name);
                    let short = short.strip_prefix("SKB_").unwrap_or(short);
                    Some((code, short.to_string()))
                })
                .collect(),
        )
    }

    /// The kernel's name for `code`, or `UNKNOWN_<code>` (e.g. a subsystem-encoded reason).
    pub fn name(&self, code: u32) -> String {
        self.0
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("UNKNOWN_{code:#x}"))
    }

    /// Whether this kernel has a reason with this code.
    pub fn contains(&self, code: u32) -> bool {
        self.0.contains_key(&code)
    }

    /// The code of a named reason (short or full name), for tests and filters.
    pub fn code(&self, name: &str) -> Option<u32> {
        let short = name.strip_prefix(REASON_PREFIX).unwrap_or(name);
        self.0.iter().find(|(_, n)| *n == short).map(|(c, _)| *c)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ebpf::btf::tests::{BtfBuilder, STRUCT, UNION};

    #[test]
    fn offsets_from_hand_built_btf() {
        let mut b = BtfBuilder::new();
        let u8_t = b.int("u8", 1);
        let u16_t = b.int("u16", 2);
        let u32_t = b.int("u32", 4);
        let int_t = b.int("int", 4);
        let opaque = b.structure(STRUCT, "", 0, &[]);
        let p = b.ptr(opaque);
        let dev_union = b.structure(
            UNION,
            "",
            8,
            &[("dev", p, 0, 0), ("dev_scratch", u32_t, 0, 0)],
        );
        let headers = b.structure(
            STRUCT,
            "",
            8,
            &[("protocol", u16_t, 0, 0), ("network_header", u16_t, 32, 0)],
        );
        let group = b.structure(
            UNION,
            "",
            8,
            &[("", headers, 0, 0), ("headers", headers, 0, 0)],
        );
        b.structure(
            STRUCT,
            "sk_buff",
            64,
            &[
                ("", dev_union, 128, 0),
                ("", group, 192, 0),
                ("head", p, 320, 0),
            ],
        );
        let possible = b.structure(STRUCT, "", 8, &[("net", p, 0, 0)]);
        let possible_t = b.typedef("possible_net_t", possible);
        b.structure(
            STRUCT,
            "net_device",
            256,
            &[("ifindex", int_t, 224, 0), ("nd_net", possible_t, 1024, 0)],
        );
        let ns = b.structure(STRUCT, "ns_common", 24, &[("inum", u32_t, 128, 0)]);
        b.structure(STRUCT, "net", 128, &[("ns", ns, 512, 0)]);
        let key = b.int("u8key", 1);
        b.structure(
            STRUCT,
            "neighbour",
            96,
            &[
                ("tbl", p, 64, 0),
                ("nud_state", u8_t, 320, 0),
                ("dev", p, 640, 0),
                ("primary_key", key, 768, 0),
            ],
        );
        b.structure(STRUCT, "neigh_table", 64, &[("family", int_t, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        let o = KernelOffsets::from_btf(&btf).unwrap();
        assert_eq!(
            o,
            KernelOffsets {
                skb_dev: 16,
                skb_head: 40,
                skb_network_header: 28,
                skb_protocol: 24,
                dev_ifindex: 28,
                dev_nd_net: 128,
                net_ns_inum: 80,
                neigh_dev: 80,
                neigh_nud_state: 40,
                neigh_primary_key: 96,
                neigh_tbl: 8,
                neigh_table_family: 0,
            }
        );
    }

    #[test]
    fn wrong_member_width_is_an_error_not_a_silent_misread() {
        let mut b = BtfBuilder::new();
        let u32_t = b.int("u32", 4);
        b.structure(STRUCT, "sk_buff", 8, &[("dev", u32_t, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        match KernelOffsets::from_btf(&btf) {
            Err(BtfError::UnexpectedSize {
                path,
                expected: 8,
                found: 4,
            }) => {
                assert_eq!(path, "sk_buff.dev")
            }
            other => panic!("expected UnexpectedSize, got {other:?}"),
        }
    }

    #[test]
    fn reason_names_strip_prefix_and_skip_max() {
        let r = DropReasons::from_values([
            ("SKB_NOT_DROPPED_YET".to_string(), 0),
            ("SKB_CONSUMED".to_string(), 1),
            ("SKB_DROP_REASON_NEIGH_FAILED".to_string(), 73),
            ("SKB_DROP_REASON_MAX".to_string(), 120),
        ]);
        assert_eq!(r.name(73), "NEIGH_FAILED");
        assert_eq!(r.name(0), "NOT_DROPPED_YET");
        assert_eq!(r.name(1), "CONSUMED");
        assert_eq!(r.name(120), "UNKNOWN_0x78");
        assert_eq!(r.code("SKB_DROP_REASON_NEIGH_FAILED"), Some(73));
        assert_eq!(r.code("NEIGH_FAILED"), Some(73));
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn this_kernel_offsets_and_reasons() {
        if !Path::new(crate::ebpf::btf::VMLINUX_BTF).exists() {
            eprintln!("skipping: no vmlinux BTF");
            return;
        }
        let btf = Btf::from_sys().unwrap();
        let o = KernelOffsets::from_btf(&btf).unwrap();
        // Facts that hold for every 64-bit kernel since 5.x: dev sits after next/prev.
        assert_eq!(o.skb_dev, 16);
        assert_eq!(o.neigh_table_family, 0);
        // include/linux/skbuff.h: transport_header, network_header, mac_header are adjacent u16s.
        assert_eq!(
            btf.offset_of("sk_buff", "mac_header").unwrap(),
            o.skb_network_header + 2
        );
        let r = DropReasons::from_btf(&btf).unwrap();
        eprintln!("offsets on this kernel: {o:?}");
        for name in ["NEIGH_FAILED", "NEIGH_QUEUEFULL", "NO_TX_TARGET"] {
            eprintln!("{name} = {:?}", r.code(name));
        }
        for name in [
            "NEIGH_FAILED",
            "NEIGH_QUEUEFULL",
            "NO_TX_TARGET",
            "NOT_SPECIFIED",
        ] {
            let code = r.code(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(r.name(code), name);
        }
        assert!(r.len() > 50, "only {} reasons", r.len());
    }
}
