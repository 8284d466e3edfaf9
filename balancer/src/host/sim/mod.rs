//! The simulated host: topology, VMs with CPU demand over time, a scheduler model and a
//! NUMA performance model, behind the same [`Observer`](super::Observer) and
//! [`Applier`](super::Applier) traits as the real host.
