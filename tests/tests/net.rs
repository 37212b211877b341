//! Paravirtual network, receive side, against real packets: a peer network namespace sends UDP
//! over a veth pair whose host end (the uplink) is on a bridge with a tap, as on a KVM host; the
//! test VMM (src/bin/iopath-testvmm.rs, mode `tap-rx`) is the backend. It reads each packet off
//! the tap as QEMU's userspace virtio-net does, holds it a known D µs, then signals an irqfd on
//! an MSI route of a real KVM VM, while the real `iopath serve` traces it all.
//!
//! Only link-local addresses, only to the namespace the test creates; IPv6 is off on the test's
//! links so that nothing but the test's datagrams crosses the tap (every packet the backend reads
//! is one the stages must count).

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use iopath_tests::{
    Daemon, Why, emulated, kvm_available, leftover_programs,
    net::{NetCounter, TapBackend, TapWriter, Topology, send},
    skip, testvmm_bin,
};

const LATENCY: &str = "iopath_stage_latency_seconds";
const STAGES: &str = "net.rx.host_stack,net.rx.backend_queue,net.rx.backend_to_irq";

#[test]
fn rx_stages_through_a_userspace_backend_with_a_known_hold() {
    const TEST: &str = "rx_stages_through_a_userspace_backend_with_a_known_hold";
    if !kvm_available(TEST) {
        return;
    }
    if !iopath_tests::net::have_bpftrace(TEST) {
        return;
    }
    let topo = Topology::new("rx");
    // After the topology: the daemon finds the tap and its uplink at start. A short grace
    // period, for the tap's series to go soon after the tap does (checked at the end).
    let d = Daemon::start(&["--stages", STAGES, "--vm-grace", "2s"]);
    let bt = NetCounter::start(&topo.uplink, &topo.tap, r#"comm == "iopath-testvmm""#, "");
    let delays: &[u64] = if emulated() {
        &[2000, 10000]
    } else {
        &[50, 500]
    };
    let count = 300u32;
    // Samples per stage over the rounds, read after each (a round's VM goes with its series
    // after the grace period).
    let mut seen = [0u64; 3];
    for (i, &d_us) in delays.iter().enumerate() {
        let name = format!("netrx{i}");
        let backend = TapBackend::start(&testvmm_bin(), &name, &topo.tap, count, d_us, &[]);
        topo.wait_forwarding();
        // Packets farther apart than the hold: one per batch, as the check below assumes.
        send(&testvmm_bin(), &topo.ns, count, d_us * 2 + 200);
        let r = backend.report();
        let packets = r["packets"].as_u64().unwrap();
        assert_eq!(
            packets, count as u64,
            "every datagram reached the backend: {r}"
        );
        let m = d.metrics();
        let tap = topo.tap.as_str();
        let vm = [("vm", name.as_str()), ("backend", "qemu"), ("tap", tap)];
        for stage in ["net.rx.backend_queue", "net.rx.backend_to_irq"] {
            let mut want = vec![("stage", stage)];
            want.extend_from_slice(&vm);
            assert_eq!(
                m.value(&format!("{LATENCY}_count"), &want),
                packets as f64,
                "{stage}: one sample per packet the backend read"
            );
        }
        // Every packet came in on the uplink: host-stack samples for this VM's packets so far.
        let host = [("tap", tap), ("uplink", topo.uplink.as_str())];
        let (host_n, host_p50) = d.stage_p50("net.rx.host_stack", &host);
        let drops: Vec<String> = m
            .samples
            .iter()
            .filter(|s| s.name == "iopath_events_dropped_total" && s.value > 0.0)
            .map(|s| format!("{:?} {}", s.labels, s.value))
            .collect();
        // An skb copied on its way (a packet socket's clone unshared by the bridge) is another
        // address at the tap: rare, and the issue's bound is 1%.
        let host_want = count as u64 * (i as u64 + 1);
        assert!(
            host_n <= host_want && host_n * 100 >= host_want * 99,
            "host stack count {host_n} for {host_want} packets; dropped: {drops:?}"
        );
        let (queue_n, queue_p50) = d.stage_p50("net.rx.backend_queue", &vm);
        let (irq_n, irq_p50) = d.stage_p50("net.rx.backend_to_irq", &vm);
        assert_eq!(irq_n, count as u64);
        seen = [host_n, seen[1] + queue_n, seen[2] + irq_n];
        // The stage is the hold plus the backend's signalling: the read's return, the irqfd
        // write and KVM's inline injection, a few µs the backend measures around them itself
        // (read return to write return). Checked against that, and never below the hold.
        let held = r["read_to_signal_p50_us"].as_f64().unwrap();
        let tol = if emulated() {
            held * 0.10 + 100.0
        } else {
            (held * 0.10).max(3.0)
        };
        let sum = host_p50 + queue_p50 + irq_p50;
        let independent = r["send_to_signal_p50_us"].as_f64().unwrap();
        eprintln!(
            "D = {d_us} us: backend_to_irq p50 {irq_p50:.1} us, the backend's read-to-signal \
             {held:.1} us (tolerance {tol:.1}); host_stack {host_p50:.1}, backend_queue \
             {queue_p50:.1}: sum {sum:.1} us; the backend's own send-to-signal p50 \
             {independent:.1} us"
        );
        assert!(
            // never below the hold (less half a bucket: 1/16 of it, the interpolation's error)
            (irq_p50 - held).abs() <= tol && irq_p50 >= d_us as f64 * 15.0 / 16.0,
            "backend_to_irq p50 {irq_p50} us for a {d_us} us hold ({held} us read to signal)"
        );
        // Emulated, the peer's own send path (outside the stages) takes hundreds of µs more.
        let slack = if emulated() { 1000.0 } else { 0.0 };
        assert!(
            (sum - independent).abs() <= 0.15 * independent + slack,
            "RX stages add up to {sum} us, the backend measured {independent} us"
        );
    }
    // The second method: every bounding event bpftrace saw over the same window. The tap may
    // also carry a packet of the host's own (no uplink receive): it waits for the backend like
    // the others, or is dropped with no reader.
    let drops = |m: &iopath_tests::Metrics, stage: &str, reason: &str| {
        m.value(
            "iopath_events_dropped_total",
            &[("stage", stage), ("reason", reason)],
        ) as u64
    };
    let iopath_dropped = drops(&d.metrics(), "net.rx.backend_queue", "dropped");
    let counts = bt.counts();
    let of = |name: &str| counts.of(name);
    let sent = count as u64 * delays.len() as u64;
    eprintln!(
        "bpftrace: {counts:?}; {sent} datagrams sent; iopath: {seen:?}, {iopath_dropped} dropped"
    );
    assert_eq!(of("rx"), sent, "bpftrace: receives on the uplink");
    assert_eq!(seen[1], of("consume"), "backend queue: one per consume");
    assert_eq!(
        iopath_dropped,
        of("dropped"),
        "backend queue: one drop per kfree"
    );
    assert_eq!(
        of("xmit"),
        of("consume") + of("dropped"),
        "bpftrace's own balance"
    );
    assert_eq!(
        seen[2],
        of("msi"),
        "to irq: one per injection (batches of one)"
    );

    // A backend that never signals (the guest polls): each packet it took is counted when its
    // thread has blocked since, at its next take (the last one stays in the thread's batch,
    // which goes with its VM), never measured up to some later interrupt.
    let dropped = |m: &iopath_tests::Metrics| drops(m, "net.rx.backend_to_irq", "no_interrupt");
    let before = dropped(&d.metrics());
    let quiet = 50u32;
    let backend = TapBackend::start(
        &testvmm_bin(),
        "netpoll",
        &topo.tap,
        quiet,
        0,
        &["--no-signal"],
    );
    topo.wait_forwarding();
    send(&testvmm_bin(), &topo.ns, quiet, 1000);
    assert_eq!(backend.report()["packets"].as_u64(), Some(quiet as u64));
    let m = d.metrics();
    let queued = [("stage", "net.rx.backend_queue"), ("vm", "netpoll")];
    assert_eq!(
        m.value(&format!("{LATENCY}_count"), &queued),
        quiet as f64,
        "the backend took them all"
    );
    assert_eq!(
        dropped(&m) - before,
        quiet as u64 - 1,
        "no_interrupt: one per packet but the last"
    );
    // Its VM is labelled (the backend_queue series above), and has no backend_to_irq series.
    let irq = [("stage", "net.rx.backend_to_irq"), ("vm", "netpoll")];
    assert!(
        m.find(&format!("{LATENCY}_count"), &irq).is_empty(),
        "no backend_to_irq sample without an interrupt"
    );

    // The tap goes: its series and its uplink's and its NET_DEVS entries go (the entries at the
    // next sync, the series after the grace period). Only this test's: the host may have others.
    let devs =
        |m: &iopath_tests::Metrics| m.value("iopath_kernel_map_entries", &[("map", "NET_DEVS")]);
    let devs_before = devs(&d.metrics());
    let tap = topo.tap.clone();
    drop(topo);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = d.metrics();
        let left = m
            .samples
            .iter()
            .filter(|s| {
                s.name.starts_with(LATENCY) && s.labels.get("tap").is_some_and(|t| *t == tap)
            })
            .count();
        if left == 0 && devs(&m) <= devs_before - 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} latency samples of tap {tap} and {} of {devs_before} NET_DEVS entries left 15 s after it went",
            devs(&m)
        );
        sleep(Duration::from_millis(250));
    }
    assert!(d.stop().success());
    assert!(leftover_programs().is_empty());
}

