//! Stage identifiers: the `stage` field of a histogram key. The table of what each stage means,
//! its bounding events and how it attaches lives in the daemon (`tracer-user/src/stages/`).

/// One stage of one path. The numeric values are part of the map layout: append, never reorder.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageId {
    /// block:block_rq_issue to block:block_rq_complete.
    BlkDevice = 0,
    /// kvm:kvm_exit to the same vCPU thread's next kvm:kvm_entry.
    KvmExit = 1,
    /// irqfd write / KVM_SIGNAL_MSI entry to kvm:kvm_msi_set_irq / kvm:kvm_set_irq.
    KvmSignalToInject = 2,
    /// kvm:kvm_msi_set_irq / kvm:kvm_set_irq to the destination vCPU's next kvm:kvm_entry.
    KvmInjectToEntry = 3,
    /// kvm:kvm_vcpu_wakeup's halted time.
    KvmHaltWakeup = 4,
    /// kvm:kvm_userspace_exit to the same thread's next ioctl(KVM_RUN).
    KvmUserspaceExit = 5,
    /// net:netif_receive_skb on an uplink to net:net_dev_start_xmit on a tap.
    NetRxHostStack = 6,
    /// net:net_dev_start_xmit on a tap to skb:consume_skb in the backend's thread.
    NetRxBackendQueue = 7,
    /// That consume to the next kvm:kvm_msi_set_irq of the same thread.
    NetRxBackendToIrq = 8,
    /// net:netif_receive_skb on a tap to net:net_dev_start_xmit on an uplink.
    NetTxHostStack = 9,
    /// A guest's notify (ioeventfd_write in its vCPU thread) to the vhost worker's handle_tx_kick
    /// of that queue's work.
    NetTxKick = 10,
    /// The backend's start on a queue (vhost's handle_tx) to each frame it hands to the tap
    /// (net:netif_receive_skb on the tap in its thread).
    NetTxBackendToWire = 11,
    /// A network backend thread woken (sched:sched_waking) to running (sched:sched_switch into
    /// it); opt-in.
    SchedBackendWakeup = 12,
    /// A guest's notify of a disk (kvm:kvm_mmio / kvm:kvm_pio in its vCPU thread) to the first
    /// host request a thread of its VMM submits for that disk (block:block_rq_insert or
    /// block:block_rq_issue).
    BlkKickToSubmit = 13,
    /// block:block_rq_complete of a VMM's request to the VMM's next kvm:kvm_msi_set_irq of that
    /// disk's vector.
    BlkCompleteToIrq = 14,
    /// A VMM's flush or FUA write: block:block_bio_queue in its thread to the block layer's
    /// last block:block_rq_complete of that request (its data and every flush it waited on).
    BlkSync = 15,
    /// irq:irq_handler_entry to irq:irq_handler_exit of an IRQ a VFIO device raised (its name
    /// `vfio-msix[N](BDF)`, `vfio-msi[N](BDF)`, `vfio-intx(BDF)`).
    VfioHandler = 16,
    /// irq:irq_handler_entry of a VFIO device's IRQ to each kvm:kvm_msi_set_irq its handler
    /// makes on that CPU (vfio's eventfd_signal runs KVM's irqfd_wakeup inline).
    VfioHandlerToInject = 17,
}

impl StageId {
    pub const ALL: [StageId; 18] = [
        StageId::BlkDevice,
        StageId::KvmExit,
        StageId::KvmSignalToInject,
        StageId::KvmInjectToEntry,
        StageId::KvmHaltWakeup,
        StageId::KvmUserspaceExit,
        StageId::NetRxHostStack,
        StageId::NetRxBackendQueue,
        StageId::NetRxBackendToIrq,
        StageId::NetTxHostStack,
        StageId::NetTxKick,
        StageId::NetTxBackendToWire,
        StageId::SchedBackendWakeup,
        StageId::BlkKickToSubmit,
        StageId::BlkCompleteToIrq,
        StageId::BlkSync,
        StageId::VfioHandler,
        StageId::VfioHandlerToInject,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// This stage's bit in `STAGES_ON`, the mask of stages the attach plan switched on: a
    /// program shared by several stages does only the work of the stages that are on.
    pub const fn bit(self) -> u64 {
        1 << self as u16
    }

    pub const fn from_u16(v: u16) -> Option<StageId> {
        match v {
            0 => Some(StageId::BlkDevice),
            1 => Some(StageId::KvmExit),
            2 => Some(StageId::KvmSignalToInject),
            3 => Some(StageId::KvmInjectToEntry),
            4 => Some(StageId::KvmHaltWakeup),
            5 => Some(StageId::KvmUserspaceExit),
            6 => Some(StageId::NetRxHostStack),
            7 => Some(StageId::NetRxBackendQueue),
            8 => Some(StageId::NetRxBackendToIrq),
            9 => Some(StageId::NetTxHostStack),
            10 => Some(StageId::NetTxKick),
            11 => Some(StageId::NetTxBackendToWire),
            12 => Some(StageId::SchedBackendWakeup),
            13 => Some(StageId::BlkKickToSubmit),
            14 => Some(StageId::BlkCompleteToIrq),
            15 => Some(StageId::BlkSync),
            16 => Some(StageId::VfioHandler),
            17 => Some(StageId::VfioHandlerToInject),
            _ => None,
        }
    }
}

/// Which of the VMM's requests the system call tracepoints stand in for (`STAGES_ON[1]`): set
/// only for the events whose function probes could not attach, so that a syscall program
/// attached for one request does not repeat what a function probe does for another.
pub mod stand_in {
    /// sys_enter_ioctl handles KVM_RUN (and KVM_CREATE_VM).
    pub const KVM_RUN: u64 = 1 << 0;
    /// sys_enter_ioctl / sys_exit_ioctl handle KVM_SIGNAL_MSI.
    pub const SIGNAL_MSI: u64 = 1 << 1;
    /// sys_enter_write / sys_exit_write handle irqfd signals.
    pub const IRQFD: u64 = 1 << 2;
}
