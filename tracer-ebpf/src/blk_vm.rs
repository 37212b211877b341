//! blk.kick_to_submit and blk.complete_to_irq: a VMM's disk, from the guest's notify to the
//! host request, and from the host completion to the interrupt. Matched by VMM and disk, never
//! by thread; which notify address and which interrupt vector are a disk's is learned by
//! pairing (rules and layout: `tracer_common::blk::vm`), the daemon writing what the pairings
//! show into `BLK_KNOWN`.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::map, maps::HashMap};
use tracer_common::{
    blk::{
        Op,
        vm::{
            DONE_MAX, DiskKey, Done, Last, PAIR_WINDOW_NS, Pairing, STALE_NS, SignalKey, Submitted,
            kind, on_submit,
        },
    },
    maps::{Counter, START_ENTRIES},
    stage::StageId::{self, BlkCompleteToIrq, BlkKickToSubmit},
};

use crate::shared::{count, count_n, current_tgid_tid, is_vmm, mm_owner_vmm, record};

/// What a VMM's notify address or vector is (a disk's dev_t, 0: another device's), and which
/// disks' notifies (`kind::DISK_NOTIFY`) and vectors (`kind::DISK_VECTOR`) are known. Written by
/// the daemon.
#[map]
static BLK_KNOWN: HashMap<SignalKey, u32> = HashMap::with_max_entries(START_ENTRIES, 0);

/// Learning counts of unknown notify addresses and vectors.
#[map]
static BLK_PAIRING: HashMap<SignalKey, Pairing> = HashMap::with_max_entries(START_ENTRIES, 0);

/// A VMM's last unknown notify and last completion, for the next submit or interrupt to pair
/// with.
#[map]
static BLK_LAST: HashMap<SignalKey, Last> = HashMap::with_max_entries(START_ENTRIES, 0);

/// A disk's kick not yet taken by a request: the latest.
#[map]
static BLK_KICK: HashMap<DiskKey, u64> = HashMap::with_max_entries(START_ENTRIES, 0);

/// The VMMs' threads that submit requests, and for which disk: the daemon reads their CPU time
/// (the disk backend's cost) and removes the ones that are gone.
#[map]
static BLK_THREADS: HashMap<u32, DiskKey> = HashMap::with_max_entries(START_ENTRIES, 0);

/// A disk's completions awaiting its interrupt.
#[map]
static BLK_DONE: HashMap<DiskKey, Done> = HashMap::with_max_entries(START_ENTRIES, 0);

/// The xAPIC's page: EOIs and timer writes, never a device's notify.
const LAPIC: core::ops::Range<u64> = 0xfee0_0000..0xfef0_0000;

#[inline(always)]
fn known(k: &SignalKey) -> Option<u32> {
    // SAFETY: a map value read whole.
    unsafe { BLK_KNOWN.get(k) }.copied()
}

/// One more event of unknown signal `k`: counted once the signal has paired (only what pairs
/// takes an entry: a guest's frame buffer writes to a thousand addresses take none).
#[inline(always)]
fn event(k: &SignalKey) {
    if let Some(p) = BLK_PAIRING.get_ptr_mut(k) {
        // SAFETY: a map value; racing increments may lose one, which only slows the learning.
        unsafe { &mut *p }.event();
    }
}

/// Unknown signal `k`'s event paired with disk `dev` (`stage` counts a full map).
#[inline(always)]
fn pair(k: &SignalKey, dev: u32, stage: StageId) {
    match BLK_PAIRING.get_ptr_mut(k) {
        // SAFETY: as in `event`.
        Some(p) => unsafe { &mut *p }.pair(dev),
        None => {
            let mut p = Pairing::default();
            p.event();
            p.pair(dev);
            if BLK_PAIRING.insert(k, p, BPF_NOEXIST as u64).is_err() {
                count(stage, Counter::StartFull);
            }
        }
    }
}

/// A guest's write to `addr` (an MMIO address or a port) in a thread of `tgid`, at `now`.
#[inline(always)]
pub fn notified(tgid: u32, addr: u64, now: u64) {
    if LAPIC.contains(&addr) || !is_vmm(tgid) {
        return;
    }
    let k = SignalKey::notify(tgid, addr);
    match known(&k) {
        Some(0) => {}
        Some(dev) => {
            // The latest kick: one that started no host request (a write the page cache took,
            // a flush kblockd issues) must not be taken by the next request. Of two kicks
            // before one submit (a backend slower than its guest), the first is counted
            // `coalesced`.
            let disk = DiskKey { vm: tgid, dev };
            // SAFETY: a map value read whole.
            if unsafe { BLK_KICK.get(disk) }.is_some() {
                count(BlkKickToSubmit, Counter::Coalesced);
            }
            if BLK_KICK.insert(disk, now, 0).is_err() {
                count(BlkKickToSubmit, Counter::StartFull);
            }
        }
        None => {
            event(&k);
            let last = Last {
                ts_ns: now,
                key: addr,
            };
            let _ = BLK_LAST.insert(SignalKey::last(tgid, kind::LAST_NOTIFY), last, 0);
        }
    }
}

/// Thread `tid` of VMM `vm` submitted a request for disk `dev`.
#[inline(always)]
pub fn thread_submits(tid: u32, vm: u32, dev: u32) {
    let disk = DiskKey { vm, dev };
    // SAFETY: a map value read whole.
    if unsafe { BLK_THREADS.get(tid) } != Some(&disk) {
        let _ = BLK_THREADS.insert(tid, disk, 0);
    }
}

