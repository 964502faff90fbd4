//! A hand-built BTF blob ([`BtfBuilder`], which the offsets tests use too) and the parser
//! checked against it and against this kernel's vmlinux.

use super::*;

/// Builds a BTF blob by hand: strings first, then types as raw u32 words.
#[derive(Default)]
pub(crate) struct BtfBuilder {
    strings: Vec<u8>,
    words: Vec<u32>,
    next_id: u32,
}

impl BtfBuilder {
    pub(crate) fn new() -> Self {
        BtfBuilder {
            strings: vec![0],
            words: Vec::new(),
            next_id: 1,
        }
    }

    pub(crate) fn str(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }

    fn push(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size: u32) -> u32 {
        let name_off = self.str(name);
        let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
        self.words.extend([name_off, info, size]);
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
        let id = self.push(name, KIND_INT, 0, false, size);
        self.words.push(size * 8);
        id
    }

    pub(crate) fn ptr(&mut self, target: u32) -> u32 {
        self.push("", KIND_PTR, 0, false, target)
    }

    pub(crate) fn typedef(&mut self, name: &str, target: u32) -> u32 {
        self.push(name, KIND_TYPEDEF, 0, false, target)
    }

    /// Members as (name, type, bit offset[, bitfield size]).
    pub(crate) fn structure(
        &mut self,
        kind: u32,
        name: &str,
        size: u32,
        members: &[(&str, u32, u32, u32)],
    ) -> u32 {
        let kflag = members.iter().any(|m| m.3 != 0);
        let id = self.push(name, kind, members.len() as u32, kflag, size);
        for &(n, ty, bits, bitfield) in members {
            let name_off = self.str(n);
            let off = if kflag { bitfield << 24 | bits } else { bits };
            self.words.extend([name_off, ty, off]);
        }
        id
    }

    pub(crate) fn enumeration(&mut self, name: &str, values: &[(&str, i32)]) -> u32 {
        let id = self.push(name, KIND_ENUM, values.len() as u32, true, 4);
        for &(n, v) in values {
            let name_off = self.str(n);
            self.words.extend([name_off, v as u32]);
        }
        id
    }

    pub(crate) fn enumeration64(&mut self, name: &str, values: &[(&str, u64)]) -> u32 {
        let id = self.push(name, KIND_ENUM64, values.len() as u32, false, 8);
        for &(n, v) in values {
            let name_off = self.str(n);
            self.words.extend([name_off, v as u32, (v >> 32) as u32]);
        }
        id
    }

    pub(crate) fn build(&self) -> Vec<u8> {
        let types: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for w in [24u32, 0, types.len() as u32, types.len() as u32] {
            out.extend(w.to_le_bytes());
        }
        out.extend((self.strings.len() as u32).to_le_bytes());
        out.extend(types);
        out.extend(&self.strings);
        out
    }
}

pub(crate) const STRUCT: u32 = KIND_STRUCT;
pub(crate) const UNION: u32 = KIND_UNION;

/// A miniature of the kernel shapes we rely on: `sk_buff.dev` inside an anonymous union
/// inside an anonymous struct, `possible_net_t` behind a typedef, a bitfield, enums.
fn mini() -> Btf {
    let mut b = BtfBuilder::new();
    let u32_t = b.int("unsigned int", 4);
    let u8_t = b.int("unsigned char", 1);
    // What `dev` points to does not matter for offsets.
    let net_dev = b.structure(STRUCT, "", 0, &[]);
    let dev_ptr = b.ptr(net_dev);
    let inner_union = b.structure(
        UNION,
        "",
        8,
        &[("dev", dev_ptr, 0, 0), ("dev_scratch", u32_t, 0, 0)],
    );
    let anon_struct = b.structure(
        STRUCT,
        "",
        24,
        &[
            ("next", dev_ptr, 0, 0),
            ("prev", dev_ptr, 64, 0),
            ("", inner_union, 128, 0),
        ],
    );
    let outer_union = b.structure(
        UNION,
        "",
        24,
        &[("", anon_struct, 0, 0), ("rbnode", u32_t, 0, 0)],
    );
    b.structure(
        STRUCT,
        "sk_buff",
        40,
        &[
            ("", outer_union, 0, 0),
            ("flags", u8_t, 192, 3),
            ("mark", u32_t, 224, 0),
            ("len", u32_t, 256, 0),
        ],
    );
    let ns_common = b.structure(
        STRUCT,
        "ns_common",
        16,
        &[("stashed", dev_ptr, 0, 0), ("inum", u32_t, 64, 0)],
    );
    let net = b.structure(
        STRUCT,
        "net",
        64,
        &[("refcnt", u32_t, 0, 0), ("ns", ns_common, 256, 0)],
    );
    let net_ptr = b.ptr(net);
    let possible = b.structure(STRUCT, "", 8, &[("net", net_ptr, 0, 0)]);
    let possible_t = b.typedef("possible_net_t", possible);
    b.structure(
        STRUCT,
        "net_dev_real",
        128,
        &[("ifindex", u32_t, 96, 0), ("nd_net", possible_t, 640, 0)],
    );
    b.enumeration(
        "skb_drop_reason",
        &[
            ("SKB_NOT_DROPPED_YET", 0),
            ("SKB_DROP_REASON_NEIGH_FAILED", 73),
            ("SKB_DROP_REASON_NEIGH_QUEUEFULL", 74),
        ],
    );
    b.enumeration64("big", &[("HUGE", 1 << 40)]);
    Btf::parse(&b.build()).expect("hand-built BTF parses")
}

