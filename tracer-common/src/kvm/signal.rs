//! `kvm.signal_to_inject`: from the VMM's signalling system call (an 8-byte `write` to an irqfd
//! eventfd, or `ioctl(KVM_SIGNAL_MSI)`) to KVM's injection of that interrupt.
//!
//! An MSI route is injected inline, in the writer's context (irqfd_wakeup ->
//! kvm_arch_set_irq_inatomic -> kvm:kvm_msi_set_irq). An IOAPIC/PIC route (or an MSI KVM cannot
//! deliver atomically) is deferred: irqfd_wakeup queues `irqfd_inject` on a workqueue, and a
//! kworker fires kvm:kvm_set_irq. The start then follows the work item: writer thread ->
//! work_struct (workqueue:workqueue_queue_work) -> kworker thread
//! (workqueue:workqueue_execute_start) -> injection.
//!
//! A write that was not to an irqfd injects nothing; its start is dropped when the system call
//! returns, so it can never be matched with a later injection of the same thread.
//!
//! An injection in interrupt context (a VFIO device's MSI handler signalling its irqfd) runs
//! in whatever task it interrupted, maybe a VMM thread in the middle of its own irqfd write:
//! it never takes that thread's start.

use crate::{assert_size, maps::Counter, rules::Starts};

/// How the VMM signalled (`signal` label).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// write() to an eventfd registered with KVM_IRQFD.
    Irqfd = 0,
    /// ioctl(KVM_SIGNAL_MSI).
    Ioctl = 1,
}

/// Where the interrupt was injected (`inject` label).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inject {
    /// In the signalling thread (MSI routes).
    Inline = 0,
    /// By a kworker running irqfd_inject (IOAPIC/PIC routes).
    Kworker = 1,
}

/// A signal in flight: keyed by thread (writer, then kworker) or by work item in between.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalStart {
    pub ts_ns: u64,
    /// tgid of the signalling VMM: a kworker belongs to no VM.
    pub vm: u32,
    /// [`signal_detail`].
    pub detail: u32,
}
assert_size!(SignalStart, 16);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalSample {
    pub latency_ns: u64,
    pub vm: u32,
    pub detail: u32,
}

/// The histogram key's `detail`: signal in the low byte, injection context in the next.
pub const fn signal_detail(signal: Signal, inject: Inject) -> u32 {
    signal as u32 | (inject as u32) << 8
}

/// Inverse of [`signal_detail`].
pub const fn split_signal_detail(detail: u32) -> (Signal, Inject) {
    let s = if detail & 0xff == Signal::Ioctl as u32 {
        Signal::Ioctl
    } else {
        Signal::Irqfd
    };
    let i = if (detail >> 8) & 0xff == Inject::Kworker as u32 {
        Inject::Kworker
    } else {
        Inject::Inline
    };
    (s, i)
}

/// Entry of a signalling system call of VMM thread `tid`.
pub fn on_signal<S: Starts<u32, SignalStart>>(
    starts: &mut S,
    tid: u32,
    tgid: u32,
    now_ns: u64,
    signal: Signal,
) -> Result<(), Counter> {
    let start = SignalStart {
        ts_ns: now_ns,
        vm: tgid,
        detail: signal_detail(signal, Inject::Inline),
    };
    starts.start(tid, start)
}

/// Return of that system call: whatever it injected has ended the stage by now.
pub fn on_signal_return<S: Starts<u32, SignalStart>>(starts: &mut S, tid: u32) {
    let _ = starts.take(&tid);
}

/// Is a work item's `function` KVM's `irqfd_inject` (its address, 0 if unknown)? Programs on
/// the workqueue events ask first: they run for every work item on the host.
pub const fn is_irqfd_inject(function: u64, irqfd_inject: u64) -> bool {
    irqfd_inject != 0 && function == irqfd_inject
}

/// workqueue:workqueue_queue_work in thread `tid`: when the work is KVM's `irqfd_inject` (its
/// address, 0 if unknown), the signal moves from the thread to the work item.
pub fn on_queue_work<S: Starts<u32, SignalStart>, W: Starts<u64, SignalStart>>(
    starts: &mut S,
    deferred: &mut W,
    tid: u32,
    work: u64,
    function: u64,
    irqfd_inject: u64,
) -> Result<(), Counter> {
    if !is_irqfd_inject(function, irqfd_inject) {
        return Ok(());
    }
    match starts.take(&tid) {
        Some(start) => deferred.start(work, start),
        None => Ok(()),
    }
}

/// workqueue:workqueue_execute_start in kworker `tid`: the deferred signal moves to the kworker,
/// which injects it.
pub fn on_work_start<S: Starts<u32, SignalStart>, W: Starts<u64, SignalStart>>(
    starts: &mut S,
    deferred: &mut W,
    tid: u32,
    work: u64,
    function: u64,
    irqfd_inject: u64,
) -> Result<(), Counter> {
    if !is_irqfd_inject(function, irqfd_inject) {
        return Ok(());
    }
    let Some(start) = deferred.take(&work) else {
        return Ok(());
    };
    let (signal, _) = split_signal_detail(start.detail);
    starts.start(
        tid,
        SignalStart {
            detail: signal_detail(signal, Inject::Kworker),
            ..start
        },
    )
}

/// Is `start`, found under a thread of `tgid`, what a dead thread of another VM left under a
/// reused thread id? A start made inline belongs to the writer's own VM; a kworker's came from
/// its work item and names its VM itself.
pub fn is_stale(start: &SignalStart, tgid: u32) -> bool {
    let (_, inject) = split_signal_detail(start.detail);
    inject == Inject::Inline && start.vm != tgid
}

