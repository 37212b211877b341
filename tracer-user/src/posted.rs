//! Whether this host posts assigned devices' interrupts straight to vCPUs: Intel VT-d posted
//! interrupts with KVM's APICv, or the AMD IOMMU's guest virtual APIC with KVM's AVIC. Then a
//! passthrough interrupt to a running vCPU reaches the guest with no host event at all, so
//! `vfio.handler` sees only those to a halted or descheduled vCPU. Read from sysfs and the
//! kernel command line, as Linux decides it at boot (`irq_remapping_cap(IRQ_POSTING_CAP)`).

use std::{fs, path::Path};

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Posted {
    pub posted: bool,
    /// Why, in words, naming what was read.
    pub why: String,
}

fn no(why: String) -> Posted {
    Posted { posted: false, why }
}

/// The IOMMUs of the host: (name, vendor directory, the register sysfs shows) for those of
/// one vendor (`intel-iommu`'s `cap`, `amd-iommu`'s `features`).
fn iommus(sys: &Path, vendor: &str, file: &str) -> Vec<(String, Option<u64>)> {
    let Ok(dir) = fs::read_dir(sys.join("class/iommu")) else {
        return Vec::new();
    };
    let mut out: Vec<_> = dir
        .filter_map(Result::ok)
        .filter(|e| e.path().join(vendor).is_dir())
        .map(|e| {
            let reg = fs::read_to_string(e.path().join(vendor).join(file))
                .ok()
                .and_then(|t| {
                    // amd-iommu's `features` is "EFR" or "EFR:EFR2" in hex
                    let first = t.trim().split(':').next().unwrap_or_default().to_string();
                    u64::from_str_radix(first.trim_start_matches("0x"), 16).ok()
                });
            (e.file_name().to_string_lossy().into_owned(), reg)
        })
        .collect();
    out.sort();
    out
}

fn param(sys: &Path, module: &str, name: &str) -> Option<String> {
    fs::read_to_string(
        sys.join("module")
            .join(module)
            .join("parameters")
            .join(name),
    )
    .ok()
    .map(|v| v.trim().to_string())
}

fn yes(v: &str) -> bool {
    matches!(v, "Y" | "y" | "1")
}

/// VT-d capability register: Posted Interrupts Support.
const VTD_CAP_PI: u64 = 1 << 59;
/// AMD IOMMU extended feature register: Guest virtual APIC Support.
const AMD_EFR_GA: u64 = 1 << 7;

/// `sys`: /sys; `cmdline`: /proc/cmdline's text.
pub fn check(sys: &Path, cmdline: &str) -> Posted {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let opt = |key: &str| -> Vec<&str> {
        words
            .iter()
            .filter_map(|w| w.strip_prefix(key))
            .flat_map(|v| v.split(','))
            .collect()
    };
    let (intel, amd) = (
        param(sys, "kvm_intel", "enable_apicv"),
        param(sys, "kvm_amd", "avic"),
    );
    let (kvm, vendor, file, bit, reg_name, apic) = match (&intel, &amd) {
        (Some(v), _) => (
            format!("kvm_intel enable_apicv={v}"),
            "intel-iommu",
            "cap",
            VTD_CAP_PI,
            "posted-interrupt support (VT-d cap bit 59)",
            yes(v),
        ),
        (None, Some(v)) => (
            format!("kvm_amd avic={v}"),
            "amd-iommu",
            "features",
            AMD_EFR_GA,
            "guest virtual APIC support (EFR bit 7)",
            yes(v),
        ),
        (None, None) => return no("neither kvm_intel nor kvm_amd is loaded".into()),
    };
    if !apic {
        return no(kvm);
    }
    if words.contains(&"nointremap") || opt("intremap=").contains(&"off") {
        return no(format!(
            "{kvm}, but interrupt remapping is off on the command line"
        ));
    }
    if vendor == "intel-iommu" && opt("intremap=").contains(&"nopost") {
        return no(format!("{kvm}, but intremap=nopost on the command line"));
    }
    if vendor == "amd-iommu"
        && opt("amd_iommu_intr=")
            .iter()
            .any(|v| v.starts_with("legacy"))
    {
        return no(format!(
            "{kvm}, but amd_iommu_intr=legacy on the command line"
        ));
    }
    let found = iommus(sys, vendor, file);
    if found.is_empty() {
        return no(format!("{kvm}, but no {vendor} in /sys/class/iommu"));
    }
    let lacking: Vec<&str> = found
        .iter()
        .filter(|(_, reg)| reg.is_none_or(|r| r & bit == 0))
        .map(|(n, _)| n.as_str())
        .collect();
    if !lacking.is_empty() {
        return no(format!(
            "{kvm}, but {} lacks {reg_name}",
            lacking.join(", ")
        ));
    }
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    Posted {
        posted: true,
        why: format!(
            "{kvm} and {} with {reg_name}: an assigned device's interrupt to a running vCPU \
             has no host event",
            names.join(", ")
        ),
    }
}

