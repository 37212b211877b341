//! Paravirtual network path, per packet. Receive side (wire to guest):
//! - `net.rx.host_stack`: net:netif_receive_skb on an uplink to net:net_dev_start_xmit on a tap
//!   ([`host_stack`]);
//! - `net.rx.backend_queue`: that transmit to the backend taking the skb off the tap
//!   (skb:consume_skb in its thread: QEMU's read, vhost's tun_recvmsg; [`backend_queue`]);
//! - `net.rx.backend_to_irq`: that take to the next interrupt the same thread injects
//!   (kvm:kvm_msi_set_irq; [`backend_to_irq`]).
//!
//! Transmit side (guest to wire):
//! - `net.tx.kick`: a guest's notify (KVM's ioeventfd_write) to the vhost worker's
//!   handle_tx_kick of that queue ([`tx_kick`]); for a userspace backend, the notify exit to
//!   the backend thread it woke running ([`wakeup`]);
//! - `net.tx.backend_to_wire`: the worker's transmit run (handle_tx) to each frame entering the
//!   host stack on the tap ([`tx_backend`]);
//! - `net.tx.host_stack`: net:netif_receive_skb on a tap to net:net_dev_start_xmit on an uplink
//!   ([`tx_host_stack`]).
//!
//! - `sched.backend_wakeup`: a backend thread woken to running ([`wakeup`]; opt-in).
//!
//! Packets are matched by skb address in an array of slots hashed from it (as block requests
//! are): no lock, and a bounded map whose evictions are counted.

pub mod backend_queue;
pub mod backend_to_irq;
pub mod host_stack;
pub mod tx_backend;
pub mod tx_host_stack;
pub mod tx_kick;
pub mod wakeup;

#[cfg(test)]
mod replay;

use crate::assert_size;

/// What a network device is to iopath (the `NET_DEVS` map's value, written by the daemon from
/// sysfs): only packets received on an uplink and sent to a tap are followed.
pub mod role {
    /// A bridge port that is not a tap: where a guest's packets come from the wire.
    pub const UPLINK: u32 = 1 << 0;
    /// A tun/tap device: a guest's NIC backend.
    pub const TAP: u32 = 1 << 1;
}

/// Who took the packet off the tap (the `backend` label), from its thread's name.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A userspace VMM thread (QEMU's main loop or I/O thread).
    Qemu = 0,
    /// A vhost worker (`vhost-PID`).
    Vhost = 1,
}

impl Backend {
    /// From the thread's name: `vhost-PID` is a vhost worker. Compared by words, not with
    /// `starts_with`, which becomes a call to `bcmp` (a BPF subprogram).
    #[inline(always)]
    pub fn from_comm(comm: &[u8; 16]) -> Backend {
        let word = u32::from_le_bytes([comm[0], comm[1], comm[2], comm[3]]);
        if word == u32::from_le_bytes(*b"vhos") && comm[4] == b't' && comm[5] == b'-' {
            Backend::Vhost
        } else {
            Backend::Qemu
        }
    }

    /// From a [`Backend`] as u32, or a [`queue_detail`] that holds one.
    pub const fn from_u32(v: u32) -> Backend {
        if v & 0xffff == Backend::Vhost as u32 {
            Backend::Vhost
        } else {
            Backend::Qemu
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Vhost => "vhost",
        }
    }
}

/// The `detail` of a backend's net stage sample: its [`Backend`] in the low half, the tap's
/// queue plus one in the high half (0: unknown). A tap queue is one of the guest NIC's queue
/// pairs (QEMU opens one per pair; vhost-net has a device and worker per pair); tun has at
/// most 256. The skb says which: tun picks the queue of a packet to the guest by its
/// `queue_mapping`, and records the queue a guest's packet came in on in the same field, plus
/// one (`skb_record_rx_queue`).
pub const fn queue_detail(backend: u32, queue_plus_one: u32) -> u32 {
    (backend & 0xffff) | (queue_plus_one & 0xffff) << 16
}

/// The queue of a [`queue_detail`], None when unknown.
pub const fn detail_queue(detail: u32) -> Option<u32> {
    match detail >> 16 {
        0 => None,
        q => Some(q - 1),
    }
}

/// Where a followed packet is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Received on an uplink, in the host stack.
    Received = 1,
    /// Sent to a tap, queued for the backend.
    Queued = 2,
    /// Received from a tap (sent by a guest), in the host stack.
    Sent = 3,
}

