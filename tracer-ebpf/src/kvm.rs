//! kvm.exit: kvm:kvm_exit to the same vCPU thread's next kvm:kvm_entry.
//!
//! The exit reason is computed by the tracepoint itself (the vendor's get_exit_info), so the
//! start is the classic tracepoint; the end needs no argument at all and takes the cheapest
//! program the kernel allows (tp_btf, then raw tracepoint, then classic).

use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::HashMap,
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use tracer_common::{
    kvm::{self, ExitStart},
    maps::{Counter, START_ENTRIES},
    stage::StageId,
};

use crate::shared::{KernelStarts, config, count, current_tgid_tid, now_ns, record};

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

#[inline(always)]
fn entry() {
    let (tgid, tid) = current_tgid_tid();
    if let Some(s) = kvm::on_entry(&mut KernelStarts(&KVM_EXIT_START), tid, now_ns()) {
        record(StageId::KvmExit, s.reason, s.vcpu, tgid, s.latency_ns);
    }
}

// void trace_kvm_entry(struct kvm_vcpu *vcpu, bool force_immediate_exit)
#[btf_tracepoint(function = "kvm_entry")]
pub fn kvm_entry_btf(_ctx: BtfTracePointContext) -> i32 {
    entry();
    0
}

#[raw_tracepoint(tracepoint = "kvm_entry")]
pub fn kvm_entry_raw(_ctx: RawTracePointContext) -> i32 {
    entry();
    0
}

#[tracepoint]
pub fn kvm_entry_tp(_ctx: TracePointContext) -> u32 {
    entry();
    0
}
