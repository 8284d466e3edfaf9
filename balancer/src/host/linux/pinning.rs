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
//! [`pins`] says which CPU sets the operator's pin covers (from the XML: the vCPUs
//! with a `vcpupin`, the emulator with an `emulatorpin`), so a VM the balancer held
//! is let go keeping those and getting back the balancer's other changes.
//!
//! Without that file (plain qemu, another management stack) the threads are the only
//! evidence. The balancer narrows affinities and cpusets itself, so a VM it manages
//! would look pinned by the same test; for those VMs ([`PinningInput::managed`]) only
//! the command line counts, which the balancer never changes.

use super::libvirt::DomainIntent;
use crate::model::{CpuSet, NodeSet, OperatorPins, Pinning};

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
///
/// The domain XML's words come first: libvirt renders a strict `numatune` (and the
/// nodes its `numad` helper advised for `placement='auto'`) as `host-nodes=` on the
/// qemu command line, so the command line alone would name a consequence instead of
/// what the operator asked for. A binding on the command line of a domain whose XML
/// shows none (`<qemu:commandline>`), or of a qemu outside libvirt, still counts.
pub fn detect(input: &PinningInput<'_>) -> Pinning {
    if let Some(why) = input.libvirt.and_then(DomainIntent::evidence) {
        return Pinning::Operator { why };
    }
    if let Some((nodes, policy)) = &input.cmdline_binding {
        return Pinning::Operator {
            why: format!(
                "guest memory bound to host node(s) {nodes} on the command line (policy={policy})"
            ),
        };
    }
    if input.libvirt.is_some() {
        return Pinning::None;
    }
    if input.managed {
        return Pinning::None;
    }
    let pinned = pinned_threads(input);
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

/// The vCPU affinities narrower than the host: the evidence when nothing else says.
fn pinned_threads<'a>(input: &'a PinningInput<'_>) -> Vec<&'a &'a CpuSet> {
    input
        .vcpu_affinities
        .iter()
        .filter(|a| !a.is_empty() && **a != input.host_cpus && a.is_subset(input.host_cpus))
        .collect()
}

/// Which CPU sets the operator set, for a VM [`detect`] calls the operator's: what
/// libvirt's domain XML pins; nothing for a memory binding alone (command line or
/// `cpuset.mems`); every thread when narrowed affinities are the evidence.
pub fn pins(input: &PinningInput<'_>) -> OperatorPins {
    match input.libvirt {
        Some(intent) => intent.pins(),
        None if input.managed || input.cmdline_binding.is_some() => OperatorPins::default(),
        None if !pinned_threads(input).is_empty() => OperatorPins::everything(),
        None => OperatorPins::default(),
    }
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
        assert_eq!(pins(&pinned), OperatorPins::everything());
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
        assert_eq!(
            pins(&cmd),
            OperatorPins::default(),
            "a memory binding pins no CPU"
        );
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
            ..base.clone()
        };
        assert!(matches!(detect(&held), Pinning::Operator { why } if why.contains("vcpupin 0->2")),);
        // libvirt renders a strict numatune as a binding on the command line too: the
        // XML, which names every pin, is the evidence shown.
        let both = PinningInput {
            cmdline_binding: Some((node1.clone(), "bind".into())),
            ..held.clone()
        };
        assert!(matches!(detect(&both), Pinning::Operator { why } if why.contains("vcpupin 0->2")));
        // Only the pinned vCPU is the operator's; what the balancer set elsewhere is not.
        assert_eq!(
            pins(&held),
            OperatorPins {
                vcpus: vec![0],
                ..OperatorPins::default()
            }
        );
        // placement='auto': libvirt puts the advised node on the command line too;
        // status names the operator's choice, not libvirt's rendering of it.
        let auto_xml = DomainIntent {
            auto_placement: Some(Some(set("1"))),
            ..DomainIntent::default()
        };
        let auto = PinningInput {
            libvirt: Some(&auto_xml),
            cmdline_binding: Some((set("1"), "bind".into())),
            managed: false,
            ..base.clone()
        };
        assert!(
            matches!(detect(&auto), Pinning::Operator { why } if why == "libvirt domain XML: placement='auto' on node(s) 1"),
            "{:?}",
            detect(&auto)
        );
        // A binding passed through `<qemu:commandline>`: the XML shows none, the
        // command line still counts.
        let passthrough = PinningInput {
            cmdline_binding: Some((set("1"), "bind".into())),
            ..base
        };
        assert!(
            matches!(detect(&passthrough), Pinning::Operator { why } if why.contains("on the command line"))
        );
    }
}
