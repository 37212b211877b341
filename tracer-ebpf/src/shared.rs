//! Maps and helpers every path uses: the load-time config, the stage switches, the histogram,
//! the drop counters, the set of VMM processes and the notices that name them.

use crate::tp::Site;
use aya_ebpf::{
    helpers::{bpf_get_current_task_btf, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tracer_common::{
    config::{Config, NO_OFFSET},
    hist::bucket_index,
    maps::{
        COUNTERS_LEN, Counter, HIST_ENTRIES, HistKey, HistVal, MapCounter, NOTICE_BYTES, Notice,
        NoticeKind, Sample, TIMELINE_BYTES, TIMELINE_WINDOW_SHIFT, VMM_ENTRIES, counter_index,
        map_counter_index,
    },
    rules::Starts,
    stage::StageId,
};

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// Set by the daemon before load (offsets found in this kernel's BTF and tracefs).
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config::UNSET;

/// Reads one field of CONFIG; volatile so the compiler cannot fold in the UNSET value.
macro_rules! config {
    ($field:ident) => {{
        // SAFETY: CONFIG is a plain read-only global; volatile keeps the load.
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&raw const crate::shared::CONFIG.$field) };
        v
    }};
}
pub(crate) use config;

/// Bit mask of the stages the attach plan switched on ([`StageId::bit`]), written by the daemon
/// once every stage is attached. A program shared by several stages does only the work of the
/// stages that are on; until the mask is written, none.
/// Entry 1: what the system call programs stand in for (`stage::stand_in`).
#[map]
static STAGES_ON: Array<u64> = Array::with_max_entries(2, 0);

/// The stages that are on (an array lookup the verifier inlines).
#[inline(always)]
pub fn stages_on() -> u64 {
    STAGES_ON.get(0).copied().unwrap_or(0)
}

/// The requests the system call programs handle (`stage::stand_in` bits).
#[inline(always)]
pub fn stand_ins() -> u64 {
    STAGES_ON.get(1).copied().unwrap_or(0)
}

#[inline(always)]
pub fn on(mask: u64, stage: StageId) -> bool {
    mask & stage.bit() != 0
}

#[map]
static HIST: PerCpuHashMap<HistKey, HistVal> = PerCpuHashMap::with_max_entries(HIST_ENTRIES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[inline(always)]
fn bump(index: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *p += n };
    }
}

/// Counts one event of `stage` that gave no sample, for `c`.
#[inline(always)]
pub fn count(stage: StageId, c: Counter) {
    bump(counter_index(stage, c), 1);
}

/// Counts `n` events of `stage` that gave no sample, for `c`.
#[inline(always)]
pub fn count_n(stage: StageId, c: Counter, n: u64) {
    bump(counter_index(stage, c), n);
}

/// Counts `c` for each stage of `stages` that is on: an event shared by several stages that
/// could not be read is lost to all of them.
#[inline(always)]
pub fn count_each(mask: u64, stages: &[StageId], c: Counter) {
    for &s in stages {
        if on(mask, s) {
            count(s, c);
        }
    }
}

/// Counts a loss of a map shared by every KVM stage.
#[inline(always)]
pub fn count_map(m: MapCounter) {
    bump(map_counter_index(m), 1);
}

#[inline(always)]
fn add(key: &HistKey, ns: u64) -> bool {
    match HIST.get_ptr_mut(key) {
        Some(v) => {
            // Per-CPU value: no atomics needed.
            unsafe {
                (*v).count += 1;
                (*v).sum_ns += ns;
            }
            true
        }
        None => false,
    }
}

/// Counts one latency sample of `stage` into the histogram; `end_ns` is when it ended (the
/// caller's clock read, which the timeline's sampling reuses; for a sample recorded later
/// than its end whose end was not kept, the time of the recording).
#[inline(always)]
pub fn record(stage: StageId, detail: u32, obj: u32, vm: u32, ns: u64, end_ns: u64) {
    record_ending(stage, detail, obj, vm, ns, || end_ns);
}

