//! `iopath report`: a capture's paths as waterfalls, each stage's p50 and p99 laid end to end
//! so that the bars add up to their sum, and each stage's histogram merged over its series.
//! The terminal tables are here; the HTML page is `html`.
//!
//! A waterfall's total is a sum of per-stage quantiles, not the path's own quantile: the
//! capture's timelines are a sample of its I/Os, and a stage counts its own events (a kick can carry
//! several packets, an interrupt several completions). It is what each stage adds at that
//! quantile, which is the question the page answers.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::{
    capture::{self, Row, printable},
    hist::{Series, Summary},
    report::us,
};

/// Stages that follow one another for one I/O, in order. kvm.inject_to_entry ends the
/// sequences whose I/O completes with an interrupt: its series of injections made inside a
/// passed-through device's handler (a `device` label) end the passthrough one, the others the
/// paravirtual ones.
pub struct Sequence {
    pub id: &'static str,
    pub title: &'static str,
    /// The path whose section shows it.
    pub path: &'static str,
    pub stages: &'static [&'static str],
    pub passthrough: bool,
}

pub const SEQUENCES: [Sequence; 4] = [
    Sequence {
        id: "disk-request",
        title: "disk request (paravirtual)",
        path: "block",
        stages: &[
            "blk.kick_to_submit",
            "blk.device",
            "blk.complete_to_irq",
            "kvm.inject_to_entry",
        ],
        passthrough: false,
    },
    Sequence {
        id: "net-receive",
        title: "network receive (paravirtual)",
        path: "net",
        stages: &[
            "net.rx.host_stack",
            "net.rx.backend_queue",
            "net.rx.backend_to_irq",
            "kvm.inject_to_entry",
        ],
        passthrough: false,
    },
    Sequence {
        id: "net-transmit",
        title: "network transmit (paravirtual)",
        path: "net",
        stages: &["net.tx.kick", "net.tx.backend_to_wire", "net.tx.host_stack"],
        passthrough: false,
    },
    Sequence {
        id: "passthrough-interrupt",
        title: "passthrough interrupt (VFIO)",
        path: "vfio",
        stages: &["vfio.handler_to_inject", "kvm.inject_to_entry"],
        passthrough: true,
    },
];

/// The order of the page's path sections: the I/O paths, then KVM's own stages.
pub const PATHS: [&str; 4] = ["block", "net", "vfio", "kvm"];

/// One stage of a waterfall: its merged quantiles and where its bars start.
#[derive(Debug, Serialize)]
pub struct Step {
    pub stage: &'static str,
    pub series: usize,
    #[serde(flatten)]
    pub summary: Summary,
    pub p50_start_us: f64,
    pub p99_start_us: f64,
    /// What the stage's series hold beyond this path's own I/O, if anything.
    pub note: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct Waterfall {
    pub id: &'static str,
    pub title: &'static str,
    pub path: &'static str,
    pub steps: Vec<Step>,
    /// Stages of the sequence with no events in the capture: the sums lack them.
    pub not_measured: Vec<&'static str>,
    pub p50_total_us: f64,
    pub p99_total_us: f64,
    /// What the figures leave out (posted vectors, whose interrupts have no host event).
    pub notes: Vec<String>,
}

/// One bucket of the kernel's layout: (lower, upper] in ns (upper None: the overflow).
#[derive(Debug, Serialize)]
pub struct Bucket {
    pub lo_ns: u64,
    pub hi_ns: Option<u64>,
    pub events: u64,
}

/// One stage merged over its series: its quantiles and its non-empty buckets.
#[derive(Debug, Serialize)]
pub struct StageHist {
    pub stage: String,
    pub series: usize,
    #[serde(flatten)]
    pub summary: Summary,
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Serialize)]
pub struct PathStages {
    pub path: String,
    pub stages: Vec<StageHist>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// The capture's `meta` (absent from captures of an older iopath: null).
    pub meta: Value,
    pub vm: Option<String>,
    pub waterfalls: Vec<Waterfall>,
    pub paths: Vec<PathStages>,
    /// (stage, why) of the stages that did not attach or were off.
    pub unavailable: Vec<(String, String)>,
    /// (stage, reason, events) dropped while recording.
    pub dropped: Vec<(String, String, u64)>,
    /// Lines on the backends' CPU per I/O and the rate one thread could sustain.
    pub ceilings: Vec<String>,
    /// The capture's sampled timelines (of `vm` when given), slowest first.
    pub timelines: Vec<crate::timeline::Shown>,
}

