//! Prometheus exposition (OpenMetrics text, by prometheus-client; Prometheus text 0.0.4 derived
//! from it; the protobuf form, from the same families, in `protobuf`). The histograms are
//! counted in the kernel, so they go through a custom collector that encodes the summed buckets
//! as they are, in the exported bucket layout.
//!
//! Every label value is escaped (`\`, `"`, newline): VM names are chosen by tenants, and one bad
//! name must not make the host's whole scrape unparseable. Series whose labels come out equal
//! (a VM restarted under the same name, two vCPU fds that cannot be resolved) are merged
//! before they get here (`session`), so no label set is repeated.
//!
//! Families:
//! - `iopath_stage_latency_seconds{stage,path,<stage labels>}` histogram, one series per stage
//!   and label set; `le` bounds are a subset of the kernel's bucket bounds (`--buckets`).
//! - `iopath_stage_latency_native_seconds`, the same series as native histograms of the kernel's
//!   own buckets: in the protobuf exposition only (`protobuf`).
//! - `iopath_stage_attached{stage,path,attach}` gauge: 1 attached (attach = families), 0 not.
//! - `iopath_events_dropped_total{stage,reason}` counter: events that gave no sample.
//! - `iopath_map_full_total{map}` counter: inserts refused by a full shared map.
//! - `iopath_program_run_time_seconds_total{program}`, `iopath_program_run_count_total{program}`:
//!   kernel.bpf_stats per attached program (zero unless `iopath_bpf_stats_enabled` is 1);
//!   `iopath_program_recursion_misses_total{program}`: runs the kernel skipped.
//! - `iopath_series`, `iopath_vms` gauges: label sets exported and distinct VMs among them.
//! - `iopath_snapshot_reads_total` counter: reads of the kernel maps (shared by scrapes).
//! - `iopath_kernel_map_entries{map}` gauge: entries of the kernel maps that grow.
//! - `iopath_vfio_irq_posted{vm,device,vector}` gauge: 1 while KVM posts the IRQ to a vCPU.
//! - `iopath_posted_interrupt_host_events_total{kind}` counter: PIN and PIW of /proc/interrupts.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    sync::Arc,
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelValue, LabelValueEncoder, NoLabelSet},
    metrics::MetricType,
    registry::{Registry, Unit},
};

use tracer_common::{hist::bucket_index, stage::StageId};

use crate::{
    attach::StageReport,
    hist::{Layout, Series},
    session::Labelled,
};

/// A label value, escaped as both text formats require.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Value(pub String);

impl EncodeLabelValue for Value {
    fn encode(&self, enc: &mut LabelValueEncoder) -> std::fmt::Result {
        enc.write_str(&escape(&self.0))
    }
}

pub(crate) type Labels = Vec<(&'static str, Value)>;

/// A label value escaped as both text formats require.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (*k, Value(v.to_string())))
        .collect()
}

