//! `kvm.exit`, from kvm:kvm_exit to the same vCPU
//! thread's next kvm:kvm_entry (the exit is handled in the kernel or, when KVM returns to the
//! VMM, in userspace; both are inside the interval).

use crate::{assert_size, maps::Counter, rules::Starts};

/// What is remembered of an exit until its thread enters the guest again. It carries its VM:
/// the daemon removes it when that VM is gone, and an entry of another VM's thread that reuses
/// the thread id never takes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStart {
    pub ts_ns: u64,
    pub reason: u32,
    pub vcpu: u32,
    /// tgid of the VMM.
    pub vm: u32,
    pub _pad: u32,
}
assert_size!(ExitStart, 24);

/// One finished exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitSample {
    pub latency_ns: u64,
    pub reason: u32,
    pub vcpu: u32,
}

/// kvm:kvm_exit's `isa` for Intel VMX (2 is AMD SVM).
pub const ISA_VMX: u32 = 1;

/// VMX's exit for an EPT misconfiguration: how KVM sees a guest's access to MMIO it emulates,
/// and the whole of a notify it takes on its fast MMIO path (an ioeventfd registered with no
/// length: a modern virtio-pci notify), which fires no kvm:kvm_mmio, and kvm:kvm_fast_mmio only
/// after the ioeventfd woke the backend (`crate::net::wakeup::notify_exit`).
pub const VMX_EPT_MISCONFIG: u32 = 49;
/// Marks a VMX reason in [`exit_detail`]: SVM exit codes never set bit 16.
pub const VMX_DETAIL: u32 = 1 << 16;

/// The `detail` of a kvm.exit histogram key: the exit reason and which vendor's table names
/// it. VMX reasons keep their basic 16 bits (the upper bits are flags such as failed entry).
pub const fn exit_detail(reason: u32, isa: u32) -> u32 {
    if isa == ISA_VMX {
        VMX_DETAIL | (reason & 0xffff)
    } else {
        reason
    }
}

/// Inverse of [`exit_detail`]: (reason, is VMX).
pub const fn split_exit_detail(detail: u32) -> (u32, bool) {
    if detail & VMX_DETAIL != 0 && detail & 0x8000_0000 == 0 {
        (detail & 0xffff, true)
    } else {
        (detail, false)
    }
}

/// kvm:kvm_exit on vCPU thread `tid` of VMM `tgid`. A vCPU thread runs one vCPU, so the
/// thread is the key.
pub fn on_exit<S: Starts<u32, ExitStart>>(
    starts: &mut S,
    tid: u32,
    tgid: u32,
    now_ns: u64,
    reason: u32,
    isa: u32,
    vcpu: u32,
) -> Result<(), Counter> {
    let reason = exit_detail(reason, isa);
    starts.start(
        tid,
        ExitStart {
            ts_ns: now_ns,
            reason,
            vcpu,
            vm: tgid,
            _pad: 0,
        },
    )
}

