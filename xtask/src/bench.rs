//! `cargo xtask bench`: what iopath costs, measured in one run on this machine.
//!
//! Workload: fio, direct 4 KiB random reads and writes (psync, queue depth 1) on a loop device
//! backed by a file, never the root disk directly, bounded by time. Modes run interleaved
//! (without, with, without, ...) so drift hits both alike:
//! - without: no tracer;
//! - with: `iopath serve --bpf-stats`, every stage that attaches; its programs' run time and
//!   run count (kernel.bpf_stats) over the workload give ns per event;
//! - bpftrace (when installed): the same issue-to-complete histogram as a bpftrace script, for
//!   reference, measured the same way.
//!
//! Scrapes: after each run with iopath, 200 scrapes of /metrics by 50 clients at once, timed.
//!
//! KVM stages (when /dev/kvm exists): the test VMM drives exits to userspace, irqfd and
//! KVM_SIGNAL_MSI signals and halts with and without iopath; the KVM programs' ns per event come
//! from that phase, and the ratio is of exits to userspace per second.

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
// The end-to-end tests' helpers: loop device, daemon, scrape parser.
use iopath_tests::{Daemon, LoopDev, Metrics, http_get};

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fio(dev: &str, seconds: u32) -> anyhow::Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=iopath-bench",
            "--direct=1",
            "--rw=randrw",
            "--bs=4k",
            "--ioengine=psync",
            "--iodepth=1",
        ])
        .arg(format!("--filename={dev}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--time_based", "--size=200M", "--output-format=json"])
        .output()
        .context("fio (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON")?;
    let job = &v["jobs"][0];
    Ok(job["read"]["iops"].as_f64().unwrap_or(0.0) + job["write"]["iops"].as_f64().unwrap_or(0.0))
}

/// program -> (run time ns, run count) from one scrape of iopath.
fn program_stats(m: &Metrics) -> BTreeMap<String, (f64, f64)> {
    m.label_values("iopath_program_run_count_total", "program")
        .into_iter()
        .map(|p| {
            let sel = [("program", p.as_str())];
            let t = m.value("iopath_program_run_time_seconds_total", &sel) * 1e9;
            let c = m.value("iopath_program_run_count_total", &sel);
            (p.clone(), (t, c))
        })
        .collect()
}

const BPFTRACE: &str = r#"
tracepoint:block:block_rq_issue { @start[args->dev, args->sector] = nsecs; }
tracepoint:block:block_rq_complete /@start[args->dev, args->sector]/ {
    @usecs = hist((nsecs - @start[args->dev, args->sector]) / 1000);
    delete(@start[args->dev, args->sector]);
}
"#;

