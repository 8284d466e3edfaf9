//! Memory locality: the one definition behind the engine's decisions, the daemon's
//! `status`, `trace`'s report and the lab's measurements.
//!
//! Locality is the share of a VM's (or a NUMA cell's) memory that sits where its vCPUs
//! run. Where they run is a weight per node in `0..=1`: 1 for each node the vCPUs may
//! run on (their affinity or home nodes), or the share of their run time spent on the
//! node when eBPF measured it. Callers differ only in the weights, so the arithmetic
//! (and what "no memory" means) is written once.

/// Share (`0..=1`) of `bytes_per_node` that is local, each node weighted by
/// `local_weight(index)`; `None` when there is no memory to be local or not.
pub fn local_share(bytes_per_node: &[u64], local_weight: impl Fn(usize) -> f64) -> Option<f64> {
    let total: u64 = bytes_per_node.iter().sum();
    if total == 0 {
        return None;
    }
    let local: f64 = bytes_per_node
        .iter()
        .enumerate()
        .map(|(i, &b)| local_weight(i) * b as f64)
        .sum();
    Some(local / total as f64)
}

/// [`local_share`] with the nodes the vCPUs may run on: weight 1 for an index `local`
/// accepts, 0 otherwise.
pub fn local_share_on(bytes_per_node: &[u64], local: impl Fn(usize) -> bool) -> Option<f64> {
    local_share(bytes_per_node, |i| if local(i) { 1.0 } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_table() {
        let bytes = [300, 100, 0, 600];
        // (local nodes, share)
        let cases: [(&[usize], f64); 4] = [(&[0], 0.3), (&[0, 1], 0.4), (&[3], 0.6), (&[2], 0.0)];
        for (nodes, want) in cases {
            let got = local_share_on(&bytes, |i| nodes.contains(&i)).unwrap();
            assert!((got - want).abs() < 1e-12, "{nodes:?}: {got} != {want}");
        }
        // Run-time weights: half the time on node 0, half on node 3.
        let got = local_share(&bytes, |i| [0.5, 0.0, 0.0, 0.5][i]).unwrap();
        assert!((got - 0.45).abs() < 1e-12);
        assert_eq!(local_share_on(&[0, 0], |_| true), None);
        assert_eq!(local_share_on(&[], |_| true), None);
    }
}
