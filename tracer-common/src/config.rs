//! Load-time configuration of the BPF programs: one read-only global (`CONFIG`) set by the
//! daemon before load, from what it found in this kernel's BTF and tracefs formats. Offsets
//! come from the running kernel, never from a kernel version.

use crate::assert_size;

/// An offset that was not found; a program that needs it is never attached.
pub const NO_OFFSET: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    // struct member offsets, from BTF (tp_btf / raw tracepoint programs of blk.device)
    /// `struct request`.q
    pub rq_q: u32,
    /// `struct request`.cmd_flags
    pub rq_cmd_flags: u32,
    /// `struct request_queue`.disk
    pub q_disk: u32,
    /// `struct gendisk`.major
    pub disk_major: u32,
    /// `struct gendisk`.first_minor
    pub disk_first_minor: u32,

    // classic tracepoint field offsets, from events/*/format
    /// block:block_rq_issue dev, sector, rwbs
    pub tp_issue_dev: u32,
    pub tp_issue_sector: u32,
    pub tp_issue_rwbs: u32,
    /// block:block_rq_complete dev, sector
    pub tp_complete_dev: u32,
    pub tp_complete_sector: u32,
    /// block:block_rq_requeue dev, sector
    pub tp_requeue_dev: u32,
    pub tp_requeue_sector: u32,
    /// kvm:kvm_exit exit_reason, isa, vcpu_id
    pub tp_kvm_exit_reason: u32,
    pub tp_kvm_exit_isa: u32,
    pub tp_kvm_exit_vcpu: u32,

    // KVM core (BTF members)
    /// `struct kvm_vcpu`.vcpu_id (kvm_entry's argument)
    pub vcpu_id: u32,
    /// `struct work_struct`.func (workqueue tracepoints' argument)
    pub work_func: u32,
    // KVM core (tracefs fields)
    /// kvm:kvm_entry vcpu_id
    pub tp_kvm_entry_vcpu: u32,
    /// kvm:kvm_set_irq level
    pub tp_set_irq_level: u32,
    /// kvm:kvm_apic_accept_irq apicid
    pub tp_accept_apicid: u32,
    /// kvm:kvm_vcpu_wakeup ns, waited
    pub tp_wakeup_ns: u32,
    pub tp_wakeup_waited: u32,
    /// kvm:kvm_userspace_exit reason, errno
    pub tp_uexit_reason: u32,
    pub tp_uexit_errno: u32,
    /// workqueue:workqueue_queue_work work, function
    pub tp_queue_work: u32,
    pub tp_queue_function: u32,
    /// workqueue:workqueue_execute_start work, function
    pub tp_exec_work: u32,
    pub tp_exec_function: u32,
    /// syscalls:sys_enter_write count
    pub tp_write_count: u32,
    /// syscalls:sys_enter_ioctl fd, cmd
    pub tp_ioctl_fd: u32,
    pub tp_ioctl_cmd: u32,
    // Task context (BTF): is a program's frame on the current task's stack?
    /// `struct task_struct`.stack
    pub task_stack: u32,
    /// THREAD_SIZE: size of `union thread_union`, else of x86's `struct irq_stack` (the same
    /// order), else 0 (unknown: every program is taken to run in task context).
    pub thread_size: u32,
    // The VMM of a kernel thread that works in its memory (BTF): the vhost worker before
    // Linux 6.4 is a kthread `vhost-PID` that adopts the VMM's mm, outside its thread group.
    /// `struct task_struct`.mm
    pub task_mm: u32,
    /// Address of KVM's `irqfd_inject` (kallsyms), 0 when unknown: deferred injections are
    /// then not followed.
    pub irqfd_inject: u64,
    /// `struct mm_struct`.owner (CONFIG_MEMCG): the task the mm belongs to.
    pub mm_owner: u32,
    /// `struct task_struct`.tgid
    pub task_tgid: u32,
    /// `struct kvm_lapic`.vcpu (kvm module BTF): the accept's function variants.
    pub lapic_vcpu: u32,
    /// `struct sk_buff`.dev
    pub skb_dev: u32,
    /// `struct net_device`.ifindex
    pub netdev_ifindex: u32,
    /// `struct task_struct`.nvcsw: voluntary context switches (a backend thread that blocked).
    pub task_nvcsw: u32,
    /// The bench's variants of the block programs: where they stop ([`crate::blk::cut`]); 0,
    /// the whole program, in every other use. A constant to the verifier, which drops the
    /// branches of the other variants.
    pub blk_cut: u32,
    /// `struct task_struct`.pid: the thread id of a task the scheduler's tracepoints name.
    pub task_pid: u32,
    /// `struct task_struct`.on_rq: a task woken while still queued on its CPU keeps running
    /// (no switch into it follows).
    pub task_on_rq: u32,
    /// `struct sk_buff`.queue_mapping (u16): the tap queue of a guest's packet, the `queue`
    /// label ([`crate::net::queue_detail`]); unknown, the label is empty.
    pub skb_queue_mapping: u32,
    /// REQ_FUA: `1 << __REQ_FUA` (`enum req_flag_bits` in BTF), the `fua` op; 0 when unknown.
    pub req_fua: u32,
    /// kvm:kvm_msi_set_irq address, data (the classic program's: blk.complete_to_irq's vector)
    pub tp_msi_address: u32,
    pub tp_msi_data: u32,
    /// `struct request`.bio and .rq_flags, `struct bio`.bi_opf and .bi_bdev,
    /// `struct block_device`.bd_disk (the whole disk, as the other block stages name it, not a
    /// partition): a VMM's flush or FUA write (blk.sync) from its bio.
    pub rq_bio: u32,
    pub rq_rq_flags: u32,
    pub bio_opf: u32,
    pub bio_bdev: u32,
    pub bdev_disk: u32,
    /// REQ_PREFLUSH (`1 << __REQ_PREFLUSH`, BTF's `enum req_flag_bits`); 0 when unknown.
    pub req_preflush: u32,
    /// RQF_FLUSH_SEQ: a request inside the flush machinery's sequence (`1 << __RQF_FLUSH_SEQ`,
    /// BTF's `enum rqf_flags`; kernels before that enum define it as `1 << 4`).
    pub rqf_flush_seq: u32,
    /// `struct bio`.bi_private: LIO's iblock backstore keeps its command there, which names
    /// the VMM of a request vhost-scsi's target submits from a kworker.
    pub bio_private: u32,
    /// kvm:kvm_pi_irte_update host_irq, vcpu_id, gvec (u32) and set (bool): its classic
    /// record, whose fields are the same on kernels whose arguments differ (6.1 passes a vCPU
    /// id and the descriptor's address, later kernels the vCPU).
    pub tp_irte_host_irq: u32,
    pub tp_irte_vcpu: u32,
    pub tp_irte_gvec: u32,
    pub tp_irte_set: u32,
    /// Timelines: sample the events of one window in this many (a power of two); 0, none.
    pub timeline_every: u32,
}
assert_size!(Config, 248);

