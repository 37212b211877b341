//! KVM stages shared by both paths: interrupt signalling and injection, exits, halts and exits
//! to userspace. One file per stage; each holds the rules its BPF programs call.

pub mod exit;
pub mod halt;
pub mod inject;
pub mod signal;
pub mod uexit;

pub use exit::*;
