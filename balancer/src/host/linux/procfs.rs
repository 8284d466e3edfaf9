//! Readers of `/proc/PID/...` and `/proc/PID/task/TID/...`: the one place the balancer,
//! its applier, its status and the lab read these files.
//!
//! These are the cheap files, re-read every observation: they do not take the mmap
//! lock or walk page tables. Each parser takes the file's text so that malformed input
//! is tested without a file system; each reader maps "no such process" to
//! [`HostError::Vanished`], because processes exit between any two reads.
//!
//! `stat` is parsed by the `procfs` crate ([`Stat`]). The files are read here rather
//! than through `procfs::process::Process`, which would open the process directory
//! (one more descriptor and system call per thread per tick) and turn every error into
//! its own type; the text is handed to the crate's parser. That parser costs a few
//! microseconds a line (measured 3-4 us, against 1-2.5 us for the hand parser it
//! replaced and about 40 us to read the file on the same machine), small next to the
//! read. Written by hand, and why:
//! - `status`: the crate's `Status` requires some twenty lines the balancer never uses
//!   (`Uid`, `Gid`, `FDSize`, `Groups`, `SigQ`, the signal and capability masks), and
//!   it turns a malformed `Cpus_allowed_list` into "absent" without an error; the
//!   affinity is what pinning detection reads, so a bad one must be an error.
//! - `cmdline`: the crate drops empty arguments, which shifts qemu's option/value pairs.
//! - directory listings (pids, tids) are not parsing; the crate's iterators open every
//!   entry, which a full rescan of a host with thousands of processes does not need.

use std::path::Path;

use ::procfs::FromRead;
use ::procfs::process::{Schedstat, Stat};

use super::{HostError, read_small};
use crate::model::{CpuSet, IdSetParseError};

/// What is wrong with the text of a `/proc` file this module (or [`super::cgroup`])
/// parses. The reader adds the file's path ([`HostError::Parse`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProcTextError {
    #[error("no '(' before comm")]
    NoCommOpen,
    #[error("no ')' after comm")]
    NoCommClose,
    #[error("')' before '('")]
    CommReversed,
    #[error("no pid and space before '('")]
    NoPid,
    #[error("truncated: no state after comm")]
    NoState,
    /// The `procfs` crate's parser refused the text; `detail` is its message.
    #[error("not a {what}: {detail}")]
    Refused { what: &'static str, detail: String },
    #[error("bad pid {0}")]
    BadPid(i32),
    #[error("bad {field} {value:?}")]
    BadNumber { field: &'static str, value: String },
    #[error("bad {field}: {source}")]
    BadList {
        field: &'static str,
        source: IdSetParseError,
    },
    #[error("no {0} line")]
    MissingLine(&'static str),
}

impl ProcTextError {
    /// The `procfs` crate's error for a `what` (e.g. "stat line"), in its own words.
    pub(crate) fn refused(what: &'static str, e: ::procfs::ProcError) -> Self {
        let detail = match e {
            ::procfs::ProcError::InternalError(i) => i.msg,
            other => other.to_string(),
        };
        Self::Refused { what, detail }
    }
}

/// The fields of `/proc/PID/stat` (or `task/TID/stat`) the observer uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskStat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    /// User and system time in clock ticks (`USER_HZ`).
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    /// Start time after boot in clock ticks: with the pid it identifies a process
    /// across pid reuse.
    pub starttime_ticks: u64,
    /// CPU the task last ran on.
    pub processor: Option<u32>,
    /// Threads of the process (of a thread's own line: of its process too).
    pub num_threads: u64,
    /// Resident pages of the process.
    pub rss_pages: u64,
}

impl TaskStat {
    pub fn cpu_ticks(&self) -> u64 {
        self.utime_ticks.saturating_add(self.stime_ticks)
    }
}

/// Parses `/proc/PID/stat` (or `task/TID/stat`) with the `procfs` crate's parser.
///
/// The crate slices the line around the comm before it checks it, so a line without
/// `PID (` before the comm or ` STATE` after its last `)` would panic inside it; those
/// framings are refused here first, with a clear error. A field that is missing or not
/// a number is the crate's error.
pub fn parse_stat(s: &str) -> Result<TaskStat, ProcTextError> {
    let line = s.trim();
    let open = line.find('(').ok_or(ProcTextError::NoCommOpen)?;
    let close = line.rfind(')').ok_or(ProcTextError::NoCommClose)?;
    if close < open {
        return Err(ProcTextError::CommReversed);
    }
    if open == 0 || line.as_bytes()[open - 1] != b' ' {
        return Err(ProcTextError::NoPid);
    }
    if line.as_bytes().get(close + 1) != Some(&b' ') || close + 2 >= line.len() {
        return Err(ProcTextError::NoState);
    }
    let st =
        Stat::from_read(line.as_bytes()).map_err(|e| ProcTextError::refused("stat line", e))?;
    Ok(TaskStat {
        pid: u32::try_from(st.pid).map_err(|_| ProcTextError::BadPid(st.pid))?,
        comm: st.comm,
        state: st.state,
        utime_ticks: st.utime,
        stime_ticks: st.stime,
        starttime_ticks: st.starttime,
        processor: st.processor.and_then(|p| u32::try_from(p).ok()),
        num_threads: u64::try_from(st.num_threads).unwrap_or(0),
        rss_pages: st.rss,
    })
}

/// `/proc/PID/task/TID/schedstat`: what a thread ran and what it waited to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStat {
    /// Time on a CPU, in nanoseconds.
    pub run_ns: u64,
    /// Time runnable but waiting on a run queue, in nanoseconds.
    pub wait_ns: u64,
}

