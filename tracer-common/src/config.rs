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
    /// kvm:kvm_exit exit_reason, isa, vcpu_id
    pub tp_kvm_exit_reason: u32,
    pub tp_kvm_exit_isa: u32,
    pub tp_kvm_exit_vcpu: u32,
    pub _pad: u32,
}
assert_size!(Config, 56);

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
        tp_kvm_exit_reason: NO_OFFSET,
        tp_kvm_exit_isa: NO_OFFSET,
        tp_kvm_exit_vcpu: NO_OFFSET,
        _pad: 0,
    };
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] u32 fields only, size asserted.
unsafe impl aya::Pod for Config {}
