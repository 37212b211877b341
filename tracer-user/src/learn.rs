//! Which of a VMM's notify addresses and interrupt vectors are a disk's: the programs count
//! pairings (`BLK_PAIRING`: a kick with the VMM's next request, a completion with its next
//! interrupt), and this writes what they show (`tracer_common::blk::vm::verdict`) into
//! `BLK_KNOWN`, where the programs look first. Observed pairing is the only source: the VMM's
//! GSI routing and KVM_IRQFD ioctls are not followed (`iopath doctor` says so).

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use tracer_common::blk::vm::{Pairing, SignalKey, kind, verdict};

/// One signal learned: whose, what, and for which disk (0: another device's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    pub vm: u32,
    /// `kind::NOTIFY` or `kind::VECTOR`.
    pub kind: u32,
    pub dev: u32,
}

/// Moves the decided pairings into the known signals; returns what was learned.
pub fn learn(ebpf: &mut Ebpf) -> Vec<Learned> {
    let decided: Vec<(SignalKey, u32)> = match ebpf
        .map("BLK_PAIRING")
        .and_then(|m| HashMap::<&MapData, SignalKey, Pairing>::try_from(m).ok())
    {
        Some(m) => m
            .iter()
            .flatten()
            .filter_map(|(k, p)| verdict(&p).map(|dev| (k, dev)))
            .collect(),
        None => return Vec::new(),
    };
    if decided.is_empty() {
        return Vec::new();
    }
    let Some(Ok(mut known)) = ebpf
        .map_mut("BLK_KNOWN")
        .map(HashMap::<&mut MapData, SignalKey, u32>::try_from)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut moved = Vec::new();
    for (k, dev) in &decided {
        // A full map: the pairing stays, and is tried again at the next look.
        if known.insert(k, dev, 0).is_err() {
            continue;
        }
        moved.push(*k);
        if *dev != 0 {
            let disk = SignalKey {
                vm: k.vm,
                kind: if k.kind == kind::NOTIFY {
                    kind::DISK_NOTIFY
                } else {
                    kind::DISK_VECTOR
                },
                key: *dev as u64,
            };
            let _ = known.insert(disk, 1, 0);
        }
        out.push(Learned {
            vm: k.vm,
            kind: k.kind,
            dev: *dev,
        });
    }
    if let Some(Ok(mut pairing)) = ebpf
        .map_mut("BLK_PAIRING")
        .map(HashMap::<&mut MapData, SignalKey, Pairing>::try_from)
    {
        for k in &moved {
            let _ = pairing.remove(k);
        }
    }
    out
}

/// The disks of each VMM whose notify and vector are known, as `(vm, kind, dev)`.
pub fn known_disks(ebpf: &Ebpf) -> Vec<Learned> {
    ebpf.map("BLK_KNOWN")
        .and_then(|m| HashMap::<&MapData, SignalKey, u32>::try_from(m).ok())
        .map(|m| {
            m.keys()
                .flatten()
                .filter(|k| k.kind == kind::DISK_NOTIFY || k.kind == kind::DISK_VECTOR)
                .map(|k| Learned {
                    vm: k.vm,
                    kind: k.kind,
                    dev: k.key as u32,
                })
                .collect()
        })
        .unwrap_or_default()
}
