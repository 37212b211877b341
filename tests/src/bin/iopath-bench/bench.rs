//! What iopath costs, measured in one run on this machine (`cargo xtask bench` builds and runs it).
//!
//! Workload: fio, direct 4 KiB random reads and writes (psync, queue depth 1) on a loop device
//! backed by a file, never the root disk directly, bounded by time. Modes run interleaved
//! (without, with, ...) so drift hits both alike:
//! - without: no tracer;
//! - with: `iopath serve --bpf-stats`, its default stages; its programs' run time and run count
//!   (kernel.bpf_stats) over the workload give ns per event;
//! - bpftrace (when installed) and iopath's block stage attached at once: the same
//!   issue-to-complete histogram, both sides' run time over one window, beside bpftrace
//!   programs on the same tracepoints that only read the clock or do nothing (the floor); then
//!   a window for each variant of iopath's block programs (`blk::cut`), for where each
//!   nanosecond goes.
//!
//! Scrapes: after each run with iopath, 200 scrapes of /metrics by 50 clients at once, timed.
//!
//! KVM stages (when /dev/kvm exists): the test VMM drives exits to userspace, irqfd and
//! KVM_SIGNAL_MSI signals and halts under every stage with the syscall stand-ins, for the KVM
//! programs' ns per event.
//!
//! Network (when /dev/kvm exists): a peer namespace floods UDP through a veth, a bridge and a
//! tap to the test VMM reading the tap (`tap-rx`: each packet read, then an irqfd signal);
//! the packets per second it reads without iopath and with its default stages, alternating,
//! and the net programs' ns per event.
//!
//! Syscall tax: loops of system calls of this (non-VMM) process and the test VMM's exit rate,
//! without iopath, with its default stages and with the stand-ins, alternating; then how many
//! of iopath's programs ran per call in each mode. The same, scaled down, in the distro-kernel
//! VM (`iopath-bench tax`, which `cargo xtask bench` runs there), where KVM's functions are kprobes.

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
use iopath_tests::{Daemon, LoopDev, Metrics, http_get, net::Topology};
use tracer_common::blk::cut;

/// The `--timeline-every` the bench's block windows run with (the default; the sixth window
/// has timelines off).
const DEFAULT_TIMELINES: &str = "64";
const TIMELINES_OFF: &str = "(instead of the whole) timelines off: --timeline-every 0";

/// The block programs' variants the bench times beside bpftrace: `blk::cut`'s steps with the
/// default timelines, then the whole programs without timelines (what sampling costs).
const VARIANTS: [(u32, &str, &str); cut::STEPS.len() + 1] = {
    let mut v = [(0, "", DEFAULT_TIMELINES); cut::STEPS.len() + 1];
    let mut i = 0;
    while i < cut::STEPS.len() {
        v[i] = (cut::STEPS[i].0, cut::STEPS[i].1, DEFAULT_TIMELINES);
        i += 1;
    }
    v[i] = (cut::WHOLE, TIMELINES_OFF, "0");
    v
};

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

/// Floors on the same two tracepoints: what any program costs there (empty), and that plus the
/// one clock read a latency needs at each end (the branch keeps the read; it never prints).
const BPFTRACE_FLOORS: [(&str, &str); 2] = [
    (
        "empty",
        "tracepoint:block:block_rq_issue, tracepoint:block:block_rq_complete { }",
    ),
    (
        "empty + clock read",
        "tracepoint:block:block_rq_issue, tracepoint:block:block_rq_complete \
         { $t = nsecs; if ($t == 1) { printf(\"x\"); } }",
    ),
];

/// (run_time_ns, run_cnt) of each loaded bpftrace block program by id (bpftool, JSON). bpftrace
/// names them after the probe (`block_rq_issue`, `block_rq_comple`); iopath's are `blk_rq_*`.
fn bpftrace_progs() -> anyhow::Result<BTreeMap<u64, (f64, f64)>> {
    Ok(iopath_tests::bpf_progs()
        .into_iter()
        .filter(|p| p.name.starts_with("block_rq_"))
        .map(|p| (p.id, (p.run_time_ns, p.run_cnt)))
        .collect())
}

/// Sum over the programs `ids` of their increase from `before` to `after`.
fn delta(
    ids: &[u64],
    before: &BTreeMap<u64, (f64, f64)>,
    after: &BTreeMap<u64, (f64, f64)>,
) -> (f64, f64) {
    ids.iter().fold((0.0, 0.0), |a, id| {
        let (t0, c0) = before.get(id).copied().unwrap_or_default();
        let (t1, c1) = after.get(id).copied().unwrap_or_default();
        (a.0 + t1 - t0, a.1 + c1 - c0)
    })
}

