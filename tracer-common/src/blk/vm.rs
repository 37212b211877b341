//! The VMM's side of the block path: `blk.kick_to_submit` (a guest's notify to the host request
//! a thread of its VMM submits) and `blk.complete_to_irq` (the host completion to the VMM's
//! interrupt for that disk).
//!
//! QEMU kicks in a vCPU thread, submits from a `worker` thread (or io_uring, or Linux AIO, in
//! whichever thread), completes in interrupt context and injects from its main loop or an
//! iothread: events are matched by VMM and disk, never by task. Which notify address and which
//! interrupt vector belong to which disk is learned by pairing ([`Pairing`]): a kick of an
//! unknown address is paired with the next request the VMM submits, a completion with the
//! VMM's next interrupt of an unknown vector. The daemon reads the pairings and writes what
//! they show ([`verdict`]) into the map of known signals; until then the stages count
//! `unlearned` instead of measuring.

use crate::{assert_size, blk::Op, maps::Counter};

/// A VMM's disk: the key of its kicks and completions awaiting their end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskKey {
    /// tgid of the VMM.
    pub vm: u32,
    /// Kernel dev_t of the host disk its requests go to.
    pub dev: u32,
}
assert_size!(DiskKey, 8);

/// A LIO command prepared for a VMM (vhost-scsi), by the command's address: the VMM, and the
/// thread that prepared it (the vhost worker: the disk's backend, whose CPU time is its cost).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LioCmd {
    pub vm: u32,
    pub worker: u32,
}
assert_size!(LioCmd, 8);

/// What a signal key is.
pub mod kind {
    /// A guest's notify: the MMIO address or port written (kvm:kvm_mmio, kvm:kvm_pio).
    pub const NOTIFY: u32 = 1;
    /// An interrupt: the MSI's destination and vector (kvm:kvm_msi_set_irq).
    pub const VECTOR: u32 = 2;
    /// The last unknown notify, and the last completion, of a VMM (`key` 0): what the next
    /// submit or interrupt pairs with.
    pub const LAST_NOTIFY: u32 = 3;
    pub const LAST_DONE: u32 = 4;
    /// A disk (`key`: its dev_t) whose notify is known: its submits pair with no other.
    pub const DISK_NOTIFY: u32 = 5;
    /// A disk whose interrupt vector is known: its completions pair with no other.
    pub const DISK_VECTOR: u32 = 6;
}

/// A VMM's notify address or interrupt vector.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SignalKey {
    pub vm: u32,
    /// [`kind`].
    pub kind: u32,
    pub key: u64,
}
assert_size!(SignalKey, 16);

impl SignalKey {
    pub const fn notify(vm: u32, addr: u64) -> SignalKey {
        SignalKey {
            vm,
            kind: kind::NOTIFY,
            key: addr,
        }
    }

    pub const fn vector(vm: u32, address: u64, data: u64) -> SignalKey {
        SignalKey {
            vm,
            kind: kind::VECTOR,
            key: msi_key(address, data),
        }
    }

    pub const fn last(vm: u32, kind: u32) -> SignalKey {
        SignalKey { vm, kind, key: 0 }
    }
}

/// An MSI's destination and vector: a guest allocates vectors per CPU, so one vector number
/// can be two devices' on two vCPUs. Destination ID: address bits 12..19 (and the extended
/// ID's 5..11); vector: data bits 0..7.
pub const fn msi_key(address: u64, data: u64) -> u64 {
    ((address >> 12) & 0xff) << 16 | ((address >> 5) & 0x7f) << 8 | (data & 0xff)
}

/// Learning counts of an unknown signal: its events and its pairings with one disk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pairing {
    /// Events of the signal (notifies of the address, interrupts of the vector).
    pub events: u32,
    /// Of those, the ones paired with `dev`.
    pub paired: u32,
    pub dev: u32,
    /// Pairings with another disk than `dev`.
    pub other: u32,
}
assert_size!(Pairing, 16);

/// Pairings a signal needs before it is taken for a disk's.
pub const LEARN_PAIRS: u32 = 8;
/// Events after which a signal that rarely pairs is taken for no disk's (a NIC's, a timer's).
pub const LEARN_EVENTS: u32 = 64;

impl Pairing {
    /// One event of the signal.
    pub fn event(&mut self) {
        self.events = self.events.saturating_add(1);
    }

