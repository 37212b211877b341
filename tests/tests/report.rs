//! `iopath record --output` then `iopath report`: a real capture of loop-device I/O, a test
//! VMM's disk backend (its requests and their interrupts), its exits and datagrams through a
//! tap, shown as terminal tables and as an HTML page that Debian's headless Chromium opens.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use iopath_tests::{
    LoopDev, Recording, Vmm, iopath, kvm_available,
    net::{TapBackend, Topology, send},
    testvmm_bin,
};

const VM: &str = "report-disk";

/// The attributes of every element `<tag ... class="class" ...>` of `html`, in order.
fn elements(html: &str, tag: &str, class: &str) -> Vec<BTreeMap<String, String>> {
    let open = format!("<{tag} ");
    html.match_indices(&open)
        .map(|(at, _)| {
            let rest = &html[at + open.len()..];
            let head = &rest[..rest.find('>').expect("a closed tag")];
            let mut attrs = BTreeMap::new();
            let mut s = head.trim();
            while let Some(eq) = s.find("=\"") {
                let name = s[..eq].trim().to_string();
                let value_end = s[eq + 2..].find('"').expect("a closed value");
                attrs.insert(name, s[eq + 2..eq + 2 + value_end].to_string());
                s = s[eq + 2 + value_end + 1..].trim();
            }
            attrs
        })
        .filter(|a| a.get("class").is_some_and(|c| c == class))
        .collect()
}

/// The `<figure id="id" ...>...</figure>` of `html`.
fn figure(html: &str, id: &str) -> String {
    let at = html
        .find(&format!("<figure id=\"{id}\""))
        .unwrap_or_else(|| panic!("no figure {id}"));
    let end = at + html[at..].find("</figure>").unwrap();
    html[at..end].to_string()
}

/// The p50 in µs of `series` merged bucket by bucket (each bucket `[lower bound, events]`,
/// its upper bound the kernel layout's), interpolated inside its bucket as Prometheus'
/// histogram_quantile does: computed here, not by iopath.
fn merged_p50_us(series: &[&serde_json::Value]) -> f64 {
    use tracer_common::hist::{bucket_index, upper_bound_ns};
    let mut buckets: BTreeMap<u64, u64> = BTreeMap::new();
    for s in series {
        for b in s["buckets"].as_array().unwrap() {
            *buckets.entry(b[0].as_u64().unwrap()).or_default() += b[1].as_u64().unwrap();
        }
    }
    let total: u64 = buckets.values().sum();
    let rank = (0.5 * total as f64).max(1.0);
    let mut below = 0u64;
    for (&lo, &n) in &buckets {
        if (below + n) as f64 >= rank {
            let hi = upper_bound_ns(bucket_index(lo + 1)).expect("a finite bucket") as f64;
            let lo = lo as f64;
            return (lo + (hi - lo) * (rank - below as f64) / n as f64) / 1e3;
        }
        below += n;
    }
    panic!("no events in {} series", series.len())
}

fn num(e: &BTreeMap<String, String>, k: &str) -> f64 {
    e.get(k)
        .unwrap_or_else(|| panic!("no {k} in {e:?}"))
        .parse()
        .unwrap()
}

/// The capture's series of `stage` that `keep` selects.
fn series<'a>(
    capture: &'a serde_json::Value,
    stage: &str,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Vec<&'a serde_json::Value> {
    capture["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stage"] == stage && keep(&s["labels"]))
        .collect()
}

