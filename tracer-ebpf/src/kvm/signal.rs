//! kvm.signal_to_inject: the VMM's signalling system call (started in `syscalls`) to KVM's
//! injection (ended in `events`), followed through the workqueue when KVM defers it.

use aya_ebpf::{macros::map, maps::HashMap};
use tracer_common::{
    kvm::signal::{self, Signal, SignalStart},
    maps::START_ENTRIES,
    stage::StageId,
};

use crate::shared::{KernelStarts, config, count, now_ns, record, record_or_count};

const STAGE: StageId = StageId::KvmSignalToInject;

/// Signals in flight, by thread (the signalling thread, then the kworker); each carries its VM.
#[map]
pub static SIG_START: HashMap<u32, SignalStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// Deferred signals, by work item (between queue_work and the kworker running it).
#[map]
static SIG_DEFERRED: HashMap<u64, SignalStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// Entry of a signalling system call of VMM thread `tid`.
#[inline(always)]
pub fn start(tgid: u32, tid: u32, how: Signal) {
    if let Err(c) = signal::on_signal(&mut KernelStarts(&SIG_START), tid, tgid, now_ns(), how) {
        count(STAGE, c);
    }
}

/// Return of that system call.
#[inline(always)]
pub fn returned(tid: u32) {
    signal::on_signal_return(&mut KernelStarts(&SIG_START), tid);
}

/// The signal the current thread has in flight, if any (it names an injection's VM).
#[inline(always)]
pub fn pending(tid: u32) -> Option<SignalStart> {
    unsafe { SIG_START.get(tid) }.copied()
}

/// An injection in thread `tid` of `tgid`: ends its signal (`start`, looked up by the caller).
#[inline(always)]
pub fn injected(tgid: u32, tid: u32, start: Option<SignalStart>, in_task: bool, now: u64) {
    let starts = &mut KernelStarts(&SIG_START);
    let ended = signal::on_inject(starts, tid, tgid, start, in_task, now);
    record_or_count(STAGE, ended, |s| {
        record(STAGE, s.detail, 0, s.vm, s.latency_ns, now)
    });
}

/// Which workqueue event a deferred signal is at.
#[derive(Clone, Copy)]
pub enum Hop {
    /// workqueue_queue_work: from the signalling thread to the work item.
    Queued,
    /// workqueue_execute_start: from the work item to the kworker.
    Running,
}

/// A work item queued or started in thread `tid`: follows the signal when it is KVM's
/// `irqfd_inject` (the caller checked).
#[inline(always)]
pub fn hop(at: Hop, tid: u32, work: u64, function: u64) {
    let irqfd_inject = config!(irqfd_inject);
    let (starts, deferred) = (
        &mut KernelStarts(&SIG_START),
        &mut KernelStarts(&SIG_DEFERRED),
    );
    let moved = match at {
        Hop::Queued => signal::on_queue_work(starts, deferred, tid, work, function, irqfd_inject),
        Hop::Running => signal::on_work_start(starts, deferred, tid, work, function, irqfd_inject),
    };
    if let Err(c) = moved {
        count(STAGE, c);
    }
}
