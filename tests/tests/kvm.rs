//! KVM core stages against real /dev/kvm: the test VMM (src/bin/iopath-testvmm.rs) drives real
//! exits to userspace, irqfd and KVM_SIGNAL_MSI injections and halts, with delays it controls,
//! while the real `iopath serve` traces them.
//!
//! Not here: kvm.exit and kvm.inject_to_entry end at kvm:kvm_entry, which never fires under this
//! machine's KVM-PVM; their rules are replayed on hand-written sequences in tracer-common
//! (tests/fixtures/kvm_exit.events, kvm_inject.events), and their raw_tp programs are driven
//! with BPF_PROG_TEST_RUN in tests/testrun.rs.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use iopath_tests::{
    Daemon, KVM_STAGES, Metrics, Vmm, emulated, kvm_available, leftover_programs, patience,
};

const LATENCY: &str = "iopath_stage_latency_seconds";

/// p50 in µs of the series of `stage` whose labels include `want`, from /quantiles.
fn p50_us(d: &Daemon, stage: &str, want: &[(&str, &str)]) -> Option<(f64, u64)> {
    let q = d.quantiles();
    q["series"].as_array()?.iter().find_map(|s| {
        let ok = s["stage"] == stage
            && want
                .iter()
                .all(|(k, v)| s["labels"][*k].as_str() == Some(*v));
        ok.then(|| (s["p50_us"].as_f64().unwrap(), s["count"].as_u64().unwrap()))
    })
}

#[test]
fn userspace_exit_measures_the_vmm_handling_time() {
    if !kvm_available("userspace_exit_measures_the_vmm_handling_time") {
        return;
    }
    let d = Daemon::start(&["--stages", "kvm.userspace_exit"]);
    // The VMM spins D µs on each KVM_EXIT_IO before the next KVM_RUN. Emulated (the distro-
    // kernel VM), an exit and an entry take tens of µs: there D is in milliseconds.
    let delays: &[(u64, u32)] = if emulated() {
        &[(2000, 40), (10000, 20)]
    } else {
        &[(20, 300), (200, 200), (2000, 40)]
    };
    for (i, (d_us, exits)) in delays.iter().enumerate() {
        let name = format!("uexit{i}");
        let vmm = Vmm::run(
            &name,
            &[
                "pio",
                "--count",
                &exits.to_string(),
                "--spin-us",
                &d_us.to_string(),
            ],
            1500,
        );
        assert_eq!(vmm.n("handled"), *exits as f64);
        let m = d.metrics();
        let want = [
            ("stage", "kvm.userspace_exit"),
            ("vm", name.as_str()),
            ("vcpu", "0"),
            ("reason", "io"),
        ];
        // Every handled exit is followed by KVM_RUN; the last one (port 0x3f9) is not.
        assert_eq!(
            m.value(&format!("{LATENCY}_count"), &want),
            *exits as f64,
            "one sample per exit handled\n{}",
            m.samples.len()
        );
        let (p50, count) = p50_us(&d, "kvm.userspace_exit", &want[1..]).expect("series");
        assert_eq!(count, *exits as u64);
        let tol = if emulated() {
            *d_us as f64 * 0.10 + 100.0
        } else {
            (*d_us as f64 * 0.10).max(3.0)
        };
        eprintln!("D = {d_us} us: p50 {p50:.1} us over {count} exits (tolerance {tol:.1} us)");
        assert!(
            (p50 - *d_us as f64).abs() <= tol,
            "p50 {p50} us for a {d_us} us handling time"
        );
        vmm.wait();
    }
    assert!(d.stop().success());
    assert!(leftover_programs().is_empty());
}

