//! Helpers for iopath's end-to-end tests: they load the real programs into this kernel through
//! the real `iopath` binary (`IOPATH_BIN`, set by `cargo xtask test`) and drive real events.

pub mod blk;
pub mod net;
pub mod prom;

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    collections::BTreeMap,
    fs::{self, OpenOptions},
    io::{BufRead as _, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use iopath::timeline::clock_ns;

pub fn iopath_bin() -> PathBuf {
    std::env::var_os("IOPATH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/iopath"))
}

/// Why a test skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// A tool or package `cargo xtask setup` installs is missing: `cargo xtask test` fails.
    Setup,
    /// This machine lacks the kernel feature or device (no /dev/kvm, no guest lab).
    Machine,
}

/// Skips the test, visibly: one `skipping:` line written past the test harness's output
/// capture, and a line in `$IOPATH_SKIPS` for the summary `cargo xtask test` prints (and fails
/// on, for `Why::Setup`).
pub fn skip(test: &str, why: Why, reason: &str) {
    let kind = match why {
        Why::Setup => "setup",
        Why::Machine => "machine",
    };
    // io::stderr() directly: the harness captures only print!/eprint!.
    let _ = std::io::stderr().write_all(format!("skipping: {test}: {reason}\n").as_bytes());
    if let Some(log) = std::env::var_os("IOPATH_SKIPS") {
        let line = format!("{kind}\t{test}\t{}\n", reason.replace(['\t', '\n'], " "));
        let _ = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// Fails the test unless it can load BPF programs: end-to-end tests run as root, through
/// `cargo xtask test` (which refuses to start otherwise); they never pass by skipping.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests load BPF programs: run them as root through `cargo xtask test`"
    );
    assert!(
        iopath_bin().exists(),
        "{} is missing: run through `cargo xtask test`",
        iopath_bin().display()
    );
}

/// True when this test can use KVM (as root); otherwise skips, saying why.
pub fn kvm_available(test: &str) -> bool {
    require_root();
    if !Path::new("/dev/kvm").exists() {
        skip(test, Why::Machine, "no /dev/kvm on this machine");
        return false;
    }
    true
}

/// True inside the distro-kernel VM (`cargo xtask vm`): a machine emulated by QEMU TCG, whose
/// clock is real but whose every instruction is slow, so a test injects delays of milliseconds
/// there, not microseconds, and waits longer for the daemon to attach.
pub fn emulated() -> bool {
    std::env::var_os("IOPATH_EMULATED").is_some()
}

/// `ms` on this machine, five times as long when emulated.
pub fn patience(ms: u64) -> Duration {
    Duration::from_millis(if emulated() { ms * 5 } else { ms })
}

/// What blk.device counted, attached with one program family only, for 300 direct writes and
/// 200 direct reads on a fresh loop device: requests per op, and requests dropped as
/// `ambiguous` (the classic family's collisions).
pub struct FamilyIo {
    pub write: f64,
    pub read: f64,
    pub ambiguous: f64,
    /// Every blk.device drop reason counted meanwhile, for a failure's message.
    pub drops: Vec<(String, f64)>,
    /// Runs of the programs the kernel skipped meanwhile (see [`recursion_misses`]).
    pub misses: f64,
}

/// Runs of iopath's programs the kernel skipped, all programs summed: a tracing program that
/// fires again on a CPU where it is already running (an interrupt's block completion inside
/// a task's) is not run, and the kernel counts that event as the program's miss (exported as
/// `iopath_program_recursion_misses_total`). Which device's event it was is not known, so a
/// test that counts one device's events allows the misses of the window.
pub fn recursion_misses(m: &Metrics) -> f64 {
    m.value("iopath_program_recursion_misses_total", &[])
}

