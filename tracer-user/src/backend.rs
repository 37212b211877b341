//! What a network backend costs: the on-CPU time of the threads that take a tap's packets
//! (QEMU's thread, a vhost worker) against the packets they moved, per VM, backend and tap. The
//! packets per second one such thread could move at that cost, rate(packets) / rate(CPU
//! seconds), is the host-side ceiling of the paravirtual path, the figure to set against
//! passthrough.
//!
//! The threads are those NET_RX_BATCH holds (each that took a packet off a tap), and their CPU
//! time the kernel's own accounting (`/proc/TID/schedstat`): no program on the host's context
//! switches. The packets are the key's `net.rx.backend_queue` samples (taken off the tap) and
//! its tap's `net.tx.host_stack` samples (written to it and sent on an uplink). Both count from
//! the read that first saw the thread, not before (its CPU time until then went to other work).
//!
//! A disk's backend likewise: the threads of a VMM that submit its requests (QEMU's workers, an
//! iothread, an io_uring or AIO submitter; `BLK_THREADS`) against the requests (`blk.device`
//! samples of that VM and disk): requests / CPU seconds is the IOPS one such thread could
//! sustain, the figure behind "the paravirtual path tops out at N IOPS here".

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use tracer_common::{
    blk::vm::DiskKey,
    net::{Backend, backend_to_irq::Batch},
    stage::StageId,
};

use crate::hist::Snapshot;

/// A backend: the VMM, [`tracer_common::net::Backend`], and the tap (ifindex) it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendKey {
    pub vm: u32,
    pub backend: u32,
    pub tap: u32,
}

/// What a backend did: a network backend's packets, a disk backend's requests.
pub trait Work: Copy + Ord {
    /// Its work so far, as the histograms counted it.
    fn done(&self, snap: &Snapshot) -> u64;
}

impl Work for BackendKey {
    fn done(&self, snap: &Snapshot) -> u64 {
        packets(snap, self)
    }
}

impl Work for DiskKey {
    /// Requests of the VM to the disk: its `blk.device` samples, every op.
    fn done(&self, snap: &Snapshot) -> u64 {
        snap.series
            .iter()
            .filter(|(k, _)| k.stage == StageId::BlkDevice && k.vm == self.vm && k.obj == self.dev)
            .map(|(_, s)| s.count())
            .sum()
    }
}

/// A backend's CPU time and work (packets, requests) since its first thread was seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub cpu_ns: u64,
    /// Packets moved, or requests served, since then.
    pub done: u64,
    /// The key's count when it was first seen.
    base: u64,
}

/// The backends' threads, and what each backend cost so far.
#[derive(Debug)]
pub struct Backends<K> {
    /// tid -> its backend and its CPU time at the last read.
    threads: BTreeMap<u32, (K, u64)>,
    /// Threads the kernel map still holds whose CPU time could not be read (gone): known, so
    /// that their entries do not make every look read the counts again.
    unreadable: BTreeSet<u32>,
    costs: BTreeMap<K, Cost>,
}

impl<K> Default for Backends<K> {
    fn default() -> Self {
        Backends {
            threads: BTreeMap::new(),
            unreadable: BTreeSet::new(),
            costs: BTreeMap::new(),
        }
    }
}

/// The backend of a [`tracer_common::net::queue_detail`], without its queue.
fn backend_of(detail: u32) -> u32 {
    Backend::from_u32(detail) as u32
}

/// Packets the backend moved, as the histograms counted them so far.
fn packets(snap: &Snapshot, key: &BackendKey) -> u64 {
    snap.series
        .iter()
        .filter(|(k, _)| match k.stage {
            StageId::NetRxBackendQueue => {
                // Every queue of the tap this backend reads.
                k.vm == key.vm && backend_of(k.detail) == key.backend && k.obj == key.tap
            }
            StageId::NetTxHostStack => k.obj == key.tap,
            _ => false,
        })
        .map(|(_, s)| s.count())
        .sum()
}

