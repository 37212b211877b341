//! `kvm.inject_to_entry`: from KVM's injection of an interrupt (kvm:kvm_msi_set_irq or
//! kvm:kvm_set_irq) to the next kvm:kvm_entry of the vCPU that accepted it: how long an
//! interrupt waits before its guest can run.
//!
//! The destination vCPU comes from kvm:kvm_apic_accept_irq, which fires inside the injection,
//! in the same task on the same CPU, once per accepting vCPU. The MSI address is not used: in
//! logical destination mode it is a mask or cluster, not an APIC id. APIC id = vcpu_id (KVM's
//! default). The injecting task is not always in the VMM (a kworker for IOAPIC routes), so the
//! VM comes from the signal that caused the injection when there is one.

use crate::{assert_size, maps::Counter, rules::Starts};

/// The injection running on this CPU (a per-CPU slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectMark {
    pub ts_ns: u64,
    pub vm: u32,
    pub tid: u32,
    /// 1 when the injection ran in task context, 0 in an interrupt.
    pub in_task: u32,
    /// The passthrough device whose handler made the injection (`vfio::pci_key`), 0 for
    /// any other (0000:00:00.0 is the host bridge, never assigned).
    pub device: u32,
}
assert_size!(InjectMark, 24);

/// An injected interrupt its vCPU has not seen yet: when, and which passthrough device's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingInject {
    pub ts_ns: u64,
    pub device: u32,
    pub _pad: u32,
}
assert_size!(PendingInject, 16);

/// A vCPU of a VM: the key of pending interrupts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VcpuKey {
    pub vm: u32,
    pub vcpu: u32,
}
assert_size!(VcpuKey, 8);

/// An accept belongs to the injection marked on its CPU only if it runs in the same task and
/// context (task or interrupt) within this window: the LAPIC timer also fires
/// kvm_apic_accept_irq, from its hrtimer interrupt, with no injection before it. The window
/// is wide for an emulated host: in the distro-kernel VM (QEMU TCG) kvm_msi_set_irq to its
/// kvm_apic_accept_irq took 63 µs at p50 and 219 µs at most; on hardware a few µs.
pub const ACCEPT_WINDOW_NS: u64 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectSample {
    pub latency_ns: u64,
    pub vm: u32,
    pub vcpu: u32,
    /// The passthrough device whose interrupt it was, 0 for any other (the `device` label).
    pub device: u32,
}

/// The VM an injection is for: its signal's VM when the injecting task signalled it (the
/// kworker of a deferred signal included), else the injecting task's VMM. In interrupt context
/// the task is whatever was interrupted: the VM is that of the passthrough device whose
/// handler runs on this CPU (`irq_vm`: its VMM, 0 while not yet known), else unknown (0). A
/// task of no known VMM (a kworker nobody signalled, a vhost kernel thread before Linux 6.4)
/// names no VM: 0, unknown.
pub const fn injection_vm(
    signal_vm: Option<u32>,
    in_task: bool,
    vmm: Option<u32>,
    irq_vm: Option<u32>,
) -> u32 {
    if !in_task {
        return match irq_vm {
            Some(vm) => vm,
            None => 0,
        };
    }
    match (signal_vm, vmm) {
        (Some(vm), _) | (None, Some(vm)) => vm,
        (None, None) => 0,
    }
}

/// kvm:kvm_msi_set_irq / kvm:kvm_set_irq (level 1) on CPU slot `cpu`, in task `tid`, for VM
/// `vm` ([`injection_vm`]), inside the handler of passthrough device `device` (0: none). The
/// CPU is marked even for an unknown VM (`unknown_vm`), so the accepts of that injection are
/// not taken for another's.
#[allow(clippy::too_many_arguments)]
pub fn on_inject<M: Starts<u32, InjectMark>>(
    marks: &mut M,
    cpu: u32,
    tid: u32,
    vm: u32,
    device: u32,
    in_task: bool,
    now_ns: u64,
) -> Result<(), Counter> {
    let _ = marks.put(
        cpu,
        InjectMark {
            ts_ns: now_ns,
            vm,
            tid,
            in_task: in_task as u32,
            device,
        },
    );
    if vm == 0 {
        Err(Counter::UnknownVm)
    } else {
        Ok(())
    }
}

