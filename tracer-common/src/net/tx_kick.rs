//! `net.tx.kick`: a guest's notify of a transmit queue to the vhost worker starting on it. The
//! notify is KVM's `ioeventfd_write` in the vCPU thread; in that same call the queue's eventfd
//! wakes its vhost poll, which queues the queue's work (`vhost_work_queue(dev, work)`, still in
//! the vCPU thread); the worker later runs it (`handle_tx_kick(work)`). The work's address ties
//! the two threads together: no learning of notify addresses, no task matching.
//!
//! The kick in progress is kept per CPU with its thread. A kick while the work is still queued
//! is the same wakeup: the first one is kept. A worker run that finds no kick is counted
//! `unmatched`: vhost queued the work again itself (a run that reached its weight limit), or
//! the vCPU thread moved to another CPU between its notify and the wakeup, or a softirq on that
//! CPU queued other work in its context first.
//!
//! A receive queue's notify queues that queue's work the same way; handle_tx_kick never runs
//! it, so its start stays (one entry per such queue, put once) until its VM goes.
//!
//! The kick is recorded with the first frame of the transmit run it starts (handle_tx, called
//! by handle_tx_kick), which says the queue (`super::tx_backend`), as a userspace backend's
//! is; where net.tx.backend_to_wire is off, at handle_tx_kick, with no queue.

use super::MAX_AGE_NS;
use crate::{assert_size, maps::Counter, rules::Starts};

/// How long an ioeventfd_write may precede the work it queues: the same call, microseconds
/// apart even under emulation. An older one in the CPU's slot is another kick's that queued
/// nothing (a userspace backend's ioeventfd).
pub const CHAIN_MAX_NS: u64 = 10_000_000;

/// The notify in progress on one CPU (a per-CPU array's value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// The vCPU thread; 0: none.
    pub tid: u32,
    /// Its VMM.
    pub vm: u32,
    pub ts_ns: u64,
}
assert_size!(Pending, 16);

/// A queue's work queued by a kick, waiting for its worker (the value of the map keyed by the
/// work's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KickStart {
    pub ts_ns: u64,
    /// tgid of the VMM whose vCPU kicked (what collects the entry when the VMM exits).
    pub vm: u32,
    pub _pad: u32,
}
assert_size!(KickStart, 16);

/// A worker's kick measured at handle_tx_kick, until the handle_tx it calls takes it into its
/// run (a per-CPU array's value: the call is direct, with no point where a kernel preemptible
/// only voluntarily, as distributions build it, could move the worker to another CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kicked {
    /// The kick's latency.
    pub ns: u64,
    /// The worker; 0: none.
    pub tid: u32,
    pub vm: u32,
}
assert_size!(Kicked, 16);

/// handle_tx_kick measured a kick of `ns` in worker `tid`: kept for its run. Returns the kick
/// the slot still held (its handle_tx never ran here: the worker moved CPUs between the two),
/// to be recorded at once, unlabelled by queue.
#[inline(always)]
pub fn keep_kick(k: &mut Kicked, tid: u32, vm: u32, ns: u64) -> Option<Kicked> {
    let old = (k.tid != 0).then_some(*k);
    *k = Kicked { ns, tid, vm };
    old
}

