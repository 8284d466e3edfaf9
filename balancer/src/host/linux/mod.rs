//! The real Linux host: readers of procfs, sysfs and cgroupfs, and the actuators.
//!
//! Every reader takes a root directory instead of assuming `/`, so tests read trees
//! captured from real multi-node machines (`tests/fixtures/`).
//!
//! Observation is split by source, one small module each, so that every kernel format
//! has one parser with its own tests:
//!
//! - [`topology`]: sysfs nodes, CPUs, SMT siblings, distances, per-node meminfo and
//!   hugepages, KSM and `kernel.numa_balancing`;
//! - [`procfs`]: `/proc/PID/{stat,status,cmdline,comm,exe}` and task lists;
//! - [`numa_maps`]: `/proc/PID/numa_maps` and `/proc/PID/maps`;
//! - [`discovery`]: which processes are qemu, and what their command line says;
//! - [`cgroup`]: the cgroup of a VM and its threads (v1 cpuset and v2), cpusets;
//! - [`pinning`]: whether an operator placed a VM by hand;
//! - [`memory`]: guest RAM per node, read at a bounded rate;
//! - [`ksm_sharing`]: which VMs share KSM pages with which (sampled page tables);
//! - [`proc_events`]: the netlink process connector (exec/exit/comm events);
//! - [`telemetry_input`]: the interface through which eBPF telemetry joins a snapshot;
//! - [`observer`]: [`LinuxObserver`], the incremental [`Observer`](super::Observer);
//! - [`actuate`]: the Linux [`Applier`](super::Applier): CPU sets and page moves.

pub mod actuate;
pub mod cgroup;
pub mod confidential;
pub mod cpu_load;
pub mod discovery;
pub mod ebpf_source;
pub mod ksm_sharing;
pub mod libvirt;
pub mod memory;
pub mod numa_maps;
pub mod observer;
pub mod pinning;
pub mod proc_events;
pub mod procfs;
pub mod qmp;
pub mod resample;
pub mod telemetry_deferred;
pub mod telemetry_input;
pub mod topology;
pub mod vcpu_threads;
pub mod write_heat;

use std::io;
use std::path::{Path, PathBuf};

pub use ebpf_source::EbpfTelemetry;
pub use observer::{LinuxObserver, ObserverConfig, ObserverCounters};
pub use telemetry_input::{NoTelemetry, TelemetrySource, TelemetryStatus, TrackedVm};

/// Where the host's pseudo file systems are. [`HostPaths::system`] is the real host;
/// tests point these at fixture trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPaths {
    /// procfs, normally `/proc`.
    pub proc: PathBuf,
    /// sysfs, normally `/sys`.
    pub sys: PathBuf,
    /// The cgroup mount point, normally `/sys/fs/cgroup` (v1 controllers below it in
    /// `cpuset/`, `cpu/`..., or the v2 unified tree itself, or v2 in `unified/`).
    pub cgroup: PathBuf,
    /// libvirt's status files of running qemu domains, normally `/run/libvirt/qemu`.
    pub libvirt: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self::system()
    }
}

impl HostPaths {
    /// The running host.
    pub fn system() -> Self {
        Self {
            proc: PathBuf::from("/proc"),
            sys: PathBuf::from("/sys"),
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            libvirt: PathBuf::from("/run/libvirt/qemu"),
        }
    }

    /// A fixture tree holding `proc/`, `sys/` and `cgroup/`; a tree mirroring the
    /// host's own paths (`sys/fs/cgroup/`, as the lab's captures do) works too.
    pub fn under(root: &Path) -> Self {
        let cgroup = root.join("cgroup");
        let mirrored = root.join("sys/fs/cgroup");
        Self {
            proc: root.join("proc"),
            sys: root.join("sys"),
            cgroup: if !cgroup.exists() && mirrored.exists() {
                mirrored
            } else {
                cgroup
            },
            libvirt: root.join("run/libvirt/qemu"),
        }
    }

    /// True when these are the live kernel interfaces (events can be subscribed to).
    pub fn is_live_proc(&self) -> bool {
        self.proc == Path::new("/proc")
    }
}

/// Errors of the Linux host readers.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: FormatError },
    #[error("process {pid} exited while it was being read")]
    Vanished { pid: u32 },
}

/// What is wrong with the text of a kernel file, one variant per kind of file (each
/// parser's own error) plus the one-value files. [`HostError::Parse`] adds the path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Proc(#[from] procfs::ProcTextError),
    #[error(transparent)]
    Maps(#[from] numa_maps::MapsError),
    #[error(transparent)]
    Meminfo(#[from] topology::MeminfoError),
    #[error("expected a number, found {found:?}")]
    NotNumber { found: String },
    #[error(transparent)]
    IdList(#[from] crate::model::IdSetParseError),
    #[error("distances must be numbers")]
    DistanceNotNumber,
    #[error("{found} distances for nodes up to {nodes}")]
    ShortDistanceRow {
        found: usize,
        nodes: crate::model::IdSet,
    },
    #[error("bad huge page size in the directory name")]
    HugePageSizeName,
}

impl HostError {
    pub(crate) fn parse(path: &Path, reason: impl Into<FormatError>) -> Self {
        Self::Parse {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// The error means the file's process or thread is gone (ENOENT/ESRCH under
    /// `/proc`), which is normal churn rather than a fault.
    pub fn is_vanished(&self) -> bool {
        match self {
            Self::Vanished { .. } => true,
            Self::Io { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ESRCH)
            }
            Self::Parse { .. } => false,
        }
    }
}

/// Largest pseudo file we read whole (numa_maps of huge processes excepted, which are
/// streamed). Bounds memory use on garbage input.
const MAX_SMALL_FILE_BYTES: u64 = 1 << 20;

/// Reads a small pseudo file to a string.
pub(crate) fn read_small(path: &Path) -> Result<String, HostError> {
    use std::io::Read;
    let io_err = |source| HostError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut s = String::new();
    file.take(MAX_SMALL_FILE_BYTES)
        .read_to_string(&mut s)
        .map_err(io_err)?;
    Ok(s)
}

/// Reads a file holding one unsigned number.
pub(crate) fn read_u64(path: &Path) -> Result<u64, HostError> {
    let s = read_small(path)?;
    s.trim().parse().map_err(|_| {
        HostError::parse(
            path,
            FormatError::NotNumber {
                found: s.trim().to_string(),
            },
        )
    })
}

/// Reads a file holding a kernel id list (`0-3,8`).
pub(crate) fn read_idset(path: &Path) -> Result<crate::model::IdSet, HostError> {
    let s = read_small(path)?;
    crate::model::IdSet::parse_list(&s).map_err(|e| HostError::parse(path, e))
}

/// Reads the monotonic clock (`CLOCK_MONOTONIC`) in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}
