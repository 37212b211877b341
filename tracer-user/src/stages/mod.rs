//! The table of stages: what each one measures, between which kernel events, with which labels,
//! which kernel maps it keeps and how they are collected. One file per path (`blk`, `kvm`, `net`,
//! `vfio`). `attach` walks this table; nothing else decides what to attach.
//!
//! A stage names its events; an event names its candidate program families in order of
//! preference (tp_btf, raw tracepoint, classic tracepoint, fentry, kprobe). The plan attaches one
//! program per event, whatever the number of stages it serves: the first family whose needs are
//! met and whose program loads and attaches.

mod blk;
mod kvm;
mod net;
mod vfio;

use tracer_common::{config::Config, config::NO_OFFSET, stage::StageId};

use crate::maps::KernelMap;

/// A kind of BPF program, in order of preference (cheapest and most precise first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// BTF-enabled tracepoint: typed arguments, the cheapest.
    TpBtf,
    /// Raw tracepoint: the same arguments without BTF.
    RawTp,
    /// Classic tracepoint: the formatted record (field offsets from tracefs).
    Tracepoint,
    /// fentry on a kernel function (BTF and trampolines).
    FEntry,
    /// kprobe on a kernel function.
    KProbe,
    /// Classic tracepoints on system calls standing in for a function (the event's
    /// `syscalls`): the last resort, and opt-in, because attaching any of them puts every
    /// task of the host on the slow system call path.
    Syscall,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::TpBtf,
        Family::RawTp,
        Family::Tracepoint,
        Family::FEntry,
        Family::KProbe,
        Family::Syscall,
    ];

    /// The `attach` label and the `--families` spelling.
    pub const fn name(self) -> &'static str {
        match self {
            Family::TpBtf => "tp_btf",
            Family::RawTp => "raw_tp",
            Family::Tracepoint => "tracepoint",
            Family::FEntry => "fentry",
            Family::KProbe => "kprobe",
            Family::Syscall => "syscall",
        }
    }

    /// Suffix of the program's name in the BPF object.
    pub const fn suffix(self) -> &'static str {
        match self {
            Family::TpBtf => "btf",
            Family::RawTp => "raw",
            Family::Tracepoint => "tp",
            Family::FEntry => "fentry",
            Family::KProbe => "kprobe",
            // Never used as such: the stand-ins' classic programs are `{program}_tp`.
            Family::Syscall => "syscall",
        }
    }

    pub fn parse(s: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// What a program of an event reads beyond its arguments, checked before loading.
pub type Needs = fn(Family, &Config) -> Result<(), &'static str>;

/// A kernel event and its candidate programs.
#[derive(Debug)]
pub struct Event {
    /// Tracepoint name.
    pub name: &'static str,
    /// The kernel functions the fentry and kprobe candidates attach to, the first this kernel
    /// has (one called where the tracepoint fires, with what its programs read; vendor
    /// variants such as KVM's svm_/vmx_ ones); empty when there are none.
    pub functions: &'static [&'static str],
    /// Tracefs category of a tracepoint; empty for a function.
    pub category: &'static str,
    /// The programs are `{program}_{suffix}` in the BPF object.
    pub program: &'static str,
    /// Candidates, in order of preference.
    pub families: &'static [Family],
    pub needs: Needs,
    /// For [`Family::Syscall`]: the system call tracepoints that stand in for the function
    /// (entry, and the return that drops what the call did not finish), each attached once
    /// whatever the number of events it stands in for.
    pub syscalls: &'static [&'static Event],
    /// What the stand-ins do for this event when it attaches as [`Family::Syscall`]
    /// (`tracer_common::stage::stand_in`).
    pub stand_in: u64,
}

impl Event {
    pub fn program_name(&self, f: Family) -> String {
        format!("{}_{}", self.program, f.suffix())
    }

    /// The programs the family attaches: its own, or for [`Family::Syscall`] the stand-ins'.
    pub fn programs(&self, f: Family) -> Vec<String> {
        match f {
            Family::Syscall => self
                .syscalls
                .iter()
                .map(|s| s.program_name(Family::Tracepoint))
                .collect(),
            _ => vec![self.program_name(f)],
        }
    }

    /// Where the family's program attaches, as `iopath doctor` shows it.
    /// `here`: does this kernel have that function (see [`Event::target`]).
    pub fn point(&self, f: Family, here: &dyn Fn(&str) -> bool) -> String {
        let t = self.target(f, here);
        match f {
            Family::Tracepoint => format!("tracepoint/{}/{t}", self.category),
            Family::Syscall => {
                let names: Vec<_> = self.syscalls.iter().map(|s| s.name).collect();
                format!("tracepoint/syscalls/{}", names.join("+"))
            }
            _ => format!("{}/{t}", f.name()),
        }
    }

    /// What the family's program attaches to: the tracepoint, or the first of the functions
    /// for which `here` is true (the kernel has it).
    pub fn target(&self, f: Family, here: &dyn Fn(&str) -> bool) -> &'static str {
        match f {
            Family::FEntry | Family::KProbe => self
                .functions
                .iter()
                .copied()
                .find(|n| here(n))
                .or(self.functions.first().copied())
                .unwrap_or(""),
            _ => self.name,
        }
    }
}

