//! Block path stages (host block device, shared by both paths).

use tracer_common::{config::Config, stage::StageId};

use super::{
    Event, Family, Path, Stage, all_set, kvm::KVM_MSI_SET_IRQ, net::KVM_MMIO, net::KVM_PIO,
    tracepoint_args, tracepoint_or_function,
};
use crate::maps::{
    BLK_DONE, BLK_KICK, BLK_KNOWN, BLK_LAST, BLK_PAIRING, BLK_START_SECTOR, BLK_SYNC, BLK_THREADS,
    LIO_CMDS,
};

/// tp_btf and raw_tp read dev and op through the request pointer (BTF offsets); the classic
/// programs read dev, sector and rwbs from the record.
fn issue_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(
            &[c.tp_issue_dev, c.tp_issue_sector, c.tp_issue_rwbs],
            "block_rq_issue format lacks dev, sector or rwbs",
        ),
        _ => request_members(c),
    }
}

fn complete_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(
            &[c.tp_complete_dev, c.tp_complete_sector],
            "block_rq_complete format lacks dev or sector",
        ),
        _ => request_members(c),
    }
}

fn requeue_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(
            &[c.tp_requeue_dev, c.tp_requeue_sector],
            "block_rq_requeue format lacks dev or sector",
        ),
        _ => Ok(()),
    }
}

fn request_members(c: &Config) -> Result<(), &'static str> {
    all_set(
        &[
            c.rq_q,
            c.rq_cmd_flags,
            c.q_disk,
            c.disk_major,
            c.disk_first_minor,
        ],
        "struct request/request_queue/gendisk members not found in BTF",
    )
}

// void trace_block_rq_issue(struct request *rq), from blk_mq_start_request(rq)
pub static BLOCK_RQ_ISSUE: Event = tracepoint_or_function(
    "block",
    "block_rq_issue",
    "blk_rq_issue",
    &["blk_mq_start_request"],
    issue_needs,
);
// void trace_block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes),
// first thing in blk_update_request(rq, error, nr_bytes)
pub static BLOCK_RQ_COMPLETE: Event = tracepoint_or_function(
    "block",
    "block_rq_complete",
    "blk_rq_complete",
    &["blk_update_request"],
    complete_needs,
);

// void trace_block_rq_insert(struct request *rq): a request queued for a scheduler or a
// plug's flush, in the submitting thread; pointer programs only (its classic record cannot tell
// it from the request's issue).
pub static BLOCK_RQ_INSERT: Event =
    tracepoint_args("block", "block_rq_insert", "blk_rq_insert", |_, c| {
        request_members(c)
    });

// void trace_block_bio_queue(struct bio *bio), in the submitting thread: a VMM's flush or FUA
// bio (blk.sync); pointer programs only (the bio's pointer names its request at the end).
pub static BLOCK_BIO_QUEUE: Event =
    tracepoint_args("block", "block_bio_queue", "blk_bio_queue", |_, c| {
        request_members(c)?;
        all_set(
            &[c.rq_bio, c.rq_rq_flags, c.bio_opf, c.bio_bdev, c.bdev_disk],
            "struct request/bio/block_device members not found in BTF",
        )?;
        if c.req_preflush == 0 || c.req_fua == 0 || c.rqf_flush_seq == 0 {
            return Err("REQ_PREFLUSH, REQ_FUA or RQF_FLUSH_SEQ not found in BTF");
        }
        Ok(())
    });

// void trace_target_sequencer_start(struct se_cmd *cmd) (target_core_mod): a LIO command
// prepared by its fabric (vhost-scsi's worker, in the VMM's memory), whose requests LIO's
// kworkers submit; fired by target_cmd_init_cdb(cmd, cdb, gfp). A module's tracepoint: tp_btf
// needs its BTF (refused with the reason), then raw_tp, then the function.
pub static LIO_CMD: Event = Event {
    functions: &["target_cmd_init_cdb"],
    families: &[Family::TpBtf, Family::RawTp, Family::FEntry, Family::KProbe],
    ..tracepoint_args("target", "target_sequencer_start", "lio_cmd", |_, c| {
        all_set(
            &[c.rq_bio, c.bio_private],
            "struct request.bio or struct bio.bi_private not found in BTF",
        )
    })
};

// void trace_block_rq_merge(struct request *rq): a request merged into another, freed unissued
// (its insert's marker goes with it; request pointers are reused).
pub static BLOCK_RQ_MERGE: Event =
    tracepoint_args("block", "block_rq_merge", "blk_rq_merge", |_, _| Ok(()));

// void trace_block_rq_requeue(struct request *rq), from blk_mq_requeue_request(rq, kick)
pub static BLOCK_RQ_REQUEUE: Event = tracepoint_or_function(
    "block",
    "block_rq_requeue",
    "blk_rq_requeue",
    &["blk_mq_requeue_request"],
    requeue_needs,
);

/// How a family's programs key requests: by pointer (tp_btf, raw_tp, fentry, kprobe) or by
/// dev + sector (classic). All three events of the stage must key alike.
fn request_key(f: Family) -> u8 {
    match f {
        Family::Tracepoint => 1,
        _ => 0,
    }
}