/// handle_tx in worker `tid`: the kick its handle_tx_kick kept (with the VMM that kicked), or
/// one with `tid` 0 when none (a run the socket woke, not a kick).
#[inline(always)]
pub fn take_kick(k: &mut Kicked, tid: u32) -> Kicked {
    if k.tid == 0 || k.tid != tid {
        return Kicked::default();
    }
    let kick = *k;
    k.tid = 0;
    kick
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], u32 fields in pairs and u64s, sizes asserted.
unsafe impl aya::Pod for Pending {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for KickStart {}

/// ioeventfd_write in vCPU thread `tid` of VMM `vm`.
#[inline(always)]
pub fn on_ioeventfd(p: &mut Pending, tid: u32, vm: u32, now_ns: u64) {
    *p = Pending {
        tid,
        vm,
        ts_ns: now_ns,
    };
}

/// vhost_work_queue of `work` in thread `tid`: when that thread's notify is in progress on this
/// CPU, the work waits for its worker from the notify's time (the first kick kept); the notify
/// is consumed either way.
#[inline(always)]
pub fn on_work_queue(
    p: &mut Pending,
    starts: &mut impl Starts<u64, KickStart>,
    work: u64,
    tid: u32,
    now_ns: u64,
) -> Result<(), Counter> {
    let kick = *p;
    if kick.tid != tid || kick.tid == 0 || now_ns.saturating_sub(kick.ts_ns) > CHAIN_MAX_NS {
        return Ok(());
    }
    p.tid = 0;
    let start = KickStart {
        ts_ns: kick.ts_ns,
        vm: kick.vm,
        _pad: 0,
    };
    starts.put_new(work, start).map(|_| ())
}

/// handle_tx_kick of `work` in the worker: the kick's latency and VMM; `unmatched` when no kick
/// queued it, `stale` when the kick is older than [`MAX_AGE_NS`] (a work address reused).
#[inline(always)]
pub fn on_tx_kick(
    starts: &mut impl Starts<u64, KickStart>,
    work: u64,
    now_ns: u64,
) -> Result<(u64, u32), Counter> {
    let s = starts.take(&work).ok_or(Counter::Unmatched)?;
    let age = now_ns.saturating_sub(s.ts_ns);
    if age > MAX_AGE_NS {
        return Err(Counter::Stale);
    }
    Ok((age, s.vm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testing::MapStarts;

    const WORK: u64 = 0xffff_8880_0100_0040;
    const OTHER: u64 = 0xffff_8880_0100_0080;

    #[test]
    fn a_kick_waits_in_its_cpu_slot_for_the_run_it_starts() {
        let mut k = Kicked::default();
        assert_eq!(keep_kick(&mut k, 7, 10, 5_000), None);
        // another worker's run on this CPU takes nothing
        assert_eq!(take_kick(&mut k, 8).tid, 0);
        let kick = take_kick(&mut k, 7);
        assert_eq!((kick.ns, kick.tid, kick.vm), (5_000, 7, 10));
        // taken once: the worker's next run (the socket woke it) has no kick
        assert_eq!(take_kick(&mut k, 7), Kicked::default());
        // a kick whose run never came here is handed back when the slot is reused
        keep_kick(&mut k, 7, 10, 6_000);
        let old = keep_kick(&mut k, 9, 11, 7_000).unwrap();
        assert_eq!((old.ns, old.tid, old.vm), (6_000, 7, 10));
    }

    #[test]
    fn a_kick_is_measured_from_the_notify_to_the_worker() {
        let (mut p, mut m) = (Pending::default(), MapStarts::new(8));
        on_ioeventfd(&mut p, 11, 10, 1_000);
        on_work_queue(&mut p, &mut m, WORK, 11, 1_200).unwrap();
        assert_eq!(on_tx_kick(&mut m, WORK, 51_000), Ok((50_000, 10)));
        // Taken: another run of the work with no kick is unmatched.
        assert_eq!(on_tx_kick(&mut m, WORK, 52_000), Err(Counter::Unmatched));
    }

    #[test]
    fn only_the_notifying_thread_queues_from_its_notify_once() {
        let (mut p, mut m) = (Pending::default(), MapStarts::new(8));
        on_ioeventfd(&mut p, 11, 10, 1_000);
        // A packet for the guest wakes another queue's work in another thread (tun's transmit).
        on_work_queue(&mut p, &mut m, OTHER, 99, 1_100).unwrap();
        assert!(m.map.is_empty());
        on_work_queue(&mut p, &mut m, WORK, 11, 1_200).unwrap();
        // The notify is consumed: a second queue in the same thread is not this kick's.
        on_work_queue(&mut p, &mut m, OTHER, 11, 1_300).unwrap();
        assert_eq!(m.map.len(), 1);
        assert_eq!(on_tx_kick(&mut m, WORK, 2_000), Ok((1_000, 10)));
    }

    #[test]
    fn a_kick_while_the_work_is_queued_keeps_the_first() {
        let (mut p, mut m) = (Pending::default(), MapStarts::new(8));
        on_ioeventfd(&mut p, 11, 10, 1_000);
        on_work_queue(&mut p, &mut m, WORK, 11, 1_100).unwrap();
        on_ioeventfd(&mut p, 12, 10, 5_000);
        on_work_queue(&mut p, &mut m, WORK, 12, 5_100).unwrap();
        assert_eq!(on_tx_kick(&mut m, WORK, 9_000), Ok((8_000, 10)));
    }

    #[test]
    fn an_old_notify_that_queued_nothing_starts_nothing() {
        let (mut p, mut m) = (Pending::default(), MapStarts::new(8));
        on_ioeventfd(&mut p, 11, 10, 1_000);
        on_work_queue(&mut p, &mut m, WORK, 11, 1_000 + CHAIN_MAX_NS + 1).unwrap();
        assert!(m.map.is_empty());
    }

    #[test]
    fn full_and_stale_are_counted() {
        let (mut p, mut m) = (Pending::default(), MapStarts::new(1));
        on_ioeventfd(&mut p, 11, 10, 1_000);
        on_work_queue(&mut p, &mut m, OTHER, 11, 1_100).unwrap();
        on_ioeventfd(&mut p, 11, 10, 2_000);
        assert_eq!(
            on_work_queue(&mut p, &mut m, WORK, 11, 2_100),
            Err(Counter::StartFull)
        );
        assert_eq!(
            on_tx_kick(&mut m, OTHER, 1_000 + MAX_AGE_NS + 1),
            Err(Counter::Stale)
        );
    }
}
