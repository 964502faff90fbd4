//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find struct
//! member byte offsets (through anonymous structs/unions and typedefs) and enum values by name.
//!
//! aya-ebpf has no CO-RE for Rust programs, so the kernel programs read fields at offsets that
//! user space computes here and passes as read-only globals. Format reference:
//! <https://docs.kernel.org/bpf/btf.html>.

use std::{collections::HashMap, path::Path};

/// Where the running kernel publishes its own type information.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const HEADER_MIN_LEN: usize = 24;

// BTF_KIND_* values (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Errors reading or querying BTF. Each names what was looked up, so a kernel that lacks a field
/// says which one.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("BTF has no struct or union named `{0}`")]
    NoSuchStruct(String),
    #[error("`{container}` has no member `{member}` (looking up `{path}`)")]
    NoSuchMember {
        container: String,
        member: String,
        path: String,
    },
    #[error("`{0}` is a bitfield; only byte-aligned members are supported")]
    Bitfield(String),
    #[error("`{path}`: `{member}` is not a struct or union, cannot descend into it")]
    NotAStruct { path: String, member: String },
    #[error("`{path}` is {found} bytes, expected {expected}")]
    UnexpectedSize {
        path: String,
        expected: u32,
        found: u32,
    },
    #[error("BTF has no enum named `{0}`")]
    NoSuchEnum(String),
    #[error("enum `{enum_name}` has no value `{value}`")]
    NoSuchEnumValue { enum_name: String, value: String },
}

/// One parsed BTF type: the common header plus the kind-specific records we use.
#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// `size` for INT/STRUCT/UNION/ENUM/ENUM64/FLOAT/DATASEC, `type` for the others.
    size_or_type: u32,
    members: Vec<Member>,
    enum_values: Vec<(u32, i64)>,
    /// ARRAY: (element type, number of elements).
    array: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Raw `offset` field: bit offset, or `bitfield_size << 24 | bit_offset` with kind_flag.
    offset: u32,
}

/// A resolved member: where it is and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    /// Byte offset from the start of the outermost struct in the lookup.
    pub offset: u32,
    /// Size in bytes of the member's type (pointers: 8).
    pub size: u32,
}

/// Parsed BTF: types indexed by id (id 0 is `void`) and the string section.
#[derive(Debug, Clone)]
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    /// Named STRUCT/UNION ids, first definition wins (vmlinux has one per name that matters).
    structs: HashMap<String, u32>,
    /// Named ENUM/ENUM64 ids.
    enums: HashMap<String, u32>,
}

struct Reader<'a> {
    data: &'a [u8],
    big_endian: bool,
}

