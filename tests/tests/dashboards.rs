//! The shipped Prometheus and Grafana files: valid for promtool, every metric and label they
//! query is one a live iopath exports, read from a scrape of a daemon that saw block I/O and
//! every kind of KVM event the test VMM makes, and every query of every panel and rule returns
//! data from Debian's Prometheus scraping a daemon under that load, whose native histograms
//! agree with the classic ones and with /quantiles.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use iopath_tests::{
    Daemon, LoopDev, Vmm, kvm_available,
    net::{TapBackend, Topology, send},
    prom::Prometheus,
    testvmm_bin, yaml,
};
use tracer_common::hist::bucket_index;

fn dashboards() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards"))
}

/// Labels Prometheus adds to every series it scrapes.
const TARGET_LABELS: &[&str] = &["instance", "job"];

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dashboards())
        .output()
        .expect("promtool (cargo xtask setup)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_config_and_rules_are_valid() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "iopath-rules.yml"]);
}

/// Metric names (iopath_...) and label names used in a PromQL expression.
fn names_in(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let words: Vec<&str> = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .collect();
    for w in &words {
        if w.starts_with("iopath_") {
            metrics.insert(w.to_string());
        }
    }
    // labels: inside by (...) and before =, =~, != in selectors
    for part in expr.split("by (").skip(1) {
        for l in part.split(')').next().unwrap().split(',') {
            labels.insert(l.trim().to_string());
        }
    }
    // label_values(selector, label)
    for part in expr.split("label_values(").skip(1) {
        if let Some(l) = part.split(')').next().and_then(|a| a.rsplit(',').next()) {
            labels.insert(l.trim().to_string());
        }
    }
    for sel in expr.split('{').skip(1) {
        for m in sel.split('}').next().unwrap().split(',') {
            if let Some(l) = m
                .split(['=', '!'])
                .next()
                .filter(|l| !l.trim().is_empty() && m.contains('='))
            {
                labels.insert(l.trim().to_string());
            }
        }
    }
    (metrics, labels)
}

/// One round of the KVM load both daemon tests drive: the test VMM's exits, irqfd injections
/// and halts (VMs `{prefix}-exits`, `-irqfd`, `-halt`), each VM kept `hold_ms` after its work.
fn kvm_load(prefix: &str, hold_ms: u64) {
    for (kind, args) in [
        ("exits", &["pio", "--count", "20"][..]),
        ("irqfd", &["irqfd-gsi", "--count", "20", "--gap-us", "300"]),
        ("halt", &["halt", "--count", "5", "--spin-us", "500"]),
    ] {
        Vmm::run(&format!("{prefix}-{kind}"), args, hold_ms).wait();
    }
}

/// 20 datagrams from the peer through `topo`'s tap to a userspace backend (VM
/// `{prefix}-net`); `first` waits for the bridge to forward first.
fn tap_receive(prefix: &str, topo: &Topology, first: bool) {
    let backend = TapBackend::start(
        &testvmm_bin(),
        &format!("{prefix}-net"),
        &topo.tap,
        20,
        50,
        &[],
    );
    if first {
        topo.wait_forwarding();
    }
    send(&testvmm_bin(), &topo.ns, 20, 300);
    backend.report();
}

