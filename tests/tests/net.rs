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
    net::{NetCounter, TapBackend, TapWriter, Topology, send, send_flows},
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
        // The test's tap has one queue: tun's queue 0 labels every packet.
        let vm = [
            ("vm", name.as_str()),
            ("backend", "qemu"),
            ("tap", tap),
            ("queue", "0"),
        ];
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
        // The backend's figure starts at the peer's send(), before the uplink receive that
        // starts the stages: the peer's own send path (its socket, UDP, the veth) is outside
        // them, 10 to 16 µs here (the gap was the same at D = 50 and 500 µs, so a fixed offset,
        // which at D = 50 µs alone brushed the 15%), hundreds of µs emulated.
        let slack = if emulated() { 1000.0 } else { 20.0 };
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
    // thread has blocked since, at its next take (those it took since it last blocked stay in
    // the thread's batch, which goes with its VM), never measured up to some later interrupt.
    let dropped = |m: &iopath_tests::Metrics| {
        drops(m, "net.rx.backend_to_irq", "no_interrupt")
            + drops(m, "net.rx.backend_to_irq", "start_map_full")
    };
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
    let report = backend.report();
    assert_eq!(report["packets"].as_u64(), Some(quiet as u64));
    // Its thread's last batch: the packets it took since it last blocked, 1 unless a stall
    // (under emulation) let more queue up before its last read. A batch holds BATCH_MAX
    // packets at most; the rest are counted `start_map_full`, as lost.
    let last_batch = report["last_batch"].as_u64().unwrap();
    let kept = last_batch.min(tracer_common::net::backend_to_irq::BATCH_MAX as u64);
    let m = d.metrics();
    let queued = [("stage", "net.rx.backend_queue"), ("vm", "netpoll")];
    assert_eq!(
        m.value(&format!("{LATENCY}_count"), &queued),
        quiet as f64,
        "the backend took them all"
    );
    assert_eq!(
        dropped(&m) - before,
        quiet as u64 - kept,
        "no_interrupt (and start_map_full): one per packet but those of the thread's last \
         batch ({report})"
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

/// The transmit side's kick and backend run through a userspace backend, and the backend's
/// wakeup, with a known hold: the test VMM's guest kicks an ioeventfd, which wakes its backend
/// thread (QEMU's way: no vhost, no function probe); the vCPU thread, SCHED_FIFO on the
/// backend's CPU, keeps the woken backend off that CPU for H µs before it sleeps; the backend
/// then spins D µs and writes a frame to the tap. With `sched.backend_wakeup` on, iopath gives
/// `net.tx.kick` (notify exit to the backend running) and `sched.backend_wakeup` (wakeup to
/// running) of about H each, held between what the test VMM measured itself (from the vCPU's
/// entry into the kick's KVM_RUN and from its return to userspace after it, to the backend
/// awake; 10% slack), and `net.tx.backend_to_wire`
/// (running to the frame on the tap) of about D, between the VMM's own awake to the write's
/// call and to its return (which includes the bridge's flooding of the frame), and counted
/// against bpftrace's count of the bounding events.
#[test]
fn tx_kick_wakeup_and_run_of_a_userspace_backend_with_a_known_hold() {
    const TEST: &str = "tx_kick_wakeup_and_run_of_a_userspace_backend_with_a_known_hold";
    if !kvm_available(TEST) || !iopath_tests::net::have_bpftrace(TEST) {
        return;
    }
    let topo = Topology::new("kick");
    // Every window sampled: each kick's timeline is checked below.
    let d = Daemon::start(&[
        "--stages",
        "net.tx.kick,net.tx.backend_to_wire,sched.backend_wakeup",
        "--timeline-every",
        "1",
    ]);
    let (holds, d_us, count): (&[u64], u64, u32) = if emulated() {
        (&[3000, 15000], 1000, 100)
    } else {
        (&[200, 1000], 100, 300)
    };
    let mut no_transmit_before = 0;
    for &h_us in holds {
        let name = format!("kick-{h_us}");
        // The vCPU's sleep after each hold: long enough for the backend's D and write, so that
        // the next kick finds it asleep (under full emulation the backend runs late by ms).
        let gap = if emulated() {
            d_us * 10 + 5000
        } else {
            d_us * 3 + 1000
        }
        .to_string();
        let (n, d_s, h_s) = (count.to_string(), d_us.to_string(), h_us.to_string());
        let vmm = TapBackend::spawn(
            &testvmm_bin(),
            &name,
            &[
                "tap-tx",
                "--tap",
                &topo.tap,
                "--count",
                &n,
                "--spin-us",
                &d_s,
                "--hold-us",
                &h_s,
                "--gap-us",
                &gap,
            ],
        );
        // The second method, bpftrace: the VMM's own threads' wakeups of its backend (the
        // priming packet's comes from the sender), its kicks (writes to port 0x3f8), and the
        // frames on the tap. Not under full emulation, where bpftrace with a program on every
        // wakeup does not stop within its bound: there the VMM's own counts stand in.
        let pid = vmm.pid();
        let extra = format!(
            "tracepoint:sched:sched_waking /args->comm == \"tx-backend\" && pid == {pid}/ \
             {{ @waking = count(); }}\n\
             tracepoint:sched:sched_waking /args->comm == \"tx-backend\"/ {{ @waking_all = count(); }}\n\
             tracepoint:kvm:kvm_pio /pid == {pid} && args->rw == 1 && args->port == 0x3f8/ \
             {{ @kick = count(); }}"
        );
        let filter = format!("pid == {pid}");
        let bt = (!emulated()).then(|| NetCounter::start(&topo.uplink, &topo.tap, &filter, &extra));
        topo.wait_forwarding();
        // The packet that makes the backend thread one (it takes it off the tap).
        send(&testvmm_bin(), &topo.ns, 1, 0);
        let r = vmm.report();
        sleep(Duration::from_millis(700));
        let c = bt.map(|b| b.counts());
        // A single-queue tap: every frame and kick is queue 0's.
        let vm = [("vm", name.as_str()), ("backend", "qemu"), ("queue", "0")];
        let vm_tap = [vm[0], vm[1], ("tap", topo.tap.as_str()), vm[2]];
        // (0, NaN) for a series that is not there: the counts below fail with the figures.
        let p50 =
            |stage: &str, want: &[(&str, &str)]| d.find_p50(stage, want).unwrap_or((0, f64::NAN));
        let (kicks, kick_p50) = p50("net.tx.kick", &vm);
        // Counted per stage, not per VM: this round's is the difference.
        let no_transmit = d.dropped("net.tx.kick", "no_transmit") - no_transmit_before;
        no_transmit_before += no_transmit;
        let (wakes, wake_p50) = p50("sched.backend_wakeup", &vm_tap);
        let (runs, run_p50) = p50("net.tx.backend_to_wire", &vm_tap);
        let own_kick = r["exit_to_awake_p50_us"].as_f64().unwrap();
        let own_entry = r["entry_to_awake_p50_us"].as_f64().unwrap();
        // To the write's call: iopath's run ends where the frame enters the host stack, early
        // in the write (which returns after the bridge has flooded it to the uplink).
        let own_run = r["awake_to_write_p50_us"].as_f64().unwrap();
        let own_written = r["awake_to_written_p50_us"].as_f64().unwrap();
        eprintln!(
            "H = {h_us} us, D = {d_us} us: net.tx.kick {kicks} samples p50 {kick_p50:.1} us, \
             sched.backend_wakeup {wakes} p50 {wake_p50:.1}, net.tx.backend_to_wire {runs} p50 \
             {run_p50:.1}; the VMM's own: exit to awake {own_kick:.1}, entry to awake {own_entry:.1}, \
             awake to write {own_run:.1} \
             and to written {own_written:.1}; bpftrace {:?}; {r}",
            c.as_ref().map(|c| &c.0)
        );
        // A kick that finds the backend still woken (not yet running: another task held its
        // CPU past the vCPU's sleep) wakes nobody and is no sample: it is in `merged`.
        let merged = r["merged"].as_u64().unwrap();
        assert_eq!(r["kicks"], count, "the guest's kicks");
        assert!(merged <= count as u64 / 50, "{merged} kicks merged");
        let woke = r["woke"].as_u64().unwrap();
        let unmatched = d.dropped("net.tx.backend_to_wire", "unmatched");
        assert_eq!(runs, r["written"].as_u64().unwrap(), "frames written");
        assert_eq!(unmatched, 0, "every frame in a run");
        match &c {
            Some(c) => {
                assert_eq!(
                    c.of("kick"),
                    count as u64,
                    "bpftrace's kvm_pio writes to the port"
                );
                // Every kick that woke the backend is a sample, or counted `no_transmit` (a
                // run that blocked before its frame and was woken again by something else).
                // 300 of 300 in most runs, 297 of 298 in one CI run (not explained; most likely a
                // wakeup from an interrupt that came in on a VMM thread, which bpftrace's `pid`
                // names and iopath does not take for a kick); so at most 1% fewer, never more.
                let accounted = kicks + no_transmit;
                assert!(
                    accounted <= c.of("waking") && c.of("waking") - accounted <= count as u64 / 100,
                    "net.tx.kick {kicks} + {no_transmit} no_transmit against bpftrace's {} \
                     wakeups of the backend by the VMM",
                    c.of("waking")
                );
                // A kick that found the backend awake (it blocked in its write, say, and was
                // woken by another task) wakes nobody: rare, and no sample.
                let unwoken = c.of("kick") - merged - c.of("waking");
                assert!(
                    unwoken <= count as u64 / 100,
                    "{unwoken} kicks of {} found the backend awake",
                    c.of("kick")
                );
                assert!(
                    no_transmit <= count as u64 / 100,
                    "{no_transmit} kicks lost"
                );
                // Every wakeup by the vCPU measured; others too, but not those before the
                // backend took its first packet (iopath did not know it for a backend yet).
                assert!(
                    (c.of("waking")..=c.of("waking_all")).contains(&wakes),
                    "sched.backend_wakeup's {wakes} against bpftrace's wakeups"
                );
                assert_eq!(
                    runs,
                    c.of("tap_rx"),
                    "net.tx.backend_to_wire against bpftrace's"
                );
            }
            None => {
                // Under full emulation (6.1 in L1) a few of the backend's wakeups come from
                // other contexts (bpftrace shows the idle task waking it): those kicks are not
                // attributed; and a read that found a kick already there (the backend late
                // past the vCPU's sleep) returned with no wakeup.
                assert!(
                    kicks <= woke && kicks as f64 >= 0.9 * woke as f64,
                    "net.tx.kick {kicks} against the backend's {woke} reads, {wakes} wakeups"
                );
                assert!(
                    wakes as f64 >= 0.9 * woke as f64,
                    "sched.backend_wakeup {wakes}, the backend read {woke} times"
                );
            }
        }
        // The kick and the wakeup start at the guest's notify (the wakeup a moment later, in
        // the same exit), between the vCPU's entry into KVM_RUN and its return to userspace
        // (microseconds apart here, hundreds under full emulation), and end at the backend's
        // switch-in, a moment before it is awake: between the VMM's two figures, with a tenth
        // of slack.
        for (what, ours) in [
            ("net.tx.kick", kick_p50),
            ("sched.backend_wakeup", wake_p50),
        ] {
            assert!(
                0.9 * own_kick <= ours && ours <= 1.1 * own_entry,
                "{what} p50 {ours:.1} us against the VMM's own exit to awake {own_kick:.1} us \
                 and entry to awake {own_entry:.1} us"
            );
        }
        // The run ends inside the write (the frame entering the host stack), and starts at
        // the switch-in, a little before the backend's read of the ioeventfd returns.
        assert!(
            own_run <= run_p50 && run_p50 <= 1.1 * own_written,
            "net.tx.backend_to_wire p50 {run_p50:.1} us against the VMM's own awake to write \
             {own_run:.1} us and to written {own_written:.1} us"
        );
        assert!(kick_p50 >= h_us as f64, "the kick holds at least H");
        // Timelines: the slowest kept are this round's (H grows), each a kick and then its
        // run's frame, starting where the kick ended (the run's start: one clock read).
        let (_, list) = d.get("/timelines", false).expect("/timelines");
        let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
        let shown = list["timelines"].as_array().expect("timelines");
        let round: Vec<_> = shown
            .iter()
            .filter(|t| t["steps"][0]["labels"]["vm"] == name.as_str())
            .collect();
        let chained = round
            .iter()
            .filter(|t| {
                let steps = t["steps"].as_array().unwrap();
                let stage = |i: usize| steps[i]["stage"].as_str().unwrap();
                steps.len() == 2
                    && (stage(0), stage(1)) == ("net.tx.kick", "net.tx.backend_to_wire")
                    && steps[1]["start_us"] == steps[0]["us"]
            })
            .count();
        eprintln!(
            "{chained} of the {} slowest timelines ({} of this round's VM) chained",
            shown.len(),
            round.len()
        );
        assert!(
            round.len() >= 40 && chained * 10 >= round.len() * 9,
            "{chained} of the {} slowest timelines of {name} a kick then its frame: {}",
            round.len(),
            shown.first().map(|t| t.to_string()).unwrap_or_default()
        );
    }
    assert!(d.stop().success());
}

/// The `queue` label on a multi-queue tap (a guest NIC with two queue pairs): the test VMM
/// reads both queues, as QEMU does one per pair, and counts the packets of each; the peer sends
/// from 16 source ports, which tun spreads over the queues by flow hash. Each queue's
/// `net.rx.backend_queue` and `net.rx.backend_to_irq` samples equal what the backend read off
/// that queue (tun's queue index, from the skb's queue_mapping at the tap's transmit).
#[test]
fn the_queue_label_on_a_multi_queue_tap_counts_each_queues_packets() {
    const TEST: &str = "the_queue_label_on_a_multi_queue_tap_counts_each_queues_packets";
    if !kvm_available(TEST) {
        return;
    }
    let topo = Topology::new_multi_queue("mq");
    let d = Daemon::start(&["--stages", STAGES]);
    let count = 200u32;
    let backend = TapBackend::start(
        &testvmm_bin(),
        "netmq",
        &topo.tap,
        count,
        0,
        &["--queues", "2"],
    );
    topo.wait_forwarding();
    send_flows(&testvmm_bin(), &topo.ns, count, 300, 16);
    let r = backend.report();
    let per_queue: Vec<u64> = r["per_queue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        per_queue.iter().sum::<u64>(),
        count as u64,
        "every datagram read: {r}"
    );
    // 16 flows all hashed to one queue: about 2 in 65,536.
    assert!(
        per_queue.iter().all(|&n| n > 0),
        "both queues read packets: {r}"
    );
    let m = d.metrics();
    for (q, &want) in per_queue.iter().enumerate() {
        let q = q.to_string();
        for stage in ["net.rx.backend_queue", "net.rx.backend_to_irq"] {
            let got = m.value(
                &format!("{LATENCY}_count"),
                &[
                    ("stage", stage),
                    ("vm", "netmq"),
                    ("tap", topo.tap.as_str()),
                    ("queue", q.as_str()),
                ],
            );
            eprintln!("{stage} queue {q}: {got} samples, the backend read {want}");
            assert_eq!(got, want as f64, "{stage} queue {q}: {r}");
        }
    }
    assert!(d.stop().success());
}
