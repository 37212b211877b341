//! Quantile reports of a session: the table `iopath record` prints, its JSON, and `/quantiles`.
//! Quantiles come from the kernel's full-resolution buckets (within 9.3% of a bucket's lower
//! bound), not from the coarser exported layout.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{hist::Summary, session::Session};

#[derive(Serialize)]
struct Row {
    stage: &'static str,
    path: &'static str,
    labels: serde_json::Map<String, serde_json::Value>,
    #[serde(flatten)]
    summary: Summary,
    sum_ns: u64,
    /// Non-empty kernel buckets as [lower bound in ns, events]: a reader of the capture
    /// (`iopath compare`) merges series exactly from them.
    buckets: Vec<(u64, u64)>,
}

fn rows(s: &mut Session) -> Vec<Row> {
    s.summaries()
        .into_iter()
        .map(|(l, summary)| Row {
            stage: l.stage.name,
            path: l.stage.path.name(),
            sum_ns: l.series.sum_ns,
            buckets: l.series.sparse(),
            labels: l
                .labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect(),
            summary,
        })
        .collect()
}

/// Dropped events since the session started, by stage and reason (non-zero only).
fn dropped(s: &Session) -> Vec<serde_json::Value> {
    s.dropped_since_start()
        .into_iter()
        .filter(|(_, _, n)| *n > 0)
        .map(
            |(stage, reason, n)| serde_json::json!({"stage": stage, "reason": reason, "events": n}),
        )
        .collect()
}