#[test]
fn dashboard_queries_use_exported_metrics_and_labels() {
    if !kvm_available("dashboard_queries_use_exported_metrics_and_labels") {
        return;
    }
    let lo = LoopDev::new("dash", 16);
    let topo = Topology::new("dq");
    // Every stage, the opt-in ones too: the dashboards show them all.
    let d = Daemon::start(&["--bpf-stats", "--syscall-tracepoints"]);
    lo.direct_io(20, 20);
    kvm_load("dash", 300);
    // the tap's series (the direction rules map a tap to its VM)
    tap_receive("dash", &topo, true);
    let scrape = d.metrics();
    assert!(d.stop().success());
    // metric -> the labels its series carry (Prometheus adds the target's)
    let mut exported: std::collections::BTreeMap<&str, BTreeSet<&str>> = Default::default();
    for s in &scrape.samples {
        exported.entry(s.name.as_str()).or_default().extend(
            s.labels
                .keys()
                .map(String::as_str)
                .chain(TARGET_LABELS.iter().copied()),
        );
    }
    let labels: BTreeSet<&str> = exported.values().flatten().copied().collect();
    for want in [
        "vm", "vcpu", "device", "disk", "op", "reason", "signal", "inject", "wait",
    ] {
        assert!(
            labels.contains(want),
            "the scrape has no {want} label: {labels:?}"
        );
    }
    let queries = shipped_queries();
    // A recording rule's name in a query stands for its expression (its labels are those the
    // expression keeps).
    let recorded: Vec<(String, String)> = queries
        .iter()
        .filter_map(|(what, e)| {
            let name = what.strip_prefix("rule ")?;
            name.contains(':').then(|| (name.to_string(), e.clone()))
        })
        .collect();
    let exprs: Vec<String> = queries
        .iter()
        .map(|(_, e)| {
            recorded
                .iter()
                .fold(e.clone(), |e, (name, r)| e.replace(name, &format!("({r})")))
        })
        .collect();
    assert!(exprs.len() >= 10);
    for e in &exprs {
        let (metrics, names) = names_in(e);
        assert!(!metrics.is_empty(), "{e} queries no iopath metric");
        let mut on_them = BTreeSet::new();
        for m in &metrics {
            let l = exported
                .get(m.as_str())
                .unwrap_or_else(|| panic!("{e}: {m} is not exported"));
            on_them.extend(l.iter().copied());
        }
        for l in names {
            assert!(
                on_them.contains(l.as_str()),
                "{e}: label {l} is on none of {metrics:?}"
            );
        }
    }
}

