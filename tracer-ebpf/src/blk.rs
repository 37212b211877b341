//! blk.device: block:block_rq_issue to block:block_rq_complete.
//!
//! Three implementations, in the attach plan's order of preference:
//! - tp_btf: the tracepoint's own arguments (`struct request *rq`), keyed by the request
//!   pointer; dev and op read from the request with offsets found in BTF.
//! - raw tracepoint: the same arguments without BTF typing (kernels without tp_btf).
//! - classic tracepoint: the formatted record (dev, sector, rwbs), keyed by dev + sector.

use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::HashMap,
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use tracer_common::{
    blk::{self, BlkStart, Op, SectorKey, mkdev},
    maps::{Counter, START_ENTRIES},
    stage::StageId,
};

use crate::shared::{KernelStarts, config, count, now_ns, read_at, record};

const STAGE: StageId = StageId::BlkDevice;

#[map]
static BLK_START_RQ: HashMap<u64, BlkStart> = HashMap::with_max_entries(START_ENTRIES, 0);

#[map]
static BLK_START_SECTOR: HashMap<SectorKey, BlkStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// dev_t and op of a `struct request`. Mirrors the tracepoint: dev is
/// `disk_devt(rq->q->disk)`, 0 when the queue has no disk.
#[inline(always)]
fn request_dev_op(rq: u64) -> Result<(u32, Op), i32> {
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
        Ok((dev, Op::from_cmd_flags(cmd_flags)))
    }
}

#[inline(always)]
fn issue_rq(rq: u64) {
    let Ok((dev, op)) = request_dev_op(rq) else {
        count(STAGE, Counter::ReadError);
        return;
    };
    if let Err(c) = blk::on_issue(&mut KernelStarts(&BLK_START_RQ), rq, now_ns(), dev, op) {
        count(STAGE, c);
    }
}

#[inline(always)]
fn complete_rq(rq: u64) {
    match blk::on_complete(&mut KernelStarts(&BLK_START_RQ), &rq, now_ns()) {
        Ok(s) => record(STAGE, s.op as u32, s.dev, 0, s.latency_ns),
        Err(c) => count(STAGE, c),
    }
}

// void trace_block_rq_issue(struct request *rq)
#[btf_tracepoint(function = "block_rq_issue")]
pub fn blk_rq_issue_btf(ctx: BtfTracePointContext) -> i32 {
    issue_rq(ctx.arg::<u64>(0));
    0
}

// void trace_block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)
#[btf_tracepoint(function = "block_rq_complete")]
pub fn blk_rq_complete_btf(ctx: BtfTracePointContext) -> i32 {
    complete_rq(ctx.arg::<u64>(0));
    0
}

#[raw_tracepoint(tracepoint = "block_rq_issue")]
pub fn blk_rq_issue_raw(ctx: RawTracePointContext) -> i32 {
    issue_rq(ctx.arg::<u64>(0));
    0
}

#[raw_tracepoint(tracepoint = "block_rq_complete")]
pub fn blk_rq_complete_raw(ctx: RawTracePointContext) -> i32 {
    complete_rq(ctx.arg::<u64>(0));
    0
}

#[inline(always)]
fn sector_key(ctx: &TracePointContext, dev_off: u32, sector_off: u32) -> Result<SectorKey, i32> {
    unsafe {
        Ok(SectorKey {
            dev: ctx.read_at::<u32>(dev_off as usize)?,
            _pad: 0,
            sector: ctx.read_at::<u64>(sector_off as usize)?,
        })
    }
}

// block/block_rq_issue: dev_t dev; sector_t sector; ...; char rwbs[RWBS_LEN]
#[tracepoint]
pub fn blk_rq_issue_tp(ctx: TracePointContext) -> u32 {
    let key = sector_key(&ctx, config!(tp_issue_dev), config!(tp_issue_sector));
    let rwbs = unsafe { ctx.read_at::<[u8; 2]>(config!(tp_issue_rwbs) as usize) };
    let (Ok(key), Ok(rwbs)) = (key, rwbs) else {
        count(STAGE, Counter::ReadError);
        return 0;
    };
    let op = Op::from_rwbs(&rwbs);
    if let Err(c) = blk::on_issue(
        &mut KernelStarts(&BLK_START_SECTOR),
        key,
        now_ns(),
        key.dev,
        op,
    ) {
        count(STAGE, c);
    }
    0
}

// block/block_rq_complete: dev_t dev; sector_t sector; ...
#[tracepoint]
pub fn blk_rq_complete_tp(ctx: TracePointContext) -> u32 {
    let Ok(key) = sector_key(&ctx, config!(tp_complete_dev), config!(tp_complete_sector)) else {
        count(STAGE, Counter::ReadError);
        return 0;
    };
    match blk::on_complete(&mut KernelStarts(&BLK_START_SECTOR), &key, now_ns()) {
        Ok(s) => record(STAGE, s.op as u32, s.dev, 0, s.latency_ns),
        Err(c) => count(STAGE, c),
    }
    0
}
