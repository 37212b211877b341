//! vfio.handler: irq:irq_handler_entry to irq:irq_handler_exit of the IRQs the daemon follows
//! (`VFIO_IRQS`: a VFIO device's, or those `--vfio-irqs` names); vfio.handler_to_inject: that
//! entry to each kvm:kvm_msi_set_irq the handler makes. Rules and layout:
//! `tracer_common::vfio`. Every hardirq on the host runs the first two programs: an IRQ not
//! followed costs one hash lookup at entry and one per-CPU read at exit.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tracer_common::{
    maps::{Counter, START_ENTRIES},
    stage::StageId::{self, VfioHandler, VfioHandlerToInject},
    vfio::{self, HandlerStart, PostedIrte, VfioIrq},
};

use crate::{
    shared::{config, count, current_tgid_tid, now_ns, on, record, stages_on},
    tp::{Site, field, tracepoint_args},
};

/// The IRQs followed, by number: their device, vector and VMM. Written by the daemon.
#[map]
static VFIO_IRQS: HashMap<u32, VfioIrq> = HashMap::with_max_entries(START_ENTRIES, 0);

/// kvm:kvm_pi_irte_update's last word on each host IRQ: posted to a vCPU or remapped. Read by
/// the daemon, which removes an IRQ's entry with its VMM.
#[map]
static POSTED_IRTES: HashMap<u32, PostedIrte> = HashMap::with_max_entries(START_ENTRIES, 0);

/// The followed handler running on each CPU.
#[map]
static VFIO_RUNNING: PerCpuArray<HandlerStart> = PerCpuArray::with_max_entries(1, 0);

/// Either stage needs the handler's start (and its end, which clears it).
#[inline(always)]
fn any_on() -> bool {
    stages_on() & (VfioHandler.bit() | VfioHandlerToInject.bit()) != 0
}

/// The stage a handler's lost start or end counts under: vfio.handler when it is on.
#[inline(always)]
fn counted() -> StageId {
    if on(stages_on(), VfioHandler) {
        VfioHandler
    } else {
        VfioHandlerToInject
    }
}

#[inline(always)]
fn entry(irq: Result<u32, ()>, _: Site) {
    if !any_on() {
        return;
    }
    let Ok(irq) = irq else { return };
    // SAFETY: a map value read whole.
    let followed = unsafe { VFIO_IRQS.get(irq) }.is_some();
    let Some(start) = vfio::on_entry(irq, followed, now_ns()) else {
        return;
    };
    if let Some(slot) = VFIO_RUNNING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; a hardirq handler is not interrupted by another.
        unsafe { *slot = start };
    }
}

#[inline(always)]
fn exit(irq: Result<u32, ()>, _: Site) {
    if !any_on() {
        return;
    }
    let Ok(irq) = irq else { return };
    let Some(slot) = VFIO_RUNNING.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, as at entry.
    let slot = unsafe { &mut *slot };
    // No followed handler running here: nothing to end (an exit whose entry came before the
    // daemon followed its IRQ is the only one missed). Every hardirq of the host takes this
    // path: no map lookup on it.
    if slot.irq1 == 0 {
        return;
    }
    // SAFETY: a map value read whole.
    let followed = unsafe { VFIO_IRQS.get(irq) }.copied();
    match followed {
        // Another IRQ's exit while a start is left over (its exit missed).
        None => {
            slot.irq1 = 0;
            count(counted(), Counter::Unmatched);
        }
        Some(v) => {
            let now = now_ns();
            match vfio::on_exit(slot, irq, now) {
                Ok(ns) if on(stages_on(), VfioHandler) => {
                    record(VfioHandler, v.vector, v.dev, v.vm, ns, now)
                }
                Ok(_) => {}
                Err(c) => count(counted(), c),
            }
        }
    }
}

/// Where a KVM event fired, read once per event: task or interrupt context, and inside a
/// followed handler on this CPU, that handler's start and IRQ (None when the daemon no longer
/// follows it).
#[derive(Clone, Copy)]
pub struct Context {
    pub in_task: bool,
    handler: Option<(HandlerStart, Option<VfioIrq>)>,
}

