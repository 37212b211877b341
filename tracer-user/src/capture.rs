//! A capture (`iopath record --json`, `--output`) read back without privileges: its series
//! with their kernel buckets, which `compare` and `report` merge exactly.

use serde_json::Value;

use crate::hist::Series;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a capture of `iopath record --json` (no \"series\")")]
    NotACapture,
    #[error(
        "a {stage} series has no buckets of this iopath's layout (a capture of another version?)"
    )]
    Buckets { stage: String },
    /// (`seen` is printable: the VMs' names come from the VMMs' command lines)
    #[error("no series of vm {vm:?} in the capture (vms in it: {seen})")]
    NoSuchVm { vm: String, seen: String },
}

/// One series of a capture.
pub struct Row<'a> {
    pub stage: &'a str,
    /// The stage's path (`block`, `kvm`, `net`, `vfio`), as the capture names it.
    pub path: &'a str,
    pub labels: &'a serde_json::Map<String, Value>,
    pub series: Series,
}

impl Row<'_> {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k)?.as_str()
    }
}

/// Every series of `capture`. A series without its buckets and sum (an older capture) is
/// refused, not read as empty.
pub fn rows(capture: &Value) -> Result<Vec<Row<'_>>, Error> {
    static EMPTY: std::sync::LazyLock<serde_json::Map<String, Value>> =
        std::sync::LazyLock::new(serde_json::Map::new);
    let series = capture["series"].as_array().ok_or(Error::NotACapture)?;
    series
        .iter()
        .map(|r| {
            let stage = r["stage"].as_str().unwrap_or_default();
            let bad = || Error::Buckets {
                stage: stage.into(),
            };
            let buckets = r["buckets"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|b| Some((b.get(0)?.as_u64()?, b.get(1)?.as_u64()?)))
                .collect::<Option<Vec<(u64, u64)>>>()
                .ok_or_else(bad)?;
            let sum_ns = r["sum_ns"].as_u64().ok_or_else(bad)?;
            Ok(Row {
                stage,
                path: r["path"].as_str().unwrap_or_default(),
                labels: r["labels"].as_object().unwrap_or(&EMPTY),
                series: Series::from_sparse(&buckets, sum_ns).ok_or_else(bad)?,
            })
        })
        .collect()
}

/// The series of `stage` that `keep` selects, merged bucket by bucket, and how many there
/// were; None when none has an event.
pub fn merged(rows: &[Row], stage: &str, keep: impl Fn(&Row) -> bool) -> Option<(usize, Series)> {
    let mut merged = Series::default();
    let mut n = 0;
    for r in rows.iter().filter(|r| r.stage == stage && keep(r)) {
        merged.add(&r.series);
        n += 1;
    }
    (merged.count() > 0).then_some((n, merged))
}

/// Fails, naming the VMs there are, unless some series is `vm`'s.
pub fn has_vm(rows: &[Row], vm: &str) -> Result<(), Error> {
    if rows.iter().any(|r| r.label("vm") == Some(vm)) {
        return Ok(());
    }
    let seen: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.label("vm"))
        .filter(|v| !v.is_empty())
        .collect();
    Err(Error::NoSuchVm {
        vm: vm.into(),
        seen: if seen.is_empty() {
            "none".into()
        } else {
            printable(&seen.into_iter().collect::<Vec<_>>().join(", "))
        },
    })
}

/// The taps `vm`'s backend series name, sorted: the host stacks' series name taps, not VMs,
/// and these are the VM's.
pub fn taps_of(rows: &[Row], vm: &str) -> Vec<String> {
    rows.iter()
        .filter(|r| r.label("vm") == Some(vm))
        .filter_map(|r| r.label("tap").map(str::to_string))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// `s` with control characters escaped: capture strings (VM names come from VMM command
/// lines) must not carry terminal escapes to the operator's terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
}
