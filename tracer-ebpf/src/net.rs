//! net.rx.*: a packet from an uplink through the host stack to a tap, to the backend taking it,
//! to the interrupt that tells the guest; net.tx.host_stack: a packet from a tap through the host
//! stack to an uplink (rules: `tracer_common::net`).
//!
//! Every skb the host receives, transmits or frees passes through these programs: each asks the
//! cheapest question first (is the stage on, is the device an uplink or a tap, does the slot
//! hold this skb) and does nothing more for a packet that is not a guest's. Whether a backend
//! thread blocked between taking packets and signalling is read from its voluntary context
//! switch count, so no program runs on the host's context switches.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_task_btf},
    macros::map,
    maps::{Array, HashMap},
};
use tracer_common::{
    config::NO_OFFSET,
    maps::{Counter, START_ENTRIES},
    net::{
        Backend, SKB_SLOTS, SkbSlot, backend_queue,
        backend_to_irq::{self, Batch},
        host_stack::{self, Ended},
        queue_detail, role, skb_slot, tx_host_stack,
    },
    stage::StageId::{
        self, NetRxBackendQueue, NetRxBackendToIrq, NetRxHostStack, NetTxBackendToWire,
        NetTxHostStack, SchedBackendWakeup,
    },
};

use crate::{
    shared::{
        config, count, count_each, count_n, current_tgid_tid, mm_owner_tgid, now_ns, number, on,
        read_at, record, stages_on, vmm_seen,
    },
    tp::{Site, tracepoint_args},
};

/// Network devices iopath follows, by ifindex (`net::role`), kept by the daemon from sysfs.
#[map]
static NET_DEVS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);

/// Packets in flight either way, by skb address (`net::skb_slot`).
#[map]
static NET_SKB: Array<SkbSlot> = Array::with_max_entries(SKB_SLOTS, 0);

/// Packets a backend thread took and has not signalled yet, by thread.
#[map]
pub static NET_RX_BATCH: HashMap<u32, Batch> = HashMap::with_max_entries(START_ENTRIES, 0);

/// The stages every tap transmit and skb free serve (sched.backend_wakeup learns its threads
/// from the frees).
const ALL: [StageId; 5] = [
    NetRxHostStack,
    NetRxBackendQueue,
    NetRxBackendToIrq,
    NetTxHostStack,
    SchedBackendWakeup,
];
/// The stages a receive starts or ends.
const RECEIVED: [StageId; 4] = [
    NetRxHostStack,
    NetTxHostStack,
    NetTxBackendToWire,
    SchedBackendWakeup,
];
/// The stages that keep a backend thread's batch.
const BATCHED: [StageId; 2] = [NetRxBackendToIrq, SchedBackendWakeup];
/// The stages a transmit to a tap starts (after the receive side's host stack).
const QUEUED: [StageId; 2] = [NetRxBackendQueue, NetRxBackendToIrq];

/// The bits of `ALL`, folded at compile time.
const ALL_BITS: u64 = {
    let (mut bits, mut i) = (0, 0);
    while i < ALL.len() {
        bits |= ALL[i].bit();
        i += 1;
    }
    bits
};

#[inline(always)]
fn any_on(mask: u64) -> bool {
    mask & ALL_BITS != 0
}

#[inline(always)]
fn role_of(ifindex: u32) -> u32 {
    unsafe { NET_DEVS.get(ifindex) }.copied().unwrap_or(0)
}

#[inline(always)]
fn slot(skb: u64) -> Option<&'static mut SkbSlot> {
    // SAFETY: a map value; each slot's writers are the events of the skbs hashed to it.
    NET_SKB
        .get_ptr_mut(skb_slot(skb))
        .map(|p| unsafe { &mut *p })
}

/// An skb, its device's ifindex and its `queue_mapping` ([`NO_QUEUE`] where BTF has no such
/// field), read through typed pointers (tp_btf: plain loads the verifier checks against BTF)
/// or with bpf_probe_read_kernel (raw_tp).
#[inline(always)]
fn typed_skb_dev(skb: *const u8, dev: *const u8) -> Result<SkbDev, ()> {
    let qm = config!(skb_queue_mapping);
    // SAFETY: BTF-typed pointers; a load through a bad or null one reads 0.
    let (ifindex, queue_mapping) = unsafe {
        let dev = if dev.is_null() {
            core::ptr::read_volatile(skb.add(config!(skb_dev) as usize) as *const *const u8)
        } else {
            dev
        };
        let ifindex =
            core::ptr::read_volatile(dev.add(config!(netdev_ifindex) as usize) as *const u32);
        // A constant to the verifier: the load is gone where the offset is unknown.
        let queue_mapping = if qm == NO_OFFSET {
            NO_QUEUE
        } else {
            core::ptr::read_volatile(skb.add(qm as usize) as *const u16) as u32
        };
        (ifindex, queue_mapping)
    };
    Ok((number(skb).ok_or(())?, ifindex, queue_mapping))
}