impl Reader<'_> {
    fn u32_at(&self, pos: usize) -> Result<u32, BtfError> {
        let bytes: [u8; 4] = self
            .data
            .get(pos..pos + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {pos}")))?;
        Ok(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }
}

impl Btf {
    /// Reads and parses the running kernel's BTF.
    pub fn from_sys() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a raw BTF blob (header, type section, string section). Either byte order.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < HEADER_MIN_LEN {
            return Err(BtfError::Malformed(format!(
                "{} bytes is shorter than the BTF header",
                data.len()
            )));
        }
        let big_endian = match [data[0], data[1]] {
            m if u16::from_le_bytes(m) == MAGIC => false,
            m if u16::from_be_bytes(m) == MAGIC => true,
            m => {
                return Err(BtfError::Malformed(format!(
                    "bad magic {:#06x}",
                    u16::from_le_bytes(m)
                )))
            }
        };
        let r = Reader { data, big_endian };
        let hdr_len = r.u32_at(4)? as usize;
        let (type_off, type_len) = (r.u32_at(8)? as usize, r.u32_at(12)? as usize);
        let (str_off, str_len) = (r.u32_at(16)? as usize, r.u32_at(20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= data.len() => Ok(s..e),
                _ => Err(BtfError::Malformed(format!(
                    "{what} section {off}+{len} beyond {} bytes",
                    data.len()
                ))),
            }
        };
        let types_range = section(type_off, type_len, "type")?;
        let strings_range = section(str_off, str_len, "string")?;

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: Vec::new(),
            enum_values: Vec::new(),
            array: None,
        }];
        let mut pos = types_range.start;
        while pos < types_range.end {
            if pos + 12 > types_range.end {
                return Err(BtfError::Malformed(format!(
                    "type {} header truncated",
                    types.len()
                )));
            }
            let name_off = r.u32_at(pos)?;
            let info = r.u32_at(pos + 4)?;
            let size_or_type = r.u32_at(pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                name_off,
                kind,
                kind_flag,
                size_or_type,
                members: Vec::new(),
                enum_values: Vec::new(),
                array: None,
            };
            match kind {
                KIND_INT => pos += 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                KIND_ARRAY => {
                    ty.array = Some((r.u32_at(pos)?, r.u32_at(pos + 8)?));
                    pos += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        ty.members.push(Member {
                            name_off: r.u32_at(pos)?,
                            type_id: r.u32_at(pos + 4)?,
                            offset: r.u32_at(pos + 8)?,
                        });
                        pos += 12;
                    }
                }
                KIND_ENUM => {
                    // kind_flag set means signed values.
                    for _ in 0..vlen {
                        let raw = r.u32_at(pos + 4)?;
                        let value = if kind_flag {
                            i64::from(raw as i32)
                        } else {
                            i64::from(raw)
                        };
                        ty.enum_values.push((r.u32_at(pos)?, value));
                        pos += 8;
                    }
                }
                KIND_ENUM64 => {
                    for _ in 0..vlen {
                        let lo = u64::from(r.u32_at(pos + 4)?);
                        let hi = u64::from(r.u32_at(pos + 8)?);
                        ty.enum_values
                            .push((r.u32_at(pos)?, (hi << 32 | lo) as i64));
                        pos += 12;
                    }
                }
                KIND_FUNC_PROTO => pos += 8 * vlen,
                KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_DATASEC => pos += 12 * vlen,
                other => {
                    return Err(BtfError::Malformed(format!(
                        "type {} has unknown kind {other}",
                        types.len()
                    )))
                }
            }
            types.push(ty);
        }
        if pos != types_range.end {
            return Err(BtfError::Malformed(
                "last type runs past the type section".into(),
            ));
        }

        let mut btf = Btf {
            types,
            strings: data[strings_range].to_vec(),
            structs: HashMap::new(),
            enums: HashMap::new(),
        };
        let mut structs = HashMap::new();
        let mut enums = HashMap::new();
        for (id, ty) in btf.types.iter().enumerate().skip(1) {
            let index = match ty.kind {
                KIND_STRUCT | KIND_UNION => &mut structs,
                KIND_ENUM | KIND_ENUM64 => &mut enums,
                _ => continue,
            };
            let name = btf.name(ty.name_off)?;
            if !name.is_empty() {
                index.entry(name.to_string()).or_insert(id as u32);
            }
        }
        btf.structs = structs;
        btf.enums = enums;
        Ok(btf)
    }

    fn name(&self, off: u32) -> Result<&str, BtfError> {
        let tail = self
            .strings
            .get(off as usize..)
            .ok_or_else(|| BtfError::Malformed(format!("string offset {off} out of range")))?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end])
            .map_err(|_| BtfError::Malformed(format!("string at {off} is not UTF-8")))
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| BtfError::Malformed(format!("type id {id} out of range")))
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn skip_modifiers(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..64 {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::Malformed(format!("type chain loops at id {id}")))
    }

    /// Size in bytes of a type.
    fn size_of(&self, id: u32) -> Result<u32, BtfError> {
        let id = self.skip_modifiers(id)?;
        let ty = self.ty(id)?;
        Ok(match ty.kind {
            KIND_PTR => 8,
            KIND_ARRAY => {
                let (elem, n) = ty.array.unwrap_or((0, 0));
                self.size_of(elem)?.saturating_mul(n)
            }
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                ty.size_or_type
            }
            _ => 0,
        })
    }

    /// Finds `name` among the members of struct/union `id`, descending into anonymous
    /// structs/unions. Returns (bit offset from `id`'s start, member).
    fn find_member(&self, id: u32, name: &str) -> Result<Option<(u32, Member)>, BtfError> {
        let ty = self.ty(id)?;
        for m in &ty.members {
            let bit_offset = if ty.kind_flag {
                m.offset & 0x00ff_ffff
            } else {
                m.offset
            };
            let member_name = self.name(m.name_off)?;
            if member_name == name {
                return Ok(Some((bit_offset, *m)));
            }
            if member_name.is_empty() {
                let inner = self.skip_modifiers(m.type_id)?;
                if matches!(self.ty(inner)?.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some((off, found)) = self.find_member(inner, name)? {
                        return Ok(Some((bit_offset + off, found)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Byte offset and size of `path` (dot-separated, e.g. `ns.inum`) inside struct or union
    /// `container`. Anonymous members are searched transparently; bitfields are rejected.
    pub fn member(&self, container: &str, path: &str) -> Result<MemberInfo, BtfError> {
        let mut id = *self
            .structs
            .get(container)
            .ok_or_else(|| BtfError::NoSuchStruct(container.to_string()))?;
        let mut container_name = container.to_string();
        let mut bits = 0u32;
        let mut last: Option<Member> = None;
        let full = format!("{container}.{path}");
        for segment in path.split('.') {
            if let Some(prev) = last {
                id = self.skip_modifiers(prev.type_id)?;
                if !matches!(self.ty(id)?.kind, KIND_STRUCT | KIND_UNION) {
                    return Err(BtfError::NotAStruct {
                        path: full,
                        member: container_name,
                    });
                }
            }
            let (off, member) =
                self.find_member(id, segment)?
                    .ok_or_else(|| BtfError::NoSuchMember {
                        container: container_name.clone(),
                        member: segment.to_string(),
                        path: full.clone(),
                    })?;
            let owner = self.ty(id)?;
            // A kind_flag member with a nonzero bitfield size is a bitfield.
            let is_bitfield = owner.kind_flag && member.offset >> 24 != 0;
            if is_bitfield || off % 8 != 0 {
                return Err(BtfError::Bitfield(full));
            }
            bits += off;
            container_name = segment.to_string();
            last = Some(member);
        }
        let member = last.ok_or_else(|| BtfError::NoSuchMember {
            container: container.to_string(),
            member: String::new(),
            path: full.clone(),
        })?;
        Ok(MemberInfo {
            offset: bits / 8,
            size: self.size_of(member.type_id)?,
        })
    }

    /// Byte offset of `path` inside `container`; see [`Btf::member`].
    pub fn offset_of(&self, container: &str, path: &str) -> Result<u32, BtfError> {
        Ok(self.member(container, path)?.offset)
    }

    /// Size in bytes of a named struct or union.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(name)
            .ok_or_else(|| BtfError::NoSuchStruct(name.to_string()))?;
        self.size_of(id)
    }

    /// Every (name, value) of an ENUM or ENUM64, in declaration order.
    pub fn enum_values(&self, enum_name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let id = *self
            .enums
            .get(enum_name)
            .ok_or_else(|| BtfError::NoSuchEnum(enum_name.to_string()))?;
        self.ty(id)?
            .enum_values
            .iter()
            .map(|&(name_off, value)| Ok((self.name(name_off)?.to_string(), value)))
            .collect()
    }

    /// The value of one enumerator.
    pub fn enum_value(&self, enum_name: &str, value_name: &str) -> Result<i64, BtfError> {
        self.enum_values(enum_name)?
            .into_iter()
            .find(|(n, _)| n == value_name)
            .map(|(_, v)| v)
            .ok_or_else(|| BtfError::NoSuchEnumValue {
                enum_name: enum_name.to_string(),
                value: value_name.to_string(),
            })
    }

    /// Type id of the named struct or union (first definition).
    pub fn struct_id(&self, name: &str) -> Option<u32> {
        self.structs.get(name).copied()
    }

    /// Type id of the named function (`BTF_KIND_FUNC`), e.g. a kfunc.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_FUNC && self.name(t.name_off).is_ok_and(|n| n == name))
            .map(|id| id as u32)
    }

    /// True when a typedef of this name exists (`btf_trace_<tracepoint>` marks a tp_btf hook).
    pub fn has_typedef(&self, name: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.kind == KIND_TYPEDEF && self.name(t.name_off).is_ok_and(|n| n == name))
    }
}

#[cfg(test)]
pub(crate) mod tests;