fn buckets(s: &Series) -> Vec<Bucket> {
    use tracer_common::hist::{lower_bound_ns, upper_bound_ns};
    s.buckets
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| Bucket {
            lo_ns: lower_bound_ns(i as u16),
            hi_ns: upper_bound_ns(i as u16),
            events: *n,
        })
        .collect()
}

/// What kvm.inject_to_entry holds in a sequence: it ends every injection of the VM, not one
/// path's, and only the `device` label tells a passed-through device's from the others.
const SHARED_PARAVIRTUAL: &str = "shared: every injection of these VMs that no passed-through \
    device's handler made (network and disk alike), not this path's alone";
const SHARED_UNLABELLED: &str = "shared: every injection of these VMs (a capture without the \
    device label cannot tell a passed-through device's apart)";
const SHARED_PASSTHROUGH: &str = "the injections made in the passed-through devices' handlers";

fn waterfall(seq: &Sequence, rows: &[Row], capture: &Value) -> Option<Waterfall> {
    // A capture of an iopath before kvm.inject_to_entry's device label: its injections cannot
    // be split, and go to the paravirtual sequences (marked), none to the passthrough one.
    let unlabelled = rows
        .iter()
        .any(|r| r.stage == "kvm.inject_to_entry" && r.label("device").is_none());
    let keep = |stage: &str, r: &Row| match stage {
        // the VMs' requests: the host's own I/O is in no guest's path
        "blk.device" if !seq.passthrough => r.label("vm").is_some_and(|v| !v.is_empty()),
        "kvm.inject_to_entry" if unlabelled => !seq.passthrough,
        "kvm.inject_to_entry" => {
            r.label("device").is_some_and(|d| !d.is_empty()) == seq.passthrough
        }
        _ => true,
    };
    let (mut p50, mut p99) = (0.0, 0.0);
    let mut steps = Vec::new();
    let mut not_measured = Vec::new();
    for &stage in seq.stages {
        let Some((series, merged)) = capture::merged(rows, stage, |r| keep(stage, r)) else {
            not_measured.push(stage);
            continue;
        };
        let summary = merged.summary();
        let note = (stage == "kvm.inject_to_entry").then_some(match () {
            () if seq.passthrough => SHARED_PASSTHROUGH,
            () if unlabelled => SHARED_UNLABELLED,
            () => SHARED_PARAVIRTUAL,
        });
        steps.push(Step {
            stage,
            series,
            p50_start_us: p50,
            p99_start_us: p99,
            summary: summary.clone(),
            note,
        });
        p50 += summary.p50_us;
        p99 += summary.p99_us;
    }
    // Posted vectors: their interrupts reach a running vCPU with no host event at all.
    let mut notes = Vec::new();
    if seq.passthrough {
        let vms: Vec<&str> = rows.iter().filter_map(|r| r.label("vm")).collect();
        for d in capture["vfio_devices"].as_array().into_iter().flatten() {
            let vectors: Vec<&str> = d["posted_vectors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if vectors.is_empty() || !vms.contains(&d["vm"].as_str().unwrap_or_default()) {
                continue;
            }
            notes.push(format!(
                "device {} (vm {}): vectors {} are posted to the vCPU, with no host event while \
                 it runs: not in these figures",
                printable(d["device"].as_str().unwrap_or_default()),
                printable(d["vm"].as_str().unwrap_or_default()),
                vectors
                    .iter()
                    .map(|v| printable(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    // A sequence with no stage of its own (kvm.inject_to_entry alone) is no path's.
    let own = steps.iter().any(|s| s.stage != "kvm.inject_to_entry");
    own.then_some(Waterfall {
        id: seq.id,
        title: seq.title,
        path: seq.path,
        steps,
        not_measured,
        p50_total_us: p50,
        p99_total_us: p99,
        notes,
    })
}

/// The rows of `vm`: its own series and the host stacks of its taps.
fn of_vm<'a>(rows: Vec<Row<'a>>, vm: &str) -> Vec<Row<'a>> {
    let taps = capture::taps_of(&rows, vm);
    rows.into_iter()
        .filter(|r| {
            r.label("vm") == Some(vm)
                || (r.stage.ends_with("host_stack")
                    && r.label("tap").is_some_and(|t| taps.iter().any(|v| v == t)))
        })
        .collect()
}

/// The report of a capture, of one VM's series when `vm` is given.
pub fn report(capture: &Value, vm: Option<&str>) -> Result<Report, capture::Error> {
    let mut rows = capture::rows(capture)?;
    if let Some(vm) = vm {
        capture::has_vm(&rows, vm)?;
        rows = of_vm(rows, vm);
    }
    let waterfalls = SEQUENCES
        .iter()
        .filter_map(|s| waterfall(s, &rows, capture))
        .collect();
    // Stages in the order an I/O crosses them (the sequences), then the table's, then any the
    // table does not know (a newer capture).
    let mut order: Vec<(&str, &str)> = Vec::new();
    let in_sequences = SEQUENCES.iter().flat_map(|q| q.stages.iter().copied());
    let table = crate::stages::STAGES.iter().map(|s| s.name);
    for name in in_sequences.chain(table) {
        if let Some(s) = crate::stages::STAGES.iter().find(|s| s.name == name)
            && !order.iter().any(|(_, o)| *o == name)
        {
            order.push((s.path.name(), s.name));
        }
    }
    for r in &rows {
        if !order.iter().any(|(_, s)| *s == r.stage) {
            order.push((r.path, r.stage));
        }
    }
    let mut paths: Vec<PathStages> = Vec::new();
    let known_paths = PATHS.iter().copied();
    let other_paths = order.iter().map(|(p, _)| *p).filter(|p| !PATHS.contains(p));
    for path in known_paths.chain(other_paths) {
        if paths.iter().any(|p| p.path == path) {
            continue;
        }
        let stages: Vec<StageHist> = order
            .iter()
            .filter(|(p, _)| *p == path)
            .filter_map(|(_, stage)| {
                let (series, merged) = capture::merged(&rows, stage, |_| true)?;
                Some(StageHist {
                    stage: stage.to_string(),
                    series,
                    summary: merged.summary(),
                    buckets: buckets(&merged),
                })
            })
            .collect();
        if !stages.is_empty() {
            paths.push(PathStages {
                path: path.to_string(),
                stages,
            });
        }
    }
    let unavailable = capture["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["attached"].as_bool() == Some(false))
        .map(|s| {
            let why = s["skipped"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ");
            let state = if s["opt_in_off"].as_bool() == Some(true) {
                "off"
            } else {
                "unavailable"
            };
            (
                s["stage"].as_str().unwrap_or_default().to_string(),
                format!("{state}: {why}"),
            )
        })
        .collect();
    let dropped = capture["dropped"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                d["stage"].as_str().unwrap_or_default().to_string(),
                d["reason"].as_str().unwrap_or_default().to_string(),
                d["events"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    Ok(Report {
        meta: capture["meta"].clone(),
        vm: vm.map(str::to_string),
        waterfalls,
        paths,
        unavailable,
        dropped,
        ceilings: ceilings(capture, vm),
        timelines: timelines(capture, vm),
    })
}

/// The capture's timelines (none in an older capture), those with a step of `vm` when given.
fn timelines(capture: &Value, vm: Option<&str>) -> Vec<crate::timeline::Shown> {
    let all: Vec<crate::timeline::Shown> =
        serde_json::from_value(capture["timelines"].clone()).unwrap_or_default();
    all.into_iter()
        .filter(|t| {
            vm.is_none_or(|vm| {
                t.steps
                    .iter()
                    .any(|s| s.labels.get("vm").and_then(|v| v.as_str()) == Some(vm))
            })
        })
        .collect()
}

/// The capture's backend costs as sentences (`record`'s), of `vm`'s backends only when given.
fn ceilings(capture: &Value, vm: Option<&str>) -> Vec<String> {
    [("backends", false), ("disk_backends", true)]
        .into_iter()
        .flat_map(|(section, disk)| {
            capture[section]
                .as_array()
                .into_iter()
                .flatten()
                .filter(move |b| vm.is_none_or(|vm| b["labels"]["vm"].as_str() == Some(vm)))
                .map(move |b| crate::report::ceiling_line(disk, b))
        })
        .collect()
}

/// One line on what the capture is of, from its `meta`.
pub fn describe(meta: &Value) -> String {
    let Some(m) = meta.as_object() else {
        return "a capture without its recording's details (an older iopath)".into();
    };
    let started = m
        .get("started_unix")
        .and_then(Value::as_f64)
        .map(|t| utc(t as i64))
        .unwrap_or_default();
    format!(
        "{:.1} s recorded from {started} on host {:?} (Linux {}) by iopath {}",
        m.get("duration_s").and_then(Value::as_f64).unwrap_or(0.0),
        m.get("host").and_then(Value::as_str).unwrap_or_default(),
        m.get("kernel").and_then(Value::as_str).unwrap_or_default(),
        m.get("iopath").and_then(Value::as_str).unwrap_or_default(),
    )
}

/// `secs` since the epoch as `YYYY-MM-DD HH:MM:SS UTC` (days to a civil date: H. Hinnant's
/// algorithm; no time zone database needed).
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The report as terminal tables.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", printable(&describe(&r.meta)));
    if let Some(vm) = &r.vm {
        let _ = writeln!(out, "vm {vm:?} only");
    }
    let _ = writeln!(
        out,
        "\nWaterfalls: each stage's p50 and p99 from where the previous one's ends (µs unless \
         marked ms). A total is a sum of stage quantiles, not the path's own quantile."
    );
    if r.waterfalls.is_empty() {
        out.push_str("(no VM's path had events; the host's own I/O is in the stages below)\n");
    }
    for w in &r.waterfalls {
        let _ = writeln!(
            out,
            "\n{}\n  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9}",
            w.title, "STAGE", "EVENTS", "P50 FROM", "P50", "P99 FROM", "P99"
        );
        for s in &w.steps {
            let _ = writeln!(
                out,
                "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9}{}",
                s.stage,
                s.summary.count,
                us(s.p50_start_us),
                us(s.summary.p50_us),
                us(s.p99_start_us),
                us(s.summary.p99_us),
                s.note.map_or(String::new(), |n| format!("  ({n})")),
            );
        }
        let _ = writeln!(
            out,
            "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "total",
            "",
            "",
            us(w.p50_total_us),
            "",
            us(w.p99_total_us)
        );
        if !w.not_measured.is_empty() {
            let _ = writeln!(out, "  not measured: {}", w.not_measured.join(", "));
        }
        for n in &w.notes {
            let _ = writeln!(out, "  {n}");
        }
    }
    let _ = writeln!(
        out,
        "\nStages, each merged over its series (µs unless marked ms; MAX is the upper bound of \
         the highest bucket)\n  {:<6} {:<22} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "PATH", "STAGE", "SERIES", "EVENTS", "MEAN", "P50", "P99", "P99.9", "MAX"
    );
    for p in &r.paths {
        for s in &p.stages {
            let m = &s.summary;
            let _ = writeln!(
                out,
                "  {:<6} {:<22} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                printable(&p.path),
                printable(&s.stage),
                s.series,
                m.count,
                us(m.mean_us),
                us(m.p50_us),
                us(m.p99_us),
                us(m.p999_us),
                us(m.max_us)
            );
        }
    }
    if r.paths.is_empty() {
        out.push_str("  (no events)\n");
    }
    for c in &r.ceilings {
        let _ = writeln!(out, "{c}");
    }
    for (stage, why) in &r.unavailable {
        let _ = writeln!(out, "{}: {}", printable(stage), printable(why));
    }
    for (stage, reason, n) in &r.dropped {
        let _ = writeln!(
            out,
            "dropped: {} {} {n}",
            printable(stage),
            printable(reason)
        );
    }
    if !r.timelines.is_empty() {
        let _ = writeln!(out, "\nSampled I/Os, the slowest, stage by stage:");
        out.push_str(&crate::timeline::table(&r.timelines));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::hist::{bucket_index, lower_bound_ns};

    /// A capture written by hand: `n` events of `ns` each per series.
    fn series(stage: &str, path: &str, labels: Value, n: u64, ns: u64) -> Value {
        let lo = lower_bound_ns(bucket_index(ns));
        serde_json::json!({
            "stage": stage, "path": path, "labels": labels,
            "buckets": [[lo, n]], "sum_ns": n * ns,
        })
    }

    fn capture() -> Value {
        let vm = |vm: &str| serde_json::json!({"vm": vm, "device": "", "op": "read"});
        serde_json::json!({"series": [
            series("blk.kick_to_submit", "block", vm("db"), 10, 20_000),
            series("blk.device", "block", vm("db"), 10, 1_000_000),
            series("blk.device", "block", vm(""), 90, 50_000),
            series("blk.complete_to_irq", "block", vm("db"), 10, 30_000),
            series("kvm.inject_to_entry", "kvm", serde_json::json!({"vm": "db", "device": ""}), 10, 5_000),
            series("kvm.inject_to_entry", "kvm", serde_json::json!({"vm": "db", "device": "0000:00:06.0"}), 4, 9_000_000),
            series("kvm.exit", "kvm", serde_json::json!({"vm": "web"}), 3, 2_000),
        ]})
    }

    #[test]
    fn a_waterfall_lays_each_stage_where_the_previous_ends() {
        let r = report(&capture(), None).unwrap();
        assert_eq!(r.waterfalls.len(), 1, "{r:?}");
        let w = &r.waterfalls[0];
        assert_eq!(w.id, "disk-request");
        let stages: Vec<&str> = w.steps.iter().map(|s| s.stage).collect();
        assert_eq!(
            stages,
            [
                "blk.kick_to_submit",
                "blk.device",
                "blk.complete_to_irq",
                "kvm.inject_to_entry"
            ]
        );
        // the host's own blk.device (90 events) is not the VM's path; the passthrough
        // device's injections are not the paravirtual one's
        assert_eq!(w.steps[1].summary.count, 10);
        assert_eq!(w.steps[3].summary.count, 10);
        for i in 1..w.steps.len() {
            let (a, b) = (&w.steps[i - 1], &w.steps[i]);
            assert_eq!(b.p50_start_us, a.p50_start_us + a.summary.p50_us);
            assert_eq!(b.p99_start_us, a.p99_start_us + a.summary.p99_us);
        }
        let last = w.steps.last().unwrap();
        assert_eq!(w.p50_total_us, last.p50_start_us + last.summary.p50_us);
        // each bucket is within 9.3% of its value: the sum of 20 + 1000 + 30 + 5 µs
        assert!(
            (w.p50_total_us - 1055.0).abs() < 1055.0 / 8.0,
            "{}",
            w.p50_total_us
        );
        assert!(w.not_measured.is_empty());
    }

    #[test]
    fn stage_sections_merge_every_series_in_path_order() {
        let r = report(&capture(), None).unwrap();
        let paths: Vec<&str> = r.paths.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["block", "kvm"]);
        // in the order an I/O crosses them
        let block: Vec<&str> = r.paths[0].stages.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(
            block,
            ["blk.kick_to_submit", "blk.device", "blk.complete_to_irq"]
        );
        let device = &r.paths[0].stages[1];
        assert_eq!((device.series, device.summary.count), (2, 100));
        assert_eq!(device.buckets.iter().map(|b| b.events).sum::<u64>(), 100);
        let text = table(&r);
        assert!(text.contains("disk request (paravirtual)"), "{text}");
        assert!(text.contains("an older iopath"), "{text}");
    }

    #[test]
    fn the_injections_bar_says_it_is_shared_and_posted_vectors_are_named() {
        let mut c = capture();
        c["vfio_devices"] = serde_json::json!([
            {"device": "0000:00:06.0", "vm": "db", "posted_vectors": ["0", "1"]},
            {"device": "0000:00:07.0", "vm": "db", "posted_vectors": []},
        ]);
        c["series"].as_array_mut().unwrap().push(series(
            "vfio.handler_to_inject",
            "vfio",
            serde_json::json!({"vm": "db", "device": "0000:00:06.0", "vector": "2"}),
            4,
            30_000,
        ));
        let r = report(&c, None).unwrap();
        let disk = &r.waterfalls[0];
        assert_eq!(disk.steps[3].note, Some(SHARED_PARAVIRTUAL));
        let pt = r
            .waterfalls
            .iter()
            .find(|w| w.id == "passthrough-interrupt")
            .unwrap();
        assert_eq!(pt.steps[1].summary.count, 4);
        assert_eq!(pt.steps[1].note, Some(SHARED_PASSTHROUGH));
        assert_eq!(pt.notes.len(), 1, "{:?}", pt.notes);
        assert!(pt.notes[0].starts_with("device 0000:00:06.0 (vm db): vectors 0, 1 are posted"));
        // a capture without the label: every injection goes to the paravirtual bar, marked
        for s in c["series"].as_array_mut().unwrap() {
            if s["stage"] == "kvm.inject_to_entry" {
                s["labels"].as_object_mut().unwrap().remove("device");
            }
        }
        let r = report(&c, None).unwrap();
        assert_eq!(r.waterfalls[0].steps[3].summary.count, 14);
        assert_eq!(r.waterfalls[0].steps[3].note, Some(SHARED_UNLABELLED));
        let pt = r
            .waterfalls
            .iter()
            .find(|w| w.id == "passthrough-interrupt")
            .unwrap();
        assert_eq!(pt.not_measured, ["kvm.inject_to_entry"]);
    }

    #[test]
    fn terminal_text_carries_no_control_characters() {
        assert_eq!(printable("db\x1b[2J"), "db\\u{1b}[2J");
        let mut c = capture();
        c["disk_backends"] = serde_json::json!([{"labels": {"vm": "a\x1b]0;x\x07"},
            "requests": 5, "cpu_per_request_us": 10.0, "ceiling_iops": 1e5}]);
        let text = table(&report(&c, None).unwrap());
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text}");
        assert!(
            text.contains("one such thread could sustain 100000 IOPS"),
            "{text}"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_950_245), "2026-11-29 11:04:05 UTC");
    }

    #[test]
    fn one_vm_keeps_its_series_and_an_unknown_one_is_refused() {
        let r = report(&capture(), Some("web")).unwrap();
        assert!(r.waterfalls.is_empty());
        assert_eq!(r.paths.len(), 1);
        assert_eq!(r.paths[0].stages[0].stage, "kvm.exit");
        let e = report(&capture(), Some("nope")).unwrap_err().to_string();
        assert_eq!(
            e,
            "no series of vm \"nope\" in the capture (vms in it: db, web)"
        );
    }
}
