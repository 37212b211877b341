//! The VMM's system calls that bound KVM stages: an 8-byte write (an eventfd signal, maybe an
//! irqfd) and ioctl(KVM_SIGNAL_MSI) start kvm.signal_to_inject; ioctl(KVM_RUN) ends
//! kvm.userspace_exit. Per-syscall classic tracepoints, so other system calls cost nothing, and
//! processes that run no VM cost one map lookup.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tracer_common::{
    kvm::{
        signal::{self, Signal},
        uexit::{self, KVM_CREATE_VM, KVM_RUN, KVM_SIGNAL_MSI},
    },
    maps::Counter,
    stage::StageId,
};

use crate::{
    irq::SIG_START,
    shared::{KernelStarts, config, count, current_tgid_tid, is_vmm, mark_vmm, now_ns, record},
    vcpu::{UEXIT_START, VCPU_FD},
};

/// An eventfd write carries one u64.
const EVENTFD_WRITE: u64 = 8;

#[inline(always)]
fn signal_start(tgid: u32, tid: u32, how: Signal) {
    if let Err(c) = signal::on_signal(&mut KernelStarts(&SIG_START), tid, tgid, now_ns(), how) {
        count(StageId::KvmSignalToInject, c);
    }
}

#[inline(always)]
fn signal_return() {
    let (tgid, tid) = current_tgid_tid();
    if is_vmm(tgid) {
        signal::on_signal_return(&mut KernelStarts(&SIG_START), tid);
    }
}

// syscalls/sys_enter_write: unsigned int fd; const char *buf; size_t count;
#[tracepoint]
pub fn sys_enter_write_tp(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_tgid_tid();
    if !is_vmm(tgid) {
        return 0;
    }
    if let Ok(EVENTFD_WRITE) = unsafe { ctx.read_at::<u64>(config!(tp_write_count) as usize) } {
        signal_start(tgid, tid, Signal::Irqfd);
    }
    0
}

#[tracepoint]
pub fn sys_exit_write_tp(_ctx: TracePointContext) -> u32 {
    signal_return();
    0
}

// syscalls/sys_enter_ioctl: unsigned int fd; unsigned int cmd; unsigned long arg;
#[tracepoint]
pub fn sys_enter_ioctl_tp(ctx: TracePointContext) -> u32 {
    let Ok(cmd) = (unsafe { ctx.read_at::<u64>(config!(tp_ioctl_cmd) as usize) }) else {
        return 0;
    };
    let cmd = cmd as u32;
    if cmd != KVM_RUN && cmd != KVM_SIGNAL_MSI && cmd != KVM_CREATE_VM {
        return 0;
    }
    let (tgid, tid) = current_tgid_tid();
    if cmd == KVM_CREATE_VM {
        // VMs older than the daemon are seeded from /proc when it starts.
        mark_vmm(tgid);
    } else if cmd == KVM_SIGNAL_MSI {
        signal_start(tgid, tid, Signal::Ioctl);
    } else {
        let Ok(fd) = (unsafe { ctx.read_at::<u64>(config!(tp_ioctl_fd) as usize) }) else {
            count(StageId::KvmUserspaceExit, Counter::ReadError);
            return 0;
        };
        let fd = fd as u32;
        match uexit::on_run(
            &mut KernelStarts(&UEXIT_START),
            &mut KernelStarts(&VCPU_FD),
            tid,
            tgid,
            fd,
            now_ns(),
        ) {
            Ok(Some(s)) => record(StageId::KvmUserspaceExit, s.detail, fd, tgid, s.latency_ns),
            Ok(None) => {}
            Err(c) => count(StageId::KvmUserspaceExit, c),
        }
    }
    0
}

#[tracepoint]
pub fn sys_exit_ioctl_tp(_ctx: TracePointContext) -> u32 {
    signal_return();
    0
}
