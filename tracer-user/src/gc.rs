//! VM lifecycle: which VMM processes are alive, and what is removed when one exits. A host that
//! starts and stops thousands of VMs must not grow without bound, in the kernel maps or in
//! `/metrics`: a VM that exited keeps its series for a grace period (so the last scrape sees its
//! final counts), then its series, its kernel map entries and its cached labels go.

use std::{
    collections::{HashMap, HashSet},
    fs,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, Pod,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
};
use tracer_common::{
    kvm::{
        inject::VcpuKey,
        signal::SignalStart,
        uexit::{UexitStart, VcpuThread},
    },
    maps::{HistKey, HistVal},
};

/// Start time (clock ticks since boot) of a live process or thread, None when it is gone. With
/// the pid it tells a process apart from a later one that reuses the pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: fields start after the last ')'
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Thread groups that hold a KVM VM fd (`anon_inode:kvm-vm`): VMs that existed before iopath.
pub fn running_vmms() -> Vec<u32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:kvm-vm")
                })
            })
        })
        .collect()
}

/// The kernel's set of VMM thread groups.
pub fn vmm_tgids(ebpf: &Ebpf) -> Vec<u32> {
    ebpf.map("VMM_TGIDS")
        .and_then(|m| BpfHashMap::<&MapData, u32, u32>::try_from(m).ok())
        .map(|m| m.keys().flatten().collect())
        .unwrap_or_default()
}

/// What one collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub vms: usize,
    pub kernel_entries: usize,
}

#[derive(Debug)]
pub struct VmGc {
    grace: Duration,
    /// tgid -> start time when first seen alive
    seen: HashMap<u32, u64>,
    /// tgid -> when it was first seen gone
    gone_since: HashMap<u32, Instant>,
}

impl VmGc {
    pub fn new(grace: Duration) -> Self {
        VmGc {
            grace,
            seen: HashMap::new(),
            gone_since: HashMap::new(),
        }
    }

    /// Seeds the kernel's VMM set with the VMs already running (the BPF programs learn new ones
    /// from KVM_CREATE_VM and KVM_RUN).
    pub fn seed(&mut self, ebpf: &mut Ebpf) {
        let Some(Ok(mut vmms)) = ebpf
            .map_mut("VMM_TGIDS")
            .map(BpfHashMap::<&mut MapData, u32, u32>::try_from)
        else {
            return;
        };
        for tgid in running_vmms() {
            let _ = vmms.insert(tgid, 1, 0);
        }
    }

    /// Is `tgid` the same live process it was when first seen?
    fn alive(&mut self, tgid: u32) -> bool {
        match (start_time(tgid), self.seen.get(&tgid)) {
            (None, _) => false,
            (Some(now), Some(&first)) => now == first,
            (Some(now), None) => {
                self.seen.insert(tgid, now);
                true
            }
        }
    }

    /// Checks every VM `vms` names, and returns those gone for longer than the grace period,
    /// forgetting them. Call with the tgids of the exported series and of the kernel's VMM set.
    pub fn expired(&mut self, vms: impl IntoIterator<Item = u32>, now: Instant) -> Vec<u32> {
        let vms: HashSet<u32> = vms.into_iter().filter(|&t| t != 0).collect();
        let mut out = Vec::new();
        for tgid in vms {
            if self.alive(tgid) {
                self.gone_since.remove(&tgid);
                continue;
            }
            let since = *self.gone_since.entry(tgid).or_insert(now);
            if now.duration_since(since) >= self.grace {
                out.push(tgid);
            }
        }
        for tgid in &out {
            self.gone_since.remove(tgid);
            self.seen.remove(tgid);
        }
        out
    }