/// Every PromQL expression shipped: the dashboard's panels (each target, with its title) and
/// variables, and the rules file's recording and alerting rules (each with its name).
fn shipped_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dashboards().join("grafana-iopath.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let what = format!("panel {:?} {}", p["title"].as_str().unwrap(), t["refId"]);
            out.push((what, t["expr"].as_str().unwrap().to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    let rules = std::fs::read_to_string(dashboards().join("iopath-rules.yml")).unwrap();
    let mut name = String::new();
    for l in rules.lines().map(str::trim) {
        if let Some(n) = l
            .strip_prefix("- record: ")
            .or_else(|| l.strip_prefix("- alert: "))
        {
            name = n.to_string();
        } else if let Some(e) = l.strip_prefix("expr: ") {
            out.push((format!("rule {name}"), e.to_string()));
        }
    }
    out
}

/// `expr` as Grafana would send it with every variable at All and a one-minute rate window;
/// a variable's `label_values(m, l)` as the series of `m` that carry `l`, counted by it; an alert's comparison dropped (what
/// it compares must have data; whether it fires is the host's business).
fn evaluable(expr: &str) -> String {
    let mut e = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s");
    for v in ["$stage", "$vm", "$device", "$path"] {
        e = e.replace(v, ".*");
    }
    if let Some(inner) = e.strip_prefix("label_values(") {
        let (metric, label) = inner.rsplit_once(',').unwrap();
        let label = label.trim().trim_end_matches(')');
        // only series that carry the label: a count of none would still be one {} series
        let metric = metric.trim();
        let has = format!("{label}!=\"\"");
        let selector = match metric.strip_suffix('}') {
            Some(open) => format!("{open}, {has}}}"),
            None => format!("{metric}{{{has}}}"),
        };
        e = format!("count by ({label}) ({selector})");
    }
    for cmp in [" == 0", " > 0"] {
        if let Some(lhs) = e.strip_suffix(cmp) {
            e = lhs.to_string();
        }
    }
    e
}

/// Stages this host cannot give data for, with why; a query that reads only these (and
/// returns nothing) is listed as skipped, not failed. Any other stage, attached or not, must
/// give data. Where each of these is tested instead: nested.rs.
const NOT_ON_THIS_HOST: &[(&str, &str)] = &[
    (
        "vfio.handler_to_inject",
        "needs a passed-through device injecting into a guest (the distro-kernel VM's nested \
         guest)",
    ),
    (
        "kvm.inject_to_entry",
        "needs kvm:kvm_entry, which KVM-PVM never fires",
    ),
    ("kvm.exit", "needs kvm:kvm_exit, which KVM-PVM never fires"),
];

/// The stages an expression names in a `stage` matcher (`=` or `=~` with alternatives).
fn stages_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("stage") {
        rest = &rest[i + 5..];
        let r = rest.trim_start_matches('=').trim_start_matches('~');
        if let Some(r) = r.strip_prefix('"') {
            let v = &r[..r.find('"').unwrap_or(r.len())];
            out.extend(v.split('|').map(String::from));
        }
    }
    out
}

#[test]
fn every_panel_and_rule_query_returns_data_from_a_real_prometheus() {
    const TEST: &str = "every_panel_and_rule_query_returns_data_from_a_real_prometheus";
    if !kvm_available(TEST) {
        return;
    }
    let lo = LoopDev::new("promq", 16);
    let topo = Topology::new("pq");
    // One sampled window in 8 rather than the default 64: 20 s of load in rounds gives every
    // busy stage exemplars for certain.
    let d = Daemon::start(&[
        "--bpf-stats",
        "--syscall-tracepoints",
        "--timeline-every",
        "8",
    ]);
    let rules = dashboards().join("iopath-rules.yml");
    let config = format!(
        "# written by the test\nglobal:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: ['{}']\nscrape_configs:\n  - job_name: iopath\n    static_configs:\n      \
         - targets: ['127.0.0.1:{}']\n",
        rules.canonicalize().unwrap().display(),
        d.port
    );
    let p = Prometheus::start(
        &config,
        &["--enable-feature=native-histograms,exemplar-storage"],
    );
    // Its first scrape comes seconds after it is ready: the load starts after it.
    p.scraped_targets(Duration::from_secs(60));
    // A disk backend's requests and their interrupts (the request direction): 1.5 s for the
    // daemon to know the VMM, its warm-up reads, 1.5 s to learn its disk's vector from them,
    // then 200 reads over 4 s (a read every 20 ms of spin): Prometheus counts a new series'
    // increase only from its second scrape, so they must span several.
    let disk = TapBackend::spawn(
        &testvmm_bin(),
        "promq-disk",
        &[
            "blk-backend",
            "--dev",
            &lo.dev,
            "--count",
            "200",
            "--spin-us",
            "20000",
            "--first-us",
            "1500000",
            "--gap-us",
            "1500000",
        ],
    );
    // Load for 20 s (bounded in rounds too): block I/O, the test VMM's exits, irqfd
    // injections and halts, and datagrams through a tap to a userspace backend.
    let start = Instant::now();
    let mut peer = [0u8; 6];
    for round in 0..200 {
        if start.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        lo.direct_io(20, 20);
        kvm_load("promq", 0);
        tap_receive("promq", &topo, round == 0);
        if round == 0 {
            peer = topo.peer_mac();
        }
        // frames out of the tap to the peer (net.tx.host_stack: the transmit direction, its
        // tap the receive backend's), with the tap free between backends
        iopath_tests::net::TapWriter::open(&topo.tap).send_udp(peer, 20, 300);
    }
    disk.report();
    // The rules are evaluated every second; their first values with the load in them may lag.
    let deadline = Instant::now() + Duration::from_secs(30);
    let finite = |r: &[serde_json::Value]| {
        r.iter()
            .filter(|s| {
                s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            })
            .count()
    };
    while finite(&p.query("iopath:path_stage_latency_seconds:p99_5m")) == 0 {
        assert!(
            Instant::now() < deadline,
            "rules never evaluated: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut failed = Vec::new();
    let queries = shipped_queries();
    assert!(queries.len() >= 25, "{} queries", queries.len());
    for (what, expr) in &queries {
        let q = evaluable(expr);
        let result = p.query(&q);
        // at least one number: a quantile of a window with no events is NaN
        let n = finite(&result);
        if n > 0 {
            eprintln!("ok   {n:3} series  {what}");
            continue;
        }
        // the stages as queried (`$stage` is every stage: never skipped)
        let stages = stages_in(&q);
        let why: Vec<String> = stages
            .iter()
            .filter_map(|st| {
                NOT_ON_THIS_HOST
                    .iter()
                    .find(|(s, _)| s == st)
                    .map(|(s, w)| format!("{s} {w}"))
            })
            .collect();
        if !stages.is_empty() && why.len() == stages.len() {
            // Past the harness's capture, like iopath_tests::skip, but the test goes on.
            let _ = std::io::stderr().write_all(
                format!("skipping part: {TEST}: {what}: {}\n", why.join("; ")).as_bytes(),
            );
        } else {
            eprintln!("FAIL          {what}: {q} returned {result:?}");
            failed.push(what.clone());
        }
    }
    native_histograms_agree(&p, &d);
    exemplars_name_kept_timelines(&p, &d);
    drop(p);
    assert!(d.stop().success());
    assert!(failed.is_empty(), "queries with no data: {failed:?}");
}

/// Prometheus scraped the protobuf exposition (it asks for it first with native histograms on),
/// which carries `iopath_stage_latency_native_seconds`, the kernel's own buckets as schema 3.
/// Each native series' count and sum are its classic series' at the same scrape, and its median
/// by histogram_quantile is within one bucket of the daemon's own from /quantiles (for a
/// series with no event since that scrape).
fn native_histograms_agree(p: &Prometheus, d: &Daemon) {
    let by_labels = |r: &[serde_json::Value]| -> BTreeMap<String, f64> {
        r.iter()
            .map(|s| {
                let mut m = s["metric"].as_object().unwrap().clone();
                m.remove("__name__");
                let v = s["value"][1].as_str().unwrap().parse().unwrap();
                (serde_json::Value::Object(m).to_string(), v)
            })
            .collect()
    };
    // Two scrape intervals: the load's last events in Prometheus too.
    std::thread::sleep(Duration::from_secs(3));
    let native = by_labels(&p.query("histogram_count(iopath_stage_latency_native_seconds)"));
    assert!(native.len() >= 5, "native series: {native:?}");
    // Counts and sums of one scrape (one query: one evaluation time) agree, series by series:
    // the native series that equal their classic one are all the native series.
    for (native_q, classic_q) in [
        ("histogram_count", "iopath_stage_latency_seconds_count"),
        ("histogram_sum", "iopath_stage_latency_seconds_sum"),
    ] {
        let n = format!("{native_q}(iopath_stage_latency_native_seconds)");
        let q = format!("count({n}) - count({n} == {classic_q})");
        let r = p.query(&q);
        assert_eq!(r.len(), 1, "{q}: {r:?} (no series paired)");
        assert_eq!(r[0]["value"][1], "0", "{q}: {r:?}");
    }
    let medians = p.query("histogram_quantile(0.5, iopath_stage_latency_native_seconds)");
    let q = d.quantiles();
    let mut compared = 0;
    for r in &medians {
        let m = r["metric"].as_object().unwrap();
        let prom: f64 = r["value"][1].as_str().unwrap().parse().unwrap();
        // the daemon's series with the same stage and labels (Prometheus drops empty ones)
        let ours = q["series"].as_array().unwrap().iter().find(|s| {
            s["stage"] == m["stage"]
                && s["labels"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| m.get(k) == Some(v) || (v == "" && !m.contains_key(k)))
        });
        let Some(ours) = ours else {
            panic!("no /quantiles series for {m:?}");
        };
        // A series that gained events since the scrape (the host's own disk, written by
        // Prometheus itself) is not the same data: left out, and counted below.
        let key = {
            let mut k = m.clone();
            k.remove("__name__");
            serde_json::Value::Object(k).to_string()
        };
        if ours["count"].as_f64() != native.get(&key).copied() {
            eprintln!(
                "native p50: {} changed since the scrape ({:?} events, then {}), not compared",
                m["stage"],
                native.get(&key),
                ours["count"]
            );
            continue;
        }
        let ours_ns = ours["p50_us"].as_f64().unwrap() * 1e3;
        let (a, b) = (
            bucket_index((prom * 1e9).round() as u64),
            bucket_index(ours_ns.round() as u64),
        );
        eprintln!(
            "native p50 {:>10.3} µs, /quantiles {:>10.3} µs, buckets {a} {b}: {}",
            prom * 1e6,
            ours_ns / 1e3,
            m["stage"]
        );
        assert!(
            a.abs_diff(b) <= 1,
            "{m:?}: histogram_quantile {prom} s against /quantiles {ours_ns} ns"
        );
        compared += 1;
    }
    // all but those of the host's own disk, at most a few
    assert!(
        compared + 4 >= native.len(),
        "{compared} series compared of {}",
        native.len()
    );
}

/// The exemplars of the slow classic buckets reached Prometheus (through the protobuf format,
/// the one it scrapes here), each with a trace id the daemon's /timelines gives back (the
/// daemon here samples one 16.8 ms window in 8).
fn exemplars_name_kept_timelines(p: &Prometheus, d: &Daemon) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let data = p.api(
        "/api/v1/query_exemplars",
        &[
            "-G",
            "--data-urlencode",
            "query=iopath_stage_latency_seconds_bucket",
            "--data-urlencode",
            &format!("start={}", now - 600),
            "--data-urlencode",
            &format!("end={}", now + 60),
        ],
    );
    let mut exemplars: Vec<(String, String, f64, f64)> = data
        .as_array()
        .expect("exemplar series")
        .iter()
        .flat_map(|series| {
            let stage = series["seriesLabels"]["stage"]
                .as_str()
                .unwrap_or("")
                .to_string();
            series["exemplars"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |e| {
                    (
                        stage.clone(),
                        e["labels"]["trace_id"].as_str().unwrap_or("").to_string(),
                        e["value"]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(f64::NAN),
                        e["timestamp"].as_f64().unwrap_or(0.0),
                    )
                })
        })
        .collect();
    let stages: BTreeSet<&str> = exemplars.iter().map(|e| e.0.as_str()).collect();
    eprintln!(
        "{} exemplars in Prometheus, of stages {stages:?}",
        exemplars.len()
    );
    assert!(stages.len() >= 3, "exemplars of {stages:?}: {data}");
    // The newest first: the daemon keeps the newest 2,000 timelines and every one its current
    // exemplars name; one Prometheus scraped before a newer sample took its bucket may be gone.
    exemplars.sort_by(|a, b| b.3.total_cmp(&a.3));
    let mut found = 0;
    let mut gone = Vec::new();
    for (stage, id, value, _) in exemplars.iter().take(10) {
        assert_eq!(id.len(), 16, "trace id {id:?}");
        let (_, t) = d.get(&format!("/timelines?trace_id={id}"), false).unwrap();
        let Ok(t) = serde_json::from_str::<serde_json::Value>(&t) else {
            gone.push(format!("{stage} {id}: {t}"));
            continue;
        };
        let step = t["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage.as_str())
            .unwrap_or_else(|| panic!("trace {id} has no {stage}: {t}"));
        assert!(
            (step["us"].as_f64().unwrap() - value * 1e6).abs() < 0.01,
            "trace {id}: {step} against the exemplar's {value} s"
        );
        found += 1;
    }
    assert!(
        found >= 8,
        "{found} of the 10 newest exemplars' timelines kept: {gone:?}"
    );
}

/// Grafana's provisioning files: version 1, a Prometheus data source (the dashboard picks
/// any through its `datasource` variable, of that type), a file provider for the dashboard.
#[test]
fn grafana_provisioning_files_name_a_prometheus_and_a_dashboard_folder() {
    let p = dashboards().join("provisioning");
    let ds = yaml(&p.join("datasources/iopath.yml"));
    assert_eq!(ds["apiVersion"], 1);
    assert_eq!(ds["datasources"][0]["type"], "prometheus", "{ds}");
    assert!(
        ds["datasources"][0]["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http"))
    );
    let text = std::fs::read_to_string(dashboards().join("grafana-iopath.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let var = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(var["query"], "prometheus");
    let prov = yaml(&p.join("dashboards/iopath.yml"));
    assert_eq!(prov["apiVersion"], 1);
    let provider = &prov["providers"][0];
    assert_eq!(provider["type"], "file", "{prov}");
    assert!(
        provider["options"]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with('/')),
        "{prov}"
    );
}
