//! The VMM's requests that `syscalls` takes from system call tracepoints, from the KVM
//! functions that serve them instead, where fentry or kprobes work: only VMM work reaches
//! these functions, so the host's other processes run no program and keep the fast system
//! call path (any syscall tracepoint puts every task on the slow one).
//!
//! Against the system calls they start later (the eventfd write, the ioctl's dispatch are
//! before them), and they have no return probe: an irqfd wakeup or a KVM_SIGNAL_MSI injects or
//! defers in that thread at once, but one that injects nothing (an invalid MSI route, no
//! in-kernel irqchip) leaves its start, which the thread's next signal replaces and which an
//! injection of that thread's own in between (KVM_IRQ_LINE) would end.

use tracer_common::{
    kvm::{signal::Signal, uexit::VCPU_ID_FLAG},
    maps::Counter,
    stage::StageId::*,
};

use super::{events::vcpu_id, signal, vcpu};
use crate::{
    shared::{
        count_each, current_tgid_tid, in_task, is_vmm, mm_owner_tgid, on, stages_on, vm_created,
        vmm_seen,
    },
    tp::{Site, function},
};

/// EPOLLIN in an eventfd wakeup's key: the counter was written (EPOLLHUP is its release).
const EPOLLIN: u64 = 0x1;

#[inline(always)]
fn vcpu_run(vcpu: Result<u64, ()>, _: Site) {
    let mask = stages_on();
    let (tgid, tid) = current_tgid_tid();
    vmm_seen(tgid, tid);
    let Some(id) = vcpu.ok().and_then(vcpu_id) else {
        count_each(
            mask,
            &[KvmUserspaceExit, KvmHaltWakeup, KvmExit],
            Counter::ReadError,
        );
        return;
    };
    let obj = VCPU_ID_FLAG | id;
    vcpu::learn(tgid, tid, obj);
    if on(mask, KvmUserspaceExit) {
        vcpu::run(tgid, tid, obj);
    }
}

// int kvm_arch_vcpu_ioctl_run(struct kvm_vcpu *vcpu): ioctl(KVM_RUN), in the vCPU thread.
function!(
    "kvm_arch_vcpu_ioctl_run",
    kvm_vcpu_run_fentry,
    kvm_vcpu_run_kprobe,
    |arg| Ok(arg(0)),
    vcpu_run
);

#[inline(always)]
fn signal_msi(_: Result<(), ()>, site: Site) {
    if !on(stages_on(), KvmSignalToInject) {
        return;
    }
    let (tgid, tid) = current_tgid_tid();
    if in_task(site) {
        // Only a VMM makes this ioctl (one that has not run a vCPU yet is known from it).
        vmm_seen(tgid, tid);
        signal::start(tgid, tid, Signal::Ioctl);
    }
}

// int kvm_send_userspace_msi(struct kvm *kvm, struct kvm_msi *msi): ioctl(KVM_SIGNAL_MSI).
function!(
    "kvm_send_userspace_msi",
    kvm_signal_msi_fentry,
    kvm_signal_msi_kprobe,
    |arg| Ok(()),
    signal_msi
);

#[inline(always)]
fn irqfd_wakeup(key: Result<u64, ()>, site: Site) {
    if !on(stages_on(), KvmSignalToInject) {
        return;
    }
    if key.unwrap_or(0) & EPOLLIN == 0 {
        return;
    }
    // A VMM thread's write; not a vhost worker's or a device interrupt's signal (other paths).
    // A VMM that has not run a vCPU yet is known here: its own thread owns its memory (a
    // vhost kthread that adopted it does not).
    let (tgid, tid) = current_tgid_tid();
    // (a VFIO handler's signal interrupted a task: not that task's write)
    if !crate::vfio::Context::of(site).in_task {
        return;
    }
    if !is_vmm(tgid) {
        if mm_owner_tgid() != Some(tgid) {
            return;
        }
        vm_created(tgid, tid);
    }
    signal::start(tgid, tid, Signal::Irqfd);
}

// int irqfd_wakeup(wait_queue_entry_t *wait, unsigned mode, int sync, void *key): an irqfd's
// eventfd woke its waiter, in the writer's context.
function!(
    "irqfd_wakeup",
    irqfd_wakeup_fentry,
    irqfd_wakeup_kprobe,
    |arg| Ok(arg(3)),
    irqfd_wakeup
);
