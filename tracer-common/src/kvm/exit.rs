//! `kvm.exit`, from kvm:kvm_exit to the same vCPU
//! thread's next kvm:kvm_entry (the exit is handled in the kernel or, when KVM returns to the
//! VMM, in userspace; both are inside the interval).

use crate::{assert_size, maps::Counter, rules::Starts};

/// What is remembered of an exit until its thread enters the guest again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStart {
    pub ts_ns: u64,
    pub reason: u32,
    pub vcpu: u32,
}
assert_size!(ExitStart, 16);

/// One finished exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitSample {
    pub latency_ns: u64,
    pub reason: u32,
    pub vcpu: u32,
}

/// kvm:kvm_exit's `isa` for Intel VMX (2 is AMD SVM).
pub const ISA_VMX: u32 = 1;
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

/// kvm:kvm_exit on vCPU thread `tid`. A vCPU thread runs one vCPU, so the thread is the key.
pub fn on_exit<S: Starts<u32, ExitStart>>(
    starts: &mut S,
    tid: u32,
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
        },
    )
}

/// kvm:kvm_entry on thread `tid`. The first entry after KVM_RUN has no exit before it: that is
/// not an error, so it returns `None` rather than counting an unmatched event.
pub fn on_entry<S: Starts<u32, ExitStart>>(
    starts: &mut S,
    tid: u32,
    now_ns: u64,
) -> Option<ExitSample> {
    let start = starts.take(&tid)?;
    Some(ExitSample {
        latency_ns: now_ns.saturating_sub(start.ts_ns),
        reason: start.reason,
        vcpu: start.vcpu,
    })
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] integers, no padding, size asserted.
unsafe impl aya::Pod for ExitStart {}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{string::String, vec::Vec};

    use super::*;
    use crate::rules::testing::MapStarts;

    /// Replays a recorded event sequence (`ts_ns tid event [reason=N] [vcpu=N]`, `#` comments)
    /// through the rules and returns the samples, as the BPF programs would record them.
    fn replay(text: &str) -> Vec<ExitSample> {
        let mut starts = MapStarts::new(64);
        let mut out = Vec::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let mut f = line.split_whitespace();
            let ts: u64 = f.next().unwrap().parse().unwrap();
            let tid: u32 = f.next().unwrap().parse().unwrap();
            let ev = String::from(f.next().unwrap());
            let kv = |k: &str| -> u32 {
                line.split_whitespace()
                    .find_map(|p| p.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                    .map_or(0, |v| v.parse().unwrap())
            };
            match ev.as_str() {
                "kvm_exit" => {
                    on_exit(&mut starts, tid, ts, kv("reason"), kv("isa"), kv("vcpu")).unwrap()
                }
                "kvm_entry" => out.extend(on_entry(&mut starts, tid, ts)),
                other => panic!("unknown event {other}"),
            }
        }
        out
    }

    #[test]
    fn recorded_two_vcpu_sequence() {
        // Recorded shape of a 2-vCPU VMX guest: interleaved exits on two vCPU threads,
        // an EPT violation handled in the kernel and an I/O exit that went to userspace.
        let got = replay(include_str!("../../../tests/fixtures/kvm_exit.events"));
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
        assert!(replay("10 7 kvm_entry vcpu=0\n20 7 kvm_entry vcpu=0").is_empty());
    }
}
