//! The kernel maps that grow with VMs, threads, devices or requests, and how each is collected:
//! what an entry belongs to (a VM, a block device), read from its key or its value. Stage rows
//! name their maps (`stages`); collection, the `iopath_kernel_map_entries` gauge and the tests'
//! leftover checks iterate this table, not hand-kept lists.

use aya::{
    Ebpf, Pod,
    maps::{HashMap, MapData, PerCpuHashMap},
};
use tracer_common::{
    blk::{
        BlkStart, SectorKey, SectorStart,
        vm::{DiskKey, Done, Last, LioCmd, Pairing, SignalKey},
    },
    kvm::{
        ExitStart,
        inject::{PendingInject, VcpuKey},
        signal::SignalStart,
        uexit::{UexitStart, VcpuThread},
    },
    maps::{HistKey, HistVal},
    net::{backend_to_irq::Batch, tx_backend::TxRun, tx_kick::KickStart, wakeup::Woken},
    stage::StageId,
    vfio::{PostedIrte, VfioIrq},
};

use crate::stages::STAGES;

/// What one entry belongs to; 0 for nothing of that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// tgid of a VMM.
    pub vm: u32,
    /// Kernel dev_t of a block device.
    pub dev: u32,
    /// ifindex of a tap (the net stages' series).
    pub netdev: u32,
}

impl Owner {
    /// The owner of a histogram series (`HistKey` stage, obj, vm): its VM, and its device for
    /// blk.device (`obj` is the dev_t there) and for every stage of the net path (`obj` is the
    /// tap), as the stage table says.
    pub fn of_series(stage: u16, obj: u32, vm: u32) -> Owner {
        let path = StageId::from_u16(stage).map(|s| crate::stages::stage(s).path);
        Owner {
            vm,
            dev: if path == Some(crate::stages::Path::Block) {
                obj
            } else {
                0
            },
            netdev: if path == Some(crate::stages::Path::Net) {
                obj
            } else {
                0
            },
        }
    }

    const fn vm(vm: u32) -> Owner {
        Owner {
            vm,
            dev: 0,
            netdev: 0,
        }
    }
    const fn dev(dev: u32) -> Owner {
        Owner {
            vm: 0,
            dev,
            netdev: 0,
        }
    }
    const fn netdev(netdev: u32) -> Owner {
        Owner {
            vm: 0,
            dev: 0,
            netdev,
        }
    }
}

/// Which flag sizes a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// `--hist-entries`.
    Hist,
    /// `--start-entries`: maps of events in flight.
    Starts,
    /// Fixed in the BPF object.
    Fixed,
}

/// Typed access to one map, behind a trait so the table can hold maps of any layout.
trait Access: Sync {
    /// The owner of every entry.
    fn owners(&self, ebpf: &Ebpf, name: &str) -> Vec<Owner>;
    /// Entries, counted by their keys alone (no value is read).
    fn len(&self, ebpf: &Ebpf, name: &str) -> usize;
    /// Removes the entries whose owner `doomed` selects; returns how many.
    fn remove(&self, ebpf: &mut Ebpf, name: &str, doomed: &dyn Fn(Owner) -> bool) -> usize;
}

/// A hash map whose owner comes from key and value.
struct Hash<K, V>(fn(&K, &V) -> Owner);

impl<K: Pod + Sync, V: Pod + Sync> Access for Hash<K, V> {
    fn owners(&self, ebpf: &Ebpf, name: &str) -> Vec<Owner> {
        ebpf.map(name)
            .and_then(|m| HashMap::<&MapData, K, V>::try_from(m).ok())
            .map(|m| m.iter().flatten().map(|(k, v)| (self.0)(&k, &v)).collect())
            .unwrap_or_default()
    }

    fn len(&self, ebpf: &Ebpf, name: &str) -> usize {
        ebpf.map(name)
            .and_then(|m| HashMap::<&MapData, K, V>::try_from(m).ok())
            .map_or(0, |m| m.keys().flatten().count())
    }

    fn remove(&self, ebpf: &mut Ebpf, name: &str, doomed: &dyn Fn(Owner) -> bool) -> usize {
        let Some(Ok(mut m)) = ebpf
            .map_mut(name)
            .map(HashMap::<&mut MapData, K, V>::try_from)
        else {
            return 0;
        };
        let keys: Vec<K> = m
            .iter()
            .flatten()
            .filter(|(k, v)| doomed((self.0)(k, v)))
            .map(|(k, _)| k)
            .collect();
        keys.iter().filter(|k| m.remove(k).is_ok()).count()
    }
}

/// A per-CPU hash map whose owner is in the key (the values are per CPU).
struct PerCpuHash<K, V>(fn(&K) -> Owner, std::marker::PhantomData<fn() -> V>);

impl<K: Pod + Sync, V: Pod + Sync> Access for PerCpuHash<K, V> {
    fn owners(&self, ebpf: &Ebpf, name: &str) -> Vec<Owner> {
        ebpf.map(name)
            .and_then(|m| PerCpuHashMap::<&MapData, K, V>::try_from(m).ok())
            .map(|m| m.keys().flatten().map(|k| (self.0)(&k)).collect())
            .unwrap_or_default()
    }