/// The transmit side's host stack: frames written to the tap (the guest's side, as QEMU writes
/// them) cross the bridge to the uplink, first as they are, then with netem holding each one a
/// known D in the uplink's qdisc, which is inside the stage: its p50 moves by D. Counts against
/// bpftrace's receives on the tap and transmits on the uplink.
#[test]
fn tx_host_stack_from_the_tap_to_the_uplink_with_a_known_qdisc_delay() {
    const TEST: &str = "tx_host_stack_from_the_tap_to_the_uplink_with_a_known_qdisc_delay";
    iopath_tests::require_root();
    if !iopath_tests::net::have_bpftrace(TEST) {
        return;
    }
    let topo = Topology::new("tx");
    let mut tap = TapWriter::open(&topo.tap);
    topo.wait_forwarding();
    let peer = topo.peer_mac();
    let d_us: u64 = if emulated() { 10_000 } else { 500 };
    let count = 300u32;
    let host = [("tap", topo.tap.as_str()), ("uplink", topo.uplink.as_str())];
    let mut p50s = Vec::new();
    for netem in [None, Some(d_us)] {
        if let Some(us) = netem
            && let Err(why) = topo.uplink_netem(&format!("{us}us"))
        {
            // This machine's kernel is built without qdiscs but pfifo; the distro-kernel VM,
            // where this test runs too, has netem.
            skip(
                TEST,
                Why::Machine,
                &format!("the known-delay half needs sch_netem, which this kernel lacks ({why})"),
            );
            return;
        }
        // A daemon per round: its quantiles are the round's.
        let d = Daemon::start(&["--stages", "net.tx.host_stack"]);
        let bt = NetCounter::start(&topo.uplink, &topo.tap, "0", "");
        // Farther apart than the delay: netem never queues two.
        tap.send_udp(peer, count, d_us * 2);
        sleep(Duration::from_millis(d_us / 1000 * 3 + 100));
        let counts = bt.counts();
        let (n, p50) = d.stage_p50("net.tx.host_stack", &host);
        assert!(d.stop().success());
        eprintln!("netem {netem:?} us: {n} samples, p50 {p50:.1} us; bpftrace {counts:?}");
        assert_eq!(
            counts.of("tap_rx"),
            count as u64,
            "bpftrace: the frames written"
        );
        // A packet of the host's own on the bridge (now and then, one) goes out of both ports:
        // on the uplink beside the frames, on the tap beside the replies that came in.
        let host_own = counts.of("xmit").saturating_sub(counts.of("rx"));
        assert_eq!(
            counts.of("up_xmit"),
            count as u64 + host_own,
            "bpftrace: every frame went out the uplink"
        );
        assert_eq!(n, count as u64, "net.tx.host_stack: one sample per frame");
        p50s.push(p50);
    }
    let moved = p50s[1] - p50s[0];
    let tol = (d_us as f64 * 0.10).max(3.0);
    assert!(
        (moved - d_us as f64).abs() <= tol,
        "net.tx.host_stack p50 moved {moved:.1} us for netem {d_us} us on the uplink \
         ({:.1} -> {:.1})",
        p50s[0],
        p50s[1]
    );
}

