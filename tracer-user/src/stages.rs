//! The table of stages: what each one measures, between which kernel events, with which labels,
//! and its candidate implementations in order of preference. `attach` walks this table; nothing
//! else decides what to attach.

use tracer_common::{config::Config, config::NO_OFFSET, stage::StageId};

/// Where a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    /// BTF-enabled tracepoint (tp_btf): typed arguments, the cheapest.
    TpBtf(&'static str),
    /// Raw tracepoint: the same arguments without BTF.
    RawTp(&'static str),
    /// Classic tracepoint: the formatted record (category, name).
    Tracepoint(&'static str, &'static str),
    /// fentry on a kernel function (needs BTF and trampolines). Function probes split the
    /// backend stages of the vhost and vfio paths; the attach code handles them already.
    #[allow(dead_code)]
    FEntry(&'static str),
    /// kprobe on a kernel function.
    #[allow(dead_code)]
    KProbe(&'static str),
}

impl AttachPoint {
    /// Preference rank: lower is tried first (tp_btf, tracepoints, fentry, kprobe). The table
    /// lists variants in this order; a unit test holds it to that.
    #[cfg_attr(not(test), allow(dead_code))]
    pub const fn rank(self) -> u8 {
        match self {
            AttachPoint::TpBtf(_) => 0,
            AttachPoint::RawTp(_) | AttachPoint::Tracepoint(..) => 1,
            AttachPoint::FEntry(_) => 2,
            AttachPoint::KProbe(_) => 3,
        }
    }

    pub fn describe(self) -> String {
        match self {
            AttachPoint::TpBtf(tp) => format!("tp_btf/{tp}"),
            AttachPoint::RawTp(tp) => format!("raw_tp/{tp}"),
            AttachPoint::Tracepoint(c, n) => format!("tracepoint/{c}/{n}"),
            AttachPoint::FEntry(f) => format!("fentry/{f}"),
            AttachPoint::KProbe(f) => format!("kprobe/{f}"),
        }
    }
}

/// One program of the BPF object and where it attaches.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub program: &'static str,
    pub at: AttachPoint,
}

/// One implementation of a stage: all its probes attach, or none does.
#[derive(Debug)]
pub struct Variant {
    /// Short name, exported as the `attach` label (`tp_btf`, `raw_tp`, `tracepoint`, ...).
    pub name: &'static str,
    pub probes: &'static [Probe],
    /// Load-time data the programs read (offsets from BTF or tracefs), checked before loading.
    pub needs: fn(&Config) -> Result<(), &'static str>,
}

/// Which I/O path a stage belongs to (`path` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Host block device, shared by both paths.
    Block,
    /// KVM, shared by both paths.
    Kvm,
}

impl Path {
    pub const fn name(self) -> &'static str {
        match self {
            Path::Block => "block",
            Path::Kvm => "kvm",
        }
    }
}

#[derive(Debug)]
pub struct Stage {
    pub id: StageId,
    /// Dotted name, the `stage` label.
    pub name: &'static str,
    pub path: Path,
    /// The events that bound the stage.
    pub from: &'static str,
    pub to: &'static str,
    /// Labels of its series besides stage and path, in export order.
    pub labels: &'static [&'static str],
    pub variants: &'static [Variant],
}

/// Ok when every offset was found, else `why`.
fn all_set(offsets: &[u32], why: &'static str) -> Result<(), &'static str> {
    if offsets.iter().all(|&o| o != NO_OFFSET) {
        Ok(())
    } else {
        Err(why)
    }
}

fn blk_request_offsets(c: &Config) -> Result<(), &'static str> {
    all_set(
        &[
            c.rq_q,
            c.rq_cmd_flags,
            c.q_disk,
            c.disk_major,
            c.disk_first_minor,
        ],
        "struct request/request_queue/gendisk members not found in BTF",
    )
}

fn blk_tracepoint_fields(c: &Config) -> Result<(), &'static str> {
    all_set(
        &[
            c.tp_issue_dev,
            c.tp_issue_sector,
            c.tp_issue_rwbs,
            c.tp_complete_dev,
            c.tp_complete_sector,
        ],
        "block_rq_issue/complete format lacks dev, sector or rwbs",
    )
}

fn kvm_exit_fields(c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.tp_kvm_exit_reason, c.tp_kvm_exit_isa, c.tp_kvm_exit_vcpu],
        "kvm:kvm_exit format lacks exit_reason, isa or vcpu_id (is KVM built?)",
    )
}

fn syscall_fields(c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.tp_write_count, c.tp_ioctl_fd, c.tp_ioctl_cmd],
        "syscalls:sys_enter_write/ioctl not in tracefs (CONFIG_FTRACE_SYSCALLS?)",
    )
}

