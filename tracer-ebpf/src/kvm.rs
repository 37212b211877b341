//! kvm.exit (kvm:kvm_exit to the same vCPU thread's next kvm:kvm_entry) and the end of
//! kvm.inject_to_entry (that entry, for the vCPU an interrupt is pending on).
//!
//! The exit reason is computed by the tracepoint itself (the vendor's get_exit_info), so the
//! exit is the classic tracepoint; the entry takes the cheapest program the kernel allows
//! (tp_btf, then raw tracepoint, then classic).

use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::HashMap,
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use tracer_common::{
    kvm::{self, ExitStart, inject},
    maps::{Counter, START_ENTRIES},
    stage::StageId,
};

use crate::{
    irq::INJ_PENDING,
    shared::{KernelStarts, config, count, current_tgid_tid, now_ns, read_at, record},
};

#[map]
static KVM_EXIT_START: HashMap<u32, ExitStart> = HashMap::with_max_entries(START_ENTRIES, 0);

// kvm/kvm_exit: unsigned int exit_reason; ...; u32 isa; ...; unsigned int vcpu_id; ...
#[tracepoint]
pub fn kvm_exit_tp(ctx: TracePointContext) -> u32 {
    let (_, tid) = current_tgid_tid();
    let fields = unsafe {
        (
            ctx.read_at::<u32>(config!(tp_kvm_exit_reason) as usize),
            ctx.read_at::<u32>(config!(tp_kvm_exit_isa) as usize),
            ctx.read_at::<u32>(config!(tp_kvm_exit_vcpu) as usize),
        )
    };
    let (Ok(reason), Ok(isa), Ok(vcpu)) = fields else {
        count(StageId::KvmExit, Counter::ReadError);
        return 0;
    };
    if let Err(c) = kvm::on_exit(
        &mut KernelStarts(&KVM_EXIT_START),
        tid,
        now_ns(),
        reason,
        isa,
        vcpu,
    ) {
        count(StageId::KvmExit, c);
    }
    0
}

/// kvm_entry of `vcpu` (None when it could not be read).
#[inline(always)]
fn entry(vcpu: Option<u32>) {
    let (tgid, tid) = current_tgid_tid();
    let now = now_ns();
    if let Some(s) = kvm::on_entry(&mut KernelStarts(&KVM_EXIT_START), tid, now) {
        record(StageId::KvmExit, s.reason, s.vcpu, tgid, s.latency_ns);
    }
    let Some(vcpu) = vcpu else {
        count(StageId::KvmInjectToEntry, Counter::ReadError);
        return;
    };
    if let Some(s) = inject::on_entry(&mut KernelStarts(&INJ_PENDING), tgid, vcpu, now) {
        record(StageId::KvmInjectToEntry, 0, s.vcpu, s.vm, s.latency_ns);
    }
}

/// `vcpu->vcpu_id` of a `struct kvm_vcpu *` argument.
#[inline(always)]
fn vcpu_id(vcpu: u64) -> Option<u32> {
    unsafe { read_at::<u32>(vcpu, config!(vcpu_id)).ok() }
}

// void trace_kvm_entry(struct kvm_vcpu *vcpu, bool force_immediate_exit)
#[btf_tracepoint(function = "kvm_entry")]
pub fn kvm_entry_btf(ctx: BtfTracePointContext) -> i32 {
    entry(vcpu_id(ctx.arg(0)));
    0
}

#[raw_tracepoint(tracepoint = "kvm_entry")]
pub fn kvm_entry_raw(ctx: RawTracePointContext) -> i32 {
    entry(vcpu_id(ctx.arg(0)));
    0
}

// kvm/kvm_entry: unsigned int vcpu_id; ...
#[tracepoint]
pub fn kvm_entry_tp(ctx: TracePointContext) -> u32 {
    entry(unsafe { ctx.read_at::<u32>(config!(tp_kvm_entry_vcpu) as usize) }.ok());
    0
}
