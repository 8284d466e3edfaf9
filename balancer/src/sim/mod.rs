//! The simulator: vmbalancer and the systems it is compared with, run on a simulated
//! host over committed scenarios (`vmbalancer simulate`).
//!
//! It is not a host of its own but a world the daemon can run in: vmbalancer's
//! policy runs through the daemon's own tick ([`crate::daemon::run::Daemon::tick`]),
//! with a simulated [`Observer`](crate::host::Observer) ([`observe::SimObserver`]) and
//! [`Actuator`](crate::daemon::Actuator) ([`apply::SimActuator`]) in place of the
//! Linux ones. So the simulator exercises what the daemon does with a plan: the
//! configuration guard, adoption, background memory moves and their outcomes
//! reaching the engine one tick later. Time is the world's: one tick per simulated
//! second, `Snapshot::now_ns` from the world's clock, no real sleeping.
//!
//! - [`world`]: the simulated host, its scheduler and page migration, stepped second
//!   by second;
//! - [`observe`]: the world as a [`Snapshot`](crate::model::Snapshot);
//! - [`apply`]: actions changing the world;
//! - [`perf`]: the NUMA performance model, fitted by [`calibrate`] on seed 004;
//! - [`policies`]: the contenders (vmbalancer through the daemon's loop, and the
//!   baselines: no balancer, manual binding, vmbalanced, numad, an oracle);
//! - [`scenario`]: committed scenarios (`balancer/scenarios/`);
//! - [`run`]: runs contenders over a scenario and summarises the runs;
//! - [`bench`]: times one engine decision on synthetic hosts;
//! - [`rng`]: the seeded generator behind every random choice.

pub mod apply;
pub mod bench;
pub mod calibrate;
pub mod observe;
pub mod perf;
pub mod policies;
pub mod rng;
pub mod run;
pub mod scenario;
pub mod world;

pub use world::{World, all_nodes, node_cpus};
