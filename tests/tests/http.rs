//! The HTTP server under abuse: oversized, malformed and stalled requests get an answer or are
//! cut off, connections over the cap get 503, accept errors (EMFILE) do not spin, and 50
//! scrapers at once for 10 s get valid answers with flat memory.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::{self, sleep},
    time::{Duration, Instant},
};

use iopath_tests::{Daemon, LoopDev, require_root, rss_kib};

/// Sends `request` as it is and returns what comes back before the server closes (or 15 s).
fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> &str {
    resp.lines().next().unwrap_or_default()
}

#[test]
fn oversized_malformed_and_stalled_requests() {
    require_root();
    let d = Daemon::start(&["--stages", "blk.device"]);
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert!(
        status(&raw(d.port, big.as_bytes())).starts_with("HTTP/1.1 431"),
        "a 20 KB header"
    );
    let lf = raw(
        d.port,
        b"GET /metrics HTTP/1.1\nHost: x\nConnection: close\n\n",
    );
    assert!(
        status(&lf).starts_with("HTTP/1.1 200"),
        "LF line endings: {}",
        status(&lf)
    );
    assert!(lf.contains("iopath_stage_attached"));
    assert!(status(&raw(d.port, b"\x16\x03\x01\x02\x00junk\r\n\r\n")).starts_with("HTTP/1.1 400"));
    let version = raw(d.port, b"GET /metrics HTTP/9.9\r\n\r\n");
    assert!(status(&version).starts_with("HTTP/1.1 400"), "{version:?}");
    let post = raw(
        d.port,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(status(&post).starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.contains("allow: GET, HEAD") || post.contains("Allow: GET, HEAD"));
    let missing = raw(
        d.port,
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status(&missing).starts_with("HTTP/1.1 404"));
    // Half a request head, then nothing: cut off after the head timeout (10 s), not held.
    let t = Instant::now();
    let stalled = raw(d.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(14),
        "stalled client closed after {waited:?}: {stalled:?}"
    );
    // Still serving.
    assert!(d.get("/metrics", true).unwrap().1.ends_with("# EOF\n"));
    assert!(d.stop().success());
}

#[test]
fn connections_over_the_cap_get_503() {
    require_root();
    let d = Daemon::start(&["--stages", "blk.device"]);
    // 128 connections that send nothing hold every slot (until the 10 s head timeout).
    let idle: Vec<TcpStream> = (0..128)
        .map(|_| TcpStream::connect(("127.0.0.1", d.port)).unwrap())
        .collect();
    sleep(Duration::from_millis(300));
    let over = raw(d.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status(&over).starts_with("HTTP/1.1 503"), "{over:?}");
    drop(idle);
    sleep(Duration::from_millis(300));
    let (_, body) = d.get("/metrics", false).unwrap();
    assert!(
        body.contains("iopath_stage_attached"),
        "served again once they close"
    );
    assert!(d.stop().success());
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_file_descriptors_backs_off_and_recovers() {
    require_root();
    let d = Daemon::start(&["--stages", "blk.device"]);
    let pid = d.child.id();
    let fds = || -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    };
    // A limit that leaves 3 free fd numbers (the kernel gives the lowest free number, which
    // must be below the limit): the 4th connection's accept fails with EMFILE.
    let used = fds();
    let lim = (0..)
        .filter(|n| !used.contains(n))
        .nth(2)
        .map(|n| n + 1)
        .unwrap();
    let limit = lim.to_string();
    let st = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success());
    let idle: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(("127.0.0.1", d.port)).unwrap())
        .collect();
    sleep(Duration::from_millis(300));
    let below = fds().into_iter().filter(|&n| n < lim).count();
    assert_eq!(below as u32, lim, "the daemon is out of file descriptors");
    let t0 = cpu_ticks(pid);
    sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - t0;
    // A daemon that retried accept at once would burn the 2 s (200 ticks at 100 Hz).
    assert!(
        used < 20,
        "{used} ticks of CPU in 2 s out of file descriptors"
    );
    drop(idle);
    // Once those close, the daemon serves again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((_, body)) = d.get("/metrics", false)
            && body.contains("iopath_stage_attached")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no answer after the fds were freed"
        );
        sleep(Duration::from_millis(200));
    }
    assert!(d.stop().success());
}

#[test]
fn fifty_scrapers_for_ten_seconds() {
    require_root();
    let lo = LoopDev::new("scrapers", 16);
    let d = Arc::new(Daemon::start(&[]));
    lo.direct_io(200, 200);
    let scrape = |d: &Daemon, om: bool| -> bool {
        match d.get("/metrics", om) {
            Ok((ctype, body)) => {
                let whole = if om {
                    body.ends_with("# EOF\n")
                } else {
                    body.contains("iopath_vms ")
                };
                whole && ctype.contains(if om { "openmetrics" } else { "version=0.0.4" })
            }
            Err(_) => false,
        }
    };
    let pid = d.child.id();
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // 50 scrapers for `secs` seconds, while the block stage keeps counting.
    let burst = |secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let scrapers: Vec<_> = (0..50)
            .map(|i| {
                let (d, ok, bad) = (d.clone(), ok.clone(), bad.clone());
                thread::spawn(move || {
                    while Instant::now() < deadline {
                        let c = if scrape(&d, i % 2 == 0) { &ok } else { &bad };
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        while Instant::now() < deadline {
            lo.direct_io(50, 50);
        }
        for s in scrapers {
            s.join().unwrap();
        }
    };
    // Warm up under the same load, then take the memory the daemon settles at.
    burst(2);
    let reads = |d: &Daemon| d.metrics().value("iopath_snapshot_reads_total", &[]);
    let reads0 = reads(&d);
    let rss0 = rss_kib(pid);
    ok.store(0, Ordering::Relaxed);
    burst(10);
    let rss1 = rss_kib(pid);
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    let read = reads(&d) - reads0 - 1.0; // this scrape's own
    eprintln!(
        "50 scrapers, 10 s: {ok} answers, {bad} failures, {read} reads; RSS {rss0} -> {rss1} KiB"
    );
    assert_eq!(bad, 0, "every scrape answered in full");
    assert!(ok >= 500, "{ok} scrapes in 10 s");
    assert!(
        read < ok as f64 / 2.0,
        "concurrent scrapes share reads: {read} reads for {ok} scrapes"
    );
    assert!(
        rss1 <= rss0 + rss0 / 10,
        "memory flat within 10%: {rss0} -> {rss1} KiB"
    );
    let d = Arc::into_inner(d).expect("scrapers done");
    assert!(d.stop().success());
}
