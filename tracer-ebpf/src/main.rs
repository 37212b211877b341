//! iopath's BPF programs. Each program is a thin adapter: it reads its event, calls the stage
//! rule from tracer-common and counts the result into the shared histogram map.
//!
//! A stage can have several implementations (tp_btf, raw tracepoint, classic tracepoint); the
//! daemon's attach plan loads and attaches one of them, never two at once.
#![no_std]
#![no_main]

mod blk;
mod irq;
mod kvm;
mod shared;
mod syscalls;
mod vcpu;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
