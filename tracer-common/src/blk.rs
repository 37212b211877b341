//! Block path: the `blk.device` stage (block_rq_issue to block_rq_complete), and the request
//! slots the VMM's stages (`vm`: kick to submit, completion to interrupt) share with it.

use crate::{assert_size, maps::Counter, rules::Starts};

pub mod vm;

/// Operation of a block request, the `op` label.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
    Other = 3,
    /// A write the device must make durable before it completes (REQ_FUA): with flushes, what
    /// a guest's synchronous write costs on the host.
    Fua = 4,
}

impl Op {
    pub const fn from_u32(v: u32) -> Op {
        match v {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Flush,
            4 => Op::Fua,
            _ => Op::Other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Other => "other",
            Op::Fua => "fua",
        }
    }

    /// From `struct request`.cmd_flags: the low 8 bits are `enum req_op` (REQ_OP_BITS),
    /// READ 0, WRITE 1, FLUSH 2 since Linux 4.10; `fua` is REQ_FUA's bit on this kernel
    /// (`__REQ_FUA` in BTF; 0 when unknown: FUA writes then count as writes).
    pub const fn from_cmd_flags(cmd_flags: u32, fua: u32) -> Op {
        match cmd_flags & 0xff {
            0 => Op::Read,
            1 if cmd_flags & fua != 0 => Op::Fua,
            1 => Op::Write,
            2 => Op::Flush,
            _ => Op::Other,
        }
    }

    /// From the tracepoints' `rwbs` string (blk_fill_rwbs): an optional leading 'F' marks a
    /// preflush, then the op letter: R, W, F (a flush request), D (discard), N (none/other),
    /// then 'F' for FUA.
    pub fn from_rwbs(rwbs: &[u8]) -> Op {
        let skip = usize::from(rwbs.first() == Some(&b'F') && rwbs.len() > 1 && rwbs[1] != 0);
        let (op, after) = (rwbs.get(skip).copied(), rwbs.get(skip + 1).copied());
        match (op, after) {
            (Some(b'R'), _) => Op::Read,
            (Some(b'W'), Some(b'F')) => Op::Fua,
            (Some(b'W'), _) => Op::Write,
            (Some(b'F'), _) => Op::Flush,
            _ => Op::Other,
        }
    }
}

/// What is remembered of an issued request until it completes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStart {
    /// 0: inserted by a VMM's thread, not yet issued.
    pub ts_ns: u64,
    /// Kernel dev_t: major << 20 | minor.
    pub dev: u32,
    pub op: u32,
    /// tgid of the VMM whose thread submitted the request (inserted or issued it); 0: the host's.
    pub vm: u32,
    pub _pad: u32,
}
assert_size!(BlkStart, 24);

/// Buckets of [`RqBucket`]: requests in flight keyed by pointer live in an array, in a bucket
/// hashed from the pointer, so that issue and completion take no lock (a hash map's update
/// and delete take its bucket lock: most of what the programs cost).
pub const RQ_BUCKETS: u32 = 1 << RQ_BUCKET_BITS;
pub const RQ_BUCKET_BITS: u32 = 12;
/// Slots per bucket. A disk's requests are a fixed set of objects (one per tag), so two disks'
/// sets can share a bucket for good; with one slot, a request took the slot over whenever the
/// other disk had its sharer in flight. A second slot makes a loss need three requests in
/// flight in one bucket.
pub const RQ_WAYS: usize = 2;

/// The bucket of request pointer `rq` (Fibonacci hashing; requests are slab objects, so the low
/// bits say little).
pub const fn rq_bucket(rq: u64) -> u32 {
    ((rq >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - RQ_BUCKET_BITS)) as u32
}

/// A request in flight in its slot. `check` folds every other field: a slot two CPUs wrote at
/// once (two requests sharing it, issued at the same instant) fails it and gives no sample
/// instead of a wrong one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RqSlot {
    /// 0: free.
    pub rq: u64,
    pub start: BlkStart,
    pub check: u64,
}
assert_size!(RqSlot, 40);

/// The slots of one bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RqBucket {
    pub ways: [RqSlot; RQ_WAYS],
}
assert_size!(RqBucket, 80);

