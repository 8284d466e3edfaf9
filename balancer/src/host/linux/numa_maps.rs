//! Parsers of `/proc/PID/numa_maps` and `/proc/PID/maps`.
//!
//! numa_maps is the only exact per-node page count the kernel gives for a process, but
//! reading it walks the page tables of every mapping under the mmap lock, so callers
//! ([`super::memory`]) bound how often it is read. Counts are in pages of
//! `kernelpagesize_kB` each, which is 4 KiB for normal memory and the huge page size for
//! hugetlb mappings: multiplying by it is what makes hugetlbfs-backed guests visible
//! (numad counts RSS and misses them).
//!
//! numa_maps has no end address, so the mapping sizes come from `maps` (which takes the
//! lock but walks no page tables) and the two are joined on the start address.
//!
//! Both are parsed by hand, each only here. No crate reads numa_maps. The `procfs`
//! crate reads `maps` (`MemoryMaps`), but its path classification slices a name that
//! starts with `/SYSV` at fixed byte offsets and panics on a shorter one: the names of
//! mapped files are chosen by whoever created them, so a VM's mapping could stop the
//! daemon. Its errors also name no line. This reader needs the range, the permissions
//! and the path as the kernel wrote it, and refuses a bad line with its number.

use std::collections::BTreeMap;
use std::path::Path;

use super::HostError;
use crate::model::NodeId;

/// What is wrong with a numa_maps or maps text; [`HostError::Parse`] adds the path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapsError {
    #[error("empty line")]
    EmptyLine,
    /// A hexadecimal address (`start address`, `start`, `end`) that is not one.
    #[error("bad {what} {found:?}")]
    BadAddress { what: &'static str, found: String },
    #[error("bad range {0:?}")]
    BadRange(String),
    #[error("range {0:?} ends before it starts")]
    RangeReversed(String),
    /// The line ends before field `0` (policy, perms, offset, device, inode).
    #[error("truncated: no {0}")]
    Truncated(&'static str),
    #[error("{key}: not an unsigned number: {found:?}")]
    NotNumber { key: String, found: String },
    #[error("absurd kernelpagesize_kB={0}")]
    AbsurdPageSize(String),
    #[error("bad node in {0:?}")]
    BadNode(String),
    #[error("N{node} pages overflow in {line:?}")]
    PagesOverflow { node: NodeId, line: String },
    #[error("truncated: page counts without kernelpagesize_kB")]
    CountsWithoutPageSize,
    #[error("N{node}={pages} pages of {page_size_bytes} bytes overflows")]
    BytesOverflow {
        node: NodeId,
        pages: u64,
        page_size_bytes: u64,
    },
    /// A line of a whole file, by its number (from 1).
    #[error("line {number}: {reason}")]
    Line {
        number: usize,
        reason: Box<MapsError>,
    },
}

/// What a mapping maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MappingKind {
    /// Anonymous memory (no file, not heap or stack).
    #[default]
    Anon,
    Heap,
    Stack,
    /// A file; memfd files read `/memfd:NAME (deleted)`.
    File(String),
}

/// One line of numa_maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NumaMapping {
    pub start_addr: u64,
    /// Memory policy (`default`, `bind:0-1`, `interleave:0-3`, `prefer:1`...).
    pub policy: String,
    pub kind: MappingKind,
    /// hugetlb mapping (`huge` flag).
    pub huge: bool,
    pub anon_pages: u64,
    /// Resident pages per node, in pages of `page_size_bytes`.
    pub pages_per_node: BTreeMap<NodeId, u64>,
    /// `kernelpagesize_kB` in bytes.
    pub page_size_bytes: u64,
}

impl NumaMapping {
    /// Resident bytes per node. Checked: absurd counts are an error, not a wrap.
    pub fn bytes_per_node(&self) -> Result<BTreeMap<NodeId, u64>, MapsError> {
        self.pages_per_node
            .iter()
            .map(|(&node, &pages)| {
                pages
                    .checked_mul(self.page_size_bytes)
                    .map(|b| (node, b))
                    .ok_or(MapsError::BytesOverflow {
                        node,
                        pages,
                        page_size_bytes: self.page_size_bytes,
                    })
            })
            .collect()
    }

    /// A memfd mapping (`/memfd:...`).
    pub fn is_memfd(&self) -> bool {
        matches!(&self.kind, MappingKind::File(f) if f.starts_with("/memfd:"))
    }
}

fn num(t: &str, key: &str) -> Result<u64, MapsError> {
    t.parse().map_err(|_| MapsError::NotNumber {
        key: key.to_string(),
        found: t.to_string(),
    })
}

fn hex(t: &str, what: &'static str) -> Result<u64, MapsError> {
    u64::from_str_radix(t, 16).map_err(|_| MapsError::BadAddress {
        what,
        found: t.to_string(),
    })
}

