//! A minimal VMM on /dev/kvm that drives the real KVM events iopath's KVM stages are built on,
//! with delays it controls, so the tests can check what iopath measures against what happened.
//!
//! ```text
//! iopath-testvmm -name guest=NAME MODE [--count N] [--spin-us D] [--first-us F] [--gap-us G] [--hold-ms H]
//! ```
//! Modes:
//! - `pio`: a real-mode guest does N `out` to port 0x3f8, each a KVM_EXIT_IO; the VMM spins D µs
//!   on each before the next KVM_RUN (kvm.userspace_exit), then one `out` to 0x3f9 ends it.
//! - `irqfd-msi`, `irqfd-gsi`: N writes, G µs apart, to an eventfd registered with KVM_IRQFD on
//!   an MSI route (injected in the writer's context) or an IOAPIC pin (injected by a kworker).
//! - `signal-msi`: N KVM_SIGNAL_MSI ioctls, G µs apart.
//! - `ioeventfd`: the `pio` guest with port 0x3f8 registered with KVM_IOEVENTFD; reports how
//!   many `out`s signalled the eventfd in the kernel and how many still exited to userspace.
//! - `halt`: the guest halts in the kernel (in-kernel irqchip); the VMM wakes the vCPU thread N
//!   times with a signal D µs after it entered KVM_RUN (kvm:kvm_vcpu_wakeup); the first time
//!   after at least 20 ms, so that the vCPU has surely halted.
//! - `exits`: V vCPUs (`--vcpus V`), each in its own thread, each doing N port writes
//!   (KVM_EXIT_IO) and N writes to unbacked memory (KVM_EXIT_MMIO), then halting until the VMM
//!   signals its thread (KVM_RUN fails with EINTR), twice, so that one exit of the third
//!   reason is followed by a KVM_RUN: exits of three reasons on every vCPU.
//!
//! - `tap-rx --tap TAP`: a virtio-net backend's receive side, as QEMU's userspace one does it:
//!   reads N packets from the existing tap device TAP (each read takes the skb off the tap:
//!   skb:consume_skb in this thread), spins D µs on each, then signals an irqfd on the MSI
//!   route (kvm:kvm_msi_set_irq in this thread). A UDP packet from `udp-send` carries its send
//!   time (CLOCK_MONOTONIC): for those, the report gives the time from send to signal, an
//!   independent figure for the RX stages' sum. Reads end after N packets or `--gap-us` µs
//!   without one. With `--no-signal` it never signals (a guest that polls with interrupts off);
//!   `last_batch` then says how many packets it took since its thread last blocked (its
//!   voluntary context switches, read after each read; iopath reads them inside the read, at
//!   the take), the packets iopath cannot yet count as delivered without an interrupt.
//!   With `--queues Q` it reads the Q queues of a multi-queue tap, and reports the packets of
//!   each (`udp-send --flows F` sends from F ports, which tun spreads over the queues).
//! - `tap-forward --tap A --tap2 B --hold-ms H`: a backend joining two taps for H ms: each
//!   frame read off one is written to the other (net.tx.host_stack from there), then the irqfd
//!   is signalled. The bench's iperf3 runs between two namespaces through it.
//! - `tap-tx --tap TAP`: a virtio-net backend's transmit side, as QEMU's userspace one does it,
//!   on one CPU with its vCPU. The backend thread first takes one packet off TAP (so iopath
//!   knows it for a backend), then blocks on an ioeventfd (port 0x3f8). The guest does N
//!   kicks, each an `out` to 0x3f8 (the ioeventfd wakes the backend) then an `out` to 0x3fa
//!   (an exit to userspace); there the vCPU thread, SCHED_FIFO on the backend's CPU, spins
//!   `--hold-us` H µs, keeping the woken backend off its CPU, then sleeps `--gap-us` G µs. The
//!   backend, woken, spins D µs and writes one frame to TAP. The report gives, per kick, the
//!   time to the backend awake from the vCPU's entry into the KVM_RUN of the kick and from its
//!   return to userspace after it (they bracket net.tx.kick), and from awake to the write's
//!   call and return.
//! - `blk-backend --dev DEV`: a disk backend's I/O thread, as QEMU's worker and main loop do it
//!   in one: the guest first does two port writes (KVM events: a tracer knows the VMM from
//!   them), then the VMM prints `{"ready":true}`, waits `--first-us` F µs (for a tracer to
//!   start), does 10 warm-up 4 KiB O_DIRECT reads of DEV, waits `--gap-us` G µs (for the
//!   tracer to see the thread), then N reads (`--op flush`: fdatasync calls, `--op fua`: O_DSYNC
//!   writes), each after a D µs spin and followed by a signal
//!   of an irqfd on the MSI route (the guest's interrupt). The report gives the thread's CPU
//!   time per read over the N, split into the spin and the system calls' own CPU time (the
//!   read's and the signal's, CLOCK_THREAD_CPUTIME_ID around them).
//! - `udp-send --to IP:PORT`: no VM; sends N UDP datagrams G µs apart, each carrying its
//!   CLOCK_MONOTONIC send time (run in the peer's network namespace).
//!
//! It stays alive H ms after the work (default 0) so a test can scrape while the VM exists, and
//! prints one JSON line of what it did. The `-name` argument is what labels the VM, as for QEMU.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use iopath_tests::monotonic_ns;
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KvmIrqRouting,
    kvm_irq_routing_entry, kvm_msi, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x1000;
