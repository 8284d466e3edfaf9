//! The eBPF side of observation: loads the programs from `balancer-ebpf`, tells them
//! which threads to track, and reads their maps.
//!
//! The daemon, `vmbalancer trace` and the integration tests all use this one API:
//! [`Telemetry::load`], then [`Telemetry::track`] the vCPU and emulator threads of each
//! VM, and read per-thread counters with [`Telemetry::read_thread`]. Everything that
//! varies between kernels (tracepoint record layouts, which hooks exist) is resolved
//! at load time, never compiled in.

mod error;
mod loader;
pub mod topology;
pub mod tracefs;

pub use balancer_common::TrackedThread;
pub use error::TelemetryError;
pub use loader::{LoadOptions, MIN_KERNEL, Telemetry};

/// What the programs counted for one thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ThreadTelemetry {
    /// Scheduler migrations (`sched:sched_migrate_task`) of the thread.
    pub migrations: u64,
    /// Those between CPUs of different NUMA nodes.
    pub cross_node_migrations: u64,
}

/// A telemetry feature: one or more programs on one kernel hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Feature {
    /// `sched:sched_migrate_task`: migrations and cross-node migrations per thread.
    Migrations,
}

impl Feature {
    pub fn name(self) -> &'static str {
        match self {
            Feature::Migrations => "migrations",
        }
    }
}

/// Whether a feature runs on this kernel.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum FeatureState {
    Active,
    /// The hook is missing or was rejected; the reason says which.
    Unavailable(String),
}

/// Kernel-measured cost of one program since it was loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProgramCost {
    pub program: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ProgramCost {
    /// Mean nanoseconds per event (0 when it never ran).
    pub fn ns_per_event(&self) -> f64 {
        if self.run_count == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.run_count as f64
        }
    }
}
