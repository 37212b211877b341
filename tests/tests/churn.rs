//! A host that starts and stops VMs all day: 200 short-lived VMs (the test VMM, each living
//! 100 ms to 1 s) while `iopath serve --vm-grace 2s` runs. Every VM is exported under its own
//! name while its series last, every kernel map goes back to its idle size once they are
//! collected, and the daemon's memory stays flat.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread::{self, sleep},
    time::{Duration, Instant},
};

use iopath_tests::{Daemon, KVM_STAGES, Vmm, kvm_available, patience, rss_kib};

const VMS: usize = 200;
const AT_ONCE: usize = 8;

#[test]
fn two_hundred_short_lived_vms() {
    if !kvm_available("two_hundred_short_lived_vms") {
        return;
    }
    let d = Arc::new(Daemon::start(&["--vm-grace", "2s", "--stages", KVM_STAGES]));
    let idle = d.metrics().map_entries();
    let pid = d.child.id();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let rss_after_10 = Arc::new(Mutex::new(0u64));
    let workers: Vec<_> = (0..AT_ONCE)
        .map(|_| {
            let (next, done, rss) = (next.clone(), done.clone(), rss_after_10.clone());
            thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= VMS {
                        return;
                    }
                    // 100 ms to 1 s of life (five times that emulated, where the daemon is
                    // as slow as the VMs), exits of every kind along the way
                    let hold = patience(100 + (i as u64 * 37) % 900).as_millis() as u64;
                    let args: &[&str] = match i % 3 {
                        0 => &["pio", "--count", "50", "--spin-us", "20"],
                        1 => &["irqfd-gsi", "--count", "20", "--gap-us", "300"],
                        _ => &["exits", "--vcpus", "2", "--count", "20"],
                    };
                    Vmm::run(&format!("churn-{i}"), args, hold).wait();
                    if done.fetch_add(1, Ordering::Relaxed) + 1 == 10 {
                        *rss.lock().unwrap() = rss_kib(pid);
                    }
                }
            })
        })
        .collect();
    // Scrape while they come and go; a VM's series last 2 s after it exits.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while done.load(Ordering::Relaxed) < VMS {
        assert!(Instant::now() < deadline, "200 VMs did not finish in 300 s");
        // A worker that failed (a test VMM that did not start or finish) fails the test now,
        // with its own message, rather than at the deadline.
        if let Some(i) = workers.iter().position(|w| w.is_finished())
            && next.load(Ordering::Relaxed) < VMS
        {
            let failed = workers.into_iter().nth(i).unwrap();
            if let Err(panic) = failed.join() {
                std::panic::resume_unwind(panic);
            }
            panic!("a worker ended with VMs left to run");
        }
        let m = d.metrics();
        seen.extend(m.label_values("iopath_stage_latency_seconds_count", "vm"));
        sleep(Duration::from_millis(250));
    }
    for w in workers {
        w.join().unwrap();
    }
    let m = d.metrics();
    seen.extend(m.label_values("iopath_stage_latency_seconds_count", "vm"));
    let missing: Vec<String> = (0..VMS)
        .map(|i| format!("churn-{i}"))
        .filter(|n| !seen.contains(n))
        .collect();
    let others: Vec<&String> = seen.iter().filter(|v| !v.starts_with("churn-")).collect();
    assert!(
        missing.is_empty(),
        "VMs never exported under their name: {missing:?}"
    );
    assert!(others.is_empty(), "series under another name: {others:?}");

    // Collected: every kernel map back to its idle size.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut now = d.metrics().map_entries();
    while now != idle && Instant::now() < deadline {
        sleep(Duration::from_millis(500));
        now = d.metrics().map_entries();
    }
    assert_eq!(now, idle, "kernel maps back to idle");
    assert_eq!(d.metrics().value("iopath_vms", &[]), 0.0);
    let (first, last) = (*rss_after_10.lock().unwrap(), rss_kib(pid));
    eprintln!("200 VMs: daemon RSS {first} KiB after 10, {last} KiB at the end");
    assert!(first > 0);
    assert!(
        last <= first + first / 10,
        "RSS within 10% of its value after 10 VMs: {first} -> {last} KiB"
    );
    let d = Arc::into_inner(d).expect("workers done");
    assert!(d.stop().success());
}
