//! iopath's BPF programs. Each program is a thin adapter for one kernel event: it reads the
//! event's arguments and hands them to the handlers of every stage that is on and bounded by
//! that event (its dispatch list); the handlers call the stage rules from tracer-common and
//! count the result into the shared histogram map.
//!
//! An event has several implementations (tp_btf, raw tracepoint, classic tracepoint); the
//! daemon's attach plan loads and attaches exactly one per event, whatever the number of stages
//! it serves, and switches on (`STAGES_ON`) the stages whose events all attached.
//!
//! Layout: `shared` (maps and helpers of every path), `tp` (the macro that writes an event's
//! three programs), then one folder per path: `blk`, `kvm` (`events`, `syscalls`: the programs
//! and their dispatch lists; one file per stage or stage pair with its maps and handlers).
#![no_std]
#![no_main]

mod blk;
mod blk_sync;
mod blk_vm;
mod kvm;
mod lio;
mod net;
mod runs;
mod shared;
mod tp;
mod vfio;
mod vhost;
mod wakeup;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
