//! Tracepoint `kvm:kvm_page_fault` (arch/x86/kvm/mmu/mmu.c, `kvm_mmu_page_fault()`
//! and the VMX/SVM exit handlers): a guest access faulted in the two-dimensional
//! paging (EPT/NPT). It runs on the vCPU thread; faults count towards the VM's 2 MiB
//! guest-physical region in `HOT_REGIONS`. Attached only when kvm is loaded.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use balancer_common::{FaultAddressLayout, REGION_KIND_GPA};

use crate::{count_region_fault, current_tracked_vm};

/// Field offsets on the running kernel, patched by the loader.
#[no_mangle]
static KVM_PAGE_FAULT_LAYOUT: FaultAddressLayout = FaultAddressLayout {
    address_offset: 0,
    valid: 0,
};

#[tracepoint]
pub fn kvm_page_fault(ctx: TracePointContext) -> u32 {
    match try_kvm_page_fault(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_kvm_page_fault(ctx: &TracePointContext) -> Result<u32, u32> {
    // SAFETY: a read of a global the loader patched; volatile keeps it a load.
    let layout = unsafe { core::ptr::read_volatile(&KVM_PAGE_FAULT_LAYOUT) };
    if layout.valid == 0 {
        return Err(0);
    }
    let Some(vm_pid) = current_tracked_vm() else {
        return Ok(0);
    };
    // SAFETY: offset from the running kernel's format file.
    let gpa: u64 = unsafe { ctx.read_at(layout.address_offset as usize) }.map_err(|_| 0u32)?;
    count_region_fault(vm_pid, REGION_KIND_GPA, gpa);
    Ok(0)
}
