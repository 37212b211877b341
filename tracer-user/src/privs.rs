//! Privilege check up front, so a user without them gets one clear line instead of a syscall
//! error from deep inside the loader.

use std::fs;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability mask of this process.
fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn check() -> anyhow::Result<()> {
    let caps = effective();
    let has = |c: u32| caps & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        anyhow::bail!(
            "iopath needs root, or CAP_BPF and CAP_PERFMON (effective capabilities {caps:#x})"
        )
    }
}

/// Lifts RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps against it, and its default (64 KiB
/// or 8 MiB) is smaller than iopath's maps. Later kernels ignore it; failure is left to the
/// loader to report.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall on a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
