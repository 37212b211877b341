//! Stage identifiers: the `stage` field of a histogram key. The table of what each stage means,
//! its bounding events and how it attaches lives in the daemon (`tracer-user/src/stages.rs`).

/// One stage of one path. The numeric values are part of the map layout: append, never reorder.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageId {
    /// block:block_rq_issue to block:block_rq_complete.
    BlkDevice = 0,
    /// kvm:kvm_exit to the same vCPU thread's next kvm:kvm_entry.
    KvmExit = 1,
}

impl StageId {
    pub const ALL: [StageId; 2] = [StageId::BlkDevice, StageId::KvmExit];
    pub const COUNT: usize = Self::ALL.len();

    pub const fn from_u16(v: u16) -> Option<StageId> {
        match v {
            0 => Some(StageId::BlkDevice),
            1 => Some(StageId::KvmExit),
            _ => None,
        }
    }
}