/// kvm:kvm_apic_accept_irq(apicid) in task `tid` on CPU slot `cpu`. Keeps the earliest pending
/// injection of a vCPU (inserted only if absent, atomically): interrupts injected before the
/// vCPU runs are delivered together, and the first one waited longest.
pub fn on_accept<M: Starts<u32, InjectMark>, P: Starts<VcpuKey, PendingInject>>(
    marks: &M,
    pending: &mut P,
    cpu: u32,
    tid: u32,
    apicid: u32,
    in_task: bool,
    now_ns: u64,
) -> Result<(), Counter> {
    let Some(m) = marks.get(&cpu) else {
        return Err(Counter::AcceptUnmatched);
    };
    if m.tid != tid
        || m.in_task != in_task as u32
        || now_ns.saturating_sub(m.ts_ns) > ACCEPT_WINDOW_NS
    {
        return Err(Counter::AcceptUnmatched);
    }
    if m.vm == 0 {
        return Ok(()); // counted once, as unknown_vm, at the injection
    }
    let key = VcpuKey {
        vm: m.vm,
        vcpu: apicid,
    };
    // A lookup first: most accepts find one pending (interrupts come in bursts), and an
    // insert that fails takes the bucket's lock.
    if pending.get(&key).is_some() {
        return Err(Counter::Coalesced);
    }
    let p = PendingInject {
        ts_ns: m.ts_ns,
        device: m.device,
        _pad: 0,
    };
    match pending.put_new(key, p)? {
        true => Ok(()),
        false => Err(Counter::Coalesced),
    }
}

/// kvm:kvm_entry by task `tid` on CPU slot `cpu`: the mark it left there goes, its injection
/// having returned, so a later accept in it (its own LAPIC timer) is not that injection's.
/// Another task's entry leaves the mark: the injector may only have been preempted.
pub fn on_entered<M: Starts<u32, InjectMark>>(marks: &mut M, cpu: u32, tid: u32) {
    if marks
        .get(&cpu)
        .is_some_and(|m| m.tid == tid && m.ts_ns != 0)
    {
        marks.remove(&cpu);
    }
}

