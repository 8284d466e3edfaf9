//! Kernel struct field offsets from BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya-ebpf has no CO-RE relocations: a struct field read compiled into a program
//! bakes in the layout of whatever headers it was built against. Programs that read a
//! kernel struct therefore get the offset from userspace, which reads it here from the
//! running kernel's own type information. Only what that needs is parsed: the header,
//! the string section and enough of each type record to step over it and to read
//! struct members.

use std::collections::HashMap;
use std::path::Path;

use super::TelemetryError;

/// Longest type or member name read; kernel identifiers are far shorter (KSYM_NAME_LEN
/// is 512). Bounds what a string section without terminators can make us copy.
const MAX_NAME_BYTES: usize = 1024;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One parsed type record: its kind, name, and (for structs and unions) members as
/// (name, type id, bit offset).
struct Type {
    kind: u32,
    name: String,
    members: Vec<(String, u32, u32)>,
}

/// Why a BTF blob could not be read, or a member not found in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("bad BTF magic (only little-endian BTF is supported)")]
    BadMagic,
    #[error("BTF sections extend past the end of the data")]
    SectionsPastEnd,
    #[error("BTF truncated at byte {at}")]
    Truncated { at: usize },
    #[error("string offset {offset} out of range")]
    StringOutOfRange { offset: u32 },
    #[error("string at offset {offset} has no end within {MAX_NAME_BYTES} bytes")]
    UnterminatedString { offset: u32 },
    #[error("unknown BTF kind {kind} at byte {at}")]
    UnknownKind { kind: u32, at: usize },
    #[error("no struct {name} in BTF")]
    NoStruct { name: String },
    #[error("struct {name} has no member {field}")]
    NoMember { name: String, field: String },
    #[error("{name}.{field} is a bitfield")]
    Bitfield { name: String, field: String },
}

/// The types of a BTF blob, indexed by type id (id 0 is `void`).
pub struct Btf {
    types: Vec<Option<Type>>,
}