impl RqSlot {
    pub const fn new(rq: u64, start: BlkStart) -> RqSlot {
        RqSlot {
            rq,
            start,
            check: Self::fold(rq, start),
        }
    }

    const fn fold(rq: u64, s: BlkStart) -> u64 {
        rq ^ s.ts_ns ^ ((s.dev as u64) << 32 | s.op as u64) ^ ((s.vm as u64) << 40)
    }

    /// Is this `rq`'s start, written whole?
    pub const fn holds(&self, rq: u64) -> bool {
        rq != 0 && self.rq == rq && self.check == Self::fold(rq, self.start)
    }
}

/// block_rq_issue into a bucket: a request issued again (after a requeue) restarts its clock in
/// its own slot; otherwise a free slot is taken; with none free, the oldest start is taken over
/// (that request is lost, counted `start_map_full` here and `unmatched` at its completion), so a
/// request that never completes cannot hold a slot for good, and a removed disk's slots need
/// no collecting.
pub fn issue_slot(b: &mut RqBucket, rq: u64, now_ns: u64, dev: u32, op: Op) -> Result<(), Counter> {
    submit_slot(b, rq, BlkStart::new(now_ns, dev, op, 0))
}

/// A request's slot: its start (issue) or its submitter alone (`start.ts_ns` 0: inserted by a
/// VMM's thread). A request issued after such an insert keeps its VMM.
pub fn submit_slot(b: &mut RqBucket, rq: u64, start: BlkStart) -> Result<(), Counter> {
    // Index loops: the verifier of Linux 6.1 refuses the slice iterators' code.
    let mut pick = RQ_WAYS;
    for w in 0..RQ_WAYS {
        if b.ways[w].rq == rq {
            pick = w;
            break;
        }
    }
    if pick == RQ_WAYS {
        for w in 0..RQ_WAYS {
            if b.ways[w].rq == 0 {
                pick = w;
                break;
            }
        }
    }
    let evicted = pick == RQ_WAYS;
    if evicted {
        pick = 0;
        for w in 1..RQ_WAYS {
            if b.ways[w].start.ts_ns < b.ways[pick].start.ts_ns {
                pick = w;
            }
        }
    }
    let mut start = start;
    let mine = b.ways[pick];
    // An insert's (or requeue's) marker names the submitter, whoever issues: a VMM's thread
    // dispatching another VM's requests (a plug's flush, a queue run) takes none of them.
    if mine.holds(rq) && mine.start.ts_ns == 0 {
        start.vm = mine.start.vm;
    }
    b.ways[pick] = RqSlot::new(rq, start);
    if evicted {
        Err(Counter::StartFull)
    } else {
        Ok(())
    }
}

/// Was `rq` inserted by a VMM's thread and not issued yet (its submit already seen)?
pub fn inserted(b: &RqBucket, rq: u64) -> bool {
    for w in 0..RQ_WAYS {
        if b.ways[w].holds(rq) && b.ways[w].start.ts_ns == 0 {
            return true;
        }
    }
    false
}

/// block_rq_complete from a bucket: the sample, and the slot freed, when a slot holds `rq`.
pub fn complete_slot(b: &mut RqBucket, rq: u64, now_ns: u64) -> Result<Sample, Counter> {
    for w in 0..RQ_WAYS {
        // Checked on a copy: a request taking the slot meanwhile cannot mix into the sample.
        let copy = b.ways[w];
        if copy.holds(rq) {
            b.ways[w].rq = 0;
            let s = copy.start;
            // Inserted, never issued (ended by an error before a driver took it): no start.
            if s.ts_ns == 0 {
                return Err(Counter::Unmatched);
            }
            return Ok(Sample {
                latency_ns: now_ns.saturating_sub(s.ts_ns),
                dev: s.dev,
                op: Op::from_u32(s.op),
                vm: s.vm,
            });
        }
    }
    Err(Counter::Unmatched)
}

/// block_rq_requeue: the request left the device; its slot becomes a marker of its submitter
/// (`ts_ns` 0), so that its next issue, from kblockd, still names its VMM.
pub fn requeue_slot(b: &mut RqBucket, rq: u64) {
    for w in 0..RQ_WAYS {
        if b.ways[w].holds(rq) {
            let mut start = b.ways[w].start;
            start.ts_ns = 0;
            b.ways[w] = RqSlot::new(rq, start);
        }
    }
}