/// Keyed by request pointer (tp_btf, raw_tp) or dev + sector (classic; requests sharing one
/// are counted `ambiguous`); a requeue takes the request off the device until it is issued
/// again.
pub static DEVICE: Stage = Stage {
    id: StageId::BlkDevice,
    name: "blk.device",
    path: Path::Block,
    from: "block:block_rq_issue",
    to: "block:block_rq_complete",
    labels: &["vm", "device", "disk", "op"],
    events: &[&BLOCK_RQ_ISSUE, &BLOCK_RQ_COMPLETE, &BLOCK_RQ_REQUEUE],
    optional: &[&BLOCK_RQ_INSERT, &BLOCK_RQ_MERGE, &LIO_CMD],
    optional_adds: "the submitter of a request queued and issued by another thread (insert), \
                    the end of a merged one's mark (merge), and the VMM of vhost-scsi's \
                    requests, which LIO's kworkers submit (iblock backstore; lio: \
                    target_sequencer_start names the command's VMM)",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: Some(request_key),
    // A VMM's submitting threads, for the disk backend's cost; vhost-scsi's commands.
    maps: &[&BLK_START_SECTOR, &BLK_THREADS, &LIO_CMDS],
};

/// A guest's notify of a disk to the host request it starts.
pub static KICK_TO_SUBMIT: Stage = Stage {
    id: StageId::BlkKickToSubmit,
    name: "blk.kick_to_submit",
    path: Path::Block,
    from: "the guest's notify of the disk's queue (kvm:kvm_mmio / kvm:kvm_pio write in a vCPU \
           thread; which address is which disk's learned by pairing)",
    to: "the first block:block_rq_insert or block:block_rq_issue of a request by a thread of the \
         same VMM for that disk (QEMU's worker, io_uring's or AIO's submitter)",
    labels: &["vm", "device", "disk", "op"],
    events: &[
        &KVM_MMIO,
        &BLOCK_RQ_ISSUE,
        &BLOCK_RQ_COMPLETE,
        &BLOCK_RQ_REQUEUE,
    ],
    optional: &[&KVM_PIO, &BLOCK_RQ_INSERT, &BLOCK_RQ_MERGE, &LIO_CMD],
    optional_adds: "port notifies (legacy virtio), the submit of requests a scheduler issues \
                    from another thread (insert), the end of a merged one's mark (merge), and \
                    the submit of vhost-scsi's requests, which LIO's kworkers make (iblock \
                    backstore; target_sequencer_start names the command's VMM)",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: Some(request_key),
    maps: &[&BLK_KNOWN, &BLK_PAIRING, &BLK_LAST, &BLK_KICK],
};

/// The host completion of a VMM's request to the VMM's interrupt for that disk.
pub static COMPLETE_TO_IRQ: Stage = Stage {
    id: StageId::BlkCompleteToIrq,
    name: "blk.complete_to_irq",
    path: Path::Block,
    from: "block:block_rq_complete of a request a VMM's thread submitted",
    to: "the VMM's next kvm:kvm_msi_set_irq of that disk's vector (learned by pairing), which \
         ends every completion of the disk before it",
    labels: &["vm", "device", "disk", "op"],
    events: &[
        &BLOCK_RQ_ISSUE,
        &BLOCK_RQ_COMPLETE,
        &BLOCK_RQ_REQUEUE,
        &KVM_MSI_SET_IRQ,
    ],
    optional: &[&BLOCK_RQ_INSERT, &BLOCK_RQ_MERGE, &LIO_CMD],
    optional_adds: "the VMM of requests a scheduler issues from another thread (insert), the \
                    end of a merged one's mark (merge), and the VMM of vhost-scsi's requests, \
                    which LIO's kworkers submit (iblock backstore; target_sequencer_start \
                    names the command's VMM)",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: Some(request_key),
    maps: &[&BLK_KNOWN, &BLK_PAIRING, &BLK_LAST, &BLK_DONE],
};

/// A VMM's flush or FUA write in the host block layer: the host-side part of a guest's
/// synchronous write that the device and the flush machinery take.
pub static SYNC: Stage = Stage {
    id: StageId::BlkSync,
    name: "blk.sync",
    path: Path::Block,
    from: "block:block_bio_queue of a flush (REQ_PREFLUSH) or FUA write in a VMM's thread",
    to: "the last block:block_rq_complete of its request: its data and every flush it waited on \
         (the flush machinery completes the request once more at the end)",
    labels: &["vm", "device", "disk", "op"],
    events: &[
        &BLOCK_BIO_QUEUE,
        &BLOCK_RQ_ISSUE,
        &BLOCK_RQ_COMPLETE,
        &BLOCK_RQ_REQUEUE,
    ],
    optional: &[&BLOCK_RQ_INSERT, &BLOCK_RQ_MERGE, &LIO_CMD],
    optional_adds: "the VMM of requests a scheduler issues from another thread (insert), and \
                    the end of a merged one's mark (merge); vhost-scsi's flushes and FUA writes, which LIO's kworkers submit \
                    (target_sequencer_start names the command's VMM)",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: Some(request_key),
    maps: &[&BLK_SYNC],
};
