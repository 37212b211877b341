//! `iopath top`'s model: one row per VM and stage (a VM's series of a stage merged over its
//! other labels: vCPUs, queues, devices), from the session's cumulative series read once a
//! tick. Quantiles and the maximum are over the last [`WINDOW`] ticks, the rate over the last
//! tick, and the trend is each tick's p99. No terminal here: `tui` draws it.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, VecDeque},
};

use crate::{
    hist::Series,
    session::{Labelled, Labels},
};

/// Ticks the quantiles cover: at one a second, ten seconds (fewer events than that make a
/// p99 that jumps from tick to tick).
pub const WINDOW: usize = 10;
/// Ticks of trend kept: more than any terminal row shows.
pub const TREND: usize = 60;
/// The `vm` shown for host-wide series (a host disk's, a tap's host stack).
pub const HOST: &str = "(host)";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowKey {
    pub vm: String,
    pub path: &'static str,
    pub stage: &'static str,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub key: RowKey,
    /// Events per second over the last tick.
    pub rate: f64,
    /// Over the window, in ns (None: no event in it).
    pub p50_ns: Option<f64>,
    pub p99_ns: Option<f64>,
    pub max_ns: Option<f64>,
    /// Each tick's p99 in ns (0: no event), oldest first.
    pub trend: Vec<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    P99,
    P50,
    Max,
    Rate,
    Vm,
    Stage,
}

impl SortBy {
    pub const ALL: [SortBy; 6] = [
        SortBy::P99,
        SortBy::P50,
        SortBy::Max,
        SortBy::Rate,
        SortBy::Vm,
        SortBy::Stage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SortBy::P99 => "p99",
            SortBy::P50 => "p50",
            SortBy::Max => "max",
            SortBy::Rate => "rate",
            SortBy::Vm => "vm",
            SortBy::Stage => "stage",
        }
    }

    fn next(self) -> SortBy {
        let i = SortBy::ALL.iter().position(|s| *s == self).unwrap_or(0);
        SortBy::ALL[(i + 1) % SortBy::ALL.len()]
    }
}

struct History {
    /// Each of the last WINDOW ticks' events, newest last.
    ticks: VecDeque<Series>,
    trend: VecDeque<f64>,
    /// Events in the last tick, and how long it was.
    last: u64,
    last_secs: f64,
}

pub struct Top {
    rows: BTreeMap<RowKey, History>,
    /// Each series' cumulative counts at the last tick, by stage and labels: a row's tick is
    /// the sum of its series' differences (a series that goes takes nothing from the row).
    previous: BTreeMap<(&'static str, Labels), Series>,
    updates: u64,
    tick_secs: f64,
    pub sort: SortBy,
    /// Largest first (names: A first) unless reversed; rows with no events stay last.
    pub reversed: bool,
    /// Shown VM (None: all), chosen among the VMs seen.
    pub vm: Option<String>,
    /// Shown path (None: all).
    pub path: Option<&'static str>,
}

impl Top {
    pub fn new(tick_secs: f64) -> Top {
        Top {
            rows: BTreeMap::new(),
            previous: BTreeMap::new(),
            updates: 0,
            tick_secs,
            sort: SortBy::P99,
            reversed: false,
            vm: None,
            path: None,
        }
    }

    /// One tick, `elapsed` after the last: the session's series since it started
    /// (cumulative), labelled.
    pub fn update(&mut self, series: &[Labelled], elapsed: f64) {
        let mut ticks: BTreeMap<RowKey, Series> = BTreeMap::new();
        let mut previous = BTreeMap::new();
        for l in series {
            let vm = l
                .labels
                .iter()
                .find(|(k, _)| *k == "vm")
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| HOST.to_string());
            let key = RowKey {
                vm,
                path: l.stage.path.name(),
                stage: l.stage.name,
            };
            let id = (l.stage.name, l.labels.clone());
            // At the first tick, what the series had is no one tick's; a series that appears
            // later had nothing at the tick before.
            let delta = match self.previous.get(&id) {
                Some(p) => l.series.since(Some(p)),
                None if self.updates == 0 => Series::default(),
                None => l.series.clone(),
            };
            ticks.entry(key).or_default().add(&delta);
            previous.insert(id, l.series.clone());
        }
        self.previous = previous;
        // A row whose series all went (its VM exited and was collected) leaves with them.
        self.rows.retain(|k, _| ticks.contains_key(k));
        for (key, tick) in ticks {
            let h = self.rows.entry(key).or_insert_with(|| History {
                ticks: VecDeque::new(),
                trend: VecDeque::new(),
                last: 0,
                last_secs: elapsed,
            });
            h.last = tick.count();
            h.last_secs = elapsed;
            h.trend.push_back(tick.quantile(0.99).unwrap_or(0.0));
            h.ticks.push_back(tick);
            while h.ticks.len() > WINDOW {
                h.ticks.pop_front();
            }
            while h.trend.len() > TREND {
                h.trend.pop_front();
            }
        }
        self.updates += 1;
        // A filter on a VM or path no longer seen shows all again.
        if self.vm.as_ref().is_some_and(|v| !self.vms().contains(v)) {
            self.vm = None;
        }
        if self
            .path
            .is_some_and(|p| !self.rows.keys().any(|k| k.path == p))
        {
            self.path = None;
        }
    }