pub fn blk_io_with_family(family: &str) -> FamilyIo {
    let lo = LoopDev::new(family, 16);
    let d = Daemon::start(&["--stages", "blk.device", "--families", family]);
    let m = d.metrics();
    assert_eq!(
        m.value(
            "iopath_stage_attached",
            &[("stage", "blk.device"), ("attach", family)]
        ),
        1.0,
        "blk.device attached as {family}"
    );
    let dev = lo.majmin();
    let count = |m: &Metrics, op: &str| {
        m.value(
            "iopath_stage_latency_seconds_count",
            &[("stage", "blk.device"), ("device", &dev), ("op", op)],
        )
    };
    let ambiguous = |m: &Metrics| {
        m.value(
            "iopath_events_dropped_total",
            &[("stage", "blk.device"), ("reason", "ambiguous")],
        )
    };
    let drops = |m: &Metrics| {
        m.find("iopath_events_dropped_total", &[("stage", "blk.device")])
            .iter()
            .map(|s| (s.labels["reason"].clone(), s.value))
            .collect::<BTreeMap<_, _>>()
    };
    let before = d.metrics();
    lo.direct_io(300, 200);
    let after = d.metrics();
    assert!(d.stop().success());
    let (was, now) = (drops(&before), drops(&after));
    FamilyIo {
        write: count(&after, "write") - count(&before, "write"),
        read: count(&after, "read") - count(&before, "read"),
        ambiguous: ambiguous(&after) - ambiguous(&before),
        drops: now
            .into_iter()
            .map(|(r, v)| (r.clone(), v - was.get(&r).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v > 0.0)
            .collect(),
        misses: recursion_misses(&after) - recursion_misses(&before),
    }
}

/// Every KVM stage, and not blk.device: the host's own disk I/O would add HIST entries.
pub const KVM_STAGES: &str =
    "kvm.exit,kvm.signal_to_inject,kvm.inject_to_entry,kvm.halt_wakeup,kvm.userspace_exit";

/// True when `cmd` is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn iopath(args: &[&str]) -> Output {
    Command::new(iopath_bin())
        .args(args)
        .output()
        .expect("run iopath")
}

/// iopath's programs still loaded a few seconds after every iopath process is gone. The kernel
/// frees a program after its last reference drops, asynchronously: poll rather than sample once.
pub fn leftover_programs() -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = loaded_programs();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        sleep(Duration::from_millis(100));
    }
}

/// One loaded BPF program, as `bpftool -j prog show` lists it.
#[derive(Clone, Debug, Default)]
pub struct BpfProg {
    pub id: u64,
    /// The kernel's 15-character name, or the full one from BTF.
    pub name: String,
    /// kernel.bpf_stats (0 while it is off).
    pub run_time_ns: f64,
    pub run_cnt: f64,
    /// Runs the kernel skipped, nested in another program (newer kernels count them for kprobe
    /// and classic tracepoint programs).
    pub recursion_misses: u64,
}

