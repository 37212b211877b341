//! The attach plan: loads the BPF object with this kernel's offsets, then attaches one program
//! per event the selected stages need (the first family, in order of preference, whose needs
//! are met and whose program loads and attaches), and switches on the stages whose events all
//! attached. The outcome, per stage, is the report `iopath doctor` prints and `/metrics`
//! exports.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::OwnedFd,
    path::Path,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{
        Program, fentry::FEntryLinkId, kprobe::KProbeLinkId, raw_trace_point::RawTracePointLinkId,
        tp_btf::BtfTracePointLinkId, trace_point::TracePointLinkId,
    },
};
use serde::Serialize;
use thiserror::Error;
use tracer_common::config::Config;

use crate::{
    btf::{KernelBtf, Origin},
    maps::{self, Capacity},
    offsets,
    stages::{Event, Family, STAGES, Stage},
    tracefs::{Tracefs, TracefsError},
};

/// The BPF object built by build.rs from tracer-ebpf.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/iopath-bpf"));

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
    #[error("cannot switch the stages on: {0}")]
    Switch(String),
}

#[derive(Clone, Debug)]
pub struct Options<'a> {
    pub tracefs: &'a Path,
    /// Stage names to run; empty for all.
    pub stages: &'a [String],
    /// Program families the plan may use; empty for all.
    pub families: &'a [Family],
    /// Events whose family is forced (`--event-family EVENT=FAMILY`): they try only that one.
    pub event_families: &'a [(String, Family)],
    pub hist_entries: u32,
    pub start_entries: u32,
    /// Turn an unavailable stage into an error.
    pub strict: bool,
    /// Enable kernel.bpf_stats for the tracer's lifetime.
    pub bpf_stats: bool,
    /// The bench's variants of the block programs (`blk::cut`; 0: the whole programs).
    pub blk_cut: u32,
    /// Timelines: the samples of one 16.8 ms window in this many go on the ring (0: none).
    pub timeline_every: u32,
    /// Let the selected stages fall back to system call tracepoints; stages named in `stages`
    /// may anyway.
    pub syscall_tracepoints: bool,
}

/// Why a stage does not fall back to system call tracepoints unless asked to.
pub const SYSCALL_OPT_IN: &str = "opt-in (name the stage in --stages, or --syscall-tracepoints): \
a system call tracepoint puts every process on the host on the slow system call path \
(`cargo xtask bench` measures the cost: syscall_tax)";

/// What became of one stage on this kernel.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub stage: &'static str,
    pub path: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub attached: bool,
    /// The families its events attached with (`attach` label), when attached: `tp_btf`, or
    /// `tp_btf+tracepoint` when they differ (in order of preference).
    pub attach: Option<String>,
    /// Its events' attach points.
    pub points: Vec<String>,
    /// Why each candidate tried before (or instead of) the chosen one was not used.
    pub skipped: Vec<String>,
    /// The kernel maps it keeps, and how they are collected.
    pub maps: Vec<String>,
    /// An opt-in stage left out of the default set: off by choice, not unavailable.
    pub opt_in_off: bool,
}

/// A link to detach, by program type.
enum Link {
    TpBtf(BtfTracePointLinkId),
    RawTp(RawTracePointLinkId),
    Tracepoint(TracePointLinkId),
    FEntry(FEntryLinkId),
    KProbe(KProbeLinkId),
}

/// What became of one event.
struct EventOutcome {
    family: Option<Family>,
    /// Candidates not used, with the reason.
    skipped: Vec<String>,
}

/// The loaded object and its attached programs. Dropping it detaches and unloads everything
/// (nothing is pinned).
pub struct Tracer {
    pub ebpf: Ebpf,
    /// The tracefs the plan read (record formats, exit reason names).
    pub tracefs: Tracefs,
    pub report: Vec<StageReport>,
    /// The kernel modules whose BTF the plan read.
    pub btf_modules: Vec<String>,
    /// Attached programs, by name.
    links: BTreeMap<String, Link>,
    /// Keeps kernel.bpf_stats enabled while held.
    _stats: Option<OwnedFd>,
    /// The VMMs that ran before the stages were switched on (`gc::seed`).
    pub seeded: Vec<u32>,
    /// Timelines: one sampled window in this many (0: none).
    pub timeline_every: u32,
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
    if std::env::var_os("IOPATH_VERIFIER_LOG").is_some() {
        eprintln!("{s}");
    }
    // The verifier log can be long: the first line says what failed (IOPATH_VERIFIER_LOG=1
    // prints it whole).
    let mut s = s.lines().next().unwrap_or_default().to_string();
    if s.len() > 200 {
        s.truncate(200);
        s.push('…');
    }
    s
}

