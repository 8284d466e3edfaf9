//! The guest-to-host result protocol: one JSON object per console line, after a
//! unique prefix so kernel messages and program output never parse as results.
//!
//! Its types are defined once, in the `lab-protocol` crate, because two sides must
//! agree on them: this harness prints the lines and `cargo xtask lab` reads them,
//! and xtask cannot depend on this crate (it needs the balancer and the eBPF
//! toolchain, while xtask must build first). They are re-exported here so the
//! harness and the judges name them as parts of the lab.

pub use lab_protocol::{
    CellTruth, MalformedLine, MoverBench, PREFIX, Record, Sample, Summary, VmTruth, parse_line,
};