/// Parses one numa_maps line.
pub fn parse_numa_maps_line(line: &str) -> Result<NumaMapping, MapsError> {
    let mut tokens = line.split_ascii_whitespace();
    let addr = tokens.next().ok_or(MapsError::EmptyLine)?;
    let start_addr = hex(addr, "start address")?;
    let policy = tokens
        .next()
        .ok_or(MapsError::Truncated("policy"))?
        .to_string();
    let mut m = NumaMapping {
        start_addr,
        policy,
        ..Default::default()
    };
    let mut have_page_size = false;
    for t in tokens {
        match t.split_once('=') {
            None => match t {
                "heap" => m.kind = MappingKind::Heap,
                "stack" => m.kind = MappingKind::Stack,
                "huge" => m.huge = true,
                _ => {} // unknown flags from newer kernels
            },
            Some(("file", f)) => m.kind = MappingKind::File(f.replace("\\040", " ")),
            Some(("anon", v)) => m.anon_pages = num(v, "anon")?,
            Some(("kernelpagesize_kB", v)) => {
                let kb = num(v, "kernelpagesize_kB")?;
                m.page_size_bytes = kb
                    .checked_mul(1024)
                    .filter(|&b| b > 0)
                    .ok_or_else(|| MapsError::AbsurdPageSize(v.to_string()))?;
                have_page_size = true;
            }
            Some((k, v))
                if k.len() > 1
                    && k.starts_with('N')
                    && k[1..].bytes().all(|b| b.is_ascii_digit()) =>
            {
                let node: NodeId = k[1..]
                    .parse()
                    .map_err(|_| MapsError::BadNode(t.to_string()))?;
                let pages = num(v, k)?;
                // The kernel prints each node once; a repeated one must not wrap.
                let sum = m.pages_per_node.entry(node).or_default();
                *sum = sum
                    .checked_add(pages)
                    .ok_or_else(|| MapsError::PagesOverflow {
                        node,
                        line: line.to_string(),
                    })?;
            }
            Some(_) => {} // dirty=, mapped=, mapmax=, active=, writeback=, swapcache=...
        }
    }
    if !have_page_size {
        // The kernel prints only `ADDR POLICY [file=..|heap|stack]` for a mapping with
        // no resident pages (e.g. a PROT_NONE guard); counts without a page size are a
        // truncated line.
        if !m.pages_per_node.is_empty() || m.anon_pages > 0 {
            return Err(MapsError::CountsWithoutPageSize);
        }
        m.page_size_bytes = 4096;
    }
    Ok(m)
}

/// Parses a whole numa_maps file; the first bad line fails it (with its number), since
/// a half-read file would under-count a VM's memory silently.
pub fn parse_numa_maps(text: &str) -> Result<Vec<NumaMapping>, MapsError> {
    parse_lines(text, parse_numa_maps_line)
}

/// Parses every non-blank line of `text` with `parse`; the first bad one fails the
/// whole text, with its line number.
fn parse_lines<T>(
    text: &str,
    parse: impl Fn(&str) -> Result<T, MapsError>,
) -> Result<Vec<T>, MapsError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse(l).map_err(|e| MapsError::Line {
                number: i + 1,
                reason: Box::new(e),
            })
        })
        .collect()
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsEntry {
    pub start_addr: u64,
    pub end_addr: u64,
    pub perms: String,
    pub path: String,
}

impl MapsEntry {
    pub fn len_bytes(&self) -> u64 {
        self.end_addr.saturating_sub(self.start_addr)
    }

    pub fn is_writable(&self) -> bool {
        self.perms.starts_with("rw")
    }

    /// No file behind it: anonymous, `[heap]`, `[stack]`, `[anon:NAME]` (not
    /// `[anon_shmem:NAME]`, which is shared). The process's own pages.
    pub fn is_anonymous(&self) -> bool {
        self.path.is_empty()
            || (self.path.starts_with('[') && !self.path.starts_with("[anon_shmem"))
    }
}

/// Parses one maps line: `start-end perms offset dev inode [path]`.
pub fn parse_maps_line(line: &str) -> Result<MapsEntry, MapsError> {
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or(MapsError::EmptyLine)?;
    let (s, e) = range
        .split_once('-')
        .ok_or_else(|| MapsError::BadRange(range.to_string()))?;
    let start_addr = hex(s, "start")?;
    let end_addr = hex(e, "end")?;
    if end_addr < start_addr {
        return Err(MapsError::RangeReversed(range.to_string()));
    }
    let mut field = |name: &'static str| it.next().ok_or(MapsError::Truncated(name));
    let perms = field("perms")?.to_string();
    let _offset = field("offset")?;
    let _dev = field("device")?;
    let _inode = field("inode")?;
    let path = it.next().unwrap_or("").trim().to_string();
    Ok(MapsEntry {
        start_addr,
        end_addr,
        perms,
        path,
    })
}

pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>, MapsError> {
    parse_lines(text, parse_maps_line)
}

