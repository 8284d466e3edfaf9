//! Types shared by the eBPF programs (`balancer-ebpf`) and the userspace daemon.
//!
//! Every type here is a map key or value, or a configuration record written by
//! userspace and read by the programs. They are `#[repr(C)]` with explicit padding
//! fields and compile-time size checks, so the two sides agree on the layout
//! byte for byte; booleans are `u32` flags for the same reason. With the `user`
//! feature they implement `aya::Pod`.
#![no_std]

pub mod layouts;
pub mod maps;
pub use layouts::*;
pub use maps::*;
