//! The NUMA lab's guest side, shared by the in-guest harness and the fake VM.
//!
//! The lab boots a real 4-node kernel under QEMU. Inside it, the harness
//! (`lab_harness`) reads a scenario ([`scenario`]), starts fake qemu-kvm processes
//! (`fake_qemu`), runs one balancer, and measures ground truth itself from /proc and
//! /sys ([`truth`], [`metrics`]), independent of what vmbalancer believes. It reports
//! over the serial console as JSON lines ([`protocol`]) that `cargo xtask lab` parses.

pub mod access;
pub mod compare;
pub mod judge;
pub mod metrics;
pub mod protocol;
pub mod scenario;
pub mod truth;
