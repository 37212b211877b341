//! `net.tx.backend_to_wire`: the backend starting a run on a transmit queue (vhost's
//! `handle_tx`, in its worker) to each frame of that run entering the host stack on the tap
//! (net:netif_receive_skb on a tap, in the same thread). Every frame is measured from its run's
//! start, so a batch's last frame includes the work on the ones before it: what a packet waits
//! for its backend once the backend is running. From the tap on, `net.tx.host_stack` takes the
//! frame to the uplink.
//!
//! The run's start is kept per thread and replaced by the next run: in a vhost worker only
//! `handle_tx` hands frames to a tap, so a frame there belongs to the latest run.

use super::MAX_AGE_NS;
use crate::{assert_size, maps::Counter};

/// A backend thread's latest transmit run (a map keyed by thread).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxRun {
    pub ts_ns: u64,
    /// tgid of the VMM the thread serves (what collects the entry when the VMM exits).
    pub vm: u32,
    /// [`super::Backend`].
    pub backend: u32,
    /// The latency of the guest's kick that started the run, when no function probe measures
    /// it (`super::wakeup`), until the run's first frame records it; 0: none.
    pub kick_ns: u64,
}
assert_size!(TxRun, 24);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], two u64s and two u32s (a pair), size asserted.
unsafe impl aya::Pod for TxRun {}

/// A frame entering the host stack on a tap in a thread whose latest run is `run`: its latency
/// from the run's start, and the kick that started the run if this is its first frame (a kick
/// counts only when the run it woke transmits: a userspace backend's thread also wakes for its
/// receive queue's and other devices' kicks); `stale` when the run is older than
/// [`MAX_AGE_NS`] (no run since: the frame is not the run's).
#[inline(always)]
pub fn on_tap_rx(run: &mut TxRun, now_ns: u64) -> Result<(u64, Option<u64>), Counter> {
    let age = now_ns.saturating_sub(run.ts_ns);
    if age > MAX_AGE_NS {
        return Err(Counter::Stale);
    }
    let kick = (run.kick_ns != 0).then_some(run.kick_ns);
    run.kick_ns = 0;
    Ok((age, kick))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_frame_of_a_run_is_measured_from_its_start() {
        let mut run = TxRun {
            ts_ns: 1_000,
            vm: 10,
            backend: 1,
            kick_ns: 0,
        };
        assert_eq!(on_tap_rx(&mut run, 3_000), Ok((2_000, None)));
        assert_eq!(on_tap_rx(&mut run, 7_000), Ok((6_000, None)));
        assert_eq!(
            on_tap_rx(&mut run, 1_000 + MAX_AGE_NS + 1),
            Err(Counter::Stale)
        );
    }

    #[test]
    fn a_kick_is_recorded_with_its_runs_first_frame_only() {
        let mut run = TxRun {
            ts_ns: 1_000,
            vm: 10,
            backend: 0,
            kick_ns: 40_000,
        };
        assert_eq!(on_tap_rx(&mut run, 3_000), Ok((2_000, Some(40_000))));
        assert_eq!(on_tap_rx(&mut run, 4_000), Ok((3_000, None)));
    }
}