/// Every BPF program loaded now (bpftool, which `cargo xtask setup` installs).
pub fn bpf_progs() -> Vec<BpfProg> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
            Some(BpfProg {
                id: p["id"].as_u64()?,
                name: p["name"].as_str().unwrap_or_default().to_string(),
                run_time_ns: f("run_time_ns"),
                run_cnt: f("run_cnt"),
                recursion_misses: p["recursion_misses"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// Names of iopath's programs loaded now, from bpftool.
pub fn loaded_programs() -> Vec<String> {
    // The stage table's own list of programs (a unit test holds it to the object).
    let ours = iopath::stages::all_programs();
    bpf_progs()
        .into_iter()
        .map(|p| p.name)
        // bpftool shows the kernel's 15-character name, or the full one from BTF
        .filter(|n| {
            ours.iter()
                .any(|o| o == n || (n.len() == 15 && o.starts_with(n.as_str())))
        })
        .collect()
}

/// A loop device over a file (direct I/O), detached and removed on drop.
pub struct LoopDev {
    pub dev: String,
    /// The backing file, removed on drop when the device made it.
    file: Option<PathBuf>,
}

impl LoopDev {
    pub fn new(name: &str, mib: u64) -> LoopDev {
        let file = PathBuf::from(format!(
            "/var/tmp/iopath-test-{name}-{}.img",
            std::process::id()
        ));
        let f = fs::File::create(&file).expect("backing file");
        f.set_len(mib << 20).expect("size backing file");
        let mut lo = LoopDev::over(&file, true);
        lo.file = Some(file);
        lo
    }

    /// A loop device over an existing file (left as it is on drop); `direct_io`: the loop
    /// driver's own I/O to the file bypasses the page cache.
    pub fn over(file: &Path, direct_io: bool) -> LoopDev {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(if direct_io {
                "--direct-io=on"
            } else {
                "--direct-io=off"
            })
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // Let udev's probe of the new device finish, so its reads are not counted as ours.
        let _ = Command::new("udevadm")
            .args(["settle", "--timeout=5"])
            .status();
        sleep(Duration::from_millis(300));
        LoopDev { dev, file: None }
    }

    /// `n` synchronous 4 KiB O_DIRECT reads spread over the first 4 MiB.
    pub fn direct_reads(&self, n: u64) {
        self.direct_io(0, n);
    }

    /// "major:minor" as iopath labels it.
    pub fn majmin(&self) -> String {
        let name = Path::new(&self.dev)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        fs::read_to_string(format!("/sys/class/block/{name}/dev"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn name(&self) -> String {
        Path::new(&self.dev)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string()
    }

    /// `writes` then `reads` synchronous 4 KiB O_DIRECT I/Os: each is exactly one request.
    /// Returns the mean time of one write and one read system call, seen from userspace.
    pub fn direct_io(&self, writes: u64, reads: u64) -> (Duration, Duration) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.dev)
            .expect("open loop device O_DIRECT");
        let layout = Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: non-zero size; freed below with the same layout.
        let ptr = unsafe { alloc_zeroed(layout) };
        // SAFETY: ptr is a live 4096-byte allocation.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 4096) };
        buf.fill(0xa5);
        let blocks = 1024; // spread over the first 4 MiB
        let t = Instant::now();
        for i in 0..writes {
            f.write_all_at(buf, (i % blocks) * 4096)
                .expect("direct write");
        }
        let w = t.elapsed() / writes.max(1) as u32;
        let t = Instant::now();
        for i in 0..reads {
            f.read_exact_at(buf, (i % blocks) * 4096)
                .expect("direct read");
        }
        let r = t.elapsed() / reads.max(1) as u32;
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(ptr, layout) };
        (w, r)
    }
}

impl LoopDev {
    /// Detaches the device and removes it from the system (LOOP_CTL_REMOVE): its
    /// /sys/dev/block entry goes, as a hot-unplugged disk's would.
    pub fn remove(self) {
        let n: libc::c_long = self
            .name()
            .trim_start_matches("loop")
            .parse()
            .expect("loopN");
        drop(self);
        const LOOP_CTL_REMOVE: libc::c_ulong = 0x4c81;
        let ctl = fs::File::open("/dev/loop-control").expect("/dev/loop-control");
        // SAFETY: LOOP_CTL_REMOVE takes the device number as its argument.
        let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&ctl), LOOP_CTL_REMOVE, n) };
        assert!(
            r >= 0,
            "LOOP_CTL_REMOVE loop{n}: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        if let Some(f) = &self.file {
            let _ = fs::remove_file(f);
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from 127.0.0.1:`port` (content type, body); with `openmetrics` the Accept
/// header Prometheus sends.
pub fn http_get(port: u16, path: &str, openmetrics: bool) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = if openmetrics {
        "Accept: application/openmetrics-text; version=1.0.0\r\n"
    } else {
        ""
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type").then(|| v.trim())
        })
        .unwrap_or_default()
        .to_string();
    Ok((ctype, body.to_string()))
}

/// `iopath serve` on a free loopback port, stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        Self::start_bin(&iopath_bin(), extra)
    }

    /// `bin serve` with `extra` arguments (the benchmark passes its own build).
    pub fn start_bin(bin: &Path, extra: &[&str]) -> Daemon {
        Self::start_under(&[], bin, extra)
    }

    /// `iopath serve` run by `wrapper` (a command and its arguments before the binary's path:
    /// setpriv with a capability set, say); empty: the binary itself.
    pub fn start_under(wrapper: &[&str], bin: &Path, extra: &[&str]) -> Daemon {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(["serve", "--web.listen-address", &listen])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start iopath serve");
        let mut d = Daemon { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if d.get("/metrics", false).is_ok() {
                return d;
            }
            if let Some(st) = d.child.try_wait().unwrap() {
                let mut err = String::new();
                d.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("iopath serve exited with {st}: {err}");
            }
            sleep(Duration::from_millis(100));
        }
        panic!("iopath serve did not answer on {listen}");
    }

    /// GET `path`; with `openmetrics` the Accept header Prometheus sends.
    pub fn get(&self, path: &str, openmetrics: bool) -> std::io::Result<(String, String)> {
        http_get(self.port, path, openmetrics)
    }

    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.get("/metrics", false).expect("scrape").1)
    }

    /// SIGTERM and wait (bounded); returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        exit_within(&mut self.child, Duration::from_secs(10))
            .expect("iopath serve did not exit within 10 s of SIGTERM")
    }
}

/// (count, p50 µs) of the first series of `stage` whose labels include `want` in `quantiles`
/// (a /quantiles answer), None when there is no such series.
pub fn p50_in(
    quantiles: &serde_json::Value,
    stage: &str,
    want: &[(&str, &str)],
) -> Option<(u64, f64)> {
    quantiles["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["stage"] == stage
                && want
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
        })
        .map(|s| (s["count"].as_u64().unwrap(), s["p50_us"].as_f64().unwrap()))
}