impl SchedStat {
    /// Time the thread wanted a CPU: ran or waited for one.
    pub fn wanted_ns(&self) -> u64 {
        self.run_ns.saturating_add(self.wait_ns)
    }
}

/// Parses `schedstat` with the `procfs` crate's parser (three numbers).
pub fn parse_schedstat(s: &str) -> Result<SchedStat, ProcTextError> {
    let st = Schedstat::from_read(s.as_bytes())
        .map_err(|e| ProcTextError::refused("schedstat line", e))?;
    Ok(SchedStat {
        run_ns: st.sum_exec_runtime,
        wait_ns: st.run_delay,
    })
}

/// The fields of `/proc/PID/status` the observer uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskStatus {
    pub name: String,
    pub tgid: u32,
    /// The task's affinity as the scheduler applies it (cpuset included).
    pub cpus_allowed: CpuSet,
    pub mems_allowed: CpuSet,
    pub vm_rss_bytes: u64,
}

/// Parses `/proc/PID/status`. `Tgid` and `Cpus_allowed_list` are required.
pub fn parse_status(s: &str) -> Result<TaskStatus, ProcTextError> {
    let list = |field: &'static str, value: &str| {
        CpuSet::parse_list(value).map_err(|source| ProcTextError::BadList { field, source })
    };
    let mut out = TaskStatus::default();
    let (mut have_tgid, mut have_cpus) = (false, false);
    for line in s.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Name" => out.name = value.to_string(),
            "Tgid" => {
                out.tgid = value.parse().map_err(|_| ProcTextError::BadNumber {
                    field: "Tgid",
                    value: value.to_string(),
                })?;
                have_tgid = true;
            }
            "Cpus_allowed_list" => {
                out.cpus_allowed = list("Cpus_allowed_list", value)?;
                have_cpus = true;
            }
            "Mems_allowed_list" => {
                out.mems_allowed = list("Mems_allowed_list", value)?;
            }
            "VmRSS" => {
                let kb: u64 = value.trim_end_matches("kB").trim().parse().map_err(|_| {
                    ProcTextError::BadNumber {
                        field: "VmRSS",
                        value: value.to_string(),
                    }
                })?;
                out.vm_rss_bytes = kb.saturating_mul(1024);
            }
            _ => {}
        }
    }
    if !have_tgid {
        return Err(ProcTextError::MissingLine("Tgid"));
    }
    if !have_cpus {
        return Err(ProcTextError::MissingLine("Cpus_allowed_list"));
    }
    Ok(out)
}

/// Splits `/proc/PID/cmdline` (NUL-separated) into arguments.
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn pid_dir(proc: &Path, pid: u32) -> std::path::PathBuf {
    proc.join(pid.to_string())
}

fn task_dir(proc: &Path, pid: u32, tid: u32) -> std::path::PathBuf {
    pid_dir(proc, pid).join("task").join(tid.to_string())
}

/// Maps a read error of a per-process file: gone means the process exited.
fn vanished(pid: u32) -> impl Fn(HostError) -> HostError {
    move |e| {
        if e.is_vanished() {
            HostError::Vanished { pid }
        } else {
            e
        }
    }
}

fn read_proc_file(path: &Path, pid: u32) -> Result<String, HostError> {
    let s = read_small(path).map_err(vanished(pid))?;
    if s.is_empty() {
        // An exiting task's files read as empty.
        return Err(HostError::Vanished { pid });
    }
    Ok(s)
}

/// Reads and parses `/proc/PID/stat`.
pub fn read_stat(proc: &Path, pid: u32) -> Result<TaskStat, HostError> {
    let path = pid_dir(proc, pid).join("stat");
    let s = read_proc_file(&path, pid)?;
    parse_stat(&s).map_err(|w| HostError::parse(&path, w))
}

/// Reads and parses `/proc/PID/task/TID/stat`.
pub fn read_task_stat(proc: &Path, pid: u32, tid: u32) -> Result<TaskStat, HostError> {
    let path = task_dir(proc, pid, tid).join("stat");
    let s = read_proc_file(&path, tid)?;
    parse_stat(&s).map_err(|w| HostError::parse(&path, w))
}

