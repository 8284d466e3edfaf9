//! Tracepoint record layouts, read from tracefs at load time.
//!
//! The programs read tracepoint records at byte offsets. Those offsets differ between
//! kernel versions (`sched_migrate_task` put `comm` inline before 6.x and made it a
//! `__data_loc` later, shifting every field after it), so they are never compiled in:
//! userspace parses `events/<system>/<event>/format` and hands the offsets to the
//! programs. This module also mounts tracefs when nothing has.

use std::path::{Path, PathBuf};

use super::TelemetryError;

/// Where tracefs is normally mounted, and the older debugfs location.
pub const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The C declaration without the name, e.g. `int`, `char[16]`, `__data_loc char[]`.
    pub c_type: String,
    pub name: String,
    pub offset_bytes: u32,
    pub size_bytes: u32,
    pub signed: bool,
}

/// The parsed `format` file of one tracepoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracepointFormat {
    pub name: String,
    pub id: u32,
    pub fields: Vec<Field>,
}

/// Why a tracepoint `format` file could not be read, or lacks a field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad ID line {line:?}")]
    BadId { line: String },
    #[error("no `field:` lines")]
    NoFields,
    #[error("no `name:` line")]
    NoName,
    #[error("no `ID:` line")]
    NoId,
    #[error("bad field part {part:?} in {line:?}")]
    BadPart { part: String, line: String },
    #[error("bad number {value:?} in {line:?}")]
    BadNumber { value: String, line: String },
    #[error("no declaration in {line:?}")]
    NoDeclaration { line: String },
    #[error("cannot split type and name in {decl:?}")]
    NoTypeName { decl: String },
    #[error("no offset in {line:?}")]
    NoOffset { line: String },
    #[error("no size in {line:?}")]
    NoSize { line: String },
    #[error("no field `{name}`")]
    NoField { name: String },
    #[error("field `{name}` has {found} bytes, expected {expected}")]
    FieldSize {
        name: String,
        found: u32,
        expected: u32,
    },
}

impl TracepointFormat {
    /// Parses the text of a `format` file.
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        let mut name = None;
        let mut id = None;
        let mut fields = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(n) = line.strip_prefix("name:") {
                name = Some(n.trim().to_owned());
            } else if let Some(i) = line.strip_prefix("ID:") {
                id = Some(
                    i.trim()
                        .parse()
                        .map_err(|_| FormatError::BadId { line: line.into() })?,
                );
            } else if line.starts_with("field:") {
                fields.push(parse_field(line)?);
            }
        }
        if fields.is_empty() {
            return Err(FormatError::NoFields);
        }
        Ok(Self {
            name: name.ok_or(FormatError::NoName)?,
            id: id.ok_or(FormatError::NoId)?,
            fields,
        })
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of a field that must exist and have `size_bytes` bytes.
    pub fn offset_of(&self, name: &str, size_bytes: u32) -> Result<u32, FormatError> {
        let f = self.field(name).ok_or_else(|| FormatError::NoField {
            name: name.to_owned(),
        })?;
        if f.size_bytes != size_bytes {
            return Err(FormatError::FieldSize {
                name: name.to_owned(),
                found: f.size_bytes,
                expected: size_bytes,
            });
        }
        Ok(f.offset_bytes)
    }
}

/// `field:int orig_cpu;\toffset:20;\tsize:4;\tsigned:1;`
fn parse_field(line: &str) -> Result<Field, FormatError> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = None;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once(':').ok_or_else(|| FormatError::BadPart {
            part: part.into(),
            line: line.into(),
        })?;
        let value = value.trim();
        let num = || {
            value.parse::<u32>().map_err(|_| FormatError::BadNumber {
                value: value.into(),
                line: line.into(),
            })
        };
        match key.trim() {
            "field" => decl = Some(value.to_owned()),
            "offset" => offset = Some(num()?),
            "size" => size = Some(num()?),
            "signed" => signed = Some(num()? != 0),
            _ => {}
        }
    }
    let decl = decl.ok_or_else(|| FormatError::NoDeclaration { line: line.into() })?;
    // The name is the last identifier, before any array suffix: `char comm[16]`.
    let without_array = match decl.find('[') {
        Some(i) if !decl.starts_with("__data_loc") || decl.rfind(' ') < Some(i) => &decl[..i],
        _ => decl.as_str(),
    };
    let (c_type, name) = without_array
        .trim()
        .rsplit_once(' ')
        .ok_or_else(|| FormatError::NoTypeName { decl: decl.clone() })?;
    let array = &decl[without_array.len()..];
    Ok(Field {
        c_type: format!("{}{}", c_type.trim(), array),
        name: name.trim_start_matches('*').to_owned(),
        offset_bytes: offset.ok_or_else(|| FormatError::NoOffset { line: line.into() })?,
        size_bytes: size.ok_or_else(|| FormatError::NoSize { line: line.into() })?,
        signed: signed.unwrap_or(false),
    })
}

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct Tracefs {
    pub root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs, mounting it at `/sys/kernel/tracing` if no known location has it.
    pub fn find_or_mount() -> Result<Self, TelemetryError> {
        if let Some(t) = Self::find() {
            return Ok(t);
        }
        let target = Path::new(TRACEFS_DIRS[0]);
        mount_tracefs(target).map_err(|e| TelemetryError::NoTracefs {
            reason: e.to_string(),
        })?;
        tracing::info!(path = %target.display(), "mounted tracefs");
        Self::find().ok_or_else(|| TelemetryError::NoTracefs {
            reason: "mounted, but it has no events/ directory".into(),
        })
    }

    /// A mounted tracefs at one of the usual places.
    pub fn find() -> Option<Self> {
        TRACEFS_DIRS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("events").is_dir())
            .map(|root| Self { root })
    }

    pub fn format_path(&self, system: &str, event: &str) -> PathBuf {
        self.root
            .join("events")
            .join(system)
            .join(event)
            .join("format")
    }

    pub fn has_event(&self, system: &str, event: &str) -> bool {
        self.format_path(system, event).is_file()
    }

    /// Reads and parses `events/<system>/<event>/format`.
    pub fn format(&self, system: &str, event: &str) -> Result<TracepointFormat, TelemetryError> {
        let path = self.format_path(system, event);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TelemetryError::NoTracepoint {
                    system: system.into(),
                    event: event.into(),
                    path: path.clone(),
                }
            } else {
                TelemetryError::io(format!("reading {}", path.display()), e)
            }
        })?;
        TracepointFormat::parse(&text).map_err(|reason| TelemetryError::BadFormat { path, reason })
    }
}