/// As [`record`], for a latency the kernel reported (no clock read of the caller's): the
/// sampling reads the clock, only when it is on.
#[inline(always)]
pub fn record_reported(stage: StageId, detail: u32, obj: u32, vm: u32, ns: u64) {
    record_ending(stage, detail, obj, vm, ns, now_ns);
}

#[inline(always)]
fn record_ending(
    stage: StageId,
    detail: u32,
    obj: u32,
    vm: u32,
    ns: u64,
    end: impl FnOnce() -> u64,
) {
    // The bench's variant (`blk::cut::LOGLINEAR`) times the previous pick; CONFIG is constant
    // to the verifier, which drops the branch everywhere else.
    let bucket = if config!(blk_cut) == tracer_common::blk::cut::LOGLINEAR {
        tracer_common::hist::loglinear::bucket_index(ns)
    } else {
        bucket_index(ns)
    };
    let key = HistKey {
        stage: stage as u16,
        bucket,
        detail,
        obj,
        vm,
    };
    sample(&key, ns, end);
    if add(&key, ns) {
        return;
    }
    let first = HistVal {
        count: 1,
        sum_ns: ns,
    };
    if HIST.insert(key, first, BPF_NOEXIST).is_ok() {
        return;
    }
    // Either another CPU created the key first (then it is there now) or the map is full.
    if !add(&key, ns) {
        count(stage, Counter::HistFull);
    }
}

/// Sampled events for the daemon's timelines (`Sample`).
#[map]
static TIMELINES: RingBuf = RingBuf::with_byte_size(TIMELINE_BYTES, 0);

/// Puts the sample, which ended at `end()`, on the timeline ring when its window is sampled.
/// Off (`--timeline-every 0`), CONFIG's 0 is constant to the verifier, which drops this code;
/// on, it costs the sample's stores on the stack, and an output in the sampled windows (the
/// end is the caller's, but for a latency the kernel reported: then a clock read here).
///
/// Inlined, with one branch of its own, on the window: the sample is built on the stack either
/// way, and a full ring is counted by adding 0 or 1 to its counter rather than by a branch.
/// Behind a BPF-to-BPF call (static or global) Debian 6.1's verifier, whose precision
/// backtracking gives up at a call and marks every scalar precise, could no longer prune the
/// paths of the histogram's bucket search: 99 to 137 s to load the programs, and
/// kvm_msi_set_irq's over its limit (E2BIG); this form loads in 4 s there. An earlier inlined
/// form (the sample built in sampled windows only, a branch for the full ring) took
/// kvm_msi_set_irq's over the limit as well.
#[inline(always)]
fn sample(key: &HistKey, ns: u64, end: impl FnOnce() -> u64) {
    let every = config!(timeline_every) as u64;
    if every == 0 {
        return;
    }
    let now = end();
    let s = Sample {
        end_ns: now,
        ns,
        detail: key.detail,
        obj: key.obj,
        vm: key.vm,
        stage: key.stage,
        bucket: key.bucket,
    };
    if (now >> TIMELINE_WINDOW_SHIFT) & (every - 1) == 0 {
        let full = TIMELINES.output::<Sample>(&s, 0).is_err() as u64;
        bump(map_counter_index(MapCounter::TimelinesFull), full);
    }
}

/// Records `r`'s sample with `put`, or counts why there is none.
#[inline(always)]
pub fn record_or_count<S>(stage: StageId, r: Result<Option<S>, Counter>, put: impl FnOnce(S)) {
    match r {
        Ok(Some(s)) => put(s),
        Ok(None) => {}
        Err(c) => count(stage, c),
    }
}

