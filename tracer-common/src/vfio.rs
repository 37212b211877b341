//! `vfio.handler`: the host's interrupt handler of a VFIO device's IRQ, irq:irq_handler_entry to
//! irq:irq_handler_exit of the same IRQ on the same CPU (a hardirq handler runs with interrupts
//! off: one at a time per CPU). Which IRQs are a VFIO device's, and whose, the daemon writes
//! into a map ([`VfioIrq`]): the IRQ's name says the device and vector, the device's IOMMU
//! group the VMM that holds it.

use crate::{assert_size, maps::Counter};

/// What the daemon knows of one IRQ it follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioIrq {
    /// The PCI device ([`pci_key`]).
    pub dev: u32,
    /// tgid of the VMM that holds the device, 0 when none does.
    pub vm: u32,
    /// The device's vector (N of `vfio-msix[N]`).
    pub vector: u32,
    pub _pad: u32,
}
assert_size!(VfioIrq, 16);

/// A handler running on a CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandlerStart {
    pub ts_ns: u64,
    /// The IRQ + 1 (0: no handler running).
    pub irq1: u32,
    pub _pad: u32,
}
assert_size!(HandlerStart, 16);

/// What kvm:kvm_pi_irte_update last said of one host IRQ (`POSTED_IRTES`, by host IRQ): KVM
/// points the IRQ's interrupt-remapping entry at a vCPU's posted-interrupt descriptor (`set`)
/// or back to the host's remapped delivery. While posted, the device's interrupts reach a
/// running vCPU with no host event at all: the host's handler, and /proc/interrupts, see none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostedIrte {
    /// tgid of the task that made the update (the VMM, in its KVM_IRQFD or routing ioctl).
    pub vm: u32,
    pub vcpu: u32,
    /// The guest's vector.
    pub gvec: u32,
    /// 1: posted; 0: remapped (the host's handler runs).
    pub set: u32,
    /// Updates seen for this IRQ: a count that moves tells a mode switched (or re-aimed at
    /// another vCPU) between two reads.
    pub updates: u32,
    pub _pad: u32,
}
assert_size!(PostedIrte, 24);

/// kvm:kvm_pi_irte_update of an IRQ whose last state was `last`, from task `tgid`.
pub fn on_irte_update(
    last: Option<PostedIrte>,
    tgid: u32,
    vcpu: u32,
    gvec: u32,
    set: bool,
) -> PostedIrte {
    PostedIrte {
        vm: tgid,
        vcpu,
        gvec,
        set: set as u32,
        updates: last.map_or(0, |l| l.updates).wrapping_add(1),
        _pad: 0,
    }
}

/// A PCI address as one number: domain, bus, device, function (16, 8, 5 and 3 bits).
pub const fn pci_key(domain: u32, bus: u32, dev: u32, func: u32) -> u32 {
    (domain & 0xffff) << 16 | (bus & 0xff) << 8 | (dev & 0x1f) << 3 | (func & 0x7)
}

/// irq:irq_handler_entry of `irq` on this CPU: a start when the IRQ is followed.
pub fn on_entry(irq: u32, followed: bool, now_ns: u64) -> Option<HandlerStart> {
    followed.then_some(HandlerStart {
        ts_ns: now_ns,
        irq1: irq.wrapping_add(1),
        _pad: 0,
    })
}

/// irq:irq_handler_exit of followed `irq` on this CPU, with the CPU's start: the handler's
/// time. An IRQ line shared by several handlers fires entry and exit once per handler: each
/// pair is one handler's run. An exit with no start of its IRQ (attached mid-handler) is
/// `unmatched`; so is a start whose exit never came (the next exit on the CPU is another's),
/// which it clears.
pub fn on_exit(start: &mut HandlerStart, irq: u32, now_ns: u64) -> Result<u64, Counter> {
    let mine = start.irq1 == irq.wrapping_add(1);
    let ts = start.ts_ns;
    start.irq1 = 0;
    if !mine {
        return Err(Counter::Unmatched);
    }
    Ok(now_ns.saturating_sub(ts))
}

