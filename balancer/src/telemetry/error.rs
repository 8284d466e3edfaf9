//! Why loading or reading the eBPF telemetry failed, in words an operator can act on.
//! Each variant's message is one line naming what is missing.

use std::path::PathBuf;

/// Errors of [`crate::telemetry`].
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "not allowed to load eBPF programs: run as root or grant CAP_BPF and CAP_PERFMON \
         (CAP_SYS_ADMIN on kernels before 5.8)"
    )]
    MissingCapability,
    #[error("kernel {found} is too old: vmbalancer needs Linux {needed} or newer")]
    KernelTooOld { found: String, needed: String },
    #[error(
        "no kernel BTF at {path}: the kernel must be built with CONFIG_DEBUG_INFO_BTF=y ({reason})"
    )]
    NoBtf { path: PathBuf, reason: String },
    #[error(
        "tracefs is not available (not mounted at /sys/kernel/tracing and mounting it failed: \
         {reason}); the kernel needs CONFIG_FTRACE and tracefs"
    )]
    NoTracefs { reason: String },
    #[error("tracepoint {system}:{event} does not exist on this kernel ({path})")]
    NoTracepoint {
        system: String,
        event: String,
        path: PathBuf,
    },
    #[error("cannot parse tracepoint format {path}: {reason}")]
    BadFormat {
        path: PathBuf,
        reason: super::tracefs::FormatError,
    },
    #[error("cannot read CPU to NUMA node table under {path}: {reason}")]
    Topology { path: PathBuf, reason: String },
    /// `reason` is the kernel's (and aya's) words; `errno` the error number among
    /// them, when there is one.
    #[error("the kernel rejected eBPF program {program}: {reason}")]
    Program {
        program: String,
        reason: String,
        errno: Option<i32>,
    },
    #[error("eBPF program {program} is missing from the embedded object")]
    MissingProgram { program: String },
    #[error("eBPF program {program} has no address to attach to: {source}")]
    Symbol {
        program: String,
        source: super::loader::KallsymsError,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(String),
    #[error("eBPF map {map}: {reason}")]
    Map { map: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl TelemetryError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn map(map: &str, reason: impl std::fmt::Display) -> Self {
        Self::Map {
            map: map.to_owned(),
            reason: reason.to_string(),
        }
    }
}