/// Headless Chromium on `page`: its DOM once loaded, and its console messages (Chromium logs
/// each as a `CONSOLE` line on stderr).
fn chromium(page: &Path, profile: &Path, extra: &[&str]) -> (String, Vec<String>) {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()
        .expect("chromium (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let console = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

#[test]
fn a_recordings_report_adds_up_in_the_terminal_and_in_chromium() {
    const TEST: &str = "a_recordings_report_adds_up_in_the_terminal_and_in_chromium";
    if !kvm_available(TEST) {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let capture_path = dir.join("run.json");
    let lo = LoopDev::new("report", 16);
    let topo = Topology::new("rpt");
    // A disk backend: its reads after 3 s, each followed by its irqfd's signal (the guest's
    // interrupt), so the capture holds the VM's blk.device and blk.complete_to_irq.
    let mut vmm = Command::new(testvmm_bin())
        .args([
            "-name",
            &format!("guest={VM},debug-threads=on"),
            "blk-backend",
        ])
        .args(["--dev", &lo.dev, "--count", "300", "--spin-us", "20"])
        .args(["--first-us", "3000000", "--gap-us", "1500000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("test VMM");
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(vmm.stdout.take().unwrap()));
    let ready = out.next().expect("a line").expect("read");
    assert!(ready.contains("ready"), "test VMM: {ready}");
    // 12 s: long enough for record's progress line (every 10 s when not on a terminal).
    let rec = Recording::start_for(
        "12s",
        &[
            "--output",
            capture_path.to_str().unwrap(),
            "--syscall-tracepoints",
        ],
    );
    let start = Instant::now();
    for round in 0..100 {
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
        lo.direct_io(20, 20);
        Vmm::run("report-exits", &["pio", "--count", "20"], 0).wait();
        let backend = TapBackend::start(&testvmm_bin(), "report-net", &topo.tap, 20, 50, &[]);
        if round == 0 {
            topo.wait_forwarding();
        }
        send(&testvmm_bin(), &topo.ns, 20, 300);
        backend.report();
        std::thread::sleep(Duration::from_millis(200));
    }
    let vmm_report = out.next().expect("its report").expect("read");
    assert!(vmm_report.contains("reads"), "test VMM: {vmm_report}");
    let _ = vmm.wait();
    let (stdout, said) = rec.wait_said();
    // one line at about 10 s (the tick may come late under load: its second is not checked)
    let progress: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("iopath: recorded ") && l.contains(" s of 12 s, "))
        .collect();
    assert!(
        progress.len() == 1 && progress[0].ends_with("events so far"),
        "record's progress: {said}"
    );
    let written = std::fs::read_to_string(&capture_path).expect("record --output wrote it");
    assert_eq!(written, stdout, "--output holds the capture --json prints");
    let capture: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert!(
        capture["meta"]["duration_s"].as_f64().unwrap() >= 11.5,
        "{}",
        capture["meta"]
    );

    // The terminal tables.
    let text = iopath(&["report", capture_path.to_str().unwrap()]);
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    eprintln!("{text}");
    for want in [
        "disk request (paravirtual)",
        "network receive (paravirtual)",
        "Stages, each merged over its series",
        "blk.complete_to_irq",
        "kvm.userspace_exit",
    ] {
        assert!(text.contains(want), "report lacks {want:?}");
    }

    // The page of the disk VM alone: its waterfall's bars start where the previous one ends,
    // the total is their sum, and each bar is the capture's own figure for its one series.
    let vm_page = dir.join("report-disk.html");
    let r = iopath(&[
        "report",
        capture_path.to_str().unwrap(),
        "--vm",
        VM,
        "--html",
        vm_page.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{r:?}");
    let vm_html = std::fs::read_to_string(&vm_page).unwrap();
    let disk = figure(&vm_html, "waterfall-disk-request");
    let attrs = &elements(&disk, "figure", "waterfall")[0];
    let bars = elements(&disk, "rect", "bar");
    for (row, total) in [("p50", "data-p50-total-us"), ("p99", "data-p99-total-us")] {
        let steps: Vec<_> = bars.iter().filter(|b| b["data-row"] == row).collect();
        let stages: Vec<&str> = steps.iter().map(|b| b["data-stage"].as_str()).collect();
        assert!(
            stages.starts_with(&["blk.device", "blk.complete_to_irq"]),
            "disk {row} bars: {stages:?}"
        );
        let mut at = 0.0;
        for b in &steps {
            assert!(
                (num(b, "data-start-us") - at).abs() < 0.01,
                "{row} {b:?} after {at}"
            );
            at += num(b, "data-us");
        }
        assert!(
            (num(attrs, total) - at).abs() < 0.01,
            "{row}: total {} against {at}",
            attrs[total]
        );
    }
    // (the VMM's own host-disk reads, its binary paged in, are its series too: a bar merges
    // the VM's series, and so does the p50 computed here from their buckets)
    for stage in ["blk.device", "blk.complete_to_irq"] {
        let s = series(&capture, stage, |l| l["vm"] == VM);
        let loop_dev = s
            .iter()
            .find(|r| r["labels"]["disk"] == lo.name())
            .unwrap_or_else(|| panic!("{stage}: no series of {VM} on {}", lo.name()));
        let bar = bars
            .iter()
            .find(|b| b["data-row"] == "p50" && b["data-stage"] == stage)
            .unwrap();
        let want = merged_p50_us(&s);
        assert!(
            (num(bar, "data-us") - want).abs() < 0.01,
            "{stage}: bar {} against the p50 of the capture's {} series {want}",
            bar["data-us"],
            s.len()
        );
        eprintln!(
            "{stage}: {} events of {VM} on {} (p50 {:.1} us), {} series merged: p50 {want:.1} us",
            loop_dev["count"],
            lo.name(),
            loop_dev["p50_us"].as_f64().unwrap(),
            s.len()
        );
    }
    // The network backend's VM: its receive waterfall takes its tap's host stack.
    let net = iopath(&[
        "report",
        capture_path.to_str().unwrap(),
        "--vm",
        "report-net",
    ]);
    let net = String::from_utf8_lossy(&net.stdout);
    let host_stack = net
        .lines()
        .find(|l| l.trim_start().starts_with("net.rx.host_stack"))
        .unwrap_or_else(|| panic!("report --vm report-net: no host stack in {net}"));
    let events: u64 = host_stack
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(events > 0, "{host_stack}");
    // Every row of the filtered stage table counts that VM's series (and its tap's host stack)
    // and no other VM's: the network VMM's own process may do host disk I/O (a page-in),
    // which is its blk.device.
    let table = net
        .split("\nStages, each merged")
        .nth(1)
        .unwrap_or_else(|| panic!("report --vm report-net: no stage table in {net}"));
    // The capture's series of report-net: its own, and its tap's host stacks.
    let of_net = |s: &serde_json::Value| {
        let l = &s["labels"];
        l["vm"] == "report-net"
            || (s["stage"].as_str().unwrap().ends_with("host_stack")
                && l["tap"] == topo.tap.as_str())
    };
    let mut rows = std::collections::BTreeSet::new();
    for row in table.lines().skip(2) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        if cols.len() != 9 || !cols[1].contains('.') {
            break;
        }
        let want: u64 = series(&capture, cols[1], |_| true)
            .into_iter()
            .filter(|s| of_net(s))
            .map(|s| s["count"].as_u64().unwrap())
            .sum();
        assert_eq!(
            cols[3].parse::<u64>().unwrap(),
            want,
            "{}: report --vm report-net against the capture's report-net series: {net}",
            cols[1]
        );
        rows.insert(cols[1].to_string());
    }
    // And every stage of that VM's with events has its row.
    let of_vm: std::collections::BTreeSet<String> = capture["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["count"].as_u64().unwrap() > 0 && of_net(s))
        .map(|s| s["stage"].as_str().unwrap().to_string())
        .collect();
    assert!(rows.len() >= 3, "{rows:?}: stage rows in {net}");
    assert_eq!(
        rows, of_vm,
        "report --vm report-net's stage rows against the capture's"
    );

    // The page of every series.
    let page = dir.join("report.html");
    let r = iopath(&[
        "report",
        capture_path.to_str().unwrap(),
        "--html",
        page.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{r:?}");
    let html = std::fs::read_to_string(&page).unwrap();
    // The histograms: each stage's events are its series' sum, and its buckets add up to it.
    let hists = elements(&html, "figure", "histogram");
    let buckets_at = |stage_id: &str| {
        elements(
            &figure(&html, &format!("hist-{stage_id}")),
            "rect",
            "bucket",
        )
        .iter()
        .map(|b| num(b, "data-events"))
        .sum::<f64>()
    };
    for (stage, id) in [
        ("blk.device", "blk-device"),
        ("kvm.userspace_exit", "kvm-userspace-exit"),
    ] {
        let h = hists
            .iter()
            .find(|h| h["data-stage"] == stage)
            .unwrap_or_else(|| panic!("no {stage} histogram"));
        let want: u64 = series(&capture, stage, |_| true)
            .iter()
            .map(|s| s["count"].as_u64().unwrap())
            .sum();
        assert!(want > 0, "{stage}: no events captured");
        assert_eq!(num(h, "data-events") as u64, want, "{stage} events");
        assert_eq!(buckets_at(id) as u64, want, "{stage}: its buckets");
    }

    // Chromium: the sections are in its DOM, nothing went to its console, and a copy of the
    // page that refers to something outside it does (the check can fail).
    let profile = dir.join("chromium-profile");
    let (dom, console) = chromium(&page, &profile, &["--dump-dom"]);
    for id in [
        "meta",
        "waterfalls",
        "waterfall-disk-request",
        "waterfall-net-receive",
        "path-block",
        "path-kvm",
        "path-net",
        "hist-blk-device",
        "coverage",
        "dropped",
    ] {
        assert!(
            dom.contains(&format!("id=\"{id}\"")),
            "Chromium's DOM lacks #{id}"
        );
    }
    assert!(
        dom.matches("<rect class=\"bar\"").count() >= 4,
        "waterfall bars in the DOM"
    );
    assert!(console.is_empty(), "console messages: {console:?}");
    let bad = dir.join("outside.html");
    std::fs::write(
        &bad,
        html.replace("</body>", "<img src=\"http://169.254.1.1/x.png\"></body>"),
    )
    .unwrap();
    let (_, console) = chromium(&bad, &profile, &["--dump-dom"]);
    assert!(
        console
            .iter()
            .any(|l| l.contains("Content Security Policy")),
        "a fetch from the page was not reported: {console:?}"
    );
    let shot = dir.join("report.png");
    chromium(
        &page,
        &profile,
        &[
            "--window-size=1000,2400",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot of {} bytes",
        png.len()
    );
    eprintln!("screenshot of the report: {}", shot.display());
    let _ = std::fs::remove_dir_all(&profile);
    lo.remove();
}
