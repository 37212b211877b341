//! Which IRQs `vfio.handler` follows, and whose they are. vfio-pci names a device's IRQs
//! `vfio-msix[N](BDF)`, `vfio-msi[N](BDF)` and `vfio-intx(BDF)` (`/sys/kernel/irq/IRQ/actions`);
//! the device's IOMMU group is `/sys/bus/pci/devices/BDF/iommu_group`, and its VMM the process
//! that holds `/dev/vfio/GROUP` open, or the device's own character device
//! (`/dev/vfio/devices/vfioN`, named by `BDF/vfio-dev/vfioN`) that a VMM using iommufd opens. `--vfio-irqs` adds name prefixes of other IRQs (the host's
//! own devices, to check the stage on a machine without VFIO): their device is the PCI function
//! whose `msi_irqs` lists the IRQ, their vector its place there. The IRQs come and go with the
//! guest's driver (vfio-pci requests them when the guest enables MSI-X), so this runs every
//! second.

use std::{collections::BTreeMap, fs, path::Path};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use tracer_common::vfio::{PostedIrte, VfioIrq, pci_key};

/// `vfio-msix[3](0000:00:06.0)` → (3, "0000:00:06.0"); `vfio-intx(…)` has vector 0.
pub fn parse_vfio_name(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix("vfio-")?;
    let (kind, rest) = rest.split_at(rest.find(['[', '('])?);
    if !matches!(kind, "msix" | "msi" | "intx") {
        return None;
    }
    let (vector, rest) = match rest.strip_prefix('[') {
        Some(r) => {
            let (n, r) = r.split_once(']')?;
            (n.parse().ok()?, r)
        }
        None => (0, rest),
    };
    let bdf = rest.strip_prefix('(')?.strip_suffix(')')?;
    Some((vector, bdf))
}

/// "0000:00:06.0" as one number (`pci_key`).
pub fn parse_bdf(s: &str) -> Option<u32> {
    let (domain, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let hex = |v: &str| u32::from_str_radix(v, 16).ok();
    Some(pci_key(hex(domain)?, hex(bus)?, hex(dev)?, hex(func)?))
}

/// The IRQs to follow under `root` (a sysfs, `/sys` on a host): each IRQ whose handler is
/// named by vfio-pci or starts with one of `prefixes`, with its device and vector; `vm` 0 (the
/// caller names the VMM).
pub fn scan(root: &Path, prefixes: &[String]) -> BTreeMap<u32, (VfioIrq, Option<String>)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir(root.join("kernel/irq")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(irq) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let actions = fs::read_to_string(e.path().join("actions")).unwrap_or_default();
        for name in actions.trim().split(',').filter(|n| !n.is_empty()) {
            if let Some((vector, bdf)) = parse_vfio_name(name) {
                if let Some(dev) = parse_bdf(bdf) {
                    let v = VfioIrq {
                        dev,
                        vm: 0,
                        vector,
                        _pad: 0,
                    };
                    out.insert(irq, (v, Some(bdf.to_string())));
                    break;
                }
            } else if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                let (dev, vector) = msi_owner(root, irq).unwrap_or((0, 0));
                out.insert(
                    irq,
                    (
                        VfioIrq {
                            dev,
                            vm: 0,
                            vector,
                            _pad: 0,
                        },
                        None,
                    ),
                );
                break;
            }
        }
    }
    out
}

/// The PCI function whose `msi_irqs` lists `irq`, and the IRQ's place among them.
fn msi_owner(root: &Path, irq: u32) -> Option<(u32, u32)> {
    for d in fs::read_dir(root.join("bus/pci/devices")).ok()?.flatten() {
        let Ok(list) = fs::read_dir(d.path().join("msi_irqs")) else {
            continue;
        };
        let mut irqs: Vec<u32> = list
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        irqs.sort_unstable();
        if let Some(i) = irqs.iter().position(|&n| n == irq) {
            return Some((parse_bdf(d.file_name().to_str()?)?, i as u32));
        }
    }
    None
}

