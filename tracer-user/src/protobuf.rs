//! The Prometheus protobuf exposition (io.prometheus.client.MetricFamily, length-delimited), the
//! only one that carries native histograms. Prometheus asks for it first when its
//! native-histograms feature is on. prometheus-client's own protobuf is OpenMetrics' data model,
//! which Prometheus does not scrape, so the few messages needed are encoded here by hand.
//!
//! It holds every family of the text exposition, with the same names and values, and one more:
//! `iopath_stage_latency_native_seconds`, the same series as native histograms of schema 3,
//! bucket for bucket the kernel's (`tracer_common::hist`): exact, not re-bucketed. It is a family
//! of its own because a Prometheus before 2.45 keeps only the native part of a histogram that
//! has both, and the dashboards read the classic buckets.

use tracer_common::hist::{SCHEMA, ZERO_K};

use crate::{
    export::{Exemplar, Exposition, LATENCY, Labels, Rows},
    hist::{Series, native_bound_seconds},
};

pub const CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

// client_model's MetricType.
const COUNTER: u64 = 0;
const GAUGE: u64 = 1;
const HISTOGRAM: u64 = 4;

/// A protobuf message being written.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn tag(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }
    fn uint(&mut self, field: u32, v: u64) {
        self.tag(field, 0);
        self.varint(v);
    }
    fn sint(&mut self, field: u32, v: i64) {
        self.uint(field, ((v << 1) ^ (v >> 63)) as u64);
    }
    fn double(&mut self, field: u32, v: f64) {
        self.tag(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.tag(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn msg(&mut self, field: u32, m: Msg) {
        self.bytes(field, &m.0);
    }
}

/// A Metric with its labels; `put` adds the value message.
fn metric(labels: &Labels, put: impl FnOnce(&mut Msg)) -> Msg {
    let mut m = Msg::default();
    for (k, v) in labels {
        let mut pair = Msg::default();
        pair.bytes(1, k.as_bytes());
        pair.bytes(2, v.0.as_bytes());
        m.msg(1, pair);
    }
    put(&mut m);
    m
}

/// Appends one length-delimited MetricFamily (none if it has no metric).
fn family(out: &mut Vec<u8>, name: &str, help: &str, ty: u64, metrics: Vec<Msg>) {
    if metrics.is_empty() {
        return;
    }
    let mut f = Msg::default();
    f.bytes(1, name.as_bytes());
    f.bytes(2, help.as_bytes());
    f.uint(3, ty);
    for m in metrics {
        f.msg(4, m);
    }
    let mut len = Msg::default();
    len.varint(f.0.len() as u64);
    out.extend_from_slice(&len.0);
    out.extend_from_slice(&f.0);
}

/// A single-value message (Gauge, Counter: field 1, a double).
fn value(v: f64) -> Msg {
    let mut m = Msg::default();
    m.double(1, v);
    m
}

/// A native Histogram of schema 3 holding `series`' kernel buckets, one for one.
fn native_histogram(series: &Series, sum_seconds: f64) -> Msg {
    let n = series.native();
    let mut h = Msg::default();
    h.uint(1, series.count());
    h.double(2, sum_seconds);
    h.sint(5, SCHEMA as i64);
    h.double(6, native_bound_seconds(ZERO_K));
    h.uint(7, n.zero_count);
    // Spans: the first at its index, each next one after the gap it leaves; deltas: each
    // bucket's count less the previous bucket's, across spans.
    let mut end = 0i32;
    let mut prev = 0i64;
    let mut deltas = Vec::new();
    for (i, (k, counts)) in n.spans.iter().enumerate() {
        let mut span = Msg::default();
        span.sint(1, if i == 0 { *k } else { k - end } as i64);
        span.uint(2, counts.len() as u64);
        h.msg(12, span);
        end = k + counts.len() as i32;
        for &c in counts {
            deltas.push(c as i64 - prev);
            prev = c as i64;
        }
    }
    for d in deltas {
        h.sint(13, d);
    }
    h
}

/// An Exemplar: its labels, value and google.protobuf.Timestamp.
fn exemplar(e: &Exemplar) -> Msg {
    let mut x = metric(&e.labels, |_| {});
    x.double(2, e.seconds);
    let mut ts = Msg::default();
    ts.uint(1, e.unix_ns / 1_000_000_000);
    ts.uint(2, e.unix_ns % 1_000_000_000);
    x.msg(3, ts);
    x
}

impl Exposition {
    /// Encodes every family as delimited MetricFamily messages.
    pub fn encode_protobuf(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let name = format!("{}_seconds", LATENCY.0);
        let classic = self
            .histograms()
            .map(|r| {
                metric(r.labels, |m| {
                    let mut h = Msg::default();
                    let count: u64 = r.buckets.iter().map(|(_, n)| n).sum();
                    h.uint(1, count);
                    h.double(2, r.sum_seconds);
                    // Cumulative. Prometheus adds +Inf from the count: it is written only to
                    // carry an exemplar.
                    let mut cum = 0;
                    let last = r.buckets.len() - 1;
                    for (i, &(le, n)) in r.buckets.iter().enumerate() {
                        cum += n;
                        let e = r.exemplars.iter().find(|(j, _)| *j == i).map(|(_, e)| e);
                        if i == last && e.is_none() {
                            break;
                        }
                        let mut b = Msg::default();
                        b.uint(1, cum);
                        b.double(2, if i == last { f64::INFINITY } else { le });
                        if let Some(e) = e {
                            b.msg(3, exemplar(e));
                        }
                        h.msg(3, b);
                    }
                    m.msg(7, h);
                })
            })
            .collect();
        family(&mut out, &name, LATENCY.1, HISTOGRAM, classic);
        let native = self
            .histograms()
            .map(|r| {
                metric(r.labels, |m| {
                    m.msg(7, native_histogram(r.series, r.sum_seconds))
                })
            })
            .collect();
        let help = format!(
            "{} Native histogram (schema {SCHEMA}) of the kernel's own buckets.",
            LATENCY.1
        );
        family(
            &mut out,
            &format!("{}_native_seconds", LATENCY.0),
            &help,
            HISTOGRAM,
            native,
        );
        for f in self.families() {
            let unit = if f.seconds { "_seconds" } else { "" };
            let (ty, suffix, metrics) = match &f.rows {
                Rows::Gauge(rows) => (
                    GAUGE,
                    "",
                    rows.iter()
                        .map(|(l, v)| metric(l, |m| m.msg(2, value(*v as f64))))
                        .collect(),
                ),
                Rows::Counter(rows) => (
                    COUNTER,
                    "_total",
                    rows.iter()
                        .map(|(l, v)| metric(l, |m| m.msg(3, value(*v as f64))))
                        .collect(),
                ),
                Rows::Seconds(rows) => (
                    COUNTER,
                    "_total",
                    rows.iter()
                        .map(|(l, v)| metric(l, |m| m.msg(3, value(*v))))
                        .collect(),
                ),
            };
            family(
                &mut out,
                &format!("{}{unit}{suffix}", f.name),
                f.help,
                ty,
                metrics,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::hist::bucket_index;

    use super::*;
    use crate::{
        export::Status,
        hist::{Layout, Series},
        session::Labelled,
    };

    /// A field of a decoded message: varint, 64-bit, or bytes.
    #[derive(Debug, Clone)]
    enum F {
        V(u64),
        D(f64),
        B(Vec<u8>),
    }

    fn decode(mut b: &[u8]) -> Vec<(u32, F)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let (mut v, mut shift) = (0u64, 0);
            loop {
                let x = b[0];
                *b = &b[1..];
                v |= ((x & 0x7f) as u64) << shift;
                if x < 0x80 {
                    return v;
                }
                shift += 7;
            }
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let tag = varint(&mut b);
            let f = match tag & 7 {
                0 => F::V(varint(&mut b)),
                1 => {
                    let v = f64::from_le_bytes(b[..8].try_into().unwrap());
                    b = &b[8..];
                    F::D(v)
                }
                2 => {
                    let n = varint(&mut b) as usize;
                    let v = b[..n].to_vec();
                    b = &b[n..];
                    F::B(v)
                }
                w => panic!("wire type {w}"),
            };
            out.push(((tag >> 3) as u32, f));
        }
        out
    }

    fn get(m: &[(u32, F)], field: u32) -> Vec<F> {
        m.iter()
            .filter(|(f, _)| *f == field)
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn bytes(f: &F) -> &[u8] {
        match f {
            F::B(b) => b,
            _ => panic!("{f:?}"),
        }
    }
    fn uint(f: &F) -> u64 {
        match f {
            F::V(v) => *v,
            _ => panic!("{f:?}"),
        }
    }
    fn zigzag(f: &F) -> i64 {
        let v = uint(f);
        (v >> 1) as i64 ^ -((v & 1) as i64)
    }

    /// A decoded message: its fields in order.
    type Message = Vec<(u32, F)>;

    /// The delimited families: (name, type, metrics).
    fn families(mut b: &[u8]) -> Vec<(String, u64, Vec<Message>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let (mut n, mut shift, mut used) = (0usize, 0, 0);
            loop {
                let x = b[used];
                used += 1;
                n |= ((x & 0x7f) as usize) << shift;
                if x < 0x80 {
                    break;
                }
                shift += 7;
            }
            let f = decode(&b[used..used + n]);
            b = &b[used + n..];
            let name = String::from_utf8(bytes(&get(&f, 1)[0]).to_vec()).unwrap();
            let ty = uint(&get(&f, 3)[0]);
            let metrics = get(&f, 4).iter().map(|m| decode(bytes(m))).collect();
            out.push((name, ty, metrics));
        }
        out
    }

    fn exposition(values_ns: &[u64]) -> (Exposition, Series) {
        let mut s = Series::default();
        for &v in values_ns {
            s.buckets[bucket_index(v) as usize] += 1;
            s.sum_ns += v;
        }
        let series = [Labelled {
            stage: crate::stages::stage(tracer_common::stage::StageId::BlkDevice),
            labels: vec![("vm", "db\"1".into()), ("disk", "loop0".into())],
            series: s.clone(),
        }];
        let programs = [crate::export::ProgramStats {
            program: "blk_rq_issue_btf".into(),
            run_time: std::time::Duration::from_millis(5),
            run_count: 10,
            recursion_misses: 0,
        }];
        let mut cost = crate::backend::Cost::default();
        cost.cpu_ns = 1000;
        cost.done = 3;
        let backends = [(
            vec![
                ("vm", "db".to_string()),
                ("backend", "vhost".into()),
                ("tap", "tap0".into()),
            ],
            cost,
        )];
        let st = Status {
            report: &[],
            programs: &programs,
            bpf_stats_enabled: true,
            dropped: &[("blk.device", "stale", 3)],
            map_full: &[],
            map_entries: &[("HIST", 9)],
            snapshot_reads: 2,
            backends: &backends,
            disks: &[],
            posted: &[],
            posted_host_events: &[],
            timeline_samples: 0,
            timeline_ambiguous: 0,
        };
        (
            Exposition::gather(&series, &Default::default(), &Layout::default(), &st),
            s,
        )
    }

    #[test]
    fn native_buckets_are_the_kernels_own() {
        // Zero bucket, two lone buckets, three adjacent ones at 1 s: three spans.
        let values = [
            100,
            200,
            5_000,
            50_000,
            1_000_000_000,
            1_000_000_001,
            1_000_000_001,
            1_100_000_000,
        ];
        let (e, s) = exposition(&values);
        let fams = families(&e.encode_protobuf());
        let (_, ty, metrics) = fams
            .iter()
            .find(|f| f.0 == "iopath_stage_latency_native_seconds")
            .unwrap();
        assert_eq!(*ty, HISTOGRAM);
        assert_eq!(metrics.len(), 1);
        let labels: Vec<(String, String)> = get(&metrics[0], 1)
            .iter()
            .map(|p| {
                let p = decode(bytes(p));
                let s = |f| String::from_utf8(bytes(&get(&p, f)[0]).to_vec()).unwrap();
                (s(1), s(2))
            })
            .collect();
        // raw, not escaped as text is
        assert!(
            labels.contains(&("vm".into(), "db\"1".into())),
            "{labels:?}"
        );
        let h = decode(bytes(&get(&metrics[0], 7)[0]));
        assert_eq!(uint(&get(&h, 1)[0]), values.len() as u64);
        assert_eq!(zigzag(&get(&h, 5)[0]), 3);
        let F::D(zt) = get(&h, 6)[0] else { panic!() };
        assert_eq!(zt, 2f64.powi(-22));
        assert_eq!(uint(&get(&h, 7)[0]), 2);
        // Rebuild every bucket from spans and deltas, as Prometheus does.
        let mut rebuilt = Series::default();
        rebuilt.buckets[0] = 2;
        let deltas: Vec<i64> = get(&h, 13).iter().map(zigzag).collect();
        let (mut k, mut count, mut d) = (0i32, 0i64, deltas.iter());
        for (i, span) in get(&h, 12).iter().enumerate() {
            let span = decode(bytes(span));
            let offset = zigzag(&get(&span, 1)[0]) as i32;
            k = if i == 0 { offset } else { k + offset };
            for _ in 0..uint(&get(&span, 2)[0]) {
                count += d.next().unwrap();
                rebuilt.buckets[(k - ZERO_K) as usize] += count as u64;
                k += 1;
            }
        }
        assert!(d.next().is_none());
        assert_eq!(rebuilt.buckets, s.buckets);
        assert_eq!(get(&h, 12).len(), 3, "three spans");
    }

    /// Bytes written out by hand from metrics.proto, not by this encoder: a check of the
    /// field numbers and wire types that does not share the encoder's assumptions.
    #[test]
    fn a_native_histogram_and_a_gauge_family_match_bytes_written_by_hand() {
        // Two events: one at exactly 1 s (native bucket 0), one of 100 ns (zero bucket).
        let mut s = Series::default();
        s.buckets[bucket_index(1_000_000_000) as usize] = 1;
        s.buckets[0] = 1;
        let h = native_histogram(&s, 1.0);
        let mut want = vec![0x08, 0x02]; // sample_count (1, varint) = 2
        want.push(0x11); // sample_sum (2, fixed64)
        want.extend(1.0f64.to_le_bytes());
        want.extend([0x28, 0x06]); // schema (5, sint32) = 3, zigzag 6
        want.push(0x31); // zero_threshold (6, fixed64) = 2^-22
        want.extend(2f64.powi(-22).to_le_bytes());
        want.extend([0x38, 0x01]); // zero_count (7) = 1
        want.extend([0x62, 0x04, 0x08, 0x00, 0x10, 0x01]); // positive_span (12): offset 0, length 1
        want.extend([0x68, 0x02]); // positive_delta (13, sint64) = 1, zigzag 2
        assert_eq!(h.0, want);
        // A gauge family "a" of one metric, no labels, value 1: delimited.
        let mut out = Vec::new();
        family(
            &mut out,
            "a",
            "",
            GAUGE,
            vec![metric(&Vec::new(), |m| m.msg(2, value(1.0)))],
        );
        let mut fam = vec![0x0a, 0x01, b'a', 0x12, 0x00, 0x18, 0x01]; // name, help, type
        fam.extend([0x22, 0x0b, 0x12, 0x09, 0x09]); // metric (4) { gauge (2) { value (1) } }
        fam.extend(1.0f64.to_le_bytes());
        let mut delimited = vec![fam.len() as u8];
        delimited.extend(fam);
        assert_eq!(out, delimited);
    }

    #[test]
    fn an_exemplar_of_the_inf_bucket_is_written_with_an_explicit_inf_bucket() {
        // one event of 20 s: over the classic layout's last bound (16 s), so in +Inf
        let (_, s) = exposition(&[20_000_000_000]);
        let series = [Labelled {
            stage: crate::stages::stage(tracer_common::stage::StageId::BlkDevice),
            labels: vec![("vm", "db".into())],
            series: s,
        }];
        let mut sampled = crate::export::SampledBySeries::new();
        sampled.insert(
            (
                tracer_common::stage::StageId::BlkDevice,
                series[0].labels.clone(),
            ),
            vec![(bucket_index(20_000_000_000), 0xabc, 20.0, 5_000_000_000)],
        );
        let classic = |sampled| {
            let e = Exposition::gather(&series, sampled, &Layout::default(), &Status::empty());
            let fams = families(&e.encode_protobuf());
            let f = fams
                .into_iter()
                .find(|f| f.0 == "iopath_stage_latency_seconds")
                .unwrap();
            decode(bytes(&get(&f.2[0], 7)[0]))
        };
        let h = classic(&sampled);
        let buckets = get(&h, 3);
        assert_eq!(
            buckets.len(),
            Layout::default().bounds() + 1,
            "+Inf written"
        );
        let last = decode(bytes(buckets.last().unwrap()));
        assert!(matches!(get(&last, 2)[0], F::D(v) if v == f64::INFINITY));
        assert_eq!(uint(&get(&last, 1)[0]), 1);
        let ex = decode(bytes(&get(&last, 3)[0]));
        assert!(matches!(get(&ex, 2)[0], F::D(v) if v == 20.0));
        // and with no exemplar there, no +Inf bucket (Prometheus adds it from the count)
        let h = classic(&Default::default());
        assert_eq!(get(&h, 3).len(), Layout::default().bounds());
    }

    #[test]
    fn an_exemplar_matches_bytes_written_by_hand() {
        let e = Exemplar {
            labels: vec![("trace_id", crate::export::Value("ab".into()))],
            seconds: 0.5,
            unix_ns: 1_700_000_000_250_000_000,
        };
        let mut want = vec![0x0a, 0x0e]; // label (1) { name (1), value (2) }
        want.extend([0x0a, 0x08]);
        want.extend(b"trace_id");
        want.extend([0x12, 0x02, b'a', b'b']);
        want.push(0x11); // value (2, fixed64)
        want.extend(0.5f64.to_le_bytes());
        // timestamp (3) { seconds (1) = 1700000000, nanos (2) = 250000000 }
        let mut ts = vec![0x08];
        let mut v = 1_700_000_000u64;
        while v >= 0x80 {
            ts.push(v as u8 | 0x80);
            v >>= 7;
        }
        ts.push(v as u8);
        ts.extend([0x10, 0x80, 0xe5, 0x9a, 0x77]); // 250000000 as a varint
        want.push(0x1a);
        want.push(ts.len() as u8);
        want.extend(ts);
        assert_eq!(exemplar(&e).0, want);
    }

    #[test]
    fn every_text_family_is_there_with_its_samples() {
        let (e, _) = exposition(&[5_000, 7_000]);
        let fams = families(&e.encode_protobuf());
        let names: Vec<&str> = fams.iter().map(|f| f.0.as_str()).collect();
        let om = e.clone().encode();
        // every sample name of the text (a histogram's by its family) is a protobuf family
        for line in om.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| names.contains(f))
                .unwrap_or(name);
            assert!(names.contains(&family), "{family} not in {names:?}");
        }
        for seconds in [
            "iopath_program_run_time_seconds_total",
            "iopath_backend_cpu_seconds_total",
        ] {
            let f = fams
                .iter()
                .find(|f| f.0 == seconds)
                .unwrap_or_else(|| panic!("{seconds}"));
            assert_eq!(f.1, COUNTER);
        }
        let dropped = fams
            .iter()
            .find(|f| f.0 == "iopath_events_dropped_total")
            .unwrap();
        assert_eq!(dropped.1, COUNTER);
        let c = decode(bytes(&get(&dropped.2[0], 3)[0]));
        assert!(matches!(get(&c, 1)[0], F::D(v) if v == 3.0));
        // the classic family's cumulative buckets end at the layout's last bound, then count
        let classic = fams
            .iter()
            .find(|f| f.0 == "iopath_stage_latency_seconds")
            .unwrap();
        let h = decode(bytes(&get(&classic.2[0], 7)[0]));
        let buckets = get(&h, 3);
        assert_eq!(buckets.len(), Layout::default().bounds());
        let last = decode(bytes(buckets.last().unwrap()));
        assert_eq!(uint(&get(&last, 1)[0]), 2);
        assert!(matches!(get(&last, 2)[0], F::D(v) if v == 16.0));
    }
}