const CODE_ADDR: u64 = 0x1000;
/// GSI of the MSI route and the IOAPIC pin of the GSI route.
const MSI_GSI: u32 = 24;
const IOAPIC_GSI: u32 = 4;
/// MSI to APIC id 0, vector 0x30, fixed, edge.
const MSI_ADDR: u32 = 0xfee0_0000;
const MSI_DATA: u32 = 0x30;

// 16-bit real-mode guests.
/// mov dx,0x3f8; l: out dx,al; loop l; mov dx,0x3f9; out dx,al; h: hlt; jmp h
const GUEST_PIO: &[u8] = &[
    0xba, 0xf8, 0x03, 0xee, 0xe2, 0xfd, 0xba, 0xf9, 0x03, 0xee, 0xf4, 0xeb, 0xfd,
];
/// l: mov dx,0x3f8; out dx,al; mov dx,0x3fa; out dx,al; loop l; mov dx,0x3f9; out dx,al;
/// h: hlt; jmp h
const GUEST_KICKS: &[u8] = &[
    0xba, 0xf8, 0x03, 0xee, 0xba, 0xfa, 0x03, 0xee, 0xe2, 0xf6, 0xba, 0xf9, 0x03, 0xee, 0xf4, 0xeb,
    0xfd,
];
/// h: hlt; jmp h
const GUEST_HALT: &[u8] = &[0xf4, 0xeb, 0xfd];
/// mov dx,0x3f8; l: out dx,al; mov [0x8000],al; loop l; h: hlt; jmp h (0x8000 is unbacked)
const GUEST_EXITS: &[u8] = &[
    0xba, 0xf8, 0x03, 0xee, 0xa2, 0x00, 0x80, 0xe2, 0xfa, 0xf4, 0xeb, 0xfd,
];

struct Args {
    name: String,
    mode: String,
    count: u32,
    spin_us: u64,
    /// halt: the wait before the first signal, for the first KVM_RUN to reach the guest's hlt.
    first_us: u64,
    gap_us: u64,
    hold_ms: u64,
    vcpus: u32,
    tap: String,
    /// tap-forward: the other tap.
    tap2: String,
    to: String,
    /// tap-rx: signal the irqfd after each packet, or never (a guest that polls).
    no_signal: bool,
    /// tap-tx: how long the vCPU thread keeps the woken backend off its CPU.
    hold_us: u64,
    /// tap-rx: queues of a multi-queue tap to read (1: a single-queue tap).
    queues: u32,
    /// udp-send: sockets (source ports, flows) to send from in turn.
    flows: u32,
    /// blk-backend: the block device to read.
    dev: String,
    /// blk-backend: what each measured request is: `read`, `flush` (fdatasync of the device,
    /// as QEMU's thread pool flushes a raw disk) or `fua` (a 4 KiB O_DIRECT|O_DSYNC write, as
    /// QEMU's cache=directsync writes).
    op: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        name: String::new(),
        mode: String::new(),
        count: 100,
        spin_us: 0,
        first_us: 20_000,
        gap_us: 1000,
        hold_ms: 0,
        vcpus: 1,
        tap: String::new(),
        tap2: String::new(),
        to: String::new(),
        no_signal: false,
        hold_us: 0,
        queues: 1,
        flows: 1,
        dev: String::new(),
        op: "read".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "-name" => a.name = val()?,
            "--count" => a.count = val()?.parse()?,
            "--spin-us" => a.spin_us = val()?.parse()?,
            "--first-us" => a.first_us = val()?.parse()?,
            "--gap-us" => a.gap_us = val()?.parse()?,
            "--hold-ms" => a.hold_ms = val()?.parse()?,
            "--vcpus" => a.vcpus = val()?.parse()?,
            "--tap" => a.tap = val()?,
            "--tap2" => a.tap2 = val()?,
            "--to" => a.to = val()?,
            "--no-signal" => a.no_signal = true,
            "--hold-us" => a.hold_us = val()?.parse()?,
            "--queues" => a.queues = val()?.parse()?,
            "--flows" => a.flows = val()?.parse()?,
            "--dev" => a.dev = val()?,
            "--op" => a.op = val()?,
            m if !m.starts_with('-') && a.mode.is_empty() => a.mode = m.to_string(),
            other => bail!("unknown argument {other}"),
        }
    }
    if a.mode.is_empty() {
        bail!(
            "usage: iopath-testvmm -name guest=NAME pio|irqfd-msi|irqfd-gsi|signal-msi|ioeventfd|halt|exits|tap-rx|tap-tx|tap-forward|blk-backend|udp-send ..."
        );
    }
    Ok(a)
}