/// block_rq_merge: the request was merged into another and is freed unissued; its marker goes
/// (request pointers are reused).
pub fn forget_slot(b: &mut RqBucket, rq: u64) {
    for w in 0..RQ_WAYS {
        if b.ways[w].holds(rq) {
            b.ways[w].rq = 0;
        }
    }
}

/// Key of started requests for the classic tracepoints, which carry no request pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SectorKey {
    pub dev: u32,
    pub _pad: u32,
    pub sector: u64,
}
assert_size!(SectorKey, 16);

/// Requests in flight under one dev + sector. Two of them (concurrent flushes, both at sector
/// 0) cannot be told apart by the classic tracepoints, so such a key is marked ambiguous and
/// none of its requests is measured: each is counted as `ambiguous` when it completes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorStart {
    pub start: BlkStart,
    /// Requests issued under this key and not yet completed.
    pub inflight: u32,
    /// 1 once a second request was issued under the key while one was in flight.
    pub ambiguous: u32,
}
assert_size!(SectorStart, 32);

/// Kernel dev_t (MKDEV) from major and minor.
pub const fn mkdev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xfffff)
}
pub const fn dev_major(dev: u32) -> u32 {
    dev >> 20
}
pub const fn dev_minor(dev: u32) -> u32 {
    dev & 0xfffff
}

/// One finished request: its latency and labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub latency_ns: u64,
    pub dev: u32,
    pub op: Op,
    /// The VMM that submitted it (0: the host).
    pub vm: u32,
}

impl BlkStart {
    pub const fn new(ts_ns: u64, dev: u32, op: Op, vm: u32) -> BlkStart {
        BlkStart {
            ts_ns,
            dev,
            op: op as u32,
            vm,
            _pad: 0,
        }
    }
}

/// block_rq_issue, classic tracepoint: remember the request under its dev + sector, or mark
/// the key ambiguous when another request is in flight under it. The read-modify-write of an
/// existing entry is not atomic: two CPUs issuing to the same sector at the same instant can
/// miscount `inflight`, which leaves one `unmatched` or one entry until the device goes.
pub fn on_issue_sector<S: Starts<SectorKey, SectorStart>>(
    starts: &mut S,
    key: SectorKey,
    now_ns: u64,
    op: Op,
    vm: u32,
) -> Result<(), Counter> {
    let fresh = SectorStart {
        start: BlkStart::new(now_ns, key.dev, op, vm),
        inflight: 1,
        ambiguous: 0,
    };
    if starts.put_new(key, fresh)? {
        return Ok(());
    }
    let Some(mut s) = starts.get(&key) else {
        // completed in between: start afresh
        return starts.start(key, fresh);
    };
    s.inflight += 1;
    s.ambiguous = 1;
    starts.start(key, s)
}

/// block_rq_requeue, classic tracepoint: one request under the key left the device (it will be
/// issued again). Without this, a requeued request would be taken for a second one and leave the
/// key ambiguous for good. (A driver may requeue a request it never started: that takes another
/// request's place under the key, whose completion then counts as `unmatched`.)
pub fn on_requeue_sector<S: Starts<SectorKey, SectorStart>>(starts: &mut S, key: &SectorKey) {
    let Some(mut s) = starts.get(key) else {
        return;
    };
    if s.inflight <= 1 {
        starts.remove(key);
    } else {
        s.inflight -= 1;
        let _ = starts.put(*key, s);
    }
}

