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

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use tracer_common::{
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

/// A backend's CPU time and packets since its first thread was seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub cpu_ns: u64,
    /// Packets moved since then.
    pub packets: u64,
    /// The key's packet count when it was first seen.
    base: u64,
}

/// The backends' threads, and what each backend cost so far.
#[derive(Debug, Default)]
pub struct Backends {
    /// tid -> its backend and its CPU time at the last read.
    threads: BTreeMap<u32, (BackendKey, u64)>,
    /// Threads NET_RX_BATCH still holds whose CPU time could not be read (gone): known, so
    /// that their entries do not make every look read the counts again.
    unreadable: BTreeSet<u32>,
    costs: BTreeMap<BackendKey, Cost>,
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

impl Backends {
    /// One read: `threads` the backend threads now (tid, backend), `snap` the counts read with
    /// them, `cpu` a thread's CPU time.
    pub fn update(
        &mut self,
        threads: impl IntoIterator<Item = (u32, BackendKey)>,
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
            let cost = self.costs.entry(key).or_insert_with(|| Cost {
                base: packets(snap, &key),
                ..Cost::default()
            });
            // A thread seen before, serving the same backend: its CPU time since. A new one (or
            // a reused thread id) starts from now.
            if let Some((k, last)) = self.threads.get(&tid)
                && *k == key
            {
                cost.cpu_ns += now.saturating_sub(*last);
            }
            seen.insert(tid, (key, now));
        }
        self.threads = seen;
        self.unreadable = unreadable;
        for (key, cost) in &mut self.costs {
            cost.packets = packets(snap, key).saturating_sub(cost.base);
        }
    }

    /// Whether a read has seen thread `tid` (the daemon reads again when a new one appears, so
    /// that its start is close to its first packet).
    pub fn knows(&self, tid: u32) -> bool {
        self.threads.contains_key(&tid) || self.unreadable.contains(&tid)
    }

    pub fn costs(&self) -> impl Iterator<Item = (&BackendKey, &Cost)> {
        self.costs.iter()
    }

    /// Forgets the backends of a collected VM or tap.
    pub fn forget(&mut self, gone: impl Fn(&BackendKey) -> bool) {
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
        let mut b = Backends::default();
        // First seen with 10 packets moved and 5 ms on CPU: neither counts.
        b.update([(42, KEY)], &snap(6, 4), |_| Some(5_000_000));
        assert_eq!(b.costs().next().unwrap().1.packets, 0);
        b.update([(42, KEY)], &snap(106, 104), |_| Some(25_000_000));
        let (_, c) = b.costs().next().unwrap();
        assert_eq!((c.cpu_ns, c.packets), (20_000_000, 200));
    }

    #[test]
    fn a_gone_or_reused_thread_adds_nothing_wrong() {
        let mut b = Backends::default();
        b.update([(42, KEY)], &snap(0, 0), |_| Some(5_000_000));
        // Gone at this read.
        b.update([(42, KEY)], &snap(10, 0), |_| None);
        // Its id reused by a thread with less CPU time: a new start, not a negative delta.
        b.update([(42, KEY)], &snap(20, 0), |_| Some(1_000));
        b.update([(42, KEY)], &snap(30, 0), |_| Some(3_000));
        let (_, c) = b.costs().next().unwrap();
        assert_eq!((c.cpu_ns, c.packets), (2_000, 30));
        b.forget(|k| k.vm == 100);
        assert!(b.costs().next().is_none());
    }

    #[test]
    fn a_thread_whose_time_cannot_be_read_is_known_until_its_entry_goes() {
        let mut b = Backends::default();
        b.update([(42, KEY)], &snap(0, 0), |_| None);
        // known: the daemon's look for new threads does not read the counts again for it
        assert!(b.knows(42));
        b.update([], &snap(0, 0), |_| None);
        assert!(!b.knows(42));
    }
}
