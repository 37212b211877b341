//! `iopath compare`: one VM's paravirtual and passthrough paths side by side, per kind of I/O
//! (network, disk), from a capture (`iopath record --json`) or a recording of its own.
//!
//! A path's host-side time is estimated as the sum of its stages: each stage's mean and
//! quantiles, per event of that stage, added. That is the path's own figure when every I/O
//! crosses each stage once and a slow I/O is slow in every stage; otherwise an estimate, not a
//! bound either way (stages count their own events: a kick can carry several packets, an
//! interrupt several completions); a capture's timelines are a sample of its I/Os only. Each
//! stage merges the VM's series first (all queues, vectors, ops), bucket by bucket, so each
//! stage's own quantiles are exact to the kernel's resolution.

use std::{collections::BTreeSet, fmt::Write as _};

use serde::Serialize;
use serde_json::Value;

use crate::{
    capture::{self, Row},
    hist::Summary,
    report::us,
};

/// One stage of a path: the VM's series of it, merged.
#[derive(Clone, Debug, Serialize)]
pub struct Part {
    pub stage: &'static str,
    /// The series merged (queues, vectors, ops, devices).
    pub series: usize,
    #[serde(flatten)]
    pub summary: Summary,
}

/// Host-side time of one direction of one path: the sum of its stages.
#[derive(Debug, Serialize)]
pub struct PathSum {
    /// `paravirtual` or `passthrough`.
    pub path: &'static str,
    /// `receive`, `transmit` (network), `request` (disk), `interrupt` (passthrough).
    pub direction: &'static str,
    /// Taps, disks or PCI addresses the parts' series name.
    pub devices: Vec<String>,
    pub parts: Vec<Part>,
    /// Stages of the path with no series of the VM: the sums lack them.
    pub not_measured: Vec<&'static str>,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Host CPU per I/O in µs, and whose (`cpu_of`); None where nothing measured it.
    pub cpu_per_io_us: Option<f64>,
    pub cpu_of: &'static str,
}