/// block_rq_complete, classic tracepoint.
pub fn on_complete_sector<S: Starts<SectorKey, SectorStart>>(
    starts: &mut S,
    key: &SectorKey,
    now_ns: u64,
) -> Result<Sample, Counter> {
    let mut s = starts.get(key).ok_or(Counter::Unmatched)?;
    if s.ambiguous == 0 {
        let _ = starts.take(key);
        return Ok(Sample {
            latency_ns: now_ns.saturating_sub(s.start.ts_ns),
            dev: s.start.dev,
            op: Op::from_u32(s.start.op),
            vm: s.start.vm,
        });
    }
    if s.inflight <= 1 {
        let _ = starts.take(key);
    } else {
        s.inflight -= 1;
        let _ = starts.put(*key, s);
    }
    Err(Counter::Ambiguous)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], integer fields, explicit padding, sizes asserted.
    unsafe impl aya::Pod for super::BlkStart {}
    unsafe impl aya::Pod for super::RqBucket {}
    unsafe impl aya::Pod for super::SectorKey {}
    unsafe impl aya::Pod for super::SectorStart {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testing::MapStarts;

    #[test]
    fn buckets_spread_slab_neighbours_and_stay_in_range() {
        let base = 0xffff_8880_1234_0000u64;
        let mut slots = [0u32; 256];
        for (i, s) in slots.iter_mut().enumerate() {
            *s = rq_bucket(base + i as u64 * 0x140);
        }
        assert!(slots.iter().all(|&s| s < RQ_BUCKETS));
        slots.sort_unstable();
        let distinct = 1 + slots.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct > 235, "{distinct} distinct of 256");
    }

    #[test]
    fn a_slot_refuses_other_requests_and_torn_writes() {
        let mut slot = RqBucket::default();
        issue_slot(&mut slot, 0x1000, 100, 7, Op::Write).unwrap();
        assert_eq!(
            complete_slot(&mut slot, 0x2000, 150),
            Err(Counter::Unmatched)
        );
        assert_eq!(
            complete_slot(&mut slot, 0x1000, 160).unwrap().latency_ns,
            60
        );
        // a torn slot (the pointer and time of one request, the device of another) gives nothing
        issue_slot(&mut slot, 0x4000, 400, 7, Op::Read).unwrap();
        slot.ways[0].start.dev = 8;
        assert_eq!(
            complete_slot(&mut slot, 0x4000, 420),
            Err(Counter::Unmatched)
        );
    }

    #[test]
    fn rwbs_ops() {
        assert_eq!(Op::from_rwbs(b"R\0"), Op::Read);
        assert_eq!(Op::from_rwbs(b"RA\0"), Op::Read);
        assert_eq!(Op::from_rwbs(b"WS\0"), Op::Write);
        assert_eq!(Op::from_rwbs(b"FWS\0"), Op::Write);
        assert_eq!(Op::from_rwbs(b"FWFS\0"), Op::Fua);
        assert_eq!(Op::from_rwbs(b"WFS\0"), Op::Fua);
        assert_eq!(Op::from_rwbs(b"F\0"), Op::Flush);
        assert_eq!(Op::from_rwbs(b"FF\0"), Op::Flush);
        assert_eq!(Op::from_rwbs(b"D\0"), Op::Other);
        assert_eq!(Op::from_rwbs(b"N\0"), Op::Other);
        assert_eq!(Op::from_rwbs(b""), Op::Other);
    }

    #[test]
    fn cmd_flags_ops() {
        let fua = 1 << 17;
        assert_eq!(Op::from_cmd_flags(0, fua), Op::Read);
        // REQ_SYNC | REQ_OP_WRITE, as a direct write issues it
        assert_eq!(Op::from_cmd_flags((1 << 11) | 1, fua), Op::Write);
        assert_eq!(Op::from_cmd_flags(fua | (1 << 11) | 1, fua), Op::Fua);
        assert_eq!(Op::from_cmd_flags(fua | (1 << 11) | 1, 0), Op::Write);
        assert_eq!(Op::from_cmd_flags(fua, fua), Op::Read);
        assert_eq!(Op::from_cmd_flags(2, fua), Op::Flush);
        assert_eq!(Op::from_cmd_flags(3, fua), Op::Other);
    }

    #[test]
    fn dev_t_round_trip() {
        let d = mkdev(7, 3);
        assert_eq!((dev_major(d), dev_minor(d)), (7, 3));
        assert_eq!(mkdev(254, 0), 254 << 20);
    }

    #[test]
    fn issue_then_complete_gives_the_latency_and_forgets_the_request() {
        let mut s = RqBucket::default();
        issue_slot(&mut s, 0xffff_1000u64, 1_000, mkdev(7, 0), Op::Write).unwrap();
        let got = complete_slot(&mut s, 0xffff_1000u64, 51_000).unwrap();
        assert_eq!(
            got,
            Sample {
                latency_ns: 50_000,
                dev: mkdev(7, 0),
                op: Op::Write,
                vm: 0,
            }
        );
        assert_eq!(
            complete_slot(&mut s, 0xffff_1000u64, 60_000),
            Err(Counter::Unmatched)
        );
    }

    #[test]
    fn two_flushes_at_sector_zero_are_counted_ambiguous_not_swapped() {
        let mut s = MapStarts::new(8);
        let flush = SectorKey {
            dev: mkdev(7, 0),
            _pad: 0,
            sector: 0,
        };
        let write = SectorKey { sector: 8, ..flush };
        on_issue_sector(&mut s, flush, 1_000, Op::Flush, 0).unwrap();
        on_issue_sector(&mut s, write, 1_500, Op::Write, 0).unwrap();
        on_issue_sector(&mut s, flush, 2_000, Op::Flush, 0).unwrap();
        // Either completion could be either flush: neither is measured, both are counted.
        assert_eq!(
            on_complete_sector(&mut s, &flush, 9_000),
            Err(Counter::Ambiguous)
        );
        assert_eq!(
            on_complete_sector(&mut s, &flush, 9_500),
            Err(Counter::Ambiguous)
        );
        assert_eq!(
            on_complete_sector(&mut s, &flush, 9_900),
            Err(Counter::Unmatched)
        );
        // The other key is untouched, and the flush key works again once drained.
        assert_eq!(
            on_complete_sector(&mut s, &write, 3_500)
                .unwrap()
                .latency_ns,
            2_000
        );
        on_issue_sector(&mut s, flush, 10_000, Op::Flush, 0).unwrap();
        assert_eq!(
            on_complete_sector(&mut s, &flush, 10_700).unwrap(),
            Sample {
                latency_ns: 700,
                dev: mkdev(7, 0),
                op: Op::Flush,
                vm: 0,
            }
        );
        assert!(s.map.is_empty());
    }

    #[test]
    fn a_requeued_request_is_not_a_second_one() {
        let mut s = MapStarts::new(8);
        let key = SectorKey {
            dev: mkdev(7, 0),
            _pad: 0,
            sector: 64,
        };
        on_issue_sector(&mut s, key, 1_000, Op::Write, 0).unwrap();
        on_requeue_sector(&mut s, &key);
        on_issue_sector(&mut s, key, 5_000, Op::Write, 0).unwrap();
        assert_eq!(
            on_complete_sector(&mut s, &key, 6_000).unwrap().latency_ns,
            1_000
        );
        assert!(s.map.is_empty(), "nothing left ambiguous");
        // A requeue while two are in flight leaves the key ambiguous until both complete.
        on_issue_sector(&mut s, key, 10_000, Op::Write, 0).unwrap();
        on_issue_sector(&mut s, key, 10_500, Op::Write, 0).unwrap();
        on_requeue_sector(&mut s, &key);
        on_issue_sector(&mut s, key, 11_000, Op::Write, 0).unwrap();
        for _ in 0..2 {
            assert_eq!(
                on_complete_sector(&mut s, &key, 20_000),
                Err(Counter::Ambiguous)
            );
        }
        assert!(s.map.is_empty());
        // Pointer key: the requeue frees the slot, the next issue starts afresh.
        let mut p = RqBucket::default();
        issue_slot(&mut p, 9u64, 1_000, 1, Op::Read).unwrap();
        requeue_slot(&mut p, 9u64);
        assert!(inserted(&p, 9u64), "a marker, not a start");
        assert_eq!(complete_slot(&mut p, 9u64, 2_000), Err(Counter::Unmatched));
        // A VMM's request requeued, then issued again by kblockd: still the VMM's.
        submit_slot(&mut p, 7u64, BlkStart::new(0, 1, Op::Write, 42)).unwrap();
        issue_slot(&mut p, 7u64, 3_000, 1, Op::Write).unwrap();
        requeue_slot(&mut p, 7u64);
        issue_slot(&mut p, 7u64, 5_000, 1, Op::Write).unwrap();
        let s = complete_slot(&mut p, 7u64, 6_000).unwrap();
        assert_eq!((s.latency_ns, s.vm), (1_000, 42));
        // A host's request inserted, dispatched by a VMM's thread: the host's.
        submit_slot(&mut p, 8u64, BlkStart::new(0, 1, Op::Read, 0)).unwrap();
        submit_slot(&mut p, 8u64, BlkStart::new(7_000, 1, Op::Read, 42)).unwrap();
        assert_eq!(complete_slot(&mut p, 8u64, 8_000).unwrap().vm, 0);
        // A merged request's marker goes.
        submit_slot(&mut p, 9u64, BlkStart::new(0, 1, Op::Read, 42)).unwrap();
        forget_slot(&mut p, 9u64);
        assert!(!inserted(&p, 9u64));
    }

    #[test]
    fn requeue_restarts_the_clock_and_a_full_map_is_counted() {
        let mut s = RqBucket::default();
        issue_slot(&mut s, 1u64, 1_000, 1, Op::Read).unwrap();
        issue_slot(&mut s, 1u64, 5_000, 1, Op::Read).unwrap();
        assert_eq!(
            complete_slot(&mut s, 1u64, 6_000).unwrap().latency_ns,
            1_000
        );
        // Two other requests hashed to the bucket share it; a third takes the oldest slot over:
        // counted, and that one is unmatched.
        issue_slot(&mut s, 2u64, 10, 1, Op::Read).unwrap();
        issue_slot(&mut s, 3u64, 20, 1, Op::Read).unwrap();
        assert_eq!(
            issue_slot(&mut s, 4u64, 30, 1, Op::Read),
            Err(Counter::StartFull)
        );
        assert_eq!(complete_slot(&mut s, 2u64, 40), Err(Counter::Unmatched));
        assert_eq!(complete_slot(&mut s, 3u64, 40).unwrap().latency_ns, 20);
        assert_eq!(complete_slot(&mut s, 4u64, 40).unwrap().latency_ns, 10);
        assert!(s.ways.iter().all(|w| w.rq == 0), "every slot freed");
        // A request issued again finds its own slot, wherever it is: no second slot taken.
        issue_slot(&mut s, 5u64, 50, 1, Op::Read).unwrap();
        issue_slot(&mut s, 6u64, 60, 1, Op::Read).unwrap();
        issue_slot(&mut s, 6u64, 70, 1, Op::Read).unwrap();
        issue_slot(&mut s, 5u64, 80, 1, Op::Read).unwrap();
        assert_eq!(complete_slot(&mut s, 6u64, 90).unwrap().latency_ns, 20);
        assert_eq!(complete_slot(&mut s, 5u64, 90).unwrap().latency_ns, 10);
    }
}

