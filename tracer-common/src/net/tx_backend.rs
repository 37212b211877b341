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
}
assert_size!(TxRun, 16);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], a u64 and two u32s, size asserted.
unsafe impl aya::Pod for TxRun {}

/// A frame entering the host stack on a tap in a thread whose latest run is `run`: its latency
/// from the run's start; `stale` when the run is older than [`MAX_AGE_NS`] (no run since: the
/// frame is not the run's).
#[inline(always)]
pub fn on_tap_rx(run: &TxRun, now_ns: u64) -> Result<u64, Counter> {
    let age = now_ns.saturating_sub(run.ts_ns);
    if age > MAX_AGE_NS {
        Err(Counter::Stale)
    } else {
        Ok(age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_frame_of_a_run_is_measured_from_its_start() {
        let run = TxRun {
            ts_ns: 1_000,
            vm: 10,
            backend: 1,
        };
        assert_eq!(on_tap_rx(&run, 3_000), Ok(2_000));
        assert_eq!(on_tap_rx(&run, 7_000), Ok(6_000));
        assert_eq!(on_tap_rx(&run, 1_000 + MAX_AGE_NS + 1), Err(Counter::Stale));
    }
}