/// Starts bpftrace on `script` and returns it with the ids of the programs it added, once
/// attached; None (saying why) when it exited.
fn start_bpftrace(script: &str) -> anyhow::Result<Option<(Proc, Vec<u64>)>> {
    let known = bpftrace_progs()?;
    let child = Command::new("bpftrace")
        .arg("-e")
        .arg(script)
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
        return Ok(None);
    }
    let ids = bpftrace_progs()?
        .into_keys()
        .filter(|id| !known.contains_key(id))
        .collect();
    Ok(Some((p, ids)))
}

fn set_bpf_stats(on: bool) {
    let _ = fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    );
}

/// ns per call of three system calls a non-VMM process makes, each in a tight loop of `n`:
/// write(2) of one byte to /dev/null, getpid(2), ioctl(FIONREAD) on a pipe.
fn syscall_loops(n: u32) -> [f64; 3] {
    use std::os::fd::AsRawFd;
    let null = fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let mut fds = [0i32; 2];
    // SAFETY: plain system calls on fds this function owns; the pipe is closed below.
    unsafe { libc::pipe(fds.as_mut_ptr()) };
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    let byte = [0u8; 1];
    let w = time(&|| unsafe {
        libc::write(null.as_raw_fd(), byte.as_ptr().cast(), 1);
    });
    let g = time(&|| unsafe {
        libc::syscall(libc::SYS_getpid);
    });
    let mut avail = 0i32;
    let avail_ptr = &mut avail as *mut i32;
    let i = time(&|| unsafe {
        libc::ioctl(fds[0], libc::FIONREAD, avail_ptr);
    });
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    [w, g, i]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The syscall tax on a process that runs no VM: the loops without iopath, with its default
/// stages, and with system call tracepoints (`--syscall-tracepoints`), alternating, `rounds`
/// times, 5 loops each. Also the test VMM's exit rate in the same three modes, and, from
/// one more loop per mode under `--bpf-stats`, how many of iopath's programs ran per call.
struct Tax {
    loops: [[Vec<f64>; 3]; 3],
    exits: [Vec<f64>; 3],
    runs_per_call: [f64; 3],
}

const TAX_MODES: [&str; 3] = ["without", "default", "syscall_tracepoints"];

/// Every stage, with the system call stand-ins forced even where function probes would attach
/// (so the third mode measures them on any kernel).
const STAND_INS: [&str; 2] = [
    "--syscall-tracepoints",
    "--event-family=kvm_vcpu_run=syscall,kvm_signal_msi=syscall,irqfd_wakeup=syscall",
];

/// `n` calls per loop, `exits` exits per exit-rate run.
fn syscall_tax(
    bin: &Path,
    vmm: Option<&Path>,
    rounds: u32,
    n: u32,
    exits: u32,
) -> anyhow::Result<Tax> {
    let mut tax = Tax {
        loops: Default::default(),
        exits: Default::default(),
        runs_per_call: [0.0; 3],
    };
    for _ in 0..rounds {
        for (m, args) in [None, Some(&[][..]), Some(&STAND_INS[..])]
            .into_iter()
            .enumerate()
        {
            let daemon = args.map(|a| Daemon::start_bin(bin, a));
            // The last mode's programs are freed after its daemon exits (RCU, deferred work):
            // every mode lets that settle before it measures.
            sleep(Duration::from_secs(2));
            for _ in 0..5 {
                for (runs, ns) in tax.loops[m].iter_mut().zip(syscall_loops(n)) {
                    runs.push(ns);
                }
            }
            if let Some(vmm) = vmm {
                tax.exits[m].push(exit_rate(vmm, exits)?);
            }
            if let Some(d) = daemon {
                anyhow::ensure!(d.stop().success(), "iopath did not exit cleanly");
            }
        }
    }
    // Apart from the timed loops: bpf_stats adds a clock read to every program run.
    for (m, args) in [(1, &[][..]), (2, &STAND_INS[..])] {
        let d = Daemon::start_bin(bin, &[args, &["--bpf-stats"]].concat());
        let before = program_stats(&d.metrics());
        syscall_loops(n);
        let after = program_stats(&d.metrics());
        anyhow::ensure!(d.stop().success(), "iopath did not exit cleanly");
        let runs: f64 = after
            .iter()
            .map(|(p, (_, c))| c - before.get(p).map_or(0.0, |b| b.1))
            .sum();
        tax.runs_per_call[m] = runs / (3.0 * n as f64);
    }
    Ok(tax)
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
    // Its report is its last line (a mode that waits for a tracer says `ready` first).
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    Ok(serde_json::from_str(last)?)
}

/// Exits to userspace per second: `count` PIO exits as fast as the test VMM takes them.
fn exit_rate(vmm: &Path, count: u32) -> anyhow::Result<f64> {
    let count = count.to_string();
    let pio = testvmm(vmm, &["pio", "--count", &count, "--spin-us", "0"])?;
    let n = pio["handled"].as_f64().unwrap_or(0.0);
    let us = pio["elapsed_us"].as_f64().unwrap_or(f64::MAX);
    Ok(n / us * 1e6)
}

/// The KVM workload: exits to userspace, irqfd signals over an MSI and an IOAPIC route,
/// KVM_SIGNAL_MSI, halts; and a VMM's disk backend on `dev` (direct reads, each signalled to
/// the guest, then O_DSYNC writes: a FUA write and a flush each), for the block programs' cost
/// on a VMM's requests: the submit, the completion awaiting the interrupt, the interrupt's
/// match, a synchronous write's bio and its flush sequence's end (blk.sync).
fn kvm_workload(vmm: &Path, dev: &str) -> anyhow::Result<()> {
    testvmm(
        vmm,
        &[
            "blk-backend",
            "--dev",
            dev,
            "--count",
            "4000",
            "--first-us",
            "0",
            "--gap-us",
            "1500000",
        ],
    )?;
    testvmm(
        vmm,
        &[
            "blk-backend",
            "--dev",
            dev,
            "--op",
            "fua",
            "--count",
            "1000",
            "--first-us",
            "0",
            "--gap-us",
            "1500000",
        ],
    )?;
    exit_rate(vmm, TAX_EXITS)?;
    for mode in ["irqfd-msi", "irqfd-gsi", "signal-msi"] {
        testvmm(vmm, &[mode, "--count", "4000", "--gap-us", "20"])?;
    }
    // Enough halts for a stable ns per event (each wakes a cold cache).
    testvmm(vmm, &["halt", "--count", "2000", "--spin-us", "30"])?;
    Ok(())
}

/// Datagrams per network flood, and the packets per second the backend read of them.
const FLOOD: u32 = 100_000;

/// One flood through the tap: the rate (packets/s) at which the backend read, and how many of
/// the datagrams it read.
fn net_flood(vmm: &Path, topo: &Topology) -> anyhow::Result<(f64, u64)> {
    let backend = iopath_tests::net::TapBackend::start(vmm, "bench", &topo.tap, FLOOD, 0, &[]);
    topo.wait_forwarding();
    iopath_tests::net::send(vmm, &topo.ns, FLOOD, 0);
    let r = backend.report();
    let n = r["packets"].as_u64().unwrap_or(0);
    let us = r["first_to_last_us"].as_f64().unwrap_or(0.0);
    anyhow::ensure!(n > 1 && us > 0.0, "the backend read {n} packets: {r}");
    Ok(((n - 1) as f64 / us * 1e6, n))
}

/// Guest kicks through a userspace backend (`tap-tx`): each wakes the backend, which writes a
/// frame to the tap.
fn tx_kicks(vmm: &Path, topo: &Topology) -> anyhow::Result<()> {
    let args = [
        "tap-tx", "--tap", &topo.tap, "--count", "2000", "--gap-us", "300",
    ];
    let backend = iopath_tests::net::TapBackend::spawn(vmm, "bench", &args);
    topo.wait_forwarding();
    iopath_tests::net::send(vmm, &topo.ns, 1, 0);
    let r = backend.report();
    anyhow::ensure!(
        r["written"].as_u64().unwrap_or(0) > 0,
        "no frame written: {r}"
    );
    Ok(())
}

/// Seconds of each iperf3 run.
const IPERF_SECONDS: u64 = 3;

/// One bounded iperf3 TCP run between two namespaces through the test VMM joining their taps
/// (`tap-forward`: every packet crosses a bridge, a tap, the backend, the other tap and bridge,
/// as between two guests on one host): the bits per second received.
fn iperf3(vmm: &Path, pair: &(Topology, Topology)) -> anyhow::Result<f64> {
    iperf3_with(vmm, pair, |_| Ok(()))
}

/// [`iperf3`], calling `around` with the forwarding VMM's pid just before the client starts
/// and just after it ends: what it reads there is the traffic's alone, not the set-up's.
fn iperf3_with(
    vmm: &Path,
    pair: &(Topology, Topology),
    mut around: impl FnMut(u32) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let (a, b) = pair;
    let hold_ms = ((IPERF_SECONDS + 15) * 1000).to_string();
    let mut child = Command::new(vmm)
        .args(["-name", "guest=bench-fwd", "tap-forward", "--tap", &a.tap])
        .args(["--tap2", &b.tap, "--hold-ms", &hold_ms])
        .stdout(Stdio::piped())
        .spawn()
        .context("start the test VMM")?;
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut ready,
    )?;
    let fwd_pid = child.id();
    let _fwd = Proc(child);
    anyhow::ensure!(ready.contains("ready"), "test VMM: {ready:?}");
    a.wait_forwarding();
    b.wait_forwarding();
    let server = Proc(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &a.ns,
                "iperf3",
                "-s",
                "-1",
                "-B",
                "169.254.77.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("iperf3 -s")?,
    );
    sleep(Duration::from_millis(500));
    around(fwd_pid)?;
    let out = Command::new("ip")
        .args(["netns", "exec", &b.ns, "timeout", "60", "iperf3", "-J"])
        .args(["-c", "169.254.77.1", "-t", &IPERF_SECONDS.to_string()])
        .output()
        .context("iperf3 -c")?;
    around(fwd_pid)?;
    drop(server);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 -J: {}", String::from_utf8_lossy(&out.stderr)))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 gave no throughput: {}", v["error"]))
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

