//! A running tracer and what reading it needs: the attached programs, label resolution and the
//! cumulative quantiles. Shared by `serve` and `record`.

use std::fs;

use crate::{
    attach::{Options, Tracer},
    export::{Exposition, ProgramStats},
    hist::{Quantiles, ReadError, Snapshot},
    labels::Labeler,
};

pub struct Session {
    pub tracer: Tracer,
    pub labeler: Labeler,
    pub quantiles: Quantiles,
    bpf_stats: bool,
}

impl Session {
    pub fn start(opts: &Options) -> anyhow::Result<Session> {
        let tracer = Tracer::start(opts)?;
        let labeler = Labeler::new(&tracer.tracefs);
        let base = Snapshot::read(&tracer.ebpf)?;
        Ok(Session {
            tracer,
            labeler,
            quantiles: Quantiles::new(base),
            bpf_stats: opts.bpf_stats,
        })
    }

    /// Reads the kernel maps and feeds the increase to the quantiles.
    pub fn refresh(&mut self) -> Result<(), ReadError> {
        let snap = Snapshot::read(&self.tracer.ebpf)?;
        self.quantiles.update(snap);
        Ok(())
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
        Ok(Exposition::gather(
            snap,
            &mut self.labeler,
            &self.tracer.report,
            &programs,
            enabled,
        )
        .encode())
    }
}
