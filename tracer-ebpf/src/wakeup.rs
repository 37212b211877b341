//! sched.backend_wakeup, and net.tx.kick of a backend no function probe sees: the guest's
//! notify exit (kvm:kvm_pio, kvm:kvm_mmio: writes; kvm:kvm_exit for VMX's fast MMIO), the wakeup of a network backend thread
//! (sched:sched_waking; the threads are those `NET_RX_BATCH` holds) and its switch in
//! (sched:sched_switch), which also starts the thread's transmit run for
//! net.tx.backend_to_wire; the run's first frame on the tap records the kick that woke it
//! (`runs::tap_rx`). Rules: `tracer_common::net::wakeup`.
//!
//! Opt-in: sched_waking and sched_switch fire on every wakeup and context switch of the host;
//! each asks one per-CPU or hash-map question of a thread that is no backend.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tracer_common::{
    maps::{Counter, START_ENTRIES},
    net::{
        Backend,
        tx_backend::TxRun,
        tx_kick::Pending,
        wakeup::{self, Woken},
    },
    stage::StageId::{BlkKickToSubmit, NetTxBackendToWire, NetTxKick, SchedBackendWakeup},
};

use crate::{
    net::NET_RX_BATCH,
    shared::{
        config, count, current_tgid_tid, in_task, now_ns, on, read_at, record, stages_on, vmm_seen,
    },
    tp::{Site, tracepoint_args},
};

/// The notify exit in progress on each CPU.
#[map]
static NET_NOTIFY: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// Backend threads woken and not yet running, by thread.
#[map]
pub static NET_WOKEN: HashMap<u32, Woken> = HashMap::with_max_entries(START_ENTRIES, 0);

#[inline(always)]
fn notify_slot() -> Option<&'static mut Pending> {
    // SAFETY: this CPU's slot; an exit's handler and the wakeup it causes run on one CPU.
    NET_NOTIFY.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// A write to a port or an MMIO address by the guest (with the address), in its vCPU thread;
/// a read ends the notify a VMX EPT-misconfiguration exit started (`exited`): it was no notify.
/// A write also starts a disk's kick (blk.kick_to_submit).
#[inline(always)]
fn notified(access: Result<(bool, u64), ()>, _: Site) {
    let mask = stages_on();
    let (tgid, tid) = current_tgid_tid();
    if on(mask, BlkKickToSubmit) {
        // Only vCPU threads fire these: their VMM is one (known from here on).
        vmm_seen(tgid, tid);
        if let Ok((true, addr)) = access {
            crate::blk_vm::notified(tgid, addr, now_ns());
        }
    }
    if !on(mask, SchedBackendWakeup) {
        return;
    }
    let Some(p) = notify_slot() else {
        return;
    };
    match access {
        Ok((true, _)) => wakeup::on_notify(p, tid, tgid, now_ns()),
        Ok((false, _)) => wakeup::on_userspace_exit(p, tid),
        Err(()) => {
            wakeup::on_userspace_exit(p, tid);
            count(SchedBackendWakeup, Counter::ReadError);
        }
    }
}

// void trace_kvm_pio(unsigned int rw, unsigned int port, unsigned int size, unsigned int count,
// const void *data): rw 1 is KVM_PIO_OUT.
tracepoint_args!(
    "kvm_pio",
    kvm_pio_btf,
    kvm_pio_raw,
    btf = |arg| Ok((arg(0) as u32 == 1, arg(1) as u32 as u64)),
    |arg| Ok((arg(0) as u32 == 1, arg(1) as u32 as u64)),
    notified
);

// void trace_kvm_mmio(int type, int len, u64 gpa, u64 *val): type 2 is KVM_TRACE_MMIO_WRITE,
// traced before the write reaches the bus (and its ioeventfd).
tracepoint_args!(
    "kvm_mmio",
    kvm_mmio_btf,
    kvm_mmio_raw,
    btf = |arg| Ok((arg(0) as u32 == 2, arg(2))),
    |arg| Ok((arg(0) as u32 == 2, arg(2))),
    notified
);

/// kvm:kvm_userspace_exit in the current thread (the caller checked the stage): its notify went
/// to userspace, no ioeventfd took it.
#[inline(always)]
pub fn left_kvm() {
    if let Some(p) = notify_slot() {
        wakeup::on_userspace_exit(p, current_tgid_tid().1);
    }
}

