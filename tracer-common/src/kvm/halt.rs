//! `kvm.halt_wakeup`: how long a vCPU was halted, as kvm:kvm_vcpu_wakeup reports it (`ns`),
//! split by whether it blocked (`waited`) or was woken while KVM still polled. No start event:
//! the kernel measured the interval.

/// `detail` of a halt: 1 blocked, 0 polled.
pub const fn halt_detail(waited: bool) -> u32 {
    waited as u32
}

/// The `wait` label of a halt's detail.
pub const fn halt_wait_name(detail: u32) -> &'static str {
    if detail & 1 == 1 { "blocked" } else { "polled" }
}
