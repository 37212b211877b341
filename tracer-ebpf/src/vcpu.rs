//! kvm.halt_wakeup (kvm:kvm_vcpu_wakeup) and the start of kvm.userspace_exit
//! (kvm:kvm_userspace_exit); the end, ioctl(KVM_RUN), is in `syscalls`.

use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::HashMap,
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use tracer_common::{
    kvm::{
        halt::halt_detail,
        uexit::{self, NO_VCPU, UexitStart, VcpuThread},
    },
    maps::{Counter, START_ENTRIES},
    stage::StageId,
};

use crate::shared::{KernelStarts, config, count, current_tgid_tid, now_ns, record};

/// Exits to userspace not yet followed by KVM_RUN, by vCPU thread.
#[map]
pub static UEXIT_START: HashMap<u32, UexitStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// The vCPU fd each vCPU thread last ran (learned at ioctl(KVM_RUN)).
#[map]
pub static VCPU_FD: HashMap<u32, VcpuThread> = HashMap::with_max_entries(START_ENTRIES, 0);

#[inline(always)]
fn wakeup(ns: u64, waited: bool) {
    let (tgid, tid) = current_tgid_tid();
    let fd = unsafe { VCPU_FD.get(&tid) }.map_or(NO_VCPU, |t| t.fd);
    record(StageId::KvmHaltWakeup, halt_detail(waited), fd, tgid, ns);
}

// void trace_kvm_vcpu_wakeup(__u64 ns, bool waited, bool valid)
#[btf_tracepoint(function = "kvm_vcpu_wakeup")]
pub fn kvm_vcpu_wakeup_btf(ctx: BtfTracePointContext) -> i32 {
    wakeup(ctx.arg(0), ctx.arg::<u64>(1) & 0xff != 0);
    0
}

#[raw_tracepoint(tracepoint = "kvm_vcpu_wakeup")]
pub fn kvm_vcpu_wakeup_raw(ctx: RawTracePointContext) -> i32 {
    wakeup(ctx.arg(0), ctx.arg::<u64>(1) & 0xff != 0);
    0
}

// kvm/kvm_vcpu_wakeup: __u64 ns; bool waited; bool valid;
#[tracepoint]
pub fn kvm_vcpu_wakeup_tp(ctx: TracePointContext) -> u32 {
    let f = unsafe {
        (
            ctx.read_at::<u64>(config!(tp_wakeup_ns) as usize),
            ctx.read_at::<u8>(config!(tp_wakeup_waited) as usize),
        )
    };
    match f {
        (Ok(ns), Ok(waited)) => wakeup(ns, waited != 0),
        _ => count(StageId::KvmHaltWakeup, Counter::ReadError),
    }
    0
}

#[inline(always)]
fn userspace_exit(reason: u32, errno: i32) {
    let (tgid, tid) = current_tgid_tid();
    if let Err(c) = uexit::on_userspace_exit(
        &mut KernelStarts(&UEXIT_START),
        tid,
        tgid,
        now_ns(),
        reason,
        errno,
    ) {
        count(StageId::KvmUserspaceExit, c);
    }
}

// void trace_kvm_userspace_exit(__u32 reason, int errno)
#[btf_tracepoint(function = "kvm_userspace_exit")]
pub fn kvm_userspace_exit_btf(ctx: BtfTracePointContext) -> i32 {
    userspace_exit(ctx.arg::<u64>(0) as u32, ctx.arg::<u64>(1) as i32);
    0
}

#[raw_tracepoint(tracepoint = "kvm_userspace_exit")]
pub fn kvm_userspace_exit_raw(ctx: RawTracePointContext) -> i32 {
    userspace_exit(ctx.arg::<u64>(0) as u32, ctx.arg::<u64>(1) as i32);
    0
}

// kvm/kvm_userspace_exit: __u32 reason; int errno;
#[tracepoint]
pub fn kvm_userspace_exit_tp(ctx: TracePointContext) -> u32 {
    let f = unsafe {
        (
            ctx.read_at::<u32>(config!(tp_uexit_reason) as usize),
            ctx.read_at::<i32>(config!(tp_uexit_errno) as usize),
        )
    };
    match f {
        (Ok(reason), Ok(errno)) => userspace_exit(reason, errno),
        _ => count(StageId::KvmUserspaceExit, Counter::ReadError),
    }
    0
}
