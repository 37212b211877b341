//! net.tx.backend_to_wire's runs, whoever starts them: vhost's `handle_tx` (`vhost`), or a
//! userspace backend's switch-in after a wakeup (`wakeup`); the tap's net:netif_receive_skb in
//! the run's thread ends each of its frames (`net::received`), and the first also the kick that
//! woke a userspace backend. Rules: `tracer_common::net::tx_backend`.

use aya_ebpf::{macros::map, maps::HashMap};
use tracer_common::{
    maps::{Counter, START_ENTRIES},
    net::{
        queue_detail,
        tx_backend::{self, TxRun},
    },
    stage::StageId::{NetTxBackendToWire, NetTxKick},
};

use crate::shared::{count, current_tgid_tid, now_ns, record};

/// Each backend thread's latest transmit run, by thread.
#[map]
pub static NET_TX_RUN: HashMap<u32, TxRun> = HashMap::with_max_entries(START_ENTRIES, 0);

/// Thread `tid` starts a run: its frames from now on are this run's. A kick the previous run
/// still held (no frame since) transmitted nothing: counted `no_transmit`.
#[inline(always)]
pub fn start(tid: u32, run: TxRun) {
    // SAFETY: a map value read whole; only this thread's events write it.
    if let Some(old) = unsafe { NET_TX_RUN.get(tid) }
        && old.kick_ns != 0
    {
        count(NetTxKick, Counter::NoTransmit);
    }
    if NET_TX_RUN.insert(tid, run, 0).is_err() {
        count(NetTxBackendToWire, Counter::StartFull);
    }
}

/// net:netif_receive_skb on tap `tap`, from its queue `queue` plus one (0: unknown; the caller
/// checked the stage): a frame of the current thread's run, if it has one; the run's first
/// also ends the kick that started it, labelled with the frame's queue.
#[inline(always)]
pub fn tap_rx(tap: u32, queue: u32) {
    let tid = current_tgid_tid().1;
    let Some(run) = NET_TX_RUN.get_ptr_mut(tid) else {
        // A backend's frame outside any run it was woken for (none since it became one): no
        // start. Another thread's (a tool writing to the tap) is no backend's.
        // SAFETY: a lookup only.
        if unsafe { crate::net::NET_RX_BATCH.get(tid) }.is_some() {
            count(NetTxBackendToWire, Counter::Unmatched);
        }
        return;
    };
    // SAFETY: a map value of this thread's; only its own events write it.
    let run = unsafe { &mut *run };
    let now = now_ns();
    match tx_backend::on_tap_rx(run, now) {
        Ok((ns, kick)) => {
            let detail = queue_detail(run.backend, queue);
            // The kick first, ending where the run started: a timeline links the frame's
            // sample to one read before it.
            if let Some(kick_ns) = kick {
                record(NetTxKick, detail, 0, run.vm, kick_ns, run.ts_ns);
            }
            record(NetTxBackendToWire, detail, tap, run.vm, ns, now);
        }
        Err(c) => count(NetTxBackendToWire, c),
    }
}