/// This host's answer.
pub fn this_host() -> Posted {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    check(Path::new("/sys"), &cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree written by hand in the shape of /sys: KVM's module parameter and the IOMMUs'
    /// registers.
    fn tree(
        name: &str,
        module: (&str, &str, &str),
        iommus: &[(&str, &str, &str, &str)],
    ) -> std::path::PathBuf {
        let root =
            std::env::temp_dir().join(format!("iopath-posted-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let p = root.join("module").join(module.0).join("parameters");
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join(module.1), format!("{}\n", module.2)).unwrap();
        for (iommu, vendor, file, value) in iommus {
            let d = root.join("class/iommu").join(iommu).join(vendor);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(file), format!("{value}\n")).unwrap();
        }
        root
    }

    #[test]
    fn intel_with_apicv_and_posting_iommus_posts() {
        // bit 59 (PI) set in both (cap values written by hand)
        let t = tree(
            "intel",
            ("kvm_intel", "enable_apicv", "Y"),
            &[
                ("dmar0", "intel-iommu", "cap", "8d2078c106f0466"),
                ("dmar1", "intel-iommu", "cap", "8d2078c106f0466"),
            ],
        );
        let p = check(&t, "root=/dev/sda1 intel_iommu=on");
        assert!(p.posted, "{p:?}");
        assert!(p.why.contains("dmar0, dmar1"), "{}", p.why);
        // the same host told not to post
        let p = check(&t, "intel_iommu=on intremap=nosid,nopost");
        assert!(!p.posted && p.why.contains("nopost"), "{p:?}");
        let p = check(&t, "intremap=off");
        assert!(!p.posted && p.why.contains("remapping is off"), "{p:?}");
        let _ = fs::remove_dir_all(t);
    }

    #[test]
    fn an_iommu_without_posting_or_apicv_off_does_not_post() {
        // an IOMMU without the PI bit, as QEMU's emulated VT-d (value written by hand)
        let t = tree(
            "qemu",
            ("kvm_intel", "enable_apicv", "Y"),
            &[("dmar0", "intel-iommu", "cap", "12008c22260286")],
        );
        let p = check(&t, "");
        assert!(
            !p.posted && p.why.contains("dmar0 lacks posted-interrupt"),
            "{p:?}"
        );
        let _ = fs::remove_dir_all(t);
        let t = tree(
            "noapicv",
            ("kvm_intel", "enable_apicv", "N"),
            &[("dmar0", "intel-iommu", "cap", "8d2078c106f0466")],
        );
        assert_eq!(check(&t, ""), no("kvm_intel enable_apicv=N".into()));
        let _ = fs::remove_dir_all(t);
    }

    #[test]
    fn amd_needs_avic_and_a_guest_vapic_iommu() {
        // EFR with GASup (bit 7), in the "EFR:EFR2" form of newer kernels (written by hand)
        let t = tree(
            "amd",
            ("kvm_amd", "avic", "1"),
            &[("ivhd0", "amd-iommu", "features", "58f77ef22294ade:0")],
        );
        assert!(check(&t, "").posted);
        let p = check(&t, "amd_iommu_intr=legacy");
        assert!(!p.posted && p.why.contains("legacy"), "{p:?}");
        let _ = fs::remove_dir_all(t);
        // kvm_amd with AVIC on but only an Intel IOMMU (QEMU's emulated one under TCG)
        let t = tree(
            "mixed",
            ("kvm_amd", "avic", "Y"),
            &[("dmar0", "intel-iommu", "cap", "12008c22260286")],
        );
        let p = check(&t, "");
        assert!(!p.posted && p.why.contains("no amd-iommu"), "{p:?}");
        let _ = fs::remove_dir_all(t);
        // no KVM module at all
        let empty = std::env::temp_dir().join(format!("iopath-posted-none-{}", std::process::id()));
        assert!(check(&empty, "").why.contains("neither"));
    }
}