fn backend_labels(labels: &[(&'static str, String)]) -> Labels {
    labels.iter().map(|(k, v)| (*k, Value(v.clone()))).collect()
}

/// An exemplar of a classic bucket: the trace id of a sampled event in it (`timeline`), with
/// its VM and vCPU or device, its latency and when its stage ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Exemplar {
    pub labels: Labels,
    pub seconds: f64,
    /// Wall-clock ns since the epoch.
    pub unix_ns: u64,
}

/// A series' sampled events by kernel bucket: (bucket, trace id, seconds, unix ns).
pub type Sampled = Vec<(u16, u64, f64, u64)>;

/// Each series' sampled events, by stage and labels (as `session` labels them).
pub type SampledBySeries = BTreeMap<(StageId, Vec<(&'static str, String)>), Sampled>;

/// OpenMetrics' limit on an exemplar's label names and values together, in characters.
const EXEMPLAR_CHARS: usize = 128;

/// The exemplar labels of a sample of a series with `labels`: its trace id, then its VM and
/// its vCPU or device while they fit.
fn exemplar_labels(trace: u64, labels: &[(&'static str, String)]) -> Labels {
    let mut out: Labels = vec![("trace_id", Value(format!("{trace:016x}")))];
    let mut used = "trace_id".len() + 16;
    for name in ["vm", "vcpu", "device"] {
        if let Some((k, v)) = labels.iter().find(|(k, v)| *k == name && !v.is_empty()) {
            let n = k.len() + v.chars().count();
            if used + n <= EXEMPLAR_CHARS {
                used += n;
                out.push((k, Value(v.clone())));
            }
        }
    }
    out
}

#[derive(Clone, Debug, Default)]
struct HistogramSeries {
    labels: Labels,
    /// The kernel's buckets, for the native histogram.
    series: Series,
    sum_seconds: f64,
    count: u64,
    /// The exported classic layout's.
    buckets: Vec<(f64, u64)>,
    /// Exemplars by classic bucket index: the latest sampled event of each bucket at or above
    /// the series' p90 (the slow ones).
    exemplars: Vec<(usize, Exemplar)>,
}

/// Per-program kernel statistics.
pub struct ProgramStats {
    pub program: String,
    pub run_time: Duration,
    pub run_count: u64,
    pub recursion_misses: u64,
}

/// What one scrape shows besides the histograms.
pub struct Status<'a> {
    pub report: &'a [StageReport],
    pub programs: &'a [ProgramStats],
    pub bpf_stats_enabled: bool,
    /// (stage, reason) -> events.
    pub dropped: &'a [(&'static str, &'static str, u64)],
    /// map -> inserts refused.
    pub map_full: &'a [(&'static str, u64)],
    /// map -> entries.
    pub map_entries: &'a [(&'static str, usize)],
    /// Reads of the kernel maps so far.
    pub snapshot_reads: u64,
    /// Network backends (labels) and what their threads cost.
    pub backends: &'a [(Vec<(&'static str, String)>, crate::backend::Cost)],
    /// Disk backends (labels: vm, device, disk) and what their submitting threads cost.
    pub disks: &'a [(Vec<(&'static str, String)>, crate::backend::Cost)],
    /// VFIO IRQs (labels: vm, device, vector) KVM spoke of, and whether each is posted.
    pub posted: &'a [(Vec<(&'static str, String)>, bool)],
    /// This host's posted-interrupt events by kind (/proc/interrupts' PIN and PIW rows).
    pub posted_host_events: &'a [(&'static str, u64)],
    /// Timelines: samples read off the ring, and those with two candidates before them.
    pub timeline_samples: u64,
    pub timeline_ambiguous: u64,
}

/// Everything one scrape exposes, gathered before encoding.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    histograms: Vec<HistogramSeries>,
    attached: Vec<(Labels, i64)>,
    dropped: Vec<(Labels, u64)>,
    map_full: Vec<(Labels, u64)>,
    run_time: Vec<(Labels, f64)>,
    run_count: Vec<(Labels, u64)>,
    recursion_misses: Vec<(Labels, u64)>,
    bpf_stats_enabled: i64,
    vms: i64,
    map_entries: Vec<(Labels, i64)>,
    snapshot_reads: u64,
    backend_cpu: Vec<(Labels, f64)>,
    backend_packets: Vec<(Labels, u64)>,
    disk_cpu: Vec<(Labels, f64)>,
    disk_requests: Vec<(Labels, u64)>,
    vfio_posted: Vec<(Labels, i64)>,
    posted_host_events: Vec<(Labels, u64)>,
    timeline_samples: u64,
    timeline_ambiguous: u64,
}

