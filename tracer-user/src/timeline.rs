//! Sampled per-I/O timelines. The programs put every histogram sample of one 16.8 ms window in
//! `--timeline-every` on the `TIMELINES` ring (`tracer_common::maps::Sample`); here they are
//! chained into one I/O's stages: a stage of a sequence (`waterfall::SEQUENCES`) follows the
//! sample of the stage before it that ended where it starts (within `LINK_NS`, the two clock
//! reads being a program's run apart), of the same VM and, where both name one, the same disk
//! or tap. Two such candidates: neither is taken (counted as ambiguous), the sample starts a
//! timeline of its own. Every sample belongs to a timeline, with a trace id; each series'
//! latest sample per bucket is its exemplar there.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use tracer_common::{maps::Sample, stage::StageId};

use crate::hist::SeriesKey;

/// How far apart a stage's start and the stage before it's end may be read: both are clock
/// reads a program's run after the same kernel event.
pub const LINK_NS: u64 = 20_000;
/// Samples kept for a later stage to follow: 2 s of them (a stage's end reaches the daemon
/// within a drain, every 100 ms, so its successors are at most one stage's length later).
const KEEP_NS: u64 = 2_000_000_000;
/// How long a disk request may wait in a scheduler's queue between a kick's insert and its
/// issue, for the two to be linked.
const QUEUED_NS: u64 = 1_000_000;
/// How far out of time order the ring may hold two samples' reads: CPUs write it concurrently,
/// each a program's run after its clock read. (A sample's end may be older: a transmit kick
/// goes on the ring at its run's first frame, ending at the run's start; hence
/// `Recent::read_ns`.)
const REORDER_NS: u64 = 50_000;
/// Timelines kept, the newest.
pub const MAX_TRACES: usize = 2_000;
/// Samples kept waiting for a successor, at most.
const MAX_RECENT: usize = 50_000;

/// The order of the stages an I/O crosses, as pairs (stage, the stage before it).
const FOLLOWS: [(StageId, StageId); 9] = [
    (StageId::BlkDevice, StageId::BlkKickToSubmit),
    (StageId::BlkCompleteToIrq, StageId::BlkDevice),
    (StageId::KvmInjectToEntry, StageId::BlkCompleteToIrq),
    (StageId::NetRxBackendQueue, StageId::NetRxHostStack),
    (StageId::NetRxBackendToIrq, StageId::NetRxBackendQueue),
    (StageId::KvmInjectToEntry, StageId::NetRxBackendToIrq),
    (StageId::NetTxBackendToWire, StageId::NetTxKick),
    (StageId::NetTxHostStack, StageId::NetTxBackendToWire),
    (StageId::KvmInjectToEntry, StageId::VfioHandlerToInject),
];

/// What a stage's `obj` names, for telling one I/O's stages from another's.
#[derive(PartialEq, Eq)]
enum Obj {
    Disk,
    Tap,
    Other,
}

fn obj(stage: StageId) -> Obj {
    use StageId::*;
    match stage {
        BlkKickToSubmit | BlkDevice | BlkCompleteToIrq => Obj::Disk,
        NetRxHostStack | NetRxBackendQueue | NetRxBackendToIrq | NetTxBackendToWire
        | NetTxHostStack => Obj::Tap,
        _ => Obj::Other,
    }
}

/// One stage of a timeline.
#[derive(Clone, Debug)]
pub struct Step {
    pub key: SeriesKey,
    pub bucket: u16,
    /// Monotonic ns (bpf_ktime_get_ns) when the stage started, and its length.
    pub start_ns: u64,
    pub ns: u64,
}

#[derive(Clone, Debug)]
pub struct Trace {
    pub id: u64,
    pub steps: Vec<Step>,
}

impl Trace {
    pub fn id_hex(&self) -> String {
        format!("{:016x}", self.id)
    }

    /// From the first stage's start to the last one's end.
    pub fn total_ns(&self) -> u64 {
        let first = self.steps[0].start_ns;
        let last = self.steps.last().expect("a trace has a step");
        (last.start_ns + last.ns).saturating_sub(first)
    }
}