#[test]
fn signal_to_inject_counts_every_signal_over_msi_gsi_and_ioctl() {
    if !kvm_available("signal_to_inject_counts_every_signal_over_msi_gsi_and_ioctl") {
        return;
    }
    let d = Daemon::start(&["--stages", "kvm.signal_to_inject"]);
    // MSI route: injected inline, in the writer's context (kvm_msi_set_irq).
    // IOAPIC route: deferred to a kworker (irqfd_inject, kvm_set_irq).
    // KVM_SIGNAL_MSI: inline, in the ioctl.
    // Signals apart: a signal to a GSI whose injection is still queued is merged into it by
    // the workqueue (one injection for two writes, the second not measured); a kworker late
    // by 300 µs on this busy 2-CPU machine did that to 4 of 300, so the GSI route gets 2 ms.
    let cases = [
        ("sigmsi", "irqfd-msi", "irqfd", "inline", 300u32, "300"),
        ("siggsi", "irqfd-gsi", "irqfd", "kworker", 300, "2000"),
        ("sigioctl", "signal-msi", "ioctl", "inline", 200, "300"),
    ];
    for (name, mode, signal, inject, n, gap) in cases {
        let vmm = Vmm::run(
            name,
            &[mode, "--count", &n.to_string(), "--gap-us", gap],
            1000,
        );
        assert_eq!(vmm.n("signals"), n as f64);
        let m = d.metrics();
        let count = m.value(
            &format!("{LATENCY}_count"),
            &[
                ("stage", "kvm.signal_to_inject"),
                ("vm", name),
                ("signal", signal),
                ("inject", inject),
            ],
        );
        eprintln!("{mode}: {count} samples for {n} signals");
        if inject == "kworker" {
            // The kernel merges a signal into an injection still queued (irqfd_wakeup's
            // schedule_work finds the work pending): one interrupt for two writes, measured
            // once from the first. Seen for 1 of 300 writes in 1 of 6 runs even at this 2 ms
            // gap, where bpftrace counted 300 writes, 299 workqueue_queue_work of irqfd_inject
            // and 299 kvm_set_irq (iopath: 299). At most 1% of the signals.
            assert!(
                count <= n as f64 && count >= n as f64 * 0.99,
                "{mode}: {count} samples for {n} signals"
            );
        } else {
            assert_eq!(count, n as f64, "{mode}: one sample per signal");
        }
        // and nothing under the other context
        let other = if inject == "inline" {
            "kworker"
        } else {
            "inline"
        };
        assert_eq!(
            m.value(
                &format!("{LATENCY}_count"),
                &[("vm", name), ("inject", other)]
            ),
            0.0
        );
        let (p50, _) = p50_us(&d, "kvm.signal_to_inject", &[("vm", name)]).unwrap();
        // Inline injection is a few µs; a kworker hop is longer but far below the gap.
        assert!(p50 > 0.1 && p50 < 300.0, "{mode}: p50 {p50} us");
        vmm.wait();
    }
    assert!(d.stop().success());
}

#[test]
fn halt_wakeup_reports_the_halted_time() {
    if !kvm_available("halt_wakeup_reports_the_halted_time") {
        return;
    }
    let d = Daemon::start(&["--stages", "kvm.halt_wakeup,kvm.userspace_exit"]);
    // The guest halts in the kernel (in-kernel irqchip); the VMM wakes its vCPU thread with a
    // signal D after it entered KVM_RUN, 50 times (D = 2 ms, 10 ms emulated).
    let d_us: f64 = if emulated() { 10000.0 } else { 2000.0 };
    // Emulated, the first KVM_RUN took over 20 ms to reach the guest's hlt once (49 halts for
    // 50 wakeups): it gets 500 ms there.
    let first_us = if emulated() { "500000" } else { "20000" };
    let vmm = Vmm::run(
        "halter",
        &[
            "halt",
            "--count",
            "50",
            "--spin-us",
            &d_us.to_string(),
            "--first-us",
            first_us,
        ],
        1000,
    );
    assert_eq!(vmm.n("wakeups"), 50.0);
    let m = d.metrics();
    let want = [
        ("stage", "kvm.halt_wakeup"),
        ("vm", "halter"),
        ("vcpu", "0"),
        ("wait", "blocked"),
    ];
    let series: Vec<String> = m
        .find(
            &format!("{LATENCY}_count"),
            &[("stage", "kvm.halt_wakeup"), ("vm", "halter")],
        )
        .iter()
        .map(|s| format!("{:?}={}", s.labels, s.value))
        .collect();
    assert_eq!(
        m.value(&format!("{LATENCY}_count"), &want),
        50.0,
        "halts of the VM: {series:?}"
    );
    let (p50, _) = p50_us(&d, "kvm.halt_wakeup", &want[1..]).unwrap();
    eprintln!("halt: p50 {p50:.1} us for a {d_us} us wait");
    // The halt starts a little after KVM_RUN is entered (guest entry, emulating hlt), and the
    // wakeup comes a little after the signal (emulated: up to 0.5 ms).
    let late = if emulated() {
        1.1 * d_us + 500.0
    } else {
        1.1 * d_us
    };
    assert!((0.85 * d_us..=late).contains(&p50), "halt p50 {p50} us");
    // Each wakeup ends KVM_RUN with EINTR: an exit to userspace with reason intr.
    assert!(
        m.value(
            &format!("{LATENCY}_count"),
            &[
                ("stage", "kvm.userspace_exit"),
                ("vm", "halter"),
                ("reason", "intr")
            ]
        ) >= 49.0
    );
    vmm.wait();
    assert!(d.stop().success());
}