impl Exposition {
    pub fn gather(
        series: &[Labelled],
        sampled: &SampledBySeries,
        layout: &Layout,
        st: &Status,
    ) -> Self {
        let mut vms = BTreeSet::new();
        let histograms = series
            .iter()
            .map(|s| {
                let mut labels = l(&[("stage", s.stage.name), ("path", s.stage.path.name())]);
                for (k, v) in &s.labels {
                    if *k == "vm" && !v.is_empty() {
                        vms.insert(v.clone());
                    }
                    labels.push((k, Value(v.clone())));
                }
                let mut exemplars: Vec<(usize, Exemplar)> = Vec::new();
                let slow = s.series.quantile(0.9).map_or(0, |p| bucket_index(p as u64));
                let samples = sampled.get(&(s.stage.id, s.labels.clone()));
                for &(bucket, trace, seconds, unix_ns) in samples.into_iter().flatten() {
                    if bucket < slow {
                        continue;
                    }
                    let i = layout.classic_index(bucket);
                    let e = Exemplar {
                        labels: exemplar_labels(trace, &s.labels),
                        seconds,
                        unix_ns,
                    };
                    match exemplars.iter_mut().find(|(j, _)| *j == i) {
                        Some((_, old)) if old.unix_ns < unix_ns => *old = e,
                        Some(_) => {}
                        None => exemplars.push((i, e)),
                    }
                }
                exemplars.sort_by_key(|(i, _)| *i);
                HistogramSeries {
                    labels,
                    exemplars,
                    series: s.series.clone(),
                    sum_seconds: s.series.sum_ns as f64 / 1e9,
                    count: s.series.count(),
                    buckets: layout.buckets(&s.series),
                }
            })
            .collect();
        let attached = st
            .report
            .iter()
            .map(|r| {
                let attach = r.attach.as_deref().unwrap_or("none");
                (
                    l(&[("stage", r.stage), ("path", r.path), ("attach", attach)]),
                    r.attached as i64,
                )
            })
            .collect();
        let per_program = |f: &dyn Fn(&ProgramStats) -> u64| -> Vec<(Labels, u64)> {
            st.programs
                .iter()
                .map(|p| (l(&[("program", &p.program)]), f(p)))
                .collect()
        };
        Exposition {
            histograms,
            attached,
            dropped: st
                .dropped
                .iter()
                .map(|(stage, reason, n)| (l(&[("stage", stage), ("reason", reason)]), *n))
                .collect(),
            map_full: st
                .map_full
                .iter()
                .map(|(m, n)| (l(&[("map", m)]), *n))
                .collect(),
            run_time: st
                .programs
                .iter()
                .map(|p| (l(&[("program", &p.program)]), p.run_time.as_secs_f64()))
                .collect(),
            run_count: per_program(&|p| p.run_count),
            recursion_misses: per_program(&|p| p.recursion_misses),
            bpf_stats_enabled: st.bpf_stats_enabled as i64,
            vms: vms.len() as i64,
            map_entries: st
                .map_entries
                .iter()
                .map(|(m, n)| (l(&[("map", m)]), *n as i64))
                .collect(),
            snapshot_reads: st.snapshot_reads,
            backend_cpu: st
                .backends
                .iter()
                .map(|(labels, c)| (backend_labels(labels), c.cpu_ns as f64 / 1e9))
                .collect(),
            backend_packets: st
                .backends
                .iter()
                .map(|(labels, c)| (backend_labels(labels), c.done))
                .collect(),
            disk_cpu: st
                .disks
                .iter()
                .map(|(labels, c)| (backend_labels(labels), c.cpu_ns as f64 / 1e9))
                .collect(),
            disk_requests: st
                .disks
                .iter()
                .map(|(labels, c)| (backend_labels(labels), c.done))
                .collect(),
            vfio_posted: st
                .posted
                .iter()
                .map(|(labels, p)| (backend_labels(labels), *p as i64))
                .collect(),
            posted_host_events: st
                .posted_host_events
                .iter()
                .map(|(kind, n)| (l(&[("kind", kind)]), *n))
                .collect(),
            timeline_samples: st.timeline_samples,
            timeline_ambiguous: st.timeline_ambiguous,
        }
    }

    /// Encodes as OpenMetrics text (the classic histograms only: text has no native ones),
    /// with exemplars.
    pub fn encode(self) -> String {
        let this = Arc::new(self);
        this.with_exemplars(&Self::openmetrics(&this))
    }

    /// The same without exemplars, of a shared exposition (a scrape's, which the other forms
    /// may read later; Prometheus text 0.0.4 is derived from it).
    pub fn openmetrics(this: &Arc<Exposition>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Shared(this.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// `om` (this exposition's OpenMetrics) with the exemplars added to their bucket lines.
    /// prometheus-client builds exemplars only from its own metric types; its encoder writes
    /// this family first, series by series, each's buckets in order: the bucket lines are the
    /// series' buckets in that order.
    pub fn with_exemplars(&self, om: &str) -> String {
        if self.histograms.iter().all(|h| h.exemplars.is_empty()) {
            return om.to_string();
        }
        let prefix = format!("{}_seconds_bucket{{", LATENCY.0);
        let mut out = String::with_capacity(om.len() + 4096);
        let mut slots = self
            .histograms
            .iter()
            .flat_map(|h| (0..h.buckets.len()).map(move |i| (h, i)));
        for line in om.lines() {
            out.push_str(line);
            if line.starts_with(&prefix) {
                let slot = slots.next();
                if let Some((_, e)) =
                    slot.and_then(|(h, i)| h.exemplars.iter().find(|(j, _)| *j == i))
                {
                    out.push_str(" # {");
                    for (n, (name, v)) in e.labels.iter().enumerate() {
                        if n > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{name}=\"{}\"", escape(&v.0));
                    }
                    let (secs, ms) = (e.unix_ns / 1_000_000_000, e.unix_ns / 1_000_000 % 1000);
                    let _ = write!(out, "}} {} {secs}.{ms:03}", e.seconds);
                }
            }
            out.push('\n');
        }
        out
    }
}

/// Prometheus text format 0.0.4, for clients that do not accept OpenMetrics: counters are named
/// with `_total` in HELP/TYPE, and UNIT and EOF lines go. Label escaping is the same.
pub fn openmetrics_to_text(om: &str) -> String {
    let mut counters = BTreeSet::new();
    for line in om.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|r| r.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Shortcut for a family of gauges or counters with label sets.
fn family<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    ty: MetricType,
    rows: &[(Labels, V)],
    mut put: impl FnMut(&mut prometheus_client::encoding::MetricEncoder, &V) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, ty)?;
    for (labels, v) in rows {
        let mut e = m.encode_family(labels)?;
        put(&mut e, v)?;
    }
    Ok(())
}