    /// The signal's event was paired with disk `dev`. A disk that outnumbers the one held
    /// takes its place.
    pub fn pair(&mut self, dev: u32) {
        if self.paired == 0 || self.dev == dev {
            self.dev = dev;
            self.paired = self.paired.saturating_add(1);
        } else {
            self.other = self.other.saturating_add(1);
            if self.other > self.paired {
                core::mem::swap(&mut self.other, &mut self.paired);
                self.dev = dev;
            }
        }
    }
}

/// What the pairings show: `Some(dev)` when at least four in five of the signal's events paired
/// with that one disk (and [`LEARN_PAIRS`] of them), `Some(0)` when after [`LEARN_EVENTS`] fewer
/// than one in five paired with any and fewer than [`LEARN_PAIRS`] with its disk (another
/// device's signal, that paired by chance), None while it is not clear. Events count from the
/// signal's first pairing. A disk's notify whose kicks mostly make no host request (a page
/// cache in the way) is never refused, only left unlearned.
pub fn verdict(p: &Pairing) -> Option<u32> {
    let (events, paired) = (p.events as u64, p.paired as u64);
    if paired >= LEARN_PAIRS as u64 && paired * 5 >= events * 4 {
        Some(p.dev)
    } else if events >= LEARN_EVENTS as u64
        && paired < LEARN_PAIRS as u64
        && (paired + p.other as u64) * 5 < events
    {
        Some(0)
    } else {
        None
    }
}

/// The last unknown signal of a VMM (`kind::LAST_NOTIFY`: the address; `kind::LAST_DONE`: the
/// disk) and when it happened.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Last {
    pub ts_ns: u64,
    pub key: u64,
}
assert_size!(Last, 16);

/// A pairing's events must be this close: a submit 1 s after a notify is not its.
pub const PAIR_WINDOW_NS: u64 = 1_000_000_000;

/// A kick or a completion older than this ends no stage: counted `stale`. A guest request need
/// not become a host request (a write QEMU's `cache=writeback` keeps in the page cache, a
/// flush the block layer issues from kblockd), nor a completion be signalled (a guest that
/// polls), so a kick or completion left over must not end up measured against a later request
/// or interrupt.
pub const STALE_NS: u64 = 1_000_000_000;

/// Most completions of one disk that can await its interrupt: QEMU completes a batch, then
/// signals once.
pub const DONE_MAX: usize = 8;

/// A disk's completions awaiting its interrupt.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub ts_ns: [u64; DONE_MAX],
    /// [`Op`] of each.
    pub ops: [u8; DONE_MAX],
    pub len: u32,
    pub _pad: u32,
}
assert_size!(Done, 80);

impl Done {
    /// One more completion; a full batch keeps its oldest and counts the newest `start_map_full`.
    /// A batch older than [`STALE_NS`] is dropped first (`Err(Stale)` with its size): its
    /// interrupt never came.
    pub fn push(&mut self, ts_ns: u64, op: Op) -> Result<(), (Counter, u64)> {
        let mut stale = None;
        if self.len > 0 && ts_ns.saturating_sub(self.ts_ns[0]) > STALE_NS {
            stale = Some((Counter::Stale, self.len as u64));
            self.len = 0;
        }
        let i = self.len as usize;
        if i >= DONE_MAX {
            return Err((Counter::StartFull, 1));
        }
        self.ts_ns[i] = ts_ns;
        self.ops[i] = op as u8;
        self.len += 1;
        stale.map_or(Ok(()), Err)
    }

    /// Completion `i`'s latency to an interrupt at `now_ns`, and its op.
    pub fn sample(&self, i: usize, now_ns: u64) -> (u64, Op) {
        let i = i & (DONE_MAX - 1);
        (
            now_ns.saturating_sub(self.ts_ns[i]),
            Op::from_u32(self.ops[i] as u32),
        )
    }
}

/// A request a VMM submitted for disk `dev`: the kick that started it, if one is pending for
/// the disk (`Kicked(latency)`, or `Counted(Stale)` past [`STALE_NS`]). With none, the VMM's
/// last notify of an unknown address pairs with it (`Pair(address)`), or nothing does
/// (`Counted`); the caller counts such a request `unlearned` while the disk's notify is
/// unknown, `no_kick` once known (a request of the batch a kick already started, or one the
/// guest queued without a notify while the host was still working).
pub enum Submitted {
    Kicked(u64),
    Pair(u64),
    Counted(Counter),
}

