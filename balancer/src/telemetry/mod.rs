//! The eBPF side of observation: loads the programs from `balancer-ebpf`, tells them
//! which threads to track, and reads their maps.
