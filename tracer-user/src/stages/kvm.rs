//! KVM stages, shared by both paths. A VMM is known from its first KVM event (or its
//! KVM_CREATE_VM, where a syscall tracepoint is attached), and a vCPU thread from its KVM_RUN
//! (`kvm_vcpu_run`, an optional event of every stage that labels by vCPU), so a VM is named while it
//! exists however short its life.
//!
//! The VMM's requests (KVM_RUN, an irqfd signal, KVM_SIGNAL_MSI) come from the KVM functions that
//! serve them; only where neither fentry nor kprobes work do system call tracepoints stand in,
//! and only for the stages named in `--stages` (or with `--syscall-tracepoints`): any of them puts
//! every task of the host on the slow system call path.

use tracer_common::{
    config::Config,
    stage::{StageId, stand_in},
};

use super::{
    Event, Family, Path, Stage, all_set, classic, function_or_syscalls, none, tracepoint,
    tracepoint_or_function,
};
use crate::maps::{INJ_PENDING, KVM_EXIT_START, SIG_DEFERRED, SIG_START, UEXIT_START, VCPU_FD};

fn kvm_exit_fields(_: Family, c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.tp_kvm_exit_reason, c.tp_kvm_exit_isa, c.tp_kvm_exit_vcpu],
        "kvm:kvm_exit format lacks exit_reason, isa or vcpu_id (is KVM built?)",
    )
}

fn kvm_entry_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(&[c.tp_kvm_entry_vcpu], "kvm_entry format lacks vcpu_id"),
        _ => all_set(
            &[c.vcpu_id],
            "struct kvm_vcpu.vcpu_id not in BTF (is KVM built?)",
        ),
    }
}

fn set_irq_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(&[c.tp_set_irq_level], "kvm_set_irq format lacks level"),
        _ => Ok(()),
    }
}

fn accept_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(
            &[c.tp_accept_apicid],
            "kvm_apic_accept_irq format lacks apicid",
        ),
        Family::FEntry | Family::KProbe => all_set(
            &[c.lapic_vcpu, c.vcpu_id],
            "struct kvm_lapic.vcpu or kvm_vcpu.vcpu_id not in BTF (is KVM loaded?)",
        ),
        _ => Ok(()),
    }
}

fn queue_work_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(
            &[c.tp_queue_work, c.tp_queue_function],
            "workqueue_queue_work format lacks work or function",
        ),
        _ => all_set(&[c.work_func], "struct work_struct.func not in BTF"),
    }
}

fn exec_work_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(
            &[c.tp_exec_work, c.tp_exec_function],
            "workqueue_execute_start format lacks work or function",
        ),
        _ => all_set(&[c.work_func], "struct work_struct.func not in BTF"),
    }
}

fn wakeup_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(
            &[c.tp_wakeup_ns, c.tp_wakeup_waited],
            "kvm_vcpu_wakeup format lacks ns or waited",
        ),
        _ => Ok(()),
    }
}

fn uexit_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Tracepoint => all_set(
            &[c.tp_uexit_reason, c.tp_uexit_errno],
            "kvm_userspace_exit format lacks reason or errno",
        ),
        _ => Ok(()),
    }
}

fn write_needs(_: Family, c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.tp_write_count],
        "syscalls:sys_enter_write lacks count (CONFIG_FTRACE_SYSCALLS?)",
    )
}

fn ioctl_needs(_: Family, c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.tp_ioctl_fd, c.tp_ioctl_cmd],
        "syscalls:sys_enter_ioctl lacks fd or cmd (CONFIG_FTRACE_SYSCALLS?)",
    )
}

