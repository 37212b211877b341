//! Builds the BPF programs' load-time [`Config`]: struct member offsets from this kernel's BTF and
//! record field offsets from its tracefs formats. What is not found stays `NO_OFFSET`; the attach
//! plan then skips the variants that need it, with the reason.

use tracer_common::config::{Config, NO_OFFSET};

use crate::{btf::KernelBtf, tracefs::Tracefs};

pub fn probe(btf: Option<&KernelBtf>, tracefs: &Tracefs) -> Config {
    let member = |s: &str, m: &str| btf.and_then(|b| b.member_offset(s, m)).unwrap_or(NO_OFFSET);
    let field = |c: &str, n: &str, f: &str| tracefs.field_offset(c, n, f).unwrap_or(NO_OFFSET);
    Config {
        rq_q: member("request", "q"),
        rq_cmd_flags: member("request", "cmd_flags"),
        q_disk: member("request_queue", "disk"),
        disk_major: member("gendisk", "major"),
        disk_first_minor: member("gendisk", "first_minor"),
        tp_issue_dev: field("block", "block_rq_issue", "dev"),
        tp_issue_sector: field("block", "block_rq_issue", "sector"),
        tp_issue_rwbs: field("block", "block_rq_issue", "rwbs"),
        tp_complete_dev: field("block", "block_rq_complete", "dev"),
        tp_complete_sector: field("block", "block_rq_complete", "sector"),
        tp_kvm_exit_reason: field("kvm", "kvm_exit", "exit_reason"),
        tp_kvm_exit_isa: field("kvm", "kvm_exit", "isa"),
        tp_kvm_exit_vcpu: field("kvm", "kvm_exit", "vcpu_id"),
        _pad: 0,
    }
}