/// A series' exemplar for one bucket: its latest sample there.
#[derive(Clone, Debug, PartialEq)]
pub struct Exemplar {
    pub trace: u64,
    pub seconds: f64,
    /// Monotonic ns of the sample's end (`Store::unix_of` makes it wall time).
    pub end_ns: u64,
}

/// A sample waiting for the stage after it.
struct Recent {
    step: Step,
    /// The newest end read up to this sample, itself included: monotonic in ring order, where
    /// an end is not, so the look-back stops on it.
    read_ns: u64,
    trace: u64,
    followed: bool,
}

#[derive(Default)]
pub struct Store {
    recent: VecDeque<Recent>,
    /// The newest sample end read so far.
    newest_ns: u64,
    traces: HashMap<u64, Trace>,
    /// The newest MAX_TRACES timelines, oldest first; an older one stays while `pins` holds it.
    order: VecDeque<u64>,
    /// How many exemplars name each timeline.
    pins: HashMap<u64, u32>,
    /// Timelines no longer among the newest, kept for the exemplars that name them.
    outlived: std::collections::HashSet<u64>,
    pub exemplars: HashMap<(SeriesKey, u16), Exemplar>,
    /// Samples read, and those whose stage before had two candidates.
    pub samples: u64,
    pub ambiguous: u64,
    /// Wall-clock minus monotonic time, ns: for exemplars' timestamps.
    wall_offset_ns: i128,
}

