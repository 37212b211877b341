//! KVM's tracepoints and the workqueue hops of deferred injections: one declaration per event,
//! and the dispatch list of the stages it bounds. A new stage that starts or ends at one of
//! these events adds its handler to that event's list here and keeps its own code in its own
//! file.

use tracer_common::{
    kvm::{
        inject::injection_vm,
        signal::{is_irqfd_inject, is_stale},
    },
    maps::Counter,
    stage::StageId::{self, *},
};

use crate::vfio::Context;

use super::{
    exit, inject,
    signal::{self, Hop},
    vcpu,
};
use crate::{
    shared::{
        config, count, count_each, current_tgid_tid, is_vmm, mm_owner_vmm, now_ns, on, read_at,
        stages_on, vmm_seen,
    },
    tp::{Site, field, function, tracepoint},
};

/// kvm:kvm_exit: the exit reason is computed inside the tracepoint (the vendor's
/// get_exit_info), so only the classic record has it.
// kvm/kvm_exit: unsigned int exit_reason; ...; u32 isa; ...; unsigned int vcpu_id; ...
#[aya_ebpf::macros::tracepoint]
pub fn kvm_exit_tp(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let mask = stages_on();
    // sched.backend_wakeup: VMX's fast MMIO notify has no event of its own but this exit.
    let (exits, notifies) = (on(mask, KvmExit), on(mask, SchedBackendWakeup));
    if !exits && !notifies {
        return 0;
    }
    let (reason, isa) = (
        field::<u32>(&ctx, config!(tp_kvm_exit_reason)),
        field::<u32>(&ctx, config!(tp_kvm_exit_isa)),
    );
    let (Ok(reason), Ok(isa)) = (reason, isa) else {
        count_each(mask, &[KvmExit, SchedBackendWakeup], Counter::ReadError);
        return 0;
    };
    let (tgid, tid) = current_tgid_tid();
    if notifies {
        crate::wakeup::exited(tgid, tid, reason, isa);
    }
    if exits {
        match field::<u32>(&ctx, config!(tp_kvm_exit_vcpu)) {
            Ok(vcpu) => {
                vmm_seen(tgid, tid);
                exit::exit(tgid, tid, reason, isa, vcpu);
            }
            Err(_) => count(KvmExit, Counter::ReadError),
        }
    }
    0
}

/// kvm:kvm_entry of a vCPU (its id, None when it could not be read): ends kvm.exit and
/// kvm.inject_to_entry.
#[inline(always)]
fn entry(vcpu: Result<Option<u32>, ()>, _: Site) {
    let mask = stages_on();
    let (tgid, tid) = current_tgid_tid();
    let now = now_ns();
    let vcpu = vcpu.unwrap_or(None);
    if on(mask, KvmExit) {
        exit::entry(tgid, tid, vcpu, now);
    }
    if on(mask, KvmInjectToEntry) {
        inject::entered(tid);
        match vcpu {
            Some(v) => inject::entry(tgid, v, now),
            None => count(KvmInjectToEntry, Counter::ReadError),
        }
    }
}

/// `vcpu->vcpu_id` of a `struct kvm_vcpu *` argument.
#[inline(always)]
pub(super) fn vcpu_id(vcpu: u64) -> Option<u32> {
    unsafe { read_at::<u32>(vcpu, config!(vcpu_id)).ok() }
}

// void trace_kvm_entry(struct kvm_vcpu *vcpu, bool force_immediate_exit)
// kvm/kvm_entry: unsigned int vcpu_id; ...
tracepoint!(
    "kvm_entry",
    kvm_entry_btf,
    kvm_entry_raw,
    kvm_entry_tp,
    |arg| Ok(vcpu_id(arg(0))),
    |rec| Ok(field::<u32>(rec, config!(tp_kvm_entry_vcpu)).ok()),
    entry
);

/// The stages an injection bounds.
const INJECTION: [StageId; 2] = [KvmSignalToInject, KvmInjectToEntry];

/// An injection by KVM (kvm_msi_set_irq, or kvm_set_irq raising a line) in the current task:
/// ends the task's signal and marks the CPU for the accepts that follow. Which VM it is for
/// comes from the task's signal or the task's VMM in task context, from the device whose
/// handler runs in interrupt context.
#[inline(always)]
fn injection(ctx: &Context) {
    let mask = stages_on();
    if mask & (KvmSignalToInject.bit() | KvmInjectToEntry.bit()) == 0 {
        return;
    }
    let (in_task, irq_vm) = (ctx.in_task, ctx.handler_vm());
    let (tgid, tid) = current_tgid_tid();
    let now = now_ns();
    let start = signal::pending(tid);
    // A stale start (another VM's, under a reused thread id) names no VM: the signal stage
    // counts it, and the VM comes from the task as if there were none.
    let live = start.filter(|s| !is_stale(s, tgid));
    let vmm = match live {
        Some(_) => None,
        None if is_vmm(tgid) => Some(tgid),
        None => mm_owner_vmm(),
    };
    // The mark records the context even when no VM is named: its accept, in the same context,
    // is then known for that injection's (counted once, as unknown_vm).
    if on(mask, KvmSignalToInject) {
        signal::injected(tgid, tid, start, in_task, now);
    }
    if on(mask, KvmInjectToEntry) {
        let vm = injection_vm(live.map(|s| s.vm), in_task, vmm, irq_vm);
        inject::injected(tid, vm, ctx.handler_device(), in_task, now);
    }
}