/// What a move to passthrough could take off one paravirtual direction's host-side time: a
/// difference of the estimates above (per event of each side's stages), not a bound.
#[derive(Debug, Serialize)]
pub struct Saving {
    pub direction: &'static str,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub why: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Kind {
    /// `network`, `disk`, or `other` (a passed-through device of another PCI class).
    pub kind: &'static str,
    pub paravirtual: Vec<PathSum>,
    pub passthrough: Vec<PathSum>,
    pub could_save: Vec<Saving>,
    /// Measured beside the paths but in neither sum (the host's own block device: a
    /// passed-through disk is another device, whose time the host never sees).
    pub beside: Vec<Part>,
    /// The VM's devices of this kind with vectors KVM posts to a vCPU: their interrupts to a
    /// running vCPU bypass the host (no event: neither counted nor timed, never 0 µs).
    pub posted: Vec<PostedDevice>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PostedDevice {
    pub device: String,
    pub vectors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Common {
    /// `passthrough` (injections made in a passed-through device's handler), `other`, or `all`
    /// (a capture without the device label).
    pub of: &'static str,
    #[serde(flatten)]
    pub part: Part,
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    pub vm: String,
    pub kinds: Vec<Kind>,
    /// In both paths' delivery and in neither sum: kvm.inject_to_entry of the passthrough
    /// devices' interrupts (its `device` label) and of all the VM's other injections
    /// (paravirtual devices', and a passthrough device's that KVM deferred to a kworker or made
    /// while the vfio stages were off); `all` for a capture without the label.
    pub common: Vec<Common>,
    /// Whether this host posts assigned devices' interrupts, as the capture says.
    pub posted: Option<String>,
    /// This host's posted-interrupt events over the capture (/proc/interrupts' PIN as
    /// `notification`, PIW as `wakeup`: a halted vCPU woken by a posted interrupt), host-wide.
    pub posted_host_events: serde_json::Map<String, Value>,
    pub costs: Vec<&'static str>,
}

/// What passthrough costs, in plain words.
pub const COSTS: [&str; 4] = [
    "live migration: a VM holding an assigned device cannot be live-migrated (unless the \
     device has a VFIO migration driver)",
    "host-side storage and network features: a passed-through disk bypasses the VMM's block \
     layer (no image snapshots, backing files or I/O throttling), a passed-through NIC the \
     host's bridge and firewall",
    "memory: all guest memory is pinned for the device's DMA: no overcommit, ballooning, KSM \
     or swap for this VM",
    "one device (or SR-IOV virtual function) per VM: the hardware is not shared",
];

const RX: [&str; 3] = [
    "net.rx.host_stack",
    "net.rx.backend_queue",
    "net.rx.backend_to_irq",
];
const TX: [&str; 3] = ["net.tx.kick", "net.tx.backend_to_wire", "net.tx.host_stack"];
const DISK: [&str; 2] = ["blk.kick_to_submit", "blk.complete_to_irq"];
const PT: [&str; 1] = ["vfio.handler_to_inject"];

/// The stage `stage` of the rows `keep` selects, merged; None when there are none.
fn part(rows: &[Row], stage: &'static str, keep: impl Fn(&Row) -> bool) -> Option<Part> {
    capture::merged(rows, stage, keep).map(|(series, merged)| Part {
        stage,
        series,
        summary: merged.summary(),
    })
}

fn path_sum(
    path: &'static str,
    direction: &'static str,
    devices: Vec<String>,
    stages: &[&'static str],
    parts: impl Fn(&'static str) -> Option<Part>,
    cpu: (Option<f64>, &'static str),
) -> Option<PathSum> {
    let parts: Vec<Part> = stages.iter().filter_map(|s| parts(s)).collect();
    if parts.is_empty() {
        return None;
    }
    let not_measured = stages
        .iter()
        .filter(|s| !parts.iter().any(|p| p.stage == **s))
        .copied()
        .collect();
    let sum = |f: fn(&Summary) -> f64| parts.iter().map(|p| f(&p.summary)).sum();
    Some(PathSum {
        path,
        direction,
        devices,
        not_measured,
        mean_us: sum(|s| s.mean_us),
        p50_us: sum(|s| s.p50_us),
        p99_us: sum(|s| s.p99_us),
        p999_us: sum(|s| s.p999_us),
        parts,
        cpu_per_io_us: cpu.0,
        cpu_of: cpu.1,
    })
}

/// CPU per I/O of the VM's backends from a capture's `backends` or `disk_backends`.
fn backend_cpu(capture: &Value, section: &str, count: &str, vm: &str) -> Option<f64> {
    let (mut cpu_s, mut n) = (0.0, 0u64);
    for b in capture[section].as_array().into_iter().flatten() {
        if b["labels"]["vm"].as_str() == Some(vm) {
            cpu_s += b["cpu_s"].as_f64().unwrap_or(0.0);
            n += b[count].as_u64().unwrap_or(0);
        }
    }
    (n > 0).then(|| cpu_s * 1e6 / n as f64)
}

fn saving(direction: &'static str, pv: &PathSum, pt: Option<&PathSum>) -> Saving {
    let (why, base) = match pt {
        _ if direction == "transmit" => (
            "all of it: a passed-through device's doorbell is the guest's write to it, with no \
             host event",
            [0.0; 3],
        ),
        Some(pt) => (
            "its sum less the passthrough interrupt's, per packet or request against per \
             interrupt; the devices' own work is in neither",
            [pt.p50_us, pt.p99_us, pt.p999_us],
        ),
        None => (
            "all of it: the passed-through device's interrupts are posted, with no host-side \
             time while its vCPU runs",
            [0.0; 3],
        ),
    };
    Saving {
        direction,
        p50_us: (pv.p50_us - base[0]).max(0.0),
        p99_us: (pv.p99_us - base[1]).max(0.0),
        p999_us: (pv.p999_us - base[2]).max(0.0),
        why,
    }
}

/// The comparison for `vm` from a capture.
pub fn compare(capture: &Value, vm: &str) -> Result<Comparison, capture::Error> {
    let rows = capture::rows(capture)?;
    let of_vm = |r: &Row| r.label("vm") == Some(vm);
    capture::has_vm(&rows, vm)?;
    let names = |stages: &[&str], label: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| stages.contains(&r.stage) && of_vm(r))
            .filter_map(|r| r.label(label).map(str::to_string))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let taps = capture::taps_of(&rows, vm);
    let net_part = |stage: &'static str| {
        part(&rows, stage, |r| {
            if stage.ends_with("host_stack") {
                r.label("tap").is_some_and(|t| taps.iter().any(|v| v == t))
            } else {
                of_vm(r)
            }
        })
    };
    let net_cpu = (
        backend_cpu(capture, "backends", "packets", vm),
        "the backend's threads (vhost worker or VMM) per packet, both directions together",
    );
    let kind_of = |device: &str| {
        capture["vfio_devices"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["device"].as_str() == Some(device))
            .and_then(|d| d["kind"].as_str())
            .unwrap_or("other")
            .to_string()
    };
    let posted = |kind: &str| -> Vec<PostedDevice> {
        capture["vfio_devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["vm"].as_str() == Some(vm) && d["kind"].as_str() == Some(kind))
            .filter_map(|d| {
                let vectors: Vec<String> = d["posted_vectors"]
                    .as_array()?
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                (!vectors.is_empty()).then(|| PostedDevice {
                    device: d["device"].as_str().unwrap_or_default().to_string(),
                    vectors,
                })
            })
            .collect()
    };
    let passthrough = |kind: &str| -> Option<PathSum> {
        let devices: Vec<String> = names(&["vfio.handler", PT[0]], "device")
            .into_iter()
            .filter(|d| kind_of(d) == kind)
            .collect();
        if devices.is_empty() {
            return None;
        }
        let mine = |r: &Row| {
            of_vm(r)
                && r.label("device")
                    .is_some_and(|d| devices.iter().any(|v| v == d))
        };
        let handler = part(&rows, "vfio.handler", mine);
        path_sum(
            "passthrough",
            "interrupt",
            devices.clone(),
            &PT,
            |s| part(&rows, s, mine),
            (
                handler.map(|h| h.summary.mean_us),
                "the host's interrupt handler (vfio.handler's mean), per interrupt",
            ),
        )
    };
    // Per kind: its paravirtual directions, what is measured beside them, and the VM's
    // passed-through devices of that kind (timed, or posted); a kind with none is left out.
    let kind = |kind: &'static str, paravirtual: Vec<PathSum>, beside: Vec<Part>| {
        let passthrough: Vec<PathSum> = passthrough(kind).into_iter().collect();
        let posted = posted(kind);
        (!paravirtual.is_empty() || !passthrough.is_empty() || !posted.is_empty()).then(|| Kind {
            kind,
            could_save: savings(&paravirtual, &passthrough, &posted),
            paravirtual,
            passthrough,
            beside,
            posted,
        })
    };
    let network: Vec<PathSum> = [("receive", &RX), ("transmit", &TX)]
        .into_iter()
        .filter_map(|(dir, stages)| {
            path_sum("paravirtual", dir, taps.clone(), stages, net_part, net_cpu)
        })
        .collect();
    let disk_cpu = (
        backend_cpu(capture, "disk_backends", "requests", vm),
        "the threads that submit the VM's requests, per request",
    );
    let disk: Vec<PathSum> = path_sum(
        "paravirtual",
        "request",
        names(&DISK, "disk"),
        &DISK,
        |s| part(&rows, s, of_vm),
        disk_cpu,
    )
    .into_iter()
    .collect();
    let kinds: Vec<Kind> = [
        kind("network", network, Vec::new()),
        kind(
            "disk",
            disk,
            part(&rows, "blk.device", of_vm).into_iter().collect(),
        ),
        // passed-through devices of another class (or none in the capture): nothing
        // paravirtual to set beside them
        kind("other", Vec::new(), Vec::new()),
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok(Comparison {
        vm: vm.into(),
        kinds,
        common: if rows
            .iter()
            .any(|r| r.stage == "kvm.inject_to_entry" && of_vm(r) && r.label("device").is_none())
        {
            // a capture of an iopath before the label: the injections cannot be split
            part(&rows, "kvm.inject_to_entry", of_vm)
                .map(|part| Common { of: "all", part })
                .into_iter()
                .collect()
        } else {
            [("passthrough", true), ("other", false)]
                .into_iter()
                .filter_map(|(of, device)| {
                    let mine = |r: &Row| {
                        of_vm(r) && r.label("device").is_some_and(|d| !d.is_empty()) == device
                    };
                    Some(Common {
                        of,
                        part: part(&rows, "kvm.inject_to_entry", mine)?,
                    })
                })
                .collect()
        },
        posted: capture["posted_interrupts"].as_object().map(|p| {
            let yes = p.get("posted").and_then(Value::as_bool) == Some(true);
            let why = p.get("why").and_then(Value::as_str).unwrap_or_default();
            format!("{} ({why})", if yes { "yes" } else { "no" })
        }),
        posted_host_events: capture["posted_host_events"]
            .as_object()
            .cloned()
            .unwrap_or_default(),
        costs: COSTS.to_vec(),
    })
}

/// What a move could save per paravirtual direction, when the VM has a passthrough side:
/// measured interrupts (remapped), or posted ones alone (no host-side time).
fn savings(pv: &[PathSum], pt: &[PathSum], posted: &[PostedDevice]) -> Vec<Saving> {
    if pt.is_empty() && posted.is_empty() {
        return Vec::new();
    }
    pv.iter()
        .map(|p| saving(p.direction, p, pt.first()))
        .collect()
}

pub fn table(c: &Comparison) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "vm {:?}: host-side time, paravirtual against passthrough (µs unless marked ms; a \
         path's figures are the sums of its stages', each per event of that stage: an estimate)",
        c.vm
    );
    if c.kinds.is_empty() {
        out.push_str("(no network or disk path of this VM was measured)\n");
    }
    for k in &c.kinds {
        let _ = writeln!(
            out,
            "\n{}\n  {:<11} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9}  DEVICES: STAGES (EVENTS)",
            k.kind, "PATH", "DIRECTION", "MEAN", "P50", "P99", "P99.9", "CPU/IO"
        );
        for p in k.paravirtual.iter().chain(&k.passthrough) {
            let _ = writeln!(
                out,
                "  {:<11} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}: {}{}",
                p.path,
                p.direction,
                us(p.mean_us),
                us(p.p50_us),
                us(p.p99_us),
                us(p.p999_us),
                p.cpu_per_io_us.map_or("-".into(), us),
                crate::capture::printable(&p.devices.join(",")),
                p.parts
                    .iter()
                    .map(|p| format!("{} ({})", p.stage, p.summary.count))
                    .collect::<Vec<_>>()
                    .join(" + "),
                if p.not_measured.is_empty() {
                    String::new()
                } else {
                    format!(" (not measured: {})", p.not_measured.join(", "))
                }
            );
        }
        if k.paravirtual.is_empty() && k.kind != "other" {
            let _ = writeln!(out, "  (no paravirtual {} path measured)", k.kind);
        }
        if k.passthrough.is_empty() && k.posted.is_empty() {
            let _ = writeln!(
                out,
                "  (no passed-through {} device seen: no host interrupt of one, and no \
                 kvm_pi_irte_update since iopath started; a device whose interrupts were \
                 already posted before then would look the same)",
                k.kind
            );
        }
        let mut cpu_of: Vec<(&str, &str)> = k
            .paravirtual
            .iter()
            .chain(&k.passthrough)
            .filter(|p| p.cpu_per_io_us.is_some())
            .map(|p| (p.path, p.cpu_of))
            .collect();
        cpu_of.dedup();
        for (path, of) in cpu_of {
            let _ = writeln!(out, "  CPU/IO, {path}: {of}");
        }
        for p in &k.posted {
            let _ = writeln!(
                out,
                "  passthrough posted    {}: vectors {} posted to a vCPU: their interrupts to a \
                 running vCPU bypass the host (no host event: neither counted nor timed)",
                crate::capture::printable(&p.device),
                crate::capture::printable(&p.vectors.join(","))
            );
        }
        if !k.posted.is_empty() {
            let n = |kind: &str| c.posted_host_events.get(kind).and_then(Value::as_u64);
            let _ = writeln!(
                out,
                "  the host's posted-interrupt events over the capture, from every source \
                 (devices, KVM's own posted injections, IPIs) and not only this VM's: {}",
                match (n("notification"), n("wakeup")) {
                    (None, None) => "not in this kernel's /proc/interrupts".into(),
                    (a, b) => format!(
                        "{} notifications to a vCPU out of guest mode (PIN), {} wakeups of a \
                         halted vCPU (PIW); AMD's AVIC wakes a halted vCPU through the IOMMU's \
                         GA log instead, which is in neither",
                        a.unwrap_or(0),
                        b.unwrap_or(0)
                    ),
                }
            );
        }
        for s in &k.could_save {
            let _ = writeln!(
                out,
                "  passthrough could save, estimated, {}: p50 {} p99 {} p99.9 {} ({})",
                s.direction,
                us(s.p50_us),
                us(s.p99_us),
                us(s.p999_us),
                s.why
            );
        }
        for b in &k.beside {
            let _ = writeln!(
                out,
                "  beside the sums: {} p50 {} p99 {} over {} requests (the host's own device)",
                b.stage,
                us(b.summary.p50_us),
                us(b.summary.p99_us),
                b.summary.count
            );
        }
    }
    for (i, c) in c.common.iter().enumerate() {
        let p = &c.part;
        let _ = writeln!(
            out,
            "{}{} p50 {} p99 {} over {} injections ({})",
            if i == 0 {
                "\nafter both paths, in neither sum: "
            } else {
                "  "
            },
            p.stage,
            us(p.summary.p50_us),
            us(p.summary.p99_us),
            p.summary.count,
            if c.of == "passthrough" {
                "the passed-through devices' interrupts"
            } else if c.of == "all" {
                "all of the VM's: this capture has no device label"
            } else {
                "the VM's other injections: paravirtual devices', and passthrough ones KVM \
                 deferred or made with the vfio stages off"
            }
        );
    }
    if c.kinds.iter().any(|k| !k.passthrough.is_empty()) {
        let _ = writeln!(
            out,
            "interrupts posted to a running vCPU have no host event and are in no figure; this \
             host posts assigned devices' interrupts: {}",
            c.posted
                .as_deref()
                .unwrap_or("unknown (not in the capture)")
        );
    }
    out.push_str("\nwhat passthrough costs:\n");
    for c in &c.costs {
        let _ = writeln!(out, "  - {c}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::Series;

    // A capture written by hand: VM "db" with a vhost-net tap, a disk and an assigned NIC and
    // NVMe; another VM's tap that must stay out.
    fn row(stage: &str, labels: Value, buckets: &[(u64, u64)]) -> Value {
        let sum: u64 = buckets.iter().map(|(lo, n)| lo * n).sum();
        serde_json::json!({"stage": stage, "labels": labels, "sum_ns": sum, "buckets": buckets})
    }

    fn capture() -> Value {
        use serde_json::json;
        // Lower bounds of the kernel's buckets: floor(1e9 * 2^(k/8)) ns, here 2^-17 s .. 2^-14 s.
        let us8 = 7629; // 7.629 µs
        let us16 = 15258;
        let us32 = 30517;
        let us64 = 61035;
        let vm = |extra: Value| {
            let mut l = json!({"vm": "db", "backend": "vhost", "tap": "tap0", "queue": "0"});
            l.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            l
        };
        json!({
            "series": [
                row("net.rx.host_stack", json!({"tap": "tap0", "uplink": "eth0"}), &[(us8, 10)]),
                row("net.rx.host_stack", json!({"tap": "tap9", "uplink": "eth0"}), &[(us64, 10)]),
                row("net.rx.backend_queue", vm(json!({})), &[(us16, 5)]),
                row("net.rx.backend_queue", vm(json!({"queue": "1"})), &[(us16, 5)]),
                row("net.rx.backend_to_irq", vm(json!({})), &[(us8, 10)]),
                row("net.tx.kick", vm(json!({})), &[(us8, 10)]),
                row("net.tx.backend_to_wire", vm(json!({})), &[(us16, 10)]),
                row("vfio.handler", json!({"vm": "db", "device": "0000:01:00.0", "vector": "0"}), &[(us32, 10)]),
                row("vfio.handler_to_inject", json!({"vm": "db", "device": "0000:01:00.0", "vector": "0"}), &[(us8, 10)]),
                row("vfio.handler_to_inject", json!({"vm": "db", "device": "0000:02:00.0", "vector": "0"}), &[(us16, 4)]),
                row("blk.kick_to_submit", json!({"vm": "db", "device": "7:0", "disk": "loop0", "op": "read"}), &[(us32, 4)]),
                row("blk.complete_to_irq", json!({"vm": "db", "device": "7:0", "disk": "loop0", "op": "read"}), &[(us16, 4)]),
                row("blk.device", json!({"vm": "db", "device": "7:0", "disk": "loop0", "op": "read"}), &[(us64, 4)]),
                row("kvm.inject_to_entry", json!({"vm": "db", "vcpu": "0", "device": ""}), &[(us8, 30)]),
                row("kvm.inject_to_entry", json!({"vm": "db", "vcpu": "1", "device": "0000:01:00.0"}), &[(us8, 12)]),
                row("kvm.inject_to_entry", json!({"vm": "web", "vcpu": "0"}), &[(us8, 30)]),
            ],
            "backends": [{"labels": {"vm": "db", "backend": "vhost", "tap": "tap0"}, "packets": 20, "cpu_s": 0.0001}],
            "disk_backends": [],
            "vfio_devices": [
                {"device": "0000:01:00.0", "vm": "db", "class": "0x020000", "kind": "network"},
                {"device": "0000:02:00.0", "vm": "db", "class": "0x010802", "kind": "disk"},
            ],
            "posted_interrupts": {"posted": false, "why": "kvm_amd avic=N"},
        })
    }

    fn one_bucket(lo_ns: u64, n: u64) -> Summary {
        Series::from_sparse(&[(lo_ns, n)], lo_ns * n)
            .unwrap()
            .summary()
    }

    #[test]
    fn sums_each_direction_of_the_vms_own_series() {
        let c = compare(&capture(), "db").unwrap();
        assert_eq!(c.kinds.len(), 2);
        let net = &c.kinds[0];
        assert_eq!(net.kind, "network");
        let rx = &net.paravirtual[0];
        assert_eq!(rx.direction, "receive");
        assert_eq!(rx.devices, ["tap0"]);
        // tap9 is another VM's: only tap0's 10 packets.
        assert_eq!(rx.parts[0].summary.count, 10);
        assert_eq!(rx.parts[1].series, 2);
        assert_eq!(rx.parts[1].summary.count, 10);
        let (a, b) = (one_bucket(7629, 10), one_bucket(15258, 10));
        assert_eq!(rx.p50_us, a.p50_us + b.p50_us + a.p50_us);
        assert_eq!(rx.p99_us, a.p99_us + b.p99_us + a.p99_us);
        assert!((rx.mean_us - (7.629 + 15.258 + 7.629)).abs() < 1e-9);
        assert_eq!(rx.cpu_per_io_us, Some(5.0));
        let tx = &net.paravirtual[1];
        assert_eq!(tx.not_measured, ["net.tx.host_stack"]);
        let pt = &net.passthrough[0];
        assert_eq!(pt.devices, ["0000:01:00.0"]);
        assert_eq!(pt.p50_us, a.p50_us);
        assert_eq!(pt.cpu_per_io_us, Some(30.517));
        // receive saves its sum less the interrupt's; transmit all of its sum
        assert_eq!(net.could_save[0].p50_us, rx.p50_us - pt.p50_us);
        assert_eq!(net.could_save[1].p50_us, tx.p50_us);
        let disk = &c.kinds[1];
        assert_eq!(disk.paravirtual[0].devices, ["loop0"]);
        assert_eq!(disk.passthrough[0].devices, ["0000:02:00.0"]);
        assert_eq!(disk.beside[0].stage, "blk.device");
        // the NIC handler's injections apart from the VM's others; web's in neither
        let common: Vec<_> = c
            .common
            .iter()
            .map(|x| (x.of, x.part.summary.count))
            .collect();
        assert_eq!(common, [("passthrough", 12), ("other", 30)]);
        let t = table(&c);
        assert!(
            t.contains("passthrough could save, estimated, receive"),
            "{t}"
        );
        assert!(
            t.contains("this host posts assigned devices' interrupts: no"),
            "{t}"
        );
    }

    #[test]
    fn a_capture_without_the_device_label_keeps_the_injections_together() {
        let mut c = capture();
        for r in c["series"].as_array_mut().unwrap() {
            if r["stage"] == "kvm.inject_to_entry" {
                r["labels"].as_object_mut().unwrap().remove("device");
            }
        }
        let c = compare(&c, "db").unwrap();
        let common: Vec<_> = c
            .common
            .iter()
            .map(|x| (x.of, x.part.summary.count))
            .collect();
        assert_eq!(common, [("all", 42)]);
        assert!(table(&c).contains("this capture has no device label"));
    }

    #[test]
    fn an_unknown_vm_names_the_vms_of_the_capture() {
        let e = compare(&capture(), "nope").unwrap_err().to_string();
        assert_eq!(
            e,
            "no series of vm \"nope\" in the capture (vms in it: db, web)"
        );
        let e = compare(&serde_json::json!({}), "db").unwrap_err();
        assert!(matches!(e, capture::Error::NotACapture));
    }

    #[test]
    fn a_series_of_another_layout_is_refused() {
        // 2^16 ns, a lower bound of the layout before schema 3
        let c = serde_json::json!({"series": [row("vfio.handler", serde_json::json!({"vm": "db"}), &[(65536, 1)])]});
        assert!(matches!(
            compare(&c, "db"),
            Err(capture::Error::Buckets { .. })
        ));
    }
}

/// Posted mode on sequences written by hand: the emulated host has no AVIC and this machine no
/// VT-d, so no kernel here posts an interrupt. Each sequence is what the kernel would show:
/// kvm:kvm_pi_irte_update events (through the BPF program's rule into the map's state), the
/// host handler's samples of the remapped vectors, and /proc/interrupts' PIN and PIW rows
/// before and after. The capture is built from them by the code `record --json` uses (the
/// IRQ join, the device list with its posted and remapped vectors, the events' delta; the
/// labeler's naming and sysfs's class are stood in for), and the comparison checked against
/// figures worked out by hand.
#[cfg(test)]
mod posted_sequences {
    use std::collections::BTreeMap;

    use serde_json::json;
    use tracer_common::vfio::{PostedIrte, VfioIrq, on_irte_update, pci_key};

    use super::*;
    use crate::vfio_irqs::{joined, posted_host_events};

    const NIC: &str = "0000:01:00.0";
    /// Host IRQs 40 and 41: the NIC's MSI-X vectors 0 and 1, held by the VMM (tgid 700).
    fn followed() -> BTreeMap<u32, VfioIrq> {
        (0..2)
            .map(|v| {
                let irq = VfioIrq {
                    dev: pci_key(0, 1, 0, 0),
                    vm: 700,
                    vector: v,
                    _pad: 0,
                };
                (40 + v, irq)
            })
            .collect()
    }

    /// (host_irq, vcpu, set) in order, as the BPF program folds them.
    fn irtes(updates: &[(u32, u32, bool)]) -> BTreeMap<u32, PostedIrte> {
        let mut m = BTreeMap::new();
        for &(irq, vcpu, set) in updates {
            let last = m.get(&irq).copied();
            m.insert(irq, on_irte_update(last, 700, vcpu, 0x41, set));
        }
        m
    }

    fn proc_interrupts(pin: u64, piw: u64) -> String {
        format!(
            "           CPU0       CPU1\n 40:  5  5  IR-PCI-MSIX  vfio-msix[0](0000:01:00.0)\n\
             PIN:  {}  {}   Posted-interrupt notification event\n\
             PIW:  {}  {}   Posted-interrupt wakeup event\n",
            pin / 2,
            pin - pin / 2,
            piw,
            0
        )
    }

    /// The capture of a window: the VM's paravirtual receive (one stage, 20 packets of 64 µs)
    /// and its NIC's handler samples per remapped vector (`samples`: vector, count of 16 µs).
    fn capture(
        updates: &[(u32, u32, bool)],
        samples: &[(u32, u64)],
        pi: ((u64, u64), (u64, u64)),
    ) -> Value {
        let posted: Vec<(Vec<(&'static str, String)>, bool)> = joined(&followed(), &irtes(updates))
            .into_iter()
            .map(|(v, p)| {
                let l = vec![
                    ("vm", "db".to_string()),
                    ("device", crate::labels::pci_name(v.dev)),
                    ("vector", v.vector.to_string()),
                ];
                (l, p.set != 0)
            })
            .collect();
        let before = posted_host_events(&proc_interrupts(pi.0.0, pi.0.1));
        let after = posted_host_events(&proc_interrupts(pi.1.0, pi.1.1));
        let events = crate::report::events_since(&before, &after);
        // the devices the series name, as record finds them; the class as sysfs would say
        let seen = if samples.is_empty() {
            Default::default()
        } else {
            [(NIC.to_string(), "db".to_string())].into()
        };
        let devices = crate::report::vfio_devices_of(seen, &posted, |_| "0x020000".into());
        let mut series = vec![json!({
            "stage": "net.rx.backend_queue",
            "labels": {"vm": "db", "backend": "vhost", "tap": "tap0", "queue": "0"},
            "sum_ns": 20 * 61035, "buckets": [[61035, 20]],
        })];
        for &(vector, n) in samples {
            series.push(json!({
                "stage": "vfio.handler_to_inject",
                "labels": {"vm": "db", "device": NIC, "vector": vector.to_string()},
                "sum_ns": n * 15258, "buckets": [[15258, n]],
            }));
        }
        json!({
            "series": series,
            "vfio_devices": devices,
            "posted_interrupts": {"posted": true, "why": "kvm_intel enable_apicv=Y, every VT-d unit has PI"},
            "posted_host_events": events,
        })
    }

    // One bucket (lo, hi] holding all of a series' n events: its p50 is at rank n/2,
    // lo + (hi - lo) * 0.5, and the merged series of two such equal buckets likewise.
    const RX_P50: f64 = 61.035 + (66.559 - 61.035) * 0.5;
    const PT_P50: f64 = 15.258 + (16.639 - 15.258) * 0.5;

    fn net(c: &Comparison) -> &Kind {
        c.kinds.iter().find(|k| k.kind == "network").unwrap()
    }

    #[test]
    fn remapped_vectors_are_timed_and_none_is_posted() {
        let cap = capture(
            &[(40, 0, false), (41, 1, false)],
            &[(0, 10), (1, 10)],
            ((0, 0), (0, 0)),
        );
        let c = compare(&cap, "db").unwrap();
        let k = net(&c);
        assert!(k.posted.is_empty());
        let pt = &k.passthrough[0];
        assert_eq!(pt.parts[0].summary.count, 20);
        assert!((pt.p50_us - PT_P50).abs() < 1e-9, "{}", pt.p50_us);
        assert!((k.could_save[0].p50_us - (RX_P50 - PT_P50)).abs() < 1e-9);
        assert_eq!(c.posted_host_events["wakeup"], 0);
    }

    #[test]
    fn posted_to_a_running_vcpu_bypasses_the_host_with_no_sample() {
        // Both vectors posted; the guest took interrupts, the host saw none (no PIN, no PIW).
        let cap = capture(&[(40, 0, true), (41, 1, true)], &[], ((7, 3), (7, 3)));
        let c = compare(&cap, "db").unwrap();
        let k = net(&c);
        assert!(
            k.passthrough.is_empty(),
            "no 0 µs samples: {:?}",
            k.passthrough
        );
        assert_eq!(
            k.posted,
            [PostedDevice {
                device: NIC.into(),
                vectors: vec!["0".into(), "1".into()]
            }]
        );
        // nothing on the host to take off: the paravirtual sum is all a move could save
        assert!((k.could_save[0].p50_us - RX_P50).abs() < 1e-9);
        assert_eq!(c.posted_host_events["notification"], 0);
        assert_eq!(c.posted_host_events["wakeup"], 0);
        let t = table(&c);
        assert!(t.contains("vectors 0,1 posted to a vCPU"), "{t}");
        assert!(
            t.contains("0 notifications to a vCPU out of guest mode (PIN), 0 wakeups"),
            "{t}"
        );
    }

    #[test]
    fn posted_to_a_halted_vcpu_shows_as_the_hosts_wakeups() {
        // The vCPU halted between packets: each posted interrupt woke it through PIW (25 on
        // CPU0), and 4 notifications arrived while it was out of guest mode.
        let cap = capture(&[(40, 0, true), (41, 0, true)], &[], ((10, 100), (14, 125)));
        let c = compare(&cap, "db").unwrap();
        assert_eq!(c.posted_host_events["notification"], 4);
        assert_eq!(c.posted_host_events["wakeup"], 25);
        let t = table(&c);
        assert!(
            t.contains("4 notifications to a vCPU out of guest mode (PIN), 25 wakeups"),
            "{t}"
        );
        assert!(net(&c).passthrough.is_empty());
    }

    #[test]
    fn an_irte_switched_mid_run_times_what_stayed_remapped() {
        // Vector 0 went remapped -> posted during the window (its 6 samples came before);
        // vector 1 stayed remapped (10 samples): the figures are those 16 host-seen
        // interrupts, and vector 0 is listed as posted now.
        let updates = [(40, 0, false), (41, 1, false), (40, 0, true)];
        let state = irtes(&updates);
        assert_eq!((state[&40].set, state[&40].updates), (1, 2));
        let cap = capture(&updates, &[(0, 6), (1, 10)], ((0, 0), (0, 0)));
        let c = compare(&cap, "db").unwrap();
        let k = net(&c);
        assert_eq!(k.posted[0].vectors, ["0"]);
        let pt = &k.passthrough[0];
        assert_eq!((pt.parts[0].series, pt.parts[0].summary.count), (2, 16));
        // 16 in one bucket: rank 8 of 16 -> halfway through it, as above
        assert!((pt.p50_us - PT_P50).abs() < 1e-9);
        assert!((k.could_save[0].p50_us - (RX_P50 - PT_P50)).abs() < 1e-9);
        let t = table(&c);
        assert!(
            t.contains("passthrough interrupt") && t.contains("vectors 0 posted"),
            "{t}"
        );
    }
}