#[test]
fn resolves_members_through_anonymous_unions_and_typedefs() {
    let btf = mini();
    assert_eq!(
        btf.member("sk_buff", "dev").unwrap(),
        MemberInfo {
            offset: 16,
            size: 8
        }
    );
    assert_eq!(btf.offset_of("sk_buff", "mark").unwrap(), 28);
    assert_eq!(btf.offset_of("net_dev_real", "ifindex").unwrap(), 12);
    assert_eq!(
        btf.member("net_dev_real", "nd_net.net").unwrap(),
        MemberInfo {
            offset: 80,
            size: 8
        }
    );
    assert_eq!(
        btf.member("net", "ns.inum").unwrap(),
        MemberInfo {
            offset: 40,
            size: 4
        }
    );
    assert_eq!(btf.struct_size("sk_buff").unwrap(), 40);
}

#[test]
fn rejects_bitfields_and_missing_members() {
    let btf = mini();
    assert!(matches!(
        btf.member("sk_buff", "flags"),
        Err(BtfError::Bitfield(_))
    ));
    match btf.member("sk_buff", "nope") {
        Err(BtfError::NoSuchMember { member, .. }) => assert_eq!(member, "nope"),
        other => panic!("expected NoSuchMember, got {other:?}"),
    }
    assert!(matches!(
        btf.member("sk_buff", "len.x"),
        Err(BtfError::NotAStruct { .. })
    ));
    assert!(matches!(
        btf.member("nothing", "x"),
        Err(BtfError::NoSuchStruct(_))
    ));
}

#[test]
fn reads_enum_and_enum64_values() {
    let btf = mini();
    assert_eq!(
        btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NEIGH_QUEUEFULL")
            .unwrap(),
        74
    );
    assert_eq!(btf.enum_values("skb_drop_reason").unwrap().len(), 3);
    assert_eq!(btf.enum_value("big", "HUGE").unwrap(), 1 << 40);
    assert!(matches!(
        btf.enum_value("skb_drop_reason", "X"),
        Err(BtfError::NoSuchEnumValue { .. })
    ));
}

#[test]
fn rejects_garbage() {
    assert!(matches!(
        Btf::parse(&[0u8; 10]),
        Err(BtfError::Malformed(_))
    ));
    assert!(matches!(
        Btf::parse(&[0u8; 40]),
        Err(BtfError::Malformed(_))
    ));
    let mut blob = mini_blob_truncated();
    blob.truncate(blob.len() - 1);
    assert!(Btf::parse(&blob).is_err());
}

fn mini_blob_truncated() -> Vec<u8> {
    let mut b = BtfBuilder::new();
    let u32_t = b.int("int", 4);
    b.structure(STRUCT, "s", 4, &[("a", u32_t, 0, 0)]);
    let mut blob = b.build();
    // Claim a longer type section than exists.
    let type_len = u32::from_le_bytes(blob[12..16].try_into().unwrap()) + 4;
    blob[12..16].copy_from_slice(&type_len.to_le_bytes());
    blob
}

/// The running kernel's BTF: the members the programs need exist and look sane.
#[test]
fn parses_this_kernels_vmlinux() {
    if !Path::new(VMLINUX_BTF).exists() {
        eprintln!("skipping: {VMLINUX_BTF} absent");
        return;
    }
    let btf = Btf::from_sys().unwrap();
    let dev = btf.member("sk_buff", "dev").unwrap();
    assert_eq!(dev.size, 8);
    assert_eq!(btf.member("net_device", "ifindex").unwrap().size, 4);
    assert_eq!(btf.member("net_device", "nd_net.net").unwrap().size, 8);
    assert_eq!(btf.member("net", "ns.inum").unwrap().size, 4);
    assert_eq!(btf.member("sk_buff", "network_header").unwrap().size, 2);
    assert_eq!(btf.member("neighbour", "nud_state").unwrap().size, 1);
    let reasons = btf.enum_values("skb_drop_reason").unwrap();
    assert!(reasons
        .iter()
        .any(|(n, _)| n == "SKB_DROP_REASON_NEIGH_FAILED"));
    assert!(btf.has_typedef("btf_trace_kfree_skb"));
    let iphdr = btf.struct_id("iphdr").unwrap();
    assert_eq!(btf.offset_of("iphdr", "daddr").unwrap(), 16);
    assert_eq!(btf.struct_size("iphdr").unwrap(), 20);
    assert_eq!(btf.member("in_addr", "s_addr").unwrap().offset, 0);
    assert_eq!(btf.struct_size("in_addr").unwrap(), 4);
    // The IPv6 layouts the programs hard-code (UAPI).
    assert_eq!(btf.offset_of("ipv6hdr", "nexthdr").unwrap(), 6);
    assert_eq!(btf.offset_of("ipv6hdr", "daddr").unwrap(), 24);
    assert_eq!(btf.struct_size("ipv6hdr").unwrap(), 40);
    assert_eq!(btf.struct_size("in6_addr").unwrap(), 16);
    assert_ne!(btf.func_id("bpf_rdonly_cast"), Some(iphdr));
    assert_eq!(btf.func_id("no_such_kfunc_anywhere"), None);
}
