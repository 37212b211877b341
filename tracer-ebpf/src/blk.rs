//! blk.device: block:block_rq_issue to block:block_rq_complete.
//!
//! tp_btf and raw_tp take the tracepoint's own argument (`struct request *rq`) and key the
//! request by that pointer, reading dev and op from the request with offsets found in BTF. The
//! classic tracepoints carry no pointer: they key by dev + sector, and count as `ambiguous` the
//! requests that share one (concurrent flushes at sector 0). block_rq_requeue takes a request
//! off the device (it is issued again later): its start goes.
//!
//! A request a VMM's thread submits carries the VMM (the `vm` label), and its first insert or
//! issue ends the disk's kick (`blk_vm`); its completion awaits the disk's interrupt there. So
//! does a request LIO's kworker submits for a vhost-scsi command of the VMM (`lio`).
//! block_rq_insert (pointer programs only) marks the request's slot with its VMM before a
//! scheduler's issue from another thread.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use tracer_common::{
    blk::{
        self, BlkStart, Op, RQ_BUCKETS, RqBucket, SectorKey, SectorStart, cut, mkdev, rq_bucket,
    },
    maps::{Counter, START_ENTRIES},
    stage::StageId::{self, BlkCompleteToIrq, BlkDevice, BlkKickToSubmit, BlkSync},
};

use crate::{
    blk_sync, blk_vm, lio,
    shared::{
        KernelStarts, config, count, current_tgid_tid, is_vmm, now_ns, number, on, read_at, record,
        stages_on,
    },
    tp::{Site, field, function, tracepoint, tracepoint_args},
};

const STAGE: StageId = StageId::BlkDevice;

/// The stages that keep request slots.
pub const SLOT_STAGES: u64 =
    BlkDevice.bit() | BlkKickToSubmit.bit() | BlkCompleteToIrq.bit() | BlkSync.bit();

/// Who submits a request: the VMM whose thread runs this event, or the VMM of the vhost-scsi
/// command a LIO kworker submits it for, or the host.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Submitter {
    Host,
    /// A thread of the VMM: its backend, whose CPU time is the disk's cost.
    Thread(u32),
    /// A kworker of LIO for the VMM's vhost-scsi command (the kworker is shared; the vhost
    /// worker that prepared the command is the disk's backend thread).
    ForVmm {
        vm: u32,
        worker: u32,
    },
}

impl Submitter {
    #[inline(always)]
    fn vm(self) -> u32 {
        match self {
            Submitter::Host => 0,
            Submitter::Thread(vm) | Submitter::ForVmm { vm, .. } => vm,
        }
    }
}

#[inline(always)]
fn submitter(rq: &Result<Request, ()>) -> Submitter {
    let tgid = current_tgid_tid().0;
    if is_vmm(tgid) {
        return Submitter::Thread(tgid);
    }
    match rq {
        Ok(Request::Ptr(p) | Request::Typed(p)) => {
            lio::cmd_of_request(*p).map_or(Submitter::Host, |c| Submitter::ForVmm {
                vm: c.vm,
                worker: c.worker,
            })
        }
        _ => Submitter::Host,
    }
}

/// Requests in flight keyed by pointer, in buckets hashed from it (`blk::rq_bucket`): plain
/// stores, no lock.
#[map]
static BLK_START_RQ: Array<RqBucket> = Array::with_max_entries(RQ_BUCKETS, 0);

/// Request `p`'s number and its bucket (always there: the index is masked to the array's size).
#[inline(always)]
fn slot_of(p: *const u8) -> Option<(u64, &'static mut RqBucket)> {
    let rq = number(p)?;
    // SAFETY: a map value; each bucket's writers are the events of the requests hashed to it.
    let slot = BLK_START_RQ.get_ptr_mut(rq_bucket(rq))?;
    Some((rq, unsafe { &mut *slot }))
}

#[map]
static BLK_START_SECTOR: HashMap<SectorKey, SectorStart> =
    HashMap::with_max_entries(START_ENTRIES, 0);

/// One request event: the request pointer (raw_tp, fentry, kprobe: its members read with
/// `bpf_probe_read_kernel`; tp_btf at issue: `Typed`, read with plain loads) or its dev +
/// sector and op letter (classic).
enum Request {
    Ptr(*const u8),
    Typed(*const u8),
    Sector(SectorKey, Op),
}

/// dev_t and op of a `struct request`. Mirrors the tracepoint: dev is
/// `disk_devt(rq->q->disk)`, 0 when the queue has no disk.
#[inline(always)]
fn request_dev_op(rq: *const u8) -> Result<(u32, Op), i32> {
    let rq = rq as u64;
    unsafe {
        let cmd_flags: u32 = read_at(rq, config!(rq_cmd_flags))?;
        let q: u64 = read_at(rq, config!(rq_q))?;
        let disk: u64 = read_at(q, config!(q_disk))?;
        let dev = if disk == 0 {
            0
        } else {
            let major: i32 = read_at(disk, config!(disk_major))?;
            let minor: i32 = read_at(disk, config!(disk_first_minor))?;
            mkdev(major as u32, minor as u32)
        };
        Ok((dev, Op::from_cmd_flags(cmd_flags, config!(req_fua))))
    }
}