// kvm/kvm_exit: the reason is computed inside the tracepoint: classic only
pub static KVM_EXIT: Event = classic("kvm", "kvm_exit", "kvm_exit", kvm_exit_fields);
// void trace_kvm_entry(struct kvm_vcpu *vcpu, bool force_immediate_exit)
pub static KVM_ENTRY: Event = tracepoint("kvm", "kvm_entry", "kvm_entry", kvm_entry_needs);
// void trace_kvm_msi_set_irq(__u64 address, __u64 data)
pub static KVM_MSI_SET_IRQ: Event = tracepoint("kvm", "kvm_msi_set_irq", "kvm_msi_set_irq", none);
// void trace_kvm_set_irq(unsigned int gsi, int level, int irq_source_id)
pub static KVM_SET_IRQ: Event = tracepoint("kvm", "kvm_set_irq", "kvm_set_irq", set_irq_needs);
// void trace_kvm_apic_accept_irq(__u32 apicid, __u16 dm, __u16 tm, __u8 vec)
// The vendor's deliver_interrupt(struct kvm_lapic *apic, int delivery_mode, int trig_mode,
// int vector), which __apic_accept_irq calls right after it fires the tracepoint, for each
// fixed or lowest-priority interrupt (device MSIs; not NMI, INIT, SIPI): apicid is
// apic->vcpu->vcpu_id (kvm_amd, kvm_intel: module functions)
pub static KVM_APIC_ACCEPT_IRQ: Event = tracepoint_or_function(
    "kvm",
    "kvm_apic_accept_irq",
    "kvm_apic_accept_irq",
    &["svm_deliver_interrupt", "vmx_deliver_interrupt"],
    accept_needs,
);
// void trace_workqueue_queue_work(int req_cpu, struct pool_workqueue *pwq, struct work_struct *work)
pub static WORKQUEUE_QUEUE_WORK: Event = tracepoint(
    "workqueue",
    "workqueue_queue_work",
    "workqueue_queue_work",
    queue_work_needs,
);
// void trace_workqueue_execute_start(struct work_struct *work)
pub static WORKQUEUE_EXECUTE_START: Event = tracepoint(
    "workqueue",
    "workqueue_execute_start",
    "workqueue_execute_start",
    exec_work_needs,
);
// void trace_kvm_vcpu_wakeup(__u64 ns, bool waited, bool valid)
pub static KVM_VCPU_WAKEUP: Event =
    tracepoint("kvm", "kvm_vcpu_wakeup", "kvm_vcpu_wakeup", wakeup_needs);
// void trace_kvm_userspace_exit(__u32 reason, int errno)
pub static KVM_USERSPACE_EXIT: Event = tracepoint(
    "kvm",
    "kvm_userspace_exit",
    "kvm_userspace_exit",
    uexit_needs,
);
// System calls have only classic per-syscall tracepoints (the raw sys_enter one fires for
// every system call on the host).
pub static SYS_ENTER_WRITE: Event = classic(
    "syscalls",
    "sys_enter_write",
    "sys_enter_write",
    write_needs,
);
pub static SYS_EXIT_WRITE: Event = classic("syscalls", "sys_exit_write", "sys_exit_write", none);
pub static SYS_ENTER_IOCTL: Event = classic(
    "syscalls",
    "sys_enter_ioctl",
    "sys_enter_ioctl",
    ioctl_needs,
);
pub static SYS_EXIT_IOCTL: Event = classic("syscalls", "sys_exit_ioctl", "sys_exit_ioctl", none);

/// The function probes read `vcpu->vcpu_id`; the stand-in (sys_enter_ioctl) has its own needs.
fn vcpu_run_needs(f: Family, c: &Config) -> Result<(), &'static str> {
    match f {
        Family::Syscall => Ok(()),
        _ => all_set(
            &[c.vcpu_id],
            "struct kvm_vcpu.vcpu_id not in BTF (is KVM built?)",
        ),
    }
}

// int kvm_arch_vcpu_ioctl_run(struct kvm_vcpu *vcpu): ioctl(KVM_RUN) in the vCPU thread; the
// stand-in's KVM_RUN reads the fd, and also sees KVM_CREATE_VM.
pub static KVM_VCPU_RUN: Event = function_or_syscalls(
    "kvm_vcpu_run",
    &["kvm_arch_vcpu_ioctl_run"],
    &[&SYS_ENTER_IOCTL],
    stand_in::KVM_RUN,
    vcpu_run_needs,
);
// int kvm_send_userspace_msi(struct kvm *kvm, struct kvm_msi *msi): ioctl(KVM_SIGNAL_MSI)
pub static KVM_SIGNAL_MSI: Event = function_or_syscalls(
    "kvm_signal_msi",
    &["kvm_send_userspace_msi"],
    &[&SYS_ENTER_IOCTL, &SYS_EXIT_IOCTL],
    stand_in::SIGNAL_MSI,
    none,
);
// int irqfd_wakeup(wait_queue_entry_t *wait, unsigned mode, int sync, void *key): a write to an
// irqfd's eventfd, in the writer's context (the stand-in: any 8-byte write of a VMM)
pub static IRQFD_WAKEUP: Event = function_or_syscalls(
    "irqfd_wakeup",
    &["irqfd_wakeup"],
    &[&SYS_ENTER_WRITE, &SYS_EXIT_WRITE],
    stand_in::IRQFD,
    none,
);