/// Busy-waits `us` microseconds: the delay the tests expect the tracer to measure.
fn spin(us: u64) {
    let end = Instant::now() + Duration::from_micros(us);
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

struct Vm {
    vm: VmFd,
    vcpu: VcpuFd,
    // guest memory, mapped for the VM's lifetime
    _mem: *mut u8,
}

/// A vCPU about to run the guest's code in real mode, with CX = `loops` (the guests' `loop`
/// count), runnable at once (an AP of an in-kernel irqchip would wait for INIT/SIPI).
fn create_vcpu(vm: &VmFd, id: u64, loops: u32) -> anyhow::Result<VcpuFd> {
    let vcpu = vm.create_vcpu(id).context("KVM_CREATE_VCPU")?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    regs.rcx = loops as u64;
    vcpu.set_regs(&regs)?;
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .context("KVM_SET_MP_STATE")?;
    // Software-enable the LAPIC (SVR bit 8), as a guest's kernel would: it then accepts the
    // MSIs the irqfd modes inject (kvm:kvm_apic_accept_irq).
    let mut lapic = vcpu.get_lapic().context("KVM_GET_LAPIC")?;
    lapic.regs[0xf1] |= 1;
    vcpu.set_lapic(&lapic).context("KVM_SET_LAPIC")?;
    Ok(vcpu)
}

/// A VM with an in-kernel irqchip and one vCPU about to run `code` in real mode, with CX =
/// `loops` (the pio guests' `loop` count).
fn create_vm(code: &[u8], loops: u32) -> anyhow::Result<Vm> {
    let kvm = Kvm::new().context("open /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    // SAFETY: anonymous private mapping, checked below, never unmapped while the VM lives.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        bail!("mmap guest memory failed");
    }
    let mem = mem as *mut u8;
    // SAFETY: code fits in the fresh mapping.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem, code.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: CODE_ADDR,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region is a valid mapping that outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    let vcpu = create_vcpu(&vm, 0, loops)?;
    Ok(Vm {
        vm,
        vcpu,
        _mem: mem,
    })
}

/// Routing: GSI 24 an MSI to APIC 0, GSI 4 IOAPIC pin 4 (setting routes replaces the default
/// table, so the IOAPIC pin is listed again).
fn set_routes(vm: &VmFd) -> anyhow::Result<()> {
    let mut routing = KvmIrqRouting::new(2).context("routing table")?;
    let e = routing.as_mut_slice();
    e[0] = kvm_irq_routing_entry {
        gsi: MSI_GSI,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e[0].u.msi.address_lo = MSI_ADDR;
    e[0].u.msi.data = MSI_DATA;
    e[1] = kvm_irq_routing_entry {
        gsi: IOAPIC_GSI,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e[1].u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
    e[1].u.irqchip.pin = IOAPIC_GSI;
    vm.set_gsi_routing(&routing).context("KVM_SET_GSI_ROUTING")
}

fn run_pio(vm: &mut Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    let (mut io, mut other) = (0u32, 0u32);
    loop {
        match vm.vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(0x3f8, _) => {
                io += 1;
                spin(a.spin_us);
            }
            VcpuExit::IoOut(0x3f9, _) => break,
            e => {
                other += 1;
                if other > 10 {
                    bail!("unexpected exit {e:?}");
                }
            }
        }
    }
    Ok(serde_json::json!({ "exits": io + 1, "handled": io, "other": other }))
}

fn run_irqfd(vm: &Vm, a: &Args, gsi: u32) -> anyhow::Result<serde_json::Value> {
    set_routes(&vm.vm)?;
    let fd = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    vm.vm.register_irqfd(&fd, gsi).context("KVM_IRQFD")?;
    for _ in 0..a.count {
        fd.write(1).context("write irqfd")?;
        thread::sleep(Duration::from_micros(a.gap_us));
    }
    Ok(serde_json::json!({ "signals": a.count, "gsi": gsi }))
}

fn run_signal_msi(vm: &Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    let msi = kvm_msi {
        address_lo: MSI_ADDR,
        data: MSI_DATA,
        ..Default::default()
    };
    for _ in 0..a.count {
        vm.vm.signal_msi(msi).context("KVM_SIGNAL_MSI")?;
        thread::sleep(Duration::from_micros(a.gap_us));
    }
    Ok(serde_json::json!({ "signals": a.count }))
}

/// The pio guest with port 0x3f8 registered as an ioeventfd (KVM_IOEVENTFD): each `out` should
/// signal the eventfd in the kernel instead of exiting to userspace. Reports both counts.
fn run_ioeventfd(vm: &mut Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    let kick = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    vm.vm
        .register_ioevent(&kick, &IoEventAddress::Pio(0x3f8), NoDatamatch)
        .context("KVM_IOEVENTFD")?;
    let mut exits = 0u32;
    loop {
        match vm.vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(0x3f9, _) => break,
            _ => {
                exits += 1;
                if exits > a.count + 10 {
                    bail!("guest does not finish");
                }
            }
        }
    }
    let kicks = kick.read().unwrap_or(0);
    Ok(serde_json::json!({ "outs": a.count, "kicks": kicks, "exits_to_userspace": exits }))
}

extern "C" fn on_wake(_: libc::c_int) {}

/// SIGUSR1 without SA_RESTART: a KVM_RUN it interrupts returns EINTR.
fn wake_on_sigusr1() {
    // SAFETY: installs a handler that does nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_wake as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: plain syscall.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Every vCPU in its own thread: N io and N mmio exits, then a halt the VMM ends by a signal.
fn run_exits(vm: Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    wake_on_sigusr1();
    let mut vcpus = vec![vm.vcpu];
    for id in 1..a.vcpus {
        vcpus.push(create_vcpu(&vm.vm, id as u64, a.count)?);
    }
    let threads: Vec<_> = vcpus
        .into_iter()
        .map(|mut vcpu| {
            let n = a.count;
            let (tx, rx) = std::sync::mpsc::channel();
            let t = thread::spawn(move || -> anyhow::Result<(u32, u32, u32, VcpuFd)> {
                let (mut io, mut mmio, mut intr) = (0u32, 0u32, 0u32);
                let mut told = false;
                loop {
                    if io == n && mmio == n && !told {
                        // the guest halts next: the VMM will signal this thread
                        tx.send(gettid()).ok();
                        told = true;
                    }
                    match vcpu.run() {
                        Ok(VcpuExit::IoOut(0x3f8, _)) => io += 1,
                        Ok(VcpuExit::MmioWrite(0x8000, _)) => mmio += 1,
                        Ok(e) => bail!("unexpected exit {e:?}"),
                        Err(e) if e.errno() == libc::EINTR && told => {
                            intr += 1;
                            if intr == 2 {
                                return Ok((io, mmio, intr, vcpu));
                            }
                        }
                        Err(e) if e.errno() == libc::EINTR => {}
                        Err(e) => bail!("KVM_RUN: {e}"),
                    }
                }
            });
            (t, rx)
        })
        .collect();
    let (mut io, mut mmio, mut intr) = (0, 0, 0);
    for (t, rx) in threads {
        let tid = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(tid) => tid,
            // The thread ended before its halt (its sender dropped): say why (an unexpected
            // exit, KVM_RUN's error).
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let why = match t.join() {
                    Ok(Err(e)) => format!("{e:#}"),
                    Ok(Ok(_)) => "returned early".into(),
                    Err(_) => "panicked".into(),
                };
                bail!("vCPU did not finish its exits: {why}");
            }
            Err(e) => bail!("vCPU did not finish: {e}"),
        };
        // Signal until the thread returns: a signal that lands before it re-enters KVM_RUN
        // would be taken in userspace.
        while !t.is_finished() {
            // SAFETY: signals a thread of this process.
            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
            thread::sleep(Duration::from_millis(2));
        }
        let (i, m, s, vcpu) = t.join().expect("vCPU thread")?;
        (io, mmio, intr) = (io + i, mmio + m, intr + s);
        // A VMM keeps its vCPU fds open for its life, as QEMU does: the tracer names a vCPU
        // by its fd, and one closed before the hold would leave its exits unnamed.
        std::mem::forget(vcpu);
    }
    let _keep = vm._mem;
    Ok(serde_json::json!({ "vcpus": a.vcpus, "io": io, "mmio": mmio, "intr": intr }))
}

