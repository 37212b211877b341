//! Reading the kernel's histograms: per-CPU bucket counts summed into one cumulative snapshot per
//! series; quantiles read from those bucket arrays; and the coarser bucket layout the classic
//! exposition exports, summed exactly from the kernel's buckets. Kernel counters are never
//! reset: every reader works on differences.

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap},
};
use serde::Serialize;
use tracer_common::{
    hist::{BUCKETS, FINITE_BUCKETS, ZERO_K, lower_bound_ns, native_index, upper_bound_ns},
    maps::{COUNTERS_LEN, Counter, HistKey, HistVal, MapCounter, counter_index, map_counter_index},
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
    /// Events per bucket (not cumulative), index = kernel bucket.
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

    /// Adds `other` (a series whose labels came out the same).
    pub fn add(&mut self, other: &Series) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
    }

    /// The non-empty buckets as (lower bound in ns, events): how a capture (`record --json`)
    /// keeps a series, so that a later reader can merge series exactly.
    pub fn sparse(&self) -> Vec<(u64, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (lower_bound_ns(i as u16), *n))
            .collect()
    }

    /// The series [`Series::sparse`] wrote; None if a lower bound is not one of this layout's.
    pub fn from_sparse(buckets: &[(u64, u64)], sum_ns: u64) -> Option<Series> {
        let mut s = Series {
            sum_ns,
            ..Series::default()
        };
        for &(lo, n) in buckets {
            let i = (0..BUCKETS as u16).find(|&i| lower_bound_ns(i) == lo)?;
            s.buckets[i as usize] += n;
        }
        Some(s)
    }

    /// Quantile `q` in ns: the bucket holding the q-th event, interpolated linearly inside it
    /// (as Prometheus' histogram_quantile does), so within one bucket's width (9.3% of its
    /// lower bound) of the truth. The overflow bucket gives its lower bound. None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let i = i as u16;
                let lo = lower_bound_ns(i) as f64;
                let Some(hi) = upper_bound_ns(i) else {
                    return Some(lo);
                };
                return Some(lo + (hi as f64 - lo) * (rank - below as f64) / n as f64);
            }
            below += n;
        }
        None
    }

    /// Upper bound of the highest bucket with events: what the kernel knows of the maximum.
    pub fn max_bound(&self) -> Option<f64> {
        let i = self.buckets.iter().rposition(|&n| n > 0)? as u16;
        Some(upper_bound_ns(i).unwrap_or_else(|| lower_bound_ns(i)) as f64)
    }

    pub fn summary(&self) -> Summary {
        let count = self.count();
        let us = |v: Option<f64>| v.unwrap_or(0.0) / 1e3;
        Summary {
            count,
            mean_us: self.sum_ns as f64 / count.max(1) as f64 / 1e3,
            p50_us: us(self.quantile(0.50)),
            p90_us: us(self.quantile(0.90)),
            p99_us: us(self.quantile(0.99)),
            p999_us: us(self.quantile(0.999)),
            max_us: us(self.max_bound()),
        }
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
    /// Upper bound of the highest bucket with events.
    pub max_us: f64,
}

/// The `le` bounds the classic exposition exports: a subset of the kernel's bucket bounds, so
/// each exported bucket is an exact sum of kernel buckets (and of native buckets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Kernel bucket indices whose upper bounds are exported, ascending; +Inf follows.
    bounds: Vec<u16>,
}

/// Exported bounds run from 2^-20 s (954 ns) to 2^4 s (16 s), whole octaves of schema 3.
const LAYOUT_FIRST_K: i32 = -160;
const LAYOUT_LAST_K: i32 = 32;

impl Layout {
    /// `per_octave` bounds per power of two (1, 2, 4 or 8) from 954 ns to 16 s; 8 is the
    /// kernel's own resolution (every schema-3 bound) over that range.
    pub fn per_octave(per_octave: u32) -> Option<Layout> {
        if !matches!(per_octave, 1 | 2 | 4 | 8) {
            return None;
        }
        let step = 8 / per_octave as i32;
        let bounds = (LAYOUT_FIRST_K..=LAYOUT_LAST_K)
            .step_by(step as usize)
            .map(|k| (k - ZERO_K) as u16)
            .collect::<Vec<_>>();
        Some(Layout { bounds })
    }

    /// The exported bucket kernel bucket `i` is summed into (the last one is `+Inf`).
    pub fn classic_index(&self, i: u16) -> usize {
        self.bounds
            .iter()
            .position(|&b| b >= i)
            .unwrap_or(self.bounds.len())
    }

