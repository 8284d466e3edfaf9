//! The real Linux host: readers of procfs, sysfs and cgroupfs, and the actuators.
//!
//! Every reader takes a root directory instead of assuming `/`, so tests read trees
//! captured from real multi-node machines (`tests/fixtures/`).

pub mod actuate;
