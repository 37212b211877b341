//! Passthrough (VFIO) stages: a VFIO device's interrupts in the host.

use tracer_common::stage::StageId;

use tracer_common::config::Config;

use super::{Event, Family, Path, Stage, all_set, kvm::KVM_MSI_SET_IRQ, tracepoint_args};
use crate::maps::{POSTED_IRTES, VFIO_IRQS};

// void trace_irq_handler_entry(int irq, struct irqaction *action)
pub static IRQ_HANDLER_ENTRY: Event =
    tracepoint_args("irq", "irq_handler_entry", "irq_entry", |_, _| Ok(()));
// void trace_irq_handler_exit(int irq, struct irqaction *action, int ret)
pub static IRQ_HANDLER_EXIT: Event =
    tracepoint_args("irq", "irq_handler_exit", "irq_exit", |_, _| Ok(()));

fn irte_needs(_: Family, c: &Config) -> Result<(), &'static str> {
    all_set(
        &[
            c.tp_irte_host_irq,
            c.tp_irte_vcpu,
            c.tp_irte_gvec,
            c.tp_irte_set,
        ],
        "kvm_pi_irte_update's format lacks host_irq, vcpu_id, gvec or set (is KVM loaded?)",
    )
}

// kvm/kvm_pi_irte_update: its classic record only (its arguments differ between kernels).
pub static KVM_PI_IRTE_UPDATE: Event = Event {
    families: &[Family::Tracepoint],
    ..super::tracepoint(
        "kvm",
        "kvm_pi_irte_update",
        "kvm_pi_irte_update",
        irte_needs,
    )
};

/// The host's handler of a VFIO device's IRQ (vfio_msihandler, or vfio_intx_handler): which
/// IRQs are whose comes from their names (`crate::vfio_irqs`).
pub static HANDLER: Stage = Stage {
    id: StageId::VfioHandler,
    name: "vfio.handler",
    path: Path::Vfio,
    from: "irq:irq_handler_entry of an IRQ named vfio-msix[N](BDF), vfio-msi[N](BDF) or \
           vfio-intx(BDF) (or what --vfio-irqs names)",
    to: "irq:irq_handler_exit of that IRQ on the same CPU",
    labels: &["vm", "device", "vector"],
    events: &[&IRQ_HANDLER_ENTRY, &IRQ_HANDLER_EXIT],
    optional: &[&KVM_PI_IRTE_UPDATE],
    optional_adds: "which of the IRQs KVM posts to a vCPU (their interrupts reach a running \
                    guest with no host event: iopath_vfio_irq_posted)",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[&VFIO_IRQS, &POSTED_IRTES],
};

/// From that handler's start to the injection it makes: vfio_msihandler signals the device's
/// eventfd, whose KVM irqfd injects inline (irqfd_wakeup, kvm_arch_set_irq_inatomic). An
/// injection KVM defers to a kworker (no inline path for that interrupt) is not in it.
pub static HANDLER_TO_INJECT: Stage = Stage {
    id: StageId::VfioHandlerToInject,
    name: "vfio.handler_to_inject",
    path: Path::Vfio,
    from: "irq:irq_handler_entry of a VFIO device's IRQ (as vfio.handler)",
    to: "each kvm:kvm_msi_set_irq in that handler, on the same CPU",
    labels: &["vm", "device", "vector"],
    events: &[&IRQ_HANDLER_ENTRY, &IRQ_HANDLER_EXIT, &KVM_MSI_SET_IRQ],
    optional: &[],
    optional_adds: "",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[&VFIO_IRQS],
};
