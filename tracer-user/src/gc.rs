//! Lifecycle of what the kernel maps are keyed by: VMM processes and block devices. A host that
//! starts and stops thousands of VMs (or loop and device-mapper devices) must not grow without
//! bound, in the kernel maps or in `/metrics`: what is gone keeps its series for a grace period
//! (so the last scrape sees its final counts), then its series, its kernel map entries and its
//! cached labels go. Which map holds what, and where its owner is written, is the table in
//! `maps`.

use std::{
    collections::{HashMap, HashSet},
    fs,
    hash::Hash,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use tracer_common::{
    blk::{dev_major, dev_minor},
    kvm::uexit::{KVM_RUN, VcpuThread},
};

use crate::maps::{self, Owner};

/// Start time (clock ticks since boot) of a live process, None when it is gone. With the pid it
/// tells a process apart from a later one that reuses the pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: fields start after the last ')'
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A block device exists while sysfs has it.
fn device_exists(dev: u32) -> Option<u64> {
    fs::metadata(format!(
        "/sys/dev/block/{}:{}",
        dev_major(dev),
        dev_minor(dev)
    ))
    .ok()
    .map(|_| 0)
}

/// A network device exists while sysfs has one of that ifindex (ifindexes are not reused
/// until the counter wraps).
fn netdev_exists(ifindex: u32) -> Option<u64> {
    let want = ifindex.to_string();
    fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .any(|d| fs::read_to_string(d.path().join("ifindex")).is_ok_and(|i| i.trim() == want))
        .then_some(0)
}

/// Does process `pid` hold a KVM VM fd (`anon_inode:kvm-vm`)?
fn holds_vm(pid: u32) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:kvm-vm"))
    })
}

/// Thread groups that hold a KVM VM fd: VMs that existed before iopath.
fn running_vmms() -> Vec<u32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| holds_vm(pid))
        .collect()
}

/// Seeds the kernel's VMM set with the VMs already running (the programs learn new ones at
/// their first KVM event), and the vCPU fd of each of their threads that sits in KVM_RUN (the
/// programs learn a vCPU at KVM_RUN, which a halted or busy vCPU may not make again for long);
/// returns the VMMs.
pub fn seed(ebpf: &mut Ebpf) -> Vec<u32> {
    let running = running_vmms();
    if let Some(Ok(mut vmms)) = ebpf
        .map_mut("VMM_TGIDS")
        .map(BpfHashMap::<&mut MapData, u32, u32>::try_from)
    {
        for &tgid in &running {
            let _ = vmms.insert(tgid, 1, 0);
        }
    }
    if let Some(Ok(mut fds)) = ebpf
        .map_mut("VCPU_FD")
        .map(BpfHashMap::<&mut MapData, u32, VcpuThread>::try_from)
    {
        for (tgid, tid, fd) in threads_in_kvm_run(&running) {
            if fds.get(&tid, 0).is_err() {
                let _ = fds.insert(tid, VcpuThread { fd, vm: tgid }, 0);
            }
        }
    }
    running
}

/// ioctl's system call number.
#[cfg(target_arch = "x86_64")]
const SYS_IOCTL: &str = "16";
#[cfg(target_arch = "aarch64")]
const SYS_IOCTL: &str = "29";

/// Threads of the VMMs `tgids` blocked in ioctl(fd, KVM_RUN), as (tgid, tid, fd), from
/// /proc/TID/syscall (`NR arg0 arg1 ...`). A thread on a CPU reads `running`: those of all the
/// VMMs are read again together a few times over 100 ms (a vCPU in guest mode halts or exits
/// soon), else learned at their next KVM_RUN.
fn threads_in_kvm_run(tgids: &[u32]) -> Vec<(u32, u32, u32)> {
    let syscall =
        |tgid: u32, tid: u32| fs::read_to_string(format!("/proc/{tgid}/task/{tid}/syscall"));
    let mut running = Vec::new();
    let mut found = Vec::new();
    for &tgid in tgids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{tgid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            match syscall(tgid, tid) {
                Ok(sc) if sc.starts_with("running") => running.push((tgid, tid)),
                Ok(sc) => found.extend(kvm_run_fd(&sc).map(|fd| (tgid, tid, fd))),
                Err(_) => {}
            }
        }
    }
    for _ in 0..20 {
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        running.retain(|&(tgid, tid)| match syscall(tgid, tid) {
            Ok(sc) if sc.starts_with("running") => true,
            Ok(sc) => {
                found.extend(kvm_run_fd(&sc).map(|fd| (tgid, tid, fd)));
                false
            }
            Err(_) => false,
        });
    }
    found
}

