//! Turns the raw values of a histogram key into labels: a VMM tgid into a VM name, a dev_t into
//! major:minor and a disk name, an exit reason into the kernel's own name for it. Look-ups are
//! cached and done here, in userspace, never per event in the kernel. Values are raw strings
//! here; `export` escapes them.

use std::{collections::HashMap, fs};

use tracer_common::{
    blk::{Op, dev_major, dev_minor},
    kvm::{
        halt::halt_wait_name,
        signal::{Inject, Signal, split_signal_detail},
        split_exit_detail,
        uexit::{ERRNO_DETAIL, NO_VCPU, VCPU_ID_FLAG},
    },
    maps::{Notice, NoticeKind},
    net::Backend,
    stage::StageId,
};

use crate::{hist::SeriesKey, stages, tracefs::Tracefs};

/// Exit reason names from the kvm_exit tracepoint's print format: `{ N, "NAME" }` pairs of
/// `__print_symbolic`, the first table for VMX (isa 1), the second for SVM.
#[derive(Debug, Default)]
pub struct ExitReasons {
    vmx: HashMap<u32, String>,
    svm: HashMap<u32, String>,
}

impl ExitReasons {
    pub fn from_tracefs(t: &Tracefs) -> Self {
        let path = t.root().join("events/kvm/kvm_exit/format");
        fs::read_to_string(path)
            .map(|f| Self::parse(&f))
            .unwrap_or_default()
    }

    pub fn parse(format: &str) -> Self {
        let Some(fmt) = format.lines().find(|l| l.starts_with("print fmt:")) else {
            return Self::default();
        };
        let mut tables = fmt.split("__print_symbolic(").skip(1).map(parse_symbols);
        ExitReasons {
            vmx: tables.next().unwrap_or_default(),
            svm: tables.next().unwrap_or_default(),
        }
    }

    /// The number of exit reason `name` (a label value), VMX's table or SVM's.
    pub fn number(&self, vmx: bool, name: &str) -> Option<u32> {
        let table = if vmx { &self.vmx } else { &self.svm };
        table.iter().find(|(_, n)| *n == name).map(|(&r, _)| r)
    }

    pub fn name(&self, detail: u32) -> String {
        let (reason, vmx) = split_exit_detail(detail);
        let table = if vmx { &self.vmx } else { &self.svm };
        table
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| format!("unknown_{reason:#x}"))
    }
}

/// `{ 0x040 + 1, "DB excp" }, { 12, "HLT" }, ...` up to the closing parenthesis.
fn parse_symbols(s: &str) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        // a table ends where its __print_symbolic call closes
        if rest[..open].contains(')') {
            break;
        }
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let entry = &rest[open + 1..open + close];
        rest = &rest[open + close + 1..];
        let Some((num, name)) = entry.split_once(',') else {
            continue;
        };
        let value = num
            .split('+')
            .map(|t| parse_num(t.trim()))
            .try_fold(0u32, |a, v| Some(a.wrapping_add(v?)));
        // adjacent literals ("KVM_EXIT_" "IO") are one string
        let name = reason_label(&name.trim().trim_matches('"').replace("\" \"", ""));
        if let Some(v) = value {
            out.entry(v).or_insert(name);
        }
    }
    out
}

/// The label value of a reason name as the kernel prints it (`DB excp` -> `db_excp`).
pub fn reason_label(printed: &str) -> String {
    printed.trim().replace(' ', "_").to_lowercase()
}

fn parse_num(t: &str) -> Option<u32> {
    match t.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    }
}

/// Names of KVM_EXIT_* reasons, from kvm_userspace_exit's print format (`io`, `hlt`, `mmio`).
#[derive(Debug, Default)]
pub struct UexitReasons(HashMap<u32, String>);

impl UexitReasons {
    pub fn from_tracefs(t: &Tracefs) -> Self {
        let path = t.root().join("events/kvm/kvm_userspace_exit/format");
        fs::read_to_string(path)
            .map(|f| Self::parse(&f))
            .unwrap_or_default()
    }

    pub fn parse(format: &str) -> Self {
        let table = format
            .lines()
            .find(|l| l.starts_with("print fmt:"))
            .and_then(|f| f.split("__print_symbolic(").nth(1))
            .map(parse_symbols)
            .unwrap_or_default();
        UexitReasons(
            table
                .into_iter()
                .map(|(k, v)| (k, v.trim_start_matches("kvm_exit_").to_string()))
                .collect(),
        )
    }