fn run_halt(vm: &mut Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    // The halt ends with kvm_vcpu_wakeup when the signal interrupts KVM_RUN.
    wake_on_sigusr1();
    let tid = gettid();
    let entering = Arc::new(AtomicU32::new(0));
    let returned = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let waker = {
        let (entering, returned, done) = (entering.clone(), returned.clone(), done.clone());
        let (count, spin_us, first_us) = (a.count, a.spin_us, a.first_us);
        thread::spawn(move || {
            for i in 1..=count {
                while entering.load(Ordering::Acquire) < i {
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                    std::hint::spin_loop();
                }
                // spin, not sleep: a sleep overshoots by the timer slack. The first KVM_RUN of
                // a new vCPU takes longer to reach the guest's hlt (--first-us, 20 ms): a
                // signal before it would end KVM_RUN with no halt.
                spin(if i == 1 {
                    spin_us.max(first_us)
                } else {
                    spin_us
                });
                // A signal that lands before the thread is inside KVM_RUN is taken in
                // userspace and lost: signal again if KVM_RUN has not returned 50 ms later.
                while returned.load(Ordering::Acquire) < i && !done.load(Ordering::Acquire) {
                    // SAFETY: signals our own vCPU thread.
                    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
                    let resend = Instant::now() + Duration::from_millis(50);
                    while returned.load(Ordering::Acquire) < i && Instant::now() < resend {
                        std::hint::spin_loop();
                    }
                }
            }
        })
    };
    let (mut woken, mut other) = (0u32, 0u32);
    while woken < a.count {
        entering.fetch_add(1, Ordering::AcqRel);
        match vm.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => {
                woken += 1;
                returned.store(woken, Ordering::Release);
            }
            Err(e) => bail!("KVM_RUN: {e}"),
            Ok(e) => {
                other += 1;
                if other > 10 {
                    bail!("unexpected exit {e:?}");
                }
                // Not a halt: let the waker's count follow.
                entering.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
    done.store(true, Ordering::Release);
    let _ = waker.join();
    Ok(serde_json::json!({ "wakeups": woken, "other": other }))
}

/// Magic at the start of a `udp-send` payload, before its send time.
const STAMP_MAGIC: &[u8; 8] = b"iopathTS";

fn run_udp_send(a: &Args) -> anyhow::Result<serde_json::Value> {
    let socks = (0..a.flows.max(1))
        .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").context("UDP socket"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut sent = 0u32;
    for seq in 0..a.count {
        let sock = &socks[seq as usize % socks.len()];
        let mut payload = [0u8; 24];
        payload[..8].copy_from_slice(STAMP_MAGIC);
        payload[16..20].copy_from_slice(&seq.to_le_bytes());
        payload[8..16].copy_from_slice(&monotonic_ns().to_le_bytes());
        // A full socket buffer or tap queue drops the datagram further on: counted by who reads.
        if sock.send_to(&payload, &a.to).is_ok() {
            sent += 1;
        }
        if a.gap_us > 0 {
            thread::sleep(Duration::from_micros(a.gap_us));
        }
    }
    Ok(serde_json::json!({ "sent": sent }))
}

/// The send time a `udp-send` frame carries: Ethernet, IPv4 (its header length), UDP, payload.
fn send_stamp(frame: &[u8]) -> Option<u64> {
    let ip = frame.get(14..)?;
    if u16::from_be_bytes([frame[12], frame[13]]) != 0x0800 || ip.first()? >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0xf) as usize) * 4;
    if ip.get(9) != Some(&17) {
        return None;
    }
    let payload = ip.get(ihl + 8..)?;
    if payload.get(..8)? != STAMP_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?))
}