/// Reads and parses `/proc/PID/task/TID/schedstat`; `Ok(None)` where the kernel has
/// no such file (built without `CONFIG_SCHED_INFO`) or a capture left it out.
pub fn read_task_schedstat(
    proc: &Path,
    pid: u32,
    tid: u32,
) -> Result<Option<SchedStat>, HostError> {
    let dir = task_dir(proc, pid, tid);
    let path = dir.join("schedstat");
    match read_proc_file(&path, tid) {
        Ok(s) => parse_schedstat(&s)
            .map(Some)
            .map_err(|w| HostError::parse(&path, w)),
        Err(e) if e.is_vanished() && dir.is_dir() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads and parses `/proc/PID/status`.
pub fn read_status(proc: &Path, pid: u32) -> Result<TaskStatus, HostError> {
    let path = pid_dir(proc, pid).join("status");
    let s = read_proc_file(&path, pid)?;
    parse_status(&s).map_err(|w| HostError::parse(&path, w))
}

/// Reads and parses `/proc/PID/task/TID/status`.
pub fn read_task_status(proc: &Path, pid: u32, tid: u32) -> Result<TaskStatus, HostError> {
    let path = task_dir(proc, pid, tid).join("status");
    let s = read_proc_file(&path, tid)?;
    parse_status(&s).map_err(|w| HostError::parse(&path, w))
}

/// Reads `/proc/PID/comm` (the process's main thread name).
pub fn read_comm(proc: &Path, pid: u32) -> Result<String, HostError> {
    let s = read_proc_file(&pid_dir(proc, pid).join("comm"), pid)?;
    Ok(s.trim_end_matches('\n').to_string())
}

/// Reads `/proc/PID/task/TID/comm` (a thread's name, e.g. `CPU 0/KVM`).
pub fn read_task_comm(proc: &Path, pid: u32, tid: u32) -> Result<String, HostError> {
    let s = read_proc_file(&task_dir(proc, pid, tid).join("comm"), tid)?;
    Ok(s.trim_end_matches('\n').to_string())
}

/// Reads `/proc/PID/cmdline`. Kernel threads and zombies have an empty one.
pub fn read_cmdline(proc: &Path, pid: u32) -> Result<Vec<String>, HostError> {
    let path = pid_dir(proc, pid).join("cmdline");
    let raw = std::fs::read(&path).map_err(|source| {
        vanished(pid)(HostError::Io {
            path: path.clone(),
            source,
        })
    })?;
    Ok(parse_cmdline(&raw))
}

/// The basename of `/proc/PID/exe`, if readable (it is not for kernel threads).
pub fn read_exe_basename(proc: &Path, pid: u32) -> Option<String> {
    let target = std::fs::read_link(pid_dir(proc, pid).join("exe")).ok()?;
    let name = target.file_name()?.to_string_lossy().into_owned();
    // A replaced binary reads as "qemu-kvm (deleted)".
    Some(name.trim_end_matches(" (deleted)").to_string())
}

/// Numeric entries of a directory, sorted (pids in `/proc`, tids in `task/`).
fn numeric_entries(dir: &Path) -> Result<Vec<u32>, HostError> {
    let rd = std::fs::read_dir(dir).map_err(|source| HostError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ids: Vec<u32> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Every process id in `/proc`.
pub fn list_pids(proc: &Path) -> Result<Vec<u32>, HostError> {
    numeric_entries(proc)
}

/// Every thread id of a process.
pub fn list_tasks(proc: &Path, pid: u32) -> Result<Vec<u32>, HostError> {
    numeric_entries(&pid_dir(proc, pid).join("task")).map_err(vanished(pid))
}

/// `USER_HZ`: the unit of the tick counts in `stat`.
pub fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as u64 } else { 100 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::linux::FormatError;

    const STAT: &str = "4242 (qemu-kvm) S 1 4242 4242 0 -1 4194560 5000 0 0 0 \
        1500 250 0 0 20 0 7 0 123456 4000000000 20000 18446744073709551615 1 1 0 0 0 0 0 \
        4096 0 0 0 0 17 3 0 0 0 0 0";

    #[test]
    fn parses_schedstat_and_refuses_garbage() {
        let s = parse_schedstat("1500000000 250000000 42\n").unwrap();
        assert_eq!(
            (s.run_ns, s.wait_ns, s.wanted_ns()),
            (1_500_000_000, 250_000_000, 1_750_000_000)
        );
        for bad in ["", "12", "12 x 3", "-1 2 3"] {
            assert!(parse_schedstat(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_stat() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "qemu-kvm");
        assert_eq!(s.state, 'S');
        assert_eq!((s.utime_ticks, s.stime_ticks), (1500, 250));
        assert_eq!(s.starttime_ticks, 123456);
        assert_eq!(s.processor, Some(3));
    }

    #[test]
    fn stat_comm_with_spaces_and_parens() {
        let line = STAT.replace("(qemu-kvm)", "(CPU 0/KVM) (x))");
        let s = parse_stat(&line).unwrap();
        assert_eq!(s.comm, "CPU 0/KVM) (x)");
        assert_eq!(s.processor, Some(3));
    }

    #[test]
    fn stat_malformed() {
        assert!(parse_stat("").is_err());
        assert!(parse_stat("12 (x").is_err());
        assert!(
            parse_stat("12 (x) S 1 2 3")
                .unwrap_err()
                .to_string()
                .starts_with("not a stat line: ")
        );
        let huge = STAT.replace(" 1500 ", " 99999999999999999999999 ");
        assert!(parse_stat(&huge).is_err());
        let negative = STAT.replace(" 1500 ", " -1500 ");
        assert!(parse_stat(&negative).is_err());
        // A kernel without field 39 (before 2.2.8): no processor, still fine.
        let short: Vec<&str> = STAT.split(' ').take(38).collect();
        assert_eq!(parse_stat(&short.join(" ")).unwrap().processor, None);
    }

    /// Framings the crate's parser would slice into a panic are refused before it.
    #[test]
    fn stat_framing_is_checked_before_the_crate() {
        for bad in [
            "(qemu) S 1",
            "12(qemu) S 1",
            "\u{e9}(qemu) S 1",
            "12 (qemu)",
            "12 (qemu)S 1",
            "12 (qemu)\u{e9} 1",
            "12 (qemu) ",
            "12 )qemu( S 1",
        ] {
            let e = parse_stat(bad).unwrap_err();
            assert!(
                !matches!(e, ProcTextError::Refused { .. }),
                "{bad:?} reached the crate: {e}"
            );
        }
        let bad_pid = STAT.replace("4242 (", "-4 (");
        assert_eq!(parse_stat(&bad_pid), Err(ProcTextError::BadPid(-4)));
        assert_eq!(parse_stat(&bad_pid).unwrap_err().to_string(), "bad pid -4");
    }

    /// Through the reader: a malformed file is a parse error naming the file, an
    /// empty one (an exiting task) or a missing one is a vanished process.
    #[test]
    fn reader_errors_name_the_file() {
        let root = std::env::temp_dir().join(format!("vmbalancer-procfs-{}", std::process::id()));
        let dir = root.join("42/task/43");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(root.join("42/stat"), "42 (qemu-kvm)S 1\n").unwrap();
        std::fs::write(dir.join("stat"), "").unwrap();
        match read_stat(&root, 42) {
            Err(e @ HostError::Parse { .. }) => {
                let HostError::Parse { path, reason } = &e else {
                    unreachable!()
                };
                assert!(path.ends_with("42/stat"), "{path:?}");
                assert!(
                    matches!(reason, FormatError::Proc(ProcTextError::NoState)),
                    "{reason}"
                );
                assert!(
                    e.to_string()
                        .ends_with("42/stat: truncated: no state after comm"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(read_task_stat(&root, 42, 43).unwrap_err().is_vanished());
        assert!(read_stat(&root, 44).unwrap_err().is_vanished());
        assert_eq!(list_tasks(&root, 42).unwrap(), vec![43]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn parses_status() {
        let s = "Name:\tCPU 1/KVM\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
                 VmRSS:\t  65536 kB\nCpus_allowed:\tff\nCpus_allowed_list:\t0-7\n\
                 Mems_allowed:\t3\nMems_allowed_list:\t0-1\n";
        let st = parse_status(s).unwrap();
        assert_eq!(st.name, "CPU 1/KVM");
        assert_eq!(st.tgid, 4242);
        assert_eq!(st.cpus_allowed.to_string(), "0-7");
        assert_eq!(st.mems_allowed.to_string(), "0-1");
        assert_eq!(st.vm_rss_bytes, 64 << 20);
        assert_eq!(
            parse_status("Name:\tx\n"),
            Err(ProcTextError::MissingLine("Tgid"))
        );
        let e = parse_status("Tgid:\t1\nCpus_allowed_list:\t0-\n").unwrap_err();
        assert!(e.to_string().starts_with("bad Cpus_allowed_list: "), "{e}");
        assert!(parse_status("Tgid:\t99999999999\nCpus_allowed_list:\t0\n").is_err());
    }

    #[test]
    fn parses_cmdline() {
        assert_eq!(
            parse_cmdline(b"qemu-kvm\0-name\0guest=a\0"),
            vec!["qemu-kvm", "-name", "guest=a"]
        );
        assert!(parse_cmdline(b"").is_empty());
    }
}