fn irqfd_inject_known(c: &Config) -> Result<(), &'static str> {
    if c.irqfd_inject == 0 {
        Err("irqfd_inject not in /proc/kallsyms: deferred injections cannot be followed")
    } else {
        Ok(())
    }
}

fn signal_btf(c: &Config) -> Result<(), &'static str> {
    syscall_fields(c)?;
    irqfd_inject_known(c)?;
    all_set(&[c.work_func], "struct work_struct.func not in BTF")
}

fn signal_tp(c: &Config) -> Result<(), &'static str> {
    syscall_fields(c)?;
    irqfd_inject_known(c)?;
    all_set(
        &[
            c.tp_set_irq_level,
            c.tp_queue_work,
            c.tp_queue_function,
            c.tp_exec_work,
            c.tp_exec_function,
        ],
        "kvm_set_irq or workqueue formats lack level, work or function (is KVM built?)",
    )
}

fn inject_btf(c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.vcpu_id],
        "struct kvm_vcpu.vcpu_id not in BTF (is KVM built?)",
    )
}

fn inject_tp(c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.tp_set_irq_level, c.tp_accept_apicid, c.tp_kvm_entry_vcpu],
        "kvm_set_irq, kvm_apic_accept_irq or kvm_entry formats lack level, apicid or vcpu_id",
    )
}

fn halt_tp(c: &Config) -> Result<(), &'static str> {
    syscall_fields(c)?;
    all_set(
        &[c.tp_wakeup_ns, c.tp_wakeup_waited],
        "kvm_vcpu_wakeup format lacks ns or waited (is KVM built?)",
    )
}

fn uexit_tp(c: &Config) -> Result<(), &'static str> {
    syscall_fields(c)?;
    all_set(
        &[c.tp_uexit_reason, c.tp_uexit_errno],
        "kvm_userspace_exit format lacks reason or errno (is KVM built?)",
    )
}

/// A program on a tp_btf, raw or classic tracepoint.
const fn btf(program: &'static str, tp: &'static str) -> Probe {
    Probe {
        program,
        at: AttachPoint::TpBtf(tp),
    }
}

const fn raw(program: &'static str, tp: &'static str) -> Probe {
    Probe {
        program,
        at: AttachPoint::RawTp(tp),
    }
}

const fn tp(program: &'static str, category: &'static str, name: &'static str) -> Probe {
    Probe {
        program,
        at: AttachPoint::Tracepoint(category, name),
    }
}

// System calls have only classic per-syscall tracepoints (the raw sys_enter one fires for
// every system call on the host).
const SYS_ENTER_WRITE: Probe = tp("sys_enter_write_tp", "syscalls", "sys_enter_write");
const SYS_EXIT_WRITE: Probe = tp("sys_exit_write_tp", "syscalls", "sys_exit_write");
const SYS_ENTER_IOCTL: Probe = tp("sys_enter_ioctl_tp", "syscalls", "sys_enter_ioctl");
const SYS_EXIT_IOCTL: Probe = tp("sys_exit_ioctl_tp", "syscalls", "sys_exit_ioctl");

const KVM_EXIT_TP: Probe = Probe {
    program: "kvm_exit_tp",
    at: AttachPoint::Tracepoint("kvm", "kvm_exit"),
};

