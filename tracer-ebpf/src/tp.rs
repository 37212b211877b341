//! One declaration per tracepoint for its three programs, which the attach plan tries in this
//! order: tp_btf (the typed argument array), raw_tp (the same array, untyped), classic
//! tracepoint (the formatted record; field offsets read from tracefs). tp_btf and raw_tp read
//! their arguments the same way, so one expression serves both.

/// The body of a program that takes its event from argument-like context: `$arg` is `$get`
/// (argument i as a u64), the event `$from_args` (a closure, so that `?` in it returns from
/// it), handed to `$handle` with the context's address as its [`Site`].
macro_rules! from_args {
    ($ctx:ident, $arg:ident = $get:expr, $from_args:expr, $handle:path) => {{
        #[allow(unused_variables)]
        let $arg = $get;
        #[allow(clippy::redundant_closure_call)]
        let ev: Result<_, ()> = (|| $from_args)();
        $handle(
            ev,
            $crate::tp::Site::Args(aya_ebpf::EbpfContext::as_ptr(&$ctx) as *const u64),
        );
    }};
}
pub(crate) use from_args;

/// `tracepoint!(name, btf_prog, raw_prog, tp_prog, |arg| from_args, |rec| from_record, handle)`:
/// `arg(i)` is argument i as a u64; `rec` the classic program's context. Both expressions give
/// a `Result<Event, ()>` (Err: a read failed) that `handle` takes, with the event's [`Site`].
/// `btf = |arg| e,` before them gives the tp_btf program its own expression: its arguments are
/// typed kernel pointers the verifier lets it load through directly (no bpf_probe_read_kernel).
macro_rules! tracepoint {
    ($tp:literal, $btf:ident, $raw:ident, $classic:ident,
     |$arg:ident| $from_args:expr, |$rec:ident| $from_record:expr, $handle:path) => {
        $crate::tp::tracepoint!(
            $tp,
            $btf,
            $raw,
            $classic,
            btf = |$arg| $from_args,
            |$arg| $from_args,
            |$rec| $from_record,
            $handle
        );
    };
    ($tp:literal, $btf:ident, $raw:ident, $classic:ident, btf = |$barg:ident| $from_btf:expr,
     |$arg:ident| $from_args:expr, |$rec:ident| $from_record:expr, $handle:path) => {
        $crate::tp::tracepoint_args!(
            $tp,
            $btf,
            $raw,
            btf = |$barg| $from_btf,
            |$arg| $from_args,
            $handle
        );

        #[aya_ebpf::macros::tracepoint]
        pub fn $classic(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
            #[allow(unused_variables)]
            let $rec = &ctx;
            #[allow(clippy::redundant_closure_call)]
            let ev: Result<_, ()> = (|| $from_record)();
            $handle(ev, $crate::tp::Site::Record);
            0
        }
    };
}
pub(crate) use tracepoint;

/// `tracepoint_args!(name, btf_prog, raw_prog, btf = |arg| from_btf, |arg| from_args, handle)`:
/// a tracepoint's tp_btf and raw_tp programs only, for events whose classic record lacks what
/// the stage keys by (the net tracepoints name the device by its name, not its ifindex).
macro_rules! tracepoint_args {
    ($tp:literal, $btf:ident, $raw:ident, btf = |$barg:ident| $from_btf:expr,
     |$arg:ident| $from_args:expr, $handle:path) => {
        #[aya_ebpf::macros::btf_tracepoint(function = $tp)]
        pub fn $btf(ctx: aya_ebpf::programs::BtfTracePointContext) -> i32 {
            let get = |i: usize| -> u64 { ctx.arg(i) };
            $crate::tp::from_args!(ctx, $barg = get, $from_btf, $handle);
            0
        }

        #[aya_ebpf::macros::raw_tracepoint(tracepoint = $tp)]
        pub fn $raw(ctx: aya_ebpf::programs::RawTracePointContext) -> i32 {
            let get = |i: usize| -> u64 { ctx.arg(i) };
            $crate::tp::from_args!(ctx, $arg = get, $from_args, $handle);
            0
        }
    };
}
pub(crate) use tracepoint_args;

/// `function!(name, fentry_prog, kprobe_prog, |arg| from_args, handle)`: the fentry and kprobe
/// programs of a kernel function whose arguments carry what the event's tracepoint programs
/// read (`arg(i)`: argument i as a u64), for kernels where the tracepoint cannot be used. The
/// attach plan names the function; `name` is only the section's default.
macro_rules! function {
    ($func:literal, $fentry:ident, $kprobe:ident, |$arg:ident| $from_args:expr, $handle:path) => {
        #[aya_ebpf::macros::fentry(function = $func)]
        pub fn $fentry(ctx: aya_ebpf::programs::FEntryContext) -> i32 {
            let get = |i: usize| -> u64 { ctx.arg(i) };
            $crate::tp::from_args!(ctx, $arg = get, $from_args, $handle);
            0
        }

        #[aya_ebpf::macros::kprobe]
        pub fn $kprobe(ctx: aya_ebpf::programs::ProbeContext) -> u32 {
            let get = |i: usize| -> u64 { ctx.arg(i).unwrap_or(0) };
            $crate::tp::from_args!(ctx, $arg = get, $from_args, $handle);
            0
        }
    };
}
pub(crate) use function;

/// A field of a classic tracepoint record at `off` (from tracefs).
#[inline(always)]
pub fn field<T>(ctx: &aya_ebpf::programs::TracePointContext, off: u32) -> Result<T, ()> {
    // SAFETY: a bounded read of the record; a bad offset fails the read, nothing else.
    unsafe { ctx.read_at::<T>(off as usize) }.map_err(|_| ())
}

/// Where an event's context lives. A tp_btf or raw_tp program's argument array is a local of
/// the traced code (the kernel's bpf_trace_run*), so its address is on the stack the event
/// fired on: the task's own, or the per-CPU IRQ stack in interrupt context. A classic
/// tracepoint's record is in a per-CPU buffer and tells nothing. A function probe's context
/// (kprobe: the saved registers; fentry: the trampoline's copy of the arguments) is on the
/// stack the probed call runs on, like an argument array.
#[derive(Clone, Copy)]
pub enum Site {
    Args(*const u64),
    Record,
}