/// Can aya attach a program of family `f` at `name` against this kernel's BTF? aya 0.14 loads
/// tp_btf and fentry programs only against vmlinux's BTF, so a target defined in a module's
/// split BTF (kvm, vhost, vfio on distribution kernels) is left to raw_tp, classic tracepoints
/// and kprobes.
pub fn btf_target(kbtf: Option<&KernelBtf>, f: Family, name: &str) -> Result<(), String> {
    let Some(kbtf) = kbtf else {
        return match f {
            Family::TpBtf | Family::FEntry => Err("no kernel BTF".into()),
            _ => Ok(()),
        };
    };
    let module = |what: &str, m: &str, fam: &str| {
        format!(
            "{what} is in module {m}'s BTF, and aya 0.14 attaches {fam} only against vmlinux BTF"
        )
    };
    match f {
        Family::TpBtf => match kbtf.btf_tracepoint(name) {
            None => Err(format!("no BTF tracepoint btf_trace_{name}")),
            Some(Origin::Module(m)) => Err(module(&format!("btf_trace_{name}"), &m, "tp_btf")),
            Some(Origin::Vmlinux) => Ok(()),
        },
        Family::FEntry => match kbtf.func(name) {
            None => Err("function not in BTF".into()),
            Some(Origin::Module(m)) => Err(module(name, &m, "fentry")),
            Some(Origin::Vmlinux) => Ok(()),
        },
        Family::KProbe if kbtf.func(name).is_none() => Err("function not in BTF".into()),
        _ => Ok(()),
    }
}