/// Calls per loop of the syscall tax on this machine, and exits per exit-rate run.
const TAX_LOOP: u32 = 200_000;
const TAX_EXITS: u32 = 20_000;

/// The syscall tax alone, for the distro-kernel VM: printed, and its JSON (with the kernel)
/// written to `out`.
pub fn tax_only(
    bin: &Path,
    vmm: Option<&Path>,
    rounds: u32,
    n: u32,
    exits: u32,
    out: &Path,
) -> anyhow::Result<()> {
    let tax = syscall_tax(bin, vmm, rounds, n, exits)?;
    let json = serde_json::json!({
        "kernel": uname_r(), "machine": machine(), "syscall_tax": tax_report(&tax, rounds, n),
    });
    fs::write(out, serde_json::to_string_pretty(&json)? + "\n")?;
    Ok(())
}

/// Prints the syscall tax table and returns it as JSON, per mode.
fn tax_report(tax: &Tax, rounds: u32, n: u32) -> serde_json::Map<String, serde_json::Value> {
    println!(
        "\nsystem calls of a process that runs no VM, ns per call: medians of {} loops of {n} per mode, {rounds} rounds alternating:",
        rounds * 5
    );
    println!(
        "  {:<22} {:>9} {:>9} {:>9}",
        "mode", "write", "getpid", "ioctl"
    );
    let mut tax_json = serde_json::Map::new();
    for (m, mode) in TAX_MODES.iter().enumerate() {
        let meds = [0, 1, 2].map(|k| median(&tax.loops[m][k]));
        let ratios = [0, 1, 2].map(|k| meds[k] / median(&tax.loops[0][k]));
        println!(
            "  {mode:<22} {:>9.1} {:>9.1} {:>9.1}   (x{:.3} x{:.3} x{:.3} of without)",
            meds[0], meds[1], meds[2], ratios[0], ratios[1], ratios[2]
        );
        println!(
            "  {:<22} iopath programs run per call: {:.3}",
            "", tax.runs_per_call[m]
        );
        let exits = (!tax.exits[m].is_empty()).then(|| median(&tax.exits[m]));
        if let Some(e) = exits {
            println!(
                "  {:<22} test VMM exits to userspace per second: {e:.0} (x{:.3} of without)",
                "",
                e / median(&tax.exits[0])
            );
        }
        tax_json.insert(
            mode.to_string(),
            serde_json::json!({
                "write_ns": meds[0], "getpid_ns": meds[1], "ioctl_ns": meds[2],
                "ratio_write": ratios[0], "ratio_getpid": ratios[1], "ratio_ioctl": ratios[2],
                "programs_run_per_call": tax.runs_per_call[m],
                "exits_per_s": exits,
                "runs": {"write": tax.loops[m][0], "getpid": tax.loops[m][1], "ioctl": tax.loops[m][2], "exits_per_s": tax.exits[m]},
            }),
        );
    }
    tax_json
}

