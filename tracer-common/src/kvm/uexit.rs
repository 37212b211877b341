//! `kvm.userspace_exit`: from kvm:kvm_userspace_exit (KVM_RUN returns to the VMM) to the same
//! thread's next `ioctl(KVM_RUN)` entry: the time the VMM spends handling an exit in userspace
//! (device emulation, QEMU without ioeventfd), labelled by exit reason.
//!
//! The vCPU is the file descriptor KVM_RUN is called on (a vCPU fd); the daemon turns it into
//! the vcpu id from /proc/PID/fd (`anon_inode:kvm-vcpu:N`). Halts (`kvm.halt_wakeup`) use the
//! same thread-to-fd map, learned here. Entries keyed by thread carry their VM, so the daemon
//! removes them with the VM without looking up each thread.

use crate::{assert_size, maps::Counter, rules::Starts};

/// `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u32 = 0xae80;
/// `_IOW(KVMIO, 0xa5, struct kvm_msi)`.
pub const KVM_SIGNAL_MSI: u32 = 0x4020_aea5;
/// `_IO(KVMIO, 0x01)`.
pub const KVM_CREATE_VM: u32 = 0xae01;

/// Marks a `detail` that is an errno (KVM_RUN failed, -EINTR for a signal), not an exit reason.
pub const ERRNO_DETAIL: u32 = 1 << 16;

/// vCPU of a thread not yet seen entering KVM_RUN.
pub const NO_VCPU: u32 = u32::MAX;

/// Set in a [`VcpuThread`]'s `fd` when it holds the vCPU's id instead of its fd: what a function
/// probe on `kvm_arch_vcpu_ioctl_run(struct kvm_vcpu *)` reads (the fd is the system call's).
pub const VCPU_ID_FLAG: u32 = 1 << 31;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UexitStart {
    pub ts_ns: u64,
    pub detail: u32,
    /// tgid of the VMM.
    pub vm: u32,
}
assert_size!(UexitStart, 16);

/// The vCPU a thread runs: the fd it passes to KVM_RUN, and its VMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuThread {
    pub fd: u32,
    pub vm: u32,
}
assert_size!(VcpuThread, 8);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UexitSample {
    pub latency_ns: u64,
    pub detail: u32,
}

/// `detail` of kvm_userspace_exit(reason, errno): the KVM_EXIT_* reason, or the errno.
pub const fn uexit_detail(reason: u32, errno: i32) -> u32 {
    if errno < 0 {
        ERRNO_DETAIL | (errno.unsigned_abs() & 0xffff)
    } else {
        reason & 0xffff
    }
}

/// kvm:kvm_userspace_exit in vCPU thread `tid`.
pub fn on_userspace_exit<S: Starts<u32, UexitStart>>(
    starts: &mut S,
    tid: u32,
    tgid: u32,
    now_ns: u64,
    reason: u32,
    errno: i32,
) -> Result<(), Counter> {
    let start = UexitStart {
        ts_ns: now_ns,
        detail: uexit_detail(reason, errno),
        vm: tgid,
    };
    starts.start(tid, start)
}

/// ioctl(fd, KVM_RUN) entry in thread `tid` of VMM `tgid`: records which vCPU fd the thread
/// runs. True when that is news (the thread's first KVM_RUN, or another fd, or a reused
/// thread id): the daemon is then told, to name the vCPU while its fd exists.
pub fn learn_vcpu<F: Starts<u32, VcpuThread>>(
    vcpu_fds: &mut F,
    tid: u32,
    tgid: u32,
    fd: u32,
) -> Result<bool, Counter> {
    let thread = VcpuThread { fd, vm: tgid };
    if vcpu_fds.get(&tid) == Some(thread) {
        return Ok(false);
    }
    vcpu_fds.start(tid, thread).map(|()| true)
}

/// ioctl(KVM_RUN) entry in thread `tid` of VMM `tgid`: ends its pending exit to userspace. A
/// start of another VMM is what a dead thread left under a reused thread id: `stale`.
pub fn on_run<S: Starts<u32, UexitStart>>(
    starts: &mut S,
    tid: u32,
    tgid: u32,
    now_ns: u64,
) -> Result<Option<UexitSample>, Counter> {
    let Some(s) = starts.take(&tid) else {
        return Ok(None);
    };
    if s.vm != tgid {
        return Err(Counter::Stale);
    }
    Ok(Some(UexitSample {
        latency_ns: now_ns.saturating_sub(s.ts_ns),
        detail: s.detail,
    }))
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)] integers, no padding, sizes asserted.
    unsafe impl aya::Pod for super::UexitStart {}
    unsafe impl aya::Pod for super::VcpuThread {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::rules::testing::{MapStarts, events};

    /// (latency, detail, vcpu fd) of each sample.
    type Samples = Vec<(u64, u32, u32)>;

    /// Replays `ts tgid/tid event fields`: kvm_userspace_exit reason= errno=, kvm_run fd=.
    /// Returns the samples, the thread-to-fd map, the vCPU notices and the stale starts.
    fn replay(text: &str) -> (Samples, MapStarts<u32, VcpuThread>, usize, usize) {
        let mut starts = MapStarts::new(64);
        let mut fds = MapStarts::new(64);
        let mut out = Vec::new();
        let (mut notices, mut stale) = (0, 0);
        for e in events(text) {
            match e.name {
                "kvm_userspace_exit" => on_userspace_exit(
                    &mut starts,
                    e.tid,
                    e.tgid,
                    e.ts,
                    e.u("reason") as u32,
                    e.u("errno") as i64 as i32,
                )
                .unwrap(),
                "kvm_run" => {
                    let fd = e.u("fd") as u32;
                    notices += learn_vcpu(&mut fds, e.tid, e.tgid, fd).unwrap() as usize;
                    match on_run(&mut starts, e.tid, e.tgid, e.ts) {
                        Ok(s) => out.extend(s.map(|s| (s.latency_ns, s.detail, fd))),
                        Err(Counter::Stale) => stale += 1,
                        Err(c) => panic!("{c:?}"),
                    }
                }
                other => panic!("unknown event {other}"),
            }
        }
        (out, fds, notices, stale)
    }

    #[test]
    fn replays_pio_exits_and_a_signal() {
        let (got, fds, notices, stale) =
            replay(include_str!("../../../tests/fixtures/kvm_uexit.events"));
        assert_eq!(
            got,
            [
                (20_000, 2, 12),
                (200_500, 2, 12),
                (3_000, 6, 13),
                (50_000, ERRNO_DETAIL | 4, 12),
            ]
        );
        assert_eq!(fds.map.get(&802), Some(&VcpuThread { fd: 13, vm: 800 }));
        // 801's id was reused by VMM 900: its dead start is dropped, the new vCPU noticed
        assert_eq!(fds.map.get(&801), Some(&VcpuThread { fd: 7, vm: 900 }));
        assert_eq!((notices, stale), (3, 1));
    }
}