/// [`request_dev_op`] with loads the verifier checks against BTF (the offsets are constants to
/// it: CONFIG is frozen), for tp_btf's typed `struct request *`: no helper call, and a null
/// pointer on the way reads as 0.
#[inline(always)]
fn typed_dev_op(rq: *const u8) -> (u32, Op) {
    // SAFETY: BTF-typed pointers; the verifier checks each load's offset and type, and a load
    // through a bad or null one reads 0 instead of faulting.
    unsafe {
        let load32 =
            |p: *const u8, off: u32| core::ptr::read_volatile(p.add(off as usize) as *const u32);
        let load_ptr = |p: *const u8, off: u32| {
            core::ptr::read_volatile(p.add(off as usize) as *const *const u8)
        };
        let cmd_flags = load32(rq, config!(rq_cmd_flags));
        let q = load_ptr(rq, config!(rq_q));
        let disk = load_ptr(q, config!(q_disk));
        let dev = if disk.is_null() {
            0
        } else {
            mkdev(
                load32(disk, config!(disk_major)),
                load32(disk, config!(disk_first_minor)),
            )
        };
        (dev, Op::from_cmd_flags(cmd_flags, config!(req_fua)))
    }
}

/// `struct request`.rq_flags and .bio: whether the flush machinery runs the request (the data
/// of a flush or FUA write, or the sequence's end), and the bio that names it there.
#[inline(always)]
fn request_seq(p: *const u8, typed: bool) -> (u32, u64) {
    let (flags_off, bio_off) = (config!(rq_rq_flags), config!(rq_bio));
    if typed {
        // SAFETY: a BTF-typed pointer; a load through a bad or null one reads 0.
        unsafe {
            (
                core::ptr::read_volatile(p.add(flags_off as usize) as *const u32),
                core::ptr::read_volatile(p.add(bio_off as usize) as *const u64),
            )
        }
    } else {
        // SAFETY: bpf_probe_read_kernel of a kernel pointer's members.
        unsafe {
            (
                read_at(p as u64, flags_off).unwrap_or(0),
                read_at(p as u64, bio_off).unwrap_or(0),
            )
        }
    }
}

/// A request's issue, or a VMM's insert (`issued` false: the slot's start stays 0), at `now`
/// into its slot. A VMM's first of the two ends its disk's kick.
#[inline(always)]
fn submit_ptr(
    mask: u64,
    p: *const u8,
    dev_op: Result<(u32, Op), i32>,
    issued: bool,
    now: u64,
    who: Submitter,
    typed: bool,
) -> Result<(), Counter> {
    let (Ok((dev, mut op)), Some((rq, s))) = (dev_op, slot_of(p)) else {
        return Err(Counter::ReadError);
    };
    let vm = who.vm();
    // A VMM's write inside a flush sequence (submitted by its thread, or by LIO's kworker for
    // vhost-scsi) is a FUA write's data (the machinery took REQ_FUA off, the device having
    // none; a preflushed write's data is issued by kblockd).
    if vm != 0 && op == Op::Write && request_seq(p, typed).0 & config!(rqf_flush_seq) != 0 {
        op = Op::Fua;
    }
    if vm != 0 && !blk::inserted(s, rq) {
        let thread = match who {
            Submitter::ForVmm { worker, .. } => worker,
            _ => current_tgid_tid().1,
        };
        blk_vm::thread_submits(thread, vm, dev);
        if on(mask, BlkKickToSubmit) {
            blk_vm::submitted(vm, dev, op, now);
        }
    }
    let ts = if issued { now } else { 0 };
    blk::submit_slot(s, rq, BlkStart::new(ts, dev, op, vm))
}

#[inline(always)]
fn issue(rq: Result<Request, ()>, _: Site) {
    let mask = stages_on();
    if mask & SLOT_STAGES == 0 {
        return;
    }
    // The bench's variants (`blk::cut`); CONFIG is constant to the verifier, which drops the
    // branches of the others.
    let cut = config!(blk_cut);
    if cut == cut::ENTRY {
        return;
    }
    let now = now_ns();
    if cut == cut::CLOCK {
        return;
    }
    // cut::MATCH runs the whole issue: the completion's match then finds its start.
    let who = submitter(&rq);
    let vm = who.vm();
    let started = match rq {
        Ok(Request::Ptr(p)) => submit_ptr(mask, p, request_dev_op(p), true, now, who, false),
        Ok(Request::Typed(p)) => submit_ptr(mask, p, Ok(typed_dev_op(p)), true, now, who, true),
        Ok(Request::Sector(key, op)) => {
            if vm != 0 {
                blk_vm::thread_submits(current_tgid_tid().1, vm, key.dev);
                if on(mask, BlkKickToSubmit) {
                    blk_vm::submitted(vm, key.dev, op, now);
                }
            }
            blk::on_issue_sector(&mut KernelStarts(&BLK_START_SECTOR), key, now, op, vm)
        }
        Err(()) => Err(Counter::ReadError),
    };
    if let Err(c) = started {
        count(STAGE, c);
    }
}