/// The MSI's address and data, None where the classic record's fields are unknown.
#[inline(always)]
fn msi_set_irq(msi: Result<Option<(u64, u64)>, ()>, site: Site) {
    let Ok(msi) = msi else {
        count_each(stages_on(), &INJECTION, Counter::ReadError);
        return;
    };
    let ctx = Context::of(site);
    // First, and in a function of its own: with the MSI kept across the injection's calls,
    // LLVM left it in a register they clobber, which the verifier refuses.
    if on(stages_on(), BlkCompleteToIrq) {
        match msi {
            Some((address, data)) => crate::blk_vm::irq(address, data, ctx.in_task, now_ns()),
            None => count(BlkCompleteToIrq, Counter::ReadError),
        }
    }
    crate::vfio::injected(&ctx, now_ns());
    injection(&ctx);
    crate::net::irq(ctx.in_task);
}

// void trace_kvm_msi_set_irq(__u64 address, __u64 data)
// kvm/kvm_msi_set_irq: __u64 address; __u64 data;
tracepoint!(
    "kvm_msi_set_irq",
    kvm_msi_set_irq_btf,
    kvm_msi_set_irq_raw,
    kvm_msi_set_irq_tp,
    |arg| Ok(Some((arg(0), arg(1)))),
    |rec| Ok(field::<u64>(rec, config!(tp_msi_address))
        .and_then(|a| Ok((a, field::<u64>(rec, config!(tp_msi_data))?)))
        .ok()),
    msi_set_irq
);

/// kvm_set_irq raises and lowers lines: only raising injects.
#[inline(always)]
fn set_irq(level: Result<i32, ()>, site: Site) {
    match level {
        Ok(1) => injection(&Context::of(site)),
        Ok(_) => {}
        Err(()) => count_each(stages_on(), &INJECTION, Counter::ReadError),
    }
}

// void trace_kvm_set_irq(unsigned int gsi, int level, int irq_source_id)
// kvm/kvm_set_irq: unsigned int gsi; int level; int irq_source_id;
tracepoint!(
    "kvm_set_irq",
    kvm_set_irq_btf,
    kvm_set_irq_raw,
    kvm_set_irq_tp,
    |arg| Ok(arg(1) as i32),
    |rec| field::<i32>(rec, config!(tp_set_irq_level)),
    set_irq
);

#[inline(always)]
fn accept(apicid: Result<u32, ()>, site: Site) {
    if !on(stages_on(), KvmInjectToEntry) {
        return;
    }
    match apicid {
        Ok(apicid) => inject::accepted(current_tgid_tid().1, apicid, Context::of(site).in_task),
        Err(()) => count(KvmInjectToEntry, Counter::ReadError),
    }
}

// void trace_kvm_apic_accept_irq(__u32 apicid, __u16 dm, __u16 tm, __u8 vec)
// kvm/kvm_apic_accept_irq: __u32 apicid; ...
tracepoint!(
    "kvm_apic_accept_irq",
    kvm_apic_accept_irq_btf,
    kvm_apic_accept_irq_raw,
    kvm_apic_accept_irq_tp,
    |arg| Ok(arg(0) as u32),
    |rec| field::<u32>(rec, config!(tp_accept_apicid)),
    accept
);

// void svm_deliver_interrupt(struct kvm_lapic *apic, int delivery_mode, int trig_mode,
// int vector) (vmx_ likewise): __apic_accept_irq calls it right after it fires
// kvm_apic_accept_irq, for each fixed or lowest-priority interrupt it delivers (device MSIs
// are fixed; NMI, INIT and SIPI accepts are not seen); apicid = apic->vcpu->vcpu_id. The
// attach plan names the function this kernel has; the section's name is only a default.
function!(
    "svm_deliver_interrupt",
    kvm_apic_accept_irq_fentry,
    kvm_apic_accept_irq_kprobe,
    |arg| {
        // SAFETY: probe reads at offsets found in BTF; a bad pointer fails the read.
        let vcpu: u64 = unsafe { read_at(arg(0), config!(lapic_vcpu)) }.map_err(|_| ())?;
        let id: i32 = unsafe { read_at(vcpu, config!(vcpu_id)) }.map_err(|_| ())?;
        Ok(id as u32)
    },
    accept
);