/// kvm:kvm_msi_set_irq in interrupt context on a CPU, with the CPU's start: inside a followed
/// handler (vfio_msihandler's eventfd_signal runs KVM's irqfd_wakeup, which injects inline),
/// that handler's IRQ and the time from its entry. Each injection is one sample; the start
/// stays for its exit.
pub fn on_inject(start: &HandlerStart, now_ns: u64) -> Option<(u32, u64)> {
    let irq = start.irq1.checked_sub(1)?;
    Some((irq, now_ns.saturating_sub(start.ts_ns)))
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], integer fields, explicit padding, sizes asserted.
    unsafe impl aya::Pod for super::VfioIrq {}
    unsafe impl aya::Pod for super::HandlerStart {}
    unsafe impl aya::Pod for super::PostedIrte {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followed_irqs_entry_and_exit_give_its_time() {
        let mut s = on_entry(36, true, 1_000).unwrap();
        assert_eq!(on_exit(&mut s, 36, 4_500), Ok(3_500));
        // its start is used up: a second exit matches nothing
        assert_eq!(on_exit(&mut s, 36, 5_000), Err(Counter::Unmatched));
    }

    #[test]
    fn other_irqs_start_nothing_and_end_nothing() {
        assert_eq!(on_entry(37, false, 1_000), None);
        let mut s = on_entry(36, true, 1_000).unwrap();
        assert_eq!(on_exit(&mut s, 37, 2_000), Err(Counter::Unmatched));
        // that start is gone with it: 36's late exit matches nothing either
        assert_eq!(on_exit(&mut s, 36, 3_000), Err(Counter::Unmatched));
        // IRQ 0 is an IRQ like the others (the start keeps IRQ + 1)
        let mut z = on_entry(0, true, 10).unwrap();
        assert_eq!(on_exit(&mut z, 0, 30), Ok(20));
        assert_eq!(
            on_exit(&mut HandlerStart::default(), 0, 30),
            Err(Counter::Unmatched)
        );
    }

    #[test]
    fn an_injection_inside_a_followed_handler_is_timed_from_its_entry() {
        let mut s = on_entry(36, true, 1_000).unwrap();
        assert_eq!(on_inject(&s, 1_800), Some((36, 800)));
        // a second one in the same handler is a sample too, and the exit still matches
        assert_eq!(on_inject(&s, 2_000), Some((36, 1_000)));
        assert_eq!(on_exit(&mut s, 36, 2_500), Ok(1_500));
        // after the exit, or with no handler followed, an injection is not the handler's
        assert_eq!(on_inject(&s, 3_000), None);
        assert_eq!(on_inject(&HandlerStart::default(), 3_000), None);
        // IRQ 0 included
        let z = on_entry(0, true, 10).unwrap();
        assert_eq!(on_inject(&z, 30), Some((0, 20)));
    }

    #[test]
    fn irte_updates_keep_the_last_mode_and_count_the_switches() {
        let a = on_irte_update(None, 700, 1, 0x41, true);
        assert_eq!(
            (a.vm, a.vcpu, a.gvec, a.set, a.updates),
            (700, 1, 0x41, 1, 1)
        );
        // back to remapped, then posted to another vCPU
        let b = on_irte_update(Some(a), 700, 1, 0x41, false);
        assert_eq!((b.set, b.updates), (0, 2));
        let c = on_irte_update(Some(b), 700, 0, 0x41, true);
        assert_eq!((c.vcpu, c.set, c.updates), (0, 1, 3));
    }

    #[test]
    fn pci_addresses_pack_into_one_number() {
        assert_eq!(pci_key(0, 0, 6, 0), 0x30);
        assert_eq!(pci_key(0, 0x3b, 0x1f, 7), 0x3bff);
        assert_eq!(pci_key(1, 0, 0, 1), 0x1_0001);
    }
}
