//! The KVM stages shared by both paths. `events`, `syscalls` and `functions` hold the programs, one per
//! kernel event, each with the list of stage handlers it calls; the other files hold one stage
//! (or two that share their maps) each: its maps and handlers.

mod events;
mod exit;
mod functions;
mod inject;
mod signal;
mod syscalls;
mod vcpu;
