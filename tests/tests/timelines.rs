//! Sampled per-I/O timelines and exemplars, on this machine's kernel: a test VMM's disk backend
//! reads a loop device over `iopath-slowfs`, whose every read takes a known D, and signals the
//! guest over its irqfd after each. Each read is one I/O crossing blk.device (the read itself,
//! D) then blk.complete_to_irq (the backend's completion to the interrupt); its timeline must
//! chain the two, the first within 10% of D, and the exemplar on a slow blk.device bucket must
//! name a timeline /timelines gives back with that same latency.

use std::time::Duration;

use iopath_tests::{
    Daemon, Recording, SlowDisk, Why, have_fuse, kvm_available, net::TapBackend, testvmm_bin,
};

const D_US: f64 = 2000.0;

fn disk_backend(name: &str, dev: &str, reads: u32) -> TapBackend {
    // 1.5 s for the daemon to know the VMM, its 10 warm-up reads (the disk's vector is learned
    // from them), 1.5 s more, then the reads.
    TapBackend::spawn(
        &testvmm_bin(),
        name,
        &[
            "blk-backend",
            "--dev",
            dev,
            "--count",
            &reads.to_string(),
            "--spin-us",
            "0",
            "--first-us",
            "1500000",
            "--gap-us",
            "1500000",
        ],
    )
}

