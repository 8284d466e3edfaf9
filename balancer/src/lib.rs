//! vmbalancer keeps KVM virtual machines NUMA-local.
//!
//! The crate is organised around one boundary to the world:
//!
//! - [`model`]: plain data. A [`model::Snapshot`] of the host (topology, VMs, their
//!   vCPUs and memory per node, telemetry) and a [`model::Plan`] of actions with
//!   reasons.
//! - [`engine`]: the pure policy engine. Snapshot in, plan out; no I/O, no clock,
//!   no randomness.
//! - [`host`]: the boundary. An [`host::Observer`] builds snapshots and an
//!   [`host::Applier`] carries out actions. Behind it sit the real Linux host
//!   ([`host::linux`]) and the log-only applier ([`host::logonly`]) used by `trace`
//!   and `--dry-run`.
//! - [`sim`]: the simulator. A simulated world behind the same traits, in which the
//!   daemon's own tick runs vmbalancer, compared with baseline policies over
//!   committed scenarios (`vmbalancer simulate`).
//! - [`telemetry`]: loads the eBPF programs and drains their maps into the snapshot.
//! - [`daemon`]: the tick loop, journal, control socket and configuration of
//!   `vmbalancer run`.
//! - [`cli`]: the `vmbalancer` subcommands.

pub mod cli;
pub mod daemon;
pub mod engine;
pub mod host;
pub mod model;
pub mod sim;
pub mod telemetry;
