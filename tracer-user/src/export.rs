//! Prometheus exposition (OpenMetrics text, by prometheus-client). The histograms are counted in
//! the kernel, so they go through a custom collector that encodes the summed buckets as they are.
//!
//! Families:
//! - `iopath_stage_latency_seconds{stage,path,<stage labels>}` histogram, one series per stage
//!   and label set; `le` bounds are the kernel's log-linear bucket bounds.
//! - `iopath_stage_attached{stage,path,attach}` gauge: 1 attached (attach = variant), 0 not.
//! - `iopath_events_dropped_total{stage,reason}` counter: events lost (map full, read error) and
//!   ends without a start (`unmatched`).
//! - `iopath_program_run_time_seconds_total{program}`, `iopath_program_run_count_total{program}`:
//!   kernel.bpf_stats per attached program (zero unless `iopath_bpf_stats_enabled` is 1).
//! - `iopath_series`, `iopath_vms` gauges: label sets exported and distinct VMs among them.
//! - `iopath_kernel_map_entries{map}` gauge: entries of the kernel maps that grow with VMs.

use std::{collections::BTreeSet, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::{Registry, Unit},
};

use crate::{attach::StageReport, hist::Snapshot, labels::Labeler, stages};

type Labels = Vec<(String, String)>;

#[derive(Debug, Default)]
struct HistogramSeries {
    labels: Labels,
    sum_seconds: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// Everything one scrape exposes, gathered before encoding.
#[derive(Debug, Default)]
pub struct Exposition {
    histograms: Vec<HistogramSeries>,
    attached: Vec<(Labels, i64)>,
    dropped: Vec<(Labels, u64)>,
    run_time: Vec<(Labels, f64)>,
    run_count: Vec<(Labels, u64)>,
    bpf_stats_enabled: i64,
    vms: i64,
    map_entries: Vec<(Labels, i64)>,
}

/// Per-program kernel statistics.
pub struct ProgramStats {
    pub program: String,
    pub run_time: Duration,
    pub run_count: u64,
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Exposition {
    pub fn gather(
        snap: &Snapshot,
        labeler: &mut Labeler,
        report: &[StageReport],
        programs: &[ProgramStats],
        bpf_stats_enabled: bool,
        maps: &[(&str, usize)],
    ) -> Self {
        let mut vms = BTreeSet::new();
        let histograms = snap
            .series
            .iter()
            .map(|(key, series)| {
                let stage = stages::stage(key.stage);
                let mut labels = l(&[("stage", stage.name), ("path", stage.path.name())]);
                let extra = labeler.labels(key);
                if let Some((_, vm)) = extra.iter().find(|(k, v)| k == "vm" && !v.is_empty()) {
                    vms.insert(vm.clone());
                }
                labels.extend(extra);
                HistogramSeries {
                    labels,
                    sum_seconds: series.sum_ns as f64 / 1e9,
                    count: series.count(),
                    buckets: series.prometheus_buckets(),
                }
            })
            .collect();
        let attached = report
            .iter()
            .map(|r| {
                (
                    l(&[
                        ("stage", r.stage),
                        ("path", r.path),
                        ("attach", r.attach.unwrap_or("none")),
                    ]),
                    r.attached as i64,
                )
            })
            .collect();
        let dropped = snap
            .counters
            .iter()
            .map(|((stage, reason), n)| {
                (
                    l(&[("stage", stages::stage(*stage).name), ("reason", reason)]),
                    *n,
                )
            })
            .collect();
        let run_time = programs
            .iter()
            .map(|p| (l(&[("program", &p.program)]), p.run_time.as_secs_f64()))
            .collect();
        let run_count = programs
            .iter()
            .map(|p| (l(&[("program", &p.program)]), p.run_count))
            .collect();
        Exposition {
            histograms,
            attached,
            dropped,
            run_time,
            run_count,
            bpf_stats_enabled: bpf_stats_enabled as i64,
            vms: vms.len() as i64,
            map_entries: maps
                .iter()
                .map(|(m, n)| (l(&[("map", m)]), *n as i64))
                .collect(),
        }
    }

    /// Encodes as OpenMetrics text.
    pub fn encode(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Prometheus text format 0.0.4, for clients that do not accept OpenMetrics: counters are named
/// with `_total` in HELP/TYPE, and UNIT and EOF lines go.
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

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(
            "iopath_stage_latency",
            "Latency of one stage of an I/O path, between the two kernel events that bound it.",
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
        family(
            &mut enc,
            "iopath_stage_attached",
            "1 when the stage's probes are attached on this kernel (attach = implementation), 0 when unavailable.",
            None,
            MetricType::Gauge,
            &self.attached,
            |e, v| e.encode_gauge(v),
        )?;
        family(
            &mut enc,
            "iopath_events_dropped",
            "Events not counted in a histogram, by stage and reason (map full, read error, end without start).",
            None,
            MetricType::Counter,
            &self.dropped,
            |e, v| e.encode_counter::<NoLabelSet, _, u64>(v, None),
        )?;
        family(
            &mut enc,
            "iopath_program_run_time",
            "CPU time spent in each attached BPF program (kernel.bpf_stats).",
            Some(&Unit::Seconds),
            MetricType::Counter,
            &self.run_time,
            |e, v| e.encode_counter::<NoLabelSet, _, u64>(v, None),
        )?;
        family(
            &mut enc,
            "iopath_program_run_count",
            "Runs of each attached BPF program (kernel.bpf_stats).",
            None,
            MetricType::Counter,
            &self.run_count,
            |e, v| e.encode_counter::<NoLabelSet, _, u64>(v, None),
        )?;
        family(
            &mut enc,
            "iopath_kernel_map_entries",
            "Entries in the kernel maps that grow with VMs and threads (exited VMs are removed after the grace period).",
            None,
            MetricType::Gauge,
            &self.map_entries,
            |e, v| e.encode_gauge(v),
        )?;
        for (name, help, v) in [
            (
                "iopath_bpf_stats_enabled",
                "1 when kernel.bpf_stats_enabled is on (program run time is measured).",
                self.bpf_stats_enabled,
            ),
            (
                "iopath_series",
                "Histogram label sets exported.",
                self.histograms.len() as i64,
            ),
            (
                "iopath_vms",
                "Distinct VMs among the exported series.",
                self.vms,
            ),
        ] {
            enc.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&v)?;
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
}