/// A request (`op`) of VMM `vm` for disk `dev` reached the host block layer (its first insert or
/// issue) at `now`: it takes the disk's pending kick; with none, it pairs with the VMM's last
/// notify of an unknown address (a second queue's, say), and is counted.
#[inline(always)]
pub fn submitted(vm: u32, dev: u32, op: Op, now: u64) {
    let disk = DiskKey { vm, dev };
    // Plain branches, not one match over the three lookups: LLVM merged their pointers with an
    // OR, which the verifier refuses.
    // SAFETY: a map value read whole.
    if let Some(ts) = unsafe { BLK_KICK.get(disk) }.copied() {
        let _ = BLK_KICK.remove(disk);
        match on_submit(Some(ts), None, true, now) {
            Submitted::Kicked(ns) => record(BlkKickToSubmit, op as u32, dev, vm, ns, now),
            Submitted::Counted(c) => count(BlkKickToSubmit, c),
            Submitted::Pair(_) => {}
        }
        return;
    }
    let disk_known = SignalKey {
        vm,
        kind: kind::DISK_NOTIFY,
        key: dev as u64,
    };
    let is_known = known(&disk_known).is_some();
    let last_key = SignalKey::last(vm, kind::LAST_NOTIFY);
    // SAFETY: a map value read whole.
    let last = unsafe { BLK_LAST.get(last_key) }.copied();
    match on_submit(None, last, false, now) {
        Submitted::Pair(addr) => {
            let _ = BLK_LAST.remove(last_key);
            pair(&SignalKey::notify(vm, addr), dev, BlkKickToSubmit);
        }
        Submitted::Counted(_) | Submitted::Kicked(_) => {}
    }
    let c = if is_known {
        Counter::NoKick
    } else {
        Counter::Unlearned
    };
    count(BlkKickToSubmit, c);
}

/// A request VMM `vm` submitted for disk `dev` completed at `now`: it awaits the disk's
/// interrupt. A function of its own (a BPF subprogram): inlined into the classic completion
/// program, LLVM kept a value in a register a helper call clobbers, which the verifier refuses
/// ("R5 !read_ok").
#[inline(never)]
pub fn completed(vm: u32, dev: u32, op: Op, now: u64) {
    let disk = DiskKey { vm, dev };
    let pushed = match BLK_DONE.get_ptr_mut(disk) {
        // SAFETY: a map value; the disk's completions and its interrupt may race on two CPUs,
        // which loses or repeats one completion at worst.
        Some(d) => unsafe { &mut *d }.push(now, op),
        None => {
            let mut d = Done::default();
            let _ = d.push(now, op);
            BLK_DONE
                .insert(disk, d, 0)
                .map_err(|_| (Counter::StartFull, 1))
        }
    };
    if let Err((c, n)) = pushed {
        count_n(BlkCompleteToIrq, c, n);
    }
    let last = Last {
        ts_ns: now,
        key: dev as u64,
    };
    let _ = BLK_LAST.insert(SignalKey::last(vm, kind::LAST_DONE), last, 0);
}

/// kvm:kvm_msi_set_irq (`address`, `data`) at `now`, in a task: the interrupt of a VMM's disk
/// ends its completions. A BPF subprogram (see `msi_set_irq`).
#[inline(never)]
pub fn irq(address: u64, data: u64, in_task: bool, now: u64) {
    if !in_task {
        return;
    }
    let tgid = current_tgid_tid().0;
    let vm = if is_vmm(tgid) {
        tgid
    } else {
        match mm_owner_vmm() {
            Some(v) => v,
            None => return,
        }
    };
    let k = SignalKey::vector(vm, address, data);
    let last_key = SignalKey::last(vm, kind::LAST_DONE);
    match known(&k) {
        Some(0) => {}
        Some(dev) => {
            let disk = DiskKey { vm, dev };
            // SAFETY: a map value copied whole, then removed.
            let Some(done) = (unsafe { BLK_DONE.get(disk) }).copied() else {
                return;
            };
            let _ = BLK_DONE.remove(disk);
            // Index loop with a constant bound: the verifier of Linux 6.1 bounds it.
            let n = done.len as usize;
            let mut i = 0;
            while i < DONE_MAX {
                if i >= n {
                    break;
                }
                let (ns, op) = done.sample(i, now);
                if ns > STALE_NS {
                    count(BlkCompleteToIrq, Counter::Stale);
                } else {
                    record(BlkCompleteToIrq, op as u32, dev, vm, ns, now);
                }
                i += 1;
            }
            // SAFETY: a map value read whole.
            if unsafe { BLK_LAST.get(last_key) }.is_some_and(|l| l.key == dev as u64) {
                let _ = BLK_LAST.remove(last_key);
            }
        }
        None => {
            event(&k);
            // SAFETY: a map value read whole.
            let last = unsafe { BLK_LAST.get(last_key) }.copied();
            let Some(l) = last.filter(|l| now.saturating_sub(l.ts_ns) < PAIR_WINDOW_NS) else {
                return;
            };
            let dev = l.key as u32;
            let _ = BLK_LAST.remove(last_key);
            pair(&k, dev, BlkCompleteToIrq);
            // A disk whose vector is not known yet: its completions so far end unmeasured.
            let disk_known = SignalKey {
                vm,
                kind: kind::DISK_VECTOR,
                key: l.key,
            };
            if known(&disk_known).is_none() {
                let disk = DiskKey { vm, dev };
                // SAFETY: a map value read whole.
                if let Some(d) = unsafe { BLK_DONE.get(disk) } {
                    count_n(BlkCompleteToIrq, Counter::Unlearned, d.len as u64);
                    let _ = BLK_DONE.remove(disk);
                }
            }
        }
    }
}
