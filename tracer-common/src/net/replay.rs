//! The network stages' rules replayed on recorded sequences of real events, each of which keeps
//! what iopath's programs measured over the same window: the guest lab's QEMU (userspace
//! virtio-net) answering pings on this host's kernel (`tests/fixtures/net_lab_qemu.events`,
//! recorded with `tests/fixtures/record-lab-net.sh`), and a nested guest on vhost-net, its tap
//! bridged with an uplink, in the distro-kernel VM (`tests/fixtures/net_nested_vhost.events`,
//! recorded with `cargo xtask vm --record-fixtures`). The glue below does what the BPF handlers
//! do around each rule (`tracer-ebpf/src/net.rs`, `vhost.rs`, `runs.rs`, `wakeup.rs`), with
//! maps as hash maps.

extern crate std;
use std::{collections::HashMap, string::String, vec::Vec};

use super::{
    Backend, SkbSlot, backend_queue,
    backend_to_irq::{self, Batch},
    detail_queue,
    host_stack::{self, Ended},
    queue_detail, skb_slot,
    tx_backend::{self, TxRun},
    tx_host_stack,
    tx_kick::{self, KickStart, Kicked, Pending},
    wakeup::{self, Woken},
};
use crate::rules::testing::{MapStarts, events, measured};

/// The fixture's tap and uplink, as the replay's ifindexes.
const TAP: u32 = 1;
const UPLINK: u32 = 2;

