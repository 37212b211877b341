//! `sched.backend_wakeup`: a network backend thread (one that takes a tap's packets: QEMU's main
//! loop or I/O thread, a vhost worker) woken (sched:sched_waking) to the scheduler switching to
//! it (sched:sched_switch): the time a busy host keeps a woken backend off its CPU.
//!
//! The same two events end the kick of a backend that no function probe sees (QEMU's userspace
//! one, or vhost where neither fentry nor kprobes work): `net.tx.kick` from the guest's notify
//! exit (kvm:kvm_pio or kvm:kvm_mmio, a write, in the vCPU thread) to the backend thread that
//! this vCPU thread then wakes (the notify's ioeventfd, signalled in the same exit) running,
//! recorded when that run hands its tap a frame (`super::tx_backend`): QEMU's main loop also
//! wakes for its receive queue's kicks and for other devices' (a virtio-blk disk without an
//! iothread), and those transmit nothing.
//! The notify in progress is kept per CPU with its thread ([`super::tx_kick::Pending`]); the
//! thread's next wakeup of anyone consumes it, and its return to userspace
//! (kvm:kvm_userspace_exit: no ioeventfd took the write) drops it.
//!
//! A kick that finds its backend running or already runnable wakes nobody: it gives no sample
//! (the backend takes the queue's work in the loop it is in, with no wakeup to wait for). A
//! thread woken while still queued on its CPU (about to sleep, not yet switched out) keeps
//! running: no switch into it follows, so it counts as switched in at its wakeup.

use super::{Backend, MAX_AGE_NS, tx_kick::Pending};
use crate::{assert_size, maps::Counter};

/// How long a notify exit may precede the wakeup it causes: the same exit handler, microseconds
/// apart, milliseconds under full emulation (an interrupt in between). An older one is a write
/// no ioeventfd took (a LAPIC register's, say) whose thread woke nobody since.
pub const NOTIFY_MAX_NS: u64 = 10_000_000;

/// A backend thread woken and not yet running (the value of the map keyed by its thread).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Woken {
    pub ts_ns: u64,
    /// The notify exit that caused the wakeup; 0: none (a packet on its tap, a timer, ...).
    pub kick_ns: u64,
    /// tgid of the VMM it serves.
    pub vm: u32,
    /// The tap whose packets it takes (its latest).
    pub tap: u32,
    /// [`Backend`] and queue: a [`super::queue_detail`].
    pub backend: u32,
    pub _pad: u32,
}
assert_size!(Woken, 32);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], two u64s and u32s in pairs, size asserted.
unsafe impl aya::Pod for Woken {}

/// A notify exit (a guest's write to a port or MMIO address) in vCPU thread `tid` of `vm`.
#[inline(always)]
pub fn on_notify(p: &mut Pending, tid: u32, vm: u32, now_ns: u64) {
    *p = Pending {
        tid,
        vm,
        ts_ns: now_ns,
    };
}

/// kvm:kvm_exit with `reason` on `isa`: does it start a notify ([`on_notify`])? On VMX an EPT
/// misconfiguration exit may be a fast MMIO notify; any other MMIO access it is goes on to
/// kvm_mmio (a write starts it again, a read drops it) or to userspace (which drops it).
#[inline(always)]
pub const fn notify_exit(reason: u32, isa: u32) -> bool {
    isa == crate::kvm::ISA_VMX && reason & 0xffff == crate::kvm::VMX_EPT_MISCONFIG
}

/// Thread `tid` left KVM_RUN for userspace, or its exit was an MMIO or port read: its notify,
/// if any, signalled no ioeventfd.
#[inline(always)]
pub fn on_userspace_exit(p: &mut Pending, tid: u32) {
    if p.tid == tid {
        p.tid = 0;
    }
}

/// No notify: what [`take_notify`] gives when the waker had none (a plain pair, not an
/// Option: LLVM leaves an Option's unused payload uninitialised, which the verifier refuses).
pub const NO_KICK: (u64, u32) = (0, 0);

/// Thread `waker` wakes someone: the time of its notify in progress on this CPU, if fresh, and
/// its VMM, else [`NO_KICK`]; the notify is consumed either way (an ioeventfd wakes one
/// waiter).
#[inline(always)]
pub fn take_notify(p: &mut Pending, waker: u32, now_ns: u64) -> (u64, u32) {
    if p.tid == 0 || p.tid != waker {
        return NO_KICK;
    }
    p.tid = 0;
    if now_ns.saturating_sub(p.ts_ns) > NOTIFY_MAX_NS {
        return NO_KICK;
    }
    (p.ts_ns, p.vm)
}

/// A backend thread of `vm` (taking `tap`'s packets; `detail`, its [`super::queue_detail`],
/// says which backend and queue) woken at `now_ns`, by a notify of `kick`
/// (from [`take_notify`]) or not. A vhost worker's kick counts here only where the function
/// probes do not measure it (`functions_kick`: net.tx.kick's vhost programs are on).
#[inline(always)]
pub fn on_waking(
    kick: (u64, u32),
    vm: u32,
    tap: u32,
    detail: u32,
    functions_kick: bool,
    now_ns: u64,
) -> Woken {
    let (ts, kvm) = kick;
    let vhost = Backend::from_u32(detail) == Backend::Vhost;
    let kick_ns = if ts != 0 && kvm == vm && !(vhost && functions_kick) {
        ts
    } else {
        0
    };
    Woken {
        ts_ns: now_ns,
        kick_ns,
        vm,
        tap,
        backend: detail,
        _pad: 0,
    }
}