fn irqfd_inject_known(c: &Config) -> Result<(), &'static str> {
    if c.irqfd_inject == 0 {
        Err(
            "irqfd_inject not in /proc/kallsyms (needs CAP_SYSLOG): deferred injections cannot be followed",
        )
    } else {
        Ok(())
    }
}

pub static EXIT: Stage = Stage {
    id: StageId::KvmExit,
    name: "kvm.exit",
    path: Path::Kvm,
    from: "kvm:kvm_exit",
    to: "kvm:kvm_entry (same vCPU thread)",
    labels: &["vm", "vcpu", "reason"],
    events: &[&KVM_EXIT, &KVM_ENTRY],
    optional: &[&KVM_VCPU_RUN],
    optional_adds: "names vCPUs",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[&KVM_EXIT_START],
};

pub static SIGNAL_TO_INJECT: Stage = Stage {
    id: StageId::KvmSignalToInject,
    name: "kvm.signal_to_inject",
    path: Path::Kvm,
    from: "irqfd signal (irqfd_wakeup) / KVM_SIGNAL_MSI (kvm_send_userspace_msi); syscall stand-ins: the write / ioctl entry",
    to: "kvm:kvm_msi_set_irq (same task) / kvm:kvm_set_irq (kworker, via workqueue)",
    labels: &["vm", "signal", "inject"],
    events: &[
        &IRQFD_WAKEUP,
        &KVM_SIGNAL_MSI,
        &KVM_MSI_SET_IRQ,
        &KVM_SET_IRQ,
        &WORKQUEUE_QUEUE_WORK,
        &WORKQUEUE_EXECUTE_START,
    ],
    optional: &[&KVM_VCPU_RUN],
    optional_adds: "names vCPUs",
    opt_in: None,
    without: None,
    needs: irqfd_inject_known,
    key_class: None,
    maps: &[&SIG_START, &SIG_DEFERRED],
};

pub static INJECT_TO_ENTRY: Stage = Stage {
    id: StageId::KvmInjectToEntry,
    name: "kvm.inject_to_entry",
    path: Path::Kvm,
    from: "kvm:kvm_msi_set_irq / kvm:kvm_set_irq (+ kvm:kvm_apic_accept_irq: destination)",
    to: "kvm:kvm_entry of the destination vCPU",
    labels: &["vm", "vcpu", "device"],
    events: &[
        &KVM_MSI_SET_IRQ,
        &KVM_SET_IRQ,
        &KVM_APIC_ACCEPT_IRQ,
        &KVM_ENTRY,
    ],
    optional: &[&KVM_VCPU_RUN],
    optional_adds: "names vCPUs",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[&INJ_PENDING],
};

pub static HALT_WAKEUP: Stage = Stage {
    id: StageId::KvmHaltWakeup,
    name: "kvm.halt_wakeup",
    path: Path::Kvm,
    from: "vCPU halts (measured by KVM)",
    to: "kvm:kvm_vcpu_wakeup (ns, waited)",
    labels: &["vm", "vcpu", "wait"],
    events: &[&KVM_VCPU_WAKEUP],
    optional: &[&KVM_VCPU_RUN],
    optional_adds: "names vCPUs",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[&VCPU_FD],
};

pub static USERSPACE_EXIT: Stage = Stage {
    id: StageId::KvmUserspaceExit,
    name: "kvm.userspace_exit",
    path: Path::Kvm,
    from: "kvm:kvm_userspace_exit",
    to: "KVM_RUN, same thread (kvm_arch_vcpu_ioctl_run; syscall stand-in: the ioctl entry)",
    labels: &["vm", "vcpu", "reason"],
    events: &[&KVM_USERSPACE_EXIT, &KVM_VCPU_RUN],
    optional: &[],
    optional_adds: "",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[&UEXIT_START, &VCPU_FD],
};