/// A thread's time on CPU so far, in ns (the first field of `/proc/TID/schedstat`); None when
/// it is gone.
pub fn schedstat_ns(tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The backend threads NET_RX_BATCH holds now: (tid, its backend).
pub fn threads(ebpf: &Ebpf) -> Vec<(u32, BackendKey)> {
    let Some(Ok(map)) = ebpf
        .map("NET_RX_BATCH")
        .map(BpfHashMap::<&MapData, u32, Batch>::try_from)
    else {
        return Vec::new();
    };
    map.iter()
        .flatten()
        .map(|(tid, b)| {
            let key = BackendKey {
                vm: b.vm,
                backend: backend_of(b.backend),
                tap: b.tap,
            };
            (tid, key)
        })
        .collect()
}

/// The VMMs' threads that submit disk requests now: (tid, its VM and disk).
pub fn disk_threads(ebpf: &Ebpf) -> Vec<(u32, DiskKey)> {
    let Some(Ok(map)) = ebpf
        .map("BLK_THREADS")
        .map(BpfHashMap::<&MapData, u32, DiskKey>::try_from)
    else {
        return Vec::new();
    };
    map.iter().flatten().collect()
}

/// Removes gone threads from `BLK_THREADS` (a VMM's pool recycles its workers).
pub fn forget_disk_threads(ebpf: &mut Ebpf, gone: &BTreeSet<u32>) {
    if gone.is_empty() {
        return;
    }
    if let Some(Ok(mut map)) = ebpf
        .map_mut("BLK_THREADS")
        .map(BpfHashMap::<&mut MapData, u32, DiskKey>::try_from)
    {
        for tid in gone {
            let _ = map.remove(tid);
        }
    }
}

impl<K: Work> Backends<K> {
    /// One read: `threads` the backend threads now (tid, backend), `snap` the counts read with
    /// them, `cpu` a thread's CPU time.
    pub fn update(
        &mut self,
        threads: impl IntoIterator<Item = (u32, K)>,
        snap: &Snapshot,
        cpu: impl Fn(u32) -> Option<u64>,
    ) {
        let mut seen = BTreeMap::new();
        let mut unreadable = BTreeSet::new();
        for (tid, key) in threads {
            let Some(now) = cpu(tid) else {
                unreadable.insert(tid);
                continue;
            };
            self.costs.entry(key).or_insert_with(|| Cost {
                base: key.done(snap),
                ..Cost::default()
            });
            // A thread seen before: its CPU time since, to the backend it served then (a pool
            // thread that moved to another disk of the VM served the first one until it
            // moved, as far as a read can tell). A new one (or a reused thread id, whose time
            // starts lower) starts from now.
            if let Some((k, last)) = self.threads.get(&tid)
                && let Some(cost) = self.costs.get_mut(k)
            {
                cost.cpu_ns += now.saturating_sub(*last);
            }
            seen.insert(tid, (key, now));
        }
        self.threads = seen;
        self.unreadable = unreadable;
        for (key, cost) in &mut self.costs {
            cost.done = key.done(snap).saturating_sub(cost.base);
        }
    }

    /// Whether a read has seen thread `tid` (the daemon reads again when a new one appears, so
    /// that its start is close to its first packet).
    pub fn knows(&self, tid: u32) -> bool {
        self.threads.contains_key(&tid) || self.unreadable.contains(&tid)
    }

    /// Threads whose CPU time could not be read at the last update (gone).
    pub fn unreadable(&self) -> &BTreeSet<u32> {
        &self.unreadable
    }

    pub fn costs(&self) -> impl Iterator<Item = (&K, &Cost)> {
        self.costs.iter()
    }

    /// Forgets the backends of a collected VM or device.
    pub fn forget(&mut self, gone: impl Fn(&K) -> bool) {
        self.costs.retain(|k, _| !gone(k));
        self.threads.retain(|_, (k, _)| !gone(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::net::queue_detail;

    use crate::hist::{Series, SeriesKey};

    fn snap(rx: u64, tx: u64) -> Snapshot {
        let mut s = Snapshot::default();
        let mut series = |stage, detail, obj, vm, n| {
            let mut x = Series::default();
            x.buckets[3] = n;
            s.series.insert(
                SeriesKey {
                    stage,
                    detail,
                    obj,
                    vm,
                },
                x,
            );
        };
        // The backend's packets over two queues of its tap (the queue in the detail's high
        // half), and another backend's on the same tap.
        let (qemu, vhost) = (Backend::Qemu as u32, Backend::Vhost as u32);
        series(
            StageId::NetRxBackendQueue,
            queue_detail(qemu, 1),
            7,
            100,
            rx / 2,
        );
        series(
            StageId::NetRxBackendQueue,
            queue_detail(qemu, 2),
            7,
            100,
            rx - rx / 2,
        );
        series(
            StageId::NetRxBackendQueue,
            queue_detail(vhost, 1),
            7,
            100,
            500,
        );
        series(StageId::NetTxHostStack, 2, 7, 0, tx);
        // Another tap's: not this backend's.
        series(StageId::NetTxHostStack, 2, 8, 0, 1000);
        s
    }

    const KEY: BackendKey = BackendKey {
        vm: 100,
        backend: 0,
        tap: 7,
    };

    #[test]
    fn cost_counts_from_the_first_read_of_a_thread() {
        let mut b = Backends::<BackendKey>::default();
        // First seen with 10 packets moved and 5 ms on CPU: neither counts.
        b.update([(42, KEY)], &snap(6, 4), |_| Some(5_000_000));
        assert_eq!(b.costs().next().unwrap().1.done, 0);
        b.update([(42, KEY)], &snap(106, 104), |_| Some(25_000_000));
        let (_, c) = b.costs().next().unwrap();
        assert_eq!((c.cpu_ns, c.done), (20_000_000, 200));
    }

    #[test]
    fn a_gone_or_reused_thread_adds_nothing_wrong() {
        let mut b = Backends::<BackendKey>::default();
        b.update([(42, KEY)], &snap(0, 0), |_| Some(5_000_000));
        // Gone at this read.
        b.update([(42, KEY)], &snap(10, 0), |_| None);
        // Its id reused by a thread with less CPU time: a new start, not a negative delta.
        b.update([(42, KEY)], &snap(20, 0), |_| Some(1_000));
        b.update([(42, KEY)], &snap(30, 0), |_| Some(3_000));
        let (_, c) = b.costs().next().unwrap();
        assert_eq!((c.cpu_ns, c.done), (2_000, 30));
        b.forget(|k| k.vm == 100);
        assert!(b.costs().next().is_none());
    }

    #[test]
    fn a_thread_whose_time_cannot_be_read_is_known_until_its_entry_goes() {
        let mut b = Backends::<BackendKey>::default();
        b.update([(42, KEY)], &snap(0, 0), |_| None);
        // known: the daemon's look for new threads does not read the counts again for it
        assert!(b.knows(42));
        b.update([], &snap(0, 0), |_| None);
        assert!(!b.knows(42));
    }
}