fn trace_id(s: &Sample) -> u64 {
    // FNV-1a over the sample: unique enough among the 2,000 kept, stable for one sample.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in s
        .end_ns
        .to_le_bytes()
        .iter()
        .chain(&s.ns.to_le_bytes())
        .chain(&s.vm.to_le_bytes())
        .chain(&s.obj.to_le_bytes())
        .chain(&s.stage.to_le_bytes())
    {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Store {
    /// Adds samples in the order read (each CPU's in order; across CPUs nearly).
    pub fn add(&mut self, samples: impl IntoIterator<Item = Sample>) {
        for s in samples {
            self.add_one(&s);
        }
    }

    fn add_one(&mut self, s: &Sample) {
        let Some(stage) = StageId::from_u16(s.stage) else {
            return;
        };
        self.samples += 1;
        let step = Step {
            key: SeriesKey {
                stage,
                detail: s.detail,
                obj: s.obj,
                vm: s.vm,
            },
            bucket: s.bucket,
            start_ns: s.end_ns.saturating_sub(s.ns),
            ns: s.ns,
        };
        // The sample of the stage before that ended where this one starts: looked for from the
        // newest back to those that ended well before (the ring is in order of output, each
        // CPU's in time order, CPUs interleaved within a program's run).
        let mut before: Vec<usize> = Vec::new();
        if FOLLOWS.iter().any(|(s, _)| *s == stage) {
            // Back as far as the one before may have ended: the newest few samples, unless a
            // request may have queued.
            let lookback = LINK_NS
                + REORDER_NS
                + if stage == StageId::BlkDevice {
                    QUEUED_NS
                } else {
                    0
                };
            for (i, r) in self.recent.iter().enumerate().rev() {
                let end = r.step.start_ns + r.step.ns;
                if r.read_ns + lookback < step.start_ns {
                    break;
                }
                let p = &r.step.key;
                // How long before this start the one before may have ended: a kick's request
                // may wait in the scheduler's queue between its insert (where
                // blk.kick_to_submit ends) and its issue (where blk.device starts).
                let early = if (stage, p.stage) == (StageId::BlkDevice, StageId::BlkKickToSubmit) {
                    QUEUED_NS
                } else {
                    LINK_NS
                };
                if !r.followed
                    && FOLLOWS.contains(&(stage, p.stage))
                    && (p.vm == 0 || s.vm == 0 || p.vm == s.vm)
                    && (obj(p.stage) != obj(stage) || obj(stage) == Obj::Other || p.obj == s.obj)
                    && r.step.start_ns <= step.start_ns
                    && end <= step.start_ns + LINK_NS
                    && end + early >= step.start_ns
                {
                    before.push(i);
                }
            }
        }
        if before.len() > 1 {
            self.ambiguous += 1;
        }
        let trace = match before.as_slice() {
            [i] if self.traces.contains_key(&self.recent[*i].trace) => {
                let r = &mut self.recent[*i];
                r.followed = true;
                let t = self.traces.get_mut(&r.trace).expect("checked");
                t.steps.push(step.clone());
                t.id
            }
            _ => {
                let id = trace_id(s);
                self.traces.insert(
                    id,
                    Trace {
                        id,
                        steps: vec![step.clone()],
                    },
                );
                self.order.push_back(id);
                while self.order.len() > MAX_TRACES {
                    if let Some(old) = self.order.pop_front() {
                        // An exemplar's timeline stays while the exemplar does.
                        if self.pins.contains_key(&old) {
                            self.outlived.insert(old);
                        } else {
                            self.traces.remove(&old);
                        }
                    }
                }
                id
            }
        };
        let old = self.exemplars.insert(
            (step.key, step.bucket),
            Exemplar {
                trace,
                seconds: s.ns as f64 / 1e9,
                end_ns: s.end_ns,
            },
        );
        *self.pins.entry(trace).or_default() += 1;
        if let Some(old) = old {
            self.unpin(old.trace);
        }
        self.newest_ns = self.newest_ns.max(s.end_ns);
        self.recent.push_back(Recent {
            step,
            read_ns: self.newest_ns,
            trace,
            followed: false,
        });
        let newest = self.newest_ns;
        while self.recent.len() > MAX_RECENT
            || self
                .recent
                .front()
                .is_some_and(|r| r.read_ns + KEEP_NS < newest)
        {
            self.recent.pop_front();
        }
    }

    /// One exemplar fewer names trace `id`: it goes when none does and it is not among the
    /// newest.
    fn unpin(&mut self, id: u64) {
        if let Some(n) = self.pins.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&id);
                if self.outlived.remove(&id) {
                    self.traces.remove(&id);
                }
            }
        }
    }

    pub fn get(&self, id: u64) -> Option<&Trace> {
        self.traces.get(&id)
    }

    /// The kept timelines of at least two stages, slowest first.
    pub fn slowest(&self, n: usize) -> Vec<&Trace> {
        let mut v: Vec<&Trace> = self.traces.values().filter(|t| t.steps.len() > 1).collect();
        v.sort_by_key(|t| std::cmp::Reverse(t.total_ns()));
        v.truncate(n);
        v
    }

    /// Forgets what a collected VM or device left (`gone` selects its series): its exemplars,
    /// the timelines with a stage of it, its samples waiting for a successor. (Its labels are
    /// gone too: a timeline kept would name it afresh.)
    pub fn forget(&mut self, gone: impl Fn(&SeriesKey) -> bool) {
        let dropped: Vec<u64> = self
            .exemplars
            .iter()
            .filter(|((k, _), _)| gone(k))
            .map(|(_, e)| e.trace)
            .collect();
        self.exemplars.retain(|(k, _), _| !gone(k));
        for id in dropped {
            self.unpin(id);
        }
        let dead: Vec<u64> = self
            .traces
            .values()
            .filter(|t| t.steps.iter().any(|s| gone(&s.key)))
            .map(|t| t.id)
            .collect();
        for id in &dead {
            self.traces.remove(id);
        }
        self.order.retain(|id| !dead.contains(id));
        // exemplars of other series that named those timelines keep no dangling id
        self.exemplars.retain(|_, e| !dead.contains(&e.trace));
        self.pins.retain(|id, _| !dead.contains(id));
        self.outlived.retain(|id| !dead.contains(id));
        self.recent.retain(|r| !gone(&r.step.key));
    }

    /// Notes the clocks' offset now (monotonic, which the programs read, against wall time).
    pub fn sync_clocks(&mut self) {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let wall = clock_ns(libc::CLOCK_REALTIME);
        self.wall_offset_ns = wall as i128 - mono as i128;
    }

    /// Seconds since the epoch of a monotonic ns.
    pub fn unix_of(&self, mono_ns: u64) -> f64 {
        self.unix_ns_of(mono_ns) as f64 / 1e9
    }

    /// Nanoseconds since the epoch of a monotonic ns.
    pub fn unix_ns_of(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.wall_offset_ns).max(0) as u64
    }
}