/// Where the bench's variants of the block programs stop (`Config::blk_cut`), each step adding
/// one part of the work, so that the difference of two variants' run time is that part's cost.
pub mod cut {
    /// The whole program.
    pub const WHOLE: u32 = 0;
    /// Entry and the stage switch only.
    pub const ENTRY: u32 = 1;
    /// Then the clock read.
    pub const CLOCK: u32 = 2;
    /// Then the whole issue (the request's loads, the slot's store); at completion the
    /// bucket's match and the slot's clearing, without the histogram.
    pub const MATCH: u32 = 3;
    /// The whole program, its histogram buckets picked as before schema 3
    /// ([`crate::hist::loglinear`]): against WHOLE, what the schema-3 search costs.
    pub const LOGLINEAR: u32 = 4;
    /// The variants in the order the bench reports them, with what each adds: WHOLE differs
    /// from the one before only in the completion's histogram update, and LOGLINEAR from
    /// WHOLE only in how that update picks its bucket.
    pub const STEPS: [(u32, &str); 5] = [
        (ENTRY, "entry and stage switch"),
        (CLOCK, "clock read"),
        (
            MATCH,
            "issue: request loads and slot store; completion: bucket match and clear",
        ),
        (WHOLE, "completion: histogram update (issue unchanged)"),
        (
            LOGLINEAR,
            "(instead of the last) its bucket picked log-linearly, as before schema 3",
        ),
    ];
}