    /// How long the quantiles' window is.
    pub fn window_secs(&self) -> f64 {
        WINDOW as f64 * self.tick_secs
    }

    /// The VMs seen, in order (host-wide series under [`HOST`]).
    pub fn vms(&self) -> Vec<String> {
        let mut v: Vec<String> = self.rows.keys().map(|k| k.vm.clone()).collect();
        v.dedup();
        v.sort();
        v.dedup();
        v
    }

    pub fn next_sort(&mut self) {
        self.sort = self.sort.next();
    }

    /// All, then each VM seen in turn.
    pub fn next_vm(&mut self) {
        let vms = self.vms();
        self.vm = match &self.vm {
            None => vms.first().cloned(),
            Some(cur) => vms
                .iter()
                .position(|v| v == cur)
                .and_then(|i| vms.get(i + 1).cloned()),
        };
    }

    /// All, then each path seen in turn.
    pub fn next_path(&mut self) {
        let mut paths: Vec<&'static str> = self.rows.keys().map(|k| k.path).collect();
        paths.sort();
        paths.dedup();
        self.path = match self.path {
            None => paths.first().copied(),
            Some(cur) => paths
                .iter()
                .position(|p| *p == cur)
                .and_then(|i| paths.get(i + 1).copied()),
        };
    }

    /// The rows shown: filtered, sorted.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .rows
            .iter()
            .filter(|(k, _)| self.vm.as_ref().is_none_or(|v| *v == k.vm))
            .filter(|(k, _)| self.path.is_none_or(|p| p == k.path))
            .map(|(k, h)| {
                let mut window = Series::default();
                for t in &h.ticks {
                    window.add(t);
                }
                Row {
                    key: k.clone(),
                    rate: h.last as f64 / h.last_secs.max(1e-3),
                    p50_ns: window.quantile(0.5),
                    p99_ns: window.quantile(0.99),
                    max_ns: window.max_bound(),
                    trend: h.trend.iter().copied().collect(),
                }
            })
            .collect();
        let turn = |o: Ordering| if self.reversed { o.reverse() } else { o };
        // largest first; a row with no events in the window last either way
        let num = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => turn(y.total_cmp(&x)),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        rows.sort_by(|a, b| {
            let by = match self.sort {
                SortBy::P99 => num(a.p99_ns, b.p99_ns),
                SortBy::P50 => num(a.p50_ns, b.p50_ns),
                SortBy::Max => num(a.max_ns, b.max_ns),
                SortBy::Rate => turn(b.rate.total_cmp(&a.rate)),
                SortBy::Vm => turn(a.key.vm.cmp(&b.key.vm)),
                SortBy::Stage => turn(a.key.stage.cmp(b.key.stage)),
            };
            // ties in the key's order, so rows do not swap places from tick to tick
            by.then_with(|| a.key.cmp(&b.key))
        });
        rows
    }
}

