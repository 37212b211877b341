//! `vfio.handler` on this machine, which has no VFIO device: `--vfio-irqs` points the stage at
//! the machine's own virtio disk's request IRQ, whose handler the same programs time (only the
//! IRQ's name differs from a VFIO device's). Real interrupts, driven by direct I/O to a file
//! on that disk; counted against /proc/interrupts over the same window.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    fs,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::Path,
    time::{Duration, Instant},
};

use iopath_tests::{Daemon, Why, require_root, skip};

/// The virtio device (`virtioN`) and PCI address of the disk holding `path`.
fn disk_of(path: &Path) -> Option<(String, String)> {
    let dev = fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    // A partition's device is its disk's.
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    let virtio = fs::canonicalize(disk.join("device")).ok()?;
    let name = virtio.file_name()?.to_str()?.to_string();
    let pci = virtio.parent()?.file_name()?.to_str()?.to_string();
    name.starts_with("virtio").then_some((name, pci))
}

/// Interrupts of the IRQs named `prefix…` so far (all CPUs), and their numbers and hwirqs.
fn interrupts(prefix: &str) -> (u64, Vec<(u32, String)>) {
    let text = fs::read_to_string("/proc/interrupts").unwrap();
    let cpus = text.lines().next().unwrap().split_whitespace().count();
    let mut total = 0;
    let mut irqs = Vec::new();
    for l in text.lines().skip(1) {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.last().is_some_and(|n| n.starts_with(prefix)) {
            total += w[1..=cpus]
                .iter()
                .map(|c| c.parse::<u64>().unwrap())
                .sum::<u64>();
            let irq = w[0].trim_end_matches(':').parse().unwrap();
            irqs.push((irq, w[cpus + 2].split('-').next().unwrap().to_string()));
        }
    }
    (total, irqs)
}

#[test]
fn the_handler_of_a_named_host_irq_counts_every_interrupt() {
    const TEST: &str = "the_handler_of_a_named_host_irq_counts_every_interrupt";
    require_root();
    let dir = Path::new("/var/tmp");
    let Some((virtio, pci)) = disk_of(dir) else {
        skip(TEST, Why::Machine, "/var/tmp is on no virtio disk here");
        return;
    };
    let prefix = format!("{virtio}-req");
    let (_, irqs) = interrupts(&prefix);
    assert!(
        !irqs.is_empty(),
        "{prefix}: no such IRQ in /proc/interrupts"
    );
    let d = Daemon::start(&["--stages", "vfio.handler", "--vfio-irqs", &prefix]);
    let path = dir.join(format!("iopath-vfio-{}", std::process::id()));
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(&path)
        .expect("a file on the disk");
    let layout = Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { alloc_zeroed(layout) };
    // SAFETY: ptr is a live 4096-byte allocation.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 4096) };
    let hist = "iopath_stage_latency_seconds_count";
    let sel = [("stage", "vfio.handler"), ("device", pci.as_str())];
    let (irq0, _) = interrupts(&prefix);
    let m0 = d.metrics();
    // Bounded: 1,000 synchronous writes, or 20 s.
    let end = Instant::now() + Duration::from_secs(20);
    for i in 0..1000u64 {
        f.write_all_at(buf, (i % 256) * 4096).expect("direct write");
        if Instant::now() > end {
            break;
        }
    }
    let m1 = d.metrics();
    let (irq1, _) = interrupts(&prefix);
    // SAFETY: allocated above with this layout.
    unsafe { dealloc(ptr, layout) };
    drop(f);
    let _ = fs::remove_file(&path);
    let (fired, samples) = (irq1 - irq0, m1.value(hist, &sel) - m0.value(hist, &sel));
    eprintln!("{prefix} ({pci}): {fired} interrupts in /proc/interrupts, {samples} samples");
    assert!(
        fired >= 500,
        "{fired} interrupts for 1,000 synchronous writes"
    );
    assert!(
        (samples - fired as f64).abs() <= 0.05 * fired as f64,
        "{samples} handler samples for {fired} interrupts"
    );
    // Each IRQ's series: the device's PCI address, the vector its hwirq, no VM.
    for (irq, hwirq) in &irqs {
        let s = m1.find(hist, &[("stage", "vfio.handler"), ("vector", hwirq)]);
        if let Some(s) = s.first() {
            assert_eq!(s.labels["device"], pci, "IRQ {irq}");
            assert_eq!(s.labels["vm"], "", "IRQ {irq}: a host device, no VM");
            assert_eq!(s.labels["path"], "vfio");
        }
    }
    let (_, p50) = d
        .find_p50("vfio.handler", &[("device", pci.as_str())])
        .expect("the handler's median");
    eprintln!("{prefix}: handler p50 {p50:.1} us");
    assert!(p50 > 0.0 && p50 < 1000.0, "handler p50 {p50} us");
    let unmatched = |m: &iopath_tests::Metrics| {
        m.value(
            "iopath_events_dropped_total",
            &[("stage", "vfio.handler"), ("reason", "unmatched")],
        )
    };
    assert_eq!(
        unmatched(&m1) - unmatched(&m0),
        0.0,
        "every exit had its entry"
    );
    assert!(d.stop().success());
}