/// block_rq_insert (a scheduler's queue, a plug's flush): a VMM's thread queued the request,
/// which another thread may issue; its marker names the VMM. The host's inserts take no slot
/// (a slot per host insert made buckets evict live requests, and cost every host insert).
#[inline(always)]
fn insert(rq: Result<Request, ()>, _: Site) {
    let mask = stages_on();
    if mask & SLOT_STAGES == 0 {
        return;
    }
    let who = submitter(&rq);
    if who == Submitter::Host {
        return;
    }
    let now = now_ns();
    let inserted = match rq {
        Ok(Request::Ptr(p)) => submit_ptr(mask, p, request_dev_op(p), false, now, who, false),
        Ok(Request::Typed(p)) => submit_ptr(mask, p, Ok(typed_dev_op(p)), false, now, who, true),
        _ => Err(Counter::ReadError),
    };
    if let Err(c) = inserted {
        count(STAGE, c);
    }
}

#[inline(always)]
fn complete(rq: Result<Request, ()>, _: Site) {
    let mask = stages_on();
    if mask & SLOT_STAGES == 0 {
        return;
    }
    let cut = config!(blk_cut);
    if cut == cut::ENTRY {
        return;
    }
    let now = now_ns();
    if cut == cut::CLOCK {
        return;
    }
    // The request pointer and whether tp_btf typed it (for blk.sync's reads of it).
    let ptr = match rq {
        Ok(Request::Ptr(p)) => Some((p, false)),
        Ok(Request::Typed(p)) => Some((p, true)),
        _ => None,
    };
    let done = match rq {
        Ok(Request::Ptr(p) | Request::Typed(p)) => match slot_of(p) {
            Some((rq, s)) => blk::complete_slot(s, rq, now),
            None => Err(Counter::ReadError),
        },
        Ok(Request::Sector(key, _)) => {
            blk::on_complete_sector(&mut KernelStarts(&BLK_START_SECTOR), &key, now)
        }
        Err(()) => Err(Counter::ReadError),
    };
    if cut == cut::MATCH {
        return;
    }
    match done {
        Ok(s) => {
            if on(mask, STAGE) {
                record(STAGE, s.op as u32, s.dev, s.vm, s.latency_ns, now);
            }
            if s.vm == 0 {
                return;
            }
            // A VMM's flush or FUA write: its data's completion inside the flush sequence is
            // not its end (the sequence completes it again), whatever op its slot says (a
            // request kblockd issued from a VMM's marker keeps the VMM, not the op); a FUA
            // write the device took whole ends here.
            let mut ended = false;
            if let Some((p, typed)) = ptr
                && blk_sync::on_now(mask)
            {
                let (flags, bio) = request_seq(p, typed);
                if flags & config!(rqf_flush_seq) != 0 {
                    return;
                }
                if s.op == Op::Fua || s.op == Op::Flush {
                    ended = blk_sync::finished(mask, bio, now);
                }
            }
            if !ended && on(mask, BlkCompleteToIrq) {
                blk_vm::completed(s.vm, s.dev, s.op, now);
            }
        }
        Err(c) => {
            // No start: the last completion of a VMM's flush or FUA write has none of its own.
            if let Some((p, typed)) = ptr
                && blk_sync::on_now(mask)
                && blk_sync::finished(mask, request_seq(p, typed).1, now)
            {
                return;
            }
            count(STAGE, c)
        }
    }
}

/// A request merged into another: freed, never issued.
#[inline(always)]
fn merged(rq: Result<Request, ()>, _: Site) {
    if stages_on() & SLOT_STAGES == 0 {
        return;
    }
    if let Ok(Request::Ptr(p) | Request::Typed(p)) = rq
        && let Some((rq, s)) = slot_of(p)
    {
        blk::forget_slot(s, rq);
    }
}