impl Daemon {
    /// (count, p50 µs) of `stage`'s series whose labels include `want`, from /quantiles.
    pub fn stage_p50(&self, stage: &str, want: &[(&str, &str)]) -> (u64, f64) {
        self.find_p50(stage, want)
            .unwrap_or_else(|| panic!("no {stage} series with {want:?} in {}", self.quantiles()))
    }

    /// As [`Daemon::stage_p50`], None when there is no such series.
    pub fn find_p50(&self, stage: &str, want: &[(&str, &str)]) -> Option<(u64, f64)> {
        p50_in(&self.quantiles(), stage, want)
    }

    /// `iopath_events_dropped_total` of `stage` for `reason`, 0 when never counted.
    pub fn dropped(&self, stage: &str, reason: &str) -> u64 {
        self.metrics()
            .find(
                "iopath_events_dropped_total",
                &[("stage", stage), ("reason", reason)],
            )
            .iter()
            .map(|s| s.value as u64)
            .sum()
    }

    /// GET /quantiles as JSON.
    pub fn quantiles(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/quantiles", false).expect("quantiles").1)
            .expect("quantiles JSON")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One sample line of the text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape (Prometheus text or OpenMetrics sample lines).
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((k, r)) = rest.split_once("=\"") {
        let mut v = String::new();
        let mut chars = r.char_indices();
        let mut end = r.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        v.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i;
                    break;
                }
                c => v.push(c),
            }
        }
        out.insert(k.trim_start_matches(',').trim().to_string(), v);
        rest = r.get(end + 1..).unwrap_or_default();
    }
    out
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        /// (name and label set, what follows), the label set's end found outside quotes.
        fn split_series(l: &str) -> (&str, &str) {
            let Some(open) = l.find('{').filter(|&i| !l[..i].contains(' ')) else {
                let (a, b) = l.split_once(' ').expect("sample line has a value");
                return (a, b.trim());
            };
            let (mut quoted, mut escaped) = (false, false);
            for (i, c) in l[open..].char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    '}' if !quoted => {
                        let end = open + i + 1;
                        return (&l[..end], l[end..].trim());
                    }
                    _ => {}
                }
            }
            panic!("unclosed label set in {l:?}")
        }
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                // `series value`, then in OpenMetrics maybe ` # {exemplar} value timestamp`:
                // the value is the token after the label set (whose values may hold anything).
                let (series, rest) = split_series(l);
                let value = rest.split(' ').next().expect("sample line has a value");
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n.to_string(), parse_labels(rest.trim_end_matches('}'))),
                    None => (series.to_string(), BTreeMap::new()),
                };
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
                };
                Sample {
                    name,
                    labels,
                    value,
                }
            })
            .collect();
        Metrics { samples }
    }

    /// Samples of `name` whose labels include all of `want`.
    pub fn find(&self, name: &str, want: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && want
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Values of label `label` among the samples of `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .find(name, &[])
            .iter()
            .filter_map(|s| s.labels.get(label).cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.find(name, want).iter().map(|s| s.value).sum()
    }

    /// Entries of every kernel map `iopath_kernel_map_entries` reports, by map.
    pub fn map_entries(&self) -> Vec<(String, f64)> {
        self.find("iopath_kernel_map_entries", &[])
            .iter()
            .map(|s| (s.labels["map"].clone(), s.value))
            .collect()
    }

    /// (le, cumulative count) of one histogram series, in order.
    pub fn buckets(&self, name: &str, want: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let mut b: Vec<(f64, f64)> = self
            .find(&format!("{name}_bucket"), want)
            .iter()
            .map(|s| {
                let le = s.labels["le"].as_str();
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    s.value,
                )
            })
            .collect();
        b.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap());
        b
    }
}

/// Quantile `q` of the events added between two scrapes of one histogram series, as the
/// upper bound of the bucket it falls in (what histogram_quantile would bound it by).
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            (
                *le,
                n - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, m)| *m),
            )
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

/// This thread's time on CPU so far (CLOCK_THREAD_CPUTIME_ID), in ns.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CLOCK_MONOTONIC in ns: bpf_ktime_get_ns's clock, the same in every network namespace.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// The test VMM (src/bin/iopath-testvmm.rs), built beside the test binaries.
pub fn testvmm_bin() -> PathBuf {
    test_bin("iopath-testvmm")
}

/// A binary of this crate (src/bin/), built beside the test binaries.
pub fn test_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run through `cargo xtask test`",
        bin.display()
    );
    bin
}

/// A running test VMM; killed on drop.
pub struct Vmm {
    pub child: Child,
    /// Its one line of JSON: what it did.
    pub report: serde_json::Value,
}

impl Vmm {
    /// Runs the VMM with `-name guest=NAME,debug-threads=on` (`name` as it is given), waits
    /// until it has done its work (it then holds for `hold_ms`, so its process and fds exist
    /// while the test scrapes).
    pub fn run(name: &str, args: &[&str], hold_ms: u64) -> Vmm {
        let mut child = Command::new(testvmm_bin())
            .args(["-name", &format!("guest={name},debug-threads=on")])
            .args(args)
            .args(["--hold-ms", &hold_ms.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start test VMM");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let report = serde_json::from_str(&line).unwrap_or_else(|_| {
            let st = child.wait();
            panic!("test VMM failed ({st:?}): {line:?}")
        });
        Vmm { child, report }
    }

    pub fn pid(&self) -> u32 {
        self.report["pid"].as_u64().unwrap() as u32
    }

    pub fn n(&self, key: &str) -> f64 {
        self.report[key].as_f64().unwrap()
    }

    /// Waits (bounded) for the VMM to exit.
    pub fn wait(mut self) {
        exit_within(&mut self.child, Duration::from_secs(30)).expect("test VMM did not exit");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// promtool's verdict on an exposition: Ok, or what it said.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs the prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Label sets that appear more than once for one metric name (there must be none).
pub fn repeated_series(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_string()))
        .filter(|series| !seen.insert(series.clone()))
        .collect()
}

/// The keys of the kernel histogram map (HIST) of the iopath running now, read with bpftool.
pub fn hist_keys() -> Vec<tracer_common::maps::HistKey> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "name", "HIST"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            // the key's bytes, as hex strings
            let b: Vec<u8> = e["key"]
                .as_array()?
                .iter()
                .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
                .collect();
            (b.len() == std::mem::size_of::<tracer_common::maps::HistKey>()).then(|| {
                // SAFETY: HistKey is #[repr(C)] integers with no padding, and b is as long.
                unsafe {
                    std::ptr::read_unaligned(b.as_ptr().cast::<tracer_common::maps::HistKey>())
                }
            })
        })
        .collect()
}

/// A disk with a known service time: `iopath-slowfs` (a FUSE filesystem whose every read
/// sleeps `read_delay`) mounted on a directory of its own, its file under a loop device.
/// Unmounted, killed and removed on drop.
pub struct SlowDisk {
    pub lo: Option<LoopDev>,
    fs: Child,
    dir: PathBuf,
}

/// Whether this kernel has FUSE: /dev/fuse, after loading the module where it is one (the
/// distro-kernel VM).
pub fn have_fuse() -> bool {
    if !Path::new("/dev/fuse").exists() {
        let _ = Command::new("modprobe").arg("fuse").status();
    }
    Path::new("/dev/fuse").exists()
}

impl SlowDisk {
    pub fn new(name: &str, mib: u64, read_delay: Duration) -> SlowDisk {
        Self::with_fsync(name, mib, read_delay, Duration::ZERO)
    }

    /// Also every fsync of the file (the loop device's cache flush) takes `fsync_delay`.
    pub fn with_fsync(
        name: &str,
        mib: u64,
        read_delay: Duration,
        fsync_delay: Duration,
    ) -> SlowDisk {
        let dir = PathBuf::from(format!("/tmp/iopath-slowfs-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mount point");
        let mut fs = Command::new(test_bin("iopath-slowfs"))
            .arg(&dir)
            .arg(mib.to_string())
            .arg(read_delay.as_micros().to_string())
            .arg(fsync_delay.as_micros().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("iopath-slowfs");
        let mut line = String::new();
        std::io::BufReader::new(fs.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("iopath-slowfs output");
        assert_eq!(line.trim(), "ready", "iopath-slowfs did not mount");
        // The loop driver's reads go to the file as they come (the filesystem opens it
        // FOPEN_DIRECT_IO: no page cache), one FUSE read per request.
        let lo = LoopDev::over(&dir.join("disk"), false);
        SlowDisk {
            lo: Some(lo),
            fs,
            dir,
        }
    }

    pub fn lo(&self) -> &LoopDev {
        self.lo.as_ref().expect("attached")
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        drop(self.lo.take());
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = self.fs.kill();
        let _ = self.fs.wait();
        let _ = fs::remove_dir(&self.dir);
    }
}

/// `iopath record --json` running in the background until [`Recording::stop`] (SIGINT): a
/// capture of a window a test chooses, for `iopath compare --input`. Killed on drop.
pub struct Recording(
    Option<Child>,
    std::sync::Arc<std::sync::Mutex<String>>,
    Option<std::thread::JoinHandle<()>>,
);

impl Recording {
    /// Starts `iopath record --json` with `args` and waits until its programs are attached.
    pub fn start(args: &[&str]) -> Recording {
        Self::start_for("1h", args)
    }

    /// As [`Recording::start`], recording for `duration` at most ([`Recording::wait`]).
    pub fn start_for(duration: &str, args: &[&str]) -> Recording {
        use std::io::BufRead as _;
        let mut rec = Command::new(iopath_bin())
            .args(["record", "--json", "--duration", duration])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("iopath record");
        let mut stderr = std::io::BufReader::new(rec.stderr.take().unwrap());
        let mut said = String::new();
        loop {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).expect("record's stderr");
            said += &line;
            if n == 0 || line.contains("recording for") {
                break;
            }
        }
        assert!(
            said.contains("recording for"),
            "record did not start: {said}"
        );
        // Keep reading its stderr: a closed pipe would make its next line fail.
        let more = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let to = more.clone();
        let reader = std::thread::spawn(move || {
            for l in stderr.lines().map_while(Result::ok) {
                let mut t = to.lock().unwrap();
                t.push_str(&l);
                t.push('\n');
            }
        });
        Recording(Some(rec), more, Some(reader))
    }

    /// Ends the recording (SIGINT) and returns its capture.
    pub fn stop(self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.as_ref().expect("running").id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Waits for the recording's end (its duration) and returns its capture.
    pub fn wait(self) -> String {
        self.wait_said().0
    }

    /// As [`Recording::wait`], with what it said on stderr after it started recording.
    pub fn wait_said(mut self) -> (String, String) {
        let rec = self.0.take().expect("running");
        let out = rec.wait_with_output().expect("record's output");
        assert!(
            out.status.success(),
            "record failed ({}): {}",
            out.status,
            self.1.lock().unwrap()
        );
        // its stderr's reader ends with the pipe
        if let Some(reader) = self.2.take() {
            let _ = reader.join();
        }
        let said = self.1.lock().unwrap().clone();
        (
            String::from_utf8(out.stdout).expect("record --json is UTF-8"),
            said,
        )
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(mut rec) = self.0.take() {
            let _ = rec.kill();
            let _ = rec.wait();
        }
    }
}

/// A YAML file parsed by PyYAML (python3-yaml, which `cargo xtask setup` installs), as JSON;
/// fails the test if it does not parse.
pub fn yaml(path: &Path) -> serde_json::Value {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{} does not parse: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A self-signed certificate for 127.0.0.1 named `cn`, by openssl (which `cargo xtask setup`
/// installs): `name.crt` and `name.key` in `dir`. Also a CA, which can sign others.
pub fn self_signed_cert(dir: &Path, name: &str, cn: &str) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .output()
        .expect("openssl (cargo xtask setup)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The kernel stack of each thread of process `pid` (`/proc/PID/task/*/stack`, root only).
pub fn thread_stacks(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(no /proc entry)".into();
    };
    tasks
        .flatten()
        .map(|t| {
            let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
            let frames: Vec<&str> = stack
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .collect();
            format!(
                "{}: [{}]",
                t.file_name().to_string_lossy(),
                frames.join(" < ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Kills `child` and waits for it 30 s at most: a tracer's exit detaches its programs, which
/// under emulation can take minutes (bpftrace's, in the distro-kernel VM), and a test that has
/// what it needs must not wait on that. One still exiting is reaped by a thread of its own, so
/// `child` must not be used after this (its pid may be another process's by then).
pub fn reap(child: &mut Child, what: &str) {
    let _ = child.kill();
    if exit_within(child, Duration::from_secs(30)).is_none() {
        eprintln!(
            "{what} still exiting 30 s after SIGKILL; its threads' kernel stacks: {}",
            thread_stacks(child.id())
        );
        let pid = child.id() as libc::pid_t;
        // SAFETY: waitpid(2) on our own child, which nothing else waits for now.
        std::thread::spawn(move || unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) });
    }
}

/// `child`'s exit status once it exits, waiting `limit` at most (None: still running).
pub fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(20));
    }
}