    /// Deletes the kernel map entries of exited VMs. Entries keyed by thread carry their VM, so
    /// no thread is looked up; a thread that exits while its VM runs leaves at most one entry per
    /// map until the VM goes.
    pub fn clean_kernel(ebpf: &mut Ebpf, dead: &HashSet<u32>) -> usize {
        if dead.is_empty() {
            return 0;
        }
        remove_hist(ebpf, dead)
            + remove_where::<u32, u32>(ebpf, "VMM_TGIDS", |k, _| dead.contains(k))
            + remove_where::<VcpuKey, u64>(ebpf, "INJ_PENDING", |k, _| dead.contains(&k.vm))
            + remove_where::<u64, SignalStart>(ebpf, "SIG_DEFERRED", |_, v| dead.contains(&v.vm))
            + remove_where::<u32, SignalStart>(ebpf, "SIG_START", |_, v| dead.contains(&v.vm))
            + remove_where::<u32, UexitStart>(ebpf, "UEXIT_START", |_, v| dead.contains(&v.vm))
            + remove_where::<u32, VcpuThread>(ebpf, "VCPU_FD", |_, v| dead.contains(&v.vm))
    }

    /// Entries in each kernel map that grows with VMs and threads, for
    /// `iopath_kernel_map_entries`; the histogram map's count comes from the snapshot that
    /// read it already.
    pub fn count_entries(ebpf: &Ebpf, hist_entries: usize) -> Vec<(&'static str, usize)> {
        vec![
            ("HIST", hist_entries),
            ("VMM_TGIDS", entries::<u32, u32>(ebpf, "VMM_TGIDS")),
            ("INJ_PENDING", entries::<VcpuKey, u64>(ebpf, "INJ_PENDING")),
            ("SIG_START", entries::<u32, SignalStart>(ebpf, "SIG_START")),
            (
                "SIG_DEFERRED",
                entries::<u64, SignalStart>(ebpf, "SIG_DEFERRED"),
            ),
            (
                "UEXIT_START",
                entries::<u32, UexitStart>(ebpf, "UEXIT_START"),
            ),
            ("VCPU_FD", entries::<u32, VcpuThread>(ebpf, "VCPU_FD")),
        ]
    }
}

fn entries<K: Pod, V: Pod>(ebpf: &Ebpf, name: &str) -> usize {
    ebpf.map(name)
        .and_then(|m| BpfHashMap::<&MapData, K, V>::try_from(m).ok())
        .map_or(0, |m| m.keys().count())
}

/// Removes the histogram entries of the VMs in `dead` (selected by key alone).
fn remove_hist(ebpf: &mut Ebpf, dead: &HashSet<u32>) -> usize {
    let Some(Ok(mut hist)) = ebpf
        .map_mut("HIST")
        .map(PerCpuHashMap::<&mut MapData, HistKey, HistVal>::try_from)
    else {
        return 0;
    };
    let doomed: Vec<HistKey> = hist
        .keys()
        .flatten()
        .filter(|k| dead.contains(&k.vm))
        .collect();
    doomed.iter().filter(|k| hist.remove(k).is_ok()).count()
}

/// Removes the entries of hash map `name` that `pred` selects; returns how many.
fn remove_where<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    pred: impl Fn(&K, &V) -> bool,
) -> usize {
    let Some(Ok(mut map)) = ebpf
        .map_mut(name)
        .map(BpfHashMap::<&mut MapData, K, V>::try_from)
    else {
        return 0;
    };
    let doomed: Vec<K> = map
        .iter()
        .flatten()
        .filter(|(k, v)| pred(k, v))
        .map(|(k, _)| k)
        .collect();
    doomed.iter().filter(|k| map.remove(k).is_ok()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_expires_only_after_the_grace_period() {
        let mut gc = VmGc::new(Duration::from_secs(10));
        let me = std::process::id();
        let gone = u32::MAX - 7; // no such pid
        let t0 = Instant::now();
        assert!(gc.expired([me, gone, 0], t0).is_empty());
        assert!(
            gc.expired([me, gone], t0 + Duration::from_secs(9))
                .is_empty()
        );
        assert_eq!(gc.expired([me, gone], t0 + Duration::from_secs(10)), [gone]);
        // forgotten: seen gone again, it starts a new grace period
        assert!(gc.expired([gone], t0 + Duration::from_secs(11)).is_empty());
    }

    #[test]
    fn start_time_of_self_and_of_nothing() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX - 7), None);
    }
}
