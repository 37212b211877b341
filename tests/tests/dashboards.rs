//! The shipped Prometheus and Grafana files: valid for promtool, and every metric and label they
//! query is one a live iopath exports, read from a scrape of a daemon that saw block I/O and
//! every kind of KVM event the test VMM makes.

use std::{collections::BTreeSet, path::Path, process::Command};

use iopath_tests::{Daemon, LoopDev, Vmm, kvm_available};

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

#[test]
fn dashboard_queries_use_exported_metrics_and_labels() {
    if !kvm_available("dashboard_queries_use_exported_metrics_and_labels") {
        return;
    }
    let lo = LoopDev::new("dash", 16);
    // Every stage, the opt-in ones too: the dashboards show them all.
    let d = Daemon::start(&["--bpf-stats", "--syscall-tracepoints"]);
    lo.direct_io(20, 20);
    for (name, args) in [
        ("dash-exits", &["pio", "--count", "20"][..]),
        (
            "dash-irqfd",
            &["irqfd-gsi", "--count", "20", "--gap-us", "300"],
        ),
        ("dash-halt", &["halt", "--count", "5", "--spin-us", "500"]),
    ] {
        Vmm::run(name, args, 300).wait();
    }
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
    let text = std::fs::read_to_string(dashboards().join("grafana-iopath.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs: Vec<String> = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs.push(q.to_string());
        }
    }
    let rules = std::fs::read_to_string(dashboards().join("iopath-rules.yml")).unwrap();
    exprs.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr: "))
            .map(String::from),
    );
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