pub static STAGES: &[Stage] = &[
    Stage {
        id: StageId::BlkDevice,
        name: "blk.device",
        path: Path::Block,
        from: "block:block_rq_issue",
        to: "block:block_rq_complete",
        labels: &["device", "disk", "op"],
        variants: &[
            Variant {
                name: "tp_btf",
                probes: &[
                    Probe {
                        program: "blk_rq_issue_btf",
                        at: AttachPoint::TpBtf("block_rq_issue"),
                    },
                    Probe {
                        program: "blk_rq_complete_btf",
                        at: AttachPoint::TpBtf("block_rq_complete"),
                    },
                ],
                needs: blk_request_offsets,
            },
            Variant {
                name: "raw_tp",
                probes: &[
                    Probe {
                        program: "blk_rq_issue_raw",
                        at: AttachPoint::RawTp("block_rq_issue"),
                    },
                    Probe {
                        program: "blk_rq_complete_raw",
                        at: AttachPoint::RawTp("block_rq_complete"),
                    },
                ],
                needs: blk_request_offsets,
            },
            Variant {
                name: "tracepoint",
                probes: &[
                    Probe {
                        program: "blk_rq_issue_tp",
                        at: AttachPoint::Tracepoint("block", "block_rq_issue"),
                    },
                    Probe {
                        program: "blk_rq_complete_tp",
                        at: AttachPoint::Tracepoint("block", "block_rq_complete"),
                    },
                ],
                needs: blk_tracepoint_fields,
            },
        ],
    },
    // The exit reason is computed inside the kvm_exit tracepoint (vendor get_exit_info), so the
    // start is always the classic tracepoint; the end needs no argument and takes the cheapest.
    Stage {
        id: StageId::KvmExit,
        name: "kvm.exit",
        path: Path::Kvm,
        from: "kvm:kvm_exit",
        to: "kvm:kvm_entry (same vCPU thread)",
        labels: &["vm", "vcpu", "reason"],
        variants: &[
            Variant {
                name: "tracepoint+tp_btf",
                probes: &[
                    KVM_EXIT_TP,
                    Probe {
                        program: "kvm_entry_btf",
                        at: AttachPoint::TpBtf("kvm_entry"),
                    },
                ],
                needs: kvm_exit_fields,
            },
            Variant {
                name: "tracepoint+raw_tp",
                probes: &[
                    KVM_EXIT_TP,
                    Probe {
                        program: "kvm_entry_raw",
                        at: AttachPoint::RawTp("kvm_entry"),
                    },
                ],
                needs: kvm_exit_fields,
            },
            Variant {
                name: "tracepoint",
                probes: &[
                    KVM_EXIT_TP,
                    Probe {
                        program: "kvm_entry_tp",
                        at: AttachPoint::Tracepoint("kvm", "kvm_entry"),
                    },
                ],
                needs: kvm_exit_fields,
            },
        ],
    },
    Stage {
        id: StageId::KvmSignalToInject,
        name: "kvm.signal_to_inject",
        path: Path::Kvm,
        from: "irqfd write / ioctl(KVM_SIGNAL_MSI) entry (syscalls)",
        to: "kvm:kvm_msi_set_irq (same task) / kvm:kvm_set_irq (kworker, via workqueue)",
        labels: &["vm", "signal", "inject"],
        variants: &[
            Variant {
                name: "tp_btf",
                probes: &[
                    SYS_ENTER_WRITE,
                    SYS_EXIT_WRITE,
                    SYS_ENTER_IOCTL,
                    SYS_EXIT_IOCTL,
                    btf("kvm_msi_set_irq_btf", "kvm_msi_set_irq"),
                    btf("kvm_set_irq_btf", "kvm_set_irq"),
                    btf("workqueue_queue_work_btf", "workqueue_queue_work"),
                    btf("workqueue_execute_start_btf", "workqueue_execute_start"),
                ],
                needs: signal_btf,
            },
            Variant {
                name: "raw_tp",
                probes: &[
                    SYS_ENTER_WRITE,
                    SYS_EXIT_WRITE,
                    SYS_ENTER_IOCTL,
                    SYS_EXIT_IOCTL,
                    raw("kvm_msi_set_irq_raw", "kvm_msi_set_irq"),
                    raw("kvm_set_irq_raw", "kvm_set_irq"),
                    raw("workqueue_queue_work_raw", "workqueue_queue_work"),
                    raw("workqueue_execute_start_raw", "workqueue_execute_start"),
                ],
                needs: signal_btf,
            },
            Variant {
                name: "tracepoint",
                probes: &[
                    SYS_ENTER_WRITE,
                    SYS_EXIT_WRITE,
                    SYS_ENTER_IOCTL,
                    SYS_EXIT_IOCTL,
                    tp("kvm_msi_set_irq_tp", "kvm", "kvm_msi_set_irq"),
                    tp("kvm_set_irq_tp", "kvm", "kvm_set_irq"),
                    tp(
                        "workqueue_queue_work_tp",
                        "workqueue",
                        "workqueue_queue_work",
                    ),
                    tp(
                        "workqueue_execute_start_tp",
                        "workqueue",
                        "workqueue_execute_start",
                    ),
                ],
                needs: signal_tp,
            },
        ],
    },
    Stage {
        id: StageId::KvmInjectToEntry,
        name: "kvm.inject_to_entry",
        path: Path::Kvm,
        from: "kvm:kvm_msi_set_irq / kvm:kvm_set_irq (+ kvm:kvm_apic_accept_irq: destination)",
        to: "kvm:kvm_entry of the destination vCPU",
        labels: &["vm", "vcpu"],
        variants: &[
            Variant {
                name: "tp_btf",
                probes: &[
                    btf("kvm_msi_set_irq_btf", "kvm_msi_set_irq"),
                    btf("kvm_set_irq_btf", "kvm_set_irq"),
                    btf("kvm_apic_accept_irq_btf", "kvm_apic_accept_irq"),
                    btf("kvm_entry_btf", "kvm_entry"),
                ],
                needs: inject_btf,
            },
            Variant {
                name: "raw_tp",
                probes: &[
                    raw("kvm_msi_set_irq_raw", "kvm_msi_set_irq"),
                    raw("kvm_set_irq_raw", "kvm_set_irq"),
                    raw("kvm_apic_accept_irq_raw", "kvm_apic_accept_irq"),
                    raw("kvm_entry_raw", "kvm_entry"),
                ],
                needs: inject_btf,
            },
            Variant {
                name: "tracepoint",
                probes: &[
                    tp("kvm_msi_set_irq_tp", "kvm", "kvm_msi_set_irq"),
                    tp("kvm_set_irq_tp", "kvm", "kvm_set_irq"),
                    tp("kvm_apic_accept_irq_tp", "kvm", "kvm_apic_accept_irq"),
                    tp("kvm_entry_tp", "kvm", "kvm_entry"),
                ],
                needs: inject_tp,
            },
        ],
    },
    Stage {
        id: StageId::KvmHaltWakeup,
        name: "kvm.halt_wakeup",
        path: Path::Kvm,
        from: "vCPU halts (measured by KVM)",
        to: "kvm:kvm_vcpu_wakeup (ns, waited)",
        labels: &["vm", "vcpu", "wait"],
        variants: &[
            Variant {
                name: "tp_btf",
                probes: &[
                    btf("kvm_vcpu_wakeup_btf", "kvm_vcpu_wakeup"),
                    SYS_ENTER_IOCTL,
                ],
                needs: syscall_fields,
            },
            Variant {
                name: "raw_tp",
                probes: &[
                    raw("kvm_vcpu_wakeup_raw", "kvm_vcpu_wakeup"),
                    SYS_ENTER_IOCTL,
                ],
                needs: syscall_fields,
            },
            Variant {
                name: "tracepoint",
                probes: &[
                    tp("kvm_vcpu_wakeup_tp", "kvm", "kvm_vcpu_wakeup"),
                    SYS_ENTER_IOCTL,
                ],
                needs: halt_tp,
            },
        ],
    },
    Stage {
        id: StageId::KvmUserspaceExit,
        name: "kvm.userspace_exit",
        path: Path::Kvm,
        from: "kvm:kvm_userspace_exit",
        to: "ioctl(KVM_RUN) entry, same thread (syscalls)",
        labels: &["vm", "vcpu", "reason"],
        variants: &[
            Variant {
                name: "tp_btf",
                probes: &[
                    btf("kvm_userspace_exit_btf", "kvm_userspace_exit"),
                    SYS_ENTER_IOCTL,
                ],
                needs: syscall_fields,
            },
            Variant {
                name: "raw_tp",
                probes: &[
                    raw("kvm_userspace_exit_raw", "kvm_userspace_exit"),
                    SYS_ENTER_IOCTL,
                ],
                needs: syscall_fields,
            },
            Variant {
                name: "tracepoint",
                probes: &[
                    tp("kvm_userspace_exit_tp", "kvm", "kvm_userspace_exit"),
                    SYS_ENTER_IOCTL,
                ],
                needs: uexit_tp,
            },
        ],
    },
];

