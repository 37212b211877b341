//! `net.rx.host_stack`: a packet received on an uplink (net:netif_receive_skb, before the
//! bridge takes it) to its transmit on a tap (net:net_dev_start_xmit, before tun queues it for
//! the backend, so the backend cannot have taken it yet). Matched by skb address; labelled by
//! tap and uplink.

use super::{MAX_AGE_NS, NetSample, Phase, SkbSlot, backend_queue};
use crate::maps::Counter;

/// net:netif_receive_skb of `skb` on uplink `uplink`: its slot starts the stage. A slot holding
/// another packet still in flight is taken over (`start_map_full`).
#[inline(always)]
pub fn on_uplink_rx(slot: &mut SkbSlot, skb: u64, now_ns: u64, uplink: u32) -> Result<(), Counter> {
    slot.put(SkbSlot::new(skb, now_ns, uplink, 0, 0, Phase::Received))
}

/// A packet received on a device that is no uplink frees a slot that held that skb: its
/// address was another packet's, freed where no tracepoint saw it.
#[inline(always)]
pub fn on_other_rx(slot: &mut SkbSlot, skb: u64) {
    if skb != 0 && slot.skb == skb {
        slot.skb = 0;
    }
}

/// What net:net_dev_start_xmit of `skb` on a tap ended of this stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// A packet from an uplink: its time in the host stack.
    Sample(NetSample),
    /// A start too old to be this packet's (`stale`).
    Stale,
    /// A packet the host itself sent to the guest: no host-stack time.
    NotFromUplink,
}

/// net:net_dev_start_xmit of `skb` on tap `tap`, to its queue `queue` (plus one): ends this
/// stage when the packet came from an uplink, and starts `net.rx.backend_queue` either way (a
/// packet the host itself sent to the guest has no host-stack time, but does wait for the
/// backend).
#[inline(always)]
pub fn on_tap_xmit(
    slot: &mut SkbSlot,
    skb: u64,
    now_ns: u64,
    tap: u32,
    queue: u32,
) -> (Ended, Result<(), Counter>) {
    let copy = *slot;
    let age = now_ns.saturating_sub(copy.ts_ns);
    let ended = match copy.holds(skb, Phase::Received) {
        true if age > MAX_AGE_NS => Ended::Stale,
        true => Ended::Sample(NetSample {
            latency_ns: age,
            uplink: copy.uplink,
            tap,
            queue,
        }),
        false => Ended::NotFromUplink,
    };
    let uplink = match ended {
        Ended::Sample(s) => s.uplink,
        _ => 0,
    };
    (
        ended,
        backend_queue::start(slot, skb, now_ns, uplink, tap, queue),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_to_tap_is_measured_and_hands_over_to_the_backend_queue() {
        let mut s = SkbSlot::default();
        on_uplink_rx(&mut s, 0xa0, 1_000, 3).unwrap();
        let (ended, started) = on_tap_xmit(&mut s, 0xa0, 1_750, 4, 0);
        assert_eq!(
            ended,
            Ended::Sample(NetSample {
                latency_ns: 750,
                uplink: 3,
                tap: 4,
                queue: 0
            })
        );
        assert_eq!(started, Ok(()));
        assert!(s.holds(0xa0, Phase::Queued));
        assert_eq!((s.ts_ns, s.uplink, s.tap), (1_750, 3, 4));
    }

    #[test]
    fn a_packet_the_host_sent_has_no_host_stack_time_but_is_queued() {
        let mut s = SkbSlot::default();
        let (ended, started) = on_tap_xmit(&mut s, 0xb0, 500, 4, 0);
        assert_eq!((ended, started), (Ended::NotFromUplink, Ok(())));
        assert!(s.holds(0xb0, Phase::Queued));
        assert_eq!(s.uplink, 0);
    }

    #[test]
    fn another_skb_in_the_slot_is_evicted_and_counted() {
        let mut s = SkbSlot::default();
        on_uplink_rx(&mut s, 0xa0, 1, 3).unwrap();
        assert_eq!(on_uplink_rx(&mut s, 0xc0, 2, 3), Err(Counter::StartFull));
        // the evicted packet's transmit finds nothing of its own
        assert_eq!(on_tap_xmit(&mut s, 0xa0, 3, 4, 0).0, Ended::NotFromUplink);
    }

    #[test]
    fn a_start_left_by_a_freed_packet_is_stale_or_cleared() {
        let mut s = SkbSlot::default();
        on_uplink_rx(&mut s, 0xa0, 1_000, 3).unwrap();
        // freed unseen; its address comes back to a tap seconds later
        let later = 1_000 + MAX_AGE_NS + 1;
        assert_eq!(on_tap_xmit(&mut s, 0xa0, later, 4, 0).0, Ended::Stale);
        // or is received again on a device that is no uplink
        let mut s = SkbSlot::default();
        on_uplink_rx(&mut s, 0xb0, 1_000, 3).unwrap();
        on_other_rx(&mut s, 0xb0);
        assert_eq!(s.skb, 0);
    }

    #[test]
    fn a_torn_slot_gives_no_sample() {
        let mut s = SkbSlot::default();
        on_uplink_rx(&mut s, 0xa0, 1_000, 3).unwrap();
        s.ts_ns = 900; // another CPU's half-written start
        assert_eq!(
            on_tap_xmit(&mut s, 0xa0, 2_000, 4, 0).0,
            Ended::NotFromUplink
        );
    }
}
