//! Builds the BPF programs' load-time [`Config`]: struct member offsets from this kernel's BTF and
//! record field offsets from its tracefs formats. What is not found stays `NO_OFFSET`; the attach
//! plan then skips the variants that need it, with the reason.

use std::fs;

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
        tp_requeue_dev: field("block", "block_rq_requeue", "dev"),
        tp_requeue_sector: field("block", "block_rq_requeue", "sector"),
        tp_kvm_exit_reason: field("kvm", "kvm_exit", "exit_reason"),
        tp_kvm_exit_isa: field("kvm", "kvm_exit", "isa"),
        tp_kvm_exit_vcpu: field("kvm", "kvm_exit", "vcpu_id"),
        vcpu_id: member("kvm_vcpu", "vcpu_id"),
        work_func: member("work_struct", "func"),
        tp_kvm_entry_vcpu: field("kvm", "kvm_entry", "vcpu_id"),
        tp_set_irq_level: field("kvm", "kvm_set_irq", "level"),
        tp_accept_apicid: field("kvm", "kvm_apic_accept_irq", "apicid"),
        tp_wakeup_ns: field("kvm", "kvm_vcpu_wakeup", "ns"),
        tp_wakeup_waited: field("kvm", "kvm_vcpu_wakeup", "waited"),
        tp_uexit_reason: field("kvm", "kvm_userspace_exit", "reason"),
        tp_uexit_errno: field("kvm", "kvm_userspace_exit", "errno"),
        tp_queue_work: field("workqueue", "workqueue_queue_work", "work"),
        tp_queue_function: field("workqueue", "workqueue_queue_work", "function"),
        tp_exec_work: field("workqueue", "workqueue_execute_start", "work"),
        tp_exec_function: field("workqueue", "workqueue_execute_start", "function"),
        tp_write_count: field("syscalls", "sys_enter_write", "count"),
        tp_ioctl_fd: field("syscalls", "sys_enter_ioctl", "fd"),
        tp_ioctl_cmd: field("syscalls", "sys_enter_ioctl", "cmd"),
        task_stack: member("task_struct", "stack"),
        thread_size: btf.and_then(thread_size).unwrap_or(0),
        task_mm: member("task_struct", "mm"),
        irqfd_inject: kernel_symbol("irqfd_inject").unwrap_or(0),
        mm_owner: member("mm_struct", "owner"),
        task_tgid: member("task_struct", "tgid"),
        lapic_vcpu: member("kvm_lapic", "vcpu"),
        skb_dev: member("sk_buff", "dev"),
        netdev_ifindex: member("net_device", "ifindex"),
        task_nvcsw: member("task_struct", "nvcsw"),
        task_pid: member("task_struct", "pid"),
        task_on_rq: member("task_struct", "on_rq"),
        skb_queue_mapping: member("sk_buff", "queue_mapping"),
        blk_cut: tracer_common::blk::cut::WHOLE,
        req_fua: btf
            .and_then(|b| b.enum_value("req_flag_bits", "__REQ_FUA"))
            .filter(|&bit| bit < 32)
            .map_or(0, |bit| 1 << bit),
        tp_msi_address: field("kvm", "kvm_msi_set_irq", "address"),
        tp_msi_data: field("kvm", "kvm_msi_set_irq", "data"),
        rq_bio: member("request", "bio"),
        rq_rq_flags: member("request", "rq_flags"),
        bio_opf: member("bio", "bi_opf"),
        bio_bdev: member("bio", "bi_bdev"),
        bio_private: member("bio", "bi_private"),
        tp_irte_host_irq: field("kvm", "kvm_pi_irte_update", "host_irq"),
        tp_irte_vcpu: field("kvm", "kvm_pi_irte_update", "vcpu_id"),
        tp_irte_gvec: field("kvm", "kvm_pi_irte_update", "gvec"),
        tp_irte_set: field("kvm", "kvm_pi_irte_update", "set"),
        timeline_every: 0,
        bdev_disk: member("block_device", "bd_disk"),
        req_preflush: btf
            .and_then(|b| b.enum_value("req_flag_bits", "__REQ_PREFLUSH"))
            .filter(|&bit| bit < 32)
            .map_or(0, |bit| 1 << bit),
        // Recent kernels number the request flags in `enum rqf_flags`, some in an anonymous
        // enum (its enumerator found wherever it is); before that RQF_FLUSH_SEQ was the macro
        // `1 << 4` (from 4.x on): that value only where `__RQF_STARTED`, present wherever the
        // flags are enumerators, is not one (a kernel that has them but not this one gets none
        // rather than a guess).
        rqf_flush_seq: btf.map_or(0, |b| {
            b.enum_value("rqf_flags", "__RQF_FLUSH_SEQ")
                .or_else(|| b.enumerator("__RQF_FLUSH_SEQ"))
                .or_else(|| b.enumerator("__RQF_STARTED").map_or(Some(4), |_| None))
                .filter(|&bit| bit < 32)
                .map_or(0, |bit| 1 << bit)
        }),
    }
}

/// THREAD_SIZE: the kernel's `union thread_union` is exactly one task stack; where BTF lacks
/// it, x86's `struct irq_stack` has the same order.
fn thread_size(btf: &KernelBtf) -> Option<u32> {
    btf.size_of("thread_union")
        .or_else(|| btf.size_of("irq_stack"))
        .filter(|s| s.is_power_of_two())
}

/// Address of a kernel text symbol from /proc/kallsyms; None when absent or hidden
/// (kptr_restrict shows zeros to readers without CAP_SYSLOG).
pub fn kernel_symbol(name: &str) -> Option<u64> {
    let syms = fs::read_to_string("/proc/kallsyms").ok()?;
    parse_kallsyms(&syms, name, true)
}

/// Address of any kernel symbol (text or data) from /proc/kallsyms.
pub fn kernel_address(name: &str) -> Option<u64> {
    let syms = fs::read_to_string("/proc/kallsyms").ok()?;
    parse_kallsyms(&syms, name, false)
}

fn parse_kallsyms(syms: &str, name: &str, text: bool) -> Option<u64> {
    syms.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (addr, kind, sym) = (f.next()?, f.next()?, f.next()?);
        // t/T: text; a module symbol carries its module after it, which does not matter here.
        (sym == name && (!text || kind.eq_ignore_ascii_case("t")))
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kallsyms_lines() {
        let s = "ffffffff81285500 t irqfd_shutdown\nffffffff81285600 t irqfd_inject\n\
0000000000000000 t hidden\nffffffffc0001000 t irqfd_inject_x\t[kvm]\n";
        assert_eq!(
            parse_kallsyms(s, "irqfd_inject", true),
            Some(0xffffffff81285600)
        );
        assert_eq!(parse_kallsyms(s, "hidden", true), None);
        assert_eq!(parse_kallsyms(s, "missing", true), None);
        let s = "ffffffff828c608c R __start_notes\n";
        assert_eq!(parse_kallsyms(s, "__start_notes", true), None);
        assert_eq!(
            parse_kallsyms(s, "__start_notes", false),
            Some(0xffffffff828c608c)
        );
    }
}
