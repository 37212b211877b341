//! /metrics under hostile names and at fleet scale: every label value escaped, no label set
//! repeated, and a series costs the exported layout's buckets, not the kernel's 256.

use std::{thread::sleep, time::Duration};

use iopath_tests::{
    Daemon, Vmm, kvm_available, leftover_programs, promtool_check, repeated_series,
};

const COUNT: &str = "iopath_stage_latency_seconds_count";

/// A tenant's VM name with a quote, a backslash and a newline in it.
const BAD_NAME: &str = "bad\"name\\x\ny";

#[test]
fn hostile_names_restarts_and_unknown_vcpus_keep_the_scrape_valid() {
    if !kvm_available("hostile_names_restarts_and_unknown_vcpus_keep_the_scrape_valid") {
        return;
    }
    let d = Daemon::start(&["--stages", "kvm.userspace_exit", "--vm-grace", "60s"]);
    // Each lives 200 ms after its exits: long enough to be named while it runs.
    Vmm::run(BAD_NAME, &["pio", "--count", "20"], 200).wait();
    // The same VM restarted under its name within the grace period: two tgids, one name.
    for _ in 0..2 {
        Vmm::run("again", &["pio", "--count", "20"], 200).wait();
    }
    // A VM the daemon cannot name: it is stopped (SIGSTOP) while a two-vCPU VM runs and exits,
    // so when it reads the kernel's notices neither the VM nor its vCPU fds can be resolved.
    let daemon = d.child.id() as i32;
    // SAFETY: signals our own child.
    unsafe { libc::kill(daemon, libc::SIGSTOP) };
    let ghost = Vmm::run("ghost", &["exits", "--vcpus", "2", "--count", "20"], 0);
    ghost.wait();
    // SAFETY: as above.
    unsafe { libc::kill(daemon, libc::SIGCONT) };
    sleep(Duration::from_millis(300));

    let (_, text) = d.get("/metrics", false).unwrap();
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool: {e}"));
    let (_, om) = d.get("/metrics", true).unwrap();
    for body in [&text, &om] {
        assert_eq!(
            repeated_series(body),
            Vec::<String>::new(),
            "no label set twice"
        );
    }
    let m = d.metrics();
    let io = |vm: &str| {
        m.find(COUNT, &[("vm", vm), ("reason", "io")])
            .iter()
            .map(|s| (s.labels["vcpu"].clone(), s.value))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        io(BAD_NAME),
        [("0".into(), 20.0)],
        "the name, unescaped by the parser"
    );
    assert_eq!(
        io("again"),
        [("0".into(), 40.0)],
        "one series for both lives"
    );
    // Neither the VM's name nor its two vCPUs could be read: one series for both vCPUs.
    assert_eq!(io("unknown"), [("unknown".into(), 40.0)]);
    assert!(
        !text.contains("pid-"),
        "no pid in a label: {}",
        text.lines()
            .find(|l| l.contains("pid-"))
            .unwrap_or_default()
    );
    assert!(d.stop().success());
    assert!(leftover_programs().is_empty());
}

#[test]
fn one_vm_of_4_vcpus_and_3_exit_reasons_costs_a_quarter_of_the_lines() {
    if !kvm_available("one_vm_of_4_vcpus_and_3_exit_reasons_costs_a_quarter_of_the_lines") {
        return;
    }
    let d = Daemon::start(&["--stages", "kvm.userspace_exit"]);
    let vmm = Vmm::run("quad", &["exits", "--vcpus", "4", "--count", "50"], 1000);
    assert_eq!(
        (vmm.n("io"), vmm.n("mmio"), vmm.n("intr")),
        (200.0, 200.0, 8.0)
    );
    let (_, text) = d.get("/metrics", false).unwrap();
    let m = d.metrics();
    let series = m.find(COUNT, &[("vm", "quad")]);
    let mut kinds: Vec<_> = series
        .iter()
        .map(|s| {
            (
                s.labels["vcpu"].clone(),
                s.labels["reason"].clone(),
                s.value,
            )
        })
        .collect();
    kinds.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let want: Vec<_> = (0..4)
        .flat_map(|v| {
            [("intr", 1.0), ("io", 50.0), ("mmio", 50.0)]
                .map(|(r, n)| (v.to_string(), r.to_string(), n))
        })
        .collect();
    assert_eq!(kinds, want, "4 vCPUs x 3 reasons, every exit counted once");
    let lines = text.lines().filter(|l| l.contains("vm=\"quad\"")).count();
    // Each series: 49 finite bounds + +Inf + _sum + _count. Every kernel bucket (255 finite
    // bounds) would be 258 lines a series.
    assert_eq!(lines, 12 * 52);
    // What every kernel bucket would cost (256 buckets, +Inf included, + _sum + _count a series).
    let every_kernel_bucket = 12 * (tracer_common::hist::BUCKETS + 2);
    assert!(lines * 4 < every_kernel_bucket, "{lines} lines");
    eprintln!(
        "one VM, 4 vCPUs x 3 exit reasons: {lines} lines (every kernel bucket: {every_kernel_bucket})"
    );
    vmm.wait();
    assert!(d.stop().success());
}

#[test]
fn a_merged_series_never_goes_down_when_one_of_its_vms_is_collected() {
    if !kvm_available("a_merged_series_never_goes_down_when_one_of_its_vms_is_collected") {
        return;
    }
    let d = Daemon::start(&["--stages", "kvm.userspace_exit", "--vm-grace", "1s"]);
    let first = Vmm::run("restarted", &["pio", "--count", "20"], 200);
    let first_pid = first.pid();
    first.wait();
    // The same name again, alive until the first life has been collected.
    let second = Vmm::run("restarted", &["pio", "--count", "30"], 4000);
    let io = |m: &iopath_tests::Metrics| m.value(COUNT, &[("vm", "restarted"), ("reason", "io")]);
    assert_eq!(io(&d.metrics()), 50.0);
    // The first life is collected (grace 1 s, collection every second): only the second is
    // left in the kernel's VMM set.
    assert!(std::fs::metadata(format!("/proc/{first_pid}")).is_err());
    sleep(Duration::from_secs(3));
    let m = d.metrics();
    assert_eq!(
        m.value("iopath_kernel_map_entries", &[("map", "VMM_TGIDS")]),
        1.0,
        "the first life's entries are gone"
    );
    assert_eq!(io(&m), 50.0, "the counter kept the collected life's 20");
    second.wait();
    assert!(d.stop().success());
}