/// Opens the existing tap `name` (TUNSETIFF, IFF_TAP | IFF_NO_PI).
fn open_tap(name: &str) -> anyhow::Result<std::fs::File> {
    iopath_tests::net::open_tap(name).with_context(|| format!("TUNSETIFF {name}"))
}

fn run_tap_rx(vm: &Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    use std::{io::Read as _, os::fd::AsRawFd};
    // One file per queue of a multi-queue tap, as QEMU opens one per queue pair.
    let multi = a.queues > 1;
    let mut taps = (0..a.queues.max(1))
        .map(|_| iopath_tests::net::open_tap_queue(&a.tap, multi))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("TUNSETIFF {}", a.tap))?;
    let mut per_queue = vec![0u32; taps.len()];
    let mut last_q = taps.len() - 1;
    set_routes(&vm.vm)?;
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    vm.vm.register_irqfd(&irqfd, MSI_GSI).context("KVM_IRQFD")?;
    // Ready: the tap has a reader (carrier on), the test may send.
    println!("{}", serde_json::json!({ "ready": true }));
    let (mut packets, mut stamped, mut held) = (0u32, Vec::new(), Vec::new());
    // This thread's CPU time per packet, from the end of one packet's work to the next's: the
    // poll's wakeup, the read, the spin, the signal (an independent figure for iopath's
    // backend cost).
    let (mut cpu, mut cpu_last) = (Vec::new(), None::<u64>);
    let mut frame = [0u8; 2048];
    let mut first = true;
    let (mut first_read, mut last_read) = (0u64, 0u64);
    let (mut batch_len, mut batch_nvcsw) = (0u32, 0u64);
    // Once before the reads: a first call's page faults must not block between one.
    thread_nvcsw();
    while packets < a.count {
        let mut pfds: Vec<libc::pollfd> = taps
            .iter()
            .map(|t| libc::pollfd {
                fd: t.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // The first packet may take the sender's start-up; then a gap ends the run.
        let wait_ms = if first {
            30_000
        } else {
            (a.gap_us / 1000).max(1) as i32
        };
        // SAFETY: pollfds of the taps this function owns.
        if unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait_ms) } <= 0 {
            break;
        }
        first = false;
        // One packet of a queue that has one, taking the queues in turn from the last one
        // served: one read, one signal per packet.
        let ready = (0..pfds.len())
            .map(|i| (last_q + 1 + i) % pfds.len())
            .find(|&i| pfds[i].revents & libc::POLLIN != 0);
        let Some(q) = ready else {
            let revents: Vec<_> = pfds.iter().map(|p| p.revents).collect();
            bail!("tap {}: no queue readable ({revents:?})", a.tap);
        };
        last_q = q;
        let n = taps[q].read(&mut frame).context("read tap")?;
        per_queue[q] += 1;
        let read = monotonic_ns();
        let nvcsw = thread_nvcsw();
        if batch_len == 0 || nvcsw != batch_nvcsw {
            (batch_len, batch_nvcsw) = (0, nvcsw);
        }
        batch_len += 1;
        if packets == 0 {
            first_read = read;
        }
        last_read = read;
        packets += 1;
        spin(a.spin_us);
        let before_signal = monotonic_ns();
        if !a.no_signal {
            irqfd.write(1).context("write irqfd")?;
            // The write returns after KVM injected (MSI route: inline).
            held.push((monotonic_ns() - read) as f64 / 1000.0);
            if let Some(sent) = send_stamp(&frame[..n]) {
                stamped.push(before_signal.saturating_sub(sent) as f64 / 1000.0);
            }
        }
        let cpu_now = iopath_tests::thread_cpu_ns();
        if let Some(last) = cpu_last.replace(cpu_now) {
            cpu.push((cpu_now - last) as f64 / 1000.0);
        }
    }
    let p50 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    Ok(serde_json::json!({
        "packets": packets, "per_queue": per_queue, "stamped": stamped.len(), "last_batch": batch_len,
        "first_to_last_us": (last_read - first_read) / 1000,
        "send_to_signal_p50_us": p50(&mut stamped), "read_to_signal_p50_us": p50(&mut held),
        "cpu_per_packet_mean_us": (!cpu.is_empty()).then(|| cpu.iter().sum::<f64>() / cpu.len() as f64),
        "cpu_per_packet_p50_us": p50(&mut cpu),
    }))
}