pub fn on_submit(pending: Option<u64>, last: Option<Last>, known: bool, now_ns: u64) -> Submitted {
    if let Some(ts) = pending {
        let ns = now_ns.saturating_sub(ts);
        return if ns > STALE_NS {
            Submitted::Counted(Counter::Stale)
        } else {
            Submitted::Kicked(ns)
        };
    }
    match last {
        Some(l) if !known && now_ns.saturating_sub(l.ts_ns) < PAIR_WINDOW_NS => {
            Submitted::Pair(l.key)
        }
        _ if known => Submitted::Counted(Counter::NoKick),
        _ => Submitted::Counted(Counter::Unlearned),
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], integer fields, explicit padding, sizes asserted.
    unsafe impl aya::Pod for super::DiskKey {}
    unsafe impl aya::Pod for super::SignalKey {}
    unsafe impl aya::Pod for super::Pairing {}
    unsafe impl aya::Pod for super::Last {}
    unsafe impl aya::Pod for super::Done {}
    unsafe impl aya::Pod for super::LioCmd {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disks_vector_is_learned_and_a_nics_is_refused() {
        // The disk's vector: nearly every interrupt follows one of its completions.
        let mut disk = Pairing::default();
        for i in 0..10 {
            disk.event();
            if i != 3 {
                disk.pair(7);
            }
        }
        assert_eq!(verdict(&disk), Some(7));
        // The NIC's: a few of its interrupts fell between a completion and the disk's own.
        let mut nic = Pairing::default();
        for i in 0..70 {
            nic.event();
            if i % 10 == 0 {
                nic.pair(7);
            }
        }
        assert_eq!(verdict(&nic), Some(0));
        // A signal that paired with the disk often is not refused, however many its events.
        let mut cached = Pairing::default();
        for i in 0..200 {
            cached.event();
            if i % 10 == 0 {
                cached.pair(7);
            }
        }
        assert_eq!(verdict(&cached), None);
        // Too few events to say.
        let mut early = Pairing::default();
        for _ in 0..5 {
            early.event();
            early.pair(7);
        }
        assert_eq!(verdict(&early), None);
    }

    #[test]
    fn the_disk_that_pairs_most_wins() {
        let mut p = Pairing::default();
        p.event();
        p.pair(1);
        for _ in 0..20 {
            p.event();
            p.pair(2);
        }
        // The counts swap when disk 2 outnumbers disk 1 (2 against 1), then disk 2's grow.
        assert_eq!((p.dev, p.paired, p.other), (2, 20, 1));
        // 20 of 21 events: above four in five.
        assert_eq!(verdict(&p), Some(2));
    }

    #[test]
    fn msi_keys_tell_vcpus_apart() {
        let a = msi_key(0xfee0_0000, 0x4022);
        let b = msi_key(0xfee0_1000, 0x4022);
        assert_ne!(a, b);
        assert_eq!(a & 0xff, 0x22);
    }

    #[test]
    fn completions_batch_and_overflow_is_counted() {
        let mut d = Done::default();
        for i in 0..DONE_MAX as u64 {
            d.push(100 + i, Op::Write).unwrap();
        }
        assert_eq!(d.push(999, Op::Read), Err((Counter::StartFull, 1)));
        assert_eq!(d.sample(0, 1_100), (1_000, Op::Write));
        assert_eq!(d.sample(7, 1_107), (1_000, Op::Write));
        // A batch whose interrupt never came goes, counted, when the next completion comes.
        assert_eq!(
            d.push(200 + STALE_NS, Op::Read),
            Err((Counter::Stale, DONE_MAX as u64))
        );
        assert_eq!((d.len, d.sample(0, 300 + STALE_NS)), (1, (100, Op::Read)));
    }

    #[test]
    fn a_submit_takes_its_kick_or_says_why_it_has_none() {
        let last = Some(Last {
            ts_ns: 1_000,
            key: 0x1000_7000,
        });
        assert!(matches!(
            on_submit(Some(400), last, true, 1_000),
            Submitted::Kicked(600)
        ));
        // A kick no host request followed (a write the page cache kept) is not the next one's.
        assert!(matches!(
            on_submit(Some(400), None, true, 401 + STALE_NS),
            Submitted::Counted(Counter::Stale)
        ));
        assert!(matches!(
            on_submit(None, last, false, 2_000),
            Submitted::Pair(0x1000_7000)
        ));
        assert!(matches!(
            on_submit(None, last, true, 2_000),
            Submitted::Counted(Counter::NoKick)
        ));
        assert!(matches!(
            on_submit(None, None, false, 2_000),
            Submitted::Counted(Counter::Unlearned)
        ));
        // A notify long before is not this request's.
        assert!(matches!(
            on_submit(None, last, false, 1_000 + PAIR_WINDOW_NS),
            Submitted::Counted(Counter::Unlearned)
        ));
    }
}