    fn len(&self, ebpf: &Ebpf, name: &str) -> usize {
        self.owners(ebpf, name).len()
    }

    fn remove(&self, ebpf: &mut Ebpf, name: &str, doomed: &dyn Fn(Owner) -> bool) -> usize {
        let Some(Ok(mut m)) = ebpf
            .map_mut(name)
            .map(PerCpuHashMap::<&mut MapData, K, V>::try_from)
        else {
            return 0;
        };
        let keys: Vec<K> = m.keys().flatten().filter(|k| doomed((self.0)(k))).collect();
        keys.iter().filter(|k| m.remove(k).is_ok()).count()
    }
}

/// A kernel map that grows, and how its entries are collected.
pub struct KernelMap {
    /// Its name in the BPF object (the `map` label).
    pub name: &'static str,
    /// How an entry is tied to what it belongs to, in words (`iopath doctor --json`).
    pub collected: &'static str,
    pub capacity: Capacity,
    access: &'static dyn Access,
}

impl std::fmt::Debug for KernelMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl KernelMap {
    pub fn owners(&self, ebpf: &Ebpf) -> Vec<Owner> {
        self.access.owners(ebpf, self.name)
    }

    /// Its entries now (what `iopath_kernel_map_entries` reports).
    pub fn len(&self, ebpf: &Ebpf) -> usize {
        self.access.len(ebpf, self.name)
    }

    pub fn remove(&self, ebpf: &mut Ebpf, doomed: &dyn Fn(Owner) -> bool) -> usize {
        self.access.remove(ebpf, self.name, doomed)
    }
}

/// The histogram: one entry per series and bucket, owned by its VM, and by its device for
/// blk.device.
pub static HIST: KernelMap = KernelMap {
    name: "HIST",
    collected: "by VM (key), by device (key) for blk.device, by tap (key) for net.*",
    capacity: Capacity::Hist,
    access: &PerCpuHash::<HistKey, HistVal>(
        |k| Owner::of_series(k.stage, k.obj, k.vm),
        std::marker::PhantomData,
    ),
};

pub static VMM_TGIDS: KernelMap = KernelMap {
    name: "VMM_TGIDS",
    collected: "by VM (the key is the VMM)",
    capacity: Capacity::Fixed,
    access: &Hash::<u32, u32>(|k, _| Owner::vm(*k)),
};

pub static BLK_START_SECTOR: KernelMap = KernelMap {
    name: "BLK_START_SECTOR",
    collected: "by device (key)",
    capacity: Capacity::Starts,
    access: &Hash::<SectorKey, SectorStart>(|k, _| Owner::dev(k.dev)),
};

pub static BLK_KNOWN: KernelMap = KernelMap {
    name: "BLK_KNOWN",
    collected: "by VM (key)",
    capacity: Capacity::Starts,
    access: &Hash::<SignalKey, u32>(|k, _| Owner::vm(k.vm)),
};

pub static BLK_PAIRING: KernelMap = KernelMap {
    name: "BLK_PAIRING",
    collected: "by VM (key); a decided entry moves to BLK_KNOWN",
    capacity: Capacity::Starts,
    access: &Hash::<SignalKey, Pairing>(|k, _| Owner::vm(k.vm)),
};

pub static BLK_LAST: KernelMap = KernelMap {
    name: "BLK_LAST",
    collected: "by VM (key)",
    capacity: Capacity::Starts,
    access: &Hash::<SignalKey, Last>(|k, _| Owner::vm(k.vm)),
};

pub static BLK_KICK: KernelMap = KernelMap {
    name: "BLK_KICK",
    collected: "by VM (key), by device (key)",
    capacity: Capacity::Starts,
    access: &Hash::<DiskKey, u64>(|k, _| Owner {
        vm: k.vm,
        dev: k.dev,
        netdev: 0,
    }),
};

pub static BLK_THREADS: KernelMap = KernelMap {
    name: "BLK_THREADS",
    collected: "by VM (value), by device (value); a thread that is gone by the daemon (its cost read)",
    capacity: Capacity::Starts,
    access: &Hash::<u32, DiskKey>(|_, v| Owner {
        vm: v.vm,
        dev: v.dev,
        netdev: 0,
    }),
};

pub static VFIO_IRQS: KernelMap = KernelMap {
    name: "VFIO_IRQS",
    collected: "by VM (value); written by the daemon from the IRQs' names",
    capacity: Capacity::Starts,
    access: &Hash::<u32, VfioIrq>(|_, v| Owner::vm(v.vm)),
};

pub static POSTED_IRTES: KernelMap = KernelMap {
    name: "POSTED_IRTES",
    collected: "by IRQ: the daemon removes an IRQ's entry once the IRQ is gone; by VM (value: the task that made the update)",
    capacity: Capacity::Starts,
    access: &Hash::<u32, PostedIrte>(|_, v| Owner::vm(v.vm)),
};

