//! The attach plan: loads the BPF object with this kernel's offsets, then for every stage of the
//! table tries its variants in order and keeps the first whose probes all load and attach. The
//! outcome, per stage, is the report `iopath doctor` prints and `/metrics` exports.

use std::{collections::BTreeMap, os::fd::OwnedFd, path::Path};

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        Program, fentry::FEntryLinkId, kprobe::KProbeLinkId, raw_trace_point::RawTracePointLinkId,
        tp_btf::BtfTracePointLinkId, trace_point::TracePointLinkId,
    },
};
use serde::Serialize;
use thiserror::Error;
use tracer_common::config::Config;

use crate::{
    btf::KernelBtf,
    offsets,
    stages::{AttachPoint, Probe, STAGES, Stage},
    tracefs::{Tracefs, TracefsError},
};

/// The BPF object built by build.rs from tracer-ebpf.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/iopath-bpf"));

#[derive(Debug, Error)]
pub enum AttachError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("cannot load the BPF object: {0}")]
    Load(String),
    #[error("unknown stage {0:?} (see `iopath doctor`)")]
    UnknownStage(String),
    #[error("strict mode: stage {stage} is unavailable: {reason}")]
    Strict { stage: String, reason: String },
}

#[derive(Clone, Debug)]
pub struct Options<'a> {
    pub tracefs: &'a Path,
    /// Stage names to run; empty for all.
    pub stages: &'a [String],
    pub hist_entries: u32,
    /// Turn an unavailable stage into an error.
    pub strict: bool,
    /// Enable kernel.bpf_stats for the tracer's lifetime.
    pub bpf_stats: bool,
    /// How long an exited VM's series stay exported.
    pub vm_grace: std::time::Duration,
}

/// What became of one stage on this kernel.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub stage: &'static str,
    pub path: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub attached: bool,
    /// The chosen variant (`attach` label), when attached.
    pub attach: Option<&'static str>,
    /// Its attach points.
    pub points: Vec<String>,
    /// Why each variant tried before (or instead of) the chosen one was not used.
    pub skipped: Vec<String>,
}

/// A link to detach, by program type.
enum Link {
    TpBtf(BtfTracePointLinkId),
    RawTp(RawTracePointLinkId),
    Tracepoint(TracePointLinkId),
    FEntry(FEntryLinkId),
    KProbe(KProbeLinkId),
}

/// The loaded object and its attached programs. Dropping it detaches and unloads everything
/// (nothing is pinned).
pub struct Tracer {
    pub ebpf: Ebpf,
    /// The tracefs the plan read (record formats, exit reason names).
    pub tracefs: Tracefs,
    pub report: Vec<StageReport>,
    /// Attached programs, by name.
    links: BTreeMap<&'static str, Link>,
    /// Keeps kernel.bpf_stats enabled while held.
    _stats: Option<OwnedFd>,
}

/// Maps a load or attach error to the reason doctor prints: `step: error`.
fn failed<E: std::error::Error>(step: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{step}: {}", short(&e))
}

/// One line of an error and its causes, short enough for a table cell.
fn short(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    // The verifier log can be long: the first line says what failed.
    let mut s = s.lines().next().unwrap_or_default().to_string();
    if s.len() > 200 {
        s.truncate(200);
        s.push('…');
    }
    s
}