fn counter(e: &mut prometheus_client::encoding::MetricEncoder, v: &u64) -> std::fmt::Result {
    e.encode_counter::<NoLabelSet, _, u64>(v, None)
}

pub(crate) struct HistogramRef<'a> {
    pub labels: &'a Labels,
    pub series: &'a Series,
    pub sum_seconds: f64,
    pub buckets: &'a [(f64, u64)],
    pub exemplars: &'a [(usize, Exemplar)],
}

/// A family's values: what both encoders (text and protobuf) walk.
pub(crate) enum Rows {
    Gauge(Vec<(Labels, i64)>),
    Counter(Vec<(Labels, u64)>),
    /// A counter of seconds.
    Seconds(Vec<(Labels, f64)>),
}

/// One family besides the latency histograms: its name before the unit and `_total`.
pub(crate) struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub seconds: bool,
    pub rows: Rows,
}

/// Name and help of the latency histograms (the classic family; the native one adds
/// `_native` before the unit).
pub(crate) const LATENCY: (&str, &str) = (
    "iopath_stage_latency",
    "Latency of one stage of an I/O path, between the two kernel events that bound it.",
);

#[cfg(test)]
impl Status<'static> {
    /// A status with nothing in it, for tests of the histograms.
    pub(crate) fn empty() -> Self {
        Status {
            report: &[],
            programs: &[],
            bpf_stats_enabled: false,
            dropped: &[],
            map_full: &[],
            map_entries: &[],
            snapshot_reads: 0,
            backends: &[],
            disks: &[],
            posted: &[],
            posted_host_events: &[],
            timeline_samples: 0,
            timeline_ambiguous: 0,
        }
    }
}