#[derive(Default)]
struct Replay {
    /// The fixture's devices other than the tap are an uplink (a bridge's port), not the
    /// host's own.
    uplink: bool,
    /// vhost's functions were probed (net.tx.kick's and handle_tx's programs on).
    functions: bool,
    /// vhost: the notify in progress per CPU, the kicked work, the kick kept for its run.
    fn_notify: HashMap<u32, Pending>,
    kick_starts: Option<MapStarts<u64, KickStart>>,
    kicked: HashMap<u32, Kicked>,
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
    /// vhost worker runs no kick queued (`unmatched`).
    kick_unmatched: u64,
    /// The `queue` label of each packet to and from the tap, as the programs make it from the
    /// skb's queue_mapping.
    queues: std::collections::BTreeSet<Option<u32>>,
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
        // vhost's handle_tx marks its own runs where its functions are probed.
        if Backend::from_u32(w.backend) == Backend::Qemu || !self.functions {
            let run = TxRun {
                ts_ns: ts,
                vm: w.vm,
                backend: Backend::from_u32(w.backend) as u32,
                kick_ns: kick.unwrap_or(0),
            };
            self.start(tid, run);
        }
    }

    /// `runs::start`.
    fn start(&mut self, tid: u32, run: TxRun) {
        if self.runs.get(&tid).is_some_and(|run| run.kick_ns != 0) {
            self.no_transmit += 1;
        }
        self.runs.insert(tid, run);
    }

    fn run(text: &str, uplink: bool, functions: bool) -> Replay {
        let mut r = Replay {
            uplink,
            functions,
            kick_starts: Some(MapStarts::new(1024)),
            ..Replay::default()
        };
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
                    let queue = e.u("q") as u32 + 1;
                    r.queues.insert(detail_queue(queue_detail(0, queue)));
                    let (ended, started) = host_stack::on_tap_xmit(&mut s, skb, e.ts, TAP, queue);
                    started.unwrap();
                    r.slots.insert(skb_slot(skb), s);
                    if let Ended::Sample(x) = ended {
                        r.sample("net.rx.host_stack", x.latency_ns);
                    }
                }
                "xmit" if r.uplink => {
                    let skb = e.u("skb");
                    let mut s = slot(&mut r, skb);
                    let ended = tx_host_stack::on_uplink_xmit(&mut s, skb, e.ts, UPLINK);
                    r.slots.insert(skb_slot(skb), s);
                    if let Some(x) = ended {
                        r.sample("net.tx.host_stack", x.unwrap().latency_ns);
                    }
                }
                "xmit" => {}
                "rx" => {
                    let skb = e.u("skb");
                    let mut s = slot(&mut r, skb);
                    if e.u("tap") == 1 {
                        // tun's queue plus one (0: none recorded).
                        r.queues
                            .insert(detail_queue(queue_detail(0, e.u("q") as u32)));
                        if let Some(run) = r.runs.get_mut(&e.tid) {
                            let (ns, kick) = tx_backend::on_tap_rx(run, e.ts).unwrap();
                            r.sample("net.tx.backend_to_wire", ns);
                            if let Some(k) = kick {
                                r.sample("net.tx.kick", k);
                            }
                        }
                        tx_host_stack::on_tap_rx(&mut s, skb, e.ts, TAP).unwrap();
                    } else if r.uplink {
                        // A slot another packet still held is taken over, as in the kernel.
                        let _ = host_stack::on_uplink_rx(&mut s, skb, e.ts, UPLINK);
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
                        // A vhost worker's VMM: its mm's owner (the fixture's `vm`).
                        let vm = match e.u("vm") as u32 {
                            0 => e.tgid,
                            vm => vm,
                        };
                        let detail = queue_detail(e.u("backend") as u32, x.queue);
                        let b = r
                            .batches
                            .entry(e.tid)
                            .or_insert(Batch { vm, ..Batch::EMPTY });
                        backend_to_irq::slept(b, switches);
                        backend_to_irq::on_taken(b, e.ts, TAP, detail, switches).unwrap();
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
                        let functions = r.functions;
                        let w = wakeup::on_waking(kick, b.vm, b.tap, b.backend, functions, e.ts);
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
                "notify" => {
                    let p = r.fn_notify.entry(e.cpu).or_default();
                    tx_kick::on_ioeventfd(p, e.tid, e.tgid, e.ts);
                }
                "workq" => {
                    let p = r.fn_notify.entry(e.cpu).or_default();
                    let starts = r.kick_starts.as_mut().unwrap();
                    tx_kick::on_work_queue(p, starts, e.u("work"), e.tid, e.ts).unwrap();
                }
                "txkick" => {
                    let starts = r.kick_starts.as_mut().unwrap();
                    match tx_kick::on_tx_kick(starts, e.u("work"), e.ts) {
                        Ok((ns, vm)) => {
                            let k = r.kicked.entry(e.cpu).or_default();
                            if let Some(old) = tx_kick::keep_kick(k, e.tid, vm, ns) {
                                r.sample("net.tx.kick", old.ns);
                            }
                        }
                        Err(_) => r.kick_unmatched += 1,
                    }
                }
                "txrun" => {
                    let k = r.kicked.entry(e.cpu).or_default();
                    let kick = tx_kick::take_kick(k, e.tid);
                    let vm = r.batches.get(&e.tid).map_or(0, |b| b.vm);
                    let run = TxRun {
                        ts_ns: e.ts,
                        vm: if kick.tid != 0 { kick.vm } else { vm },
                        backend: Backend::Vhost as u32,
                        kick_ns: kick.ns,
                    };
                    r.start(e.tid, run);
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

/// Each stage's samples and p50 in the replay beside what iopath measured, printed.
fn summary(r: &Replay, want: &std::collections::BTreeMap<String, u64>) -> Vec<String> {
    let summary: Vec<String> = [
        "net.rx.host_stack",
        "net.rx.backend_queue",
        "net.rx.backend_to_irq",
        "net.tx.kick",
        "net.tx.backend_to_wire",
        "net.tx.host_stack",
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
    summary
}

/// A fixture replayed (`uplink`, `functions`: see [`Replay`]) and checked against what iopath
/// measured over its window: each of `stages` has as many samples, and some; the backend's
/// wakeups are some and at most iopath's, which ran a moment longer than the trace. Returns the
/// replay and its summary for the fixture's own checks.
fn replay_as_measured(
    text: &str,
    uplink: bool,
    functions: bool,
    stages: &[&str],
) -> (Replay, Vec<String>) {
    let want = measured(text);
    let r = Replay::run(text, uplink, functions);
    let summary = summary(&r, &want);
    for &stage in stages {
        assert_eq!(r.count(stage), want[stage], "{stage}: {summary:?}");
        assert!(r.count(stage) > 0, "{stage}");
    }
    let wakes = r.count("sched.backend_wakeup");
    assert!(
        wakes > 0 && wakes <= want["sched.backend_wakeup"],
        "{summary:?}"
    );
    (r, summary)
}

#[test]
fn the_labs_qemu_replays_to_what_iopath_measured() {
    let text = include_str!("../../../tests/fixtures/net_lab_qemu.events");
    // The per-packet stages, exactly as the kernel's programs counted them; the main loop's
    // wakeups after the trace (its timers) are iopath's alone.
    let stages = [
        "net.rx.backend_queue",
        "net.rx.backend_to_irq",
        "net.tx.kick",
        "net.tx.backend_to_wire",
    ];
    let (r, _) = replay_as_measured(text, false, false, &stages);
    // Every kick the backend ran transmitted (the pings' replies): no more kicks than frames.
    assert!(r.count("net.tx.kick") <= r.count("net.tx.backend_to_wire"));
}

#[test]
fn vhost_net_in_the_distro_kernel_replays_to_what_iopath_measured() {
    let text = include_str!("../../../tests/fixtures/net_nested_vhost.events");
    // Every stage of both directions, exactly as the kernel's programs counted them: the
    // host stacks from the uplink's events, vhost's kicks from its functions and its runs from
    // handle_tx.
    let stages = [
        "net.rx.host_stack",
        "net.rx.backend_queue",
        "net.rx.backend_to_irq",
        "net.tx.kick",
        "net.tx.backend_to_wire",
        "net.tx.host_stack",
    ];
    let (r, summary) = replay_as_measured(text, true, true, &stages);
    assert_eq!((r.kick_unmatched, r.no_transmit), (0, 0), "{summary:?}");
    // One queue pair: queue 0 both ways, from tun's two conventions (the index as is on the
    // way to the guest, plus one on the way from it).
    assert_eq!(r.queues, [Some(0)].into(), "queues");
}