impl Btf {
    /// Reads and parses a BTF file (normally `/sys/kernel/btf/vmlinux`).
    pub fn from_file(path: &Path) -> Result<Self, TelemetryError> {
        let bytes = std::fs::read(path).map_err(|e| TelemetryError::NoBtf {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::parse(&bytes).map_err(|e| TelemetryError::NoBtf {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        let r = Reader(bytes);
        if r.u16(0)? != BTF_MAGIC {
            return Err(BtfError::BadMagic);
        }
        let hdr_len = r.u32(4)? as usize;
        let type_off = r.u32(8)? as usize;
        let type_len = r.u32(12)? as usize;
        let str_off = r.u32(16)? as usize;
        let str_len = r.u32(20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strs_start = hdr_len + str_off;
        let strs_end = strs_start + str_len;
        if types_end > bytes.len() || strs_end > bytes.len() {
            return Err(BtfError::SectionsPastEnd);
        }
        let strings = &bytes[strs_start..strs_end];
        let name = |offset: u32| -> Result<String, BtfError> {
            let s = strings
                .get(offset as usize..)
                .ok_or(BtfError::StringOutOfRange { offset })?;
            let end = s
                .iter()
                .take(MAX_NAME_BYTES + 1)
                .position(|&b| b == 0)
                .ok_or(BtfError::UnterminatedString { offset })?;
            Ok(String::from_utf8_lossy(&s[..end]).into_owned())
        };
        let mut types = vec![None];
        let mut pos = types_start;
        while pos < types_end {
            let name_off = r.u32(pos)?;
            let info = r.u32(pos + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            pos += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
                3 => 12,                   // ARRAY
                4 | 5 => 12 * vlen,        // STRUCT, UNION
                6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
                15 | 19 => 12 * vlen,      // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                kind => return Err(BtfError::UnknownKind { kind, at: pos }),
            };
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for i in 0..vlen {
                    let m = pos + 12 * i;
                    let m_name = name(r.u32(m)?)?;
                    let m_type = r.u32(m + 4)?;
                    let raw = r.u32(m + 8)?;
                    let bit_offset = if kind_flag { raw & 0x00ff_ffff } else { raw };
                    members.push((m_name, m_type, bit_offset));
                }
            }
            types.push(Some(Type {
                kind,
                name: name(name_off)?,
                members,
            }));
            pos += extra;
        }
        Ok(Self { types })
    }

    /// Byte offset of `field` in `struct name`, looking through anonymous struct and
    /// union members as C does.
    pub fn member_offset(&self, name: &str, field: &str) -> Result<u32, BtfError> {
        let st = self
            .types
            .iter()
            .flatten()
            .find(|t| t.kind == KIND_STRUCT && t.name == name && !t.members.is_empty())
            .ok_or_else(|| BtfError::NoStruct {
                name: name.to_owned(),
            })?;
        let bits = self
            .find_member(st, field, 0, &mut HashMap::new())
            .ok_or_else(|| BtfError::NoMember {
                name: name.to_owned(),
                field: field.to_owned(),
            })?;
        if bits % 8 != 0 {
            return Err(BtfError::Bitfield {
                name: name.to_owned(),
                field: field.to_owned(),
            });
        }
        Ok(bits / 8)
    }

    /// Bit offset of `field` in `t`, looking through anonymous members. `searched`
    /// holds the answer per anonymous member type already looked into: malformed BTF
    /// can make a type contain itself or fan out (a struct of many anonymous members of
    /// one type, nested), and searching each type once keeps the lookup linear.
    fn find_member(
        &self,
        t: &Type,
        field: &str,
        depth: u32,
        searched: &mut HashMap<u32, Option<u32>>,
    ) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for (m_name, m_type, bits) in &t.members {
            if m_name == field {
                return Some(*bits);
            }
            if !m_name.is_empty() {
                continue;
            }
            let found = match searched.get(m_type) {
                Some(found) => *found,
                None => {
                    // Marked first, so a type that contains itself ends here.
                    searched.insert(*m_type, None);
                    let found = self
                        .types
                        .get(*m_type as usize)
                        .and_then(Option::as_ref)
                        .filter(|inner| inner.kind == KIND_STRUCT || inner.kind == KIND_UNION)
                        .and_then(|inner| self.find_member(inner, field, depth + 1, searched));
                    searched.insert(*m_type, found);
                    found
                }
            };
            // An offset past u32 is no offset in a real struct.
            if let Some(b) = found {
                return bits.checked_add(b);
            }
        }
        None
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u16(&self, at: usize) -> Result<u16, BtfError> {
        self.0
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Truncated { at })
    }

    fn u32(&self, at: usize) -> Result<u32, BtfError> {
        self.0
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(BtfError::Truncated { at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: `int`, `struct inner { int a; int b; }`,
    /// `struct task_struct { int state; union { int x; struct inner in; }; int pid; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0task_struct\0state\0x\0in\0pid\0";
        let off = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut push = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // [1] INT "int" size 4, encoding: signed, 32 bits
        push(off("int"));
        push(1 << 24);
        push(4);
        push((1 << 24) | 32);
        // [2] STRUCT "inner" size 8, 2 members
        push(off("inner"));
        push((4 << 24) | 2);
        push(8);
        for (n, o) in [("a", 0), ("b", 32)] {
            push(off(n));
            push(1);
            push(o);
        }
        // [3] UNION (anonymous) size 8: x, in
        push(0);
        push((5 << 24) | 2);
        push(8);
        for (n, ty) in [("x", 1), ("in", 2)] {
            push(off(n));
            push(ty);
            push(0);
        }
        // [4] STRUCT "task_struct" size 16, kind_flag set (bitfield-style offsets)
        push(off("task_struct"));
        push((1 << 31) | (4 << 24) | 3);
        push(16);
        for (n, ty, o) in [("state", 1, 0), ("", 3, 32), ("pid", 1, 96)] {
            push(if n.is_empty() { 0 } else { off(n) });
            push(ty);
            push(o);
        }
        blob(&t, strings)
    }

    /// A BTF blob of these type records and strings.
    fn blob(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        b.push(1);
        b.push(0);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(types);
        b.extend_from_slice(strings);
        b
    }

    /// `struct NAME` with the given (name offset, type id, bit offset) members.
    fn struct_record(name_off: u32, members: &[(u32, u32, u32)]) -> Vec<u8> {
        let mut t = Vec::new();
        for v in [name_off, (4 << 24) | members.len() as u32, 8] {
            t.extend_from_slice(&v.to_le_bytes());
        }
        for (n, ty, o) in members {
            for v in [*n, *ty, *o] {
                t.extend_from_slice(&v.to_le_bytes());
            }
        }
        t
    }

    #[test]
    fn a_struct_made_of_itself_is_searched_once() {
        // Seen while writing the fuzz target: [1] struct "s" with 200 anonymous members
        // of type 1 made the search branch 200 ways at each of 9 levels (effectively
        // forever); now every type is searched once.
        let strings = b"\0s\0x\0";
        let t = struct_record(1, &vec![(0, 1, 0); 200]);
        let btf = Btf::parse(&blob(&t, strings)).unwrap();
        let start = std::time::Instant::now();
        assert!(
            btf.member_offset("s", "x")
                .unwrap_err()
                .to_string()
                .contains("no member x")
        );
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn offsets_past_u32_and_unterminated_names_are_errors() {
        // [1] struct "s" { anonymous [2] at bit 0xffff_ffff }, [2] struct "t" { x at 8 }.
        let strings = b"\0s\0x\0t\0";
        let mut t = struct_record(1, &[(0, 2, u32::MAX)]);
        t.extend(struct_record(5, &[(3, 0, 8)]));
        let btf = Btf::parse(&blob(&t, strings)).unwrap();
        assert_eq!(btf.member_offset("t", "x"), Ok(1));
        assert!(btf.member_offset("s", "x").is_err());
        // A name running to the end of the data without a NUL.
        let long = [b"\0".as_slice(), &[b'a'; 2 * MAX_NAME_BYTES]].concat();
        let Err(e) = Btf::parse(&blob(&struct_record(1, &[]), &long)) else {
            panic!("an unterminated name was accepted");
        };
        assert!(e.to_string().contains("no end"), "{e}");
    }

    #[test]
    fn direct_and_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("task_struct", "pid"), Ok(12));
        assert_eq!(btf.member_offset("task_struct", "state"), Ok(0));
        assert_eq!(btf.member_offset("task_struct", "x"), Ok(4));
        assert_eq!(btf.member_offset("inner", "b"), Ok(4));
        assert!(btf.member_offset("task_struct", "nope").is_err());
        assert!(btf.member_offset("mm_struct", "pid").is_err());
    }

    #[test]
    fn truncated_or_foreign_data_is_an_error() {
        let b = sample();
        assert!(Btf::parse(&b[..30]).is_err());
        assert!(Btf::parse(&[0u8; 24]).is_err());
        assert!(Btf::parse(&[]).is_err());
    }

    #[test]
    #[ignore = "needs the running kernel's BTF (/sys/kernel/btf/vmlinux), as CI has"]
    fn running_kernel_task_struct_pid() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let btf = Btf::from_file(path).expect("this test needs a readable /sys/kernel/btf/vmlinux");
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4, "pid_t pid; pid_t tgid; are adjacent");
    }
}