/// The whole bench on this machine; `l1` is the distro-kernel VM's syscall tax, when measured.
pub fn bench(
    bin: &Path,
    vmm: Option<&Path>,
    seconds: u32,
    rounds: u32,
    l1: Option<serde_json::Value>,
) -> anyhow::Result<()> {
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
    let mut progs: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    // Run time and runs of bpftrace's reference script, then of each floor.
    let mut bt = [(0.0, 0.0); 1 + BPFTRACE_FLOORS.len()];
    // iopath's programs in the windows bpftrace ran in too.
    let mut blk_same_window: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    // Each variant's block programs and bpftrace's reference in its windows.
    let mut cuts = vec![(BTreeMap::new(), (0.0, 0.0)); VARIANTS.len()];
    let mut bursts = Vec::new();
    for round in 1..=rounds {
        without.push(fio(&lo.dev, seconds)?);

        // The default stages: what a user runs (fio's own system calls would pay the stand-ins).
        let iopath = Daemon::start_bin(bin, &["--bpf-stats"]);
        let before = program_stats(&iopath.metrics());
        with.push(fio(&lo.dev, seconds)?);
        let after = program_stats(&iopath.metrics());
        accumulate(&mut progs, &before, after);
        // 200 scrapes by 50 clients at once, with the block series of the fio run exported.
        let (took, failed) = scrape_burst(iopath.port, 50, 4);
        anyhow::ensure!(failed == 0, "{failed} of 200 scrapes failed");
        bursts.push(took.as_secs_f64());
        anyhow::ensure!(iopath.stop().success(), "iopath did not exit cleanly");
        if let Some(vmm) = vmm {
            // Every KVM program, stand-ins too, for its ns per event (the exit rate with and
            // without iopath is the tax phase's).
            let all = Daemon::start_bin(bin, &["--bpf-stats", STAND_INS[0], STAND_INS[1]]);
            let before = program_stats(&all.metrics());
            kvm_workload(vmm, &lo.dev)?;
            accumulate(&mut progs, &before, program_stats(&all.metrics()));
            anyhow::ensure!(all.stop().success(), "iopath did not exit cleanly");
        }

        if has_bpftrace {
            // bpftrace and iopath's block stage attached at once, and the empty floor programs:
            // one window, one workload. Then, with the same bpftrace programs attached, one
            // window for each of the block programs' variants (`blk::cut`), for where the
            // whole program's nanoseconds go.
            set_bpf_stats(true);
            let mut tracers = Vec::new();
            for script in std::iter::once(BPFTRACE).chain(BPFTRACE_FLOORS.map(|f| f.1)) {
                match start_bpftrace(script)? {
                    Some(t) => tracers.push(t),
                    None => break,
                }
            }
            if tracers.len() < 1 + BPFTRACE_FLOORS.len() {
                drop(tracers);
                set_bpf_stats(false);
                continue;
            }
            // The variants' order turns each round, so that drift within a round does not
            // always land on the same one.
            let n = VARIANTS.len();
            for i in (0..n).map(|k| (k + round as usize) % n) {
                let (variant, _, timelines) = VARIANTS[i];
                let cut_arg = variant.to_string();
                let both = Daemon::start_bin(
                    bin,
                    &[
                        "--bpf-stats",
                        "--stages",
                        "blk.device",
                        "--blk-cut",
                        &cut_arg,
                        "--timeline-every",
                        timelines,
                    ],
                );
                let (b0, i0) = (bpftrace_progs()?, program_stats(&both.metrics()));
                let iops = fio(&lo.dev, seconds)?;
                let (b1, i1) = (bpftrace_progs()?, program_stats(&both.metrics()));
                anyhow::ensure!(both.stop().success(), "iopath did not exit cleanly");
                let reference = delta(&tracers[0].1, &b0, &b1);
                if variant == cut::WHOLE && timelines == DEFAULT_TIMELINES {
                    with_bt.push(iops);
                    // bt: the reference script's, then each floor's.
                    for (acc, (_, ids)) in bt.iter_mut().zip(&tracers) {
                        let d = delta(ids, &b0, &b1);
                        acc.0 += d.0;
                        acc.1 += d.1;
                    }
                    accumulate(&mut blk_same_window, &i0, i1.clone());
                }
                accumulate(&mut cuts[i].0, &i0, i1);
                cuts[i].1.0 += reference.0;
                cuts[i].1.1 += reference.1;
            }
            set_bpf_stats(false);
            drop(tracers);
        }
        eprintln!(
            "bench: round {round}: without {:.0} IOPS, with iopath {:.0}{}",
            without.last().unwrap(),
            with.last().unwrap(),
            with_bt
                .last()
                .map(|v| format!(", with iopath's block stage and bpftrace at once {v:.0}"))
                .unwrap_or_default()
        );
    }

    // The network phase: floods without iopath and with its default stages, alternating, each
    // after the last one's programs are freed; then one flood under --bpf-stats for the net
    // programs' ns per event (kept out of the timed floods: it adds a clock read to each run).
    let mut net = [Vec::new(), Vec::new()];
    let mut net_read = [Vec::new(), Vec::new()];
    let mut net_progs: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut iperf = [Vec::new(), Vec::new()];
    let mut iperf_share: Option<CpuShare> = None;
    let has_iperf3 = Command::new("iperf3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if let Some(vmm) = vmm {
        eprintln!(
            "bench: {rounds} rounds of {FLOOD} datagrams through a tap, without and with iopath"
        );
        let topo = Topology::new("bench");
        for _ in 0..rounds {
            for (m, with) in [false, true].into_iter().enumerate() {
                let iopath = with.then(|| Daemon::start_bin(bin, &[]));
                sleep(Duration::from_secs(2));
                let (pps, n) = net_flood(vmm, &topo)?;
                net[m].push(pps);
                net_read[m].push(n);
                if let Some(d) = iopath {
                    anyhow::ensure!(d.stop().success(), "iopath did not exit cleanly");
                }
            }
        }
        drop(topo);
        if has_iperf3 {
            eprintln!(
                "bench: {rounds} rounds of iperf3 ({IPERF_SECONDS} s, TCP) between two \
                 namespaces through two taps and a backend, without and with iopath"
            );
            let pair = Topology::pair("bench");
            for _ in 0..rounds {
                for (m, with) in [false, true].into_iter().enumerate() {
                    let iopath = with.then(|| Daemon::start_bin(bin, &[]));
                    sleep(Duration::from_secs(2));
                    iperf[m].push(iperf3(vmm, &pair)?);
                    if let Some(d) = iopath {
                        anyhow::ensure!(d.stop().success(), "iopath did not exit cleanly");
                    }
                }
            }
        }
        // ns per event of the net programs, kept out of the timed runs (bpf_stats adds a clock
        // read to each run): one flood, and one iperf3 run for the transmit side.
        // Every device made first: the daemon reads taps and uplinks at start.
        let topo = Topology::new("bench");
        let pair = has_iperf3.then(|| Topology::pair("benchs"));
        // With the opt-in sched.backend_wakeup too, for its programs' cost (on every wakeup and
        // context switch of the host), and a run of guest kicks for its notify exits.
        let iopath = Daemon::start_bin(bin, &["--bpf-stats", "--stages", "+sched.backend_wakeup"]);
        let before = program_stats(&iopath.metrics());
        net_flood(vmm, &topo)?;
        if let Some(pair) = &pair {
            iperf3(vmm, pair)?;
        }
        tx_kicks(vmm, &topo)?;
        accumulate(&mut net_progs, &before, program_stats(&iopath.metrics()));
        anyhow::ensure!(iopath.stop().success(), "iopath did not exit cleanly");
        // The default stages' share of the CPU an iperf3 run keeps busy, in one run: their
        // programs' run time (bpf_stats) against the host's busy CPU time over the client's run
        // alone (/proc/stat), which noise between runs does not move; and how busy the
        // forwarding backend was (its threads' CPU time over the run's wall time), since one
        // TCP stream through it is bound by that one thread rather than by the host.
        if let Some(pair) = &pair {
            let d = Daemon::start_bin(bin, &["--bpf-stats"]);
            sleep(Duration::from_secs(2));
            let mut at = Vec::new();
            let bps = iperf3_with(vmm, pair, |fwd| {
                let progs = program_stats(&d.metrics());
                at.push((progs, busy_cpu_ns()?, process_cpu_ns(fwd)?, Instant::now()));
                Ok(())
            })?;
            anyhow::ensure!(d.stop().success(), "iopath did not exit cleanly");
            let [(p0, busy0, fwd0, t0), (p1, busy1, fwd1, t1)] = <[_; 2]>::try_from(at)
                .map_err(|_| anyhow::anyhow!("iperf3 did not mark its run"))?;
            let mut ran = BTreeMap::new();
            accumulate(&mut ran, &p0, p1);
            let wall = (t1 - t0).as_secs_f64() * 1e9;
            iperf_share = Some(CpuShare {
                programs: ran,
                busy_ns: busy1 - busy0,
                backend_ns: fwd1 - fwd0,
                wall_ns: wall,
                bits_per_s: bps,
            });
        }
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
    let (floors, bt) = (&bt[1..], bt[0]);
    let bt_ns = (bt.1 > 0.0).then(|| bt.0 / bt.1);
    // Block programs against bpftrace's, attached at once: total run time over one window.
    let blk_total = blk_same_window
        .iter()
        .filter(|(n, _)| n.starts_with("blk_rq_"))
        .fold((0.0, 0.0), |a, (_, (t, c))| (a.0 + t, a.1 + c));
    let blk_vs_bt = (bt.0 > 0.0).then(|| blk_total.0 / bt.0);
    if let Some(ratio) = blk_vs_bt {
        println!(
            "\nblock stage against bpftrace's same histogram, both attached, one window:\n  \
             iopath {:.0} ns over {:.0} runs ({:.0} ns/run), bpftrace {:.0} ns over {:.0} runs \
             ({:.0} ns/run): ratio of total run time {ratio:.3}",
            blk_total.0,
            blk_total.1,
            blk_total.0 / blk_total.1.max(1.0),
            bt.0,
            bt.1,
            bt_ns.unwrap_or(0.0),
        );
        // What no latency program on these tracepoints can go below.
        for ((name, _), (t, c)) in BPFTRACE_FLOORS.iter().zip(floors) {
            println!(
                "  floor in the same window, {name}: {:.0} ns/run, {:.3} of bpftrace's run time",
                t / c.max(1.0),
                t / bt.0.max(1.0),
            );
        }
    }
    // The variants: ns per run of each program, and the block programs' run time against
    // bpftrace's reference in the same window; what each step adds is the difference.
    let mut variants = Vec::new();
    if cuts.iter().any(|(_, bt)| bt.1 > 0.0) {
        println!(
            "\nblock programs by variant (each window with the same bpftrace programs attached):"
        );
        println!(
            "  {:<72} {:>9} {:>9} {:>9}",
            "variant: the previous one and", "issue", "complete", "/bpftrace"
        );
    }
    for ((_, what, _), (progs, bt)) in VARIANTS.iter().zip(&cuts) {
        if bt.1 == 0.0 {
            continue;
        }
        let per_run = |prefix: &str| {
            progs
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .fold((0.0, 0.0), |a, (_, (t, c))| (a.0 + t, a.1 + c))
        };
        let (issue, complete) = (per_run("blk_rq_issue"), per_run("blk_rq_complete"));
        let ratio = (issue.0 + complete.0) / bt.0;
        let (i_ns, c_ns) = (issue.0 / issue.1.max(1.0), complete.0 / complete.1.max(1.0));
        println!("  {what:<72} {i_ns:>9.0} {c_ns:>9.0} {ratio:>9.3}");
        variants.push(serde_json::json!({
            "adds": what, "issue_ns_per_run": i_ns, "complete_ns_per_run": c_ns,
            "issue_runs": issue.1, "complete_runs": complete.1,
            "bpftrace_ns_per_run": bt.0 / bt.1.max(1.0), "ratio_to_bpftrace": ratio,
        }));
    }
    // The bucket layout's cost: the whole program against the same with the previous pick.
    let complete_ns = |what: &str| {
        variants
            .iter()
            .find(|v| v["adds"] == what)
            .and_then(|v| v["complete_ns_per_run"].as_f64())
    };
    let step = |c: u32| cut::STEPS.iter().find(|s| s.0 == c).unwrap().1;
    let whole = complete_ns(step(cut::WHOLE));
    if let (Some(w), Some(l)) = (whole, complete_ns(step(cut::LOGLINEAR))) {
        println!(
            "  the schema-3 bucket search against the log-linear pick: {:+.0} ns per completion \
             ({w:.0} against {l:.0})",
            w - l
        );
    }
    if let (Some(w), Some(off)) = (whole, complete_ns(TIMELINES_OFF)) {
        println!(
            "  sampled timelines (one window in {DEFAULT_TIMELINES}) against none: {:+.0} ns per \
             completion ({w:.0} against {off:.0})",
            w - off
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
        println!(
            "IOPS with iopath's block stage and bpftrace at once {c:.0}: ratio {:.3}",
            c / a
        );
    }
    let net_ratio = (!net[0].is_empty()).then(|| median(&net[1]) / median(&net[0]));
    if let Some(r) = net_ratio {
        println!(
            "\npackets/s a tap's backend read of {FLOOD} datagrams: without {:.0}, with iopath \
             {:.0}: ratio {r:.3} (medians of {rounds}; read {:?} and {:?})",
            median(&net[0]),
            median(&net[1]),
            net_read[0],
            net_read[1],
        );
        let iperf_ratio = (!iperf[0].is_empty()).then(|| median(&iperf[1]) / median(&iperf[0]));
        match iperf_ratio {
            Some(r) => println!(
                "iperf3 TCP between two namespaces through two taps and a backend: without {:.0} \
                 Mbit/s, with iopath {:.0}: ratio {r:.3} (medians of {rounds})",
                median(&iperf[0]) / 1e6,
                median(&iperf[1]) / 1e6,
            ),
            None => println!("iperf3 not installed (cargo xtask setup installs it): no TCP run"),
        }
        if let Some(s) = &iperf_share {
            println!(
                "  in one iperf3 run ({:.0} Mbit/s) with the default stages: their programs ran \
                 {:.1} ms of the host's {:.0} ms of busy CPU ({:.1}%) over the client's {:.2} s; \
                 the forwarding backend's threads were on CPU {:.0}% of it",
                s.bits_per_s / 1e6,
                s.programs_ns() / 1e6,
                s.busy_ns / 1e6,
                s.share() * 100.0,
                s.wall_ns / 1e9,
                s.backend_ns / s.wall_ns * 100.0
            );
            for (name, (t, c)) in s.programs.iter().filter(|(_, (_, c))| *c > 0.0) {
                println!("    {name:<24} {c:>12.0} {:>10.0}", t / c);
            }
        }
        println!("  net programs over one more flood and iperf3 run (kernel.bpf_stats):");
        for (name, (t, c)) in net_progs.iter().filter(|(_, (_, c))| *c > 0.0) {
            println!("  {name:<24} {c:>12.0} {:>10.0}", t / c);
        }
    }
    println!(
        "200 scrapes by 50 clients at once: {} s",
        bursts
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "bench: syscall tax and exit rate, {} rounds of the three modes alternating",
        rounds * 3
    );
    // Cheap rounds (no fio): three times as many, for medians that noise moves less.
    let tax = syscall_tax(bin, vmm, rounds * 3, TAX_LOOP, TAX_EXITS)?;
    let tax_json = tax_report(&tax, rounds * 3, TAX_LOOP);
    let json = serde_json::json!({
        "date": bench_date(), "kernel": uname_r(), "machine": machine(),
        "seconds": seconds, "rounds": rounds, "device": lo.dev,
        "iops_without": without, "iops_with_iopath": with, "iops_with_iopath_blk_and_bpftrace": with_bt,
        "ratio_iopath": b / a, "programs": report, "bpftrace_ns_per_event": bt_ns,
        "blk_vs_bpftrace_same_window": {
            "iopath_run_time_ns": blk_total.0, "iopath_runs": blk_total.1,
            "bpftrace_run_time_ns": bt.0, "bpftrace_runs": bt.1, "ratio": blk_vs_bt,
            "floors": BPFTRACE_FLOORS.iter().zip(floors).map(|((name, _), (t, c))| serde_json::json!({"name": name, "run_time_ns": t, "runs": c, "ratio": t / bt.0.max(1.0)})).collect::<Vec<_>>(),
            "variants": variants,
            "programs": blk_same_window.iter().map(|(n, (t, c))| (n.clone(), serde_json::json!({"run_time_ns": t, "runs": c}))).collect::<serde_json::Map<_, _>>(),
        },
        "syscall_tax": tax_json,
        "scrape_burst_200_by_50_s": bursts,
        "net_flood": {
            "datagrams": FLOOD, "pps_without": net[0], "pps_with_iopath": net[1],
            "read_without": net_read[0], "read_with_iopath": net_read[1], "ratio": net_ratio,
            "iperf3_tcp_bits_per_s_without": iperf[0], "iperf3_tcp_bits_per_s_with_iopath": iperf[1],
            "iperf3_seconds": IPERF_SECONDS,
            "iperf3_ratio": (!iperf[0].is_empty()).then(|| median(&iperf[1]) / median(&iperf[0])),
            "iperf3_cpu_share": iperf_share.as_ref().map(|s| serde_json::json!({
                "share": s.share(), "programs_ns": s.programs_ns(), "busy_cpu_ns": s.busy_ns,
                "wall_ns": s.wall_ns, "backend_cpu_ns": s.backend_ns, "bits_per_s": s.bits_per_s,
                "programs": s.programs.iter().map(|(n, (t, c))| (n.clone(), serde_json::json!({"events": c, "ns_per_event": if *c > 0.0 { t / c } else { 0.0 }}))).collect::<serde_json::Map<_, _>>(),
            })),
            "programs": net_progs.iter().map(|(n, (t, c))| (n.clone(), serde_json::json!({"events": c, "ns_per_event": if *c > 0.0 { t / c } else { 0.0 }}))).collect::<serde_json::Map<_, _>>(),
        },
        "distro_kernel_vm": l1,
    });
    let text = serde_json::to_string_pretty(&json)? + "\n";
    fs::write(dir.join("latest.json"), &text)?;
    let results = crate::root().join("bench/results");
    fs::create_dir_all(&results)?;
    let file = results.join(format!("{}-{}.json", bench_date(), uname_r()));
    fs::write(&file, &text)?;
    println!(
        "(written to target/bench/latest.json and {})",
        file.strip_prefix(crate::root()).unwrap_or(&file).display()
    );
    Ok(())
}

/// What the default stages cost one iperf3 run, from [`iperf3_with`]'s two marks.
struct CpuShare {
    /// Run time and runs of each program between the marks.
    programs: BTreeMap<String, (f64, f64)>,
    /// The host's busy CPU time between them.
    busy_ns: f64,
    /// The forwarding backend's threads' CPU time between them.
    backend_ns: f64,
    wall_ns: f64,
    bits_per_s: f64,
}

impl CpuShare {
    fn programs_ns(&self) -> f64 {
        self.programs.values().map(|(t, _)| t).sum()
    }

    fn share(&self) -> f64 {
        self.programs_ns() / self.busy_ns
    }
}

/// The CPU time of every thread of process `pid` so far (`/proc/PID/task/*/schedstat`), in ns.
fn process_cpu_ns(pid: u32) -> anyhow::Result<f64> {
    let mut ns = 0.0;
    for t in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let stat = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
    }
    Ok(ns)
}

/// The CPU time every CPU of the host spent busy so far (/proc/stat: user, nice, system, irq
/// and softirq; not idle, iowait, or steal, the hypervisor's), in ns.
fn busy_cpu_ns() -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    anyhow::ensure!(ticks.len() >= 7, "/proc/stat: short cpu line");
    // user nice system idle iowait irq softirq ... (guest time is within user)
    let busy: f64 = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy / hz * 1e9)
}

/// Today (UTC), for the results file's name.
fn bench_date() -> String {
    Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "undated".into())
}

fn uname_r() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// CPUs, CPU model and whether it runs under a hypervisor, from /proc/cpuinfo.
fn machine() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = info.lines().filter(|l| l.starts_with("processor")).count();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let virt = info
        .lines()
        .any(|l| l.starts_with("flags") && l.contains(" hypervisor"));
    format!(
        "{cpus} CPUs, {model}{}",
        if virt { ", virtual machine" } else { "" }
    )
}
