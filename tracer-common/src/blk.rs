//! Block path: the `blk.device` stage (block_rq_issue to block_rq_complete).

use crate::{assert_size, maps::Counter, rules::Starts};

/// Operation of a block request, the `op` label.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
    Other = 3,
}

impl Op {
    pub const fn from_u32(v: u32) -> Op {
        match v {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Flush,
            _ => Op::Other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Other => "other",
        }
    }

    /// From `struct request`.cmd_flags: the low 8 bits are `enum req_op` (REQ_OP_BITS),
    /// READ 0, WRITE 1, FLUSH 2 since Linux 4.10.
    pub const fn from_cmd_flags(cmd_flags: u32) -> Op {
        match cmd_flags & 0xff {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Flush,
            _ => Op::Other,
        }
    }

    /// From the tracepoints' `rwbs` string (blk_fill_rwbs): an optional leading 'F' marks a
    /// preflush, then the op letter: R, W, F (a flush request), D (discard), N (none/other).
    pub fn from_rwbs(rwbs: &[u8]) -> Op {
        let (first, second) = (rwbs.first().copied(), rwbs.get(1).copied());
        match (first, second) {
            (Some(b'F'), Some(b'R')) | (Some(b'R'), _) => Op::Read,
            (Some(b'F'), Some(b'W')) | (Some(b'W'), _) => Op::Write,
            (Some(b'F'), _) => Op::Flush,
            _ => Op::Other,
        }
    }
}

/// What is remembered of an issued request until it completes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkStart {
    pub ts_ns: u64,
    /// Kernel dev_t: major << 20 | minor.
    pub dev: u32,
    pub op: u32,
}
assert_size!(BlkStart, 16);

/// Key of started requests for the classic tracepoints, which carry no request pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SectorKey {
    pub dev: u32,
    pub _pad: u32,
    pub sector: u64,
}
assert_size!(SectorKey, 16);

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
}

/// block_rq_issue: remember the request under `key`. A request issued again (requeue) simply
/// restarts its clock.
pub fn on_issue<K, S: Starts<K, BlkStart>>(
    starts: &mut S,
    key: K,
    now_ns: u64,
    dev: u32,
    op: Op,
) -> Result<(), Counter> {
    starts.start(
        key,
        BlkStart {
            ts_ns: now_ns,
            dev,
            op: op as u32,
        },
    )
}

/// block_rq_complete: the request under `key` is done.
pub fn on_complete<K, S: Starts<K, BlkStart>>(
    starts: &mut S,
    key: &K,
    now_ns: u64,
) -> Result<Sample, Counter> {
    let start = starts.take(key).ok_or(Counter::Unmatched)?;
    Ok(Sample {
        latency_ns: now_ns.saturating_sub(start.ts_ns),
        dev: start.dev,
        op: Op::from_u32(start.op),
    })
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], integer fields, explicit padding, sizes asserted.
    unsafe impl aya::Pod for super::BlkStart {}
    unsafe impl aya::Pod for super::SectorKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testing::MapStarts;

    #[test]
    fn rwbs_ops() {
        assert_eq!(Op::from_rwbs(b"R\0"), Op::Read);
        assert_eq!(Op::from_rwbs(b"RA\0"), Op::Read);
        assert_eq!(Op::from_rwbs(b"WS\0"), Op::Write);
        assert_eq!(Op::from_rwbs(b"FWFS\0"), Op::Write);
        assert_eq!(Op::from_rwbs(b"F\0"), Op::Flush);
        assert_eq!(Op::from_rwbs(b"FF\0"), Op::Flush);
        assert_eq!(Op::from_rwbs(b"D\0"), Op::Other);
        assert_eq!(Op::from_rwbs(b"N\0"), Op::Other);
        assert_eq!(Op::from_rwbs(b""), Op::Other);
    }

    #[test]
    fn cmd_flags_ops() {
        assert_eq!(Op::from_cmd_flags(0), Op::Read);
        // REQ_SYNC | REQ_OP_WRITE, as a direct write issues it
        assert_eq!(Op::from_cmd_flags((1 << 11) | 1), Op::Write);
        assert_eq!(Op::from_cmd_flags(2), Op::Flush);
        assert_eq!(Op::from_cmd_flags(3), Op::Other);
    }

    #[test]
    fn dev_t_round_trip() {
        let d = mkdev(7, 3);
        assert_eq!((dev_major(d), dev_minor(d)), (7, 3));
        assert_eq!(mkdev(254, 0), 254 << 20);
    }

    #[test]
    fn issue_then_complete_gives_the_latency_and_forgets_the_request() {
        let mut s = MapStarts::new(8);
        on_issue(&mut s, 0xffff_1000u64, 1_000, mkdev(7, 0), Op::Write).unwrap();
        let got = on_complete(&mut s, &0xffff_1000u64, 51_000).unwrap();
        assert_eq!(
            got,
            Sample {
                latency_ns: 50_000,
                dev: mkdev(7, 0),
                op: Op::Write
            }
        );
        assert_eq!(
            on_complete(&mut s, &0xffff_1000u64, 60_000),
            Err(Counter::Unmatched)
        );
    }

    #[test]
    fn requeue_restarts_the_clock_and_a_full_map_is_counted() {
        let mut s = MapStarts::new(1);
        on_issue(&mut s, 1u64, 1_000, 1, Op::Read).unwrap();
        on_issue(&mut s, 1u64, 5_000, 1, Op::Read).unwrap();
        assert_eq!(on_complete(&mut s, &1u64, 6_000).unwrap().latency_ns, 1_000);
        on_issue(&mut s, 2u64, 1, 1, Op::Read).unwrap();
        assert_eq!(
            on_issue(&mut s, 3u64, 1, 1, Op::Read),
            Err(Counter::StartFull)
        );
    }
}
