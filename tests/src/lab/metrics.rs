//! Pure arithmetic on ground truth: locality, time to a target, CPU balance.
//!
//! Kept apart from the readers so every definition the comparison table relies on
//! is written down once and tested on plain numbers.

/// The node a VM's vCPUs ran on most during an interval: the argmax of vCPU CPU
/// time per node; when the vCPUs did not run at all, the node most of them last
/// ran on.
pub fn main_node(vcpu_ticks_per_node: &[u64], last_nodes: &[usize]) -> Option<usize> {
    if vcpu_ticks_per_node.iter().any(|&t| t > 0) {
        return argmax(vcpu_ticks_per_node.iter().copied());
    }
    if last_nodes.is_empty() {
        return None;
    }
    let n = vcpu_ticks_per_node
        .len()
        .max(last_nodes.iter().max().map_or(0, |m| m + 1));
    let mut counts = vec![0u64; n];
    for &node in last_nodes {
        counts[node] += 1;
    }
    argmax(counts.into_iter())
}

fn argmax(values: impl Iterator<Item = u64>) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (i, v) in values.enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Share (0..1) of a VM's memory on `node`; 0 for a VM without memory.
/// The balancer's one definition ([`balancer::model::local_share_on`]).
pub fn locality(bytes_per_node: &[u64], node: Option<usize>) -> f64 {
    node.and_then(|n| balancer::model::local_share_on(bytes_per_node, |i| i == n))
        .unwrap_or(0.0)
}

/// Page-weighted mean locality over VMs given as (locality, bytes).
pub fn weighted_mean(vms: &[(f64, u64)]) -> f64 {
    let total: u64 = vms.iter().map(|&(_, b)| b).sum();
    if total == 0 {
        return 0.0;
    }
    vms.iter().map(|&(l, b)| l * b as f64).sum::<f64>() / total as f64
}

/// The first sample time at which `value >= target`, if any.
pub fn time_to(samples: &[(f64, f64)], target: f64) -> Option<f64> {
    samples.iter().find(|&&(_, v)| v >= target).map(|&(t, _)| t)
}

/// CPU balance over nodes: least loaded / most loaded (1 = even; 0 = a node idle
/// while another works). 1 when nothing ran.
pub fn cpu_balance(load_per_node: &[f64]) -> f64 {
    let max = load_per_node.iter().copied().fold(0.0, f64::max);
    let min = load_per_node.iter().copied().fold(f64::INFINITY, f64::min);
    if max <= 0.0 || load_per_node.is_empty() {
        1.0
    } else {
        min / max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_node_prefers_cpu_time() {
        assert_eq!(main_node(&[5, 9, 0, 1], &[0, 0]), Some(1));
        assert_eq!(main_node(&[0, 0, 0, 0], &[2, 2, 3]), Some(2));
        assert_eq!(main_node(&[0, 0], &[]), None);
    }

    #[test]
    fn locality_and_mean() {
        assert_eq!(locality(&[25, 75, 0, 0], Some(1)), 0.75);
        assert_eq!(locality(&[0, 0], Some(1)), 0.0);
        assert_eq!(locality(&[1, 1], None), 0.0);
        assert!((weighted_mean(&[(1.0, 100), (0.0, 300)]) - 0.25).abs() < 1e-12);
        assert_eq!(weighted_mean(&[]), 0.0);
    }

    #[test]
    fn time_to_target() {
        let s = [(0.0, 0.25), (5.0, 0.8), (10.0, 0.92), (15.0, 0.97)];
        assert_eq!(time_to(&s, 0.9), Some(10.0));
        assert_eq!(time_to(&s, 0.95), Some(15.0));
        assert_eq!(time_to(&s, 0.99), None);
    }

    #[test]
    fn balance() {
        assert_eq!(cpu_balance(&[2.0, 2.0]), 1.0);
        assert_eq!(cpu_balance(&[0.0, 2.0]), 0.0);
        assert_eq!(cpu_balance(&[1.0, 2.0]), 0.5);
        assert_eq!(cpu_balance(&[0.0, 0.0]), 1.0);
    }
}
