//! A running tracer and what reading it needs: the attached programs, label resolution and the
//! cumulative quantiles. Shared by `serve` and `record`.

use std::{
    collections::HashSet,
    fs,
    time::{Duration, Instant},
};

use crate::{
    attach::{Options, Tracer},
    export::{Exposition, ProgramStats},
    gc::{self, Collected, VmGc},
    hist::{Quantiles, ReadError, SeriesKey, Snapshot},
    labels::Labeler,
};

pub struct Session {
    pub tracer: Tracer,
    pub labeler: Labeler,
    pub quantiles: Quantiles,
    gc: VmGc,
    last_gc: Option<Instant>,
    /// Series whose labels were resolved once (the labeler caches the values).
    labelled: HashSet<SeriesKey>,
    bpf_stats: bool,
}

/// How often exited VMs are looked for (each look reads /proc for every VM and started thread).
const GC_EVERY: Duration = Duration::from_secs(1);

impl Session {
    pub fn start(opts: &Options) -> anyhow::Result<Session> {
        let mut tracer = Tracer::start(opts)?;
        let labeler = Labeler::new(&tracer.tracefs);
        let mut gc = VmGc::new(opts.vm_grace);
        gc.seed(&mut tracer.ebpf);
        let base = Snapshot::read(&tracer.ebpf)?;
        Ok(Session {
            tracer,
            labeler,
            quantiles: Quantiles::new(base),
            gc,
            last_gc: None,
            labelled: HashSet::new(),
            bpf_stats: opts.bpf_stats,
        })
    }

    /// Reads the kernel maps and feeds the increase to the quantiles; then removes what belongs
    /// to VMs gone for longer than the grace period.
    pub fn refresh(&mut self) -> Result<(), ReadError> {
        let snap = Snapshot::read(&self.tracer.ebpf)?;
        // Resolve the labels of new series now, while their VMM is alive: a VM that exits
        // before the report keeps its name.
        for key in snap.series.keys() {
            if self.labelled.insert(*key) {
                self.labeler.labels(key);
            }
        }
        self.quantiles.update(snap);
        let now = Instant::now();
        if self
            .last_gc
            .is_none_or(|t| now.duration_since(t) >= GC_EVERY)
        {
            self.last_gc = Some(now);
            self.collect(now);
        }
        Ok(())
    }

    /// One garbage collection of exited VMs.
    fn collect(&mut self, now: Instant) -> Collected {
        let mut vms: Vec<u32> = self.quantiles.last().series.keys().map(|k| k.vm).collect();
        vms.extend(gc::vmm_tgids(&self.tracer.ebpf));
        let dead: HashSet<u32> = self.gc.expired(vms, now).into_iter().collect();
        let kernel_entries = VmGc::clean_kernel(&mut self.tracer.ebpf, &dead);
        self.quantiles.forget_vms(&dead);
        self.labelled.retain(|k| !dead.contains(&k.vm));
        for tgid in &dead {
            self.labeler.forget_vm(*tgid);
        }
        Collected {
            vms: dead.len(),
            kernel_entries,
        }
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.tracer
            .programs()
            .filter_map(|name| {
                let i = self.tracer.ebpf.program(name)?.info().ok()?;
                Some(ProgramStats {
                    program: name.to_string(),
                    run_time: i.run_time(),
                    run_count: i.run_count(),
                })
            })
            .collect()
    }

    pub fn bpf_stats_enabled(&self) -> bool {
        self.bpf_stats
            || fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                .is_ok_and(|v| v.trim() == "1")
    }

    /// One scrape: read, then encode.
    pub fn metrics(&mut self) -> Result<String, ReadError> {
        self.refresh()?;
        let programs = self.program_stats();
        let enabled = self.bpf_stats_enabled();
        let snap = self.quantiles.last();
        let maps = VmGc::count_entries(&self.tracer.ebpf, self.quantiles.last().hist_entries);
        Ok(Exposition::gather(
            snap,
            &mut self.labeler,
            &self.tracer.report,
            &programs,
            enabled,
            &maps,
        )
        .encode())
    }
}