/// `mount -t tracefs -o nosuid,nodev,noexec tracefs <target>`.
fn mount_tracefs(target: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let fstype = c"tracefs";
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sched_migrate_task` on Linux 6.18: `comm` is a `__data_loc` (4 bytes).
    const MIGRATE_6_18: &str = "name: sched_migrate_task
ID: 311
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int orig_cpu;\toffset:20;\tsize:4;\tsigned:1;
\tfield:int dest_cpu;\toffset:24;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d prio=%d orig_cpu=%d dest_cpu=%d\", __get_str(comm), REC->pid, REC->prio, REC->orig_cpu, REC->dest_cpu
";

    /// The same tracepoint on older kernels (e.g. 6.1): `comm` inline, `char[16]`.
    const MIGRATE_6_1: &str = "name: sched_migrate_task
ID: 284
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:1;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:int orig_cpu;\toffset:32;\tsize:4;\tsigned:1;
\tfield:int dest_cpu;\toffset:36;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d prio=%d orig_cpu=%d dest_cpu=%d\", REC->comm, REC->pid, REC->prio, REC->orig_cpu, REC->dest_cpu
";

    #[test]
    fn new_layout_with_data_loc_comm() {
        let f = TracepointFormat::parse(MIGRATE_6_18).unwrap();
        assert_eq!(f.name, "sched_migrate_task");
        assert_eq!(f.id, 311);
        assert_eq!(f.offset_of("pid", 4), Ok(12));
        assert_eq!(f.offset_of("orig_cpu", 4), Ok(20));
        assert_eq!(f.offset_of("dest_cpu", 4), Ok(24));
        let comm = f.field("comm").unwrap();
        assert_eq!(comm.c_type, "__data_loc char[]");
        assert_eq!((comm.offset_bytes, comm.size_bytes), (8, 4));
    }

    #[test]
    fn old_layout_with_inline_comm() {
        let f = TracepointFormat::parse(MIGRATE_6_1).unwrap();
        assert_eq!(f.offset_of("pid", 4), Ok(24));
        assert_eq!(f.offset_of("orig_cpu", 4), Ok(32));
        assert_eq!(f.offset_of("dest_cpu", 4), Ok(36));
        let comm = f.field("comm").unwrap();
        assert_eq!(comm.c_type, "char[16]");
        assert_eq!(comm.size_bytes, 16);
        assert!(f.field("common_pid").unwrap().signed);
    }

    #[test]
    fn wrong_size_and_missing_field_are_errors() {
        let f = TracepointFormat::parse(MIGRATE_6_1).unwrap();
        assert_eq!(
            f.offset_of("comm", 4),
            Err(FormatError::FieldSize {
                name: "comm".into(),
                found: 16,
                expected: 4
            })
        );
        assert!(
            f.offset_of("comm", 4)
                .unwrap_err()
                .to_string()
                .contains("16 bytes")
        );
        assert!(
            f.offset_of("nope", 4)
                .unwrap_err()
                .to_string()
                .contains("no field")
        );
    }

    #[test]
    fn pointer_and_unsigned_long_fields() {
        let text = "name: page_fault_user\nID: 120\nformat:\n\
            \tfield:unsigned long address;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:void * ip;\toffset:16;\tsize:8;\tsigned:0;\n";
        let f = TracepointFormat::parse(text).unwrap();
        assert_eq!(f.field("address").unwrap().c_type, "unsigned long");
        assert_eq!(f.offset_of("ip", 8), Ok(16));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(TracepointFormat::parse("").is_err());
        assert!(TracepointFormat::parse("name: x\nID: y\n").is_err());
        assert!(
            TracepointFormat::parse("name: x\nID: 1\n\tfield:int a;\toffset:zz;\tsize:4;\n")
                .is_err()
        );
        assert!(
            TracepointFormat::parse("name: x\nID: 1\n\tfield:int;\toffset:0;\tsize:4;\n").is_err()
        );
    }

    #[test]
    fn this_kernel_has_a_parseable_migrate_format_when_tracefs_is_mounted() {
        // Reads the real file when available (root, tracefs mounted); skips otherwise.
        let Some(t) = Tracefs::find() else { return };
        if let Ok(f) = t.format("sched", "sched_migrate_task") {
            assert!(f.offset_of("pid", 4).is_ok());
            assert!(f.offset_of("dest_cpu", 4).is_ok());
        }
    }
}
