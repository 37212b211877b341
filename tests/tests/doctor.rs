//! `iopath doctor` on this kernel: what attaches and how.

use iopath_tests::{Daemon, iopath, leftover_programs, loaded_programs, require_root};

/// One stage's report in `iopath doctor --json`.
fn stage_in(doctor: &serde_json::Value, name: &str) -> serde_json::Value {
    doctor["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no {name} in {doctor}"))
        .clone()
}

/// `iopath doctor --json`'s report; the run must have succeeded.
fn report(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("doctor --json is JSON")
}

#[test]
fn doctor_attaches_blk_device_and_kvm_exit_here() {
    require_root();
    let out = iopath(&["doctor", "--json"]);
    let v = report(&out);
    let stage = |name: &str| stage_in(&v, name);
    // kvm_exit/kvm_entry never fire under this machine's KVM-PVM, but they exist and attach.
    let kvm = stage("kvm.exit");
    assert_eq!(kvm["attached"], true, "{kvm}");
    assert!(
        kvm["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "tracepoint/kvm/kvm_exit")
    );
    let blk = stage("blk.device");
    assert_eq!(blk["attached"], true, "{blk}");
    // This kernel has BTF and tp_btf: the preferred implementation is the one chosen.
    assert_eq!(blk["attach"], "tp_btf");

    // The VMM's disk stages attach from tracepoints (kvm_mmio, kvm_msi_set_irq, the block
    // events), and doctor says how their disks' notifies and vectors are told apart.
    for name in ["blk.kick_to_submit", "blk.complete_to_irq"] {
        let s = stage(name);
        assert_eq!(s["attached"], true, "{s}");
    }
    assert!(
        v["disk_signals"]
            .as_str()
            .is_some_and(|s| s.starts_with("observed pairing")),
        "{v}"
    );

    let table = iopath(&["doctor"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("kvm.exit") && l.contains("attached")),
        "{text}"
    );
    assert!(
        text.contains("which notify and vector are a disk's: observed pairing"),
        "{text}"
    );
    assert!(
        leftover_programs().is_empty(),
        "doctor left programs loaded: {:?}",
        leftover_programs()
    );
}

#[test]
fn doctor_selects_one_stage() {
    require_root();
    let out = iopath(&["doctor", "--json", "--stages", "kvm.exit"]);
    let v = report(&out);
    assert_eq!(v["stages"].as_array().unwrap().len(), 1);
}

#[test]
fn one_program_per_event_whatever_the_stages_sharing_it() {
    require_root();
    // Every stage, and families mixed: kvm_entry is shared by two stages, the injection
    // events by two, sys_enter_ioctl by five.
    for families in [None, Some("raw_tp,tracepoint,syscall")] {
        // Nothing of iopath's loaded before (doctor, earlier tests): what is loaded is serve's.
        assert!(leftover_programs().is_empty());
        // Every event attaches here only with the system call stand-ins (no fentry, no kprobes),
        // but the module functions that have no stand-in.
        // The opt-in stage too: every stage.
        let mut args = vec!["--syscall-tracepoints", "--stages", "+sched.backend_wakeup"];
        if let Some(f) = families {
            args.extend(["--families", f]);
        }
        let d = Daemon::start(&args);
        let loaded = loaded_programs();
        for e in iopath::stages::events() {
            let mine: Vec<&String> = loaded
                .iter()
                .filter(|p| {
                    e.families.iter().any(|&f| {
                        e.programs(f).iter().any(|name| {
                            *p == name || (p.len() == 15 && name.starts_with(p.as_str()))
                        })
                    })
                })
                .collect();
            // One family's programs: one, or a stand-in's entry and return.
            let want = e
                .families
                .iter()
                .map(|&f| e.programs(f).len())
                .find(|&n| n == mine.len());
            // A module function with neither fentry nor kprobes here (vhost's) has none; where
            // it attaches, one family's programs.
            let function_only = e.families.iter().all(|f| {
                matches!(
                    f,
                    iopath::stages::Family::FEntry | iopath::stages::Family::KProbe
                )
            });
            // An event of a module this kernel does not have loaded (LIO's
            // target_sequencer_start): neither its tracepoint nor its function is here.
            let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
            let absent = !e.category.is_empty()
                && ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
                    .iter()
                    .all(|t| {
                        !std::path::Path::new(&format!("{t}/events/{}/{}", e.category, e.name))
                            .exists()
                    })
                && e.functions.iter().all(|f| {
                    !kallsyms
                        .lines()
                        .any(|l| l.split_whitespace().nth(2) == Some(*f))
                });
            assert!(
                ((function_only || absent) && mine.is_empty())
                    || (!mine.is_empty() && want.is_some()),
                "{}: {mine:?} ({families:?})",
                e.name
            );
        }
        assert!(d.stop().success());
    }
}

#[test]
fn without_cap_syslog_the_signal_stage_says_why() {
    require_root();
    // kallsyms shows addresses only to CAP_SYSLOG once kptr_restrict is 1; this machine runs
    // with 0, so the test sets 1 for the run and restores what was there.
    let path = "/proc/sys/kernel/kptr_restrict";
    let was = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, "1").unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-syslog", "--inh-caps=-syslog", "--"])
        .arg(iopath_tests::iopath_bin())
        .args([
            "doctor",
            "--json",
            "--stages",
            "kvm.signal_to_inject,kvm.userspace_exit",
        ])
        .output()
        .expect("setpriv (util-linux)");
    std::fs::write(path, was.trim()).unwrap();
    let v = report(&out);
    let stage = |name: &str| stage_in(&v, name);
    let signal = stage("kvm.signal_to_inject");
    assert_eq!(signal["attached"], false, "{signal}");
    assert!(
        signal["skipped"].to_string().contains("needs CAP_SYSLOG"),
        "{signal}"
    );
    assert_eq!(
        stage("kvm.userspace_exit")["attached"],
        true,
        "the rest still runs"
    );
    assert!(leftover_programs().is_empty());
}

