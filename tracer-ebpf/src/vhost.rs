//! net.tx.kick and net.tx.backend_to_wire on vhost-net: KVM's ioeventfd_write (the guest's
//! notify, in its vCPU thread), vhost_work_queue (the queue's work queued in that same call),
//! handle_tx_kick (the worker running it) and handle_tx (the worker's transmit run), all
//! module functions (fentry where it loads, kprobe next); the run's frames end on the tap's
//! net:netif_receive_skb (`runs`). Rules: `tracer_common::net::tx_kick`.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tracer_common::{
    maps::START_ENTRIES,
    net::{
        Backend, queue_detail,
        tx_backend::TxRun,
        tx_kick::{self, KickStart, Kicked, Pending},
    },
    stage::StageId::{NetTxBackendToWire, NetTxKick},
};

use crate::{
    shared::{
        KernelStarts, count, current_tgid_tid, mm_owner_tgid, now_ns, on, record, stages_on,
        vmm_seen,
    },
    tp::{Site, function},
};

/// The notify in progress on each CPU.
#[map]
static NET_TX_PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// A worker's kick from handle_tx_kick to the handle_tx it calls, on each CPU.
#[map]
static NET_TX_KICKED: PerCpuArray<Kicked> = PerCpuArray::with_max_entries(1, 0);

/// Queues' work queued by a kick, by the work's address, until the worker runs it.
#[map]
pub static NET_TX_KICK: HashMap<u64, KickStart> = HashMap::with_max_entries(START_ENTRIES, 0);

/// The VMM a vhost worker serves: before Linux 6.4 a kthread that adopted the VMM's mm, since
/// then a thread of the VMM.
#[inline(always)]
fn worker_vm(tgid: u32) -> u32 {
    mm_owner_tgid().unwrap_or(tgid)
}

// int ioeventfd_write(struct kvm_vcpu *vcpu, struct kvm_io_device *this, gpa_t addr, int len,
// const void *val)
#[inline(always)]
fn notified(_: Result<(), ()>, _: Site) {
    if !on(stages_on(), NetTxKick) {
        return;
    }
    let (tgid, tid) = current_tgid_tid();
    if let Some(p) = NET_TX_PENDING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; the notify's call chain runs on it.
        tx_kick::on_ioeventfd(unsafe { &mut *p }, tid, tgid, now_ns());
    }
}

function!(
    "ioeventfd_write",
    ioeventfd_write_fentry,
    ioeventfd_write_kprobe,
    |arg| Ok(()),
    notified
);

// void vhost_work_queue(struct vhost_dev *dev, struct vhost_work *work) (Linux 6.5+:
// bool vhost_vq_work_queue(struct vhost_virtqueue *vq, struct vhost_work *work))
#[inline(always)]
fn work_queued(work: Result<u64, ()>, _: Site) {
    if !on(stages_on(), NetTxKick) {
        return;
    }
    let (Ok(work), Some(p)) = (work, NET_TX_PENDING.get_ptr_mut(0)) else {
        return;
    };
    // SAFETY: this CPU's slot.
    let p = unsafe { &mut *p };
    // Most work is queued from a packet's receive (no notify in progress here): one compare.
    let tid = current_tgid_tid().1;
    if p.tid != tid {
        return;
    }
    if let Err(c) = tx_kick::on_work_queue(p, &mut KernelStarts(&NET_TX_KICK), work, tid, now_ns())
    {
        count(NetTxKick, c);
    }
}

function!(
    "vhost_work_queue",
    vhost_work_queue_fentry,
    vhost_work_queue_kprobe,
    |arg| Ok(arg(1)),
    work_queued
);

// static void handle_tx_kick(struct vhost_work *work)
#[inline(always)]
fn tx_kick(work: Result<u64, ()>, _: Site) {
    if !on(stages_on(), NetTxKick) {
        return;
    }
    let Ok(work) = work else {
        return;
    };
    let now = now_ns();
    match tx_kick::on_tx_kick(&mut KernelStarts(&NET_TX_KICK), work, now) {
        Ok((ns, vm)) => {
            let tid = current_tgid_tid().1;
            vmm_seen(vm, tid);
            // Recorded by its run's first frame, which says the queue (`runs::tap_rx`).
            let slot = NET_TX_KICKED.get_ptr_mut(0);
            if let (true, Some(k)) = (on(stages_on(), NetTxBackendToWire), slot) {
                // A kick no run took, replaced by this one: its end was not kept, so
                // its timeline sample ends now, late.
                // SAFETY: this CPU's slot.
                if let Some(old) = tx_kick::keep_kick(unsafe { &mut *k }, tid, vm, ns) {
                    record(
                        NetTxKick,
                        queue_detail(Backend::Vhost as u32, 0),
                        0,
                        old.vm,
                        old.ns,
                        now,
                    );
                }
            } else {
                record(
                    NetTxKick,
                    queue_detail(Backend::Vhost as u32, 0),
                    0,
                    vm,
                    ns,
                    now,
                );
            }
        }
        Err(c) => count(NetTxKick, c),
    }
}

function!(
    "handle_tx_kick",
    handle_tx_kick_fentry,
    handle_tx_kick_kprobe,
    |arg| Ok(arg(0)),
    tx_kick
);

// static void handle_tx(struct vhost_net *net): every transmit run, from a kick or from the
// socket's wakeup.
#[inline(always)]
fn tx_run(_: Result<(), ()>, _: Site) {
    if !on(stages_on(), NetTxBackendToWire) {
        return;
    }
    let (tgid, tid) = current_tgid_tid();
    let kick = match NET_TX_KICKED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        Some(k) => tx_kick::take_kick(unsafe { &mut *k }, tid),
        None => Kicked::default(),
    };
    // The kick names the VMM whose vCPU notified; the worker's mm owner is the fallback (a
    // kernel before 6.4 without mm_struct.owner in BTF has none).
    let vm = if kick.tid != 0 {
        kick.vm
    } else {
        worker_vm(tgid)
    };
    let run = TxRun {
        ts_ns: now_ns(),
        vm,
        backend: Backend::Vhost as u32,
        kick_ns: kick.ns,
    };
    crate::runs::start(tid, run);
}

function!(
    "handle_tx",
    handle_tx_fentry,
    handle_tx_kprobe,
    |arg| Ok(()),
    tx_run
);