impl Exposition {
    /// Each histogram series: labels, the kernel's buckets, sum in seconds, the classic
    /// layout's buckets (as [`Layout::buckets`] gives them) and their exemplars.
    pub(crate) fn histograms(&self) -> impl Iterator<Item = HistogramRef<'_>> {
        self.histograms.iter().map(|h| HistogramRef {
            labels: &h.labels,
            series: &h.series,
            sum_seconds: h.sum_seconds,
            buckets: &h.buckets,
            exemplars: &h.exemplars,
        })
    }

    /// Every family but the histograms, in exposition order.
    pub(crate) fn families(&self) -> Vec<Family> {
        let f = |name, help, seconds, rows| Family {
            name,
            help,
            seconds,
            rows,
        };
        let one = |v: i64| vec![(Labels::new(), v)];
        vec![
            f(
                "iopath_stage_attached",
                "1 when the stage's probes are attached on this kernel (attach = program families), 0 when unavailable.",
                false,
                Rows::Gauge(self.attached.clone()),
            ),
            f(
                "iopath_events_dropped",
                "Events that gave no sample, by stage and reason (map full, read error, no start, stale or ambiguous start, unknown VM, ...).",
                false,
                Rows::Counter(self.dropped.clone()),
            ),
            f(
                "iopath_map_full",
                "Inserts refused by a full kernel map that every KVM stage shares.",
                false,
                Rows::Counter(self.map_full.clone()),
            ),
            f(
                "iopath_program_run_time",
                "CPU time spent in each attached BPF program (kernel.bpf_stats).",
                true,
                Rows::Seconds(self.run_time.clone()),
            ),
            f(
                "iopath_program_run_count",
                "Runs of each attached BPF program (kernel.bpf_stats).",
                false,
                Rows::Counter(self.run_count.clone()),
            ),
            f(
                "iopath_program_recursion_misses",
                "Runs of each attached BPF program the kernel skipped because it was already running on that CPU: events lost to it.",
                false,
                Rows::Counter(self.recursion_misses.clone()),
            ),
            f(
                "iopath_kernel_map_entries",
                "Entries in the kernel maps that grow with VMs, threads, devices and requests (those of exited VMs and removed devices are collected after the grace period).",
                false,
                Rows::Gauge(self.map_entries.clone()),
            ),
            f(
                "iopath_backend_cpu",
                "On-CPU time of the threads that take a tap's packets (QEMU's, a vhost worker), from the read that first saw each: rate(packets) / rate(this) is the packets per second one such thread could move.",
                true,
                Rows::Seconds(self.backend_cpu.clone()),
            ),
            f(
                "iopath_backend_packets",
                "Packets a backend moved over the same time: taken off its tap (net.rx.backend_queue) and written to it and sent on an uplink (net.tx.host_stack).",
                false,
                Rows::Counter(self.backend_packets.clone()),
            ),
            f(
                "iopath_disk_backend_cpu",
                "On-CPU time of a VM's threads that submit its requests to a host disk (QEMU's workers, an iothread, an io_uring or AIO submitter), from the read that first saw each: rate(requests) / rate(this) is the IOPS one such thread could sustain.",
                true,
                Rows::Seconds(self.disk_cpu.clone()),
            ),
            f(
                "iopath_disk_backend_requests",
                "Requests those threads submitted to the disk over the same time (blk.device samples of the VM and disk).",
                false,
                Rows::Counter(self.disk_requests.clone()),
            ),
            f(
                "iopath_vfio_irq_posted",
                "1 while KVM posts the VFIO IRQ to a vCPU (kvm:kvm_pi_irte_update): its interrupts reach a running guest with no host event, so vfio.handler has no sample of them; 0 when remapped (the host's handler runs).",
                false,
                Rows::Gauge(self.vfio_posted.clone()),
            ),
            f(
                "iopath_posted_interrupt_host_events",
                "This host's posted-interrupt events from /proc/interrupts: notification (PIN: the vCPU was not in guest mode) and wakeup (PIW: a halted vCPU woken). A posted interrupt to a running vCPU has none.",
                false,
                Rows::Counter(self.posted_host_events.clone()),
            ),
            f(
                "iopath_snapshot_reads",
                "Reads of the kernel's counts: scrapes that arrive while one is read share it.",
                false,
                Rows::Counter(vec![(Labels::new(), self.snapshot_reads)]),
            ),
            f(
                "iopath_timeline_samples",
                "Sampled events read off the timeline ring (one 16.8 ms window in --timeline-every).",
                false,
                Rows::Counter(vec![(Labels::new(), self.timeline_samples)]),
            ),
            f(
                "iopath_timeline_ambiguous",
                "Sampled events with two candidates for the stage before them: each starts a timeline of its own.",
                false,
                Rows::Counter(vec![(Labels::new(), self.timeline_ambiguous)]),
            ),
            f(
                "iopath_bpf_stats_enabled",
                "1 when kernel.bpf_stats_enabled is on (program run time is measured).",
                false,
                Rows::Gauge(one(self.bpf_stats_enabled)),
            ),
            f(
                "iopath_series",
                "Histogram label sets exported.",
                false,
                Rows::Gauge(one(self.histograms.len() as i64)),
            ),
            f(
                "iopath_vms",
                "Distinct VMs among the exported series.",
                false,
                Rows::Gauge(one(self.vms)),
            ),
        ]
    }
}

/// The registry takes a collector it owns.
#[derive(Debug)]
struct Shared(Arc<Exposition>);