/// A clock's time in ns (clock_gettime).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A timeline as the capture and `/timelines` give it: its stages in order, with their labels,
/// start (µs from the first stage's) and length.
#[derive(Debug, Serialize, Deserialize)]
pub struct Shown {
    pub trace_id: String,
    pub total_us: f64,
    pub start_unix: f64,
    pub steps: Vec<ShownStep>,
}

impl Shown {
    /// The VM its stages name ("" for none: a host-wide stage alone).
    pub fn vm(&self) -> &str {
        self.steps
            .iter()
            .find_map(|s| s.labels.get("vm").and_then(|v| v.as_str()))
            .unwrap_or("")
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ShownStep {
    pub stage: String,
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub start_us: f64,
    pub us: f64,
}

/// One timeline, its series named by `labels`.
pub fn shown(
    store: &Store,
    t: &Trace,
    mut labels: impl FnMut(&SeriesKey) -> Vec<(&'static str, String)>,
) -> Shown {
    let first = t.steps[0].start_ns;
    Shown {
        trace_id: t.id_hex(),
        total_us: t.total_ns() as f64 / 1e3,
        start_unix: store.unix_of(first),
        steps: t
            .steps
            .iter()
            .map(|s| ShownStep {
                stage: crate::stages::stage(s.key.stage).name.to_string(),
                labels: labels(&s.key)
                    .into_iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.to_string(), v.into()))
                    .collect(),
                start_us: s.start_ns.saturating_sub(first) as f64 / 1e3,
                us: s.ns as f64 / 1e3,
            })
            .collect(),
    }
}

/// Timelines as the terminal shows them: one line per stage, its start and length.
pub fn table(shown: &[Shown]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for t in shown {
        let vm = t.vm();
        let _ = writeln!(
            out,
            "trace {} vm={:?}: {} over {} stages",
            t.trace_id,
            crate::capture::printable(vm),
            crate::report::us(t.total_us) + " µs",
            t.steps.len()
        );
        for s in &t.steps {
            let _ = writeln!(
                out,
                "  +{:>10} µs  {:<24} {:>10} µs",
                crate::report::us(s.start_us),
                crate::capture::printable(&s.stage),
                crate::report::us(s.us)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(stage: StageId, obj: u32, vm: u32, end_ns: u64, ns: u64) -> Sample {
        Sample {
            end_ns,
            ns,
            detail: 0,
            obj,
            vm,
            stage: stage as u16,
            bucket: tracer_common::hist::bucket_index(ns),
        }
    }

    #[test]
    fn a_disk_requests_stages_chain_and_anothers_do_not_join() {
        let mut st = Store::default();
        use StageId::*;
        // VM 7's request on disk 1: kick 10 µs, device 200 µs, completion to irq 30 µs; each
        // read 300 ns after the boundary. VM 7's other disk and VM 8 interleave.
        st.add([
            sample(BlkKickToSubmit, 1, 7, 1_000_300, 10_000),
            sample(BlkKickToSubmit, 2, 7, 1_000_350, 10_000),
            sample(BlkDevice, 1, 7, 1_200_400, 200_100),
            sample(BlkDevice, 2, 8, 1_200_450, 200_100),
            sample(BlkCompleteToIrq, 1, 7, 1_230_200, 29_900),
        ]);
        let t = st.slowest(10);
        assert_eq!(t.len(), 1, "only VM 7's disk 1 has a chain");
        let stages: Vec<_> = t[0].steps.iter().map(|s| s.key.stage).collect();
        assert_eq!(stages, [BlkKickToSubmit, BlkDevice, BlkCompleteToIrq]);
        assert_eq!(t[0].total_ns(), 1_230_200 - 990_300);
        // the exemplar of the device's bucket names that trace
        let k = t[0].steps[1].key;
        let e = &st.exemplars[&(k, t[0].steps[1].bucket)];
        assert_eq!(e.trace, t[0].id);
        assert!((e.seconds - 200.1e-6).abs() < 1e-12);
        assert_eq!(st.samples, 5);
        assert_eq!(st.ambiguous, 0);
    }

    #[test]
    fn two_candidates_are_ambiguous_and_neither_is_taken() {
        let mut st = Store::default();
        use StageId::*;
        // two taps' host stacks end together; a backend sample of VM 3 whose tap matches both
        // cannot be told apart only when its obj matches both: same tap here
        st.add([
            sample(NetRxHostStack, 5, 0, 2_000_000, 3_000),
            sample(NetRxHostStack, 5, 0, 2_000_100, 3_000),
            sample(NetRxBackendQueue, 5, 3, 2_020_050, 20_000),
        ]);
        assert_eq!(st.ambiguous, 1);
        assert!(st.slowest(10).is_empty());
        // a sample too far from any end starts its own
        st.add([sample(NetRxBackendToIrq, 5, 3, 9_000_000, 10_000)]);
        assert!(st.slowest(10).is_empty());
    }

    #[test]
    fn old_traces_go_but_an_exemplars_stays() {
        let mut st = Store::default();
        // the first: the only sample of its series and bucket, so its exemplar stays
        st.add([sample(StageId::KvmExit, 9, 9, 500_000, 123_456)]);
        let first = st.exemplars.values().next().unwrap().trace;
        for i in 0..(MAX_TRACES as u64 + 10) {
            st.add([sample(
                StageId::BlkDevice,
                1,
                1,
                1_000_000 + i * 100_000,
                50_000,
            )]);
        }
        assert_eq!(st.order.len(), MAX_TRACES);
        // the newest, and the one an exemplar still names; the other blk.device ones went
        // with their exemplar replaced by a newer sample of the same bucket
        assert_eq!(st.traces.len(), MAX_TRACES + 1);
        assert!(st.get(first).is_some());
        // every exemplar names a kept timeline
        assert!(st.exemplars.values().all(|e| st.get(e.trace).is_some()));
        // a collected VM takes its exemplars and timelines with it
        st.forget(|k| k.vm == 9);
        assert!(st.get(first).is_none());
        assert_eq!(st.traces.len(), MAX_TRACES);
        st.forget(|k| k.vm == 1);
        assert!(st.traces.is_empty() && st.exemplars.is_empty() && st.recent.is_empty());
    }

    #[test]
    fn a_kick_links_across_the_schedulers_queue_and_nothing_links_backwards() {
        let mut st = Store::default();
        use StageId::*;
        // the kick ended at insert 400 µs before the issue; the device's start is after it
        st.add([
            sample(BlkKickToSubmit, 1, 7, 1_000_000, 10_000),
            sample(BlkDevice, 1, 7, 1_600_000, 200_000),
        ]);
        assert_eq!(st.slowest(1)[0].steps.len(), 2);
        // a completion_to_irq that would start before its device's start: not linked
        let mut st = Store::default();
        st.add([
            sample(BlkDevice, 1, 7, 1_000_000, 1_000),
            sample(BlkCompleteToIrq, 1, 7, 1_000_500, 2_000),
        ]);
        assert!(st.slowest(1).is_empty());
    }

    #[test]
    fn a_transmit_kick_output_late_hides_no_older_sample() {
        let mut st = Store::default();
        use StageId::*;
        // A tap's receive; then a kick of VM 4, put on the ring at its run's first frame 1 ms
        // after it ended; then the receive's backend queue, which must still find its start.
        st.add([
            sample(NetRxHostStack, 5, 0, 2_000_000, 3_000),
            sample(NetTxKick, 0, 4, 1_000_000, 50_000),
            sample(NetTxBackendToWire, 6, 4, 2_010_000, 1_010_000),
            sample(NetRxBackendQueue, 5, 3, 2_100_000, 100_000),
        ]);
        let stages: Vec<Vec<StageId>> = st
            .slowest(10)
            .iter()
            .map(|t| t.steps.iter().map(|s| s.key.stage).collect())
            .collect();
        assert_eq!(
            stages,
            [
                vec![NetTxKick, NetTxBackendToWire],
                vec![NetRxHostStack, NetRxBackendQueue]
            ]
        );
        assert_eq!(st.ambiguous, 0);
    }
}
