//! The raw_tp programs of KVM events, driven in this process, which is itself a VMM on
//! /dev/kvm: real irqfd writes for what fires on this machine, BPF_PROG_TEST_RUN for kvm_entry
//! (never fires under KVM-PVM) and for runs on another CPU (an IPI: interrupt context). The
//! test checks the kernel maps each run fills.
//!
//! kvm_entry's argument is a `struct kvm_vcpu *` the program reads `vcpu_id` through. No
//! vCPU's kernel address is known here, so the test passes `__start_notes - offsetof(vcpu_id)`:
//! real kernel memory (the kernel's ELF notes, kallsyms has their address) whose first word
//! /sys/kernel/notes shows, so the program reads a real kernel u32 whose value is known.

use std::{
    os::fd::AsFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, Ordering},
    },
    thread,
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use iopath::{
    attach::{Options, Tracer},
    btf::KernelBtf,
    hist::{SeriesKey, Snapshot},
    offsets::kernel_address,
    stages::Family,
    sys::test_run_raw_tp,
};
use iopath_tests::{Why, monotonic_ns, require_root, skip};
use kvm_bindings::{KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry};
use kvm_ioctls::Kvm;
use tracer_common::{
    kvm::{
        ExitStart, ISA_VMX, exit_detail,
        inject::{PendingInject, VcpuKey},
        signal::SignalStart,
    },
    stage::StageId,
};
use vmm_sys_util::eventfd::EventFd;

/// A histogram series of the snapshot.
fn series(stage: StageId, detail: u32, obj: u32, vm: u32) -> SeriesKey {
    SeriesKey {
        stage,
        detail,
        obj,
        vm,
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of_val(&set), &set), 0);
    }
}

fn gettid() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// kvm_entry's argument for a vCPU whose id the test knows: `__start_notes - offsetof(vcpu_id)`
/// makes the program read the kernel notes' first word (shown by /sys/kernel/notes) as the id.
/// Returns (argument, id), or skips the test (no /dev/kvm, no such symbol).
fn known_vcpu(test: &str) -> Option<(u64, u32)> {
    require_root();
    if !Path::new("/dev/kvm").exists() {
        skip(test, Why::Machine, "no /dev/kvm on this machine");
        return None;
    }
    let Some(notes) = kernel_address("__start_notes") else {
        skip(test, Why::Machine, "__start_notes not in /proc/kallsyms");
        return None;
    };
    let id = u32::from_le_bytes(
        std::fs::read("/sys/kernel/notes").expect("/sys/kernel/notes")[..4]
            .try_into()
            .unwrap(),
    );
    let off = KernelBtf::from_sys_fs()
        .unwrap()
        .member_offset("kvm_vcpu", "vcpu_id")
        .expect("kvm_vcpu.vcpu_id in BTF") as u64;
    Some((notes - off, id))
}

/// `stages` attached in this process with raw_tp programs where an event has them (test runs
/// drive raw_tp programs only).
fn tracer(stages: &[&str]) -> Tracer {
    let stages: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
    Tracer::start(&Options {
        tracefs: Path::new("/sys/kernel/tracing"),
        stages: &stages,
        families: &[Family::RawTp, Family::Tracepoint, Family::Syscall],
        event_families: &[],
        hist_entries: 4096,
        start_entries: 1024,
        strict: true,
        bpf_stats: false,
        blk_cut: 0,
        // the daemon's default: the programs as they run on a host, sampling included
        timeline_every: 64,
        syscall_tracepoints: true,
    })
    .expect("attach")
}

fn run(t: &Tracer, program: &str, args: &[u64], cpu: Option<u32>) {
    let p = t
        .ebpf
        .program(program)
        .unwrap_or_else(|| panic!("{program}"));
    let fd = p.fd().unwrap_or_else(|_| panic!("{program} is not loaded"));
    test_run_raw_tp(fd.as_fd(), args, cpu).unwrap_or_else(|e| panic!("test run {program}: {e}"));
}

fn count(snap: &Snapshot, stage: StageId, reason: &str) -> u64 {
    snap.counters[&(stage, reason)]
}