/// kvm:kvm_exit in vCPU thread `tid` of `tgid` (the caller checked the stage): VMX's fast MMIO
/// notify starts here (`wakeup::notify_exit`).
#[inline(always)]
pub fn exited(tgid: u32, tid: u32, reason: u32, isa: u32) {
    if !wakeup::notify_exit(reason, isa) {
        return;
    }
    if let Some(p) = notify_slot() {
        wakeup::on_notify(p, tid, tgid, now_ns());
    }
}

/// The thread id of a task, with bpf_probe_read_kernel in both programs (a typed load of it in
/// tp_btf lets LLVM keep the field's address where its value is used, which the verifier
/// refuses).
#[inline(always)]
fn raw_pid(task: u64) -> Result<u32, ()> {
    unsafe { read_at::<u32>(task, config!(task_pid)) }.map_err(|_| ())
}

/// The woken task's thread id and whether it is still queued on its CPU (`on_rq`).
#[inline(always)]
fn woken_task(task: u64) -> Result<(u32, u32), ()> {
    let queued = unsafe { read_at::<u32>(task, config!(task_on_rq)) }.map_err(|_| ())?;
    Ok((raw_pid(task)?, queued))
}

#[inline(always)]
fn waking(ev: Result<(u32, u32), ()>, site: Site) {
    let mask = stages_on();
    if !on(mask, SchedBackendWakeup) {
        return;
    }
    let Ok((tid, queued)) = ev else {
        count(SchedBackendWakeup, Counter::ReadError);
        return;
    };
    let now = now_ns();
    // The waker's notify is consumed by whatever it wakes first, in its own context: an
    // interrupt on its CPU (a packet's, a timer's) wakes in the name of the task it interrupted.
    let kick = match notify_slot() {
        Some(p) if in_task(site) => wakeup::take_notify(p, current_tgid_tid().1, now),
        _ => wakeup::NO_KICK,
    };
    // SAFETY: a map value read whole; only the thread's own events write it.
    let Some(b) = (unsafe { NET_RX_BATCH.get(tid) }) else {
        return;
    };
    let w = wakeup::on_waking(kick, b.vm, b.tap, b.backend, on(mask, NetTxKick), now);
    // Still queued (woken on its way to sleep): it runs on, no switch into it follows.
    if queued != 0 {
        resumed(mask, tid, &w, now);
        return;
    }
    if NET_WOKEN.insert(tid, w, 0).is_err() {
        count(SchedBackendWakeup, Counter::StartFull);
    }
}

// void trace_sched_waking(struct task_struct *p)
tracepoint_args!(
    "sched_waking",
    sched_waking_btf,
    sched_waking_raw,
    btf = |arg| woken_task(arg(0)),
    |arg| woken_task(arg(0)),
    waking
);

#[inline(always)]
fn switched(next: Result<u32, ()>, _: Site) {
    let mask = stages_on();
    if !on(mask, SchedBackendWakeup) {
        return;
    }
    let Ok(tid) = next else {
        count(SchedBackendWakeup, Counter::ReadError);
        return;
    };
    // SAFETY: a map value read whole.
    let Some(w) = (unsafe { NET_WOKEN.get(tid) }).copied() else {
        return;
    };
    let _ = NET_WOKEN.remove(tid);
    resumed(mask, tid, &w, now_ns());
}

/// Woken thread `tid` runs (switched in, or woken while still queued): its wakeup's latency,
/// and the start of its transmit run.
#[inline(always)]
fn resumed(mask: u64, tid: u32, w: &Woken, now: u64) {
    let kick_ns = match wakeup::on_switch_in(w, now) {
        Ok((wake_ns, kick_ns)) => {
            record(SchedBackendWakeup, w.backend, w.tap, w.vm, wake_ns, now);
            kick_ns.unwrap_or(0)
        }
        Err(c) => {
            count(SchedBackendWakeup, c);
            0
        }
    };
    // The backend starts a run: the frames it hands its tap from now on are this run's
    // (net.tx.backend_to_wire), unless vhost's handle_tx marks its runs itself; its first
    // frame records the kick that woke it (`runs::tap_rx`).
    let backend = Backend::from_u32(w.backend);
    if backend == Backend::Qemu || !on(mask, NetTxBackendToWire) {
        let run = TxRun {
            ts_ns: now,
            vm: w.vm,
            // The frames' queues label the run's samples.
            backend: backend as u32,
            kick_ns,
        };
        crate::runs::start(tid, run);
    }
}

// void trace_sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
// unsigned int prev_state)
tracepoint_args!(
    "sched_switch",
    sched_switch_btf,
    sched_switch_raw,
    btf = |arg| raw_pid(arg(2)),
    |arg| raw_pid(arg(2)),
    switched
);
