//! blk.sync: a VMM's flush or FUA write, from its thread's block:block_bio_queue to the block
//! layer's last block:block_rq_complete of that request.
//!
//! On a device with a write cache the flush machinery turns such a bio into a sequence: a
//! preflush (kblockd issues a shared flush request), the data (issued by the submitter, its
//! request marked RQF_FLUSH_SEQ), a postflush where the device lacks FUA; then the original
//! request completes once more, with its first bio back in place (`blk_flush_restore_request`).
//! So the bio's pointer names the request at that last completion: the start is keyed by it.
//! A data-less flush is never inserted or issued by the VMM's thread, so its bio also ends the
//! disk's kick and names the thread as the disk's.

use aya_ebpf::{macros::map, maps::HashMap};
use tracer_common::{
    blk::{BlkStart, Op, mkdev, vm::STALE_NS},
    maps::{Counter, START_ENTRIES},
    stage::StageId::{self, BlkCompleteToIrq, BlkKickToSubmit, BlkSync},
};

use crate::{
    blk_vm, lio,
    shared::{config, count, current_tgid_tid, is_vmm, now_ns, on, read_at, record, stages_on},
    tp::{Site, tracepoint_args},
};

const STAGE: StageId = BlkSync;

/// A VMM's flush and FUA bios in flight, by bio pointer.
#[map]
static BLK_SYNC: HashMap<u64, BlkStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// A bio by pointer: `Typed` from tp_btf (plain loads), `Ptr` read with
/// `bpf_probe_read_kernel`.
pub enum Bio {
    Ptr(u64),
    Typed(*const u8),
}

/// bi_opf and the disk of a bio (`bi_bdev->bd_disk`: a partition's bio names its whole disk,
/// as the request events do).
#[inline(always)]
fn bio_opf_dev(bio: &Bio) -> Result<(u32, u32), i32> {
    match *bio {
        // SAFETY: bpf_probe_read_kernel of a kernel pointer's members.
        Bio::Ptr(p) => unsafe {
            let opf: u32 = read_at(p, config!(bio_opf))?;
            let bdev: u64 = read_at(p, config!(bio_bdev))?;
            let disk: u64 = if bdev == 0 {
                0
            } else {
                read_at(bdev, config!(bdev_disk))?
            };
            let dev = if disk == 0 {
                0
            } else {
                let major: i32 = read_at(disk, config!(disk_major))?;
                let minor: i32 = read_at(disk, config!(disk_first_minor))?;
                mkdev(major as u32, minor as u32)
            };
            Ok((opf, dev))
        },
        // SAFETY: BTF-typed pointers; a load through a bad or null one reads 0.
        Bio::Typed(p) => unsafe {
            let load_ptr = |p: *const u8, off: u32| {
                core::ptr::read_volatile(p.add(off as usize) as *const *const u8)
            };
            let load32 = |p: *const u8, off: u32| {
                core::ptr::read_volatile(p.add(off as usize) as *const u32)
            };
            let opf = load32(p, config!(bio_opf));
            let bdev = load_ptr(p, config!(bio_bdev));
            let disk = if bdev.is_null() {
                core::ptr::null()
            } else {
                load_ptr(bdev, config!(bdev_disk))
            };
            let dev = if disk.is_null() {
                0
            } else {
                mkdev(
                    load32(disk, config!(disk_major)),
                    load32(disk, config!(disk_first_minor)),
                )
            };
            Ok((opf, dev))
        },
    }
}

/// `flush` for a write with a preflush (fdatasync's is data-less), `fua` for a FUA write.
#[inline(always)]
fn sync_op(opf: u32) -> Option<Op> {
    if opf & 0xff != 1 {
        return None;
    }
    if opf & config!(req_preflush) != 0 {
        Some(Op::Flush)
    } else if opf & config!(req_fua) != 0 {
        Some(Op::Fua)
    } else {
        None
    }
}

#[inline(always)]
fn queued(bio: Result<Bio, ()>, _: Site) {
    let mask = stages_on();
    if !on(mask, STAGE) {
        return;
    }
    let (tgid, tid) = current_tgid_tid();
    let Ok(bio) = bio else {
        return count(STAGE, Counter::ReadError);
    };
    let key = match bio {
        Bio::Ptr(p) => p,
        Bio::Typed(p) => p as u64,
    };
    // A VMM's thread, or LIO's kworker for a vhost-scsi command (its VMM, and the vhost worker
    // as the submitting thread).
    let (vm, thread) = if is_vmm(tgid) {
        (tgid, tid)
    } else {
        match lio::cmd_of_bio(key) {
            Some(c) => (c.vm, c.worker),
            None => return,
        }
    };
    let Ok((opf, dev)) = bio_opf_dev(&bio) else {
        return count(STAGE, Counter::ReadError);
    };
    let Some(op) = sync_op(opf) else {
        return;
    };
    let now = now_ns();
    if BLK_SYNC
        .insert(key, BlkStart::new(now, dev, op, vm), 0)
        .is_err()
    {
        count(STAGE, Counter::StartFull);
    }
    if op == Op::Flush {
        blk_vm::thread_submits(thread, vm, dev);
        if on(mask, BlkKickToSubmit) {
            blk_vm::submitted(vm, dev, op, now);
        }
    }
}

/// The last completion of a request whose first bio is `bio`: a VMM's flush or FUA write ends
/// (its sample), and awaits the disk's interrupt. False when `bio` is none of theirs.
#[inline(always)]
pub fn finished(mask: u64, bio: u64, now: u64) -> bool {
    // SAFETY: a map value read whole.
    let Some(s) = (unsafe { BLK_SYNC.get(bio) }).copied() else {
        return false;
    };
    let _ = BLK_SYNC.remove(bio);
    // Older than any flush: an entry whose bio ended without a request of its own (a stacked
    // device's, an error's), met again through a reused bio address. Not this request's.
    let ns = now.saturating_sub(s.ts_ns);
    if ns > STALE_NS {
        count(STAGE, Counter::Stale);
        return false;
    }
    let op = Op::from_u32(s.op);
    record(STAGE, s.op, s.dev, s.vm, ns, now);
    if on(mask, BlkCompleteToIrq) {
        blk_vm::completed(s.vm, s.dev, op, now);
    }
    true
}

/// Whether blk.sync is on (the completion's extra reads are only for it).
#[inline(always)]
pub fn on_now(mask: u64) -> bool {
    on(mask, STAGE)
}

// void trace_block_bio_queue(struct bio *bio), in the submitting thread (submit_bio_noacct).
tracepoint_args!(
    "block_bio_queue",
    blk_bio_queue_btf,
    blk_bio_queue_raw,
    btf = |arg| Ok(Bio::Typed(arg(0) as *const u8)),
    |arg| Ok(Bio::Ptr(arg(0))),
    queued
);