/// kvm:kvm_msi_set_irq, or kvm:kvm_set_irq with level 1 (irqfd_inject raises then lowers the
/// line: the lowering is no injection), in thread `tid` of `tgid`, whose start `start` the
/// program has looked up already (it also names the injection's VM). Only an injection in task
/// context ends the thread's signal. Injections nobody signalled (device emulation in the
/// kernel, KVM_IRQ_LINE) end nothing. A start the writer made inline belongs to the writer's
/// VM: one of another VM is what a dead thread left under a reused id (`stale`); a kworker's
/// start came from its work item and names its VM itself.
pub fn on_inject<S: Starts<u32, SignalStart>>(
    starts: &mut S,
    tid: u32,
    tgid: u32,
    start: Option<SignalStart>,
    in_task: bool,
    now_ns: u64,
) -> Result<Option<SignalSample>, Counter> {
    if !in_task {
        return Ok(None);
    }
    let Some(s) = start else {
        return Ok(None);
    };
    starts.remove(&tid);
    if is_stale(&s, tgid) {
        return Err(Counter::Stale);
    }
    Ok(Some(SignalSample {
        latency_ns: now_ns.saturating_sub(s.ts_ns),
        vm: s.vm,
        detail: s.detail,
    }))
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] integers, no padding, size asserted.
unsafe impl aya::Pod for SignalStart {}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::rules::testing::{MapStarts, events};

    const IRQFD_INJECT: u64 = 0xffff_ffff_8128_5600;

    /// Replays `ts tgid/tid event fields`: sys_enter_write, sys_enter_ioctl_signal_msi,
    /// sys_exit, workqueue_queue_work work= function=, workqueue_execute_start work= function=,
    /// kvm_msi_set_irq [irq=1], kvm_set_irq level= [irq=1] (irq=1: in interrupt context).
    fn replay(text: &str) -> (Vec<SignalSample>, usize) {
        let mut starts = MapStarts::new(64);
        let mut deferred = MapStarts::new(64);
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for e in events(text) {
            match e.name {
                "sys_enter_write" => {
                    on_signal(&mut starts, e.tid, e.tgid, e.ts, Signal::Irqfd).unwrap()
                }
                "sys_enter_ioctl_signal_msi" => {
                    on_signal(&mut starts, e.tid, e.tgid, e.ts, Signal::Ioctl).unwrap()
                }
                "sys_exit" => on_signal_return(&mut starts, e.tid),
                "workqueue_queue_work" => on_queue_work(
                    &mut starts,
                    &mut deferred,
                    e.tid,
                    e.u("work"),
                    e.u("function"),
                    IRQFD_INJECT,
                )
                .unwrap(),
                "workqueue_execute_start" => on_work_start(
                    &mut starts,
                    &mut deferred,
                    e.tid,
                    e.u("work"),
                    e.u("function"),
                    IRQFD_INJECT,
                )
                .unwrap(),
                "kvm_msi_set_irq" | "kvm_set_irq"
                    if e.name == "kvm_msi_set_irq" || e.u("level") == 1 =>
                {
                    let start = starts.get(&e.tid);
                    let irq = e.u("irq") == 1;
                    match on_inject(&mut starts, e.tid, e.tgid, start, !irq, e.ts) {
                        Ok(s) => out.extend(s),
                        Err(c) => stale.push((e.ts, c)),
                    }
                }
                "kvm_set_irq" => {}
                other => panic!("unknown event {other}"),
            }
        }
        assert_eq!(
            stale,
            [(80_500, Counter::Stale)],
            "the reused thread id's start"
        );
        (out, starts.map.len() + deferred.map.len())
    }

    #[test]
    fn replays_irqfd_msi_gsi_and_ioctl() {
        let (got, left) = replay(include_str!("../../../tests/fixtures/kvm_signal.events"));
        let irqfd_inline = signal_detail(Signal::Irqfd, Inject::Inline);
        let irqfd_kworker = signal_detail(Signal::Irqfd, Inject::Kworker);
        let ioctl = signal_detail(Signal::Ioctl, Inject::Inline);
        let want = [
            (2_100, 500, irqfd_inline),
            (2_400, 500, irqfd_inline),
            (31_000, 500, irqfd_kworker),
            (3_300, 500, ioctl),
            (45_000, 600, irqfd_kworker),
            (2_000, 500, irqfd_inline),
        ];
        let got: Vec<_> = got.iter().map(|s| (s.latency_ns, s.vm, s.detail)).collect();
        assert_eq!(got, want);
        assert_eq!(left, 0, "every start ends or is dropped");
    }

    #[test]
    fn detail_round_trips() {
        for s in [Signal::Irqfd, Signal::Ioctl] {
            for i in [Inject::Inline, Inject::Kworker] {
                assert_eq!(split_signal_detail(signal_detail(s, i)), (s, i));
            }
        }
    }

    #[test]
    fn unknown_irqfd_inject_address_defers_nothing() {
        let mut starts = MapStarts::new(4);
        let mut deferred = MapStarts::new(4);
        on_signal(&mut starts, 7, 7, 100, Signal::Irqfd).unwrap();
        on_queue_work(&mut starts, &mut deferred, 7, 0xabc, IRQFD_INJECT, 0).unwrap();
        assert!(deferred.map.is_empty());
        assert_eq!(starts.map.len(), 1);
    }
}