impl Tracer {
    pub fn start(opts: &Options) -> Result<Tracer, AttachError> {
        let tracefs = Tracefs::open(opts.tracefs)?;
        for name in opts.stages {
            let name = name.strip_prefix('+').unwrap_or(name);
            if !STAGES.iter().any(|s| s.name == name) {
                return Err(AttachError::UnknownStage(name.into()));
            }
        }
        crate::privs::raise_memlock();
        // BTF is optional: without it only classic tracepoints and raw_tp can attach.
        let kbtf = KernelBtf::from_sys_fs().ok();
        let btf = Btf::from_sys_fs().ok();
        let config = Config {
            blk_cut: opts.blk_cut,
            timeline_every: opts.timeline_every,
            ..offsets::probe(kbtf.as_ref(), &tracefs)
        };
        let stats = if opts.bpf_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .map_err(|e| AttachError::Load(short(&e)))?,
            )
        } else {
            None
        };
        let mut loader = EbpfLoader::new();
        loader
            .btf(btf.as_ref())
            .override_global("CONFIG", &config, true);
        for m in maps::all() {
            let size = match m.capacity {
                Capacity::Hist => Some(opts.hist_entries),
                Capacity::Starts => Some(opts.start_entries),
                Capacity::Fixed => None,
            };
            if let Some(n) = size {
                loader.map_max_entries(m.name, n);
            }
        }
        let ebpf = loader
            .load(BPF_OBJECT)
            .map_err(|e| AttachError::Load(short(&e)))?;
        let mut tracer = Tracer {
            seeded: Vec::new(),
            timeline_every: opts.timeline_every,
            ebpf,
            tracefs: tracefs.clone(),
            report: Vec::new(),
            btf_modules: kbtf
                .as_ref()
                .map(|b| b.modules().map(String::from).collect())
                .unwrap_or_default(),
            links: BTreeMap::new(),
            _stats: stats,
        };
        let k = Kernel {
            btf: btf.as_ref(),
            kbtf: kbtf.as_ref(),
            tracefs: &tracefs,
            config: &config,
            families: opts.families,
            event_families: opts.event_families,
            syscalls_ok: opts.syscall_tracepoints
                || opts.stages.iter().any(|n| !n.starts_with('+')),
        };
        let selected = select(opts.stages);
        // One program per event, for every stage that needs it.
        let mut outcomes: BTreeMap<*const Event, EventOutcome> = BTreeMap::new();
        for stage in &selected {
            if (stage.needs)(&config).is_err() {
                continue;
            }
            for &event in stage.events.iter().chain(stage.optional) {
                if !outcomes.contains_key(&(event as *const Event)) {
                    let o = tracer.attach_event(event, &k, &|_| true);
                    outcomes.insert(event, o);
                }
            }
            // Events whose programs must key alike: re-attach the ones that differ with the
            // class the others fell back to. Only the request events key (the block ones); the
            // VMM disk stages' KVM events are left as they attached.
            if let Some(class) = stage.key_class {
                let keyed = || stage.events.iter().filter(|e| e.category == "block");
                let families: Vec<Option<Family>> = keyed()
                    .map(|e| outcomes[&(*e as *const Event)].family)
                    .collect();
                if let Some(forced) = class_to_force(&families, class) {
                    for &event in keyed() {
                        let o = outcomes
                            .get_mut(&(event as *const Event))
                            .expect("attached");
                        if o.family.is_some_and(|f| class(f) != forced) {
                            let f = o.family.take().expect("checked");
                            tracer.detach(&event.program_name(f));
                            let again = tracer.attach_event(event, &k, &|f| class(f) == forced);
                            o.skipped.push(format!(
                                "{}: keyed unlike the stage's other events",
                                k.point(event, f)
                            ));
                            o.skipped.extend(again.skipped);
                            o.family = again.family;
                        }
                    }
                }
            }
        }
        let (mut mask, mut roles) = (0u64, 0u64);
        let mut used: BTreeSet<String> = BTreeSet::new();
        // Opt-in stages left out of the default set: doctor says why and how to add them.
        let left_out: Vec<&'static Stage> = STAGES
            .iter()
            .copied()
            .filter(|s| s.opt_in.is_some() && opts.stages.iter().all(|n| n.starts_with('+')))
            .filter(|s| !selected.iter().any(|x| x.id == s.id))
            .collect();
        for stage in selected {
            let report = stage_report(stage, &k, &outcomes);
            if report.attached {
                mask |= stage.id.bit();
                for e in stage.events.iter().chain(stage.optional) {
                    let Some(o) = outcomes.get(&(*e as *const Event)) else {
                        continue;
                    };
                    if let Some(f) = o.family {
                        used.extend(e.programs(f));
                        if f == Family::Syscall {
                            roles |= e.stand_in;
                        }
                    }
                }
            } else if opts.strict {
                return Err(AttachError::Strict {
                    stage: stage.name.into(),
                    reason: report.skipped.join("; "),
                });
            }
            tracer.report.push(report);
        }
        for stage in left_out {
            let why = stage.opt_in.unwrap_or_default();
            let mut report = StageReport::of(stage);
            report.opt_in_off = true;
            report
                .skipped
                .push(format!("off by default ({why}): --stages +{}", stage.name));
            tracer.report.push(report);
        }
        // Programs of events no attached stage needs go (a stage missing another event).
        let unused: Vec<String> = tracer
            .links
            .keys()
            .filter(|p| !used.contains(*p))
            .cloned()
            .collect();
        for p in unused {
            tracer.detach(&p);
        }
        // The VMMs and vCPU threads that existed before: seeded once the programs that learn new
        // ones run, and before anything is measured (the stages are off until switched on).
        tracer.seeded = crate::gc::seed(&mut tracer.ebpf);
        tracer.switch_on(mask, roles)?;
        tracer.unload_unused();
        Ok(tracer)
    }

    /// Tells the programs which stages are on, and what the system call programs stand in
    /// for (`STAGES_ON`).
    fn switch_on(&mut self, mask: u64, roles: u64) -> Result<(), AttachError> {
        let map = self
            .ebpf
            .map_mut("STAGES_ON")
            .ok_or_else(|| AttachError::Switch("STAGES_ON missing".into()))?;
        let mut on: Array<&mut MapData, u64> =
            Array::try_from(map).map_err(|e| AttachError::Switch(short(&e)))?;
        on.set(1, roles, 0)
            .and_then(|()| on.set(0, mask, 0))
            .map_err(|e| AttachError::Switch(short(&e)))
    }

    /// Attaches the first family of `event` that `allowed` lets through and that works.
    fn attach_event(
        &mut self,
        event: &'static Event,
        k: &Kernel,
        allowed: &dyn Fn(Family) -> bool,
    ) -> EventOutcome {
        let mut skipped = Vec::new();
        let forced = k
            .event_families
            .iter()
            .find(|(e, _)| e == event.name)
            .map(|&(_, f)| f);
        for &f in event.families.iter().filter(|&&f| allowed(f)) {
            let point = k.point(event, f);
            match forced {
                Some(only) if only != f => {
                    let want = format!("{}={}", event.name, only.name());
                    skipped.push(format!("{point}: not --event-family {want}"));
                    continue;
                }
                None if !k.families.is_empty() && !k.families.contains(&f) => {
                    skipped.push(format!("{point}: not in --families"));
                    continue;
                }
                _ => {}
            }
            if let Err(why) = (event.needs)(f, k.config) {
                skipped.push(format!("{point}: {why}"));
                continue;
            }
            if f == Family::Syscall && !k.syscalls_ok {
                skipped.push(format!("{point}: {SYSCALL_OPT_IN}"));
                continue;
            }
            match self.attach_family(event, f, k) {
                Ok(()) => {
                    return EventOutcome {
                        family: Some(f),
                        skipped,
                    };
                }
                Err(why) => skipped.push(format!("{point}: {why}")),
            }
        }
        EventOutcome {
            family: None,
            skipped,
        }
    }

    /// Attaches the family's program of `event`, or for [`Family::Syscall`] each stand-in not
    /// attached yet (for another event).
    fn attach_family(
        &mut self,
        event: &'static Event,
        f: Family,
        k: &Kernel,
    ) -> Result<(), String> {
        if f != Family::Syscall {
            let link = self.attach_program(event, f, k)?;
            self.links.insert(event.program_name(f), link);
            return Ok(());
        }
        for &s in event.syscalls {
            let name = s.program_name(Family::Tracepoint);
            if self.links.contains_key(&name) {
                continue;
            }
            (s.needs)(Family::Tracepoint, k.config).map_err(|why| format!("{}: {why}", s.name))?;
            let link = self.attach_program(s, Family::Tracepoint, k)?;
            self.links.insert(name, link);
        }
        Ok(())
    }

    fn attach_program(&mut self, event: &Event, f: Family, k: &Kernel) -> Result<Link, String> {
        // Cheap checks first, for a clear reason instead of a syscall error.
        let tp = k.target(event, f);
        btf_target(k.kbtf, f, tp)?;
        if matches!(f, Family::Tracepoint | Family::RawTp)
            && !k.tracefs.has_tracepoint(event.category, event.name)
        {
            return Err("not in tracefs".into());
        }
        let name = event.program_name(f);
        let program = self
            .ebpf
            .program_mut(&name)
            .ok_or_else(|| format!("program {name} missing from the BPF object"))?;
        let loaded = program.fd().is_ok();
        Ok(match (f, program) {
            (Family::TpBtf, Program::BtfTracePoint(p)) => {
                if !loaded {
                    p.load(tp, k.btf.ok_or("no kernel BTF")?)
                        .map_err(failed("load"))?;
                }
                Link::TpBtf(p.attach().map_err(failed("attach"))?)
            }
            (Family::RawTp, Program::RawTracePoint(p)) => {
                if !loaded {
                    p.load().map_err(failed("load"))?;
                }
                Link::RawTp(p.attach(tp).map_err(failed("attach"))?)
            }
            (Family::Tracepoint, Program::TracePoint(p)) => {
                if !loaded {
                    p.load().map_err(failed("load"))?;
                }
                Link::Tracepoint(p.attach(event.category, tp).map_err(failed("attach"))?)
            }
            (Family::FEntry, Program::FEntry(p)) => {
                if !loaded {
                    p.load(tp, k.btf.ok_or("no kernel BTF")?)
                        .map_err(failed("load"))?;
                }
                Link::FEntry(p.attach().map_err(failed("attach"))?)
            }
            (Family::KProbe, Program::KProbe(p)) => {
                if !loaded {
                    p.load().map_err(failed("load"))?;
                }
                Link::KProbe(p.attach(tp, 0).map_err(failed("attach"))?)
            }
            _ => {
                return Err(format!(
                    "program {name} is not of the type {} needs",
                    f.name()
                ));
            }
        })
    }

    fn detach(&mut self, name: &str) {
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

    /// Programs loaded but not attached are unloaded, so only what runs stays.
    fn unload_unused(&mut self) {
        let loaded: Vec<String> = self
            .ebpf
            .programs()
            .filter(|(name, p)| p.fd().is_ok() && !self.links.contains_key(*name))
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
    pub fn programs(&self) -> impl Iterator<Item = &str> + '_ {
        self.links.keys().map(String::as_str)
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

/// The key class a stage's events must all use when they attached with different ones: the
/// least preferred among them (every event offers every class, and the event that fell back
/// to it could not do better). None when they agree.
fn class_to_force(families: &[Option<Family>], class: fn(Family) -> u8) -> Option<u8> {
    let classes: BTreeSet<u8> = families.iter().flatten().map(|&f| class(f)).collect();
    (classes.len() > 1).then(|| *classes.iter().max().expect("two or more"))
}

impl StageReport {
    /// A stage not attached (yet), with nothing tried.
    fn of(stage: &'static Stage) -> StageReport {
        StageReport {
            stage: stage.name,
            path: stage.path.name(),
            from: stage.from,
            to: stage.to,
            attached: false,
            attach: None,
            points: Vec::new(),
            skipped: Vec::new(),
            maps: maps::SHARED
                .iter()
                .chain(stage.maps)
                .map(|m| format!("{}: {}", m.name, m.collected))
                .collect(),
            opt_in_off: false,
        }
    }
}

/// A stage's report from its events' outcomes.
fn stage_report(
    stage: &'static Stage,
    k: &Kernel,
    outcomes: &BTreeMap<*const Event, EventOutcome>,
) -> StageReport {
    let mut r = StageReport::of(stage);
    if let Err(why) = (stage.needs)(k.config) {
        r.skipped.push(why.to_string());
        return r;
    }
    let mut families = BTreeSet::new();
    let mut all = true;
    for e in stage.events {
        let o = &outcomes[&(*e as *const Event)];
        r.skipped.extend(o.skipped.iter().cloned());
        match o.family {
            Some(f) => {
                families.insert(f);
                r.points.push(k.point(e, f));
            }
            None => all = false,
        }
    }
    // Optional events: the stage runs without them. What they add is said once, after them.
    let mut any_optional = false;
    for e in stage.optional {
        let Some(o) = outcomes.get(&(*e as *const Event)) else {
            continue;
        };
        any_optional = true;
        match o.family {
            Some(f) => r.points.push(format!("{} (optional)", k.point(e, f))),
            None => r
                .skipped
                .extend(o.skipped.iter().map(|s| format!("{s} (optional)"))),
        }
    }
    if any_optional {
        r.points
            .push(format!("optional events add: {}", stage.optional_adds));
    }
    if all {
        r.attached = true;
        let names: Vec<_> = families.iter().map(|f| f.name()).collect();
        r.attach = Some(names.join("+"));
    } else if let Some(left) = stage.without {
        r.skipped.push(format!("without them: {left}"));
    }
    r
}

/// The stages `--stages` selects: the ones it names; with none named (or only `+NAME`s), every
/// stage that is not opt-in, plus the `+NAME`s.
pub fn select(names: &[String]) -> Vec<&'static Stage> {
    let named = |s: &Stage, plus: bool| {
        names
            .iter()
            .any(|n| n.strip_prefix('+').is_some() == plus && n.trim_start_matches('+') == s.name)
    };
    let only = names.iter().any(|n| !n.starts_with('+'));
    STAGES
        .iter()
        .copied()
        .filter(|s| {
            named(s, true)
                || if only {
                    named(s, false)
                } else {
                    s.opt_in.is_none()
                }
        })
        .collect()
}

/// What the plan knows of the running kernel.
struct Kernel<'a> {
    btf: Option<&'a Btf>,
    kbtf: Option<&'a KernelBtf>,
    tracefs: &'a Tracefs,
    config: &'a Config,
    families: &'a [Family],
    event_families: &'a [(String, Family)],
    /// May events fall back to system call stand-ins: with `--syscall-tracepoints`, or when
    /// the stages were named (every selected stage then was).
    syscalls_ok: bool,
}

