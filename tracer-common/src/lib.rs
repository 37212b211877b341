//! Types and rules shared by iopath's BPF programs and its daemon.
//!
//! Everything here is `no_std` and used on both sides: the BPF programs are thin adapters that
//! read an event, call a rule from here and update a map whose layout is defined here; the daemon
//! reads those maps with the same types and unit-tests the same rules on the host.
#![no_std]

pub mod blk;
pub mod config;
pub mod hist;
pub mod kvm;
pub mod maps;
pub mod net;
pub mod rules;
pub mod stage;
pub mod vfio;

/// Checks at compile time that a type shared with the kernel has exactly the size both sides
/// assume (and so no implicit padding a compiler could lay out differently).
#[macro_export]
macro_rules! assert_size {
    ($ty:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
    };
}