/// A tracepoint with its three programs (tp_btf, raw_tp, classic).
pub const fn tracepoint(
    category: &'static str,
    name: &'static str,
    program: &'static str,
    needs: Needs,
) -> Event {
    Event {
        name,
        category,
        program,
        functions: &[],
        families: &[Family::TpBtf, Family::RawTp, Family::Tracepoint],
        needs,
        syscalls: &[],
        stand_in: 0,
    }
}

/// A tracepoint with its tp_btf and raw_tp programs only (what they read is not in its classic
/// record).
pub const fn tracepoint_args(
    category: &'static str,
    name: &'static str,
    program: &'static str,
    needs: Needs,
) -> Event {
    Event {
        families: &[Family::TpBtf, Family::RawTp],
        ..tracepoint(category, name, program, needs)
    }
}

/// A tracepoint's three programs, then fentry and kprobe on the first of `functions` the
/// kernel has, which fires it.
pub const fn tracepoint_or_function(
    category: &'static str,
    name: &'static str,
    program: &'static str,
    functions: &'static [&'static str],
    needs: Needs,
) -> Event {
    Event {
        functions,
        families: &[
            Family::TpBtf,
            Family::RawTp,
            Family::Tracepoint,
            Family::FEntry,
            Family::KProbe,
        ],
        ..tracepoint(category, name, program, needs)
    }
}

/// A tracepoint with only its classic program (system calls; kvm_exit's reason is computed
/// inside the tracepoint).
pub const fn classic(
    category: &'static str,
    name: &'static str,
    program: &'static str,
    needs: Needs,
) -> Event {
    Event {
        families: &[Family::Tracepoint],
        ..tracepoint(category, name, program, needs)
    }
}

/// A kernel function that only the VMM's requests reach (fentry, then kprobe), with system call
/// tracepoints as the opt-in last resort (`syscalls`, attached as [`Family::Syscall`], each
/// checked against its own needs). Its programs are `{name}_fentry` and `{name}_kprobe`.
pub const fn function_or_syscalls(
    name: &'static str,
    functions: &'static [&'static str],
    syscalls: &'static [&'static Event],
    stand_in: u64,
    needs: Needs,
) -> Event {
    Event {
        families: &[Family::FEntry, Family::KProbe, Family::Syscall],
        syscalls,
        stand_in,
        ..function(name, functions, needs)
    }
}

/// A kernel function with no tracepoint (a module's, such as vhost's): fentry, then kprobe.
/// Its programs are `{name}_fentry` and `{name}_kprobe`.
pub const fn function(
    name: &'static str,
    functions: &'static [&'static str],
    needs: Needs,
) -> Event {
    Event {
        name,
        category: "",
        program: name,
        functions,
        families: &[Family::FEntry, Family::KProbe],
        needs,
        syscalls: &[],
        stand_in: 0,
    }
}

/// Which I/O path a stage belongs to (`path` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Host block device, shared by both paths.
    Block,
    /// KVM, shared by both paths.
    Kvm,
    /// Paravirtual network (virtio-net: vhost-net or QEMU's backend).
    Net,
    /// Passthrough (VFIO): a device's interrupts in the host.
    Vfio,
}

impl Path {
    pub const fn name(self) -> &'static str {
        match self {
            Path::Block => "block",
            Path::Kvm => "kvm",
            Path::Net => "net",
            Path::Vfio => "vfio",
        }
    }
}

#[derive(Debug)]
pub struct Stage {
    pub id: StageId,
    /// Dotted name, the `stage` label.
    pub name: &'static str,
    pub path: Path,
    /// The events that bound the stage, in words.
    pub from: &'static str,
    pub to: &'static str,
    /// Labels of its series besides stage and path, in export order.
    pub labels: &'static [&'static str],
    /// Every event its programs run at; the stage is on when all of them attached.
    pub events: &'static [&'static Event],
    /// Events attached when they can be, which the stage runs without: ones that only name
    /// its series (which vCPU a thread runs; without them the daemon names what it finds in
    /// /proc), or that add to it what `optional_adds` says.
    pub optional: &'static [&'static Event],
    /// What the optional events add, in words (doctor's note beside them).
    pub optional_adds: &'static str,
    /// Why the stage is off unless `--stages` names it (`+NAME` adds it to the default set);
    /// None: on by default.
    pub opt_in: Option<&'static str>,
    /// What is left of the stage, and with what precision, where its own events cannot
    /// attach (doctor's note on a missing stage).
    pub without: Option<&'static str>,
    /// What the stage needs beyond its events' programs (a kernel address, say).
    pub needs: fn(&Config) -> Result<(), &'static str>,
    /// For a stage whose events share state keyed by what their programs read: the class of a
    /// family's key. All its events then attach with families of one class (the block stage's
    /// classic programs key by dev + sector, the others by request pointer).
    pub key_class: Option<fn(Family) -> u8>,
    /// The kernel maps it keeps besides the shared ones (`maps::SHARED`).
    pub maps: &'static [&'static KernelMap],
}