/// The VMM that holds VFIO device `bdf`: the process (under `proc`) with its group's
/// `/dev/vfio/GROUP` open (the group named by `sys`), or the device's cdev
/// `/dev/vfio/devices/vfioN` (iommufd: QEMU's `-object iommufd`, which opens no group).
fn holder(sys: &Path, proc: &Path, bdf: &str) -> Option<u32> {
    let dev = sys.join("bus/pci/devices").join(bdf);
    let mut want = Vec::new();
    if let Some(group) = fs::read_link(dev.join("iommu_group"))
        .ok()
        .and_then(|g| g.file_name().map(|n| n.to_owned()))
    {
        want.push(Path::new("/dev/vfio").join(group));
    }
    for cdev in fs::read_dir(dev.join("vfio-dev"))
        .into_iter()
        .flatten()
        .flatten()
    {
        want.push(Path::new("/dev/vfio/devices").join(cdev.file_name()));
    }
    if want.is_empty() {
        return None;
    }
    for p in fs::read_dir(proc).ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| want.contains(&l)))
        {
            return Some(pid);
        }
    }
    None
}

/// What the daemon wrote into `VFIO_IRQS`, kept to write only what changed.
#[derive(Default)]
pub struct Watch {
    pub prefixes: Vec<String>,
    written: BTreeMap<u32, VfioIrq>,
    /// VMM of each VFIO device, found once per device while its IRQs exist.
    holders: BTreeMap<String, u32>,
}

impl Watch {
    pub fn new(prefixes: Vec<String>) -> Watch {
        Watch {
            prefixes,
            ..Watch::default()
        }
    }

    /// Scans the IRQs and brings the kernel map to them; returns how many are followed.
    pub fn update(&mut self, ebpf: &mut Ebpf) -> usize {
        let mut found = scan(Path::new("/sys"), &self.prefixes);
        self.holders
            .retain(|bdf, _| found.values().any(|(_, b)| b.as_deref() == Some(bdf)));
        for (v, bdf) in found.values_mut() {
            if let Some(bdf) = bdf {
                let vm = match self.holders.get(bdf.as_str()) {
                    Some(&vm) => vm,
                    None => {
                        let vm = holder(Path::new("/sys"), Path::new("/proc"), bdf).unwrap_or(0);
                        if vm != 0 {
                            self.holders.insert(bdf.clone(), vm);
                        }
                        vm
                    }
                };
                v.vm = vm;
            }
        }
        let Some(Ok(mut map)) = ebpf
            .map_mut("VFIO_IRQS")
            .map(HashMap::<&mut MapData, u32, VfioIrq>::try_from)
        else {
            return 0;
        };
        for (irq, (v, _)) in &found {
            if self.written.get(irq) != Some(v) && map.insert(irq, v, 0).is_ok() {
                self.written.insert(*irq, *v);
            }
        }
        let gone: Vec<u32> = self
            .written
            .keys()
            .filter(|irq| !found.contains_key(irq))
            .copied()
            .collect();
        for irq in &gone {
            let _ = map.remove(irq);
            self.written.remove(irq);
        }
        // An IRQ's posted state goes with the IRQ: a number reused by another device must not
        // inherit it (the update that set it may also have come from a kworker that never
        // exits, which gc would keep for good). Only IRQs known gone: one requested since the
        // scan above may already have its update.
        if let Some(Ok(mut irtes)) = ebpf
            .map_mut("POSTED_IRTES")
            .map(HashMap::<&mut MapData, u32, PostedIrte>::try_from)
        {
            let stale: Vec<u32> = irtes
                .keys()
                .flatten()
                .filter(|irq| {
                    gone.contains(irq) || !Path::new(&format!("/sys/kernel/irq/{irq}")).exists()
                })
                .collect();
            for irq in stale {
                let _ = irtes.remove(&irq);
            }
        }
        self.written.len()
    }

