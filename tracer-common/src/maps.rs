//! Layout of the maps the BPF programs fill and the daemon reads.

use crate::{assert_size, stage::StageId};

/// Key of the always-on histogram map (`HIST`, per-CPU hash). One entry per series and bucket,
/// so a series costs only the buckets it has used.
///
/// The meaning of `detail`, `obj` and `vm` depends on the stage; the daemon turns them into
/// labels (a VMM tgid into a VM name, a dev_t into a device name): raw values never reach a label.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HistKey {
    pub stage: u16,
    pub bucket: u16,
    /// blk: [`crate::blk::Op`]; kvm.exit: exit reason; kvm.signal_to_inject: signal and
    /// injection context; kvm.halt_wakeup: blocked or polled; kvm.userspace_exit: exit reason.
    pub detail: u32,
    /// blk: kernel dev_t; kvm.exit, kvm.inject_to_entry: vcpu_id; kvm.halt_wakeup,
    /// kvm.userspace_exit: the vCPU's file descriptor in the VMM; kvm.signal_to_inject: 0.
    pub obj: u32,
    /// tgid of the VMM the event belongs to, 0 when it belongs to the host.
    pub vm: u32,
}
assert_size!(HistKey, 16);

/// Value of the histogram map: events in the bucket and the sum of their latencies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistVal {
    pub count: u64,
    pub sum_ns: u64,
}
assert_size!(HistVal, 16);

/// Per-stage event counters (`COUNTERS`, per-CPU array indexed by [`counter_index`]).
/// Every event the programs could not account for is counted here and exported.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// The histogram map was full: the sample was dropped.
    HistFull = 0,
    /// The map of started events was full: the start was dropped (its end will be unmatched).
    StartFull = 1,
    /// A kernel read of event data failed: the event was dropped.
    ReadError = 2,
    /// An end event with no recorded start (the start happened before attach, or was dropped).
    Unmatched = 3,
}

impl Counter {
    pub const ALL: [Counter; 4] = [
        Counter::HistFull,
        Counter::StartFull,
        Counter::ReadError,
        Counter::Unmatched,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::HistFull => "hist_map_full",
            Counter::StartFull => "start_map_full",
            Counter::ReadError => "read_error",
            Counter::Unmatched => "unmatched",
        }
    }
}

/// Entries of the `COUNTERS` array.
pub const COUNTERS_LEN: u32 = StageId::COUNT as u32 * Counter::COUNT;

pub const fn counter_index(stage: StageId, c: Counter) -> u32 {
    stage as u32 * Counter::COUNT + c as u32
}

/// Default capacity of the histogram map (series x used buckets).
pub const HIST_ENTRIES: u32 = 32768;
/// Default capacity of each map of started events (requests or exits in flight).
pub const START_ENTRIES: u32 = 16384;
/// Capacity of the map of VMM processes.
pub const VMM_ENTRIES: u32 = 4096;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers with no padding (sizes asserted above).
    unsafe impl aya::Pod for super::HistKey {}
    unsafe impl aya::Pod for super::HistVal {}
}