impl Context {
    /// Task context is the stack test's (`shared::in_task`), except inside a followed handler:
    /// x86-64 runs a hardirq that interrupted user mode on the task's own stack, and the
    /// handler's entry and exit bracket it (a hardirq runs with interrupts off). Only with a
    /// vfio stage on: nothing is followed otherwise.
    #[inline(always)]
    pub fn of(site: Site) -> Context {
        let handler = if any_on() { running() } else { None };
        Context {
            in_task: handler.is_none() && crate::shared::in_task(site),
            handler,
        }
    }

    /// Inside a followed handler, its device's VMM (0 while not known yet): an injection there
    /// is that device's (kvm.inject_to_entry's VM).
    #[inline(always)]
    pub fn handler_vm(&self) -> Option<u32> {
        self.handler.map(|(_, v)| v.map_or(0, |v| v.vm))
    }

    /// Inside a followed handler, its device (`pci_key`); 0 elsewhere (kvm.inject_to_entry's
    /// `device`).
    #[inline(always)]
    pub fn handler_device(&self) -> u32 {
        match self.handler {
            Some((_, Some(v))) => v.dev,
            _ => 0,
        }
    }
}

/// The handler running on this CPU, if any, with its IRQ's entry.
#[inline(always)]
fn running() -> Option<(HandlerStart, Option<VfioIrq>)> {
    let slot = VFIO_RUNNING.get_ptr(0)?;
    // SAFETY: this CPU's slot, read whole.
    let start = unsafe { *slot };
    let irq = start.irq1.checked_sub(1)?;
    // SAFETY: a map value read whole.
    Some((start, unsafe { VFIO_IRQS.get(irq) }.copied()))
}

/// kvm:kvm_msi_set_irq at `now` in `ctx`: inside a followed handler, one sample of
/// vfio.handler_to_inject.
#[inline(always)]
pub fn injected(ctx: &Context, now: u64) {
    if !on(stages_on(), VfioHandlerToInject) {
        return;
    }
    if let Some((start, Some(v))) = ctx.handler
        && let Some((_, ns)) = vfio::on_inject(&start, now)
    {
        record(VfioHandlerToInject, v.vector, v.dev, v.vm, ns, now);
    }
}

// void trace_irq_handler_entry(int irq, struct irqaction *action)
tracepoint_args!(
    "irq_handler_entry",
    irq_entry_btf,
    irq_entry_raw,
    btf = |arg| Ok(arg(0) as u32),
    |arg| Ok(arg(0) as u32),
    entry
);

// void trace_irq_handler_exit(int irq, struct irqaction *action, int ret)
tracepoint_args!(
    "irq_handler_exit",
    irq_exit_btf,
    irq_exit_raw,
    btf = |arg| Ok(arg(0) as u32),
    |arg| Ok(arg(0) as u32),
    exit
);

/// kvm:kvm_pi_irte_update (rare: an irqfd's producer added or removed, a routing change): the
/// IRQ's mode as KVM last set it, for vfio.handler's note of which IRQs bypass the host. A
/// vCPU's blocking or migration changes its descriptor, not the IRTE, and fires nothing; a
/// mode KVM changes without the tracepoint (an MSI it cannot post, AVIC inhibited) is not seen.
#[inline(always)]
fn irte_update(rec: &aya_ebpf::programs::TracePointContext) -> Result<(), Counter> {
    let read = || -> Result<(u32, i32, u32, u8), ()> {
        Ok((
            field(rec, config!(tp_irte_host_irq))?,
            field(rec, config!(tp_irte_vcpu))?,
            field(rec, config!(tp_irte_gvec))?,
            field(rec, config!(tp_irte_set))?,
        ))
    };
    let (irq, vcpu, gvec, set) = read().map_err(|()| Counter::ReadError)?;
    // SAFETY: a map value read whole.
    let last = unsafe { POSTED_IRTES.get(irq) }.copied();
    let v = vfio::on_irte_update(last, current_tgid_tid().0, vcpu as u32, gvec, set != 0);
    POSTED_IRTES
        .insert(irq, v, 0)
        .map_err(|_| Counter::StartFull)
}

// kvm/kvm_pi_irte_update: unsigned int host_irq; int vcpu_id; unsigned int gsi;
// unsigned int gvec; bool set (6.1 also has u64 pi_desc_addr, later kernels dropped it). The
// classic record only: the arguments differ between kernels, these fields do not.
#[aya_ebpf::macros::tracepoint]
pub fn kvm_pi_irte_update_tp(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    if on(stages_on(), VfioHandler)
        && let Err(c) = irte_update(&ctx)
    {
        count(VfioHandler, c);
    }
    0
}