    /// The followed IRQs kvm:kvm_pi_irte_update has spoken of, with what it last said
    /// (`POSTED_IRTES`; empty where that event is not attached).
    pub fn posted(&self, ebpf: &Ebpf) -> Vec<(VfioIrq, PostedIrte)> {
        let Some(Ok(map)) = ebpf
            .map("POSTED_IRTES")
            .map(HashMap::<&MapData, u32, PostedIrte>::try_from)
        else {
            return Vec::new();
        };
        let irtes: BTreeMap<u32, PostedIrte> = map.iter().flatten().collect();
        joined(&self.written, &irtes)
    }
}

/// Each followed IRQ (`followed`, by host IRQ) that has an IRTE state, with it.
pub fn joined(
    followed: &BTreeMap<u32, VfioIrq>,
    irtes: &BTreeMap<u32, PostedIrte>,
) -> Vec<(VfioIrq, PostedIrte)> {
    followed
        .iter()
        .filter_map(|(irq, v)| Some((*v, *irtes.get(irq)?)))
        .collect()
}

/// The host-wide posted-interrupt events in /proc/interrupts (`text`): the notification (PIN:
/// a posted interrupt's notice that reached the host, the vCPU out of guest mode) and wakeup
/// (PIW: a halted vCPU woken) rows, summed over CPUs, from every source (devices, KVM's own
/// posted injections, IPIs). x86 kernels with KVM print them whatever the vendor; AMD's AVIC
/// wakes a halted vCPU through the IOMMU's GA log instead, in neither row.
pub fn posted_host_events(text: &str) -> Vec<(&'static str, u64)> {
    [("PIN", "notification"), ("PIW", "wakeup")]
        .into_iter()
        .filter_map(|(row, kind)| {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{row}:")))?;
            let counts = line.split_once(':')?.1;
            let n = counts
                .split_whitespace()
                .map_while(|w| w.parse::<u64>().ok())
                .sum();
            Some((kind, n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_pcis_irq_names_give_vector_and_device() {
        assert_eq!(
            parse_vfio_name("vfio-msix[3](0000:00:06.0)"),
            Some((3, "0000:00:06.0"))
        );
        assert_eq!(
            parse_vfio_name("vfio-msi[0](0000:3b:00.1)"),
            Some((0, "0000:3b:00.1"))
        );
        assert_eq!(
            parse_vfio_name("vfio-intx(0000:00:06.0)"),
            Some((0, "0000:00:06.0"))
        );
        assert_eq!(parse_vfio_name("virtio1-req.0"), None);
        assert_eq!(parse_vfio_name("vfio-err(0000:00:06.0)"), None);
        assert_eq!(parse_bdf("0000:00:06.0"), Some(0x30));
        assert_eq!(parse_bdf("0000:3b:1f.7"), Some(0x3bff));
        assert_eq!(parse_bdf("zz"), None);
        assert_eq!(
            crate::labels::pci_name(parse_bdf("0001:3b:1f.7").unwrap()),
            "0001:3b:1f.7"
        );
    }

    /// A VFIO device's IRQs and its VMM, on a tree written by hand in the shape of sysfs and
    /// procfs (this machine has no VFIO device): `kernel/irq/N/actions`, the device's
    /// `iommu_group` link, and a process holding `/dev/vfio/GROUP` open.
    #[test]
    fn a_vfio_devices_irqs_name_its_vector_and_its_vmm() {
        let root = std::env::temp_dir().join(format!("iopath-vfio-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (sys, proc) = (root.join("sys"), root.join("proc"));
        let irq = |n: u32, actions: &str| {
            let d = sys.join(format!("kernel/irq/{n}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("actions"), format!("{actions}\n")).unwrap();
        };
        irq(40, "vfio-msix[0](0000:00:06.0)");
        irq(41, "vfio-msix[1](0000:00:06.0)");
        irq(42, "vfio-intx(0000:00:07.0)");
        irq(43, "virtio1-req.0");
        irq(44, "");
        let dev = sys.join("bus/pci/devices/0000:00:06.0");
        fs::create_dir_all(&dev).unwrap();
        std::os::unix::fs::symlink("../../../kernel/iommu_groups/4", dev.join("iommu_group"))
            .unwrap();
        for (pid, target) in [
            (100, "/dev/null"),
            (200, "/dev/vfio/4"),
            (300, "/dev/vfio/vfio"),
        ] {
            let fd = proc.join(format!("{pid}/fd"));
            fs::create_dir_all(&fd).unwrap();
            std::os::unix::fs::symlink(target, fd.join("7")).unwrap();
        }
        let found = scan(&sys, &[]);
        let got: Vec<(u32, u32, u32)> = found
            .iter()
            .map(|(irq, (v, _))| (*irq, v.dev, v.vector))
            .collect();
        assert_eq!(got, [(40, 0x30, 0), (41, 0x30, 1), (42, 0x38, 0)]);
        assert_eq!(found[&40].1.as_deref(), Some("0000:00:06.0"));
        // The process holding group 4, not the container or another file.
        assert_eq!(holder(&sys, &proc, "0000:00:06.0"), Some(200));
        // A device with no group link (not bound to vfio-pci): no VMM.
        assert_eq!(holder(&sys, &proc, "0000:00:07.0"), None);
        // A device a VMM opened through iommufd: its cdev, not its group, is held.
        let cdev = sys.join("bus/pci/devices/0000:00:08.0");
        fs::create_dir_all(cdev.join("vfio-dev/vfio2")).unwrap();
        std::os::unix::fs::symlink("../../../kernel/iommu_groups/9", cdev.join("iommu_group"))
            .unwrap();
        let fd = proc.join("400/fd");
        fs::create_dir_all(&fd).unwrap();
        std::os::unix::fs::symlink("/dev/vfio/devices/vfio2", fd.join("12")).unwrap();
        std::os::unix::fs::symlink("/dev/iommu", fd.join("11")).unwrap();
        assert_eq!(holder(&sys, &proc, "0000:00:08.0"), Some(400));
        // A prefix adds a host IRQ, with no device where no PCI function lists it.
        let with = scan(&sys, &["virtio1-req".into()]);
        assert_eq!(with[&43].0.dev, 0);
        assert_eq!(with[&43].1, None);
        let _ = fs::remove_dir_all(&root);
    }

    /// This machine's own IRQs, named by a prefix: each one found with its PCI function and
    /// its place among that function's vectors, as /proc/interrupts shows them.
    #[test]
    fn the_hosts_own_irqs_are_found_by_prefix() {
        let all = scan(Path::new("/sys"), &["virtio".into()]);
        let proc = fs::read_to_string("/proc/interrupts").unwrap_or_default();
        let want: Vec<u32> = proc
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .last()
                    .is_some_and(|n| n.starts_with("virtio"))
            })
            .filter_map(|l| l.split(':').next()?.trim().parse().ok())
            .collect();
        assert_eq!(all.keys().copied().collect::<Vec<_>>(), want);
        for (irq, (v, bdf)) in &all {
            assert_eq!(*bdf, None, "not a VFIO name");
            let line = proc
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{irq}:")))
                .unwrap();
            // "PCI-MSIX-0000:00:01.0   3-edge": the function and the vector
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| w.starts_with("PCI-MSI")) {
                let bdf = words[i].rsplit('-').next().unwrap();
                assert_eq!(crate::labels::pci_name(v.dev), bdf, "IRQ {irq}");
                let hwirq = words[i + 1].split('-').next().unwrap();
                assert_eq!(v.vector.to_string(), hwirq, "IRQ {irq}'s vector");
            }
        }
        assert!(
            scan(Path::new("/sys"), &[])
                .values()
                .all(|(_, b)| b.is_some())
        );
    }
}
