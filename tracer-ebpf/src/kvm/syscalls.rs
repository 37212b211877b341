//! The VMM's system calls that bound KVM stages, as per-syscall classic tracepoints (the only
//! ones there are; the raw sys_enter fires for every system call on the host): the stand-ins
//! for `functions` where neither fentry nor kprobes work, each doing only what the daemon set
//! in `stand_ins` (any of them slows every process's system calls). An 8-byte
//! write (an eventfd signal, maybe an irqfd) and ioctl(KVM_SIGNAL_MSI) start
//! kvm.signal_to_inject, their returns drop what injected nothing; ioctl(KVM_RUN) ends
//! kvm.userspace_exit and tells which vCPU a thread runs; ioctl(KVM_CREATE_VM) marks a VMM.
//! Processes that run no VM cost one map lookup (writes) or one compare (ioctls).

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tracer_common::{
    kvm::{
        signal::Signal,
        uexit::{KVM_CREATE_VM, KVM_RUN, KVM_SIGNAL_MSI},
    },
    maps::Counter,
    stage::{
        StageId::{self, *},
        stand_in,
    },
};

use super::{signal, vcpu};
use crate::{
    shared::{config, count_each, current_tgid_tid, is_vmm, on, stages_on, stand_ins, vm_created},
    tp::field,
};

/// An eventfd write carries one u64.
const EVENTFD_WRITE: u64 = 8;

/// sys_enter_ioctl names VMs and vCPUs for every KVM stage.
const IOCTL: [StageId; 5] = [
    KvmExit,
    KvmSignalToInject,
    KvmInjectToEntry,
    KvmHaltWakeup,
    KvmUserspaceExit,
];

#[inline(always)]
fn signal_return(role: u64) {
    if !on(stages_on(), KvmSignalToInject) || stand_ins() & role == 0 {
        return;
    }
    let (tgid, tid) = current_tgid_tid();
    if is_vmm(tgid) {
        signal::returned(tid);
    }
}

// syscalls/sys_enter_write: unsigned int fd; const char *buf; size_t count;
#[tracepoint]
pub fn sys_enter_write_tp(ctx: TracePointContext) -> u32 {
    if !on(stages_on(), KvmSignalToInject) || stand_ins() & stand_in::IRQFD == 0 {
        return 0;
    }
    let (tgid, tid) = current_tgid_tid();
    if !is_vmm(tgid) {
        return 0;
    }
    match field::<u64>(&ctx, config!(tp_write_count)) {
        Ok(EVENTFD_WRITE) => signal::start(tgid, tid, Signal::Irqfd),
        Ok(_) => {}
        Err(()) => count_each(stages_on(), &[KvmSignalToInject], Counter::ReadError),
    }
    0
}

#[tracepoint]
pub fn sys_exit_write_tp(_ctx: TracePointContext) -> u32 {
    signal_return(stand_in::IRQFD);
    0
}

// syscalls/sys_enter_ioctl: unsigned int fd; unsigned int cmd; unsigned long arg;
#[tracepoint]
pub fn sys_enter_ioctl_tp(ctx: TracePointContext) -> u32 {
    let Ok(cmd) = field::<u64>(&ctx, config!(tp_ioctl_cmd)) else {
        count_each(stages_on(), &IOCTL, Counter::ReadError);
        return 0;
    };
    let cmd = cmd as u32;
    if cmd != KVM_RUN && cmd != KVM_SIGNAL_MSI && cmd != KVM_CREATE_VM {
        return 0;
    }
    let (mask, roles) = (stages_on(), stand_ins());
    let (tgid, tid) = current_tgid_tid();
    if cmd == KVM_CREATE_VM {
        // VMs older than the daemon are seeded from /proc when it starts.
        vm_created(tgid, tid);
    } else if cmd == KVM_SIGNAL_MSI {
        // Only a known VMM's: its start is dropped at the return, which looks at those only.
        if on(mask, KvmSignalToInject) && roles & stand_in::SIGNAL_MSI != 0 && is_vmm(tgid) {
            signal::start(tgid, tid, Signal::Ioctl);
        }
    } else if roles & stand_in::KVM_RUN != 0 {
        let Ok(fd) = field::<u64>(&ctx, config!(tp_ioctl_fd)) else {
            count_each(mask, &IOCTL, Counter::ReadError);
            return 0;
        };
        let fd = fd as u32;
        vcpu::learn(tgid, tid, fd);
        if on(mask, KvmUserspaceExit) {
            vcpu::run(tgid, tid, fd);
        }
    }
    0
}

#[tracepoint]
pub fn sys_exit_ioctl_tp(_ctx: TracePointContext) -> u32 {
    signal_return(stand_in::SIGNAL_MSI);
    0
}