pub fn stage(id: StageId) -> &'static Stage {
    STAGES
        .iter()
        .find(|s| s.id == id)
        .expect("every StageId is in STAGES")
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
                        .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_')
            );
            for l in s.labels {
                assert!(l.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{l}");
                assert!(!["stage", "path", "le"].contains(l), "{l} is reserved");
            }
        }
    }

    #[test]
    fn variants_are_in_preference_order_and_distinct() {
        for s in STAGES {
            assert!(!s.variants.is_empty(), "{} has no implementation", s.name);
            // A variant's rank is that of its most expensive probe.
            let ranks: Vec<u8> = s
                .variants
                .iter()
                .map(|v| v.probes.iter().map(|p| p.at.rank()).max().unwrap())
                .collect();
            assert!(
                ranks.windows(2).all(|w| w[0] <= w[1]),
                "{}: {ranks:?}",
                s.name
            );
            let names: HashSet<_> = s.variants.iter().map(|v| v.name).collect();
            assert_eq!(names.len(), s.variants.len());
        }
    }

    #[test]
    fn needs_reject_unset_offsets() {
        for s in STAGES {
            for v in s.variants {
                assert!((v.needs)(&Config::UNSET).is_err(), "{}/{}", s.name, v.name);
            }
        }
    }
}
