//! vhost-scsi's requests and their VMM. vhost-scsi hands each guest command to LIO, the
//! kernel's SCSI target, which submits it to the backstore from its own kworkers
//! (target_queue_submission), not from a thread of the VMM. The vhost worker prepares the
//! command in the VMM's memory (before Linux 6.4 a kthread that adopted the VMM's mm, since then
//! a thread of the VMM): target:target_sequencer_start there (or target_cmd_init_cdb, which
//! fires it) names the command's VMM, and the iblock backstore's bios carry the command in
//! `bi_private`, so a request a kworker submits names its VMM through `rq->bio->bi_private`.
//! The fileio backstore writes through a file system: its requests stay the host's.

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap},
};
use tracer_common::{blk::vm::LioCmd, config::NO_OFFSET, maps::START_ENTRIES};

use crate::{
    shared::{config, current_tgid_tid, is_vmm, mm_owner_vmm, read_at, stages_on},
    tp::{Site, function, tracepoint_args},
};

/// Commands prepared in a VMM's memory, by the command's address: the VMM and the preparing
/// thread. An LRU map: a command's entry is replaced when its memory is reused for another
/// (removed when another fabric's takes it), and one never submitted is evicted, never counted
/// full.
#[map]
static LIO_CMDS: LruHashMap<u64, LioCmd> = LruHashMap::with_max_entries(START_ENTRIES, 0);

/// Set once a command was seen: until then a host request costs one array read here, not the
/// two reads and a lookup of [`cmd_of_request`].
#[map]
static LIO_SEEN: Array<u32> = Array::with_max_entries(1, 0);

/// A command prepared in the current task: kept for the requests of it, when the task works for
/// a VMM (its thread, or a kthread in its mm).
#[inline(always)]
fn prepared(cmd: Result<u64, ()>, _: Site) {
    if stages_on() & crate::blk::SLOT_STAGES == 0 {
        return;
    }
    let Ok(cmd) = cmd else { return };
    let (tgid, tid) = current_tgid_tid();
    let vm = if is_vmm(tgid) {
        tgid
    } else {
        match mm_owner_vmm() {
            Some(v) => v,
            None => {
                // Another fabric's command (iSCSI, loopback) at an address a VMM's once had:
                // its requests are the host's.
                let _ = LIO_CMDS.remove(cmd);
                return;
            }
        }
    };
    let _ = LIO_CMDS.insert(cmd, LioCmd { vm, worker: tid }, 0);
    if let Some(seen) = LIO_SEEN.get_ptr_mut(0) {
        // SAFETY: a map value; every writer stores the same 1.
        unsafe { *seen = 1 };
    }
}

/// The LIO command of request `p` that no VMM's thread submitted (its first bio carries it),
/// if one was prepared for a VMM.
#[inline(always)]
pub fn cmd_of_request(p: *const u8) -> Option<LioCmd> {
    if LIO_SEEN.get(0).copied() != Some(1) {
        return None;
    }
    let (rq_bio, bio_private) = (config!(rq_bio), config!(bio_private));
    if rq_bio == NO_OFFSET || bio_private == NO_OFFSET {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel; a null or stale pointer fails the read.
    let bio: u64 = unsafe { read_at(p as u64, rq_bio) }.ok()?;
    cmd_of(bio, bio_private)
}

/// The LIO command bio `bio` carries, if one was prepared for a VMM (blk.sync's flushes).
#[inline(always)]
pub fn cmd_of_bio(bio: u64) -> Option<LioCmd> {
    if LIO_SEEN.get(0).copied() != Some(1) {
        return None;
    }
    let bio_private = config!(bio_private);
    if bio_private == NO_OFFSET {
        return None;
    }
    cmd_of(bio, bio_private)
}

#[inline(always)]
fn cmd_of(bio: u64, bio_private: u32) -> Option<LioCmd> {
    if bio == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel; a null or stale pointer fails the read.
    let private: u64 = unsafe { read_at(bio, bio_private) }.ok()?;
    // SAFETY: a map value read whole.
    let c = unsafe { LIO_CMDS.get(private) }.copied()?;
    // A VMM that is gone (its entries wait for the daemon's collection) names nothing.
    is_vmm(c.vm).then_some(c)
}

// void trace_target_sequencer_start(struct se_cmd *cmd) (target_core_mod), from
// target_cmd_init_cdb(cmd, cdb, gfp) in the fabric's context: vhost-scsi's worker. A module's
// tracepoint: raw_tp (tp_btf would need the module's BTF).
tracepoint_args!(
    "target_sequencer_start",
    lio_cmd_btf,
    lio_cmd_raw,
    btf = |arg| Ok(arg(0)),
    |arg| Ok(arg(0)),
    prepared
);

// sense_reason_t target_cmd_init_cdb(struct se_cmd *cmd, unsigned char *cdb, gfp_t gfp) fires
// it.
function!(
    "target_cmd_init_cdb",
    lio_cmd_fentry,
    lio_cmd_kprobe,
    |arg| Ok(arg(0)),
    prepared
);
