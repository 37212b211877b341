//! `net.rx.backend_queue`: a packet sent to a tap (net:net_dev_start_xmit) to the backend
//! taking it off the tap's queue: skb:consume_skb of that skb in the backend's thread (QEMU's
//! read in tun_do_read, or vhost's tun_recvmsg). A packet freed by skb:kfree_skb instead was
//! dropped (queue full, backend gone): no sample, counted `dropped`. Labelled by VM (the
//! consuming thread's VMM), backend and tap.

use super::{MAX_AGE_NS, NetSample, Phase, SkbSlot};
use crate::maps::Counter;

/// Starts the stage for `skb`, sent to `tap` (after a receive on `uplink`, or 0).
#[inline(always)]
pub fn start(
    slot: &mut SkbSlot,
    skb: u64,
    now_ns: u64,
    uplink: u32,
    tap: u32,
    queue: u32,
) -> Result<(), Counter> {
    slot.put(SkbSlot::new(skb, now_ns, uplink, tap, queue, Phase::Queued))
}

/// skb:consume_skb (`dropped` false) or skb:kfree_skb (true) of `skb`: ends the stage when the
/// slot holds it queued. Every skb the host frees passes here: one not followed is no error
/// (Ok(None)). A packet still in the host stack when freed, either way (dropped by the bridge,
/// or delivered to the host), frees its slot too.
#[inline(always)]
pub fn on_free(
    slot: &mut SkbSlot,
    skb: u64,
    now_ns: u64,
    dropped: bool,
) -> Result<Option<NetSample>, Counter> {
    let copy = *slot;
    if copy.holds(skb, Phase::Received) || copy.holds(skb, Phase::Sent) {
        slot.skb = 0;
        return Ok(None);
    }
    if !copy.holds(skb, Phase::Queued) {
        return Ok(None);
    }
    slot.skb = 0;
    if dropped {
        return Err(Counter::Dropped);
    }
    if now_ns.saturating_sub(copy.ts_ns) > MAX_AGE_NS {
        return Err(Counter::Stale);
    }
    Ok(Some(NetSample {
        latency_ns: now_ns.saturating_sub(copy.ts_ns),
        uplink: copy.uplink,
        tap: copy.tap,
        queue: copy.queue,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_taking_the_packet_ends_the_stage_once() {
        let mut s = SkbSlot::default();
        start(&mut s, 0xa0, 100, 3, 4, 2).unwrap();
        let x = on_free(&mut s, 0xa0, 160, false).unwrap().unwrap();
        assert_eq!((x.latency_ns, x.uplink, x.tap, x.queue), (60, 3, 4, 2));
        // the skb is freed: its address reused by a packet nobody follows gives nothing
        assert_eq!(on_free(&mut s, 0xa0, 200, false), Ok(None));
    }

    #[test]
    fn a_drop_is_counted_not_measured() {
        let mut s = SkbSlot::default();
        start(&mut s, 0xa0, 100, 3, 4, 1).unwrap();
        assert_eq!(on_free(&mut s, 0xa0, 160, true), Err(Counter::Dropped));
        assert_eq!(s.skb, 0);
    }

    #[test]
    fn a_start_too_old_to_be_this_packets_is_stale() {
        let mut s = SkbSlot::default();
        start(&mut s, 0xa0, 100, 3, 4, 1).unwrap();
        let later = 100 + MAX_AGE_NS + 1;
        assert_eq!(on_free(&mut s, 0xa0, later, false), Err(Counter::Stale));
        assert_eq!(s.skb, 0);
    }

    #[test]
    fn frees_of_other_skbs_and_of_packets_still_in_the_host_stack() {
        let mut s = SkbSlot::default();
        start(&mut s, 0xa0, 100, 3, 4, 1).unwrap();
        assert_eq!(on_free(&mut s, 0xb0, 150, false), Ok(None));
        assert!(s.holds(0xa0, Phase::Queued));
        // a packet received on the uplink and delivered to the host (never to a tap)
        let mut r = SkbSlot::default();
        super::super::host_stack::on_uplink_rx(&mut r, 0xc0, 10, 3).unwrap();
        assert_eq!(on_free(&mut r, 0xc0, 20, false), Ok(None));
        assert_eq!(r.skb, 0, "its slot is free again");
    }
}
