//! Did an operator place this VM by hand?
//!
//! A VM whose vCPUs are pinned (libvirt `vcpupin`, `taskset`, a narrow cpuset) or whose
//! memory is bound (`numatune mode=strict`, `host-nodes=` with `policy=bind` or
//! `interleave`) expresses a decision the balancer must respect: it is reported as
//! [`Pinning::Operator`] with the evidence and never moved.
//!
//! For a libvirt domain the operator's intent is written down: libvirt's live domain
//! XML ([`super::libvirt`]). Then only that file and the command line count: an
//! affinity some other tool narrowed is not the operator's decision, and a pin the
//! operator adds with `virsh vcpupin` counts even on a VM the balancer holds.
//!
//! Without that file (plain qemu, another management stack) the threads are the only
//! evidence. The balancer narrows affinities and cpusets itself, so a VM it manages
//! would look pinned by the same test; for those VMs ([`PinningInput::managed`]) only
//! the command line counts, which the balancer never changes.

use super::libvirt::DomainIntent;
use crate::model::{CpuSet, NodeSet, Pinning};

/// The evidence about one VM.
#[derive(Clone, Debug)]
pub struct PinningInput<'a> {
    /// Online CPUs of the host.
    pub host_cpus: &'a CpuSet,
    /// Nodes of the host that have memory.
    pub host_mem_nodes: &'a NodeSet,
    /// Affinity of each vCPU thread.
    pub vcpu_affinities: Vec<&'a CpuSet>,
    /// `cpuset.mems` as configured in the VM's (or its vCPUs') cgroup, if any.
    pub cgroup_mems: Option<&'a NodeSet>,
    /// Memory binding from the command line (nodes, policy).
    pub cmdline_binding: Option<(NodeSet, String)>,
    /// The operator's placement from libvirt's live domain XML, when the VM is a
    /// libvirt domain whose status file could be read.
    pub libvirt: Option<&'a DomainIntent>,
    /// The balancer itself has changed this VM's placement.
    pub managed: bool,
}

/// Decides the pinning of one VM.
pub fn detect(input: &PinningInput<'_>) -> Pinning {
    if let Some((nodes, policy)) = &input.cmdline_binding {
        return Pinning::Operator {
            why: format!(
                "guest memory bound to host node(s) {nodes} on the command line (policy={policy})"
            ),
        };
    }
    if let Some(intent) = input.libvirt {
        return match intent.evidence() {
            Some(why) => Pinning::Operator { why },
            None => Pinning::None,
        };
    }
    if input.managed {
        return Pinning::None;
    }
    let pinned: Vec<&&CpuSet> = input
        .vcpu_affinities
        .iter()
        .filter(|a| !a.is_empty() && **a != input.host_cpus && a.is_subset(input.host_cpus))
        .collect();
    if !pinned.is_empty() {
        let all: CpuSet = pinned.iter().fold(CpuSet::new(), |acc, a| acc.union(a));
        let one_each = pinned.iter().all(|a| a.len() == 1);
        return Pinning::Operator {
            why: format!(
                "{} of {} vCPUs pinned{} to CPUs {all} (host CPUs {})",
                pinned.len(),
                input.vcpu_affinities.len(),
                if one_each { " one-to-one" } else { "" },
                input.host_cpus
            ),
        };
    }
    if let Some(mems) = input.cgroup_mems
        && !mems.is_empty()
        && mems != input.host_mem_nodes
        && mems.is_subset(input.host_mem_nodes)
    {
        return Pinning::Operator {
            why: format!("cgroup cpuset.mems restricts memory to node(s) {mems} (numatune strict)"),
        };
    }
    Pinning::None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> CpuSet {
        CpuSet::parse_list(s).unwrap()
    }

    #[test]
    fn pinning_cases() {
        let host = set("0-15");
        let mems = set("0-1");
        let free = set("0-15");
        let narrow = set("4");
        let node1 = set("1");
        let base = PinningInput {
            host_cpus: &host,
            host_mem_nodes: &mems,
            vcpu_affinities: vec![&free, &free],
            cgroup_mems: None,
            cmdline_binding: None,
            libvirt: None,
            managed: false,
        };
        assert_eq!(detect(&base), Pinning::None);

        let pinned = PinningInput {
            vcpu_affinities: vec![&free, &narrow],
            ..base.clone()
        };
        let Pinning::Operator { why } = detect(&pinned) else {
            panic!()
        };
        assert!(
            why.contains("1 of 2 vCPUs pinned one-to-one to CPUs 4"),
            "{why}"
        );
        // What the balancer pinned itself is not the operator's.
        assert_eq!(
            detect(&PinningInput {
                managed: true,
                ..pinned
            }),
            Pinning::None
        );

        let cg = PinningInput {
            cgroup_mems: Some(&node1),
            ..base.clone()
        };
        assert!(matches!(detect(&cg), Pinning::Operator { why } if why.contains("cpuset.mems")));
        let full_mems = PinningInput {
            cgroup_mems: Some(&mems),
            ..base.clone()
        };
        assert_eq!(detect(&full_mems), Pinning::None);

        let cmd = PinningInput {
            cmdline_binding: Some((set("1"), "bind".into())),
            managed: true,
            ..base
        };
        assert!(matches!(detect(&cmd), Pinning::Operator { why } if why.contains("policy=bind")));
    }

    #[test]
    fn libvirt_xml_is_the_operators_word() {
        let host = set("0-15");
        let mems = set("0-1");
        let narrow = set("4");
        let node1 = set("1");
        let free_xml = DomainIntent::default();
        let pinned_xml = DomainIntent {
            vcpupins: vec![(0, set("2"))],
            ..DomainIntent::default()
        };
        // Threads narrowed by some tool, cpuset.mems narrowed, XML free: not pinned.
        let base = PinningInput {
            host_cpus: &host,
            host_mem_nodes: &mems,
            vcpu_affinities: vec![&narrow],
            cgroup_mems: Some(&node1),
            cmdline_binding: None,
            libvirt: Some(&free_xml),
            managed: false,
        };
        assert_eq!(detect(&base), Pinning::None);
        // `virsh vcpupin` on a VM the balancer holds: the operator's now.
        let held = PinningInput {
            libvirt: Some(&pinned_xml),
            managed: true,
            ..base
        };
        assert!(matches!(detect(&held), Pinning::Operator { why } if why.contains("vcpupin 0->2")),);
    }
}