/// Labels as a JSON object.
fn labels_json(labels: Vec<(&'static str, String)>) -> serde_json::Map<String, serde_json::Value> {
    labels
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect()
}

/// A row's JSON labels as `k="v" ...` for the table.
fn labels_text(row: &serde_json::Value) -> String {
    row["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{}={v}", crate::capture::printable(k)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One backend's cost as a sentence, from its entry in a capture's `backends` (network) or
/// `disk_backends` (`disk`); label values are printed as JSON strings (control characters
/// escaped).
pub(crate) fn ceiling_line(disk: bool, b: &serde_json::Value) -> String {
    let labels = labels_text(b);
    if disk {
        format!(
            "disk backend {labels}: {:.1} µs of CPU per request over {} requests: one such \
             thread could sustain {:.0} IOPS",
            b["cpu_per_request_us"].as_f64().unwrap_or(0.0),
            b["requests"],
            b["ceiling_iops"].as_f64().unwrap_or(0.0)
        )
    } else {
        format!(
            "backend {labels}: {:.1} µs of CPU per packet over {} packets: one such thread \
             could move {:.0} packets/s",
            b["cpu_per_packet_us"].as_f64().unwrap_or(0.0),
            b["packets"],
            b["ceiling_pps"].as_f64().unwrap_or(0.0)
        )
    }
}

/// What each network backend's threads cost per packet, and the packets per second one such
/// thread could move at that cost (`backend`), for the backends that moved any.
fn backends(s: &mut Session) -> Vec<serde_json::Value> {
    let costs: Vec<_> = s.backends.costs().map(|(k, c)| (*k, *c)).collect();
    costs
        .into_iter()
        .filter(|(_, c)| c.done > 0 && c.cpu_ns > 0)
        .map(|(k, c)| {
            let labels = labels_json(s.labeler.backend(k.vm, k.backend, k.tap));
            let per_packet_us = c.cpu_ns as f64 / 1e3 / c.done as f64;
            serde_json::json!({
                "labels": labels, "packets": c.done, "cpu_s": c.cpu_ns as f64 / 1e9,
                "cpu_per_packet_us": per_packet_us, "ceiling_pps": 1e6 / per_packet_us,
            })
        })
        .collect()
}

/// What the threads that submit each VM's requests to each disk cost per request, and the IOPS
/// one such thread could sustain at that cost (`backend`), for the disks that served any.
fn disk_backends(s: &mut Session) -> Vec<serde_json::Value> {
    let costs: Vec<_> = s.disks.costs().map(|(k, c)| (*k, *c)).collect();
    costs
        .into_iter()
        .filter(|(_, c)| c.done > 0 && c.cpu_ns > 0)
        .map(|(k, c)| {
            let labels = labels_json(s.labeler.disk_backend(k.vm, k.dev));
            let per_request_us = c.cpu_ns as f64 / 1e3 / c.done as f64;
            serde_json::json!({
                "labels": labels, "requests": c.done, "cpu_s": c.cpu_ns as f64 / 1e9,
                "cpu_per_request_us": per_request_us, "ceiling_iops": 1e6 / per_request_us,
            })
        })
        .collect()
}

/// The synchronous-write view: per VM, disk and op (flush, fua), the host-side time of a
/// guest's flush or FUA write split by means into the backend's part (blk.kick_to_submit), the
/// host block layer's (blk.sync: the device and the flush machinery) and the interrupt's
/// delivery (blk.complete_to_irq), with blk.sync's quantiles. A part not measured counts 0 and
/// is named.
fn sync_writes(rows: &[Row]) -> Vec<serde_json::Value> {
    let find = |stage: &str, labels: &serde_json::Map<String, serde_json::Value>| {
        rows.iter()
            .find(|r| r.stage == stage && &r.labels == labels)
            .map(|r| &r.summary)
    };
    rows.iter()
        .filter(|r| r.stage == "blk.sync" && r.summary.count > 0)
        .map(|r| {
            let parts = [
                ("backend", find("blk.kick_to_submit", &r.labels)),
                ("device", Some(&r.summary)),
                ("interrupt", find("blk.complete_to_irq", &r.labels)),
            ];
            let total: f64 = parts.iter().filter_map(|(_, m)| m.map(|m| m.mean_us)).sum();
            let share = |m: Option<&Summary>| {
                m.map_or(0.0, |m| if total > 0.0 { m.mean_us / total } else { 0.0 })
            };
            let missing: Vec<&str> = parts
                .iter()
                .filter(|(_, m)| m.is_none())
                .map(|(n, _)| *n)
                .collect();
            serde_json::json!({
                "labels": r.labels, "requests": r.summary.count,
                "host_p50_us": r.summary.p50_us, "host_p99_us": r.summary.p99_us,
                "mean_us": total,
                "share_backend": share(parts[0].1), "share_device": share(parts[1].1),
                "share_interrupt": share(parts[2].1), "not_measured": missing,
            })
        })
        .collect()
}

/// The PCI devices the vfio stages saw or KVM posts interrupts of (`posted`: labels and
/// whether posted now), with their class (`/sys/bus/pci/devices/BDF/class`), the kind of I/O
/// it stands for (what `iopath compare` puts each device under) and the vectors KVM posts to
/// a vCPU or keeps remapped, as the last kvm:kvm_pi_irte_update iopath saw said.
fn vfio_devices(
    rows: &[Row],
    posted: &[(Vec<(&'static str, String)>, bool)],
) -> Vec<serde_json::Value> {
    let seen = rows
        .iter()
        .filter(|r| r.path == "vfio")
        .filter_map(|r| {
            Some((
                r.labels.get("device")?.as_str()?.to_string(),
                r.labels.get("vm")?.as_str()?.to_string(),
            ))
        })
        .collect();
    vfio_devices_of(seen, posted, |device| {
        std::fs::read_to_string(format!("/sys/bus/pci/devices/{device}/class"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default()
    })
}

/// [`vfio_devices`] from the (device, vm) pairs the series name, the IRQs' posted states and
/// each device's PCI class.
pub(crate) fn vfio_devices_of(
    mut devices: std::collections::BTreeSet<(String, String)>,
    posted: &[(Vec<(&'static str, String)>, bool)],
    class_of: impl Fn(&str) -> String,
) -> Vec<serde_json::Value> {
    let label = |l: &[(&'static str, String)], k: &str| {
        l.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    devices.extend(
        posted
            .iter()
            .map(|(l, _)| (label(l, "device"), label(l, "vm"))),
    );
    devices
        .into_iter()
        .map(|(device, vm)| {
            let class = class_of(&device);
            let vectors = |want: bool| -> Vec<String> {
                posted
                    .iter()
                    .filter(|(l, p)| *p == want && label(l, "device") == device)
                    .map(|(l, _)| label(l, "vector"))
                    .collect()
            };
            serde_json::json!({
                "device": device, "vm": vm, "class": class, "kind": pci_kind(&class),
                "posted_vectors": vectors(true), "remapped_vectors": vectors(false),
            })
        })
        .collect()
}

/// The kind of I/O of a PCI class code (`0x020000`): its base class, network (0x02) or
/// storage (0x01); anything else is `other`.
pub fn pci_kind(class: &str) -> &'static str {
    let base = class
        .strip_prefix("0x")
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .map(|c| c >> 16);
    match base {
        Some(0x01) => "disk",
        Some(0x02) => "network",
        _ => "other",
    }
}

/// This host's posted-interrupt events (PIN, PIW) since the session started, by kind.
fn posted_host_events(s: &Session) -> serde_json::Map<String, serde_json::Value> {
    let now = crate::vfio_irqs::posted_host_events(
        &std::fs::read_to_string("/proc/interrupts").unwrap_or_default(),
    );
    events_since(&s.posted_events_base, &now)
}

/// Events by kind between two readings (a kind the first lacks counts from 0).
pub(crate) fn events_since(
    base: &[(&'static str, u64)],
    now: &[(&'static str, u64)],
) -> serde_json::Map<String, serde_json::Value> {
    now.iter()
        .map(|(kind, n)| {
            let b = base.iter().find(|(k, _)| k == kind).map_or(0, |b| b.1);
            (kind.to_string(), n.saturating_sub(b).into())
        })
        .collect()
}

/// What the capture is of: when, how long, where, by which iopath (`iopath report`'s header).
fn meta(s: &Session) -> serde_json::Value {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    serde_json::json!({
        "iopath": env!("CARGO_PKG_VERSION"),
        "host": read("/proc/sys/kernel/hostname"),
        "kernel": read("/proc/sys/kernel/osrelease"),
        "started_unix": unix(s.started),
        "duration_s": unix(std::time::SystemTime::now()) - unix(s.started),
    })
}

/// Timelines a capture keeps, and the table prints, the slowest.
const TIMELINES_KEPT: usize = 20;
const TIMELINES_PRINTED: usize = 5;

pub fn json(s: &mut Session) -> String {
    let series = rows(s);
    let out = serde_json::json!({
        "meta": meta(s),
        "vfio_devices": vfio_devices(&series, &s.posted_irqs()),
        "posted_interrupts": crate::posted::this_host(),
        "posted_host_events": posted_host_events(s),
        "stages": s.tracer.report,
        "sync_writes": sync_writes(&series),
        "series": series,
        "backends": backends(s),
        "disk_backends": disk_backends(s),
        "dropped": dropped(s),
        // exited VMs and removed disks collected while it ran (their series stay in a record)
        "collected": s.collected,
        // the slowest sampled I/Os, stage by stage (`timeline`)
        "timelines": s.slowest_timelines(TIMELINES_KEPT),
        "timeline_samples": s.timelines.samples,
        "timeline_ambiguous": s.timelines.ambiguous,
    });
    serde_json::to_string_pretty(&out).expect("serializable") + "\n"
}

/// A latency in µs for the table: µs with one decimal below 10 ms, then ms with a unit.
pub(crate) fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}ms", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

pub fn table(s: &mut Session) -> String {
    let rows = rows(s);
    let mut out = String::new();
    let label_text = |r: &Row| {
        r.labels
            .iter()
            .filter(|(_, v)| v.as_str().is_some_and(|v| !v.is_empty()))
            .map(|(k, v)| format!("{k}={:?}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let stage_w = rows.iter().map(|r| r.stage.len()).max().unwrap_or(5).max(5);
    let width = rows
        .iter()
        .map(|r| label_text(r).len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "{:<stage_w$} {:<width$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "STAGE", "LABELS", "COUNT", "MEAN", "P50", "P90", "P99", "P99.9", "MAX"
    );
    for r in &rows {
        let m = &r.summary;
        let _ = writeln!(
            out,
            "{:<stage_w$} {:<width$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            r.stage,
            label_text(r),
            m.count,
            us(m.mean_us),
            us(m.p50_us),
            us(m.p90_us),
            us(m.p99_us),
            us(m.p999_us),
            us(m.max_us)
        );
    }
    if rows.is_empty() {
        out.push_str("(no events)\n");
    } else {
        out.push_str(
            "(latencies in µs unless marked ms; MAX is the upper bound of the highest bucket)\n",
        );
    }
    for b in backends(s) {
        let _ = writeln!(out, "{}", ceiling_line(false, &b));
    }
    for b in disk_backends(s) {
        let _ = writeln!(out, "{}", ceiling_line(true, &b));
    }
    for w in sync_writes(&rows) {
        let pct = |k: &str| 100.0 * w[k].as_f64().unwrap_or(0.0);
        let missing: Vec<&str> = w["not_measured"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        let _ = writeln!(
            out,
            "synchronous writes {}: {} requests, host block layer p50 {} p99 {} µs; of {} µs \
             host-side (means): backend {:.0}%, device and flushes {:.0}%, interrupt delivery \
             {:.0}%{}",
            labels_text(&w),
            w["requests"],
            us(w["host_p50_us"].as_f64().unwrap_or(0.0)),
            us(w["host_p99_us"].as_f64().unwrap_or(0.0)),
            us(w["mean_us"].as_f64().unwrap_or(0.0)),
            pct("share_backend"),
            pct("share_device"),
            pct("share_interrupt"),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (not measured: {})", missing.join(", "))
            }
        );
    }
    for r in s.tracer.report.iter().filter(|r| !r.attached) {
        let state = if r.opt_in_off { "off" } else { "unavailable" };
        let _ = writeln!(out, "{state}: {}: {}", r.stage, r.skipped.join("; "));
    }
    for d in dropped(s) {
        let _ = writeln!(
            out,
            "dropped: {} {} {}",
            d["stage"], d["reason"], d["events"]
        );
    }
    let slowest = s.slowest_timelines(TIMELINES_PRINTED);
    if !slowest.is_empty() {
        let _ = writeln!(
            out,
            "\nslowest sampled I/Os ({} events sampled, one 16.8 ms window in {}), stage by stage:",
            s.timelines.samples, s.tracer.timeline_every
        );
        out.push_str(&crate::timeline::table(&slowest));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rows written by hand: one VM's flushes with all three parts, and FUA writes without a
    // kick (not measured).
    fn row(stage: &'static str, op: &str, count: u64, mean_us: f64) -> Row {
        let labels = labels_json(vec![
            ("vm", "db".into()),
            ("disk", "vdb".into()),
            ("op", op.into()),
        ]);
        Row {
            stage,
            path: "block",
            labels,
            summary: Summary {
                count,
                mean_us,
                p50_us: mean_us,
                p90_us: mean_us,
                p99_us: 2.0 * mean_us,
                p999_us: 2.0 * mean_us,
                max_us: 2.0 * mean_us,
            },
            sum_ns: (count as f64 * mean_us * 1e3) as u64,
            buckets: Vec::new(),
        }
    }

    #[test]
    fn sync_writes_split_the_mean_host_time() {
        let rows = vec![
            row("blk.kick_to_submit", "flush", 10, 100.0),
            row("blk.sync", "flush", 10, 800.0),
            row("blk.complete_to_irq", "flush", 10, 100.0),
            row("blk.device", "flush", 10, 700.0),
            row("blk.sync", "fua", 4, 300.0),
            row("blk.complete_to_irq", "fua", 4, 100.0),
        ];
        let w = sync_writes(&rows);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0]["labels"]["op"], "flush");
        assert_eq!(w[0]["requests"], 10);
        assert_eq!(w[0]["mean_us"], 1000.0);
        assert_eq!(w[0]["share_backend"], 0.1);
        assert_eq!(w[0]["share_device"], 0.8);
        assert_eq!(w[0]["share_interrupt"], 0.1);
        assert_eq!(w[0]["host_p99_us"], 1600.0);
        assert_eq!(w[1]["share_device"], 0.75);
        assert_eq!(w[1]["not_measured"], serde_json::json!(["backend"]));
    }
}