fn samples(snap: &Snapshot, key: SeriesKey) -> u64 {
    snap.series.get(&key).map_or(0, |s| s.count())
}

#[test]
fn raw_tp_programs_of_kvm_events_fill_their_maps() {
    const TEST: &str = "raw_tp_programs_of_kvm_events_fill_their_maps";
    let Some((vcpu_arg, first_note_word)) = known_vcpu(TEST) else {
        return;
    };
    pin_to(0);
    let mut t = tracer(&["kvm.exit", "kvm.signal_to_inject", "kvm.inject_to_entry"]);
    let me = std::process::id();
    let tid = gettid();

    // This process becomes a VMM: KVM_CREATE_VM puts it in the kernel's VMM set.
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    // Software-enable the LAPIC (SVR bit 8) so that it accepts fixed MSIs.
    let mut lapic = vcpu.get_lapic().unwrap();
    lapic.regs[0xf1] |= 1;
    vcpu.set_lapic(&lapic).unwrap();
    let mut routing = KvmIrqRouting::new(1).unwrap();
    let e = &mut routing.as_mut_slice()[0];
    *e = kvm_irq_routing_entry {
        gsi: 24,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = 0xfee0_0000;
    e.u.msi.data = 0x30;
    vm.set_gsi_routing(&routing).unwrap();
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&irqfd, 24).unwrap();
    let vmms: BpfHashMap<&MapData, u32, u32> =
        BpfHashMap::try_from(t.ebpf.map("VMM_TGIDS").unwrap()).unwrap();
    assert!(
        vmms.get(&me, 0).is_ok(),
        "KVM_CREATE_VM marked this process"
    );

    // 1. A real irqfd write (task context): the signal is measured, the CPU marked for this
    // VM, and the real accept of vCPU 0 leaves an interrupt pending for it. Right after, a
    // test run of the accept for APIC id = the note word, in the same task and CPU within the
    // window, does not take the mark: its arguments are a heap copy, which the programs take
    // for interrupt context (a LAPIC timer's accept), and the mark is task context's.
    let before = Snapshot::read(&t.ebpf).unwrap();
    irqfd.write(1).unwrap();
    run(
        &t,
        "kvm_apic_accept_irq_raw",
        &[first_note_word as u64, 0, 0, 0x30],
        None,
    );
    let snap = Snapshot::read(&t.ebpf).unwrap();
    let signal = series(StageId::KvmSignalToInject, 0, 0, me); // irqfd, inline
    assert_eq!(
        samples(&snap, signal) - samples(&before, signal),
        1,
        "one signal"
    );
    let pending: BpfHashMap<&MapData, VcpuKey, PendingInject> =
        BpfHashMap::try_from(t.ebpf.map("INJ_PENDING").unwrap()).unwrap();
    let keys: Vec<VcpuKey> = pending.keys().flatten().collect();
    let v0 = VcpuKey { vm: me, vcpu: 0 };
    let vn = VcpuKey {
        vm: me,
        vcpu: first_note_word,
    };
    assert!(keys.contains(&v0), "the real accept: {keys:?}");
    assert!(!keys.contains(&vn), "the test-run accept: {keys:?}");
    let unmatched = |s: &Snapshot| {
        s.counters
            .get(&(StageId::KvmInjectToEntry, "accept_unmatched"))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(unmatched(&snap) - unmatched(&before), 1, "another context");
    // What an accept of it would have left, for the entry below to end: as if it had been
    // injected in the handler of the passthrough device 0000:00:06.0 (its label at entry).
    let mut pending: BpfHashMap<&mut MapData, VcpuKey, PendingInject> =
        BpfHashMap::try_from(t.ebpf.map_mut("INJ_PENDING").unwrap()).unwrap();
    let nic = tracer_common::vfio::pci_key(0, 0, 6, 0);
    let p = PendingInject {
        ts_ns: monotonic_ns() - 3_000,
        device: nic,
        _pad: 0,
    };
    pending.insert(vn, p, 0).unwrap();

    // 2. kvm_entry of vCPU `first_note_word` in this thread: ends the exit started below and
    // the pending interrupt.
    let exit_start = ExitStart {
        ts_ns: monotonic_ns() - 5_000,
        reason: exit_detail(30, ISA_VMX),
        vcpu: first_note_word,
        vm: me,
        _pad: 0,
    };
    let mut exits: BpfHashMap<&mut MapData, u32, ExitStart> =
        BpfHashMap::try_from(t.ebpf.map_mut("KVM_EXIT_START").unwrap()).unwrap();
    exits.insert(tid, exit_start, 0).unwrap();
    run(&t, "kvm_entry_raw", &[vcpu_arg, 0], None);
    let snap2 = Snapshot::read(&t.ebpf).unwrap();
    let exit = series(
        StageId::KvmExit,
        exit_detail(30, ISA_VMX),
        first_note_word,
        me,
    );
    let inject = series(StageId::KvmInjectToEntry, nic, first_note_word, me);
    assert_eq!(samples(&snap2, exit), 1, "the exit ended at the entry");
    assert!(
        snap2.series[&exit].sum_ns >= 5_000,
        "{:?}",
        snap2.series[&exit].sum_ns
    );
    assert_eq!(
        samples(&snap2, inject),
        1,
        "the pending interrupt ended at the entry"
    );
    let pending: BpfHashMap<&MapData, VcpuKey, PendingInject> =
        BpfHashMap::try_from(t.ebpf.map("INJ_PENDING").unwrap()).unwrap();
    assert!(pending.get(&vn, 0).is_err(), "consumed");

    // 3. A start another VM's thread left under this thread id is stale, not a sample.
    let mut exits: BpfHashMap<&mut MapData, u32, ExitStart> =
        BpfHashMap::try_from(t.ebpf.map_mut("KVM_EXIT_START").unwrap()).unwrap();
    exits
        .insert(
            tid,
            ExitStart {
                vm: 1,
                ..exit_start
            },
            0,
        )
        .unwrap();
    run(&t, "kvm_entry_raw", &[vcpu_arg, 0], None);
    // 4. An unreadable vCPU pointer: the entry is counted as a read error for the inject stage.
    run(&t, "kvm_entry_raw", &[0, 0], None);
    // 5. kvm_set_irq: lowering a line is no injection; raising one from a test run (a heap
    // copy of the arguments: not task context) names no VM.
    run(&t, "kvm_set_irq_raw", &[4, 0, 0], None);
    let snap3 = Snapshot::read(&t.ebpf).unwrap();
    run(&t, "kvm_set_irq_raw", &[4, 1, 0], None);
    let snap4 = Snapshot::read(&t.ebpf).unwrap();
    assert_eq!(samples(&snap3, exit), 1, "no sample from the stale start");
    assert_eq!(
        count(&snap3, StageId::KvmExit, "stale") - count(&snap2, StageId::KvmExit, "stale"),
        1
    );
    assert_eq!(
        count(&snap3, StageId::KvmInjectToEntry, "read_error")
            - count(&snap2, StageId::KvmInjectToEntry, "read_error"),
        1
    );
    assert_eq!(
        count(&snap3, StageId::KvmInjectToEntry, "unknown_vm")
            - count(&snap2, StageId::KvmInjectToEntry, "unknown_vm"),
        0,
        "level 0 does not inject"
    );
    assert_eq!(
        count(&snap4, StageId::KvmInjectToEntry, "unknown_vm")
            - count(&snap3, StageId::KvmInjectToEntry, "unknown_vm"),
        1,
        "level 1 injects"
    );

    // 6. An injection run from an IPI on the other CPU while a VMM thread with a signal in
    // flight runs there. A test run's arguments are a heap copy, which the programs take for
    // interrupt context whatever the CPU: this checks what follows from it (the thread keeps
    // its start, no VM is named), not the stack check itself, which step 1's real write did.
    let spin = Arc::new(AtomicBool::new(true));
    let helper_tid = Arc::new(AtomicI32::new(0));
    let helper = {
        let (spin, helper_tid) = (spin.clone(), helper_tid.clone());
        thread::spawn(move || {
            pin_to(1);
            helper_tid.store(gettid() as i32, Ordering::Release);
            while spin.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
        })
    };
    while helper_tid.load(Ordering::Acquire) == 0 {
        thread::sleep(Duration::from_millis(1));
    }
    let helper_tid = helper_tid.load(Ordering::Acquire) as u32;
    let mut sig: BpfHashMap<&mut MapData, u32, SignalStart> =
        BpfHashMap::try_from(t.ebpf.map_mut("SIG_START").unwrap()).unwrap();
    let start = SignalStart {
        ts_ns: monotonic_ns(),
        vm: me,
        detail: 0,
    };
    sig.insert(helper_tid, start, 0).unwrap();
    thread::sleep(Duration::from_millis(20));
    run(&t, "kvm_msi_set_irq_raw", &[0xfee0_0000, 0x30], Some(1));
    let sig: BpfHashMap<&MapData, u32, SignalStart> =
        BpfHashMap::try_from(t.ebpf.map("SIG_START").unwrap()).unwrap();
    assert_eq!(
        sig.get(&helper_tid, 0).ok(),
        Some(start),
        "the interrupted thread keeps its start"
    );
    spin.store(false, Ordering::Release);
    helper.join().unwrap();
    let snap5 = Snapshot::read(&t.ebpf).unwrap();
    assert_eq!(
        samples(&snap5, signal),
        samples(&snap, signal),
        "no signal sample"
    );
    assert_eq!(
        count(&snap5, StageId::KvmInjectToEntry, "unknown_vm")
            - count(&snap4, StageId::KvmInjectToEntry, "unknown_vm"),
        1
    );
    drop(vcpu);
    drop(t);
}

#[test]
fn a_stage_that_is_off_does_no_work_in_a_shared_program() {
    const TEST: &str = "a_stage_that_is_off_does_no_work_in_a_shared_program";
    let Some((vcpu_arg, vcpu)) = known_vcpu(TEST) else {
        return;
    };
    // kvm.exit alone: its kvm_entry program is shared with kvm.inject_to_entry, which is off.
    let mut t = tracer(&["kvm.exit"]);
    assert!(
        t.ebpf
            .program("kvm_apic_accept_irq_raw")
            .unwrap()
            .fd()
            .is_err(),
        "not loaded"
    );
    let me = std::process::id();
    // An interrupt pending for the vCPU kvm_entry will name: were kvm.inject_to_entry's work
    // done, the entry would take it.
    let key = VcpuKey { vm: me, vcpu };
    let mut pending: BpfHashMap<&mut MapData, VcpuKey, PendingInject> =
        BpfHashMap::try_from(t.ebpf.map_mut("INJ_PENDING").unwrap()).unwrap();
    let p = PendingInject {
        ts_ns: monotonic_ns(),
        device: 0,
        _pad: 0,
    };
    pending.insert(key, p, 0).unwrap();
    let mut exits: BpfHashMap<&mut MapData, u32, ExitStart> =
        BpfHashMap::try_from(t.ebpf.map_mut("KVM_EXIT_START").unwrap()).unwrap();
    let start = ExitStart {
        ts_ns: monotonic_ns(),
        reason: exit_detail(12, ISA_VMX),
        vcpu,
        vm: me,
        _pad: 0,
    };
    exits.insert(gettid(), start, 0).unwrap();
    run(&t, "kvm_entry_raw", &[vcpu_arg, 0], None);
    let snap = Snapshot::read(&t.ebpf).unwrap();
    let exit = series(StageId::KvmExit, exit_detail(12, ISA_VMX), vcpu, me);
    assert_eq!(samples(&snap, exit), 1, "kvm.exit did its work");
    let inject = series(StageId::KvmInjectToEntry, 0, vcpu, me);
    assert_eq!(samples(&snap, inject), 0, "kvm.inject_to_entry did not");
    let pending: BpfHashMap<&MapData, VcpuKey, PendingInject> =
        BpfHashMap::try_from(t.ebpf.map("INJ_PENDING").unwrap()).unwrap();
    assert!(
        pending.get(&key, 0).is_ok(),
        "kvm.inject_to_entry's map untouched"
    );
}