/// The woken thread switched in: its wakeup latency and, when a notify woke it, the kick's;
/// `stale` when the wakeup is older than [`MAX_AGE_NS`] (a thread that died woken and whose id
/// came back).
#[inline(always)]
pub fn on_switch_in(w: &Woken, now_ns: u64) -> Result<(u64, Option<u64>), Counter> {
    let age = now_ns.saturating_sub(w.ts_ns);
    if age > MAX_AGE_NS {
        return Err(Counter::Stale);
    }
    let kick = (w.kick_ns != 0).then(|| now_ns.saturating_sub(w.kick_ns));
    Ok((age, kick))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCPU: u32 = 11;
    const VM: u32 = 10;

    #[test]
    fn a_notify_that_wakes_the_backend_is_a_kick() {
        let mut p = Pending::default();
        on_notify(&mut p, VCPU, VM, 1_000);
        let kick = take_notify(&mut p, VCPU, 1_400);
        assert_eq!(kick, (1_000, VM));
        let w = on_waking(kick, VM, 7, Backend::Qemu as u32, true, 1_400);
        assert_eq!((w.kick_ns, w.tap, w.vm), (1_000, 7, VM));
        // Switched in 200 µs later: the wakeup's 200 µs, the kick's 200.4.
        assert_eq!(on_switch_in(&w, 201_400), Ok((200_000, Some(200_400))));
        // Consumed: the same thread's next wakeup is not a kick.
        assert_eq!(take_notify(&mut p, VCPU, 1_500), NO_KICK);
    }

    #[test]
    fn a_wakeup_with_no_notify_is_no_kick() {
        let mut p = Pending::default();
        // A packet's wakeup of the reader (tun, in another thread).
        on_notify(&mut p, VCPU, VM, 1_000);
        assert_eq!(take_notify(&mut p, 99, 1_100), NO_KICK);
        let w = on_waking(NO_KICK, VM, 7, Backend::Qemu as u32, false, 1_100);
        assert_eq!(on_switch_in(&w, 2_100), Ok((1_000, None)));
        // The vCPU's notify is still there for its own wakeup.
        assert_eq!(take_notify(&mut p, VCPU, 1_200), (1_000, VM));
    }

    #[test]
    fn a_write_that_went_to_userspace_or_is_old_starts_nothing() {
        let mut p = Pending::default();
        on_notify(&mut p, VCPU, VM, 1_000);
        on_userspace_exit(&mut p, VCPU);
        assert_eq!(take_notify(&mut p, VCPU, 1_100), NO_KICK);
        on_notify(&mut p, VCPU, VM, 1_000);
        assert_eq!(take_notify(&mut p, VCPU, 1_001 + NOTIFY_MAX_NS), NO_KICK);
        // Another thread's exit leaves this one's notify alone.
        on_notify(&mut p, VCPU, VM, 5_000);
        on_userspace_exit(&mut p, 12);
        assert_eq!(take_notify(&mut p, VCPU, 5_100), (5_000, VM));
    }

    #[test]
    fn another_vms_notify_or_a_measured_vhost_kick_is_not_this_kick() {
        let w = on_waking((1_000, 99), VM, 7, Backend::Qemu as u32, false, 1_100);
        assert_eq!(w.kick_ns, 0);
        let w = on_waking((1_000, VM), VM, 7, Backend::Vhost as u32, true, 1_100);
        assert_eq!(w.kick_ns, 0);
        let w = on_waking((1_000, VM), VM, 7, Backend::Vhost as u32, false, 1_100);
        assert_eq!(w.kick_ns, 1_000);
        // The batch's queue rides along in the detail and changes nothing of the backend's.
        let detail = crate::net::queue_detail(Backend::Vhost as u32, 2);
        let w = on_waking((1_000, VM), VM, 7, detail, true, 1_100);
        assert_eq!((w.kick_ns, w.backend), (0, detail));
        let detail = crate::net::queue_detail(Backend::Qemu as u32, 2);
        let w = on_waking((1_000, VM), VM, 7, detail, true, 1_100);
        assert_eq!(w.kick_ns, 1_000);
    }

    #[test]
    fn a_stale_wakeup_is_counted() {
        let w = on_waking(NO_KICK, VM, 7, Backend::Qemu as u32, false, 1_000);
        assert_eq!(on_switch_in(&w, 1_001 + MAX_AGE_NS), Err(Counter::Stale));
    }

    #[test]
    fn an_ept_misconfiguration_exit_on_vmx_starts_a_notify() {
        use crate::kvm::{ISA_VMX, VMX_EPT_MISCONFIG};
        assert!(notify_exit(VMX_EPT_MISCONFIG, ISA_VMX));
        // the reason's upper bits are flags
        assert!(notify_exit(0x1000_0000 | VMX_EPT_MISCONFIG, ISA_VMX));
        // SVM's reason 49 is another exit; VMX's other exits are no notify
        assert!(!notify_exit(VMX_EPT_MISCONFIG, 2));
        assert!(!notify_exit(48, ISA_VMX));
        // the fast path's sequence: the exit, then the backend's wakeup in the same thread
        let mut p = Pending::default();
        if notify_exit(VMX_EPT_MISCONFIG, ISA_VMX) {
            on_notify(&mut p, VCPU, VM, 1_000);
        }
        assert_eq!(take_notify(&mut p, VCPU, 4_000), (1_000, VM));
    }
}
