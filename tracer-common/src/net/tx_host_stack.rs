//! `net.tx.host_stack`: a guest's packet entering the host stack from its tap
//! (net:netif_receive_skb on the tap, in the backend's thread: QEMU's write, vhost's
//! tun_sendmsg) to its transmit on an uplink (net:net_dev_start_xmit, after the uplink's qdisc).
//! The mirror of `net.rx.host_stack`, matched by skb address in the same slots; labelled by tap
//! and uplink. A packet sent to another tap becomes that guest's received packet (the receive
//! side takes the slot over); one delivered to the host or freed on the way gives no sample and
//! frees its slot.

use super::{MAX_AGE_NS, NetSample, Phase, SkbSlot};
use crate::maps::Counter;

/// net:netif_receive_skb of `skb` on tap `tap`: its slot starts the stage. A slot holding
/// another packet still in flight is taken over (`start_map_full`).
#[inline(always)]
pub fn on_tap_rx(slot: &mut SkbSlot, skb: u64, now_ns: u64, tap: u32) -> Result<(), Counter> {
    slot.put(SkbSlot::new(skb, now_ns, 0, tap, 0, Phase::Sent))
}

/// net:net_dev_start_xmit of `skb` on uplink `uplink`: the sample (or `stale`) when the slot
/// holds the packet a tap sent, which frees it; None for any other packet.
#[inline(always)]
pub fn on_uplink_xmit(
    slot: &mut SkbSlot,
    skb: u64,
    now_ns: u64,
    uplink: u32,
) -> Option<Result<NetSample, Counter>> {
    let copy = *slot;
    if !copy.holds(skb, Phase::Sent) {
        return None;
    }
    slot.skb = 0;
    let age = now_ns.saturating_sub(copy.ts_ns);
    Some(if age > MAX_AGE_NS {
        Err(Counter::Stale)
    } else {
        Ok(NetSample {
            latency_ns: age,
            uplink,
            tap: copy.tap,
            queue: 0,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{backend_queue, host_stack};

    #[test]
    fn tap_to_uplink_is_measured_once() {
        let mut s = SkbSlot::default();
        on_tap_rx(&mut s, 0xa0, 1_000, 4).unwrap();
        assert_eq!(
            on_uplink_xmit(&mut s, 0xa0, 1_300, 3),
            Some(Ok(NetSample {
                latency_ns: 300,
                uplink: 3,
                tap: 4,
                queue: 0
            }))
        );
        assert_eq!(s.skb, 0, "the slot is freed");
        assert_eq!(on_uplink_xmit(&mut s, 0xa0, 1_400, 3), None);
    }

    #[test]
    fn other_packets_on_the_uplink_are_not_measured() {
        let mut s = SkbSlot::default();
        // the host's own packet on the uplink: nothing started
        assert_eq!(on_uplink_xmit(&mut s, 0xb0, 10, 3), None);
        // a packet received from the wire, still in the host stack: not a sent one
        host_stack::on_uplink_rx(&mut s, 0xc0, 10, 3).unwrap();
        assert_eq!(on_uplink_xmit(&mut s, 0xc0, 20, 3), None);
        assert!(s.holds(0xc0, Phase::Received), "left to the receive side");
    }

    #[test]
    fn a_packet_to_another_tap_or_freed_on_the_way_leaves_no_start() {
        // guest to guest: the other tap's transmit makes it a queued packet of that guest
        let mut s = SkbSlot::default();
        on_tap_rx(&mut s, 0xa0, 1_000, 4).unwrap();
        let (ended, _) = host_stack::on_tap_xmit(&mut s, 0xa0, 1_100, 5, 1);
        assert_eq!(ended, host_stack::Ended::NotFromUplink);
        assert_eq!(on_uplink_xmit(&mut s, 0xa0, 1_200, 3), None);
        // delivered to the host (consumed) or dropped by the bridge: the free clears the slot
        for dropped in [false, true] {
            let mut s = SkbSlot::default();
            on_tap_rx(&mut s, 0xa0, 1_000, 4).unwrap();
            assert_eq!(
                backend_queue::on_free(&mut s, 0xa0, 1_100, dropped),
                Ok(None)
            );
            assert_eq!(s.skb, 0);
        }
        // received again on the bridge device (local delivery): cleared too
        let mut s = SkbSlot::default();
        on_tap_rx(&mut s, 0xa0, 1_000, 4).unwrap();
        host_stack::on_other_rx(&mut s, 0xa0);
        assert_eq!(s.skb, 0);
    }

    #[test]
    fn an_old_start_is_stale_and_an_evicted_one_is_counted() {
        let mut s = SkbSlot::default();
        on_tap_rx(&mut s, 0xa0, 1_000, 4).unwrap();
        let later = 1_000 + MAX_AGE_NS + 1;
        assert_eq!(
            on_uplink_xmit(&mut s, 0xa0, later, 3),
            Some(Err(Counter::Stale))
        );
        on_tap_rx(&mut s, 0xa0, 1_000, 4).unwrap();
        assert_eq!(on_tap_rx(&mut s, 0xd0, 1_001, 4), Err(Counter::StartFull));
        assert_eq!(on_uplink_xmit(&mut s, 0xa0, 1_002, 3), None);
    }
}
