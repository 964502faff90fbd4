//! The object as this kernel gets it: the embedded ELF, its `bpf_rdonly_cast` placeholder
//! patched to what the kernel offers, and the BTF type ids the programs' globals carry.

use agent_ebpf::{
    globals, kfunc_call_insn, RDONLY_CAST_FALLBACK_INSN, RDONLY_CAST_PLACEHOLDER_INSN,
};

use crate::ebpf::btf::Btf;

/// The kernel programs, built by agent/build.rs. Empty when built without bpf-linker.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// How the programs read the inner IPv4/IPv6 destination (kfree_skb) and a neighbour's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderRead {
    /// A direct load through `bpf_rdonly_cast` (ids from vmlinux BTF): no helper call. The
    /// neighbour programs read the gateway address the same way.
    DirectLoad {
        rdonly_cast: u32,
        iphdr: u32,
        in_addr: u32,
        ipv6hdr: u32,
        in6_addr: u32,
    },
    /// `bpf_probe_read_kernel` (kernels without the kfunc, or if it was refused).
    ProbeRead,
}

impl HeaderRead {
    /// DirectLoad when vmlinux BTF has the kfunc, `struct iphdr`, `struct in_addr`, `struct
    /// ipv6hdr` and `struct in6_addr` (every kernel with the kfunc has all four).
    pub(super) fn detect(btf: &Btf) -> Self {
        match (
            btf.func_id("bpf_rdonly_cast"),
            btf.struct_id("iphdr"),
            btf.struct_id("in_addr"),
            btf.struct_id("ipv6hdr"),
            btf.struct_id("in6_addr"),
        ) {
            (Some(rdonly_cast), Some(iphdr), Some(in_addr), Some(ipv6hdr), Some(in6_addr)) => {
                HeaderRead::DirectLoad {
                    rdonly_cast,
                    iphdr,
                    in_addr,
                    ipv6hdr,
                    in6_addr,
                }
            }
            _ => HeaderRead::ProbeRead,
        }
    }

    /// Values of the `BTF_ID_*` globals: 0 selects the probe-read path in the programs.
    pub(super) fn type_ids(self) -> [(&'static str, u32); 4] {
        let ids = match self {
            HeaderRead::DirectLoad {
                iphdr,
                in_addr,
                ipv6hdr,
                in6_addr,
                ..
            } => [iphdr, in_addr, ipv6hdr, in6_addr],
            HeaderRead::ProbeRead => [0; 4],
        };
        [
            (globals::BTF_ID_IPHDR, ids[0]),
            (globals::BTF_ID_IN_ADDR, ids[1]),
            (globals::BTF_ID_IPV6HDR, ids[2]),
            (globals::BTF_ID_IN6_ADDR, ids[3]),
        ]
    }

    /// A copy of `object` with every placeholder kfunc call replaced: by the real call, or by
    /// a register move in a branch the verifier then never visits.
    pub(super) fn patch(self, object: &[u8]) -> Result<AlignedObject, String> {
        let replacement = match self {
            HeaderRead::DirectLoad { rdonly_cast, .. } => kfunc_call_insn(rdonly_cast),
            HeaderRead::ProbeRead => RDONLY_CAST_FALLBACK_INSN,
        };
        let mut out = AlignedObject::new(object);
        let patched = replace_insn(
            out.as_bytes_mut(),
            RDONLY_CAST_PLACEHOLDER_INSN,
            replacement,
        );
        if patched == 0 {
            return Err("no bpf_rdonly_cast placeholder instruction found".into());
        }
        Ok(out)
    }
}

/// Replaces every 8-aligned occurrence of the little-endian instruction `from` (BPF text is
/// 8-aligned in the ELF); returns how many.
fn replace_insn(bytes: &mut [u8], from: u64, to: u64) -> usize {
    let (from, to) = (from.to_le_bytes(), to.to_le_bytes());
    let mut n = 0;
    for chunk in bytes.chunks_exact_mut(8) {
        if chunk == from {
            chunk.copy_from_slice(&to);
            n += 1;
        }
    }
    n
}

/// An ELF object copied into 8-aligned memory (the ELF parser reads it in place, as
/// `include_bytes_aligned!` provides for the embedded one).
pub(super) struct AlignedObject {
    words: Vec<u64>,
    len: usize,
}

impl AlignedObject {
    fn new(bytes: &[u8]) -> Self {
        let mut out = AlignedObject {
            words: vec![0u64; bytes.len().div_ceil(8)],
            len: bytes.len(),
        };
        out.as_bytes_mut().copy_from_slice(bytes);
        out
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        // SAFETY: u64 has no invalid bit patterns and `len` never exceeds the allocation.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`; any byte pattern is a valid u64.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kfunc_placeholder_is_patched_in_place_and_only_when_aligned() {
        let placeholder = RDONLY_CAST_PLACEHOLDER_INSN.to_le_bytes();
        let mut object = vec![0xaa; 8];
        object.extend_from_slice(&placeholder);
        object.extend_from_slice(&[1, 2, 3]);
        // An unaligned copy of the bytes (not an instruction) stays untouched.
        let mut unaligned = object.clone();
        unaligned.insert(0, 0);

        let direct = HeaderRead::DirectLoad {
            rdonly_cast: 0x1234,
            iphdr: 7,
            in_addr: 9,
            ipv6hdr: 11,
            in6_addr: 13,
        };
        let patched = direct.patch(&object).unwrap();
        let bytes = patched.as_bytes();
        assert_eq!(bytes.len(), object.len());
        assert_eq!(bytes.as_ptr() as usize % 8, 0);
        // call, src_reg = BPF_PSEUDO_KFUNC_CALL (2), imm = the kfunc's BTF id.
        assert_eq!(&bytes[8..16], &[0x85, 0x20, 0, 0, 0x34, 0x12, 0, 0]);
        assert_eq!(&bytes[..8], &object[..8]);
        assert_eq!(&bytes[16..], &[1, 2, 3]);
        assert_eq!(
            direct.type_ids(),
            [
                (globals::BTF_ID_IPHDR, 7),
                (globals::BTF_ID_IN_ADDR, 9),
                (globals::BTF_ID_IPV6HDR, 11),
                (globals::BTF_ID_IN6_ADDR, 13)
            ]
        );

        let fallback = HeaderRead::ProbeRead.patch(&object).unwrap();
        // r0 = r1
        assert_eq!(&fallback.as_bytes()[8..16], &[0xbf, 0x10, 0, 0, 0, 0, 0, 0]);
        assert!(HeaderRead::ProbeRead
            .type_ids()
            .iter()
            .all(|(_, id)| *id == 0));

        assert!(HeaderRead::ProbeRead.patch(&unaligned).is_err());
        assert!(HeaderRead::ProbeRead.patch(&[0u8; 16]).is_err());
    }
}