/// kvm:kvm_entry of vCPU `vcpu` in a thread of VMM `tgid`.
pub fn on_entry<P: Starts<VcpuKey, PendingInject>>(
    pending: &mut P,
    tgid: u32,
    vcpu: u32,
    now_ns: u64,
) -> Option<InjectSample> {
    let p = pending.take(&VcpuKey { vm: tgid, vcpu })?;
    Some(InjectSample {
        latency_ns: now_ns.saturating_sub(p.ts_ns),
        vm: tgid,
        vcpu,
        device: p.device,
    })
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)] integers, no padding, sizes asserted.
    unsafe impl aya::Pod for super::InjectMark {}
    unsafe impl aya::Pod for super::VcpuKey {}
    unsafe impl aya::Pod for super::PendingInject {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::rules::testing::{MapStarts, events};

    /// Replays `ts tgid/tid@cpu event fields`: kvm_msi_set_irq / kvm_set_irq [vm=] (the VM the
    /// signal rule found; the task's tgid otherwise), kvm_apic_accept_irq apicid=,
    /// kvm_entry vcpu=.
    /// The samples, and the counters the rules returned (sorted).
    /// `irq=1`: the event ran in an interrupt (tracefs flags `h`/`s`).
    fn in_task(e: &crate::rules::testing::Event) -> bool {
        e.u("irq") == 0
    }

    fn replay(text: &str) -> (Vec<InjectSample>, Vec<Counter>) {
        let mut marks = MapStarts::new(8);
        let mut pending = MapStarts::new(64);
        let (mut out, mut counted) = (Vec::new(), Vec::new());
        for e in events(text) {
            let r = match e.name {
                "kvm_msi_set_irq" | "kvm_set_irq" => on_inject(
                    &mut marks,
                    e.cpu,
                    e.tid,
                    e.u("vm") as u32,
                    e.u("device") as u32,
                    in_task(&e),
                    e.ts,
                ),
                "kvm_apic_accept_irq" => on_accept(
                    &marks,
                    &mut pending,
                    e.cpu,
                    e.tid,
                    e.u("apicid") as u32,
                    in_task(&e),
                    e.ts,
                ),
                "kvm_entry" => {
                    on_entered(&mut marks, e.cpu, e.tid);
                    out.extend(on_entry(&mut pending, e.tgid, e.u("vcpu") as u32, e.ts));
                    Ok(())
                }
                other => panic!("unknown event {other}"),
            };
            counted.extend(r.err());
        }
        (out, counted)
    }

    #[test]
    fn replays_injections_to_two_vcpus() {
        let (got, counted) = replay(include_str!(
            "../../../tests/fixtures/kvm_inject_edges.events"
        ));
        let got: Vec<_> = got.iter().map(|s| (s.latency_ns, s.vm, s.vcpu)).collect();
        assert_eq!(
            got,
            [
                (3_000, 700, 1),
                (12_000, 700, 0),
                (8_000, 700, 1),
                (26_000, 700, 0)
            ]
        );
        assert_eq!(
            counted,
            [
                Counter::Coalesced,
                Counter::AcceptUnmatched,
                Counter::UnknownVm,
                Counter::UnknownVm,
                Counter::AcceptUnmatched,
                Counter::AcceptUnmatched,
                Counter::AcceptUnmatched,
            ]
        );
    }

    #[test]
    fn replays_a_recorded_nested_guest_as_the_kernel_programs_measured_it() {
        // Recorded in the distro-kernel VM (cargo xtask vm --record-fixtures): vhost-net's
        // worker injects (vm= its VMM, named through the mm it works in), the LAPIC timer's
        // accepts come with no injection before them; the rules give as many samples as
        // iopath measured.
        let text = include_str!("../../../tests/fixtures/kvm_inject.events");
        assert!(text.starts_with("# Recorded"), "the fixture is recorded");
        let want = crate::rules::testing::measured(text)["samples"];
        let (got, _) = replay(text);
        let got = got.len() as u64;
        assert!(want > 200, "{want}");
        assert!(got.abs_diff(want) <= 2, "{got} replayed, {want} measured");
    }

    #[test]
    fn an_injection_in_a_passthrough_handler_names_its_device_at_entry() {
        // Written by hand: the NIC's handler (device 0x30, 0000:00:06.0) injects in interrupt
        // context on CPU 1 for vCPU 0; then vhost's worker injects for vCPU 1; a second
        // injection for vCPU 0 before it runs coalesces: the earliest, the device's, stays.
        let (got, counted) = replay(
            "1000 900/900@1 kvm_msi_set_irq vm=700 device=48 irq=1\n\
             1500 900/900@1 kvm_apic_accept_irq apicid=0 irq=1\n\
             2000 710/710@0 kvm_msi_set_irq vm=700\n\
             2500 710/710@0 kvm_apic_accept_irq apicid=1\n\
             3000 710/710@0 kvm_msi_set_irq vm=700\n\
             3500 710/710@0 kvm_apic_accept_irq apicid=0\n\
             9000 700/701@1 kvm_entry vcpu=0\n\
             9500 700/702@0 kvm_entry vcpu=1\n",
        );
        let got: Vec<_> = got
            .iter()
            .map(|s| (s.latency_ns, s.vcpu, s.device))
            .collect();
        assert_eq!(got, [(8_000, 0, 48), (7_500, 1, 0)]);
        assert_eq!(counted, [Counter::Coalesced]);
    }

    #[test]
    fn the_vm_of_an_injection() {
        // the signal names it, in the writer or the kworker that took its start over
        assert_eq!(injection_vm(Some(700), true, None, None), 700);
        assert_eq!(injection_vm(Some(700), true, Some(700), None), 700);
        // a VMM thread's own injection (KVM_IRQ_LINE, in-kernel device emulation)
        assert_eq!(injection_vm(None, true, Some(700), None), 700);
        // a kworker nobody signalled, or an interrupt of no followed device: unknown, never
        // the interrupted task
        assert_eq!(injection_vm(None, true, None, None), 0);
        assert_eq!(injection_vm(Some(700), false, Some(700), None), 0);
        // inside a passthrough device's handler: the device's VM, whatever was interrupted
        assert_eq!(injection_vm(Some(700), false, Some(700), Some(800)), 800);
        // (the caller tells interrupt context inside such a handler, whatever the stack says)
        assert_eq!(injection_vm(None, true, Some(700), None), 700);
        assert_eq!(injection_vm(None, false, Some(700), Some(0)), 0);
    }
}
