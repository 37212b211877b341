//! The distro-kernel VM ("L1"): Debian's kernel under QEMU TCG (`-cpu max` has SVM, so
//! `kvm_amd` loads and nested guests run), this machine's `/` shared read-only over 9p under
//! a tmpfs overlay, so binaries built here run there at the same path. Commands go through
//! a read-write 9p share (see xtask/vm/agent.sh). The VM is stopped and its folder removed
//! when the handle drops: on success, on error, and after Ctrl-C, which the harness catches.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{images::Images, root};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C, SIGTERM and SIGHUP set a flag the waits below check, so the VM is stopped and its
/// files removed instead of the harness dying with QEMU left running.
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub struct L1 {
    qemu: Child,
    dir: PathBuf,
    next: u32,
    /// What the last command printed before it failed to finish (L1 hung or died).
    partial: String,
}

/// L1 stopped answering (its agent's heartbeat is older than [`HANG`]).
#[derive(Debug)]
pub struct Hung;

impl std::fmt::Display for Hung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L1 stopped answering for {} s", HANG.as_secs())
    }
}

impl std::error::Error for Hung {}

const HANG: Duration = Duration::from_secs(60);

/// L1's memory, and how long it may take to boot (10-15 s measured, more with a build running).
const MEMORY: &str = "3G";
const BOOT_BUDGET: Duration = Duration::from_secs(180);

/// PCI slots of L1's devices for the passthrough tests (L1 sees them at 0000:00:SLOT.0; the
/// tests name them so, see tests/vm/l2.sh).
const L1_NIC: &str = "0x5";
const L1_E1000E: &str = "0x6";
const L1_NVME: &str = "0x7";