    pub fn name(&self, detail: u32) -> String {
        if detail & ERRNO_DETAIL != 0 {
            // KVM_RUN failed: -EINTR is a signal to the vCPU thread, anything else an error
            return match detail & 0xffff {
                4 => "intr".into(),
                e => format!("errno_{e}"),
            };
        }
        self.0
            .get(&detail)
            .cloned()
            .unwrap_or_else(|| format!("unknown_{detail}"))
    }
}

/// The `queue` label of a net stage's sample: the tap queue, empty where it is unknown.
fn queue_name(detail: u32) -> String {
    tracer_common::net::detail_queue(detail).map_or_else(String::new, |q| q.to_string())
}

/// vcpu id of a vCPU file descriptor: KVM names it `anon_inode:kvm-vcpu:N`.
fn vcpu_of_fd(tgid: u32, fd: u32) -> Option<String> {
    if fd == NO_VCPU {
        return None;
    }
    // A function probe read the vCPU's id itself.
    if fd & VCPU_ID_FLAG != 0 {
        return Some((fd & !VCPU_ID_FLAG).to_string());
    }
    let link = fs::read_link(format!("/proc/{tgid}/fd/{fd}")).ok()?;
    link.to_string_lossy()
        .strip_prefix("anon_inode:kvm-vcpu:")
        .map(str::to_string)
}

/// A PCI address (`tracer_common::vfio::pci_key`) as Linux writes it: 0000:00:06.0.
pub fn pci_name(key: u32) -> String {
    format!(
        "{:04x}:{:02x}:{:02x}.{}",
        key >> 16,
        (key >> 8) & 0xff,
        (key >> 3) & 0x1f,
        key & 7
    )
}

/// Label values are capped: a tenant chooses its VM's name.
const MAX_LABEL: usize = 128;

fn capped(mut s: String) -> String {
    if s.len() > MAX_LABEL {
        let mut end = MAX_LABEL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The `vm` of a VMM that exited before it could be named: one series for all of them.
pub const UNKNOWN_VM: &str = "unknown";

/// VM name of a VMM process: QEMU's `-name guest=NAME,...` or `-name NAME,...`, else the libvirt
/// machine scope of its cgroup, else Firecracker's `--id`, else `unnamed-COMM` (one series for
/// all unnamed VMs of a program, never a pid); `unknown` when the process is gone.
pub fn vm_name_of(tgid: u32) -> String {
    let Ok(cmdline) = fs::read(format!("/proc/{tgid}/cmdline")) else {
        return UNKNOWN_VM.into();
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if let Some(name) = qemu_name(&args).or_else(|| flag_value(&args, b"--id")) {
        return capped(name);
    }
    if let Ok(cg) = fs::read_to_string(format!("/proc/{tgid}/cgroup"))
        && let Some(name) = libvirt_scope_name(&cg)
    {
        return capped(name);
    }
    match fs::read_to_string(format!("/proc/{tgid}/comm")) {
        Ok(comm) => capped(format!("unnamed-{}", comm.trim_end())),
        Err(_) => UNKNOWN_VM.into(),
    }
}

/// The value after `flag` (`--id NAME` or `--id=NAME`).
fn flag_value(args: &[&[u8]], flag: &[u8]) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        let v = if *a == flag {
            *args.get(i + 1)?
        } else {
            a.strip_prefix(flag)?.strip_prefix(b"=")?
        };
        (!v.is_empty()).then(|| String::from_utf8_lossy(v).into_owned())
    })
}