impl Config {
    /// Every offset unknown: what the BPF object holds until the daemon sets it.
    pub const UNSET: Config = Config {
        rq_q: NO_OFFSET,
        rq_cmd_flags: NO_OFFSET,
        q_disk: NO_OFFSET,
        disk_major: NO_OFFSET,
        disk_first_minor: NO_OFFSET,
        tp_issue_dev: NO_OFFSET,
        tp_issue_sector: NO_OFFSET,
        tp_issue_rwbs: NO_OFFSET,
        tp_complete_dev: NO_OFFSET,
        tp_complete_sector: NO_OFFSET,
        tp_requeue_dev: NO_OFFSET,
        tp_requeue_sector: NO_OFFSET,
        tp_kvm_exit_reason: NO_OFFSET,
        tp_kvm_exit_isa: NO_OFFSET,
        tp_kvm_exit_vcpu: NO_OFFSET,
        vcpu_id: NO_OFFSET,
        work_func: NO_OFFSET,
        tp_kvm_entry_vcpu: NO_OFFSET,
        tp_set_irq_level: NO_OFFSET,
        tp_accept_apicid: NO_OFFSET,
        tp_wakeup_ns: NO_OFFSET,
        tp_wakeup_waited: NO_OFFSET,
        tp_uexit_reason: NO_OFFSET,
        tp_uexit_errno: NO_OFFSET,
        tp_queue_work: NO_OFFSET,
        tp_queue_function: NO_OFFSET,
        tp_exec_work: NO_OFFSET,
        tp_exec_function: NO_OFFSET,
        tp_write_count: NO_OFFSET,
        tp_ioctl_fd: NO_OFFSET,
        tp_ioctl_cmd: NO_OFFSET,
        task_stack: NO_OFFSET,
        thread_size: 0,
        task_mm: NO_OFFSET,
        irqfd_inject: 0,
        mm_owner: NO_OFFSET,
        task_tgid: NO_OFFSET,
        lapic_vcpu: NO_OFFSET,
        skb_dev: NO_OFFSET,
        netdev_ifindex: NO_OFFSET,
        task_nvcsw: NO_OFFSET,
        blk_cut: crate::blk::cut::WHOLE,
        task_pid: NO_OFFSET,
        task_on_rq: NO_OFFSET,
        skb_queue_mapping: NO_OFFSET,
        req_fua: 0,
        tp_msi_address: NO_OFFSET,
        tp_msi_data: NO_OFFSET,
        rq_bio: NO_OFFSET,
        rq_rq_flags: NO_OFFSET,
        bio_opf: NO_OFFSET,
        bio_bdev: NO_OFFSET,
        bdev_disk: NO_OFFSET,
        req_preflush: 0,
        rqf_flush_seq: 0,
        bio_private: NO_OFFSET,
        tp_irte_host_irq: NO_OFFSET,
        tp_irte_vcpu: NO_OFFSET,
        tp_irte_gvec: NO_OFFSET,
        tp_irte_set: NO_OFFSET,
        timeline_every: 0,
    };
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] u32 fields then one u64 at an 8-aligned offset, size asserted.
unsafe impl aya::Pod for Config {}
