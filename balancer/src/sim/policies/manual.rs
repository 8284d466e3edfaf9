//! Static manual binding as in seed 004: each VM bound (vCPUs and memory, as libvirt
//! `vcpupin` + `numatune` would) to one node for its whole life; 10 VMs per node in the
//! 40-VM test, the nodes they started on in the 20-VM test.

use std::collections::BTreeSet;

use crate::model::{PlannedAction, Reason, Snapshot};

use super::{Baseline, World, cpuset_move};

/// Manual binding.
#[derive(Default)]
pub struct Manual {
    bound: BTreeSet<u32>,
}

impl Baseline for Manual {
    fn name(&self) -> &'static str {
        "manual"
    }

    fn tick(&mut self, host: &mut World, snap: &Snapshot) -> Vec<PlannedAction> {
        let mut out = Vec::new();
        for vm in &snap.vms {
            if !self.bound.insert(vm.pid) {
                continue;
            }
            let Some(i) = host.vm_index(vm.pid) else {
                continue;
            };
            let node = host.vms[i].manual_node;
            let reason = Reason::InitialPlacement { node: node as u32 };
            out.extend(cpuset_move(host, snap, vm.pid, node, reason, true));
        }
        out
    }
}
