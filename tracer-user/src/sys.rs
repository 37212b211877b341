//! The bpf(2) commands aya 0.14 does not wrap: a program's recursion misses (from
//! bpf_prog_info) and BPF_PROG_TEST_RUN of a raw tracepoint program, which the tests use to
//! drive programs whose events never fire on the build machine.

use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya_obj::generated::{BPF_F_TEST_RUN_ON_CPU, bpf_attr, bpf_cmd, bpf_prog_info};

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: attr is a live, fully initialised bpf_attr; the kernel reads and writes only
    // within its size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Times the kernel skipped the program because it was already running on that CPU (another
/// event fired inside it): those events are lost to it.
pub fn recursion_misses(prog: BorrowedFd) -> io::Result<u64> {
    // SAFETY: plain C structs, all-zero is their empty value.
    let mut info: bpf_prog_info = unsafe { zeroed() };
    let mut attr: bpf_attr = unsafe { zeroed() };
    // The union member this command reads; `info` outlives the call.
    attr.info.bpf_fd = prog.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut bpf_prog_info as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.recursion_misses)
}

/// Runs a raw tracepoint program once with `args` as its argument array: on this CPU in the
/// calling task, or on `cpu` from an IPI (interrupt context) when that is another CPU. Returns
/// the program's return value.
pub fn test_run_raw_tp(prog: BorrowedFd, args: &[u64], cpu: Option<u32>) -> io::Result<u32> {
    // SAFETY: all-zero is bpf_attr's empty value.
    let mut attr: bpf_attr = unsafe { zeroed() };
    // Writing the union member this command uses; args outlives the call.
    attr.test.prog_fd = prog.as_raw_fd() as u32;
    attr.test.ctx_in = args.as_ptr() as u64;
    attr.test.ctx_size_in = size_of_val(args) as u32;
    if let Some(cpu) = cpu {
        attr.test.flags = BPF_F_TEST_RUN_ON_CPU;
        attr.test.cpu = cpu;
    }
    bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr)?;
    // SAFETY: the member the kernel wrote back.
    Ok(unsafe { attr.test.retval })
}