/// The calling thread's voluntary context switches (task_struct's nvcsw).
fn thread_nvcsw() -> u64 {
    // SAFETY: getrusage fills the zeroed rusage it is given.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru.ru_nvcsw as u64
    }
}

/// Pins the calling thread to CPU `cpu`.
fn pin(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn run_tap_tx(vm: &mut Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    use std::{
        io::{Read as _, Write as _},
        os::fd::AsRawFd,
        sync::atomic::AtomicU64,
    };
    let mut tap = open_tap(&a.tap)?;
    let kick = Arc::new(EventFd::new(0).context("eventfd")?);
    vm.vm
        .register_ioevent(&kick, &IoEventAddress::Pio(0x3f8), NoDatamatch)
        .context("KVM_IOEVENTFD")?;
    // SAFETY: sysconf has no preconditions.
    let cpu = (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) - 1) as usize;
    // The vCPU's entry into the KVM_RUN of its latest kick and its return to userspace after
    // it (CLOCK_MONOTONIC ns): they bracket the guest's notify.
    let entered = Arc::new(AtomicU64::new(0));
    let exited = Arc::new(AtomicU64::new(0));
    let (primed_tx, primed_rx) = std::sync::mpsc::channel::<()>();
    println!("{}", serde_json::json!({ "ready": true }));
    let (n, spin_us) = (a.count, a.spin_us);
    let backend = {
        let (kick, entered, exited) = (kick.clone(), entered.clone(), exited.clone());
        // Its own name, for a second method to tell it from the vCPU thread.
        thread::Builder::new().name("tx-backend".into()).spawn(move || -> anyhow::Result<serde_json::Value> {
            pin(cpu)?;
            let mut pfd = libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // The test's own datagram (a `udp-send` one) starts the kicks, not whatever else
            // the host sends the tap first.
            let mut frame = [0u8; 2048];
            loop {
                // SAFETY: one pollfd, on the tap this thread owns.
                if unsafe { libc::poll(&mut pfd, 1, 30_000) } <= 0 {
                    bail!("no datagram on the tap to start with");
                }
                let n = tap.read(&mut frame).context("read tap")?;
                if send_stamp(&frame[..n]).is_some() {
                    break;
                }
            }
            primed_tx.send(()).ok();
            // Broadcast, from a local address, an experimental EtherType: the bridge floods it.
            let mut out = [0u8; 60];
            out[..6].copy_from_slice(&[0xff; 6]);
            out[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x7e, 0x01]);
            out[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            let (mut woke, mut merged, mut written) = (0u32, 0u64, 0u32);
            let (mut kick_us, mut call_us, mut work_us) = (Vec::new(), Vec::new(), Vec::new());
            let mut run_us = Vec::new();
            let mut taken = 0u64;
            while taken < n as u64 {
                let k = kick.read().context("read ioeventfd")?;
                let awake = monotonic_ns();
                woke += 1;
                taken += k;
                merged += k - 1;
                kick_us.push(awake.saturating_sub(exited.load(Ordering::Acquire)) as f64 / 1e3);
                run_us.push(awake.saturating_sub(entered.load(Ordering::Acquire)) as f64 / 1e3);
                spin(spin_us);
                call_us.push((monotonic_ns() - awake) as f64 / 1e3);
                if tap.write(&out).is_ok() {
                    written += 1;
                }
                work_us.push((monotonic_ns() - awake) as f64 / 1e3);
            }
            let p50 = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied()
            };
            Ok(serde_json::json!({
                "woke": woke, "merged": merged, "written": written, "cpu": cpu,
                "exit_to_awake_p50_us": p50(&mut kick_us), "entry_to_awake_p50_us": p50(&mut run_us),
                "awake_to_write_p50_us": p50(&mut call_us),
                "awake_to_written_p50_us": p50(&mut work_us),
            }))
        }).context("spawn the backend thread")?
    };
    primed_rx
        .recv_timeout(Duration::from_secs(60))
        .context("the backend took no packet off the tap")?;
    // Time for the backend to block on the ioeventfd before the first kick (the wakeup is what
    // is measured).
    thread::sleep(Duration::from_millis(200));
    pin(cpu)?;
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: plain syscall on this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        bail!("SCHED_FIFO: {}", std::io::Error::last_os_error());
    }
    let mut kicks = 0u32;
    loop {
        entered.store(monotonic_ns(), Ordering::Release);
        match vm.vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(0x3fa, _) => {
                exited.store(monotonic_ns(), Ordering::Release);
                kicks += 1;
                spin(a.hold_us);
                thread::sleep(Duration::from_micros(a.gap_us));
            }
            VcpuExit::IoOut(0x3f9, _) => break,
            other => bail!("unexpected exit {other:?}"),
        }
    }
    let back = backend.join().expect("backend thread")?;
    let mut out = serde_json::json!({ "kicks": kicks, "hold_us": a.hold_us });
    out.as_object_mut()
        .unwrap()
        .extend(back.as_object().unwrap().clone());
    Ok(out)
}

