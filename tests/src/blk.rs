//! Helpers of the block path's end-to-end tests: the lab guest's disk rounds, as its console
//! prints them, and bpftrace counts that a test can cut at an instant.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::sleep,
    time::{Duration, Instant},
};

/// One of the lab guest's disk rounds (`LAB: disk round=R write4k|read4k n=N ... p50=P ...`).
#[derive(Clone, Debug, PartialEq)]
pub struct DiskRound {
    pub round: u32,
    /// `write4k` or `read4k`.
    pub op: String,
    pub n: u64,
    /// The guest's median, µs.
    pub p50_us: f64,
}

/// The rounds the guest printed on `console` so far.
pub fn disk_rounds(console: &Path) -> Vec<DiskRound> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = &l[l.find("LAB: disk round=")? + "LAB: disk round=".len()..];
            let mut f = rest.split_whitespace();
            let round = f.next()?.parse().ok()?;
            let op = f.next()?.to_string();
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            Some(DiskRound {
                round,
                op,
                n: field("n=")? as u64,
                p50_us: field("p50=")?,
            })
        })
        .collect()
}

/// Waits (bounded by `limit`) until the guest printed round `round`'s reads: its last I/O.
pub fn wait_round(console: &Path, round: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !disk_rounds(console)
        .iter()
        .any(|r| r.round == round && r.op == "read4k")
    {
        assert!(Instant::now() < deadline, "disk round {round} did not end");
        sleep(Duration::from_millis(50));
    }
}

/// bpftrace running a script that prints `ready` once attached, then `T <nsecs> <count>...`
/// every 100 ms (nsecs: CLOCK_MONOTONIC), so that a test can read its counts as they were at
/// an instant of its own; and, if it likes, `V <nsecs> <value>` for single events, kept with
/// their time. Interrupted on drop.
pub struct Ticker {
    child: Child,
    lines: mpsc::Receiver<String>,
    latest: (u64, Vec<u64>),
    values: Vec<(u64, u64)>,
}

impl Ticker {
    pub fn start(script: &str) -> Ticker {
        let mut child = Command::new("bpftrace")
            .args(["-e", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bpftrace");
        // What bpftrace says on stderr: why, when it does not attach.
        let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let to = said.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let mut t = to.lock().unwrap();
                t.push_str(&l);
                t.push('\n');
            }
        });
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        // bpftrace may take tens of seconds to attach in the emulated VM.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains("ready") => break,
                Ok(_) => {}
                Err(_) => panic!(
                    "bpftrace did not attach within 120 s: {}",
                    said.lock().unwrap()
                ),
            }
        }
        Ticker {
            child,
            lines,
            latest: (0, Vec::new()),
            values: Vec::new(),
        }
    }

    /// The counts of the first line printed at or after `ns` (CLOCK_MONOTONIC).
    pub fn at(&mut self, ns: u64) -> Vec<u64> {
        while self.latest.0 < ns {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("bpftrace prints every 100 ms");
            let fields =
                |r: &str| -> Vec<u64> { r.split(' ').filter_map(|v| v.parse().ok()).collect() };
            if let Some(v) = l.strip_prefix("V ").map(fields)
                && v.len() == 2
            {
                self.values.push((v[0], v[1]));
            }
            let f = l.strip_prefix("T ").map(fields).unwrap_or_default();
            if let Some((&t, counts)) = f.split_first() {
                self.latest = (t, counts.to_vec());
            }
        }
        self.latest.1.clone()
    }

    /// The `V` values printed between `from` and `to` (CLOCK_MONOTONIC ns), read so far.
    pub fn values_between(&self, from: u64, to: u64) -> Vec<u64> {
        self.values
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, v)| *v)
            .collect()
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        crate::reap(&mut self.child, "bpftrace");
    }
}