/// What a backend's thread costs per packet, and the ceiling it gives: the test VMM reads each
/// packet off the tap and spins a known S on it before its signal; iopath's CPU time per packet
/// for that backend (its thread's on-CPU time over the packets it moved) is held within 15% of
/// what the thread itself measured (the mean of CLOCK_THREAD_CPUTIME_ID around each packet's work: S, the
/// read, the signal), and so is the ceiling, one over it. Counted from the scrape that first saw
/// the thread (after a warm-up), to a scrape while it still runs.
#[test]
fn backend_cost_and_ceiling_of_a_userspace_backend_with_a_known_spin() {
    const TEST: &str = "backend_cost_and_ceiling_of_a_userspace_backend_with_a_known_spin";
    if !kvm_available(TEST) {
        return;
    }
    let topo = Topology::new("cost");
    let d = Daemon::start(&["--stages", STAGES, "--vm-grace", "2s"]);
    let s_us: u64 = if emulated() { 2000 } else { 200 };
    let (warm, count) = (20u32, 300u32);
    // One packet more than sent below: the thread runs, and is read, until the test lets it go.
    // It waits up to 60 s for each next packet: the pause between the two sends below is
    // seconds under emulation.
    let backend = TapBackend::start(
        &testvmm_bin(),
        "cost",
        &topo.tap,
        warm + count + 1,
        s_us,
        &["--gap-us", "60000000"],
    );
    topo.wait_forwarding();
    send(&testvmm_bin(), &topo.ns, warm, s_us * 2 + 200);
    let labels = [
        ("vm", "cost"),
        ("backend", "qemu"),
        ("tap", topo.tap.as_str()),
    ];
    let read = |m: &iopath_tests::Metrics| {
        (
            m.value("iopath_backend_cpu_seconds_total", &labels),
            m.value("iopath_backend_packets_total", &labels),
        )
    };
    // Seen by now: the daemon reads again within its collection period (0.5 s here) when a
    // backend thread appears, and this scrape reads too.
    sleep(Duration::from_secs(1));
    let (cpu0, packets0) = read(&d.metrics());
    send(&testvmm_bin(), &topo.ns, count, s_us * 2 + 200);
    // Every packet taken before the second read.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut m = d.metrics();
    while read(&m).1 < packets0 + count as f64 && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
        m = d.metrics();
    }
    let (cpu1, packets1) = read(&m);
    send(&testvmm_bin(), &topo.ns, 1, 0);
    let r = backend.report();
    // The mean, as iopath's is: under emulation a few packets cost far more than the median.
    let own = r["cpu_per_packet_mean_us"].as_f64().unwrap();
    let moved = packets1 - packets0;
    let per_packet = (cpu1 - cpu0) * 1e6 / moved.max(1.0);
    eprintln!(
        "S = {s_us} us: iopath {moved} packets, {:.1} ms of CPU: {per_packet:.1} us per packet, \
         ceiling {:.0} packets/s; the thread's own mean {own:.1} us per packet ({:.0}/s); {r}",
        (cpu1 - cpu0) * 1e3,
        1e6 / per_packet,
        1e6 / own
    );
    assert_eq!(moved, count as f64, "the packets between the two reads");
    assert!(
        (per_packet - own).abs() <= 0.15 * own,
        "iopath's {per_packet:.1} us of CPU per packet against the thread's own {own:.1} us"
    );
    assert!(
        per_packet >= s_us as f64,
        "a packet costs at least its spin: {per_packet:.1} us for S = {s_us} us"
    );
    assert!(d.stop().success());
}