/// `values` as a line of `width` block characters, scaled to their maximum; the newest last.
pub fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let shown = &values[values.len().saturating_sub(width)..];
    let max = shown.iter().copied().fold(0.0, f64::max);
    shown
        .iter()
        .map(|&v| {
            if v <= 0.0 || max <= 0.0 {
                ' '
            } else {
                BARS[(((v / max) * 7.0).round() as usize).min(7)]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages;
    use tracer_common::{
        hist::{bucket_index, lower_bound_ns, upper_bound_ns},
        stage::StageId,
    };

    /// A series of `n` events of `ns` each.
    fn events(n: u64, ns: u64) -> Series {
        let mut s = Series::default();
        s.buckets[bucket_index(ns) as usize] += n;
        s.sum_ns = n * ns;
        s
    }

    fn labelled(stage: StageId, vm: &str, vcpu: &str, s: &Series) -> Labelled {
        Labelled {
            stage: stages::stage(stage),
            labels: vec![("vm", vm.to_string()), ("vcpu", vcpu.to_string())],
            series: s.clone(),
        }
    }

    #[test]
    fn rows_merge_a_vms_series_and_measure_the_window_and_the_last_tick() {
        let mut top = Top::new(1.0);
        let exit = StageId::KvmUserspaceExit;
        // tick 0: first sight, 100 events from before (no tick's)
        let (mut a0, mut a1) = (events(50, 1_000), events(50, 1_000));
        top.update(
            &[
                labelled(exit, "db", "0", &a0),
                labelled(exit, "db", "1", &a1),
            ],
            1.0,
        );
        let r = &top.rows()[0];
        assert_eq!((r.key.vm.as_str(), r.rate), ("db", 0.0));
        assert_eq!(r.p99_ns, None, "no tick yet");
        // tick 1: 30 slow events on vCPU 1, 10 fast on vCPU 0
        a0.add(&events(10, 1_000));
        a1.add(&events(30, 100_000));
        top.update(
            &[
                labelled(exit, "db", "0", &a0),
                labelled(exit, "db", "1", &a1),
            ],
            1.0,
        );
        let rows = top.rows();
        assert_eq!(rows.len(), 1, "one row per VM and stage");
        assert_eq!(rows[0].rate, 40.0);
        // both in the slow events' bucket: 30 of the 40 are slow
        let b = bucket_index(100_000);
        let slow = lower_bound_ns(b) as f64..=upper_bound_ns(b).unwrap() as f64;
        for q in [rows[0].p99_ns.unwrap(), rows[0].p50_ns.unwrap()] {
            assert!(slow.contains(&q), "{q} not in {slow:?}");
        }
        // quiet ticks: the rate drops at once, the window keeps the slow events for WINDOW ticks
        for i in 0..WINDOW {
            top.update(
                &[
                    labelled(exit, "db", "0", &a0),
                    labelled(exit, "db", "1", &a1),
                ],
                1.0,
            );
            let r = &top.rows()[0];
            assert_eq!(r.rate, 0.0);
            assert_eq!(r.p99_ns.is_some(), i + 1 < WINDOW, "tick {i}");
        }
        assert_eq!(top.rows()[0].trend.len(), WINDOW + 2);
        assert!(top.rows()[0].trend[1] > 0.0);
    }

    #[test]
    fn sorting_filters_and_leaving_vms() {
        let mut top = Top::new(1.0);
        let (exit, device) = (StageId::KvmUserspaceExit, StageId::BlkDevice);
        let host_disk = Labelled {
            stage: stages::stage(device),
            labels: vec![("vm", String::new()), ("disk", "loop0".into())],
            series: events(5, 50_000),
        };
        let tick = |top: &mut Top, k: u64, with_web: bool| {
            let mut v = vec![
                labelled(exit, "db", "0", &events(10 * k, 2_000)),
                Labelled {
                    series: events(5 * k, 50_000),
                    ..host_disk.clone()
                },
            ];
            if with_web {
                v.push(labelled(exit, "web", "0", &events(100 * k, 20_000)));
            }
            top.update(&v, 1.0);
        };
        tick(&mut top, 1, true);
        tick(&mut top, 2, true);
        let order = |top: &Top| {
            top.rows()
                .iter()
                .map(|r| format!("{}/{}", r.key.vm, r.key.stage))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            order(&top),
            [
                "(host)/blk.device",
                "web/kvm.userspace_exit",
                "db/kvm.userspace_exit"
            ]
        );
        top.sort = SortBy::Rate;
        assert_eq!(order(&top)[0], "web/kvm.userspace_exit");
        top.reversed = true;
        assert_eq!(order(&top)[0], "(host)/blk.device");
        top.reversed = false;
        top.next_vm();
        assert_eq!(top.vm.as_deref(), Some("(host)"));
        top.next_vm();
        assert_eq!(order(&top), ["db/kvm.userspace_exit"]);
        top.vm = None;
        top.next_path();
        assert_eq!(top.path, Some("block"));
        assert_eq!(order(&top), ["(host)/blk.device"]);
        top.next_path();
        top.next_path();
        assert_eq!(top.path, None, "back to all after the last path");
        // web exits and its series are collected: its row goes
        tick(&mut top, 3, false);
        assert_eq!(top.rows().len(), 2);
        for _ in 0..SortBy::ALL.len() {
            top.next_sort();
        }
        assert_eq!(top.sort, SortBy::Rate, "the sort keys cycle");
    }

    #[test]
    fn sparklines_scale_to_their_maximum() {
        assert_eq!(sparkline(&[0.0, 1.0, 2.0, 4.0], 4), " ▃▅█");
        assert_eq!(
            sparkline(&[4.0, 0.0, 4.0], 2),
            " █",
            "the newest, at most width"
        );
        assert_eq!(sparkline(&[], 3), "");
    }
}
