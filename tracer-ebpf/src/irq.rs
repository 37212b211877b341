//! kvm.signal_to_inject and the start of kvm.inject_to_entry: KVM's injections
//! (kvm:kvm_msi_set_irq, kvm:kvm_set_irq), the vCPU that accepts them
//! (kvm:kvm_apic_accept_irq), and the workqueue hops of deferred irqfd injections.
//! The signalling system calls that start kvm.signal_to_inject are in `syscalls`.

use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use tracer_common::{
    kvm::{
        inject::{self, InjectMark, VcpuKey},
        signal::{self, SignalStart},
    },
    maps::{Counter, START_ENTRIES},
    stage::StageId,
};

use crate::shared::{
    CpuSlot, KernelStarts, config, count, current_tgid_tid, now_ns, read_at, record,
};

/// Signals in flight, by thread (the signalling thread, then the kworker).
#[map]
pub static SIG_START: HashMap<u32, SignalStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// Deferred signals, by work item (between queue_work and the kworker running it).
#[map]
static SIG_DEFERRED: HashMap<u64, SignalStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// The injection running on this CPU, for kvm_apic_accept_irq to find.
#[map]
static INJ_MARK: PerCpuArray<InjectMark> = PerCpuArray::with_max_entries(1, 0);

/// Injected interrupts not yet seen by their vCPU, by VM and vCPU.
#[map]
pub static INJ_PENDING: HashMap<VcpuKey, u64> = HashMap::with_max_entries(START_ENTRIES, 0);

/// An injection in the current task: ends its signal, marks the CPU for the accepts that follow.
#[inline(always)]
fn injected() {
    let (tgid, tid) = current_tgid_tid();
    let now = now_ns();
    let mut vm = tgid;
    if let Some(s) = signal::on_inject(&mut KernelStarts(&SIG_START), tid, now) {
        record(StageId::KvmSignalToInject, s.detail, 0, s.vm, s.latency_ns);
        vm = s.vm;
    }
    inject::on_inject(&mut CpuSlot(&INJ_MARK), 0, tid, vm, now);
}

// void trace_kvm_msi_set_irq(__u64 address, __u64 data)
#[btf_tracepoint(function = "kvm_msi_set_irq")]
pub fn kvm_msi_set_irq_btf(_ctx: BtfTracePointContext) -> i32 {
    injected();
    0
}

#[raw_tracepoint(tracepoint = "kvm_msi_set_irq")]
pub fn kvm_msi_set_irq_raw(_ctx: RawTracePointContext) -> i32 {
    injected();
    0
}

#[tracepoint]
pub fn kvm_msi_set_irq_tp(_ctx: TracePointContext) -> u32 {
    injected();
    0
}

/// kvm_set_irq raises and lowers lines: only raising injects.
#[inline(always)]
fn set_irq(level: i32) {
    if level == 1 {
        injected();
    }
}

// void trace_kvm_set_irq(unsigned int gsi, int level, int irq_source_id)
#[btf_tracepoint(function = "kvm_set_irq")]
pub fn kvm_set_irq_btf(ctx: BtfTracePointContext) -> i32 {
    set_irq(ctx.arg::<u64>(1) as i32);
    0
}

#[raw_tracepoint(tracepoint = "kvm_set_irq")]
pub fn kvm_set_irq_raw(ctx: RawTracePointContext) -> i32 {
    set_irq(ctx.arg::<u64>(1) as i32);
    0
}

// kvm/kvm_set_irq: unsigned int gsi; int level; int irq_source_id;
#[tracepoint]
pub fn kvm_set_irq_tp(ctx: TracePointContext) -> u32 {
    match unsafe { ctx.read_at::<i32>(config!(tp_set_irq_level) as usize) } {
        Ok(level) => set_irq(level),
        Err(_) => count(StageId::KvmSignalToInject, Counter::ReadError),
    }
    0
}

#[inline(always)]
fn accepted(apicid: u32) {
    let (_, tid) = current_tgid_tid();
    if let Err(c) = inject::on_accept(
        &CpuSlot(&INJ_MARK),
        &mut KernelStarts(&INJ_PENDING),
        0,
        tid,
        apicid,
        now_ns(),
    ) {
        count(StageId::KvmInjectToEntry, c);
    }
}

