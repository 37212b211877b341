//! Reading the kernel's histograms: per-CPU bucket counts summed into one cumulative snapshot per
//! series, and quantiles kept in an HdrHistogram fed with what the kernel added since the last
//! read. Kernel counters are never reset: every reader works on differences.

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap},
};
use hdrhistogram::Histogram;
use serde::Serialize;
use tracer_common::{
    hist::{BUCKETS, OVERFLOW, lower_bound_ns, upper_bound_ns},
    maps::{COUNTERS_LEN, Counter, HistKey, HistVal, counter_index},
    stage::StageId,
};

/// One series: a stage and its raw label values (decoded into labels by `labels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    pub stage: StageId,
    pub detail: u32,
    pub obj: u32,
    pub vm: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    /// Events per bucket (not cumulative), index = bucket.
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
}

impl Default for Series {
    fn default() -> Self {
        Series {
            buckets: vec![0; BUCKETS],
            sum_ns: 0,
        }
    }
}

impl Series {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// `self - earlier`, bucket by bucket (counters only grow; saturate if a series was reset).
    pub fn since(&self, earlier: Option<&Series>) -> Series {
        let Some(e) = earlier else {
            return self.clone();
        };
        Series {
            buckets: self
                .buckets
                .iter()
                .zip(&e.buckets)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(e.sum_ns),
        }
    }

    /// (upper bound in seconds, events) for every bucket, overflow last with `f64::MAX`: the form
    /// prometheus-client's encoder takes (it accumulates, and writes `f64::MAX` as `+Inf`).
    pub fn prometheus_buckets(&self) -> Vec<(f64, u64)> {
        (0..=OVERFLOW)
            .map(|i| {
                let le = upper_bound_ns(i).map_or(f64::MAX, |ns| ns as f64 / 1e9);
                (le, self.buckets[i as usize])
            })
            .collect()
    }
}