/// QEMU's option syntax: `,` separates options, `,,` is a comma inside a value.
fn qemu_options(v: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("never empty").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

fn qemu_name(args: &[&[u8]]) -> Option<String> {
    let i = args.iter().position(|a| *a == b"-name")?;
    let v = String::from_utf8_lossy(args.get(i + 1)?).into_owned();
    let opts = qemu_options(&v);
    // `guest=NAME` anywhere, or a leading bare NAME (QEMU's implied key)
    let name = opts
        .iter()
        .find_map(|o| o.strip_prefix("guest="))
        .or_else(|| {
            opts.first()
                .filter(|o| !o.contains('='))
                .map(String::as_str)
        })?;
    (!name.is_empty()).then(|| name.to_string())
}

/// `.../machine.slice/machine-qemu\x2d3\x2dweb01.scope/...` -> `web01`.
fn libvirt_scope_name(cgroup: &str) -> Option<String> {
    let scope = cgroup
        .split('/')
        .find(|p| p.starts_with("machine-qemu") && p.ends_with(".scope"))?;
    let unescaped = scope.trim_end_matches(".scope").replace("\\x2d", "-");
    let rest = unescaped.strip_prefix("machine-qemu-")?;
    let (_id, name) = rest.split_once('-')?;
    Some(name.to_string())
}

/// Disk name of a block device from sysfs (`/sys/dev/block/M:m` links to `.../block/NAME`).
fn disk_name_of(dev: u32) -> String {
    let link = format!("/sys/dev/block/{}:{}", dev_major(dev), dev_minor(dev));
    fs::read_link(link)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// Resolves and caches label values. VMs and vCPUs are named when the kernel tells of them
/// (`notice`), while the VMM lives; whatever was not named then is named at the next read.
#[derive(Debug, Default)]
pub struct Labeler {
    reasons: ExitReasons,
    uexit_reasons: UexitReasons,
    vms: HashMap<u32, String>,
    /// (tgid, fd) -> vcpu id
    vcpus: HashMap<(u32, u32), String>,
    disks: HashMap<u32, String>,
    /// ifindex -> network device name
    netdevs: HashMap<u32, String>,
}

impl Labeler {
    pub fn new(tracefs: &Tracefs) -> Self {
        Labeler {
            reasons: ExitReasons::from_tracefs(tracefs),
            uexit_reasons: UexitReasons::from_tracefs(tracefs),
            ..Default::default()
        }
    }

    /// A new VM or vCPU, told by the kernel. A VM is named afresh: its tgid may be a pid reused
    /// since a VM that had it.
    pub fn notice(&mut self, n: &Notice) {
        if n.kind == NoticeKind::VmCreated as u32 {
            self.vms.insert(n.tgid, vm_name_of(n.tgid));
            self.vcpus.retain(|(t, _), _| *t != n.tgid);
        } else if n.kind == NoticeKind::VcpuRun as u32 {
            self.vm(n.tgid);
            if let Some(v) = vcpu_of_fd(n.tgid, n.fd) {
                self.vcpus.insert((n.tgid, n.fd), v);
            }
        }
    }

    /// Forgets what was cached for a VMM that exited (its pid may be reused).
    pub fn forget_vm(&mut self, tgid: u32) {
        self.vms.remove(&tgid);
        self.vcpus.retain(|(t, _), _| *t != tgid);
    }

    /// Names of the devices the net stages follow, as `netdevs` found them; a name no longer
    /// found is kept while a series still uses its ifindex (`in_use`).
    pub fn netdevs(
        &mut self,
        devs: &std::collections::BTreeMap<u32, crate::netdevs::NetDev>,
        in_use: &std::collections::BTreeSet<u32>,
    ) {
        self.netdevs
            .retain(|i, _| devs.contains_key(i) || in_use.contains(i));
        for (i, d) in devs {
            self.netdevs.insert(*i, d.name.clone());
        }
    }

    fn netdev(&self, ifindex: u32) -> String {
        match self.netdevs.get(&ifindex) {
            Some(n) => n.clone(),
            None if ifindex == 0 => String::new(),
            None => format!("ifindex{ifindex}"),
        }
    }

    pub fn forget_netdev(&mut self, ifindex: u32) {
        self.netdevs.remove(&ifindex);
    }

    pub fn forget_disk(&mut self, dev: u32) {
        self.disks.remove(&dev);
    }

    /// vcpu label of a vCPU fd. Only a resolved id is cached: a thread seen before its fd could
    /// be read is tried again at the next read.
    fn vcpu_fd(&mut self, tgid: u32, fd: u32) -> String {
        if let Some(v) = self.vcpus.get(&(tgid, fd)) {
            return v.clone();
        }
        match vcpu_of_fd(tgid, fd) {
            Some(v) => {
                self.vcpus.insert((tgid, fd), v.clone());
                v
            }
            None => "unknown".into(),
        }
    }

    pub fn vm(&mut self, tgid: u32) -> String {
        if tgid == 0 {
            return String::new();
        }
        self.vms
            .entry(tgid)
            .or_insert_with(|| vm_name_of(tgid))
            .clone()
    }

    /// A network backend's labels (`vm`, `backend`, `tap`), as its stages' series have them
    /// (without their `queue`: a backend's cost is its threads', whichever queues they read).
    pub fn backend(&mut self, vm: u32, backend: u32, tap: u32) -> Vec<(&'static str, String)> {
        vec![
            ("vm", self.vm(vm)),
            ("backend", Backend::from_u32(backend).name().into()),
            ("tap", self.netdev(tap)),
        ]
    }

    /// A disk backend's labels (`vm`, `device`, `disk`), as its VM's block series have them.
    pub fn disk_backend(&mut self, vm: u32, dev: u32) -> Vec<(&'static str, String)> {
        vec![
            ("vm", self.vm(vm)),
            ("device", format!("{}:{}", dev_major(dev), dev_minor(dev))),
            ("disk", self.disk(dev)),
        ]
    }

    fn disk(&mut self, dev: u32) -> String {
        self.disks
            .entry(dev)
            .or_insert_with(|| disk_name_of(dev))
            .clone()
    }

    /// Labels of a series, in the stage table's order, without stage and path.
    pub fn labels(&mut self, k: &SeriesKey) -> Vec<(&'static str, String)> {
        let values: Vec<String> = match k.stage {
            StageId::BlkDevice
            | StageId::BlkKickToSubmit
            | StageId::BlkCompleteToIrq
            | StageId::BlkSync => {
                let disk = self.disk(k.obj);
                vec![
                    self.vm(k.vm),
                    format!("{}:{}", dev_major(k.obj), dev_minor(k.obj)),
                    disk,
                    Op::from_u32(k.detail).name().into(),
                ]
            }
            StageId::KvmExit => vec![
                self.vm(k.vm),
                k.obj.to_string(),
                self.reasons.name(k.detail),
            ],
            StageId::KvmSignalToInject => {
                let (signal, inject) = split_signal_detail(k.detail);
                vec![
                    self.vm(k.vm),
                    match signal {
                        Signal::Irqfd => "irqfd",
                        Signal::Ioctl => "ioctl",
                    }
                    .into(),
                    match inject {
                        Inject::Inline => "inline",
                        Inject::Kworker => "kworker",
                    }
                    .into(),
                ]
            }
            // device: the passthrough device whose handler injected (none: empty)
            StageId::KvmInjectToEntry => vec![
                self.vm(k.vm),
                k.obj.to_string(),
                if k.detail == 0 {
                    String::new()
                } else {
                    pci_name(k.detail)
                },
            ],
            StageId::KvmHaltWakeup => vec![
                self.vm(k.vm),
                self.vcpu_fd(k.vm, k.obj),
                halt_wait_name(k.detail).into(),
            ],
            StageId::KvmUserspaceExit => vec![
                self.vm(k.vm),
                self.vcpu_fd(k.vm, k.obj),
                self.uexit_reasons.name(k.detail),
            ],
            StageId::NetRxHostStack | StageId::NetTxHostStack => {
                vec![self.netdev(k.obj), self.netdev(k.detail)]
            }
            StageId::NetTxKick => vec![
                self.vm(k.vm),
                Backend::from_u32(k.detail).name().into(),
                queue_name(k.detail),
            ],
            StageId::NetRxBackendQueue
            | StageId::NetRxBackendToIrq
            | StageId::NetTxBackendToWire
            | StageId::SchedBackendWakeup => vec![
                self.vm(k.vm),
                Backend::from_u32(k.detail).name().into(),
                self.netdev(k.obj),
                queue_name(k.detail),
            ],
            StageId::VfioHandler | StageId::VfioHandlerToInject => {
                vec![self.vm(k.vm), pci_name(k.obj), k.detail.to_string()]
            }
        };
        let names = stages::stage(k.stage).labels;
        debug_assert_eq!(names.len(), values.len());
        names.iter().copied().zip(values).collect()
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::kvm::{ISA_VMX, exit_detail};

    use super::*;

    const KVM_EXIT_FMT: &str = r#"print fmt: "vcpu %u reason %s%s%s rip 0x%lx", REC->vcpu_id, (REC->isa == 1) ? __print_symbolic(REC->exit_reason & 0xffff, { 0, "EXCEPTION_NMI" }, { 12, "HLT" }, { 30, "IO_INSTRUCTION" }) : __print_symbolic(REC->exit_reason, { 0x040 + 1, "DB excp" }, { 0x07b, "io" }, { 0x80000000, "FAILED_VMENTRY" }), REC->guest_rip"#;

    #[test]
    fn exit_reason_names_come_from_the_print_format() {
        let r = ExitReasons::parse(KVM_EXIT_FMT);
        assert_eq!(r.name(exit_detail(30, ISA_VMX)), "io_instruction");
        assert_eq!(r.name(exit_detail(12, ISA_VMX)), "hlt");
        assert_eq!(r.name(exit_detail(0x7b, 2)), "io");
        assert_eq!(r.name(exit_detail(0x41, 2)), "db_excp");
        assert_eq!(r.name(exit_detail(0x8000_0000, 2)), "failed_vmentry");
        assert_eq!(r.name(exit_detail(99, ISA_VMX)), "unknown_0x63");
    }

    #[test]
    fn userspace_exit_reason_names() {
        let f = r#"print fmt: "reason %s (%d)", REC->errno < 0 ? (REC->errno == -4 ? "restart" : "error") : __print_symbolic(REC->reason, { 0, "KVM_EXIT_" "UNKNOWN" }, { 2, "KVM_EXIT_" "IO" }, { 5, "KVM_EXIT_" "HLT" }, { 6, "KVM_EXIT_" "MMIO" }), REC->errno < 0 ? -REC->errno : REC->reason"#;
        let r = UexitReasons::parse(f);
        assert_eq!(r.name(2), "io");
        assert_eq!(r.name(6), "mmio");
        assert_eq!(r.name(0), "unknown");
        assert_eq!(r.name(99), "unknown_99");
        assert_eq!(
            r.name(tracer_common::kvm::uexit::uexit_detail(0, -4)),
            "intr"
        );
        assert_eq!(
            r.name(tracer_common::kvm::uexit::uexit_detail(0, -14)),
            "errno_14"
        );
    }

    #[test]
    fn vm_names() {
        let a = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        let args = a(&[
            "qemu-system-x86_64",
            "-name",
            "guest=web01,debug-threads=on",
            "-m",
            "1G",
        ]);
        assert_eq!(
            qemu_name(&args.iter().map(Vec::as_slice).collect::<Vec<_>>()),
            Some("web01".into())
        );
        let args = a(&["qemu", "-name", "lab,debug-threads=on"]);
        assert_eq!(
            qemu_name(&args.iter().map(Vec::as_slice).collect::<Vec<_>>()),
            Some("lab".into())
        );
        let args = a(&["qemu", "-m", "1G"]);
        assert_eq!(
            qemu_name(&args.iter().map(Vec::as_slice).collect::<Vec<_>>()),
            None
        );
        // ",," is a comma inside the value; guest= may come after other options
        let args = a(&["qemu", "-name", "guest=a,,b,,,debug-threads=on"]);
        assert_eq!(
            qemu_name(&args.iter().map(Vec::as_slice).collect::<Vec<_>>()),
            Some("a,b,".into())
        );
        let args = a(&["qemu", "-name", "debug-threads=on,guest=late"]);
        assert_eq!(
            qemu_name(&args.iter().map(Vec::as_slice).collect::<Vec<_>>()),
            Some("late".into())
        );
        let args = a(&["qemu", "-name", "guest=bad\"name\nx"]);
        assert_eq!(
            qemu_name(&args.iter().map(Vec::as_slice).collect::<Vec<_>>()),
            Some("bad\"name\nx".into())
        );
        let args = a(&["firecracker", "--api-sock", "/s", "--id", "fc1"]);
        assert_eq!(
            flag_value(&args.iter().map(Vec::as_slice).collect::<Vec<_>>(), b"--id"),
            Some("fc1".into())
        );
        assert_eq!(capped("x".repeat(300)).len(), MAX_LABEL);
        assert_eq!(capped("é".repeat(100)).len(), 128);
        let cg = "0::/machine.slice/machine-qemu\\x2d3\\x2dweb\\x2d01.scope/libvirt/vcpu0\n";
        assert_eq!(libvirt_scope_name(cg), Some("web-01".into()));
        assert_eq!(libvirt_scope_name("0::/user.slice\n"), None);
        assert_eq!(vm_name_of(u32::MAX - 1), UNKNOWN_VM);
        // a live process with no VM name: its program, never its pid
        let me = vm_name_of(std::process::id());
        assert!(
            me.starts_with("unnamed-") && !me.contains(&std::process::id().to_string()),
            "{me}"
        );
    }
}
