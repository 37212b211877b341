//! A running tracer and what reading it needs: the attached programs, the notices that name new
//! VMs and vCPUs, label resolution, snapshots of the kernel's counts and the collection of what
//! is gone. Shared by `serve` and `record`.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracer_common::{
    blk::vm::DiskKey,
    maps::{Notice, Sample},
    stage::StageId,
};

use crate::{
    attach::{self, Tracer},
    backend::{self, Backends},
    export::{Exposition, ProgramStats, Status},
    gc::{self, Collector},
    hist::{Layout, ReadError, Series, SeriesKey, Snapshot, Summary},
    labels::Labeler,
    maps::{self, Owner},
    netdevs,
    stages::{self, Stage},
    sys,
};

#[derive(Clone, Debug)]
pub struct Options<'a> {
    pub attach: attach::Options<'a>,
    /// How long an exited VM's (or removed device's) series stay exported.
    pub vm_grace: Duration,
    /// Buckets of the classic exposition.
    pub layout: Layout,
    /// Keep what is collected in the report (`record`: a VM that exited early is still in it).
    pub keep_collected: bool,
    /// Name prefixes of IRQs `vfio.handler` follows besides vfio-pci's (`--vfio-irqs`).
    pub vfio_irqs: &'a [String],
}

/// Label names and values of a series, in the stage table's order.
pub type Labels = Vec<(&'static str, String)>;

/// One exported series: a stage, its labels, and the sum of every kernel series whose labels
/// came out the same (a VM restarted under one name, vCPUs that could not be resolved).
#[derive(Clone, Debug)]
pub struct Labelled {
    pub stage: &'static Stage,
    pub labels: Labels,
    pub series: Series,
}

pub struct Session {
    pub tracer: Tracer,
    pub labeler: Labeler,
    pub layout: Layout,
    /// What the kernel had counted when the session started.
    base: Snapshot,
    last: Snapshot,
    /// Collected kernel series, by labels: (counts, counts when the session started). Added
    /// to the live series they merge with, so a merged series never goes down when one of its
    /// VMs is collected (a counter that went down would read as a reset). Kept whole for a
    /// report (`record`), dropped with the last live series of its labels otherwise.
    retired: BTreeMap<(StageId, Labels), (Series, Series)>,
    keep_retired: bool,
    collector: Collector,
    notices: Option<RingBuf<MapData>>,
    /// The sampled events' ring (`timeline`), and the timelines made of them.
    timeline_ring: Option<RingBuf<MapData>>,
    pub timelines: crate::timeline::Store,
    bpf_stats: bool,
    /// Reads of the kernel's counts (scrapes that shared one read count once).
    reads: u64,
    /// VMs and devices collected so far.
    pub collected: Collections,
    /// What the network backends' threads cost.
    pub backends: Backends<backend::BackendKey>,
    /// What the threads that submit each VM's disk requests cost.
    pub disks: Backends<DiskKey>,
    /// The IRQs `vfio.handler` follows.
    vfio: crate::vfio_irqs::Watch,
    /// /proc/interrupts' posted-interrupt events when the session started.
    pub posted_events_base: Vec<(&'static str, u64)>,
    /// When its base counts were read: a report's window starts there.
    pub started: std::time::SystemTime,
}

/// How many VMs and devices (block devices and taps) a session has collected.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Collections {
    pub vms: usize,
    pub devices: usize,
}

impl Session {
    pub fn start(opts: &Options) -> anyhow::Result<Session> {
        let mut tracer = Tracer::start(&opts.attach)?;
        let mut labeler = Labeler::new(&tracer.tracefs);
        // VMs older than the session: named now, while they run.
        for &tgid in &tracer.seeded {
            labeler.vm(tgid);
        }
        let notices = tracer
            .ebpf
            .take_map("VM_NOTICES")
            .and_then(|m| RingBuf::try_from(m).ok());
        let timeline_ring = tracer
            .ebpf
            .take_map("TIMELINES")
            .and_then(|m| RingBuf::try_from(m).ok());
        let base = Snapshot::read(&tracer.ebpf)?;
        let started = std::time::SystemTime::now();
        let mut session = Session {
            started,
            tracer,
            labeler,
            layout: opts.layout.clone(),
            last: base.clone(),
            base,
            retired: BTreeMap::new(),
            keep_retired: opts.keep_collected,
            collector: Collector::new(opts.vm_grace),
            notices,
            timeline_ring,
            timelines: Default::default(),
            bpf_stats: opts.attach.bpf_stats,
            reads: 0,
            collected: Collections::default(),
            backends: Backends::default(),
            disks: Backends::default(),
            vfio: crate::vfio_irqs::Watch::new(opts.vfio_irqs.to_vec()),
            posted_events_base: crate::vfio_irqs::posted_host_events(
                &std::fs::read_to_string("/proc/interrupts").unwrap_or_default(),
            ),
        };
        session.sync_netdevs();
        session.watch_vfio_irqs();
        Ok(session)
    }

    /// Tells the net programs which devices are taps and uplinks (sysfs, now), and names them.
    pub fn sync_netdevs(&mut self) {
        let devs = netdevs::scan(std::path::Path::new("/sys/class/net"));
        netdevs::sync(&mut self.tracer.ebpf, &devs);
        // The ifindexes series are labelled by: the tap (obj), and host_stack's uplink (detail;
        // the backend stages' detail is their backend and queue).
        let in_use = self
            .last
            .series
            .keys()
            .filter(|k| Owner::of_series(k.stage as u16, k.obj, k.vm).netdev != 0)
            .flat_map(|k| {
                let host = matches!(k.stage, StageId::NetRxHostStack | StageId::NetTxHostStack);
                [Some(k.obj), host.then_some(k.detail)]
            })
            .flatten()
            .collect();
        self.labeler.netdevs(&devs, &in_use);
    }

    /// Readiness of the notice ring buffer, to wait on: its own duplicate of the ring's fd,
    /// so it stays valid whatever the session does with the ring.
    pub fn notice_waiter(&self) -> std::io::Result<Option<AsyncFd<OwnedFd>>> {
        let Some(ring) = &self.notices else {
            return Ok(None);
        };
        let fd = ring.as_fd().try_clone_to_owned()?;
        // SAFETY: the AsyncFd owns `fd`, which stays open as long as it is registered.
        let waiter = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(Some(waiter))
    }

    /// Names the VMs and vCPUs the kernel told of since the last call.
    pub fn drain_notices(&mut self) -> usize {
        let Some(ring) = self.notices.as_mut() else {
            return 0;
        };
        let mut n = 0;
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<Notice>() {
                // SAFETY: the programs write whole Notices; read unaligned from the ring.
                let notice = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Notice) };
                self.labeler.notice(&notice);
                n += 1;
            }
        }
        n
    }

    /// Reads the sampled events off their ring into the timelines; how many.
    pub fn drain_timelines(&mut self) -> usize {
        let Some(ring) = self.timeline_ring.as_mut() else {
            return 0;
        };
        let mut samples = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<Sample>() {
                // SAFETY: the programs write whole Samples; read unaligned from the ring.
                samples.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Sample) });
            }
        }
        let n = samples.len();
        self.timelines.sync_clocks();
        self.timelines.add(samples);
        n
    }

    /// A timeline as shown (its series labelled).
    pub fn shown(&mut self, t: &crate::timeline::Trace) -> crate::timeline::Shown {
        let labeler = &mut self.labeler;
        crate::timeline::shown(&self.timelines, t, |k| labeler.labels(k))
    }

    /// The slowest kept timelines of two stages or more, as shown.
    pub fn slowest_timelines(&mut self, n: usize) -> Vec<crate::timeline::Shown> {
        let traces: Vec<_> = self.timelines.slowest(n).into_iter().cloned().collect();
        traces.iter().map(|t| self.shown(t)).collect()
    }

    /// Reads the kernel's counts.
    pub fn refresh(&mut self) -> Result<(), ReadError> {
        self.drain_notices();
        self.drain_timelines();
        self.last = Snapshot::read(&self.tracer.ebpf)?;
        self.backends.update(
            backend::threads(&self.tracer.ebpf),
            &self.last,
            backend::schedstat_ns,
        );
        self.disks.update(
            backend::disk_threads(&self.tracer.ebpf),
            &self.last,
            backend::schedstat_ns,
        );
        backend::forget_disk_threads(&mut self.tracer.ebpf, self.disks.unreadable());
        self.reads += 1;
        Ok(())
    }

    /// What every reader does once a second: new backend threads (the error is theirs),
    /// the disks' notify addresses and vectors, the VFIO IRQs.
    pub fn watch(&mut self) -> Result<(), ReadError> {
        let backends = self.watch_backends();
        self.learn_signals();
        self.watch_vfio_irqs();
        backends
    }

    /// Reads the counts when a backend thread appeared since the last read, so that its cost
    /// counts from close to its first packet, scraped or not (`backend`).
    pub fn watch_backends(&mut self) -> Result<(), ReadError> {
        let threads = backend::threads(&self.tracer.ebpf);
        let disk_threads = backend::disk_threads(&self.tracer.ebpf);
        if threads.iter().any(|(tid, _)| !self.backends.knows(*tid))
            || disk_threads.iter().any(|(tid, _)| !self.disks.knows(*tid))
        {
            self.refresh()?;
        }
        Ok(())
    }

    /// Learns which notify addresses and vectors are which disk's (`learn`): every second, so
    /// that a new disk measures from its first few requests.
    pub fn learn_signals(&mut self) {
        for l in crate::learn::learn(&mut self.tracer.ebpf) {
            let what = if l.kind == tracer_common::blk::vm::kind::NOTIFY {
                "a notify address"
            } else {
                "a vector"
            };
            log::info!("learned: VMM {} has {what} of disk {:#x}", l.vm, l.dev);
        }
    }

    /// Follows the IRQs of VFIO devices (and those `--vfio-irqs` names) as they come and go:
    /// every second, with the learning.
    pub fn watch_vfio_irqs(&mut self) {
        let on = self
            .tracer
            .report
            .iter()
            .any(|r| r.attached && crate::stages::vfio_stage_names().contains(&r.stage));
        if on {
            self.vfio.update(&mut self.tracer.ebpf);
        }
    }

    /// Each followed VFIO IRQ that KVM spoke of (kvm:kvm_pi_irte_update), as labels (vm,
    /// device, vector) and whether it is posted now.
    pub fn posted_irqs(&mut self) -> Vec<(Vec<(&'static str, String)>, bool)> {
        self.vfio
            .posted(&self.tracer.ebpf)
            .into_iter()
            .map(|(v, p)| {
                let labels = vec![
                    ("vm", self.labeler.vm(v.vm)),
                    ("device", crate::labels::pci_name(v.dev)),
                    ("vector", v.vector.to_string()),
                ];
                (labels, p.set != 0)
            })
            .collect()
    }

    /// Collects what has been gone for the grace period: kernel entries, series, labels. Runs
    /// on a timer, scraped or not; when something goes, the counts are read afresh first, so
    /// what is kept under its labels is all the kernel counted for it.
    pub fn collect(&mut self) -> Result<gc::Collected, ReadError> {
        self.drain_notices();
        self.sync_netdevs();
        let mut dead = self.collector.find_dead(&self.tracer.ebpf, Instant::now());
        if dead.is_empty() {
            return Ok(dead);
        }
        self.refresh()?;
        let gone = |k: &SeriesKey| dead.owns(Owner::of_series(k.stage as u16, k.obj, k.vm));
        // Their counts stay under their labels (named while the cache still has them).
        let doomed: Vec<SeriesKey> = self
            .last
            .series
            .keys()
            .filter(|k| gone(k))
            .copied()
            .collect();
        for k in doomed {
            let labels = self.labeler.labels(&k);
            let (total, at_start) = self.retired.entry((k.stage, labels)).or_default();
            total.add(&self.last.series[&k]);
            if let Some(b) = self.base.series.get(&k) {
                at_start.add(b);
            }
        }
        self.last.forget(gone);
        self.base.forget(gone);
        self.timelines.forget(gone);
        Collector::remove(&mut self.tracer.ebpf, &mut dead);
        self.backends
            .forget(|k| dead.vms.contains(&k.vm) || dead.netdevs.contains(&k.tap));
        self.disks
            .forget(|k| dead.vms.contains(&k.vm) || dead.devices.contains(&k.dev));
        for &vm in &dead.vms {
            self.labeler.forget_vm(vm);
        }
        for &dev in &dead.devices {
            self.labeler.forget_disk(dev);
        }
        for &ifindex in &dead.netdevs {
            self.labeler.forget_netdev(ifindex);
        }
        if !self.keep_retired {
            // A kept count goes with the last live series of its labels.
            let live: std::collections::BTreeSet<(StageId, Labels)> = self
                .last
                .series
                .keys()
                .map(|k| (k.stage, self.labeler.labels(k)))
                .collect();
            self.retired.retain(|key, _| live.contains(key));
        }
        self.collected.vms += dead.vms.len();
        self.collected.devices += dead.devices.len() + dead.netdevs.len();
        Ok(dead)
    }

    /// The last snapshot's series (since the session started with `since_start`, else all the
    /// kernel counted), labelled, with equal label sets merged.
    pub fn labelled(&mut self, since_start: bool) -> Vec<Labelled> {
        let since;
        let snap = if since_start {
            since = self.last.since(&self.base);
            &since
        } else {
            &self.last
        };
        let mut merged: BTreeMap<(StageId, Labels), Series> = BTreeMap::new();
        for (key, series) in &snap.series {
            let labels = self.labeler.labels(key);
            merged.entry((key.stage, labels)).or_default().add(series);
        }
        for (key, (total, at_start)) in &self.retired {
            let counts = if since_start {
                total.since(Some(at_start))
            } else {
                total.clone()
            };
            match merged.get_mut(key) {
                Some(live) => live.add(&counts),
                None => {
                    merged.insert(key.clone(), counts);
                }
            }
        }
        merged
            .into_iter()
            .map(|((stage, labels), series)| Labelled {
                stage: stages::stage(stage),
                labels,
                series,
            })
            .collect()
    }

    /// Events of every stage since the session started, as of the last read (a recording's
    /// progress).
    pub fn events_since_start(&self) -> u64 {
        let live: u64 = self
            .last
            .since(&self.base)
            .series
            .values()
            .map(Series::count)
            .sum();
        let retired: u64 = self
            .retired
            .values()
            .map(|(total, at_start)| total.since(Some(at_start)).count())
            .sum();
        live + retired
    }

    /// Quantiles of what happened since the session started, one row per label set.
    pub fn summaries(&mut self) -> Vec<(Labelled, Summary)> {
        self.labelled(true)
            .into_iter()
            .map(|l| {
                let s = l.series.summary();
                (l, s)
            })
            .collect()
    }

    /// Dropped events since the session started, by stage and reason.
    pub fn dropped_since_start(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.last
            .since(&self.base)
            .counters
            .iter()
            .map(|((s, r), n)| (stages::stage(*s).name, *r, *n))
            .collect()
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.tracer
            .programs()
            .filter_map(|name| {
                let p = self.tracer.ebpf.program(name)?;
                let i = p.info().ok()?;
                let misses = p
                    .fd()
                    .ok()
                    .and_then(|fd| {
                        use std::os::fd::AsFd as _;
                        sys::recursion_misses(fd.as_fd()).ok()
                    })
                    .unwrap_or(0);
                Some(ProgramStats {
                    program: name.to_string(),
                    run_time: i.run_time(),
                    run_count: i.run_count(),
                    recursion_misses: misses,
                })
            })
            .collect()
    }

    pub fn bpf_stats_enabled(&self) -> bool {
        self.bpf_stats
            || fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                .is_ok_and(|v| v.trim() == "1")
    }

    /// Entries of every growing kernel map (HIST's from the last snapshot).
    pub fn map_entries(&self) -> Vec<(&'static str, usize)> {
        maps::all()
            .into_iter()
            .map(|m| {
                let n = if m.name == maps::HIST.name {
                    self.last.hist_entries
                } else {
                    m.len(&self.tracer.ebpf)
                };
                (m.name, n)
            })
            .collect()
    }

    /// What a scrape shows, from the last refresh. Counters are the kernel's totals (this
    /// session loaded its own maps, so they start at zero with it).
    pub fn exposition(&mut self) -> Exposition {
        let series = self.labelled(false);
        let programs = self.program_stats();
        let dropped: Vec<_> = self
            .last
            .counters
            .iter()
            .map(|((s, r), n)| (stages::stage(*s).name, *r, *n))
            .collect();
        let map_full: Vec<_> = self.last.map_full.iter().map(|(m, n)| (*m, *n)).collect();
        let map_entries = self.map_entries();
        let backends: Vec<_> = self
            .backends
            .costs()
            .map(|(k, c)| (self.labeler.backend(k.vm, k.backend, k.tap), *c))
            .collect();
        let disks: Vec<_> = self
            .disks
            .costs()
            .map(|(k, c)| (self.labeler.disk_backend(k.vm, k.dev), *c))
            .collect();
        let posted = self.posted_irqs();
        let pi_events = crate::vfio_irqs::posted_host_events(
            &std::fs::read_to_string("/proc/interrupts").unwrap_or_default(),
        );
        // Each series' sampled events (`timeline`), under the labels its series has.
        let mut sampled = crate::export::SampledBySeries::new();
        for ((key, bucket), e) in &self.timelines.exemplars {
            let labels = self.labeler.labels(key);
            let unix_ns = self.timelines.unix_ns_of(e.end_ns);
            sampled
                .entry((key.stage, labels))
                .or_default()
                .push((*bucket, e.trace, e.seconds, unix_ns));
        }
        Exposition::gather(
            &series,
            &sampled,
            &self.layout,
            &Status {
                report: &self.tracer.report,
                programs: &programs,
                bpf_stats_enabled: self.bpf_stats_enabled(),
                dropped: &dropped,
                map_full: &map_full,
                map_entries: &map_entries,
                snapshot_reads: self.reads,
                backends: &backends,
                disks: &disks,
                posted: &posted,
                posted_host_events: &pi_events,
                timeline_samples: self.timelines.samples,
                timeline_ambiguous: self.timelines.ambiguous,
            },
        )
    }
}
