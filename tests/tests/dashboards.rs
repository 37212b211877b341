//! The shipped Prometheus and Grafana files: valid for promtool, and every metric and label they
//! query is one iopath exports (no root needed).

use std::{collections::BTreeSet, path::Path, process::Command};

fn dashboards() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards"))
}

const METRICS: &[&str] = &[
    "iopath_stage_latency_seconds_bucket",
    "iopath_stage_latency_seconds_count",
    "iopath_stage_latency_seconds_sum",
    "iopath_stage_attached",
    "iopath_events_dropped_total",
    "iopath_program_run_time_seconds_total",
    "iopath_program_run_count_total",
    "iopath_bpf_stats_enabled",
    "iopath_series",
    "iopath_vms",
    "iopath_kernel_map_entries",
];
const LABELS: &[&str] = &[
    "le", "stage", "path", "vm", "vcpu", "device", "disk", "op", "reason", "attach", "program",
    "instance", "signal", "inject", "wait", "map",
];

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
        let (metrics, labels) = names_in(e);
        assert!(!metrics.is_empty(), "{e} queries no iopath metric");
        for m in metrics {
            assert!(METRICS.contains(&m.as_str()), "{e}: {m} is not exported");
        }
        for l in labels {
            assert!(
                LABELS.contains(&l.as_str()),
                "{e}: label {l} is not exported"
            );
        }
    }
}