fn kvm_run_fd(syscall: &str) -> Option<u32> {
    let mut f = syscall.split_whitespace();
    if f.next()? != SYS_IOCTL {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    let fd = hex(f.next()?)?;
    (hex(f.next()?)? == KVM_RUN as u64).then_some(fd as u32)
}

/// Things that come and go (VMM processes, block devices), each gone for a grace period before
/// it is collected.
#[derive(Debug)]
pub struct Lifecycle<T> {
    grace: Duration,
    /// Its identity now (a process's start time), None when gone.
    identity: fn(T) -> Option<u64>,
    /// Identity when first seen alive.
    seen: HashMap<T, u64>,
    /// When it was first seen gone.
    gone_since: HashMap<T, Instant>,
}

impl<T: Copy + Eq + Hash> Lifecycle<T> {
    fn new(grace: Duration, identity: fn(T) -> Option<u64>) -> Self {
        Lifecycle {
            grace,
            identity,
            seen: HashMap::new(),
            gone_since: HashMap::new(),
        }
    }

    /// Is `t` the same live thing it was when first seen?
    fn alive(&mut self, t: T) -> bool {
        match ((self.identity)(t), self.seen.get(&t)) {
            (None, _) => false,
            (Some(now), Some(&first)) => now == first,
            (Some(now), None) => {
                self.seen.insert(t, now);
                true
            }
        }
    }

    /// Checks every candidate, and returns those gone for longer than the grace period,
    /// forgetting them.
    pub fn expired(&mut self, candidates: impl IntoIterator<Item = T>, now: Instant) -> Vec<T> {
        let candidates: HashSet<T> = candidates.into_iter().collect();
        // What no map names any more (a tap's NET_DEVS entry goes at the next sysfs read) is
        // forgotten, not kept for ever.
        self.seen.retain(|t, _| candidates.contains(t));
        self.gone_since.retain(|t, _| candidates.contains(t));
        let mut out = Vec::new();
        for t in candidates {
            if self.alive(t) {
                self.gone_since.remove(&t);
                continue;
            }
            let since = *self.gone_since.entry(t).or_insert(now);
            if now.duration_since(since) >= self.grace {
                out.push(t);
            }
        }
        for t in &out {
            self.gone_since.remove(t);
            self.seen.remove(t);
        }
        out
    }
}

/// VMs and devices, and what one collection removed.
#[derive(Debug)]
pub struct Collector {
    pub vms: Lifecycle<u32>,
    pub devices: Lifecycle<u32>,
    pub netdevs: Lifecycle<u32>,
}

/// What one collection found gone and removed.
#[derive(Debug, Default)]
pub struct Collected {
    pub vms: HashSet<u32>,
    pub devices: HashSet<u32>,
    pub netdevs: HashSet<u32>,
    pub kernel_entries: usize,
}

impl Collected {
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.devices.is_empty() && self.netdevs.is_empty()
    }

    /// Is what `o` names gone?
    pub fn owns(&self, o: Owner) -> bool {
        self.vms.contains(&o.vm)
            || self.devices.contains(&o.dev)
            || self.netdevs.contains(&o.netdev)
    }
}

/// Is an entry of `map` owned by `o` to go? The entries of gone VMs and devices go, but a VMM
/// set entry whose pid a live VMM holds again stays: that is the new VMM (it marked itself at
/// KVM_CREATE_VM), and dropping it would hide its system calls for its whole life. (Its other
/// entries are keyed by the same pid and cannot be told from the old VM's: they go, a loss at
/// the new VM's start.)
fn doomed(map: &str, o: Owner, dead: &Collected, vmm_again: &HashSet<u32>) -> bool {
    if map == maps::VMM_TGIDS.name && vmm_again.contains(&o.vm) {
        return false;
    }
    dead.owns(o)
}

impl Collector {
    pub fn new(grace: Duration) -> Self {
        Collector {
            vms: Lifecycle::new(grace, start_time),
            devices: Lifecycle::new(grace, device_exists),
            netdevs: Lifecycle::new(grace, netdev_exists),
        }
    }