/// An opt-in stage: left out by default and doctor says how to add it; `+NAME` adds it to the
/// default set (the others stay); and where vhost's functions cannot attach (this kernel: no
/// kprobes, fentry refused), the transmit stages say what the tracepoints still give.
#[test]
fn an_opt_in_stage_is_added_with_plus_and_missing_stages_say_what_is_left() {
    require_root();
    let v = report(&iopath(&["doctor", "--json"]));
    let wake = stage_in(&v, "sched.backend_wakeup");
    assert_eq!(wake["attached"], false, "{wake}");
    assert!(
        wake["skipped"][0]
            .as_str()
            .unwrap()
            .contains("off by default (a program on every wakeup and context switch of the host): --stages +sched.backend_wakeup"),
        "{wake}"
    );
    let v = report(&iopath(&[
        "doctor",
        "--json",
        "--stages",
        "+sched.backend_wakeup",
    ]));
    let wake = stage_in(&v, "sched.backend_wakeup");
    assert_eq!(wake["attached"], true, "{wake}");
    // Its optional notify exits, with what they add (said once, after them).
    let points: Vec<&str> = wake["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        points.iter().any(|p| p.ends_with("kvm_mmio (optional)")),
        "{wake}"
    );
    assert!(
        points
            .last()
            .is_some_and(|p| p.starts_with("optional events add: starts net.tx.kick")),
        "{wake}"
    );
    assert_eq!(
        stage_in(&v, "blk.device")["attached"],
        true,
        "the default set stays"
    );
    let kick = stage_in(&v, "net.tx.kick");
    if kick["attached"] == false {
        assert!(
            kick["skipped"].as_array().unwrap().iter().any(|s| s
                .as_str()
                .unwrap()
                .starts_with("without them: kicks of QEMU's backend")),
            "{kick}"
        );
    }
    assert!(leftover_programs().is_empty());
}

/// Whether this host posts assigned devices' interrupts: said in the table and in the JSON, the
/// same way, with what was read. Neither machine the suite runs on posts: this one has KVM-PVM
/// (no kvm_intel or kvm_amd), the distro-kernel VM kvm_amd (with AVIC off, or on with only
/// QEMU's emulated Intel IOMMU); the rules' other cases are unit-tested in
/// tracer-user/src/posted.rs on trees written by hand.
#[test]
fn doctor_says_whether_assigned_devices_interrupts_are_posted() {
    require_root();
    let v = report(&iopath(&["doctor", "--json", "--stages", "vfio.handler"]));
    let p = &v["posted_interrupts"];
    let out = iopath(&["doctor", "--stages", "vfio.handler"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("posted interrupts for assigned devices: "))
        .unwrap_or_else(|| panic!("no posted-interrupt line in:\n{text}"));
    let why = p["why"].as_str().unwrap();
    assert_eq!(
        line,
        format!(
            "posted interrupts for assigned devices: {} ({why})",
            if p["posted"] == true { "yes" } else { "no" }
        )
    );
    let param = |m: &str, n: &str| {
        std::fs::read_to_string(format!("/sys/module/{m}/parameters/{n}"))
            .ok()
            .map(|s| s.trim().to_string())
    };
    match (param("kvm_intel", "enable_apicv"), param("kvm_amd", "avic")) {
        (None, None) => assert_eq!(why, "neither kvm_intel nor kvm_amd is loaded"),
        (None, Some(avic)) if avic == "N" || avic == "0" => {
            assert_eq!(why, format!("kvm_amd avic={avic}"))
        }
        (None, Some(avic)) => {
            // AVIC on: QEMU's emulated IOMMU is an Intel one, no AMD IOMMU to post
            assert!(
                why.starts_with(&format!("kvm_amd avic={avic}, but")),
                "{why}"
            );
        }
        (Some(apicv), _) => assert!(
            why.starts_with(&format!("kvm_intel enable_apicv={apicv}")),
            "{why}"
        ),
    }
}
