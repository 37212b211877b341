//! Maps and helpers every path uses: the histogram, the drop counters, the load-time config.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
};
use tracer_common::{
    config::Config,
    hist::bucket_index,
    maps::{COUNTERS_LEN, Counter, HIST_ENTRIES, HistKey, HistVal, VMM_ENTRIES, counter_index},
    rules::Starts,
    stage::StageId,
};

const BPF_NOEXIST: u64 = 1;

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

#[map]
static HIST: PerCpuHashMap<HistKey, HistVal> = PerCpuHashMap::with_max_entries(HIST_ENTRIES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[inline(always)]
pub fn count(stage: StageId, c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter_index(stage, c)) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *p += 1 };
    }
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

/// Counts one latency sample of `stage` into the histogram.
#[inline(always)]
pub fn record(stage: StageId, detail: u32, obj: u32, vm: u32, ns: u64) {
    let key = HistKey {
        stage: stage as u16,
        bucket: bucket_index(ns),
        detail,
        obj,
        vm,
    };
    if add(&key, ns) {
        return;
    }
    let first = HistVal {
        count: 1,
        sum_ns: ns,
    };
    if HIST.insert(&key, &first, BPF_NOEXIST).is_ok() {
        return;
    }
    // Either another CPU created the key first (then it is there now) or the map is full.
    if !add(&key, ns) {
        count(stage, Counter::HistFull);
    }
}

/// [`Starts`] over a kernel hash map of started events.
pub struct KernelStarts<K: 'static, V: 'static>(pub &'static HashMap<K, V>);

impl<K, V: Copy> Starts<K, V> for KernelStarts<K, V> {
    #[inline(always)]
    fn put(&mut self, k: K, v: V) -> bool {
        self.0.insert(&k, &v, 0).is_ok()
    }

    #[inline(always)]
    fn take(&mut self, k: &K) -> Option<V> {
        let v = unsafe { *self.0.get_ptr(k)? };
        let _ = self.0.remove(k);
        Some(v)
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
    fn take(&mut self, k: &K) -> Option<V> {
        self.get(k)
    }

    #[inline(always)]
    fn get(&self, _: &K) -> Option<V> {
        self.0.get(0).copied()
    }
}

/// Thread groups known to run VMs (they issued KVM_CREATE_VM; the daemon seeds the ones that
/// existed before it started and removes the ones that exited). System calls of other processes
/// are ignored at the cost of one lookup.
#[map]
pub static VMM_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(VMM_ENTRIES, 0);

#[inline(always)]
pub fn is_vmm(tgid: u32) -> bool {
    unsafe { VMM_TGIDS.get(&tgid).is_some() }
}

/// On KVM_CREATE_VM (rare). A full map leaves that VM's irqfd writes unseen: counted.
#[inline(always)]
pub fn mark_vmm(tgid: u32) {
    if VMM_TGIDS.insert(&tgid, &1, 0).is_err() {
        count(StageId::KvmSignalToInject, Counter::StartFull);
    }
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
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((base + off as u64) as *const T) }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() }
}
