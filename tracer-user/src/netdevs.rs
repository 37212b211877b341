//! The network devices the net stages follow (the kernel's `NET_DEVS`): every tap (a tun device
//! in tap mode: `tun_flags` in sysfs with IFF_TAP) and the other ports of the bridges taps are
//! on, the uplinks. Read from sysfs in the daemon's network namespace (ifindexes are per
//! namespace: devices of other namespaces are not followed) and kept in step on the
//! collector's timer, so a VM started later is followed within one period. An uplink is the
//! bridge port itself: the NIC under a bond or VLAN port is not one (its receive fires the
//! tracepoint before the bond or VLAN takes the packet), so there the host stage stays empty.

use std::{collections::BTreeMap, fs, path::Path};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use tracer_common::net::role;

/// A device: its ifindex's role bits and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDev {
    pub role: u32,
    pub name: String,
}

/// Taps and uplinks under `class_net` (`/sys/class/net`), by ifindex.
pub fn scan(class_net: &Path) -> BTreeMap<u32, NetDev> {
    let read = |dev: &str, f: &str| fs::read_to_string(class_net.join(dev).join(f));
    let names: Vec<String> = fs::read_dir(class_net)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let ifindex = |dev: &str| read(dev, "ifindex").ok()?.trim().parse::<u32>().ok();
    // A tap's bridge: the name its `master` link points to.
    let master = |dev: &str| {
        fs::read_link(class_net.join(dev).join("master"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    // tun_flags holds the IFF_* flags in hex: IFF_TAP is 0x2 (IFF_TUN devices carry no frames).
    let is_tap = |dev: &str| {
        read(dev, "tun_flags").ok().is_some_and(|f| {
            u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).is_ok_and(|f| f & 0x2 != 0)
        })
    };
    let mut out = BTreeMap::new();
    for tap in names.iter().filter(|n| is_tap(n)) {
        let Some(i) = ifindex(tap) else { continue };
        out.insert(
            i,
            NetDev {
                role: role::TAP,
                name: tap.clone(),
            },
        );
        let Some(bridge) = master(tap) else { continue };
        let ports = fs::read_dir(class_net.join(&bridge).join("brif"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for port in ports.iter().filter(|p| !is_tap(p)) {
            if let Some(i) = ifindex(port) {
                out.entry(i)
                    .or_insert(NetDev {
                        role: 0,
                        name: port.clone(),
                    })
                    .role |= role::UPLINK;
            }
        }
    }
    out
}

/// Makes `NET_DEVS` hold exactly `devs`; returns whether anything changed.
pub fn sync(ebpf: &mut Ebpf, devs: &BTreeMap<u32, NetDev>) -> bool {
    let Some(Ok(mut map)) = ebpf
        .map_mut("NET_DEVS")
        .map(BpfHashMap::<&mut MapData, u32, u32>::try_from)
    else {
        return false;
    };
    let now: BTreeMap<u32, u32> = map.iter().flatten().collect();
    let mut changed = false;
    for (i, r) in &now {
        if devs.get(i).is_none_or(|d| d.role != *r) {
            changed |= map.remove(i).is_ok();
        }
    }
    for (i, d) in devs {
        if now.get(i) != Some(&d.role) {
            changed |= map.insert(i, d.role, 0).is_ok();
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A sysfs tree written by hand: tap0 and veth0 on br0, tap1 on no bridge, eth0 alone.
    #[test]
    fn taps_and_the_ports_of_their_bridges() {
        let root = std::env::temp_dir().join(format!("iopath-netdevs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dev = |name: &str, ifindex: u32, tap: bool| {
            let d = root.join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("ifindex"), format!("{ifindex}\n")).unwrap();
            if tap {
                fs::write(d.join("tun_flags"), "0x1002\n").unwrap();
            }
        };
        dev("br0", 2, false);
        dev("veth0", 3, false);
        dev("tap0", 4, true);
        dev("tap1", 5, true);
        dev("eth0", 6, false);
        // a tun-mode device (a VPN's): not a tap
        dev("tun0", 7, false);
        fs::write(root.join("tun0/tun_flags"), "0x1001\n").unwrap();
        fs::create_dir_all(root.join("br0/brif")).unwrap();
        for port in ["veth0", "tap0"] {
            fs::create_dir_all(root.join("br0/brif").join(port)).unwrap();
            symlink("../br0", root.join(port).join("master")).unwrap();
        }
        let devs = scan(&root);
        let roles: Vec<(u32, u32, &str)> = devs
            .iter()
            .map(|(i, d)| (*i, d.role, d.name.as_str()))
            .collect();
        assert_eq!(
            roles,
            [
                (3, role::UPLINK, "veth0"),
                (4, role::TAP, "tap0"),
                (5, role::TAP, "tap1"),
            ]
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