#[inline(always)]
fn raw_skb_dev(skb: u64, dev: u64) -> Result<SkbDev, ()> {
    let dev = if dev == 0 {
        unsafe { read_at::<u64>(skb, config!(skb_dev)) }.map_err(|_| ())?
    } else {
        dev
    };
    let ifindex = unsafe { read_at::<u32>(dev, config!(netdev_ifindex)) }.map_err(|_| ())?;
    let qm = config!(skb_queue_mapping);
    let queue_mapping = if qm == NO_OFFSET {
        NO_QUEUE
    } else {
        // A label lost is no reason to lose the packet.
        unsafe { read_at::<u16>(skb, qm) }.map_or(NO_QUEUE, |q| q as u32)
    };
    Ok((skb, ifindex, queue_mapping))
}

/// skb address, device ifindex, `queue_mapping`.
type SkbDev = (u64, u32, u32);

/// `queue_mapping` unknown (no offset): the `queue` label stays empty.
const NO_QUEUE: u32 = u32::MAX;

/// net:netif_receive_skb: a packet on an uplink starts the receive side's host stack, one on a
/// tap (a guest's) the transmit side's, and ends its backend's run (`runs::tap_rx`).
#[inline(always)]
fn received(ev: Result<SkbDev, ()>, _: Site) {
    let mask = stages_on();
    // sched.backend_wakeup times the runs of backends no function probe sees (QEMU's).
    let runs = NetTxBackendToWire.bit() | SchedBackendWakeup.bit();
    if mask & (NetRxHostStack.bit() | NetTxHostStack.bit() | runs) == 0 {
        return;
    }
    let Ok((skb, ifindex, queue_mapping)) = ev else {
        count_each(mask, &RECEIVED, Counter::ReadError);
        return;
    };
    let Some(s) = slot(skb) else {
        return;
    };
    let role = role_of(ifindex);
    if role & role::TAP != 0 && mask & runs != 0 {
        // tun recorded the queue the frame came in on, plus one (0: none recorded).
        let queue = if queue_mapping == NO_QUEUE {
            0
        } else {
            queue_mapping
        };
        crate::runs::tap_rx(ifindex, queue);
    }
    let started = if role & role::UPLINK != 0 && on(mask, NetRxHostStack) {
        host_stack::on_uplink_rx(s, skb, now_ns(), ifindex).map_err(|c| (NetRxHostStack, c))
    } else if role & role::TAP != 0 && on(mask, NetTxHostStack) {
        tx_host_stack::on_tap_rx(s, skb, now_ns(), ifindex).map_err(|c| (NetTxHostStack, c))
    } else {
        host_stack::on_other_rx(s, skb);
        Ok(())
    };
    if let Err((stage, c)) = started {
        count(stage, c);
    }
}

// void trace_netif_receive_skb(struct sk_buff *skb)
tracepoint_args!(
    "netif_receive_skb",
    netif_receive_skb_btf,
    netif_receive_skb_raw,
    btf = |arg| typed_skb_dev(arg(0) as *const u8, core::ptr::null()),
    |arg| raw_skb_dev(arg(0), 0),
    received
);

/// net:net_dev_start_xmit on a tap: ends the receive side's host stack, starts the backend's
/// queue; on an uplink: ends the transmit side's host stack.
#[inline(always)]
fn start_xmit(ev: Result<SkbDev, ()>, _: Site) {
    let mask = stages_on();
    if !any_on(mask) {
        return;
    }
    let Ok((skb, ifindex, queue_mapping)) = ev else {
        count_each(mask, &ALL, Counter::ReadError);
        return;
    };
    let role = role_of(ifindex);
    if role & role::UPLINK != 0 {
        if on(mask, NetTxHostStack)
            && let Some(s) = slot(skb)
        {
            let now = now_ns();
            match tx_host_stack::on_uplink_xmit(s, skb, now, ifindex) {
                Some(Ok(x)) => record(NetTxHostStack, x.uplink, x.tap, 0, x.latency_ns, now),
                Some(Err(c)) => count(NetTxHostStack, c),
                None => {}
            }
        }
        return;
    }
    if role & role::TAP == 0 {
        return;
    }
    let Some(s) = slot(skb) else {
        return;
    };
    // The queue the stack picked for it (tun hands it to that queue's reader), plus one.
    let queue = if queue_mapping == NO_QUEUE {
        0
    } else {
        queue_mapping + 1
    };
    let now = now_ns();
    let (ended, started) = host_stack::on_tap_xmit(s, skb, now, ifindex, queue);
    if on(mask, NetRxHostStack) {
        match ended {
            Ended::Sample(x) => record(NetRxHostStack, x.uplink, x.tap, 0, x.latency_ns, now),
            Ended::Stale => count(NetRxHostStack, Counter::Stale),
            Ended::NotFromUplink => {}
        }
    }
    if let Err(c) = started {
        count_each(mask, &QUEUED, c);
    }
}

// void trace_net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev)
tracepoint_args!(
    "net_dev_start_xmit",
    net_dev_start_xmit_btf,
    net_dev_start_xmit_raw,
    btf = |arg| typed_skb_dev(arg(0) as *const u8, arg(1) as *const u8),
    |arg| raw_skb_dev(arg(0), arg(1)),
    start_xmit
);