/// All series and drop counters at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub series: BTreeMap<SeriesKey, Series>,
    /// Entries of the kernel histogram map (series x used buckets).
    pub hist_entries: usize,
    /// (stage, counter) -> events, summed over CPUs.
    pub counters: BTreeMap<(StageId, &'static str), u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read map {map}: {source}")]
pub struct ReadError {
    map: &'static str,
    source: aya::maps::MapError,
}

fn err(map: &'static str) -> impl Fn(aya::maps::MapError) -> ReadError {
    move |source| ReadError { map, source }
}

impl Snapshot {
    pub fn read(ebpf: &Ebpf) -> Result<Snapshot, ReadError> {
        let mut snap = Snapshot::default();
        let map = ebpf.map("HIST").expect("HIST is in the object");
        let hist: PerCpuHashMap<&MapData, HistKey, HistVal> =
            PerCpuHashMap::try_from(map).map_err(err("HIST"))?;
        for entry in hist.iter() {
            let (k, per_cpu) = entry.map_err(err("HIST"))?;
            snap.hist_entries += 1;
            let Some(stage) = StageId::from_u16(k.stage) else {
                continue;
            };
            let s = snap
                .series
                .entry(SeriesKey {
                    stage,
                    detail: k.detail,
                    obj: k.obj,
                    vm: k.vm,
                })
                .or_default();
            for v in per_cpu.iter() {
                s.buckets[(k.bucket as usize).min(BUCKETS - 1)] += v.count;
                s.sum_ns += v.sum_ns;
            }
        }
        let map = ebpf.map("COUNTERS").expect("COUNTERS is in the object");
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(err("COUNTERS"))?;
        for stage in StageId::ALL {
            for c in Counter::ALL {
                let idx = counter_index(stage, c);
                debug_assert!(idx < COUNTERS_LEN);
                let v: u64 = counters.get(&idx, 0).map_err(err("COUNTERS"))?.iter().sum();
                snap.counters.insert((stage, c.name()), v);
            }
        }
        Ok(snap)
    }
}

/// Quantile summary of one series.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Midpoint of a bucket: the value it stands for in the HdrHistogram. Quantiles are then within
/// half a bucket (6.25%) of the truth, on top of HdrHistogram's own 0.1%.
fn bucket_value(i: u16) -> u64 {
    match upper_bound_ns(i) {
        Some(hi) => (lower_bound_ns(i) + hi).div_ceil(2).max(1),
        None => lower_bound_ns(i),
    }
}

/// Cumulative HdrHistograms, one per series, fed with each read's increase.
pub struct Quantiles {
    last: Snapshot,
    hdr: BTreeMap<SeriesKey, (Histogram<u64>, u64)>, // (histogram, sum_ns)
}

impl Quantiles {
    /// Starts from `base`: what the kernel counted before is left out.
    pub fn new(base: Snapshot) -> Self {
        Quantiles {
            last: base,
            hdr: BTreeMap::new(),
        }
    }

    pub fn update(&mut self, now: Snapshot) {
        for (key, series) in &now.series {
            let delta = series.since(self.last.series.get(key));
            if delta.count() == 0 {
                continue;
            }
            let (h, sum) = self.hdr.entry(*key).or_insert_with(|| {
                (
                    Histogram::new(3).expect("3 significant figures is valid"),
                    0,
                )
            });
            for (i, &n) in delta.buckets.iter().enumerate() {
                if n > 0 {
                    // record_n grows the histogram; saturating_record_n would clamp to its
                    // initial range instead.
                    let _ = h.record_n(bucket_value(i as u16), n);
                }
            }
            *sum += delta.sum_ns;
        }
        self.last = now;
    }

    pub fn summaries(&self) -> impl Iterator<Item = (&SeriesKey, Summary)> {
        self.hdr.iter().map(|(k, (h, sum))| {
            let us = |ns: u64| ns as f64 / 1e3;
            (
                k,
                Summary {
                    count: h.len(),
                    mean_us: *sum as f64 / h.len().max(1) as f64 / 1e3,
                    p50_us: us(h.value_at_quantile(0.50)),
                    p90_us: us(h.value_at_quantile(0.90)),
                    p99_us: us(h.value_at_quantile(0.99)),
                    p999_us: us(h.value_at_quantile(0.999)),
                    max_us: us(h.max()),
                },
            )
        })
    }

    pub fn last(&self) -> &Snapshot {
        &self.last
    }

    /// Drops every series of the VMs in `vms` (they exited and their kernel entries are gone).
    pub fn forget_vms(&mut self, vms: &std::collections::HashSet<u32>) {
        self.last.series.retain(|k, _| !vms.contains(&k.vm));
        self.hdr.retain(|k, _| !vms.contains(&k.vm));
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::hist::bucket_index;

    use super::*;

    fn snap(values_ns: &[u64]) -> Snapshot {
        let mut s = Series::default();
        for &v in values_ns {
            s.buckets[bucket_index(v) as usize] += 1;
            s.sum_ns += v;
        }
        let key = SeriesKey {
            stage: StageId::BlkDevice,
            detail: 1,
            obj: 7 << 20,
            vm: 0,
        };
        Snapshot {
            series: BTreeMap::from([(key, s)]),
            ..Default::default()
        }
    }

    #[test]
    fn prometheus_buckets_cover_every_event_and_end_at_inf() {
        let s = &snap(&[100, 300, 1_000, 50_000, 2_000_000, 20_000_000_000]).series;
        let series = s.values().next().unwrap();
        let b = series.prometheus_buckets();
        assert_eq!(b.len(), BUCKETS);
        assert!(b.windows(2).all(|w| w[0].0 < w[1].0), "bounds increase");
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), series.count());
        // the 20 s value is only in +Inf
        assert_eq!(*b.last().unwrap(), (f64::MAX, 1));
        assert_eq!(b[0], (256e-9, 1));
    }

    #[test]
    fn quantiles_of_values_beyond_hdr_initial_range() {
        let mut q = Quantiles::new(Snapshot::default());
        q.update(snap(&[45_000; 95]));
        let (_, s) = q.summaries().next().unwrap();
        assert!((s.p50_us - 45.0).abs() < 45.0 * 0.0625, "{}", s.p50_us);
    }

    #[test]
    fn quantiles_come_from_the_increase_only_and_stay_within_a_bucket() {
        let mut q = Quantiles::new(snap(&[5_000_000; 10]));
        // 10 old samples at 5 ms are not part of the run; 100 new at 200 us are.
        let mut values = vec![5_000_000; 10];
        values.extend([200_000; 100]);
        q.update(snap(&values));
        let (_, s) = q.summaries().next().unwrap();
        assert_eq!(s.count, 100);
        assert!(
            (s.p50_us - 200.0).abs() <= 200.0 * 0.0625 + 0.2,
            "{}",
            s.p50_us
        );
        assert!((s.mean_us - 200.0).abs() < 1e-9);
    }
}
