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
    /// injection context; kvm.halt_wakeup: blocked or polled; kvm.userspace_exit: exit reason;
    /// kvm.inject_to_entry: the passed-through device whose handler injected
    /// (`vfio::pci_key`), 0 for any other.
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
/// Every event the programs could not turn into a sample is counted here and exported
/// (`iopath_events_dropped_total{stage,reason}`).
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
    /// A start left by another life of the same key (a thread id reused by another VM), or too
    /// old to be this end's (net: 1 s; a VMM's disk kick or completion: 1 s): dropped.
    Stale = 4,
    /// Two events in flight under one key that cannot tell them apart: neither is measured.
    Ambiguous = 5,
    /// An injection whose VM is unknown (interrupt context, or a task of no known VMM).
    UnknownVm = 6,
    /// kvm_apic_accept_irq with no injection running on its CPU (LAPIC timer, IPIs).
    AcceptUnmatched = 7,
    /// An injection for a vCPU that already had one pending: measured from the earliest.
    Coalesced = 8,
    /// A packet the kernel dropped before the stage ended.
    Dropped = 9,
    /// Packets a backend took and delivered without an interrupt (the guest was polling).
    NoInterrupt = 10,
    /// A kick that woke a userspace backend whose run then handed its tap no frame before the
    /// thread's next wakeup: a receive queue's or another device's kick (not a transmit), or a
    /// run that blocked before its first frame.
    NoTransmit = 11,
    /// A VMM's request or completion whose disk's notify or interrupt vector is not known yet
    /// (learned by pairing in the first requests of a disk: `tracer_common::blk::vm`).
    Unlearned = 12,
    /// A request a VMM submitted with no kick of its own pending: one of a batch a kick
    /// started, or one the guest queued without a notify while the backend was working.
    NoKick = 13,
}

impl Counter {
    pub const ALL: [Counter; 14] = [
        Counter::HistFull,
        Counter::StartFull,
        Counter::ReadError,
        Counter::Unmatched,
        Counter::Stale,
        Counter::Ambiguous,
        Counter::UnknownVm,
        Counter::AcceptUnmatched,
        Counter::Coalesced,
        Counter::Dropped,
        Counter::NoInterrupt,
        Counter::NoTransmit,
        Counter::Unlearned,
        Counter::NoKick,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::HistFull => "hist_map_full",
            Counter::StartFull => "start_map_full",
            Counter::ReadError => "read_error",
            Counter::Unmatched => "unmatched",
            Counter::Stale => "stale",
            Counter::Ambiguous => "ambiguous",
            Counter::UnknownVm => "unknown_vm",
            Counter::AcceptUnmatched => "accept_unmatched",
            Counter::Coalesced => "coalesced",
            Counter::Dropped => "dropped",
            Counter::NoInterrupt => "no_interrupt",
            Counter::NoTransmit => "no_transmit",
            Counter::Unlearned => "unlearned",
            Counter::NoKick => "no_kick",
        }
    }
}

/// Losses of the maps every KVM stage shares, counted under the map's own name
/// (`iopath_map_full_total{map}`), not under a stage.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapCounter {
    /// The set of VMM processes was full: a new VM's system calls go unseen.
    VmmSetFull = 0,
    /// The thread-to-vCPU-fd map was full: that thread's halts and exits get vcpu="unknown".
    VcpuFdFull = 1,
    /// The notice ring buffer was full: a VM or vCPU is named at the next read instead.
    NoticesFull = 2,
    /// The timeline ring buffer was full: a sampled event is left out of the timelines (its
    /// histogram has it).
    TimelinesFull = 3,
}

impl MapCounter {
    pub const ALL: [MapCounter; 4] = [
        MapCounter::VmmSetFull,
        MapCounter::VcpuFdFull,
        MapCounter::NoticesFull,
        MapCounter::TimelinesFull,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The map's name in the BPF object.
    pub const fn map(self) -> &'static str {
        match self {
            MapCounter::VmmSetFull => "VMM_TGIDS",
            MapCounter::VcpuFdFull => "VCPU_FD",
            MapCounter::NoticesFull => "VM_NOTICES",
            MapCounter::TimelinesFull => "TIMELINES",
        }
    }
}

/// Entries of the `COUNTERS` array: per stage and reason, then per shared map.
pub const COUNTERS_LEN: u32 = StageId::COUNT as u32 * Counter::COUNT + MapCounter::COUNT;

pub const fn counter_index(stage: StageId, c: Counter) -> u32 {
    stage as u32 * Counter::COUNT + c as u32
}

pub const fn map_counter_index(m: MapCounter) -> u32 {
    StageId::COUNT as u32 * Counter::COUNT + m as u32
}

/// What a notice on the `VM_NOTICES` ring buffer reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    /// ioctl(KVM_CREATE_VM): a new VMM (or a new VM in one); `tgid` is the VMM.
    VmCreated = 1,
    /// A thread's first ioctl(KVM_RUN) on a vCPU fd: `fd` is the vCPU's fd in the VMM.
    VcpuRun = 2,
}

/// A notice the daemon reads at once, so a VM that lives for 100 ms is named while it exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
}
assert_size!(Notice, 16);

/// One sampled event on the `TIMELINES` ring buffer: a histogram sample with the time its
/// stage ended, so that the daemon can chain one I/O's stages (each starts where the one before
/// it ended) into a timeline.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// bpf_ktime_get_ns() at the stage's end: the program's clock read at its end event (a
    /// transmit kick's: its run's start, though it goes on the ring at the run's first frame).
    pub end_ns: u64,
    /// The stage's latency.
    pub ns: u64,
    /// The histogram key's fields.
    pub detail: u32,
    pub obj: u32,
    pub vm: u32,
    pub stage: u16,
    pub bucket: u16,
}
assert_size!(Sample, 32);

/// Sampling windows of the timelines: 2^24 ns (16.8 ms). With `Config::timeline_every` = n, the
/// events recorded in one window of every n are sampled, all of them, so that an I/O shorter
/// than a window has its every stage in the timeline.
pub const TIMELINE_WINDOW_SHIFT: u32 = 24;
/// Size of the timeline ring buffer: 26,000 samples (32 bytes and an 8-byte header each).
pub const TIMELINE_BYTES: u32 = 1024 * 1024;

/// Default capacity of the histogram map (series x used buckets).
pub const HIST_ENTRIES: u32 = 32768;
/// Default capacity of each map of started events (requests or exits in flight).
pub const START_ENTRIES: u32 = 16384;
/// Capacity of the map of VMM processes.
pub const VMM_ENTRIES: u32 = 4096;
/// Size of the notice ring buffer: about 2,700 notices (each takes 16 bytes and an 8-byte header).
pub const NOTICE_BYTES: u32 = 64 * 1024;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers with no padding (sizes asserted above).
    unsafe impl aya::Pod for super::HistKey {}
    unsafe impl aya::Pod for super::HistVal {}
    unsafe impl aya::Pod for super::Notice {}
    unsafe impl aya::Pod for super::Sample {}
}