/// HIST entries whose key's vm field is `pid`.
fn hist_entries_of(pid: u32) -> usize {
    iopath_tests::hist_keys()
        .iter()
        .filter(|k| k.vm == pid)
        .count()
}

#[test]
fn vms_get_their_labels_and_are_collected_after_they_exit() {
    if !kvm_available("vms_get_their_labels_and_are_collected_after_they_exit") {
        return;
    }
    let d = Daemon::start(&["--vm-grace", "2s", "--stages", KVM_STAGES]);
    let idle = d.metrics().map_entries();
    assert!(idle.len() >= 9, "every growing map is reported: {idle:?}");
    // Every kind of KVM map entry: exits, signals over an MSI and a GSI route (the kworker
    // hop), halts, vCPU threads.
    let a = Vmm::run(
        "gc-alpha",
        &["exits", "--vcpus", "2", "--count", "50"],
        2500,
    );
    let b = Vmm::run(
        "gc-beta",
        &["irqfd-msi", "--count", "50", "--gap-us", "300"],
        2500,
    );
    let c = Vmm::run(
        "gc-gamma",
        &["irqfd-gsi", "--count", "50", "--gap-us", "300"],
        2500,
    );
    let (pa, pb) = (a.pid(), b.pid());
    let m = d.metrics();
    let vms = m.label_values(&format!("{LATENCY}_count"), "vm");
    assert!(
        vms.contains(&"gc-alpha".into()) && vms.contains(&"gc-beta".into()),
        "{vms:?}"
    );
    assert!(m.value("iopath_vms", &[]) >= 2.0);
    assert!(hist_entries_of(pa) > 0 && hist_entries_of(pb) > 0);
    let busy = m.map_entries();
    // exits: a vCPU thread's fd, and the exit to userspace its last EINTR left open;
    // irqfd-msi: an interrupt pending for the vCPU that never runs
    for map in ["HIST", "VMM_TGIDS", "VCPU_FD", "UEXIT_START", "INJ_PENDING"] {
        let (i, b) = (
            idle.iter().find(|(n, _)| n == map).unwrap().1,
            busy.iter().find(|(n, _)| n == map).unwrap().1,
        );
        assert!(b > i, "{map}: {i} idle, {b} with two VMs");
    }
    a.wait();
    b.wait();
    c.wait();
    // Gone, but within the grace period: still exported.
    let m = d.metrics();
    assert!(
        m.label_values(&format!("{LATENCY}_count"), "vm")
            .contains(&"gc-alpha".into())
    );
    // After it: series, every kernel map's entries and the VM count go back to idle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut m: Metrics;
    loop {
        sleep(Duration::from_millis(500));
        m = d.metrics();
        if m.map_entries() == idle || Instant::now() > deadline {
            break;
        }
    }
    let vms = m.label_values(&format!("{LATENCY}_count"), "vm");
    assert!(
        !vms.iter().any(|v| v.starts_with("gc-")),
        "still exported: {vms:?}"
    );
    assert_eq!(
        m.map_entries(),
        idle,
        "every kernel map back to its idle count"
    );
    assert_eq!(hist_entries_of(pa), 0, "kernel HIST entries of gc-alpha");
    assert_eq!(hist_entries_of(pb), 0, "kernel HIST entries of gc-beta");
    assert!(d.stop().success());
}

#[test]
fn record_keeps_a_vm_that_exited_and_was_collected() {
    if !kvm_available("record_keeps_a_vm_that_exited_and_was_collected") {
        return;
    }
    let record = std::thread::spawn(|| {
        iopath_tests::iopath(&[
            "record",
            "--duration",
            if emulated() { "20s" } else { "6s" },
            "--vm-grace",
            "1s",
            "--json",
            "--stages",
            "kvm.userspace_exit",
        ])
    });
    // attached by then
    sleep(patience(1500));
    // Exits at once: collected from the kernel maps 1 s later, long before the report.
    Vmm::run("early", &["pio", "--count", "30"], 200).wait();
    let out = record.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let count: u64 = v["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["labels"]["vm"] == "early" && s["labels"]["reason"] == "io")
        .map(|s| s["count"].as_u64().unwrap())
        .sum();
    assert_eq!(count, 30, "{v}");
    assert!(
        v["collected"]["vms"].as_u64().unwrap() >= 1,
        "the VM was collected during the recording: {}",
        v["collected"]
    );
}