/// A backend joining two taps, as two guests' NICs on one host would be joined through a
/// guest that routes: every frame read off one is written to the other, then the irqfd is
/// signalled, as QEMU's userspace backend does per packet. Runs `--hold-ms`, then reports.
fn run_tap_forward(vm: &Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    use std::{
        io::{Read as _, Write as _},
        os::fd::AsRawFd,
    };
    let mut taps = [open_tap(&a.tap)?, open_tap(&a.tap2)?];
    set_routes(&vm.vm)?;
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    vm.vm.register_irqfd(&irqfd, MSI_GSI).context("KVM_IRQFD")?;
    println!("{}", serde_json::json!({ "ready": true }));
    let end = Instant::now() + Duration::from_millis(a.hold_ms);
    let (mut frames, mut lost) = (0u64, 0u64);
    let mut frame = [0u8; 65536];
    while Instant::now() < end {
        let mut pfds = taps.each_ref().map(|t| libc::pollfd {
            fd: t.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two pollfds, on the taps this function owns.
        if unsafe { libc::poll(pfds.as_mut_ptr(), 2, 100) } <= 0 {
            continue;
        }
        for from in 0..2 {
            if pfds[from].revents & libc::POLLIN == 0 {
                continue;
            }
            let n = taps[from].read(&mut frame).context("read tap")?;
            // A full queue on the other tap drops the frame, as a NIC would.
            match taps[1 - from].write(&frame[..n]) {
                Ok(_) => frames += 1,
                Err(_) => lost += 1,
            }
            irqfd.write(1).context("write irqfd")?;
        }
    }
    Ok(serde_json::json!({ "frames": frames, "lost": lost }))
}

/// This thread's CPU time so far, in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn run_blk_backend(vm: &mut Vm, a: &Args) -> anyhow::Result<serde_json::Value> {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    while !matches!(vm.vcpu.run().context("KVM_RUN")?, VcpuExit::IoOut(0x3f9, _)) {}
    set_routes(&vm.vm)?;
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    vm.vm.register_irqfd(&irqfd, MSI_GSI).context("KVM_IRQFD")?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.dev)
        .with_context(|| format!("open {} O_DIRECT", a.dev))?;
    let sync = match a.op.as_str() {
        "read" => None,
        "flush" | "fua" => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT | if a.op == "fua" { libc::O_DSYNC } else { 0 })
                .open(&a.dev)
                .with_context(|| format!("open {} for writing", a.dev))?,
        ),
        other => bail!("--op {other}: read, flush or fua"),
    };
    let layout = std::alloc::Layout::from_size_align(4096, 4096)?;
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: a live 4096-byte allocation, only used here.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 4096) };
    println!("{}", serde_json::json!({ "ready": true }));
    thread::sleep(Duration::from_micros(a.first_us));
    let blocks = 1024u64;
    for i in 0..10 {
        dev.read_exact_at(buf, (i % blocks) * 4096)
            .context("read")?;
        irqfd.write(1).context("write irqfd")?;
    }
    thread::sleep(Duration::from_micros(a.gap_us));
    let (cpu0, t0) = (thread_cpu_ns(), Instant::now());
    let mut syscall_cpu = 0u64;
    for i in 0..u64::from(a.count) {
        spin(a.spin_us);
        let c = thread_cpu_ns();
        match (&sync, a.op.as_str()) {
            (Some(f), "flush") => f.sync_data().context("fdatasync")?,
            (Some(f), _) => f
                .write_all_at(buf, (i % blocks) * 4096)
                .context("O_DSYNC write")?,
            (None, _) => dev
                .read_exact_at(buf, (i % blocks) * 4096)
                .context("read")?,
        }
        irqfd.write(1).context("write irqfd")?;
        syscall_cpu += thread_cpu_ns() - c;
    }
    let (cpu, wall) = (thread_cpu_ns() - cpu0, t0.elapsed());
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    let n = f64::from(a.count.max(1));
    Ok(serde_json::json!({
        "reads": a.count,
        "tid": gettid(),
        "spin_us": a.spin_us,
        "syscall_cpu_us": syscall_cpu as f64 / 1e3 / n,
        "cpu_per_read_us": cpu as f64 / 1e3 / n,
        "wall_per_read_us": wall.as_secs_f64() * 1e6 / n,
    }))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("iopath-testvmm: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let a = parse_args()?;
    if a.mode == "udp-send" {
        println!("{}", run_udp_send(&a)?);
        return Ok(());
    }
    let mut vm = match a.mode.as_str() {
        "halt" => create_vm(GUEST_HALT, 0)?,
        "exits" => create_vm(GUEST_EXITS, a.count)?,
        "tap-tx" => create_vm(GUEST_KICKS, a.count)?,
        "blk-backend" => create_vm(GUEST_PIO, 2)?,
        _ => create_vm(GUEST_PIO, a.count)?,
    };
    let t0 = Instant::now();
    let out = match a.mode.as_str() {
        "exits" => run_exits(vm, &a)?,
        "pio" => run_pio(&mut vm, &a)?,
        "irqfd-msi" => run_irqfd(&vm, &a, MSI_GSI)?,
        "irqfd-gsi" => run_irqfd(&vm, &a, IOAPIC_GSI)?,
        "signal-msi" => run_signal_msi(&vm, &a)?,
        "halt" => run_halt(&mut vm, &a)?,
        "ioeventfd" => run_ioeventfd(&mut vm, &a)?,
        "tap-rx" => run_tap_rx(&vm, &a)?,
        "tap-tx" => run_tap_tx(&mut vm, &a)?,
        "tap-forward" => run_tap_forward(&vm, &a)?,
        "blk-backend" => run_blk_backend(&mut vm, &a)?,
        m => bail!("unknown mode {m}"),
    };
    let mut out = out;
    out["elapsed_us"] = (t0.elapsed().as_micros() as u64).into();
    out["pid"] = std::process::id().into();
    out["vm"] = a.name.clone().into();
    println!("{out}");
    thread::sleep(Duration::from_millis(a.hold_ms));
    Ok(())
}