/// A workqueue event (work item, its function). These run for every work item on the host:
/// anything but KVM's `irqfd_inject` returns after reading `work->func` (tp_btf, raw_tp) or the
/// record's function field (classic) and one compare.
#[inline(always)]
fn work(at: Hop, ev: Result<(u64, u64), ()>) {
    let Ok((work, function)) = ev else {
        if on(stages_on(), KvmSignalToInject) {
            count(KvmSignalToInject, Counter::ReadError);
        }
        return;
    };
    if !is_irqfd_inject(function, config!(irqfd_inject)) || !on(stages_on(), KvmSignalToInject) {
        return;
    }
    signal::hop(at, current_tgid_tid().1, work, function);
}

#[inline(always)]
fn queued(ev: Result<(u64, u64), ()>, _: Site) {
    work(Hop::Queued, ev)
}

#[inline(always)]
fn running(ev: Result<(u64, u64), ()>, _: Site) {
    work(Hop::Running, ev)
}

/// (work, work->func) of a `struct work_struct *` argument.
#[inline(always)]
fn work_and_func(work: u64) -> Result<(u64, u64), ()> {
    let func = unsafe { read_at::<u64>(work, config!(work_func)) }.map_err(|_| ())?;
    Ok((work, func))
}

// void trace_workqueue_queue_work(int req_cpu, struct pool_workqueue *pwq,
//                                 struct work_struct *work)
// workqueue/workqueue_queue_work: void *work; void *function; ...
tracepoint!(
    "workqueue_queue_work",
    workqueue_queue_work_btf,
    workqueue_queue_work_raw,
    workqueue_queue_work_tp,
    |arg| work_and_func(arg(2)),
    |rec| Ok((
        field::<u64>(rec, config!(tp_queue_work))?,
        field::<u64>(rec, config!(tp_queue_function))?
    )),
    queued
);

// void trace_workqueue_execute_start(struct work_struct *work)
// workqueue/workqueue_execute_start: void *work; void *function;
tracepoint!(
    "workqueue_execute_start",
    workqueue_execute_start_btf,
    workqueue_execute_start_raw,
    workqueue_execute_start_tp,
    |arg| work_and_func(arg(0)),
    |rec| Ok((
        field::<u64>(rec, config!(tp_exec_work))?,
        field::<u64>(rec, config!(tp_exec_function))?
    )),
    running
);

#[inline(always)]
fn vcpu_wakeup(ev: Result<(u64, bool), ()>, _: Site) {
    if !on(stages_on(), KvmHaltWakeup) {
        return;
    }
    match ev {
        Ok((ns, waited)) => {
            let (tgid, tid) = current_tgid_tid();
            vmm_seen(tgid, tid);
            vcpu::wakeup(tgid, tid, ns, waited);
        }
        Err(()) => count(KvmHaltWakeup, Counter::ReadError),
    }
}

// void trace_kvm_vcpu_wakeup(__u64 ns, bool waited, bool valid)
// kvm/kvm_vcpu_wakeup: __u64 ns; bool waited; bool valid;
tracepoint!(
    "kvm_vcpu_wakeup",
    kvm_vcpu_wakeup_btf,
    kvm_vcpu_wakeup_raw,
    kvm_vcpu_wakeup_tp,
    |arg| Ok((arg(0), arg(1) & 0xff != 0)),
    |rec| Ok((
        field::<u64>(rec, config!(tp_wakeup_ns))?,
        field::<u8>(rec, config!(tp_wakeup_waited))? != 0
    )),
    vcpu_wakeup
);

#[inline(always)]
fn userspace_exit(ev: Result<(u32, i32), ()>, _: Site) {
    let mask = stages_on();
    if on(mask, SchedBackendWakeup) {
        crate::wakeup::left_kvm();
    }
    if !on(mask, KvmUserspaceExit) {
        return;
    }
    match ev {
        Ok((reason, errno)) => {
            let (tgid, tid) = current_tgid_tid();
            vmm_seen(tgid, tid);
            vcpu::userspace_exit(tgid, tid, reason, errno);
        }
        Err(()) => count(KvmUserspaceExit, Counter::ReadError),
    }
}

// void trace_kvm_userspace_exit(__u32 reason, int errno)
// kvm/kvm_userspace_exit: __u32 reason; int errno;
tracepoint!(
    "kvm_userspace_exit",
    kvm_userspace_exit_btf,
    kvm_userspace_exit_raw,
    kvm_userspace_exit_tp,
    |arg| Ok((arg(0) as u32, arg(1) as i32)),
    |rec| Ok((
        field::<u32>(rec, config!(tp_uexit_reason))?,
        field::<i32>(rec, config!(tp_uexit_errno))?
    )),
    userspace_exit
);
