//! kvm.inject_to_entry: KVM's injection (the CPU is marked), the vCPU that accepts it (a
//! pending interrupt for that VM and vCPU), that vCPU's next kvm_entry.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tracer_common::{
    kvm::inject::{self, InjectMark, PendingInject, VcpuKey},
    maps::START_ENTRIES,
    stage::StageId,
};

use crate::shared::{CpuSlot, KernelStarts, count, now_ns, record};

const STAGE: StageId = StageId::KvmInjectToEntry;

/// The injection running on this CPU, for kvm_apic_accept_irq to find.
#[map]
static INJ_MARK: PerCpuArray<InjectMark> = PerCpuArray::with_max_entries(1, 0);

/// Injected interrupts not yet seen by their vCPU, by VM and vCPU (only known VMs).
#[map]
static INJ_PENDING: HashMap<VcpuKey, PendingInject> = HashMap::with_max_entries(START_ENTRIES, 0);

#[inline(always)]
pub fn injected(tid: u32, vm: u32, device: u32, in_task: bool, now: u64) {
    let mark = &mut CpuSlot(&INJ_MARK);
    if let Err(c) = inject::on_inject(mark, 0, tid, vm, device, in_task, now) {
        count(STAGE, c);
    }
}

#[inline(always)]
pub fn accepted(tid: u32, apicid: u32, in_task: bool) {
    let pending = &mut KernelStarts(&INJ_PENDING);
    let now = now_ns();
    if let Err(c) = inject::on_accept(&CpuSlot(&INJ_MARK), pending, 0, tid, apicid, in_task, now) {
        count(STAGE, c);
    }
}

/// A VM entry on this CPU by task `tid` (`inject::on_entered`).
#[inline(always)]
pub fn entered(tid: u32) {
    inject::on_entered(&mut CpuSlot(&INJ_MARK), 0, tid);
}

#[inline(always)]
pub fn entry(tgid: u32, vcpu: u32, now: u64) {
    if let Some(s) = inject::on_entry(&mut KernelStarts(&INJ_PENDING), tgid, vcpu, now) {
        record(STAGE, s.device, s.vcpu, s.vm, s.latency_ns, now);
    }
}