/// [`Starts`] over a kernel hash map of started events.
pub struct KernelStarts<K: 'static, V: 'static>(pub &'static HashMap<K, V>);

impl<K, V: Copy> Starts<K, V> for KernelStarts<K, V> {
    #[inline(always)]
    fn put(&mut self, k: K, v: V) -> bool {
        self.0.insert(&k, v, 0).is_ok()
    }

    #[inline(always)]
    fn put_new(&mut self, k: K, v: V) -> Result<bool, Counter> {
        match self.0.insert(&k, v, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(e) if e == -EEXIST => Ok(false),
            Err(_) => Err(Counter::StartFull),
        }
    }

    #[inline(always)]
    fn take(&mut self, k: &K) -> Option<V> {
        let v = unsafe { *self.0.get_ptr(k)? };
        let _ = self.0.remove(k);
        Some(v)
    }

    #[inline(always)]
    fn remove(&mut self, k: &K) {
        let _ = self.0.remove(k);
    }

    #[inline(always)]
    fn get(&self, k: &K) -> Option<V> {
        unsafe { self.0.get_ptr(k).map(|p| *p) }
    }
}

/// [`Starts`] over one slot of a per-CPU array: "the event running on this CPU". The key is
/// ignored; the CPU is the key.
pub struct CpuSlot<V: 'static>(pub &'static PerCpuArray<V>);

impl<K, V: Copy> Starts<K, V> for CpuSlot<V> {
    #[inline(always)]
    fn put(&mut self, _: K, v: V) -> bool {
        match self.0.get_ptr_mut(0) {
            Some(p) => {
                // Per-CPU slot: no other CPU writes it.
                unsafe { *p = v };
                true
            }
            None => false,
        }
    }

    #[inline(always)]
    fn put_new(&mut self, k: K, v: V) -> Result<bool, Counter> {
        Ok(self.put(k, v))
    }

    /// The slot's value, and the slot zeroed (a value whose fields are all 0 is "none" to
    /// the rules that use a slot: a mark at time 0 is out of every window).
    #[inline(always)]
    fn take(&mut self, _: &K) -> Option<V> {
        let p = self.0.get_ptr_mut(0)?;
        // SAFETY: this CPU's slot, no one else writes it while this program runs.
        unsafe {
            let v = *p;
            core::ptr::write_bytes(p, 0, 1);
            Some(v)
        }
    }

    #[inline(always)]
    fn get(&self, _: &K) -> Option<V> {
        self.0.get(0).copied()
    }
}

/// Thread groups known to run VMs: marked at their first KVM event (`vmm_seen`) or, where the
/// syscall stand-in runs, at ioctl(KVM_CREATE_VM); seeded by the daemon with the ones that
/// existed before it started, removed by it when they exit. Signals of other processes are
/// ignored at the cost of one lookup.
#[map]
pub static VMM_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(VMM_ENTRIES, 0);

#[inline(always)]
pub fn is_vmm(tgid: u32) -> bool {
    unsafe { VMM_TGIDS.get(tgid).is_some() }
}

/// New VMs and vCPUs, for the daemon to name while they exist.
#[map]
static VM_NOTICES: RingBuf = RingBuf::with_byte_size(NOTICE_BYTES, 0);

#[inline(always)]
pub fn notify(kind: NoticeKind, tgid: u32, tid: u32, fd: u32) {
    let n = Notice {
        kind: kind as u32,
        tgid,
        tid,
        fd,
    };
    if VM_NOTICES.output::<Notice>(&n, 0).is_err() {
        count_map(MapCounter::NoticesFull);
    }
}

/// A new VMM (rare): it joins the set and the daemon is told. With the set full it is counted
/// instead, and no notice is sent (its every event would send one); it is named when read.
#[inline(always)]
pub fn vm_created(tgid: u32, tid: u32) {
    if VMM_TGIDS.insert(tgid, 1, 0).is_err() {
        count_map(MapCounter::VmmSetFull);
        return;
    }
    notify(NoticeKind::VmCreated, tgid, tid, 0);
}

/// A KVM event in a thread of `tgid`: only VMM threads run them, so a VMM not yet known (its
/// KVM_CREATE_VM not seen: no syscall tracepoint attached, or before the daemon) joins the set
/// and the daemon is told. One lookup when it is known.
#[inline(always)]
pub fn vmm_seen(tgid: u32, tid: u32) {
    if !is_vmm(tgid) {
        vm_created(tgid, tid);
    }
}