impl L1 {
    pub fn boot(img: &Images) -> anyhow::Result<L1> {
        let agent = root().join("xtask/vm/agent.sh");
        for p in [&agent, &img.modules] {
            let s = p.to_string_lossy();
            if s.contains(char::is_whitespace) || s.contains(['"', '\'']) {
                bail!("{s}: L1's kernel command line takes paths without spaces or quotes");
            }
        }
        let dir = crate::images::cache().join(format!("run-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let xchg = dir.join("xchg");
        fs::create_dir_all(&xchg)?;
        // A real disk for /var/tmp in L1: loop devices with direct I/O need one.
        let scratch = dir.join("scratch.img");
        fs::File::create(&scratch)?.set_len(4 << 30)?;
        // A 64 MiB disk for the NVMe that L1 passes through to a nested guest.
        let nvme = dir.join("nvme.img");
        fs::File::create(&nvme)?.set_len(64 << 20)?;
        // The IOMMU on, identity-mapped for L1's own devices (the 9p shares stay fast).
        let append = format!(
            "console=ttyS0 panic=-1 mitigations=off intel_iommu=on iommu=pt \
             iopath.agent={} iopath.modules={}",
            agent.display(),
            img.modules.display()
        );
        let t0 = Instant::now();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-name",
            "iopath-l1,debug-threads=on",
            "-nodefaults",
            "-no-reboot",
        ])
        .args([
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2",
        ])
        // First, before the PCI devices it translates: VFIO in L1 needs an IOMMU with
        // interrupt remapping.
        .args(["-device", "intel-iommu,intremap=on,caching-mode=on"])
        .args(["-m", MEMORY, "-display", "none"])
        .args(["-bios", "/usr/share/qemu/qboot.rom"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        // The human monitor, for where a hung L1's vCPUs are (`qemu_registers`).
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("monitor.sock").display()
        ))
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initramfs)
        .arg("-append")
        .arg(append)
        .args([
            "-fsdev",
            "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=root,mount_tag=root",
        ])
        .arg("-fsdev")
        .arg(format!(
            "local,id=xchg,path={},security_model=none,multidevs=remap",
            xchg.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=xchg,mount_tag=xchg"])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,cache=unsafe",
            scratch.display()
        ))
        // For the passthrough tests (tests/vm/l2.sh L2_VFIO): an e1000e and an NVMe that L1
        // leaves unbound (no udev there) until a test gives them to vfio-pci, and a virtio-net
        // NIC on the same QEMU-internal hub as the e1000e, which reaches no host network:
        // L1's end of the passed-through NIC's link.
        .args([
            "-netdev",
            "hubport,id=hpa,hubid=0",
            "-device",
            &format!("virtio-net-pci,netdev=hpa,mac=52:54:00:00:01:01,addr={L1_NIC}"),
            "-netdev",
            "hubport,id=hpb,hubid=0",
            "-device",
            &format!("e1000e,netdev=hpb,mac=52:54:00:00:01:02,addr={L1_E1000E}"),
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=nv,format=raw,cache=unsafe",
            nvme.display()
        ))
        .args([
            "-device",
            &format!("nvme,drive=nv,serial=iopath1,addr={L1_NVME}"),
        ])
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("qemu.out"))?)
        .stderr(fs::File::create(dir.join("qemu.err"))?)
        // Own process group: Ctrl-C reaches the harness, which stops QEMU itself.
        .process_group(0);
        // SAFETY: prctl is async-signal-safe; QEMU dies with the harness, even on SIGKILL.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let qemu = cmd.spawn().context("cannot start qemu-system-x86_64")?;
        let mut l1 = L1 {
            qemu,
            dir,
            next: 0,
            partial: String::new(),
        };
        eprintln!("vm: booting {} under QEMU TCG", img.kver);
        let ready = xchg.join("ready");
        while !ready.exists() {
            l1.check_alive()?;
            if t0.elapsed() > BOOT_BUDGET {
                bail!(
                    "L1 not ready after {} s; console: {}",
                    BOOT_BUDGET.as_secs(),
                    l1.console_tail()
                );
            }
            sleep(Duration::from_millis(100));
        }
        eprintln!(
            "vm: L1 ready after {:.1} s ({})",
            t0.elapsed().as_secs_f64(),
            fs::read_to_string(&ready)?.trim()
        );
        Ok(l1)
    }

    /// What the last command printed before it failed to finish.
    pub fn partial(&self) -> &str {
        &self.partial
    }

    /// True when QEMU has exited (L1 powered off or crashed).
    pub fn died(&mut self) -> bool {
        !matches!(self.qemu.try_wait(), Ok(None))
    }

    /// The exchange folder: L1's /run/iopath.
    pub fn xchg(&self) -> PathBuf {
        self.dir.join("xchg")
    }

    /// QEMU's threads as seen from this host, for a hung L1: each one's name, state and CPU time
    /// over one second (a vCPU spinning at 100% against all of them asleep tells a guest
    /// loop from a deadlock in QEMU).
    pub fn qemu_threads(&self) -> String {
        let pid = self.qemu.id();
        // (tid, name, state, user + system ticks: 1/100 s)
        let cpu = || -> Vec<(String, String, String, u64)> {
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                return Vec::new();
            };
            tasks
                .flatten()
                .filter_map(|t| {
                    let stat = fs::read_to_string(t.path().join("stat")).ok()?;
                    // comm is in parentheses and may hold spaces: the fields follow the last ')'.
                    let (head, rest) = stat.rsplit_once(')')?;
                    let comm = head.split_once('(')?.1.to_string();
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                    let tid = t.file_name().to_string_lossy().into_owned();
                    Some((tid, comm, f.first()?.to_string(), ticks))
                })
                .collect()
        };
        let before = cpu();
        sleep(Duration::from_secs(1));
        let after = cpu();
        after
            .iter()
            .map(|(tid, comm, state, t)| {
                let was = before.iter().find(|b| &b.0 == tid).map_or(*t, |b| b.3);
                format!("{comm} {state} {}%", t.saturating_sub(was))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Where each vCPU is, from QEMU's monitor (`info registers -a`): its RIP, privilege level
    /// and halted state, and its CR3 (an L2 guest's when it runs one), for a hung L1.
    pub fn qemu_registers(&self) -> String {
        use std::os::unix::net::UnixStream;
        let Ok(mut s) = UnixStream::connect(self.dir.join("monitor.sock")) else {
            return "(no monitor)".into();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        if s.write_all(b"info registers -a\n").is_err() {
            return "(monitor: write failed)".into();
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        // Until the monitor has nothing more for 3 s.
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&out);
        text.lines()
            .filter(|l| l.starts_with("CPU#") || l.starts_with("RIP=") || l.starts_with("CR0="))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// The last lines of L1's serial console, on one line, after the kernel's first alarms
    /// (a stall or lockup report's head, which a long stack trace pushes out of the tail).
    pub fn console_tail(&self) -> String {
        let c = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = c.lines().collect();
        let alarms: Vec<&str> = lines
            .iter()
            .filter(|l| {
                // Alarm texts only: a boot prints "rcu:" and "watchdog:" lines of its own.
                [
                    "BUG:",
                    "detected stall",
                    "soft lockup",
                    "hard LOCKUP",
                    "blocked for more than",
                    "Oops",
                    "Kernel panic",
                    "general protection fault",
                ]
                .iter()
                .any(|a| l.contains(a))
            })
            .take(5)
            .copied()
            .collect();
        let tail = lines[lines.len().saturating_sub(15)..].join(" | ");
        if alarms.is_empty() {
            tail
        } else {
            format!("{} | ... | {tail}", alarms.join(" | "))
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if interrupted() {
            bail!("interrupted");
        }
        // The agent touches `alive` every 2 s; nested SVM under TCG can wedge the whole VM.
        let beat = fs::metadata(self.xchg().join("alive")).and_then(|m| m.modified());
        if let Ok(t) = beat
            && t.elapsed().unwrap_or_default() > HANG
        {
            return Err(Hung.into());
        }
        if let Some(st) = self.qemu.try_wait()? {
            bail!(
                "L1 stopped ({st}): {} {}",
                fs::read_to_string(self.dir.join("qemu.err"))
                    .unwrap_or_default()
                    .trim(),
                self.console_tail()
            );
        }
        Ok(())
    }

    /// Runs a bash script in L1 and returns its exit code and output; with `echo`, the output
    /// is also copied to stdout as it comes.
    pub fn exec(
        &mut self,
        script: &str,
        timeout: Duration,
        echo: bool,
    ) -> anyhow::Result<(i32, String)> {
        self.next += 1;
        let id = self.next;
        let x = self.xchg();
        let staged = x.join(format!(".cmd.{id}"));
        fs::write(&staged, script)?;
        fs::rename(&staged, x.join(format!("cmd.{id}")))?;
        let (out, rc) = (x.join(format!("out.{id}")), x.join(format!("rc.{id}")));
        let t0 = Instant::now();
        let mut seen = 0u64;
        let mut text = Vec::new();
        loop {
            let done = rc.exists();
            if let Ok(mut f) = fs::File::open(&out) {
                f.seek(SeekFrom::Start(seen))?;
                let mut more = Vec::new();
                f.read_to_end(&mut more)?;
                seen += more.len() as u64;
                if echo {
                    std::io::stdout().write_all(&more)?;
                    std::io::stdout().flush()?;
                }
                text.extend_from_slice(&more);
            }
            if done {
                break;
            }
            if let Err(e) = self.check_alive() {
                self.partial = String::from_utf8_lossy(&text).into_owned();
                return Err(e);
            }
            if t0.elapsed() > timeout {
                self.partial = String::from_utf8_lossy(&text).into_owned();
                bail!("command in L1 timed out after {} s", timeout.as_secs());
            }
            sleep(Duration::from_millis(100));
        }
        let code = fs::read_to_string(&rc)?.trim().parse().unwrap_or(-1);
        for f in [out, rc, x.join(format!("run.{id}"))] {
            let _ = fs::remove_file(f);
        }
        Ok((code, String::from_utf8_lossy(&text).into_owned()))
    }

    fn stop(&mut self) {
        if matches!(self.qemu.try_wait(), Ok(None)) {
            // Clean poweroff through the agent, then the hard way.
            let _ = fs::write(self.xchg().join("poweroff"), "");
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if !matches!(self.qemu.try_wait(), Ok(None)) {
                    break;
                }
                sleep(Duration::from_millis(100));
            }
            if matches!(self.qemu.try_wait(), Ok(None)) {
                let _ = self.qemu.kill();
                let _ = self.qemu.wait();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for L1 {
    fn drop(&mut self) {
        self.stop();
        eprintln!("vm: L1 stopped");
    }
}

/// Removes what an earlier harness killed with SIGKILL left (its QEMU died with it).
pub fn remove_stale_runs(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("run-")
            .or_else(|| name.strip_prefix("tmp-").and_then(|r| r.rsplit('-').next()))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