/// Sum of (run_time_ns, run_cnt) over the reference bpftrace script's programs (bpftool, JSON).
/// bpftrace names them after the probe (`block_rq_issue`, `block_rq_comple`); iopath's are
/// `blk_rq_*`, so the name tells them apart.
fn bpftrace_stats() -> anyhow::Result<(f64, f64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("bpftool")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut acc = (0.0, 0.0);
    for p in v.as_array().into_iter().flatten() {
        if p["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("block_rq_"))
        {
            acc.0 += p["run_time_ns"].as_f64().unwrap_or(0.0);
            acc.1 += p["run_cnt"].as_f64().unwrap_or(0.0);
        }
    }
    Ok(acc)
}

fn set_bpf_stats(on: bool) {
    let _ = fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    );
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Runs the test VMM (tests/src/bin/iopath-testvmm.rs) and returns its report.
fn testvmm(vmm: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(vmm)
        .args(["-name", "guest=bench"])
        .args(args)
        .output()
        .context("iopath-testvmm")?;
    if !out.status.success() {
        bail!(
            "iopath-testvmm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The KVM workload: exits to userspace as fast as the VMM can take them, irqfd signals over
/// an MSI and an IOAPIC route, KVM_SIGNAL_MSI, halts. Returns PIO exits per second.
fn kvm_workload(vmm: &Path) -> anyhow::Result<f64> {
    let pio = testvmm(vmm, &["pio", "--count", "20000", "--spin-us", "0"])?;
    for mode in ["irqfd-msi", "irqfd-gsi", "signal-msi"] {
        testvmm(vmm, &[mode, "--count", "4000", "--gap-us", "20"])?;
    }
    // Enough halts for a stable ns per event (each wakes a cold cache).
    testvmm(vmm, &["halt", "--count", "2000", "--spin-us", "30"])?;
    let n = pio["handled"].as_f64().unwrap_or(0.0);
    let us = pio["elapsed_us"].as_f64().unwrap_or(f64::MAX);
    Ok(n / us * 1e6)
}

/// Scrapes: `clients` threads, each doing `each` GET /metrics in a row, all at once. Returns the
/// wall time of the whole burst, and the failed scrapes.
fn scrape_burst(port: u16, clients: usize, each: usize) -> (Duration, usize) {
    let t = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            std::thread::spawn(move || {
                (0..each)
                    .filter(|_| {
                        http_get(port, "/metrics", i % 2 == 0)
                            .map_or(true, |(_, body)| !body.contains("iopath_vms"))
                    })
                    .count()
            })
        })
        .collect();
    let failed = threads.into_iter().map(|t| t.join().unwrap_or(each)).sum();
    (t.elapsed(), failed)
}

/// Adds the increase of each program's stats between two scrapes to `progs`.
fn accumulate(
    progs: &mut BTreeMap<String, (f64, f64)>,
    before: &BTreeMap<String, (f64, f64)>,
    after: BTreeMap<String, (f64, f64)>,
) {
    for (name, (t1, c1)) in after {
        let (t0, c0) = before.get(&name).copied().unwrap_or_default();
        let e = progs.entry(name).or_default();
        e.0 += t1 - t0;
        e.1 += c1 - c0;
    }
}

pub fn bench(bin: &Path, vmm: Option<&Path>, seconds: u32, rounds: u32) -> anyhow::Result<()> {
    let dir = crate::root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let lo = LoopDev::new("bench", 256);
    eprintln!(
        "bench: {} rounds x {seconds}s of fio 4k randrw direct on {} (psync, qd 1)",
        rounds, lo.dev
    );
    fio(&lo.dev, 1)?; // warm-up, not counted

    let has_bpftrace = Command::new("bpftrace")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let (mut without, mut with, mut with_bt) = (Vec::new(), Vec::new(), Vec::new());
    let (mut kvm_without, mut kvm_with) = (Vec::new(), Vec::new());
    let mut progs: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut bt = (0.0, 0.0);
    let mut bursts = Vec::new();
    for round in 1..=rounds {
        without.push(fio(&lo.dev, seconds)?);

        let iopath = Daemon::start_bin(bin, &["--bpf-stats"]);
        let before = program_stats(&iopath.metrics());
        with.push(fio(&lo.dev, seconds)?);
        let after = program_stats(&iopath.metrics());
        accumulate(&mut progs, &before, after);
        // 200 scrapes by 50 clients at once, with the block series of the fio run exported.
        let (took, failed) = scrape_burst(iopath.port, 50, 4);
        anyhow::ensure!(failed == 0, "{failed} of 200 scrapes failed");
        bursts.push(took.as_secs_f64());
        if let Some(vmm) = vmm {
            // KVM stages: their programs see no event under fio.
            let before = program_stats(&iopath.metrics());
            kvm_with.push(kvm_workload(vmm)?);
            accumulate(&mut progs, &before, program_stats(&iopath.metrics()));
        }
        anyhow::ensure!(iopath.stop().success(), "iopath did not exit cleanly");
        if let Some(vmm) = vmm {
            kvm_without.push(kvm_workload(vmm)?);
        }

        if has_bpftrace {
            set_bpf_stats(true);
            let child = Command::new("bpftrace")
                .arg("-e")
                .arg(BPFTRACE)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            let mut p = Proc(child);
            sleep(Duration::from_secs(3)); // bpftrace compiles and attaches
            if let Ok(Some(st)) = p.0.try_wait() {
                let mut err = String::new();
                let _ = p.0.stderr.take().map(|mut e| e.read_to_string(&mut err));
                let why = err
                    .lines()
                    .find(|l| l.contains("ERROR") && !l.contains("RLIMIT"))
                    .unwrap_or_default();
                eprintln!("bench: bpftrace reference skipped: it exited ({st}) {why}");
                set_bpf_stats(false);
                continue;
            }
            let b0 = bpftrace_stats()?;
            with_bt.push(fio(&lo.dev, seconds)?);
            let b1 = bpftrace_stats()?;
            drop(p);
            set_bpf_stats(false);
            bt.0 += b1.0 - b0.0;
            bt.1 += b1.1 - b0.1;
        }
        eprintln!(
            "bench: round {round}: without {:.0} IOPS, with iopath {:.0}{}",
            without.last().unwrap(),
            with.last().unwrap(),
            with_bt
                .last()
                .map(|v| format!(", with bpftrace {v:.0}"))
                .unwrap_or_default()
        );
    }

    println!("\nns per event (kernel.bpf_stats, summed over {rounds} runs of {seconds}s):");
    println!("  {:<24} {:>12} {:>10}", "program", "events", "ns/event");
    let mut report = serde_json::Map::new();
    for (name, (t, c)) in &progs {
        let ns = if *c > 0.0 { t / c } else { 0.0 };
        println!(
            "  {name:<24} {c:>12.0} {:>10}",
            if *c > 0.0 {
                format!("{ns:.0}")
            } else {
                "-".into()
            }
        );
        report.insert(
            name.clone(),
            serde_json::json!({"events": c, "ns_per_event": ns}),
        );
    }
    let bt_ns = (bt.1 > 0.0).then(|| bt.0 / bt.1);
    if let Some(ns) = bt_ns {
        println!(
            "  {:<24} {:>12.0} {ns:>10.0}",
            "bpftrace (same histogram)", bt.1
        );
    }
    let (a, b) = (mean(&without), mean(&with));
    println!(
        "\nIOPS: without {a:.0}, with iopath {b:.0}: ratio {:.3} ({:+.1}%)",
        b / a,
        (b / a - 1.0) * 100.0
    );
    if !with_bt.is_empty() {
        let c = mean(&with_bt);
        println!("IOPS with bpftrace {c:.0}: ratio {:.3}", c / a);
    }
    println!(
        "200 scrapes by 50 clients at once: {} s",
        bursts
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let kvm_ratio = (!kvm_with.is_empty()).then(|| {
        let (a, b) = (mean(&kvm_without), mean(&kvm_with));
        println!(
            "KVM exits to userspace per second (test VMM): without {a:.0}, with iopath {b:.0}: ratio {:.3}",
            b / a
        );
        b / a
    });
    let json = serde_json::json!({
        "seconds": seconds, "rounds": rounds, "device": lo.dev,
        "iops_without": without, "iops_with_iopath": with, "iops_with_bpftrace": with_bt,
        "ratio_iopath": b / a, "programs": report, "bpftrace_ns_per_event": bt_ns,
        "kvm_exits_per_s_without": kvm_without, "kvm_exits_per_s_with_iopath": kvm_with,
        "ratio_kvm_exits": kvm_ratio,
        "scrape_burst_200_by_50_s": bursts,
    });
    fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!("(written to target/bench/latest.json)");
    Ok(())
}