/// The VMM whose memory the current task works in, when that is a known VMM's: a kernel thread
/// that adopted its mm (the vhost worker before Linux 6.4, `vhost-PID`, is outside the VMM's
/// thread group). Only for tasks that are no VMM themselves; a few reads, no map.
#[inline(always)]
pub fn mm_owner_vmm() -> Option<u32> {
    mm_owner_tgid().filter(|&t| is_vmm(t))
}

/// The thread group that owns the current task's memory (`current->mm->owner`), known VMM or
/// not: a VMM's own thread finds its own tgid; a kernel thread that adopted a VMM's mm finds the
/// VMM's.
#[inline(always)]
pub fn mm_owner_tgid() -> Option<u32> {
    let (mm_off, owner_off, tgid_off) = (config!(task_mm), config!(mm_owner), config!(task_tgid));
    if mm_off == NO_OFFSET || owner_off == NO_OFFSET || tgid_off == NO_OFFSET {
        return None;
    }
    // SAFETY: the loads go through bpf_probe_read_kernel; a null or stale pointer fails them.
    let tgid = unsafe {
        let task = bpf_get_current_task_btf() as u64;
        let mm: u64 = read_at(task, mm_off).ok()?;
        if mm == 0 {
            return None;
        }
        let owner: u64 = read_at(mm, owner_off).ok()?;
        if owner == 0 {
            return None;
        }
        read_at::<i32>(owner, tgid_off).ok()? as u32
    };
    Some(tgid)
}

/// tgid and tid of the current task.
#[inline(always)]
pub fn current_tgid_tid() -> (u32, u32) {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Reads a `T` at `base + off` in kernel memory (an offset found in BTF).
#[inline(always)]
pub unsafe fn read_at<T>(base: u64, off: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// A typed pointer's value as a plain number. The verifier refuses arithmetic other than
/// add/sub on a pointer (the slot hashes shift and multiply); what comes back out of a map
/// value is a number to it (storing a kernel pointer there needs CAP_PERFMON, as everything
/// here does).
#[map]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn number(p: *const u8) -> Option<u64> {
    let slot = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's own slot of a map value; the program is not preempted mid-way.
    unsafe {
        core::ptr::write_volatile(slot as *mut *const u8, p);
        Some(core::ptr::read_volatile(slot))
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() }
}

/// True when the event fired in task context: its argument array lies on the current task's
/// kernel stack, as the kernel's object_is_on_stack() asks. Hard and soft interrupts run on the
/// per-CPU IRQ stack (x86-64, arm64), where `current` is only the task they interrupted;
/// except that x86-64 runs a hardirq that interrupted user mode on the task's own, then empty,
/// stack: task context here (the VFIO handler's bracket covers its own injections).
/// (The program's own frame would not do: since Linux 6.13 a program with a deep stack runs on
/// a private per-CPU one.) A classic tracepoint's record, or offsets unknown: task context is
/// assumed. BPF_PROG_TEST_RUN passes a heap copy of the arguments: never task context.
///
/// Cheap, as it runs for every injection: `current->stack` is one load through the task's BTF
/// pointer (the offset is a constant to the verifier: CONFIG is frozen), and the argument
/// pointer is compared as it is (CAP_PERFMON lets the verifier allow that).
#[inline(always)]
pub fn in_task(site: Site) -> bool {
    let Site::Args(args) = site else {
        return true;
    };
    let (off, size) = (config!(task_stack), config!(thread_size));
    if off == NO_OFFSET || size == 0 {
        return true;
    }
    // SAFETY: the verifier checks the load against task_struct's BTF layout.
    let stack = unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        core::ptr::read_volatile(task.add(off as usize) as *const u64)
    };
    let at = args as u64;
    at >= stack && at < stack + size as u64
}
