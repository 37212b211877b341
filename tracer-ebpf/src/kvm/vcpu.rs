//! kvm.halt_wakeup (kvm:kvm_vcpu_wakeup's halted time) and kvm.userspace_exit
//! (kvm:kvm_userspace_exit to the thread's next KVM_RUN), which share the map of each vCPU
//! thread's vCPU, learned at KVM_RUN: its id (`VCPU_ID_FLAG`) from the function probe, its fd
//! from the syscall stand-in.

use aya_ebpf::{macros::map, maps::HashMap};
use tracer_common::{
    kvm::{
        halt::halt_detail,
        uexit::{self, NO_VCPU, UexitStart, VcpuThread},
    },
    maps::{MapCounter, NoticeKind, START_ENTRIES},
    stage::StageId,
};

use crate::shared::{
    KernelStarts, count, count_map, notify, now_ns, record, record_or_count, record_reported,
};

/// Exits to userspace not yet followed by KVM_RUN, by vCPU thread; each carries its VM.
#[map]
static UEXIT_START: HashMap<u32, UexitStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// The vCPU each vCPU thread last ran (id or fd), and its VM.
#[map]
static VCPU_FD: HashMap<u32, VcpuThread> = HashMap::with_max_entries(START_ENTRIES, 0);

#[inline(always)]
pub fn wakeup(tgid: u32, tid: u32, ns: u64, waited: bool) {
    let fd = unsafe { VCPU_FD.get(tid) }.map_or(NO_VCPU, |t| t.fd);
    record_reported(StageId::KvmHaltWakeup, halt_detail(waited), fd, tgid, ns);
}

#[inline(always)]
pub fn userspace_exit(tgid: u32, tid: u32, reason: u32, errno: i32) {
    let starts = &mut KernelStarts(&UEXIT_START);
    if let Err(c) = uexit::on_userspace_exit(starts, tid, tgid, now_ns(), reason, errno) {
        count(StageId::KvmUserspaceExit, c);
    }
}

/// KVM_RUN: learns the thread's vCPU, `fd` (an id or an fd; the daemon is told of a new one).
#[inline(always)]
pub fn learn(tgid: u32, tid: u32, fd: u32) {
    match uexit::learn_vcpu(&mut KernelStarts(&VCPU_FD), tid, tgid, fd) {
        Ok(true) => notify(NoticeKind::VcpuRun, tgid, tid, fd),
        Ok(false) => {}
        Err(_) => count_map(MapCounter::VcpuFdFull),
    }
}

/// KVM_RUN: ends the thread's exit to userspace.
#[inline(always)]
pub fn run(tgid: u32, tid: u32, fd: u32) {
    const STAGE: StageId = StageId::KvmUserspaceExit;
    let now = now_ns();
    let ended = uexit::on_run(&mut KernelStarts(&UEXIT_START), tid, tgid, now);
    record_or_count(STAGE, ended, |s| {
        record(STAGE, s.detail, fd, tgid, s.latency_ns, now)
    });
}