/// Slots of [`SkbSlot`], hashed from the skb address.
pub const SKB_SLOT_BITS: u32 = 12;
pub const SKB_SLOTS: u32 = 1 << SKB_SLOT_BITS;

/// The slot of skb address `skb` (Fibonacci hashing: skbs are slab objects).
pub const fn skb_slot(skb: u64) -> u32 {
    ((skb >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SKB_SLOT_BITS)) as u32
}

/// A packet in flight in its slot. `check` folds the other fields: a slot two CPUs wrote at
/// once fails it and gives no sample rather than a wrong one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbSlot {
    /// 0: free.
    pub skb: u64,
    pub ts_ns: u64,
    /// ifindex of the uplink it came in on (0: not seen there).
    pub uplink: u32,
    /// ifindex of the tap it was sent to (0: not yet).
    pub tap: u32,
    /// [`Phase`].
    pub phase: u32,
    /// The tap's queue it was sent to, plus one (0: unknown); see [`queue_detail`].
    pub queue: u32,
    pub check: u64,
}
assert_size!(SkbSlot, 40);

impl SkbSlot {
    pub const fn new(
        skb: u64,
        ts_ns: u64,
        uplink: u32,
        tap: u32,
        queue: u32,
        phase: Phase,
    ) -> SkbSlot {
        let mut s = SkbSlot {
            skb,
            ts_ns,
            uplink,
            tap,
            phase: phase as u32,
            queue,
            check: 0,
        };
        s.check = s.fold();
        s
    }

    const fn fold(&self) -> u64 {
        self.skb
            ^ self.ts_ns
            ^ ((self.uplink as u64) << 32 | self.tap as u64)
            ^ ((self.queue as u64) << 32 | self.phase as u64)
    }

    /// Writes a packet's start (a [`SkbSlot::new`]) over whatever the slot held: another packet
    /// still in flight there is evicted (`start_map_full`).
    #[inline(always)]
    pub fn put(&mut self, start: SkbSlot) -> Result<(), crate::maps::Counter> {
        let evicted = self.skb != 0 && self.skb != start.skb;
        *self = start;
        if evicted {
            Err(crate::maps::Counter::StartFull)
        } else {
            Ok(())
        }
    }

    /// Is this `skb`'s, in `phase`, written whole?
    pub const fn holds(&self, skb: u64, phase: Phase) -> bool {
        skb != 0 && self.skb == skb && self.phase == phase as u32 && self.check == self.fold()
    }
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], u64 and u32 fields in pairs, size asserted.
unsafe impl aya::Pod for SkbSlot {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_the_thread_name() {
        let comm = |s: &[u8]| {
            let mut c = [0u8; 16];
            c[..s.len()].copy_from_slice(s);
            c
        };
        assert_eq!(Backend::from_comm(&comm(b"vhost-4242")), Backend::Vhost);
        assert_eq!(Backend::from_comm(&comm(b"qemu-system-x86")), Backend::Qemu);
        assert_eq!(Backend::from_comm(&comm(b"vhost")), Backend::Qemu);
        assert_eq!(Backend::from_comm(&comm(b"")), Backend::Qemu);
    }

    #[test]
    fn a_detail_holds_the_backend_and_the_queue_if_known() {
        let d = queue_detail(Backend::Vhost as u32, 3);
        assert_eq!(
            (Backend::from_u32(d), detail_queue(d)),
            (Backend::Vhost, Some(2))
        );
        let d = queue_detail(Backend::Qemu as u32, 0);
        assert_eq!(
            (Backend::from_u32(d), detail_queue(d)),
            (Backend::Qemu, None)
        );
        // tun's largest queue index, 255, plus one
        assert_eq!(detail_queue(queue_detail(1, 256)), Some(255));
    }
}

/// A start older than this is another packet's that was freed where no tracepoint saw it (TCP's
/// `__kfree_skb`, say) and whose address came back: it is counted `stale`, never measured. The
/// host stack holds a packet for microseconds to a qdisc's delay; a backend that stops reading
/// (the guest's ring full) holds it longer, but not for seconds.
pub const MAX_AGE_NS: u64 = 1_000_000_000;

/// A sample of a net stage: its latency and what labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetSample {
    pub latency_ns: u64,
    pub uplink: u32,
    pub tap: u32,
    /// The tap's queue, plus one (0: unknown).
    pub queue: u32,
}
