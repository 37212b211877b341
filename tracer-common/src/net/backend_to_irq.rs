//! `net.rx.backend_to_irq`: the backend taking a packet off the tap (the end of
//! `net.rx.backend_queue`) to the next interrupt its thread injects (kvm:kvm_msi_set_irq, in
//! the thread that signals the irqfd: QEMU's, or the vhost worker's). A backend takes a batch
//! of packets, then signals once: every packet of the batch ends at that interrupt. The batch
//! is kept per thread, bounded ([`BATCH_MAX`] packets; more are counted `start_map_full`).
//!
//! A thread that blocked (a voluntary context switch: its `nvcsw` moved) with packets it never
//! signalled, and then took another, delivered those without an interrupt (the guest had
//! notifications off: it was polling): at that take they are dropped from the batch, counted
//! `no_interrupt`, never measured up to a later interrupt. Only a take asks: a thread that
//! blocks between its take and its signal (a page fault in the read's copy) still signals
//! that batch. Counting switches instead of tracing sched_switch puts no program on the host's
//! context switches, and follows a thread across CPUs.

use crate::{assert_size, maps::Counter};

/// Packets one thread may take before it signals (a power of two: indexes are masked with it,
/// which is what lets a verifier bound the loop over a batch).
pub const BATCH_MAX: usize = 16;
const _: () = assert!(BATCH_MAX.is_power_of_two());

/// Packets a backend thread took and has not signalled yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    pub len: u32,
    /// The tap of the batch's first packet (a thread serves one queue of one tap).
    pub tap: u32,
    /// [`super::Backend`] and the queue of the batch's first packet: a
    /// [`super::queue_detail`].
    pub backend: u32,
    /// tgid of the VMM the thread serves (what collects the entry when the VMM exits).
    pub vm: u32,
    /// The thread's voluntary context switches when it took the batch's first packet.
    pub nvcsw: u64,
    pub ts_ns: [u64; BATCH_MAX],
}
assert_size!(Batch, 24 + 8 * BATCH_MAX);

impl Batch {
    pub const EMPTY: Batch = Batch {
        len: 0,
        tap: 0,
        backend: 0,
        vm: 0,
        nvcsw: 0,
        ts_ns: [0; BATCH_MAX],
    };
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], u32 fields in pairs then u64s, size asserted.
unsafe impl aya::Pod for Batch {}

/// At a take: packets of the batch the thread took before it last blocked (`nvcsw`: its
/// voluntary context switches now), delivered without an interrupt. Returns how many, and
/// leaves the batch empty if there were any.
#[inline(always)]
pub fn slept(b: &mut Batch, nvcsw: u64) -> u32 {
    if b.len == 0 || b.nvcsw == nvcsw {
        return 0;
    }
    let n = b.len;
    b.len = 0;
    n
}

/// The backend took a packet of `tap` at `now_ns` (call [`slept`] first).
#[inline(always)]
pub fn on_taken(
    b: &mut Batch,
    now_ns: u64,
    tap: u32,
    backend: u32,
    nvcsw: u64,
) -> Result<(), Counter> {
    let n = b.len as usize;
    if n >= BATCH_MAX {
        return Err(Counter::StartFull);
    }
    if n == 0 {
        b.tap = tap;
        b.backend = backend;
        b.nvcsw = nvcsw;
    }
    b.ts_ns[n] = now_ns;
    b.len += 1;
    Ok(())
}

/// The thread injected an interrupt: every packet of the batch ends there (the latency of the
/// i-th is [`latency`], for i below the count returned), and the batch is empty.
#[inline(always)]
pub fn on_irq(b: &mut Batch) -> u32 {
    let n = b.len.min(BATCH_MAX as u32);
    b.len = 0;
    n
}

/// The latency of the batch's `i`-th packet at an interrupt at `now_ns`.
#[inline(always)]
pub fn latency(b: &Batch, i: u32, now_ns: u64) -> u64 {
    now_ns.saturating_sub(b.ts_ns[i as usize & (BATCH_MAX - 1)])
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn every_packet_of_a_batch_ends_at_the_interrupt() {
        let mut b = Batch::EMPTY;
        for t in [100, 130, 170] {
            assert_eq!(slept(&mut b, 7), 0);
            on_taken(&mut b, t, 4, 0, 7).unwrap();
        }
        assert_eq!(slept(&mut b, 7), 0, "no voluntary switch since");
        let n = on_irq(&mut b);
        let got: Vec<u64> = (0..n).map(|i| latency(&b, i, 200)).collect();
        assert_eq!(got, [100, 70, 30]);
        assert_eq!((b.len, b.tap), (0, 4));
        // an interrupt with no packet taken since ends nothing
        assert_eq!(on_irq(&mut b), 0);
    }

    #[test]
    fn a_full_batch_counts_the_rest() {
        let mut b = Batch::EMPTY;
        for t in 0..BATCH_MAX as u64 {
            on_taken(&mut b, t, 4, 1, 0).unwrap();
        }
        assert_eq!(on_taken(&mut b, 99, 4, 1, 0), Err(Counter::StartFull));
        assert_eq!(on_irq(&mut b), BATCH_MAX as u32);
    }

    #[test]
    fn packets_left_when_the_thread_sleeps_had_no_interrupt() {
        let mut b = Batch::EMPTY;
        on_taken(&mut b, 10, 4, 0, 7).unwrap();
        on_taken(&mut b, 20, 4, 0, 7).unwrap();
        // the thread blocked (nvcsw 7 -> 8), then takes again: the two had no interrupt
        assert_eq!(slept(&mut b, 8), 2);
        assert_eq!(on_irq(&mut b), 0, "a later interrupt does not measure them");
        // a new batch starts from the new count
        on_taken(&mut b, 30, 4, 0, 8).unwrap();
        assert_eq!(slept(&mut b, 8), 0);
        assert_eq!(on_irq(&mut b), 1);
    }
}