/// A requeued request left the device; its next issue starts it again.
#[inline(always)]
fn requeue(rq: Result<Request, ()>, _: Site) {
    if stages_on() & SLOT_STAGES == 0 {
        return;
    }
    match rq {
        Ok(Request::Ptr(p) | Request::Typed(p)) => {
            if let Some((rq, s)) = slot_of(p) {
                blk::requeue_slot(s, rq);
            }
        }
        Ok(Request::Sector(key, _)) => {
            blk::on_requeue_sector(&mut KernelStarts(&BLK_START_SECTOR), &key)
        }
        Err(()) => count(STAGE, Counter::ReadError),
    }
}

#[inline(always)]
fn sector_key(
    ctx: &aya_ebpf::programs::TracePointContext,
    dev: u32,
    sector: u32,
) -> Result<SectorKey, ()> {
    Ok(SectorKey {
        dev: field::<u32>(ctx, dev)?,
        _pad: 0,
        sector: field::<u64>(ctx, sector)?,
    })
}

// void trace_block_rq_issue(struct request *rq)
// block/block_rq_issue: dev_t dev; sector_t sector; ...; char rwbs[RWBS_LEN]
tracepoint!(
    "block_rq_issue",
    blk_rq_issue_btf,
    blk_rq_issue_raw,
    blk_rq_issue_tp,
    btf = |arg| Ok(Request::Typed(arg(0) as *const u8)),
    |arg| Ok(Request::Ptr(arg(0) as *const u8)),
    |rec| {
        let key = sector_key(rec, config!(tp_issue_dev), config!(tp_issue_sector));
        // The op has no error path of its own: with one, Linux 6.1's verifier lost track of
        // which path held what, and refused the program ("invalid size of register spill").
        // A record's own bytes do not fail to read anyway.
        // Three letters: a preflush, the op, FUA ("FWF").
        let op = match field::<[u8; 4]>(rec, config!(tp_issue_rwbs)) {
            Ok(rwbs) => Op::from_rwbs(&rwbs),
            Err(()) => Op::Other,
        };
        key.map(|k| Request::Sector(k, op))
    },
    issue
);

// void trace_block_rq_insert(struct request *rq): its classic record cannot tell a request's
// insert from its issue (dev + sector both), so only the pointer programs.
tracepoint_args!(
    "block_rq_insert",
    blk_rq_insert_btf,
    blk_rq_insert_raw,
    btf = |arg| Ok(Request::Typed(arg(0) as *const u8)),
    |arg| Ok(Request::Ptr(arg(0) as *const u8)),
    insert
);

// void trace_block_rq_merge(struct request *rq): `rq` merged into another request (attempt_merge)
// and about to be freed.
tracepoint_args!(
    "block_rq_merge",
    blk_rq_merge_btf,
    blk_rq_merge_raw,
    btf = |arg| Ok(Request::Typed(arg(0) as *const u8)),
    |arg| Ok(Request::Ptr(arg(0) as *const u8)),
    merged
);

// void trace_block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)
// block/block_rq_complete: dev_t dev; sector_t sector; ...
tracepoint!(
    "block_rq_complete",
    blk_rq_complete_btf,
    blk_rq_complete_raw,
    blk_rq_complete_tp,
    |arg| Ok(Request::Ptr(arg(0) as *const u8)),
    |rec| sector_key(rec, config!(tp_complete_dev), config!(tp_complete_sector))
        .map(|k| Request::Sector(k, Op::Other)),
    complete
);

// void trace_block_rq_requeue(struct request *rq)
// block/block_rq_requeue: dev_t dev; sector_t sector; ...
tracepoint!(
    "block_rq_requeue",
    blk_rq_requeue_btf,
    blk_rq_requeue_raw,
    blk_rq_requeue_tp,
    |arg| Ok(Request::Ptr(arg(0) as *const u8)),
    |rec| sector_key(rec, config!(tp_requeue_dev), config!(tp_requeue_sector))
        .map(|k| Request::Sector(k, Op::Other)),
    requeue
);

// The same events from the functions that fire them, for kernels without usable tracepoints:
// void blk_mq_start_request(struct request *rq) fires block_rq_issue;
function!(
    "blk_mq_start_request",
    blk_rq_issue_fentry,
    blk_rq_issue_kprobe,
    |arg| Ok(Request::Ptr(arg(0) as *const u8)),
    issue
);

// bool blk_update_request(struct request *req, blk_status_t error, unsigned int nr_bytes)
// fires block_rq_complete first thing;
function!(
    "blk_update_request",
    blk_rq_complete_fentry,
    blk_rq_complete_kprobe,
    |arg| Ok(Request::Ptr(arg(0) as *const u8)),
    complete
);

// void blk_mq_requeue_request(struct request *rq, bool kick_requeue_list) fires
// block_rq_requeue (a requeue for a busy device resource does not pass here: its request's
// next issue replaces the start).
function!(
    "blk_mq_requeue_request",
    blk_rq_requeue_fentry,
    blk_rq_requeue_kprobe,
    |arg| Ok(Request::Ptr(arg(0) as *const u8)),
    requeue
);