// void trace_kvm_apic_accept_irq(__u32 apicid, __u16 dm, __u16 tm, __u8 vec)
#[btf_tracepoint(function = "kvm_apic_accept_irq")]
pub fn kvm_apic_accept_irq_btf(ctx: BtfTracePointContext) -> i32 {
    accepted(ctx.arg::<u64>(0) as u32);
    0
}

#[raw_tracepoint(tracepoint = "kvm_apic_accept_irq")]
pub fn kvm_apic_accept_irq_raw(ctx: RawTracePointContext) -> i32 {
    accepted(ctx.arg::<u64>(0) as u32);
    0
}

// kvm/kvm_apic_accept_irq: __u32 apicid; ...
#[tracepoint]
pub fn kvm_apic_accept_irq_tp(ctx: TracePointContext) -> u32 {
    match unsafe { ctx.read_at::<u32>(config!(tp_accept_apicid) as usize) } {
        Ok(apicid) => accepted(apicid),
        Err(_) => count(StageId::KvmInjectToEntry, Counter::ReadError),
    }
    0
}

/// Which workqueue event a deferred signal is at.
#[derive(Clone, Copy)]
enum Hop {
    /// workqueue_queue_work: from the signalling thread to the work item.
    Queued,
    /// workqueue_execute_start: from the work item to the kworker.
    Running,
}

#[inline(always)]
fn hop(at: Hop, work: u64, function: u64) {
    let irqfd_inject = config!(irqfd_inject);
    if !signal::is_irqfd_inject(function, irqfd_inject) {
        return; // every other work item on the host: one compare
    }
    let (_, tid) = current_tgid_tid();
    let (starts, deferred) = (
        &mut KernelStarts(&SIG_START),
        &mut KernelStarts(&SIG_DEFERRED),
    );
    let moved = match at {
        Hop::Queued => signal::on_queue_work(starts, deferred, tid, work, function, irqfd_inject),
        Hop::Running => signal::on_work_start(starts, deferred, tid, work, function, irqfd_inject),
    };
    if let Err(c) = moved {
        count(StageId::KvmSignalToInject, c);
    }
}

/// `work->func` of a `struct work_struct *` argument.
#[inline(always)]
fn work_func(work: u64) -> u64 {
    unsafe { read_at::<u64>(work, config!(work_func)) }.unwrap_or(0)
}

// void trace_workqueue_queue_work(int req_cpu, struct pool_workqueue *pwq,
//                                 struct work_struct *work)
#[btf_tracepoint(function = "workqueue_queue_work")]
pub fn workqueue_queue_work_btf(ctx: BtfTracePointContext) -> i32 {
    let work: u64 = ctx.arg(2);
    hop(Hop::Queued, work, work_func(work));
    0
}

#[raw_tracepoint(tracepoint = "workqueue_queue_work")]
pub fn workqueue_queue_work_raw(ctx: RawTracePointContext) -> i32 {
    let work: u64 = ctx.arg(2);
    hop(Hop::Queued, work, work_func(work));
    0
}

// workqueue/workqueue_queue_work: void *work; void *function; ...
#[tracepoint]
pub fn workqueue_queue_work_tp(ctx: TracePointContext) -> u32 {
    let f = unsafe {
        (
            ctx.read_at::<u64>(config!(tp_queue_work) as usize),
            ctx.read_at::<u64>(config!(tp_queue_function) as usize),
        )
    };
    if let (Ok(work), Ok(function)) = f {
        hop(Hop::Queued, work, function);
    }
    0
}

// void trace_workqueue_execute_start(struct work_struct *work)
#[btf_tracepoint(function = "workqueue_execute_start")]
pub fn workqueue_execute_start_btf(ctx: BtfTracePointContext) -> i32 {
    let work: u64 = ctx.arg(0);
    hop(Hop::Running, work, work_func(work));
    0
}

#[raw_tracepoint(tracepoint = "workqueue_execute_start")]
pub fn workqueue_execute_start_raw(ctx: RawTracePointContext) -> i32 {
    let work: u64 = ctx.arg(0);
    hop(Hop::Running, work, work_func(work));
    0
}

// workqueue/workqueue_execute_start: void *work; void *function;
#[tracepoint]
pub fn workqueue_execute_start_tp(ctx: TracePointContext) -> u32 {
    let f = unsafe {
        (
            ctx.read_at::<u64>(config!(tp_exec_work) as usize),
            ctx.read_at::<u64>(config!(tp_exec_function) as usize),
        )
    };
    if let (Ok(work), Ok(function)) = f {
        hop(Hop::Running, work, function);
    }
    0
}