/// skb:consume_skb / skb:kfree_skb: a queued packet taken by the backend (or dropped).
#[inline(always)]
fn freed(skb: u64, dropped: bool) {
    let mask = stages_on();
    if !any_on(mask) {
        return;
    }
    let Some(s) = slot(skb) else {
        return;
    };
    let now = now_ns();
    match backend_queue::on_free(s, skb, now, dropped) {
        Ok(None) => {}
        Ok(Some(x)) => {
            let (tgid, tid) = current_tgid_tid();
            let comm = bpf_get_current_comm().unwrap_or_default();
            let backend = Backend::from_comm(&comm);
            // A vhost worker before Linux 6.4 is a kthread of its own: its VMM owns the mm it
            // adopted.
            let vm = match backend {
                Backend::Vhost => mm_owner_tgid().unwrap_or(tgid),
                Backend::Qemu => tgid,
            };
            // The tap's reader serves a guest: known from now on, and named while it lives.
            vmm_seen(vm, tid);
            let detail = queue_detail(backend as u32, x.queue);
            if on(mask, NetRxBackendQueue) {
                record(NetRxBackendQueue, detail, x.tap, vm, x.latency_ns, now);
            }
            // The thread's batch is also what names it a backend for sched.backend_wakeup.
            if on(mask, NetRxBackendToIrq) || on(mask, SchedBackendWakeup) {
                taken(mask, tid, vm, now, x.tap, detail);
            }
        }
        Err(c) => count_each(mask, &QUEUED, c),
    }
}

/// The current thread's voluntary context switches (0 when the offset is unknown: the stage
/// then needs it, see the table).
#[inline(always)]
fn nvcsw() -> u64 {
    let off = config!(task_nvcsw);
    // SAFETY: the verifier checks the load against task_struct's BTF layout.
    unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        core::ptr::read_volatile(task.add(off as usize) as *const u64)
    }
}

#[inline(always)]
fn taken(mask: u64, tid: u32, vm: u32, now: u64, tap: u32, detail: u32) {
    let counted = on(mask, NetRxBackendToIrq);
    let b = match NET_RX_BATCH.get_ptr_mut(tid) {
        Some(b) => b,
        None => {
            let fresh = Batch { vm, ..Batch::EMPTY };
            if NET_RX_BATCH.insert(tid, fresh, 0).is_err() {
                count_each(mask, &BATCHED, Counter::StartFull);
                return;
            }
            match NET_RX_BATCH.get_ptr_mut(tid) {
                Some(b) => b,
                None => return,
            }
        }
    };
    // SAFETY: a map value of this thread's; only this thread's events write it.
    let b = unsafe { &mut *b };
    b.vm = vm;
    let switches = nvcsw();
    let lost = backend_to_irq::slept(b, switches);
    if lost > 0 && counted {
        count_n(NetRxBackendToIrq, Counter::NoInterrupt, lost as u64);
    }
    if let Err(c) = backend_to_irq::on_taken(b, now, tap, detail, switches)
        && counted
    {
        count(NetRxBackendToIrq, c);
    }
}

// Every function here is inlined into its program: Linux 6.1's verifier refuses a program
// whose BTF lists a subprogram beside it ("reg type unsupported for arg#0").
#[inline(always)]
fn consumed(ev: Result<u64, ()>, _: Site) {
    if let Ok(skb) = ev {
        freed(skb, false);
    }
}

#[inline(always)]
fn dropped(ev: Result<u64, ()>, _: Site) {
    if let Ok(skb) = ev {
        freed(skb, true);
    }
}

// void trace_consume_skb(struct sk_buff *skb, void *location) (6.3+; before, skb alone)
tracepoint_args!(
    "consume_skb",
    consume_skb_btf,
    consume_skb_raw,
    btf = |arg| number(arg(0) as *const u8).ok_or(()),
    |arg| Ok(arg(0)),
    consumed
);

// void trace_kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
tracepoint_args!(
    "kfree_skb",
    kfree_skb_btf,
    kfree_skb_raw,
    btf = |arg| number(arg(0) as *const u8).ok_or(()),
    |arg| Ok(arg(0)),
    dropped
);

/// kvm:kvm_msi_set_irq in a task (the caller says which context): the thread's batch ends at
/// this interrupt.
#[inline(always)]
pub fn irq(in_task: bool) {
    if !on(stages_on(), NetRxBackendToIrq) || !in_task {
        return;
    }
    let tid = current_tgid_tid().1;
    let Some(b) = NET_RX_BATCH.get_ptr_mut(tid) else {
        return;
    };
    // SAFETY: a map value of this thread's.
    let b = unsafe { &mut *b };
    if b.len == 0 {
        return;
    }
    let (tap, backend, vm) = (b.tap, b.backend, b.vm);
    let now = now_ns();
    let n = backend_to_irq::on_irq(b);
    // An index loop (not an iterator over a slice): Linux 6.1's verifier bounds it.
    let mut i = 0;
    while i < n {
        let ns = backend_to_irq::latency(b, i, now);
        record(NetRxBackendToIrq, backend, tap, vm, ns, now);
        i += 1;
    }
}