    /// Number of finite bounds (an exported series has this many + 1 buckets).
    pub fn bounds(&self) -> usize {
        self.bounds.len()
    }

    /// (upper bound in seconds, events) per exported bucket, overflow last with `f64::MAX`:
    /// the form prometheus-client's encoder takes (it accumulates, and writes `f64::MAX` as
    /// `+Inf`). Each count is the exact sum of the kernel buckets it covers; each bound is
    /// 2^(k/8) s, the native bound it coincides with.
    pub fn buckets(&self, s: &Series) -> Vec<(f64, u64)> {
        let mut out = Vec::with_capacity(self.bounds.len() + 1);
        let mut from = 0usize;
        for &b in &self.bounds {
            let n = s.buckets[from..=b as usize].iter().sum();
            out.push((native_bound_seconds(native_index(b)), n));
            from = b as usize + 1;
        }
        out.push((f64::MAX, s.buckets[from..].iter().sum()));
        out
    }
}

/// Upper bound of native bucket `k` in seconds, 2^(k/8) (to the last bit or so of an f64).
pub fn native_bound_seconds(k: i32) -> f64 {
    (k as f64 / 8.0).exp2()
}

/// A series as a native histogram of schema 3: the zero bucket's count, and the finite
/// buckets' counts as (first native index, consecutive counts) spans, empty buckets between
/// spans left out. The overflow bucket, if it has events, is given to native bucket
/// `MAX_K + 1` (its lower bound is the only bound the kernel knows).
#[derive(Debug, PartialEq, Eq)]
pub struct Native {
    pub zero_count: u64,
    pub spans: Vec<(i32, Vec<u64>)>,
}

impl Series {
    pub fn native(&self) -> Native {
        let mut spans: Vec<(i32, Vec<u64>)> = Vec::new();
        let mut next = None;
        for i in 1..BUCKETS {
            let n = self.buckets[i];
            if n == 0 {
                continue;
            }
            let k = native_index(i as u16);
            match spans.last_mut() {
                Some((_, counts)) if next == Some(k) => counts.push(n),
                _ => spans.push((k, vec![n])),
            }
            next = Some(k + 1);
        }
        debug_assert_eq!(BUCKETS, FINITE_BUCKETS + 1);
        Native {
            zero_count: self.buckets[0],
            spans,
        }
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout::per_octave(2).expect("2 is a valid layout")
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
    /// Shared map -> inserts refused because it was full.
    pub map_full: BTreeMap<&'static str, u64>,
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
        let sum = |idx: u32| -> Result<u64, ReadError> {
            debug_assert!(idx < COUNTERS_LEN);
            Ok(counters.get(&idx, 0).map_err(err("COUNTERS"))?.iter().sum())
        };
        for stage in StageId::ALL {
            for c in Counter::ALL {
                let v = sum(counter_index(stage, c))?;
                snap.counters.insert((stage, c.name()), v);
            }
        }
        for m in MapCounter::ALL {
            snap.map_full.insert(m.map(), sum(map_counter_index(m))?);
        }
        Ok(snap)
    }