pub static LIO_CMDS: KernelMap = KernelMap {
    name: "LIO_CMDS",
    collected: "by VM (value); an LRU map: a command never submitted is evicted",
    capacity: Capacity::Starts,
    access: &Hash::<u64, LioCmd>(|_, c| Owner::vm(c.vm)),
};

/// A VMM's flush and FUA bios in flight (blk.sync), by bio pointer.
pub static BLK_SYNC: KernelMap = KernelMap {
    name: "BLK_SYNC",
    collected: "by VM (value), by device (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u64, BlkStart>(|_, v| Owner {
        vm: v.vm,
        dev: v.dev,
        netdev: 0,
    }),
};

pub static BLK_DONE: KernelMap = KernelMap {
    name: "BLK_DONE",
    collected: "by VM (key), by device (key)",
    capacity: Capacity::Starts,
    access: &Hash::<DiskKey, Done>(|k, _| Owner {
        vm: k.vm,
        dev: k.dev,
        netdev: 0,
    }),
};

pub static KVM_EXIT_START: KernelMap = KernelMap {
    name: "KVM_EXIT_START",
    collected: "by VM (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u32, ExitStart>(|_, v| Owner::vm(v.vm)),
};

pub static SIG_START: KernelMap = KernelMap {
    name: "SIG_START",
    collected: "by VM (value); a start ends at its system call's return",
    capacity: Capacity::Starts,
    access: &Hash::<u32, SignalStart>(|_, v| Owner::vm(v.vm)),
};

pub static SIG_DEFERRED: KernelMap = KernelMap {
    name: "SIG_DEFERRED",
    collected: "by VM (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u64, SignalStart>(|_, v| Owner::vm(v.vm)),
};

pub static INJ_PENDING: KernelMap = KernelMap {
    name: "INJ_PENDING",
    collected: "by VM (key)",
    capacity: Capacity::Starts,
    access: &Hash::<VcpuKey, PendingInject>(|k, _| Owner::vm(k.vm)),
};

pub static UEXIT_START: KernelMap = KernelMap {
    name: "UEXIT_START",
    collected: "by VM (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u32, UexitStart>(|_, v| Owner::vm(v.vm)),
};

pub static VCPU_FD: KernelMap = KernelMap {
    name: "VCPU_FD",
    collected: "by VM (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u32, VcpuThread>(|_, v| Owner::vm(v.vm)),
};

pub static NET_RX_BATCH: KernelMap = KernelMap {
    name: "NET_RX_BATCH",
    collected: "by VM (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u32, Batch>(|_, v| Owner::vm(v.vm)),
};

pub static NET_TX_KICK: KernelMap = KernelMap {
    name: "NET_TX_KICK",
    collected: "by VM (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u64, KickStart>(|_, v| Owner::vm(v.vm)),
};

pub static NET_WOKEN: KernelMap = KernelMap {
    name: "NET_WOKEN",
    collected: "by VM (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u32, Woken>(|_, v| Owner::vm(v.vm)),
};

pub static NET_TX_RUN: KernelMap = KernelMap {
    name: "NET_TX_RUN",
    collected: "by VM (value)",
    capacity: Capacity::Starts,
    access: &Hash::<u32, TxRun>(|_, v| Owner::vm(v.vm)),
};

pub static NET_DEVS: KernelMap = KernelMap {
    name: "NET_DEVS",
    collected: "by network device (key); kept equal to sysfs by the daemon (netdevs)",
    capacity: Capacity::Fixed,
    access: &Hash::<u32, u32>(|k, _| Owner::netdev(*k)),
};

/// Maps every stage uses, and the net stages' device table (the daemon's to keep).
pub static SHARED: &[&KernelMap] = &[&HIST, &VMM_TGIDS, &NET_DEVS];

/// Every growing map: the shared ones, then each stage's, once each.
pub fn all() -> Vec<&'static KernelMap> {
    let mut out: Vec<&'static KernelMap> = SHARED.to_vec();
    for s in STAGES {
        for m in s.maps {
            if !out.iter().any(|o| o.name == m.name) {
                out.push(m);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_growing_map_of_the_object_is_in_the_table() {
        // The hash maps of the BPF object are exactly the table's: a map a stage forgets to
        // name would never be collected.
        let obj = aya_obj::Object::parse(crate::attach::BPF_OBJECT).expect("the object parses");
        let hashes: std::collections::BTreeSet<String> = obj
            .maps
            .iter()
            .filter(|(_, m)| {
                matches!(
                    m.map_type(),
                    t if t == aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32
                        || t == aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH as u32
                        || t == aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32
                )
            })
            .map(|(name, _)| name.clone())
            .collect();
        let table: std::collections::BTreeSet<String> =
            all().iter().map(|m| m.name.to_string()).collect();
        assert_eq!(hashes, table);
        // every start map a stage keeps is sized by --start-entries
        for s in STAGES {
            for m in s.maps {
                assert_eq!(m.capacity, Capacity::Starts, "{}", m.name);
            }
        }
    }
}