impl Collector for Shared {
    fn encode(&self, enc: DescriptorEncoder) -> std::fmt::Result {
        Collector::encode(&*self.0, enc)
    }
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(
            LATENCY.0,
            LATENCY.1,
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for h in &self.histograms {
            m.encode_family(&h.labels)?.encode_histogram::<NoLabelSet>(
                h.sum_seconds,
                h.count,
                &h.buckets,
                None,
            )?;
        }
        for f in self.families() {
            let unit = f.seconds.then_some(&Unit::Seconds);
            match &f.rows {
                Rows::Gauge(rows) => family(
                    &mut enc,
                    f.name,
                    f.help,
                    unit,
                    MetricType::Gauge,
                    rows,
                    |e, v| e.encode_gauge(v),
                )?,
                Rows::Counter(rows) => family(
                    &mut enc,
                    f.name,
                    f.help,
                    unit,
                    MetricType::Counter,
                    rows,
                    counter,
                )?,
                Rows::Seconds(rows) => family(
                    &mut enc,
                    f.name,
                    f.help,
                    unit,
                    MetricType::Counter,
                    rows,
                    |e, v| e.encode_counter::<NoLabelSet, _, u64>(v, None),
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counters_with_total() {
        let om = "# HELP x_dropped Drops.\n# TYPE x_dropped counter\nx_dropped_total{a=\"b\"} 1\n\
# HELP x_lat Latency.\n# TYPE x_lat_seconds histogram\n# UNIT x_lat_seconds seconds\nx_lat_seconds_count 0\n# EOF\n";
        let text = openmetrics_to_text(om);
        assert_eq!(
            text,
            "# HELP x_dropped_total Drops.\n# TYPE x_dropped_total counter\nx_dropped_total{a=\"b\"} 1\n\
# HELP x_lat Latency.\n# TYPE x_lat_seconds histogram\nx_lat_seconds_count 0\n"
        );
    }

    #[test]
    fn exemplars_go_on_their_own_series_slow_buckets() {
        use tracer_common::hist::bucket_index;
        let series = |vm: &str, values: &[u64]| {
            let mut s = Series::default();
            for &v in values {
                s.buckets[bucket_index(v) as usize] += 1;
                s.sum_ns += v;
            }
            Labelled {
                stage: crate::stages::stage(StageId::BlkDevice),
                labels: vec![("vm", vm.to_string()), ("disk", "loop0".into())],
                series: s,
            }
        };
        // a and b: 5 fast events and 5 slow ones (the p90 is in the slow ones' bucket)
        let mut values = vec![10_000u64; 5];
        values.extend([3_000_000; 5]);
        let (a, b) = (series("a", &values), series("b\"x", &values));
        let mut sampled = BTreeMap::new();
        // a's fast bucket (under its p90: no exemplar) and slow one; b's slow one
        sampled.insert(
            (StageId::BlkDevice, a.labels.clone()),
            vec![
                (bucket_index(10_000), 0xa1, 10e-6, 100_000_000_000),
                (bucket_index(3_000_000), 0xa2, 3e-3, 101_500_000_000),
            ],
        );
        sampled.insert(
            (StageId::BlkDevice, b.labels.clone()),
            vec![(bucket_index(3_000_000), 0xb2, 3e-3, 102_250_000_000)],
        );
        let st = Status::empty();
        let layout = Layout::default();
        let e = Exposition::gather(&[a, b], &sampled, &layout, &st);
        let om = e.clone().encode();
        let with: Vec<&str> = om.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(with.len(), 2, "{om}");
        // each on the bucket that holds 3 ms (le 2^-8 s = 3.906 ms), of its own series
        assert!(
            with[0].starts_with("iopath_stage_latency_seconds_bucket{")
                && with[0].contains("vm=\"a\"")
                && with[0].contains("le=\"0.00390625\"")
                && with[0].ends_with(" # {trace_id=\"00000000000000a2\",vm=\"a\"} 0.003 101.500"),
            "{}",
            with[0]
        );
        assert!(
            with[1].contains("vm=\"b\\\"x\"")
                && with[1]
                    .ends_with(" # {trace_id=\"00000000000000b2\",vm=\"b\\\"x\"} 0.003 102.250"),
            "{}",
            with[1]
        );
        // the text format has none
        assert!(!openmetrics_to_text(&Exposition::openmetrics(&Arc::new(e))).contains(" # {"));
    }

    #[test]
    fn exemplar_labels_stay_within_128_characters() {
        let long = "v".repeat(100);
        let l = exemplar_labels(1, &[("vm", long.clone()), ("device", "7:0".into())]);
        let names: Vec<_> = l.iter().map(|(k, _)| *k).collect();
        // trace_id (24) + vm (102) fit; device (9 more) does not
        assert_eq!(names, ["trace_id", "vm"]);
        let l = exemplar_labels(1, &[("vm", "db".into()), ("vcpu", "3".into())]);
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn label_values_are_escaped() {
        let e = Exposition {
            map_entries: vec![(l(&[("map", "bad\"name\nx\\y")]), 1)],
            ..Default::default()
        };
        let om = e.encode();
        assert!(
            om.contains(r#"iopath_kernel_map_entries{map="bad\"name\nx\\y"} 1"#),
            "{om}"
        );
        assert!(openmetrics_to_text(&om).contains(r#"{map="bad\"name\nx\\y"}"#));
    }
}