    /// What was counted since `base`: series and counters as differences.
    pub fn since(&self, base: &Snapshot) -> Snapshot {
        Snapshot {
            series: self
                .series
                .iter()
                .map(|(k, s)| (*k, s.since(base.series.get(k))))
                .filter(|(_, s)| s.count() > 0)
                .collect(),
            hist_entries: self.hist_entries,
            counters: self
                .counters
                .iter()
                .map(|(k, v)| {
                    (
                        *k,
                        v.saturating_sub(base.counters.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
            map_full: self
                .map_full
                .iter()
                .map(|(k, v)| {
                    (
                        *k,
                        v.saturating_sub(base.map_full.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        }
    }

    /// Drops every series of the VMs and devices `gone` selects (their kernel entries went).
    pub fn forget(&mut self, gone: impl Fn(&SeriesKey) -> bool) {
        self.series.retain(|k, _| !gone(k));
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::hist::{MAX_K, bucket_index};

    use super::*;

    fn series(values_ns: &[u64]) -> Series {
        let mut s = Series::default();
        for &v in values_ns {
            s.buckets[bucket_index(v) as usize] += 1;
            s.sum_ns += v;
        }
        s
    }

    #[test]
    fn default_layout_is_two_bounds_per_octave_from_1us_to_16s() {
        let l = Layout::default();
        let b = l.buckets(&Series::default());
        // 24 octaves (2^-20 s .. 2^4 s) x 2, plus 2^-20 s itself, plus +Inf
        assert_eq!(l.bounds(), 49);
        assert_eq!(b.len(), 50);
        assert_eq!(b[0].0, 2f64.powi(-20));
        assert_eq!(b[1].0, 2f64.powi(-20) * std::f64::consts::SQRT_2);
        assert_eq!(b[2].0, 2f64.powi(-19));
        assert_eq!(b[l.bounds() - 1].0, 16.0);
        assert!(b.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(Layout::per_octave(1).unwrap().bounds(), 25);
        assert_eq!(Layout::per_octave(8).unwrap().bounds(), 193);
        assert_eq!(Layout::per_octave(3), None);
    }

    #[test]
    fn an_overflow_event_goes_to_the_native_bucket_above_the_last() {
        let s = series(&[900_000_000_000]);
        assert_eq!(s.native().spans, vec![(MAX_K + 1, vec![1])]);
    }

    #[test]
    fn native_spans_skip_empty_buckets_and_keep_the_zero_bucket() {
        let s = series(&[
            100,
            238,
            239,
            1_000_000_000,
            1_000_000_001,
            1_100_000_000,
            5_000,
        ]);
        let n = s.native();
        assert_eq!(n.zero_count, 2);
        let k = |ns| native_index(bucket_index(ns));
        assert_eq!(k(239), ZERO_K + 1);
        assert_eq!(k(1_000_000_000), 0);
        assert_eq!(k(1_000_000_001), 1);
        assert_eq!(k(1_100_000_000), 2);
        assert_eq!(
            n.spans,
            vec![
                (ZERO_K + 1, vec![1]),
                (k(5_000), vec![1]),
                (0, vec![1, 1, 1])
            ]
        );
        assert_eq!(
            n.zero_count + n.spans.iter().flat_map(|(_, c)| c).sum::<u64>(),
            s.count()
        );
    }

    #[test]
    fn coarse_buckets_are_exact_sums_of_kernel_buckets() {
        let values = [
            100,
            953,
            954,
            1_000,
            1_348,
            1_349,
            3_000,
            1_000_000_000,
            1_000_000_001,
            50_000,
            2_000_000,
            20_000_000_000,
        ];
        let s = series(&values);
        for per in [1, 2, 4, 8] {
            let l = Layout::per_octave(per).unwrap();
            let b = l.buckets(&s);
            assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), s.count(), "{per}");
            // cumulative counts at each exported bound equal the number of values <= it
            let mut cum = 0;
            for (le, n) in &b {
                cum += n;
                let want = values
                    .iter()
                    .filter(|&&v| *le == f64::MAX || v <= (le * 1e9).floor() as u64)
                    .count() as u64;
                assert_eq!(cum, want, "le {le} with {per} per octave");
            }
        }
    }

    #[test]
    fn quantiles_interpolate_inside_a_bucket() {
        let s = series(&[45_000; 95]);
        let p50 = s.quantile(0.5).unwrap();
        assert!((p50 - 45_000.0).abs() <= 45_000.0 / 10.0, "{p50}");
        let s = series(&[200_000; 100]);
        let sum = s.summary();
        assert_eq!(sum.count, 100);
        assert!((sum.p50_us - 200.0).abs() <= 200.0 / 10.0, "{}", sum.p50_us);
        assert!((sum.mean_us - 200.0).abs() < 1e-9);
        assert!(sum.p50_us <= sum.p99_us && sum.p99_us <= sum.max_us);
        assert!(sum.max_us >= 200.0);
        // two clusters: the quantiles land in the right one
        let mut v = vec![10_000u64; 90];
        v.extend([1_000_000; 10]);
        let s = series(&v);
        assert!(s.quantile(0.5).unwrap() < 11_300.0);
        assert!(s.quantile(0.95).unwrap() > 880_000.0);
        assert_eq!(Series::default().quantile(0.5), None);
        // beyond the last finite bound: the overflow's lower bound
        assert_eq!(
            series(&[900_000_000_000]).quantile(0.5),
            Some(861_077_929_219.0)
        );
    }

    #[test]
    fn differences_leave_out_what_came_before() {
        let key = SeriesKey {
            stage: StageId::BlkDevice,
            detail: 1,
            obj: 7 << 20,
            vm: 0,
        };
        let snap = |v: &[u64]| Snapshot {
            series: BTreeMap::from([(key, series(v))]),
            ..Default::default()
        };
        let base = snap(&[5_000_000; 10]);
        let mut values = vec![5_000_000; 10];
        values.extend([200_000; 100]);
        let d = snap(&values).since(&base);
        let s = &d.series[&key];
        assert_eq!(s.count(), 100);
        assert!((s.summary().mean_us - 200.0).abs() < 1e-9);
    }
}