/// kvm:kvm_entry of `vcpu` (None when it could not be read) on thread `tid` of VMM `tgid`.
/// The first entry after KVM_RUN has no exit before it: not an error, `Ok(None)`. A start of
/// another VM or vCPU is what a dead thread left under a reused thread id: dropped, `stale`.
pub fn on_entry<S: Starts<u32, ExitStart>>(
    starts: &mut S,
    tid: u32,
    tgid: u32,
    vcpu: Option<u32>,
    now_ns: u64,
) -> Result<Option<ExitSample>, Counter> {
    let Some(start) = starts.take(&tid) else {
        return Ok(None);
    };
    if start.vm != tgid || vcpu.is_some_and(|v| v != start.vcpu) {
        return Err(Counter::Stale);
    }
    Ok(Some(ExitSample {
        latency_ns: now_ns.saturating_sub(start.ts_ns),
        reason: start.reason,
        vcpu: start.vcpu,
    }))
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] integers, no padding, size asserted.
unsafe impl aya::Pod for ExitStart {}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::rules::testing::{MapStarts, events, measured};

    /// Replays an event sequence (`ts_ns tgid/tid event [reason=N] [isa=N] [vcpu=N]`, `#`
    /// comments) through the rules: the samples, as the BPF programs would record them, and
    /// the number of stale starts dropped.
    fn replay(text: &str) -> (Vec<ExitSample>, usize) {
        let mut starts = MapStarts::new(64);
        let (mut out, mut stale) = (Vec::new(), 0);
        for e in events(text) {
            let u = |k: &str| e.u(k) as u32;
            match e.name {
                "kvm_exit" => on_exit(
                    &mut starts,
                    e.tid,
                    e.tgid,
                    e.ts,
                    u("reason"),
                    u("isa"),
                    u("vcpu"),
                )
                .unwrap(),
                "kvm_entry" => match on_entry(&mut starts, e.tid, e.tgid, Some(u("vcpu")), e.ts) {
                    Ok(s) => out.extend(s),
                    Err(Counter::Stale) => stale += 1,
                    Err(c) => panic!("{c:?}"),
                },
                other => panic!("unknown event {other}"),
            }
        }
        (out, stale)
    }

    #[test]
    fn replays_two_vcpu_sequence() {
        // The shape of a 2-vCPU VMX guest (hand-written): interleaved exits on two vCPU threads,
        // an EPT violation handled in the kernel and an I/O exit that went to userspace.
        let (got, stale) = replay(include_str!(
            "../../../tests/fixtures/kvm_exit_edges.events"
        ));
        let want = [
            ExitSample {
                latency_ns: 1_800,
                reason: VMX_DETAIL | 48,
                vcpu: 0,
            },
            ExitSample {
                latency_ns: 2_500,
                reason: VMX_DETAIL | 1,
                vcpu: 1,
            },
            ExitSample {
                latency_ns: 900,
                reason: VMX_DETAIL | 12,
                vcpu: 1,
            },
            ExitSample {
                latency_ns: 42_000,
                reason: VMX_DETAIL | 30,
                vcpu: 0,
            },
        ];
        assert_eq!(got, want);
        assert_eq!(stale, 1, "the reused thread id's first entry");
    }

    #[test]
    fn replays_a_recorded_nested_guest_as_the_kernel_programs_measured_it() {
        // Recorded in the distro-kernel VM (cargo xtask vm --record-fixtures): the rules give,
        // per exit reason, what iopath's programs measured over the same window, give or take
        // the exit whose entry fell at either edge of it.
        let text = include_str!("../../../tests/fixtures/kvm_exit.events");
        assert!(text.starts_with("# Recorded"), "the fixture is recorded");
        let (got, stale) = replay(text);
        assert_eq!(stale, 0);
        let mut by_reason = std::collections::BTreeMap::<u64, u64>::new();
        for s in &got {
            *by_reason
                .entry(split_exit_detail(s.reason).0 as u64)
                .or_default() += 1;
        }
        let want: std::collections::BTreeMap<u64, u64> = measured(text)
            .into_iter()
            .map(|(reason, n)| (reason.parse().expect("an exit reason"), n))
            .collect();
        assert!(want.values().sum::<u64>() > 400, "{want:?}");
        for (reason, n) in &want {
            let g = by_reason.get(reason).copied().unwrap_or(0);
            assert!(
                g.abs_diff(*n) <= 1,
                "reason {reason}: {g} replayed, {n} measured"
            );
        }
        assert_eq!(by_reason.len(), want.len(), "{by_reason:?} vs {want:?}");
    }

    #[test]
    fn exit_detail_round_trips_for_both_vendors() {
        // VMX: flags above bit 15 (0x8000_0000 failed entry) are dropped, basic reason kept.
        assert_eq!(split_exit_detail(exit_detail(30, ISA_VMX)), (30, true));
        assert_eq!(
            split_exit_detail(exit_detail(0x8000_0021, ISA_VMX)),
            (0x21, true)
        );
        // SVM: codes pass through, including the 0x8000_xxxx VMGEXIT ones.
        assert_eq!(split_exit_detail(exit_detail(0x7b, 2)), (0x7b, false));
        assert_eq!(
            split_exit_detail(exit_detail(0x8000_0010, 2)),
            (0x8000_0010, false)
        );
        assert_eq!(split_exit_detail(exit_detail(0x400, 2)), (0x400, false));
    }

    #[test]
    fn entry_without_exit_records_nothing() {
        assert_eq!(
            replay("10 7 kvm_entry vcpu=0\n20 7 kvm_entry vcpu=0"),
            (Vec::new(), 0)
        );
    }
}