    /// Checks every owner named by a kernel map entry (the histogram's by its keys only), and
    /// returns those gone for the grace period. Nothing is removed yet.
    pub fn find_dead(&mut self, ebpf: &Ebpf, now: Instant) -> Collected {
        let owners: Vec<Owner> = maps::all().iter().flat_map(|m| m.owners(ebpf)).collect();
        let vms: HashSet<u32> = owners.iter().map(|o| o.vm).filter(|&v| v != 0).collect();
        let devs: HashSet<u32> = owners.iter().map(|o| o.dev).filter(|&d| d != 0).collect();
        let netdevs: HashSet<u32> = owners
            .iter()
            .map(|o| o.netdev)
            .filter(|&d| d != 0)
            .collect();
        Collected {
            vms: self.vms.expired(vms, now).into_iter().collect(),
            devices: self.devices.expired(devs, now).into_iter().collect(),
            netdevs: self.netdevs.expired(netdevs, now).into_iter().collect(),
            kernel_entries: 0,
        }
    }

    /// Removes the kernel entries of what `dead` names, from every map of the table.
    pub fn remove(ebpf: &mut Ebpf, dead: &mut Collected) {
        // A gone VM's pid that a live VMM holds again: that one keeps its set entry.
        let vmm_again: HashSet<u32> = dead
            .vms
            .iter()
            .copied()
            .filter(|&vm| holds_vm(vm))
            .collect();
        dead.kernel_entries = maps::all()
            .iter()
            .map(|m| m.remove(ebpf, &|o| doomed(m.name, o, dead, &vmm_again)))
            .sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_thread_in_kvm_run_names_its_fd() {
        let line = "16 0x1b 0xae80 0x0 0x0 0x0 0x0 0x7f3a8bffe5f8 0x7f3a9c11ac5b\n";
        assert_eq!(kvm_run_fd(line), Some(0x1b));
        assert_eq!(kvm_run_fd("16 0x1b 0xae01 0x0 0x0 0x0 0x0 0x0 0x0"), None);
        assert_eq!(kvm_run_fd("7 0x5 0xae80 0x0 0x0 0x0 0x0 0x0 0x0"), None);
        assert_eq!(kvm_run_fd("running"), None);
    }

    #[test]
    fn a_vm_expires_only_after_the_grace_period() {
        let mut gc = Lifecycle::new(Duration::from_secs(10), start_time);
        let me = std::process::id();
        let gone = u32::MAX - 7; // no such pid
        let t0 = Instant::now();
        assert!(gc.expired([me, gone], t0).is_empty());
        assert!(
            gc.expired([me, gone], t0 + Duration::from_secs(9))
                .is_empty()
        );
        assert_eq!(gc.expired([me, gone], t0 + Duration::from_secs(10)), [gone]);
        // forgotten: seen gone again, it starts a new grace period
        assert!(gc.expired([gone], t0 + Duration::from_secs(11)).is_empty());
        // no longer named by any map: forgotten too
        assert!(gc.expired([], t0 + Duration::from_secs(12)).is_empty());
        assert!(gc.seen.is_empty() && gc.gone_since.is_empty());
    }

    #[test]
    fn a_reused_pid_is_another_vm() {
        let mut gc = Lifecycle::new(Duration::ZERO, |_| Some(7));
        let t0 = Instant::now();
        assert!(gc.expired([42], t0).is_empty());
        gc.identity = |_| Some(8); // same pid, another process
        assert_eq!(gc.expired([42], t0), [42]);
    }

    #[test]
    fn a_reused_pid_keeps_the_new_vmm_in_the_set() {
        let dead = Collected {
            vms: HashSet::from([42, 43]),
            devices: HashSet::from([7 << 20]),
            netdevs: HashSet::from([9]),
            kernel_entries: 0,
        };
        let live = HashSet::from([43]); // 43 is a new VMM now
        let vm = |v| Owner {
            vm: v,
            ..Owner::default()
        };
        assert!(doomed("VMM_TGIDS", vm(42), &dead, &live));
        assert!(!doomed("VMM_TGIDS", vm(43), &dead, &live));
        assert!(doomed("VCPU_FD", vm(43), &dead, &live));
        assert!(!doomed("VCPU_FD", vm(44), &dead, &live));
        assert!(doomed(
            "HIST",
            Owner {
                dev: 7 << 20,
                ..Owner::default()
            },
            &dead,
            &live
        ));
        assert!(doomed(
            "HIST",
            Owner {
                netdev: 9,
                ..Owner::default()
            },
            &dead,
            &live
        ));
    }

    #[test]
    fn start_time_of_self_and_of_nothing() {
        assert!(start_time(std::process::id()).is_some());
        assert!(!holds_vm(std::process::id()), "this test is no VMM");
        assert_eq!(start_time(u32::MAX - 7), None);
        assert_eq!(device_exists(u32::MAX), None);
        assert_eq!(netdev_exists(1), Some(0), "lo is ifindex 1");
        assert_eq!(netdev_exists(u32::MAX), None);
    }
}