impl Tracer {
    pub fn start(opts: &Options) -> Result<Tracer, AttachError> {
        let tracefs = Tracefs::open(opts.tracefs)?;
        for name in opts.stages {
            if !STAGES.iter().any(|s| s.name == name) {
                return Err(AttachError::UnknownStage(name.clone()));
            }
        }
        // BTF is optional: without it only classic tracepoints can attach.
        let kbtf = KernelBtf::from_sys_fs().ok();
        let btf = Btf::from_sys_fs().ok();
        let config: Config = offsets::probe(kbtf.as_ref(), &tracefs);
        let stats = if opts.bpf_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .map_err(|e| AttachError::Load(short(&e)))?,
            )
        } else {
            None
        };
        let ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .override_global("CONFIG", &config, true)
            .map_max_entries("HIST", opts.hist_entries)
            .load(BPF_OBJECT)
            .map_err(|e| AttachError::Load(short(&e)))?;
        let mut tracer = Tracer {
            ebpf,
            tracefs: tracefs.clone(),
            report: Vec::new(),
            links: BTreeMap::new(),
            _stats: stats,
        };
        let ctx = Kernel {
            btf: btf.as_ref(),
            kbtf: kbtf.as_ref(),
            tracefs: &tracefs,
            config: &config,
        };
        for stage in STAGES {
            if !opts.stages.is_empty() && !opts.stages.iter().any(|n| n == stage.name) {
                continue;
            }
            let report = tracer.attach_stage(stage, &ctx);
            if opts.strict && !report.attached {
                return Err(AttachError::Strict {
                    stage: stage.name.into(),
                    reason: report.skipped.join("; "),
                });
            }
            tracer.report.push(report);
        }
        tracer.unload_unused();
        Ok(tracer)
    }

    fn attach_stage(&mut self, stage: &'static Stage, k: &Kernel) -> StageReport {
        let mut report = StageReport {
            stage: stage.name,
            path: stage.path.name(),
            from: stage.from,
            to: stage.to,
            attached: false,
            attach: None,
            points: Vec::new(),
            skipped: Vec::new(),
        };
        for variant in stage.variants {
            if let Err(why) = (variant.needs)(k.config) {
                report.skipped.push(format!("{}: {why}", variant.name));
                continue;
            }
            let mut fresh = Vec::new();
            let mut failed = None;
            for probe in variant.probes {
                if self.links.contains_key(probe.program) {
                    continue; // shared with a stage attached before
                }
                match self.attach_probe(probe, k) {
                    Ok(link) => {
                        self.links.insert(probe.program, link);
                        fresh.push(probe.program);
                    }
                    Err(why) => {
                        failed = Some(format!("{}: {} {why}", variant.name, probe.at.describe()));
                        break;
                    }
                }
            }
            match failed {
                None => {
                    report.attached = true;
                    report.attach = Some(variant.name);
                    report.points = variant.probes.iter().map(|p| p.at.describe()).collect();
                    return report;
                }
                Some(why) => {
                    // All or nothing: undo this variant's half-attached probes.
                    for name in fresh {
                        self.detach(name);
                    }
                    report.skipped.push(why);
                }
            }
        }
        report
    }

    fn attach_probe(&mut self, probe: &Probe, k: &Kernel) -> Result<Link, String> {
        // Cheap checks first, for a clear reason instead of a syscall error.
        match probe.at {
            AttachPoint::TpBtf(tp) => {
                if k.btf.is_none() {
                    return Err("no kernel BTF".into());
                }
                if k.kbtf.is_some_and(|b| !b.has_btf_tracepoint(tp)) {
                    return Err(format!("no BTF tracepoint btf_trace_{tp} in vmlinux"));
                }
            }
            AttachPoint::Tracepoint(c, n) if !k.tracefs.has_tracepoint(c, n) => {
                return Err("not in tracefs".into());
            }
            AttachPoint::FEntry(f) | AttachPoint::KProbe(f)
                if k.kbtf.is_some_and(|b| !b.has_func(f)) =>
            {
                return Err("function not in BTF".into());
            }
            _ => {}
        }
        let program = self
            .ebpf
            .program_mut(probe.program)
            .ok_or_else(|| format!("program {} missing from the BPF object", probe.program))?;
        let loaded = program.fd().is_ok();
        Ok(match (probe.at, program) {
            (AttachPoint::TpBtf(tp), Program::BtfTracePoint(p)) => {
                if !loaded {
                    p.load(tp, k.btf.ok_or("no kernel BTF")?)
                        .map_err(failed("load"))?;
                }
                Link::TpBtf(p.attach().map_err(failed("attach"))?)
            }
            (AttachPoint::RawTp(tp), Program::RawTracePoint(p)) => {
                if !loaded {
                    p.load().map_err(failed("load"))?;
                }
                Link::RawTp(p.attach(tp).map_err(failed("attach"))?)
            }
            (AttachPoint::Tracepoint(c, n), Program::TracePoint(p)) => {
                if !loaded {
                    p.load().map_err(failed("load"))?;
                }
                Link::Tracepoint(p.attach(c, n).map_err(failed("attach"))?)
            }
            (AttachPoint::FEntry(f), Program::FEntry(p)) => {
                if !loaded {
                    p.load(f, k.btf.ok_or("no kernel BTF")?)
                        .map_err(failed("load"))?;
                }
                Link::FEntry(p.attach().map_err(failed("attach"))?)
            }
            (AttachPoint::KProbe(f), Program::KProbe(p)) => {
                if !loaded {
                    p.load().map_err(failed("load"))?;
                }
                Link::KProbe(p.attach(f, 0).map_err(failed("attach"))?)
            }
            (at, _) => {
                return Err(format!(
                    "program {} is not of the type {} needs",
                    probe.program,
                    at.describe()
                ));
            }
        })
    }

    fn detach(&mut self, name: &'static str) {
        let Some(link) = self.links.remove(name) else {
            return;
        };
        let Some(program) = self.ebpf.program_mut(name) else {
            return;
        };
        // A failed detach leaves the link to be dropped with the object.
        let _ = match (link, program) {
            (Link::TpBtf(l), Program::BtfTracePoint(p)) => p.detach(l),
            (Link::RawTp(l), Program::RawTracePoint(p)) => p.detach(l),
            (Link::Tracepoint(l), Program::TracePoint(p)) => p.detach(l),
            (Link::FEntry(l), Program::FEntry(p)) => p.detach(l),
            (Link::KProbe(l), Program::KProbe(p)) => p.detach(l),
            _ => Ok(()),
        };
    }

    /// Programs loaded for a variant that was not kept are unloaded, so only what runs stays.
    fn unload_unused(&mut self) {
        let loaded: Vec<String> = self
            .ebpf
            .programs()
            .filter(|(name, p)| p.fd().is_ok() && !self.links.contains_key(name))
            .map(|(name, _)| name.to_string())
            .collect();
        for name in loaded {
            let _ = match self.ebpf.program_mut(&name) {
                Some(Program::BtfTracePoint(p)) => p.unload(),
                Some(Program::RawTracePoint(p)) => p.unload(),
                Some(Program::TracePoint(p)) => p.unload(),
                Some(Program::FEntry(p)) => p.unload(),
                Some(Program::KProbe(p)) => p.unload(),
                _ => Ok(()),
            };
        }
    }

    /// Names of the attached programs.
    pub fn programs(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.links.keys().copied()
    }

    pub fn any_attached(&self) -> bool {
        self.report.iter().any(|r| r.attached)
    }

    /// Names of the attached stages, for the line `serve` and `record` print when they start.
    pub fn attached_stages(&self) -> String {
        let names: Vec<_> = self
            .report
            .iter()
            .filter(|r| r.attached)
            .map(|r| r.stage)
            .collect();
        names.join(", ")
    }
}

/// What the plan knows of the running kernel.
struct Kernel<'a> {
    btf: Option<&'a Btf>,
    kbtf: Option<&'a KernelBtf>,
    tracefs: &'a Tracefs,
    config: &'a Config,
}