/// Reads a per-process file without a size limit (numa_maps of a process with many
/// mappings is large); "no such process" becomes [`HostError::Vanished`].
fn read_big(path: &Path, pid: u32) -> Result<String, HostError> {
    match std::fs::read(path) {
        Ok(b) if b.is_empty() => Err(HostError::Vanished { pid }),
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(source) => {
            let e = HostError::Io {
                path: path.to_path_buf(),
                source,
            };
            Err(if e.is_vanished() {
                HostError::Vanished { pid }
            } else {
                e
            })
        }
    }
}

/// Reads and parses `/proc/PID/numa_maps`.
pub fn read_numa_maps(proc: &Path, pid: u32) -> Result<Vec<NumaMapping>, HostError> {
    let path = proc.join(pid.to_string()).join("numa_maps");
    let text = read_big(&path, pid)?;
    parse_numa_maps(&text).map_err(|w| HostError::parse(&path, w))
}

/// Reads and parses `/proc/PID/maps`.
pub fn read_maps(proc: &Path, pid: u32) -> Result<Vec<MapsEntry>, HostError> {
    let path = proc.join(pid.to_string()).join("maps");
    let text = read_big(&path, pid)?;
    parse_maps(&text).map_err(|w| HostError::parse(&path, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_lines() {
        let m = parse_numa_maps_line(
            "7f3c40000000 bind:1 file=/dev/hugepages/libvirt/qemu/1-vm/qemu_back_mem.x huge \
             dirty=1024 N1=1024 kernelpagesize_kB=2048",
        )
        .unwrap();
        assert!(m.huge);
        assert_eq!(m.policy, "bind:1");
        assert_eq!(m.bytes_per_node().unwrap()[&1], 2 << 30);

        let m = parse_numa_maps_line(
            "7f0000000000 default anon=16384 dirty=16384 active=0 N0=10000 N1=6384 kernelpagesize_kB=4",
        )
        .unwrap();
        assert_eq!(m.kind, MappingKind::Anon);
        assert_eq!(m.bytes_per_node().unwrap()[&0], 10000 * 4096);

        let m = parse_numa_maps_line(
            "7f1000000000 default file=/memfd:pc.ram\\040(deleted) dirty=3 N0=3 kernelpagesize_kB=4",
        )
        .unwrap();
        assert!(m.is_memfd());
        // An untouched mapping has no N entries.
        let m = parse_numa_maps_line("7f2000000000 default kernelpagesize_kB=4").unwrap();
        assert!(m.pages_per_node.is_empty());
    }

    #[test]
    fn refuses_malformed_numa_maps() {
        assert!(parse_numa_maps_line("").is_err());
        assert!(parse_numa_maps_line("zzzz default N0=1 kernelpagesize_kB=4").is_err());
        assert_eq!(
            parse_numa_maps_line("7f00").unwrap_err().to_string(),
            "truncated: no policy"
        );
        assert_eq!(
            parse_numa_maps_line("7f00 default anon=3 N0=3"),
            Err(MapsError::CountsWithoutPageSize)
        );
        assert!(
            parse_numa_maps_line("7f00 default N0=99999999999999999999999 kernelpagesize_kB=4")
                .is_err()
        );
        assert!(parse_numa_maps_line("7f00 default N0=x kernelpagesize_kB=4").is_err());
        assert!(parse_numa_maps_line("7f00 default N0=1 kernelpagesize_kB=0").is_err());
        let m = parse_numa_maps_line("7f00 default N0=18446744073709551615 kernelpagesize_kB=4")
            .unwrap();
        assert_eq!(
            m.bytes_per_node().unwrap_err().to_string(),
            "N0=18446744073709551615 pages of 4096 bytes overflows"
        );
        // A node printed twice must not wrap its page count (a panic in debug builds).
        let e =
            parse_numa_maps_line("7f00 default N0=18446744073709551615 N0=1 kernelpagesize_kB=4")
                .unwrap_err();
        assert!(matches!(e, MapsError::PagesOverflow { node: 0, .. }), "{e}");
        let err =
            parse_numa_maps("7f00 default kernelpagesize_kB=4\n7f01 default N0=\n").unwrap_err();
        assert_eq!(err.to_string(), "line 2: N0: not an unsigned number: \"\"",);
    }

    #[test]
    fn parses_maps() {
        let e = parse_maps_line(
            "7f3c40000000-7f3cc0000000 rw-s 00000000 00:2f 1234 /dev/hugepages/q/mem (deleted)",
        )
        .unwrap();
        assert_eq!(e.len_bytes(), 2 << 30);
        assert_eq!(e.path, "/dev/hugepages/q/mem (deleted)");
        let e = parse_maps_line("7f00-8f00 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(e.path, "");
        assert!(parse_maps_line("8f00-7f00 rw-p 0 00:00 0").is_err());
        assert_eq!(
            parse_maps_line("7f00-8f00 rw-p"),
            Err(MapsError::Truncated("offset"))
        );
        assert_eq!(
            parse_maps_line("7f00"),
            Err(MapsError::BadRange("7f00".into()))
        );
    }
}
