//! The network stages' rules replayed on a recorded sequence of real events: the guest lab's
//! QEMU (userspace virtio-net) answering pings (`tests/fixtures/net_lab_qemu.events`, recorded
//! with `tests/fixtures/record-lab-net.sh`, which also keeps what iopath's programs measured
//! over the same window). The glue below does what the BPF handlers do around each rule
//! (`tracer-ebpf/src/net.rs`, `vhost.rs`, `wakeup.rs`), with maps as hash maps.

extern crate std;
use std::{collections::HashMap, string::String, vec::Vec};

use super::{
    Backend, SkbSlot, backend_queue,
    backend_to_irq::{self, Batch},
    host_stack, skb_slot,
    tx_backend::{self, TxRun},
    tx_host_stack,
    tx_kick::Pending,
    wakeup::{self, Woken},
};
use crate::rules::testing::{events, measured};

/// The lab's tap, as the replay's ifindex.
const TAP: u32 = 1;

#[derive(Default)]
struct Replay {
    slots: HashMap<u32, SkbSlot>,
    batches: HashMap<u32, Batch>,
    /// Each thread's voluntary context switches (sched_switch away from it, blocked).
    nvcsw: HashMap<u32, u64>,
    notify: HashMap<u32, Pending>,
    woken: HashMap<u32, Woken>,
    runs: HashMap<u32, TxRun>,
    /// Samples per stage name.
    samples: HashMap<&'static str, Vec<u64>>,
    /// Kicks whose run transmitted nothing (`no_transmit`).
    no_transmit: u64,
}

impl Replay {
    fn sample(&mut self, stage: &'static str, ns: u64) {
        self.samples.entry(stage).or_default().push(ns);
    }

    fn count(&self, stage: &str) -> u64 {
        self.samples.get(stage).map_or(0, |v| v.len() as u64)
    }

    /// `wakeup.rs`'s `resumed`: the woken thread runs.
    fn resumed(&mut self, tid: u32, w: &Woken, ts: u64) {
        let (wake, kick) = wakeup::on_switch_in(w, ts).unwrap();
        self.sample("sched.backend_wakeup", wake);
        if self.runs.get(&tid).is_some_and(|run| run.kick_ns != 0) {
            self.no_transmit += 1;
        }
        let run = TxRun {
            ts_ns: ts,
            vm: w.vm,
            backend: w.backend,
            kick_ns: kick.unwrap_or(0),
        };
        self.runs.insert(tid, run);
    }