/// The stages that follow VFIO devices' IRQs, for the daemon's IRQ watch.
pub const fn vfio_stage_names() -> [&'static str; 2] {
    [vfio::HANDLER.name, vfio::HANDLER_TO_INJECT.name]
}

pub static STAGES: &[&Stage] = &[
    &blk::DEVICE,
    &kvm::EXIT,
    &kvm::SIGNAL_TO_INJECT,
    &kvm::INJECT_TO_ENTRY,
    &kvm::HALT_WAKEUP,
    &kvm::USERSPACE_EXIT,
    &net::RX_HOST_STACK,
    &net::RX_BACKEND_QUEUE,
    &net::RX_BACKEND_TO_IRQ,
    &net::TX_HOST_STACK,
    &net::TX_KICK,
    &net::TX_BACKEND_TO_WIRE,
    &net::BACKEND_WAKEUP,
    &blk::KICK_TO_SUBMIT,
    &blk::COMPLETE_TO_IRQ,
    &blk::SYNC,
    &vfio::HANDLER,
    &vfio::HANDLER_TO_INJECT,
];

pub fn stage(id: StageId) -> &'static Stage {
    STAGES
        .iter()
        .find(|s| s.id == id)
        .expect("every StageId is in STAGES")
}

/// Every event of the table, once each, in table order.
pub fn events() -> Vec<&'static Event> {
    let mut out: Vec<&'static Event> = Vec::new();
    for s in STAGES {
        for &e in s.events.iter().chain(s.optional) {
            if !out.iter().any(|o| std::ptr::eq(*o, e)) {
                out.push(e);
            }
        }
    }
    out
}

/// The name of every program the table can attach (what the BPF object holds).
pub fn all_programs() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events() {
        for &f in e.families {
            for p in e.programs(f) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Ok when every offset was found, else `why`.
pub fn all_set(offsets: &[u32], why: &'static str) -> Result<(), &'static str> {
    if offsets.iter().all(|&o| o != NO_OFFSET) {
        Ok(())
    } else {
        Err(why)
    }
}

/// Needs nothing.
pub fn none(_: Family, _: &Config) -> Result<(), &'static str> {
    Ok(())
}

/// Why an event's candidates are not in order of preference, if they are not.
pub fn out_of_order(e: &Event) -> Option<String> {
    (e.families.is_empty() || !e.families.windows(2).all(|w| w[0] < w[1])).then(|| {
        format!(
            "{}: families {:?} are not in order of preference",
            e.name, e.families
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_stage_id_has_exactly_one_row() {
        for id in StageId::ALL {
            assert_eq!(STAGES.iter().filter(|s| s.id == id).count(), 1, "{id:?}");
        }
        assert_eq!(STAGES.len(), StageId::COUNT);
        let names: HashSet<_> = STAGES.iter().map(|s| s.name).collect();
        assert_eq!(names.len(), STAGES.len(), "stage names are unique");
    }

    #[test]
    fn names_are_path_dot_what_and_labels_are_prometheus_safe() {
        for s in STAGES {
            assert!(
                s.name.contains('.')
                    && s.name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_'),
                "{}",
                s.name
            );
            for l in s.labels {
                assert!(l.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{l}");
                assert!(!["stage", "path", "le"].contains(l), "{l} is reserved");
            }
        }
    }

    #[test]
    fn candidates_are_in_order_of_preference() {
        for s in STAGES {
            assert!(!s.events.is_empty(), "{} has no event", s.name);
            for e in s.events {
                assert_eq!(out_of_order(e), None);
            }
        }
        // The check itself: kvm_exit's classic program listed before a tp_btf one fails it.
        let backwards = Event {
            families: &[Family::Tracepoint, Family::TpBtf],
            ..kvm::KVM_EXIT
        };
        assert!(out_of_order(&backwards).is_some());
        let twice = Event {
            families: &[Family::RawTp, Family::RawTp],
            ..kvm::KVM_EXIT
        };
        assert!(out_of_order(&twice).is_some());
    }

    #[test]
    fn a_function_candidate_is_the_first_the_kernel_has() {
        let e = &kvm::KVM_APIC_ACCEPT_IRQ;
        let intel = |n: &str| n == "vmx_deliver_interrupt";
        assert_eq!(e.target(Family::KProbe, &intel), "vmx_deliver_interrupt");
        assert_eq!(e.target(Family::FEntry, &|_| true), "svm_deliver_interrupt");
        // none here: the first, for the reason the attach then gives
        assert_eq!(
            e.target(Family::KProbe, &|_| false),
            "svm_deliver_interrupt"
        );
        assert_eq!(e.target(Family::RawTp, &intel), "kvm_apic_accept_irq");
    }

    #[test]
    fn one_event_one_row() {
        // An event is declared once, so the plan attaches one program to it for every stage.
        let mut by_name = std::collections::HashMap::new();
        for s in STAGES {
            for e in s.events {
                let prev = by_name.insert((e.category, e.name), *e as *const Event);
                assert!(
                    prev.is_none_or(|p| std::ptr::eq(p, *e)),
                    "{} is declared twice",
                    e.name
                );
            }
        }
    }
}