impl Kernel<'_> {
    /// Is this function in this kernel's BTF (vmlinux or a loaded module)? Without BTF,
    /// the attach says.
    fn has(&self, function: &str) -> bool {
        self.kbtf.is_none_or(|b| b.func(function).is_some())
    }

    /// What the family's program of `event` attaches to here: for a function, the first of
    /// its candidates this kernel has.
    fn target(&self, event: &Event, f: Family) -> &'static str {
        event.target(f, &|n| self.has(n))
    }

    fn point(&self, event: &Event, f: Family) -> String {
        event.point(f, &|n| self.has(n))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn stages_selected_by_name_by_default_and_with_plus() {
        let names = |v: &[&str]| -> Vec<&str> {
            let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            select(&v).iter().map(|s| s.name).collect()
        };
        let default = names(&[]);
        assert!(!default.contains(&"sched.backend_wakeup"), "opt-in");
        let opt_in = STAGES.iter().filter(|s| s.opt_in.is_some()).count();
        assert_eq!(default.len(), STAGES.len() - opt_in);
        let plus = names(&["+sched.backend_wakeup"]);
        assert_eq!(plus.len(), STAGES.len());
        assert_eq!(names(&["kvm.exit"]), ["kvm.exit"]);
        assert_eq!(
            names(&["kvm.exit", "+sched.backend_wakeup"]),
            ["kvm.exit", "sched.backend_wakeup"]
        );
        assert_eq!(names(&["sched.backend_wakeup"]), ["sched.backend_wakeup"]);
    }

    /// Every program the table can ask for is in the object, and the object has no program
    /// the table does not know (the tests' leftover checks rely on the table's names).
    #[test]
    fn the_table_and_the_object_name_the_same_programs() {
        let obj = aya_obj::Object::parse(BPF_OBJECT).expect("the BPF object parses");
        let in_object: BTreeSet<String> = obj.programs.keys().cloned().collect();
        let in_table: BTreeSet<String> = crate::stages::all_programs().into_iter().collect();
        assert_eq!(in_object, in_table);
    }

    #[test]
    fn block_events_that_key_differently_are_brought_to_one_key() {
        let class = crate::stages::stage(tracer_common::stage::StageId::BlkDevice)
            .key_class
            .expect("blk.device keys its requests");
        let (btf, raw, tp) = (
            Some(Family::TpBtf),
            Some(Family::RawTp),
            Some(Family::Tracepoint),
        );
        // tp_btf and raw_tp both key by request pointer: nothing to do
        assert_eq!(class_to_force(&[btf, raw, btf], class), None);
        // issue by pointer, complete by sector (its BTF programs failed): all by sector
        assert_eq!(
            class_to_force(&[btf, tp, raw], class),
            Some(class(Family::Tracepoint))
        );
        assert_eq!(class_to_force(&[tp, None, tp], class), None);
    }

    #[test]
    fn module_targets_fall_back_with_a_reason() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/btf");
        let mut kbtf = KernelBtf::from_file(&dir.join("base.btf")).unwrap();
        kbtf.add_module(&dir.join("kvmlike.btf")).unwrap();
        kbtf.add_module(&dir.join("vhostlike.btf")).unwrap();
        let k = Some(&kbtf);
        // vmlinux's tracepoint: tp_btf is fine
        assert_eq!(btf_target(k, Family::TpBtf, "block_rq_issue"), Ok(()));
        // a module's: tp_btf refused, saying why; raw_tp and classic not
        let why = btf_target(k, Family::TpBtf, "kvm_entry").unwrap_err();
        assert!(
            why.contains("module kvmlike.btf") && why.contains("aya 0.14"),
            "{why}"
        );
        assert_eq!(btf_target(k, Family::RawTp, "kvm_entry"), Ok(()));
        assert_eq!(btf_target(k, Family::Tracepoint, "kvm_entry"), Ok(()));
        // a module's function: fentry refused, kprobe kept
        let why = btf_target(k, Family::FEntry, "handle_tx_kick").unwrap_err();
        assert!(why.contains("module vhostlike.btf"), "{why}");
        assert_eq!(btf_target(k, Family::KProbe, "handle_tx_kick"), Ok(()));
        assert_eq!(btf_target(k, Family::FEntry, "queue_work_on"), Ok(()));
        assert!(btf_target(k, Family::KProbe, "no_such_function").is_err());
        // no BTF at all: only the untyped families
        assert!(btf_target(None, Family::TpBtf, "kvm_entry").is_err());
        assert_eq!(btf_target(None, Family::RawTp, "kvm_entry"), Ok(()));
    }
}