    fn run(text: &str) -> Replay {
        let mut r = Replay::default();
        for e in events(text) {
            // A woken thread seen doing something before any switch into it was still queued
            // when woken (the programs read task_struct.on_rq, which the trace lacks): it ran
            // on from its wakeup.
            if let Some(w) = r.woken.remove(&e.tid) {
                r.resumed(e.tid, &w, w.ts_ns);
            }
            let slot = |r: &mut Replay, skb: u64| -> SkbSlot {
                *r.slots.entry(skb_slot(skb)).or_default()
            };
            match e.name {
                "xmit" if e.u("tap") == 1 => {
                    let skb = e.u("skb");
                    let mut s = slot(&mut r, skb);
                    let (_, started) = host_stack::on_tap_xmit(&mut s, skb, e.ts, TAP, 1);
                    started.unwrap();
                    r.slots.insert(skb_slot(skb), s);
                }
                "xmit" => {}
                "rx" => {
                    let skb = e.u("skb");
                    let mut s = slot(&mut r, skb);
                    if e.u("tap") == 1 {
                        if let Some(run) = r.runs.get_mut(&e.tid) {
                            let (ns, kick) = tx_backend::on_tap_rx(run, e.ts).unwrap();
                            r.sample("net.tx.backend_to_wire", ns);
                            if let Some(k) = kick {
                                r.sample("net.tx.kick", k);
                            }
                        }
                        tx_host_stack::on_tap_rx(&mut s, skb, e.ts, TAP).unwrap();
                    } else {
                        host_stack::on_other_rx(&mut s, skb);
                    }
                    r.slots.insert(skb_slot(skb), s);
                }
                "consume" | "kfree" => {
                    let skb = e.u("skb");
                    let mut s = slot(&mut r, skb);
                    let freed = backend_queue::on_free(&mut s, skb, e.ts, e.name == "kfree");
                    r.slots.insert(skb_slot(skb), s);
                    if let Ok(Some(x)) = freed {
                        r.sample("net.rx.backend_queue", x.latency_ns);
                        let switches = r.nvcsw.get(&e.tid).copied().unwrap_or(0);
                        let b = r.batches.entry(e.tid).or_insert(Batch {
                            vm: e.tgid,
                            ..Batch::EMPTY
                        });
                        backend_to_irq::slept(b, switches);
                        backend_to_irq::on_taken(b, e.ts, TAP, Backend::Qemu as u32, switches)
                            .unwrap();
                    }
                }
                "msi" if e.u("hard") == 0 => {
                    if let Some(b) = r.batches.get_mut(&e.tid) {
                        let n = backend_to_irq::on_irq(b);
                        let lat: Vec<u64> = (0..n)
                            .map(|i| backend_to_irq::latency(b, i, e.ts))
                            .collect();
                        for ns in lat {
                            r.sample("net.rx.backend_to_irq", ns);
                        }
                    }
                }
                "msi" => {}
                "mmio" | "pio" if e.u("write") == 1 => {
                    let p = r.notify.entry(e.cpu).or_default();
                    wakeup::on_notify(p, e.tid, e.tgid, e.ts);
                }
                "mmio" | "pio" => {}
                "uexit" => {
                    let p = r.notify.entry(e.cpu).or_default();
                    wakeup::on_userspace_exit(p, e.tid);
                }
                "waking" => {
                    let p = r.notify.entry(e.cpu).or_default();
                    let kick = wakeup::take_notify(p, e.tid, e.ts);
                    let tid = e.u("pid") as u32;
                    if let Some(b) = r.batches.get(&tid) {
                        let w = wakeup::on_waking(kick, b.vm, b.tap, b.backend, false, e.ts);
                        r.woken.insert(tid, w);
                    }
                }
                "switch" => {
                    if e.u("running") == 0 {
                        *r.nvcsw.entry(e.u("prev") as u32).or_default() += 1;
                    }
                    let next = e.u("next") as u32;
                    if let Some(w) = r.woken.remove(&next) {
                        r.resumed(next, &w, e.ts);
                    }
                }
                other => panic!("unknown event {other}"),
            }
        }
        r
    }
}

fn p50(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn the_labs_qemu_replays_to_what_iopath_measured() {
    let text = include_str!("../../../tests/fixtures/net_lab_qemu.events");
    let want = measured(text);
    let r = Replay::run(text);
    let summary: Vec<String> = [
        "net.rx.backend_queue",
        "net.rx.backend_to_irq",
        "net.tx.kick",
        "net.tx.backend_to_wire",
        "sched.backend_wakeup",
    ]
    .iter()
    .map(|s| {
        let v = r.samples.get(s).cloned().unwrap_or_default();
        let mid = if v.is_empty() { 0 } else { p50(&v) / 1000 };
        std::format!("{s}: {} (p50 {mid} us), iopath {:?}", v.len(), want.get(*s))
    })
    .collect();
    std::eprintln!("{}", summary.join("; "));
    // The per-packet stages, exactly as the kernel's programs counted them.
    for stage in [
        "net.rx.backend_queue",
        "net.rx.backend_to_irq",
        "net.tx.kick",
        "net.tx.backend_to_wire",
    ] {
        assert_eq!(r.count(stage), want[stage], "{stage}: {summary:?}");
        assert!(r.count(stage) > 0, "{stage}");
    }
    // iopath ran a moment longer than the trace: the main loop's wakeups after the trace (its
    // timers) are its own.
    let wakes = r.count("sched.backend_wakeup");
    assert!(
        wakes > 0 && wakes <= want["sched.backend_wakeup"],
        "{summary:?}"
    );
    // Every kick the backend ran transmitted (the pings' replies): no more kicks than frames.
    assert!(r.count("net.tx.kick") <= r.count("net.tx.backend_to_wire"));
}
