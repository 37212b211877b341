//! kvm.exit: kvm:kvm_exit to the same vCPU thread's next kvm:kvm_entry.

use aya_ebpf::{macros::map, maps::HashMap};
use tracer_common::{
    kvm::{self, ExitStart},
    maps::START_ENTRIES,
    stage::StageId,
};

use crate::shared::{KernelStarts, count, now_ns, record, record_or_count};

const STAGE: StageId = StageId::KvmExit;

/// Exits not yet followed by an entry, by vCPU thread; each carries its VM.
#[map]
static KVM_EXIT_START: HashMap<u32, ExitStart> = HashMap::with_max_entries(START_ENTRIES, 0);

#[inline(always)]
pub fn exit(tgid: u32, tid: u32, reason: u32, isa: u32, vcpu: u32) {
    let started = kvm::on_exit(
        &mut KernelStarts(&KVM_EXIT_START),
        tid,
        tgid,
        now_ns(),
        reason,
        isa,
        vcpu,
    );
    if let Err(c) = started {
        count(STAGE, c);
    }
}

#[inline(always)]
pub fn entry(tgid: u32, tid: u32, vcpu: Option<u32>, now: u64) {
    let ended = kvm::on_entry(&mut KernelStarts(&KVM_EXIT_START), tid, tgid, vcpu, now);
    record_or_count(STAGE, ended, |s| {
        record(STAGE, s.reason, s.vcpu, tgid, s.latency_ns, now)
    });
}