/// The steps of a timeline as (stage, vm label, start µs, length µs).
fn steps(t: &serde_json::Value) -> Vec<(String, String, f64, f64)> {
    t["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["labels"]["vm"].as_str().unwrap_or("").to_string(),
                s["start_us"].as_f64().unwrap(),
                s["us"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// A read's timeline: blk.device of `vm`, then blk.complete_to_irq starting where it ended
/// (within the linking tolerance, 20 µs); its blk.device length in µs.
fn read_of(t: &serde_json::Value, vm: &str) -> Option<f64> {
    let s = steps(t);
    (s.len() == 2
        && s[0].0 == "blk.device"
        && s[1].0 == "blk.complete_to_irq"
        && s.iter().all(|x| x.1 == vm)
        && (s[1].2 - (s[0].2 + s[0].3)).abs() <= 20.0)
        .then_some(s[0].3)
}

/// The reads of `vm` among `timelines`: how many, and the median of their blk.device, which
/// must be D within 10% (the slowest timelines are asked for: a few outliers are among them).
fn reads_of(timelines: &[serde_json::Value], vm: &str) -> (usize, f64) {
    let mut us: Vec<f64> = timelines.iter().filter_map(|t| read_of(t, vm)).collect();
    us.sort_by(f64::total_cmp);
    let median = us.get(us.len() / 2).copied().unwrap_or(f64::NAN);
    assert!(
        (median - D_US).abs() <= 0.1 * D_US,
        "{vm}: median blk.device {median} µs of {} reads, for D = {D_US} µs: {us:?}",
        us.len()
    );
    (us.len(), median)
}

#[test]
fn a_disk_reads_timeline_chains_its_stages_and_its_exemplar_names_it() {
    const TEST: &str = "a_disk_reads_timeline_chains_its_stages_and_its_exemplar_names_it";
    if !kvm_available(TEST) {
        return;
    }
    if !have_fuse() {
        iopath_tests::skip(
            TEST,
            Why::Machine,
            "no FUSE in this kernel (/dev/fuse, module fuse)",
        );
        return;
    }
    let disk = SlowDisk::new("timeline", 16, Duration::from_micros(D_US as u64));
    // Every window sampled: every read has its timeline.
    let d = Daemon::start(&["--timeline-every", "1"]);
    let reads = 60;
    let vmm = disk_backend("tl-disk", &disk.lo().dev, reads);
    let report = vmm.report();
    assert_eq!(report["reads"], reads, "{report}");

    // /timelines: the slowest 50 kept. The reads (D each) are the slowest I/Os here.
    let (_, list) = d.get("/timelines", false).expect("/timelines");
    let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let shown = list["timelines"].as_array().expect("timelines");
    let (chained, median) = reads_of(shown, "tl-disk");
    eprintln!(
        "{chained} of the {} slowest timelines are the VM's reads chained, blk.device median \
         {median:.1} µs; samples {}, ambiguous {}; first: {}",
        shown.len(),
        list["samples"],
        list["ambiguous"],
        shown.first().map(|t| t.to_string()).unwrap_or_default()
    );
    assert!(
        chained >= 40,
        "{chained} reads chained of {} shown",
        shown.len()
    );

    // The exemplar of a slow blk.device bucket of the VM (OpenMetrics, as Prometheus asks).
    let (_, om) = d.get("/metrics", true).expect("/metrics");
    let line = om
        .lines()
        .find(|l| {
            l.starts_with("iopath_stage_latency_seconds_bucket{")
                && l.contains("stage=\"blk.device\"")
                && l.contains("vm=\"tl-disk\"")
                && l.contains(" # {trace_id=\"")
        })
        .unwrap_or_else(|| panic!("no exemplar on the VM's blk.device buckets:\n{om}"));
    let exemplar = line.split(" # ").nth(1).unwrap();
    let id = exemplar
        .split("trace_id=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap();
    assert!(exemplar.contains("vm=\"tl-disk\""), "{line}");
    // `{labels} value timestamp`
    let mut tail = exemplar.rsplit("} ").next().unwrap().split(' ');
    let value: f64 = tail.next().unwrap().parse().unwrap();
    let ts: f64 = tail.next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - ts).abs() < 60.0,
        "exemplar timestamp {ts}, now {now}"
    );
    let le: f64 = line
        .split("le=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .parse()
        .unwrap();
    // inside its bucket: at or under its le, over the one before (2 bounds per power of two)
    assert!(
        value <= le && value > le / std::f64::consts::SQRT_2 * (1.0 - 1e-12),
        "exemplar {value} s in the bucket le {le}"
    );
    let (_, one) = d
        .get(&format!("/timelines?trace_id={id}"), false)
        .expect("/timelines?trace_id");
    let one: serde_json::Value = serde_json::from_str(&one).unwrap_or_else(|_| panic!("{one}"));
    assert_eq!(one["trace_id"], id);
    let device = steps(&one)
        .into_iter()
        .find(|s| s.0 == "blk.device")
        .unwrap_or_else(|| panic!("{one}"));
    assert!(
        (device.3 - value * 1e6).abs() < 0.01,
        "trace {id}: blk.device {} µs, exemplar {value} s",
        device.3
    );
    let (_, none) = d.get("/timelines?trace_id=0", false).unwrap();
    assert!(none.contains("no such timeline"), "{none}");
    let (_, bad) = d.get("/timelines?trace_id=zz", false).unwrap();
    assert!(bad.contains("16 hexadecimal digits"), "{bad}");

    // No sample was lost to a full ring, and the counts are exported.
    let m = d.metrics();
    assert_eq!(
        m.value("iopath_map_full_total", &[("map", "TIMELINES")]),
        0.0
    );
    assert!(m.value("iopath_timeline_samples_total", &[]) >= 2.0 * reads as f64);
    assert_eq!(m.value("iopath_timeline_ambiguous_total", &[]), 0.0);
    assert!(d.stop().success());

    // record prints the slowest, and its capture keeps them.
    let rec = Recording::start(&["--timeline-every", "1"]);
    let vmm = disk_backend("tl-rec", &disk.lo().dev, 30);
    vmm.report();
    let capture: serde_json::Value = serde_json::from_str(&rec.stop()).expect("capture");
    let kept = capture["timelines"].as_array().expect("timelines");
    let (reads, _) = reads_of(kept, "tl-rec");
    assert!(reads >= 15, "{reads} reads in the capture's {}", kept.len());
    assert!(capture["timeline_samples"].as_u64().unwrap() >= 60);
}

#[test]
fn timelines_off_sample_nothing_and_a_bad_setting_is_refused() {
    iopath_tests::require_root();
    let out = std::process::Command::new(iopath_tests::iopath_bin())
        .args(["serve", "--timeline-every", "3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("invalid --timeline-every \"3\""), "{err}");
    let lo = iopath_tests::LoopDev::new("tloff", 8);
    // the same load sampled in every window (the control), then in none
    for (every, sampled) in [("1", true), ("0", false)] {
        let d = Daemon::start(&["--timeline-every", every]);
        lo.direct_io(20, 20);
        let (_, list) = d.get("/timelines", false).unwrap();
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        let n = list["samples"].as_u64().unwrap();
        // 40 requests: each a blk.device sample at least
        assert!(
            if sampled { n >= 40 } else { n == 0 },
            "--timeline-every {every}: {n} samples"
        );
        if sampled {
            assert!(d.stop().success());
        } else {
            check_counted_and_stop(d);
        }
    }
}

/// With timelines off the block I/O is counted all the same.
fn check_counted_and_stop(d: Daemon) {
    // the block I/O was counted all the same
    let m = d.metrics();
    assert!(
        m.find(
            "iopath_stage_latency_seconds_count",
            &[("stage", "blk.device")]
        )
        .iter()
        .map(|s| s.value)
        .sum::<f64>()
            >= 40.0
    );
    assert!(d.stop().success());
}
