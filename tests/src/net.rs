//! A KVM host's network topology for the net stages, and the test VMM as a tap's backend: used
//! by `tests/net.rs` and by `cargo xtask bench`. Only link-local addresses, only to the network
//! namespace it creates; IPv6 is off on its links so that nothing but the datagrams sent crosses
//! the tap.

use std::{
    io::BufRead as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl_off_ipv6(ns: Option<&str>, dev: &str) {
    let key = format!("net.ipv6.conf.{dev}.disable_ipv6=1");
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "sysctl", "-qw", &key]);
            c
        }
        None => {
            let mut c = Command::new("sysctl");
            c.args(["-qw", &key]);
            c
        }
    };
    // Without IPv6 in the kernel there is nothing to turn off.
    let _ = c.status();
}

/// The topology, removed on drop: namespace `ns` holds `peer` (169.254.77.1 for
/// [`Topology::new`]), whose other end `uplink` is on bridge `bridge` with tap `tap`.
pub struct Topology {
    pub ns: String,
    pub bridge: String,
    pub tap: String,
    pub uplink: String,
    pub peer: String,
}

/// The guest's side of [`Topology::new`]: its address and MAC, which the peer knows for good.
pub const GUEST_IP: &str = "169.254.77.2";
pub const GUEST_MAC: &str = "02:00:00:00:77:02";

impl Topology {
    /// The peer at 169.254.77.1, which knows the guest's address for good: no ARP crosses the
    /// tap.
    pub fn new(tag: &str) -> Topology {
        Topology::build(
            tag,
            0,
            "169.254.77.1",
            None,
            Some((GUEST_IP, GUEST_MAC)),
            false,
        )
    }

    /// As [`Topology::new`], with a multi-queue tap (a guest NIC of several queue pairs: its
    /// backend opens each queue with [`open_tap_queue`]).
    pub fn new_multi_queue(tag: &str) -> Topology {
        Topology::build(
            tag,
            0,
            "169.254.77.1",
            None,
            Some((GUEST_IP, GUEST_MAC)),
            true,
        )
    }

    /// Two topologies whose taps a backend joins (`tap-forward`): the first's peer is
    /// 169.254.77.1, the second's is 169.254.77.2 with [`GUEST_MAC`]: one link through both
    /// bridges, ARP and all.
    pub fn pair(tag: &str) -> (Topology, Topology) {
        (
            Topology::build(tag, 1, "169.254.77.1", None, None, false),
            Topology::build(tag, 2, GUEST_IP, Some(GUEST_MAC), None, false),
        )
    }

    /// `n` tells apart the devices of topologies one process builds.
    fn build(
        tag: &str,
        n: u8,
        peer_ip: &str,
        peer_mac: Option<&str>,
        neigh: Option<(&str, &str)>,
        multi_queue: bool,
    ) -> Topology {
        let id = std::process::id() % 100_000;
        // Built first: a failed step below leaves what it made to Drop.
        let t = Topology {
            ns: format!("iopath-{tag}{n}-{id}"),
            bridge: format!("iopbr{id}{n}"),
            tap: format!("ioptap{id}{n}"),
            uplink: format!("iopvh{id}{n}"),
            peer: format!("iopvp{id}{n}"),
        };
        let peer = t.peer.clone();
        ip(&["netns", "add", &t.ns]);
        ip(&[
            "link", "add", &t.uplink, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &t.ns]);
        ip(&["link", "add", &t.bridge, "type", "bridge"]);
        let mut tap = vec!["tuntap", "add", "dev", &t.tap, "mode", "tap"];
        if multi_queue {
            tap.push("multi_queue");
        }
        ip(&tap);
        for dev in [&t.bridge, &t.uplink, &t.tap] {
            sysctl_off_ipv6(None, dev);
        }
        sysctl_off_ipv6(Some(&t.ns), &peer);
        ip(&["link", "set", &t.uplink, "master", &t.bridge]);
        ip(&["link", "set", &t.tap, "master", &t.bridge]);
        for dev in [&t.bridge, &t.uplink, &t.tap] {
            ip(&["link", "set", dev, "up"]);
        }
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &t.ns, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        if let Some(mac) = peer_mac {
            exec(&["link", "set", &peer, "address", mac]);
        }
        exec(&["addr", "add", &format!("{peer_ip}/24"), "dev", &peer]);
        exec(&["link", "set", &peer, "up"]);
        exec(&["link", "set", "lo", "up"]);
        if let Some((ip, mac)) = neigh {
            exec(&[
                "neigh",
                "add",
                ip,
                "lladdr",
                mac,
                "dev",
                &peer,
                "nud",
                "permanent",
            ]);
        }
        t
    }

    /// Waits (bounded) until the bridge forwards to the tap (it needs a reader for carrier).
    pub fn wait_forwarding(&self) {
        let state = format!("/sys/class/net/{}/brport/state", self.tap);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::fs::read_to_string(&state).is_ok_and(|s| s.trim() == "3") {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        panic!("bridge port {} never forwarded", self.tap);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for dev in [&self.tap, &self.uplink, &self.bridge] {
            let _ = Command::new("ip").args(["link", "del", dev]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// The test VMM reading the tap, started and ready; killed on drop.
pub struct TapBackend(Child, std::io::BufReader<std::process::ChildStdout>);

impl TapBackend {
    /// `vmm`: the test VMM's binary ([`crate::testvmm_bin`] from a test).
    pub fn start(
        vmm: &Path,
        name: &str,
        tap: &str,
        count: u32,
        d_us: u64,
        extra: &[&str],
    ) -> TapBackend {
        let (count, d_us) = (count.to_string(), d_us.to_string());
        let mut args = vec![
            "tap-rx",
            "--tap",
            tap,
            "--count",
            &count,
            "--spin-us",
            &d_us,
        ];
        // the read that ends the run waits this long for a packet
        args.extend(["--gap-us", "1000000"]);
        // last: the caller's own settings win
        args.extend(extra);
        TapBackend::spawn(vmm, name, &args)
    }

    /// The test VMM as VM `name` with `args` (a mode that prints `ready` first).
    pub fn spawn(vmm: &Path, name: &str, args: &[&str]) -> TapBackend {
        let mut child = Command::new(vmm)
            .args(["-name", &format!("guest={name}")])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start test VMM");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains("ready"), "test VMM: {line:?}");
        TapBackend(child, out)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn report(mut self) -> serde_json::Value {
        let mut line = String::new();
        self.1.read_line(&mut line).unwrap();
        let _ = self.0.wait();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("test VMM report: {line:?}"))
    }
}

impl Drop for TapBackend {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn send(vmm: &Path, ns: &str, count: u32, gap_us: u64) {
    send_flows(vmm, ns, count, gap_us, 1);
}

/// As [`send`], from `flows` source ports in turn (flows a multi-queue tap spreads).
pub fn send_flows(vmm: &Path, ns: &str, count: u32, gap_us: u64, flows: u32) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(vmm)
        .args([
            "udp-send",
            "--to",
            "169.254.77.2:9",
            "--count",
            &count.to_string(),
        ])
        .args(["--gap-us", &gap_us.to_string()])
        .args(["--flows", &flows.to_string()])
        .output()
        .expect("udp-send");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True when bpftrace is installed; else skips `test` as a setup failure (`cargo xtask setup`
/// installs it), saying so.
pub fn have_bpftrace(test: &str) -> bool {
    let ok = crate::have("bpftrace");
    if !ok {
        crate::skip(
            test,
            crate::Why::Setup,
            "bpftrace not installed (cargo xtask setup installs it)",
        );
    }
    ok
}

/// A bpftrace program started and attached (its `BEGIN` prints `ready`), until
/// [`Bpftrace::stop`] or [`NetCounter::counts`]; killed on drop: a failed assertion must not
/// leave it attached.
pub struct Bpftrace {
    bt: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// What bpftrace said on stderr: why, when it printed nothing.
    errors: std::sync::mpsc::Receiver<String>,
    /// The ids of bpftrace's programs.
    progs: Vec<u64>,
}

/// What a [`Bpftrace`] printed, and the runs of its programs the kernel skipped, nested in
/// another program (`missed`: counted by newer kernels, not by 6.1).
pub struct Printed {
    pub lines: Vec<String>,
    pub errors: Vec<String>,
    pub missed: u64,
}

impl Bpftrace {
    /// Starts `script`, which must print `ready` in its BEGIN block; waits up to 60 s for it.
    pub fn start(script: &str) -> Bpftrace {
        let known: Vec<u64> = crate::bpf_progs().into_iter().map(|p| p.id).collect();
        let mut bt = Command::new("bpftrace")
            .args(["-e", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bpftrace");
        let out = std::io::BufReader::new(bt.stdout.take().unwrap());
        let err = std::io::BufReader::new(bt.stderr.take().unwrap());
        let (etx, errors) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                if etx.send(l).is_err() {
                    break;
                }
            }
        });
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut b = Bpftrace {
            bt,
            lines,
            errors,
            progs: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match b.lines.recv_timeout(left) {
                Ok(l) if l.contains("ready") => break,
                Ok(_) => {}
                Err(_) => {
                    let said: Vec<String> = b.errors.try_iter().collect();
                    panic!("bpftrace did not attach within 60 s: {said:?}")
                }
            }
        }
        b.progs = crate::bpf_progs()
            .into_iter()
            .map(|p| p.id)
            .filter(|id| !known.contains(id))
            .collect();
        b
    }

    /// The runs of bpftrace's programs the kernel skipped so far, nested in another program.
    fn missed(&self) -> u64 {
        crate::bpf_progs()
            .into_iter()
            .filter(|p| self.progs.contains(&p.id))
            .map(|p| p.recursion_misses)
            .sum()
    }

    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.bt.try_wait() {
            let said: Vec<String> = self.errors.try_iter().collect();
            panic!("bpftrace exited before the window's end ({status}): {said:?}");
        }
    }

    /// Stops bpftrace (SIGINT: it detaches, runs `END`, prints its maps) and returns all it
    /// printed after `ready`: for scripts that print events as they come.
    pub fn stop(mut self) -> Printed {
        let missed = self.missed();
        self.check_running();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.bt.id() as i32, libc::SIGINT) };
        // Under emulation, detaching and printing once took more than 30 s (CI: a round's
        // counts came back empty, with nothing said): wait longer, and say so if it never ends.
        let waited = Instant::now();
        if crate::exit_within(&mut self.bt, Duration::from_secs(120)).is_none() {
            let stacks = crate::thread_stacks(self.bt.id());
            let said: Vec<String> = self.errors.try_iter().collect();
            panic!(
                "bpftrace did not exit within {:?} of SIGINT, so its output is lost: {said:?}; \
                 its threads' kernel stacks: {stacks}",
                waited.elapsed()
            );
        }
        // bpftrace is gone: the reader threads forward what it printed, then their channels
        // close.
        Printed {
            lines: self.lines.iter().collect(),
            errors: self.errors.iter().collect(),
            missed,
        }
    }

    /// Has bpftrace print its maps now (SIGUSR1), its programs still attached, and returns
    /// the lines up to [`SENTINEL`]'s, which it prints last (maps in name order: the script's
    /// `BEGIN` sets it); then drops it. Not [`Bpftrace::stop`]: bpftrace detaches before it
    /// prints at exit, and that exit once took over 120 s in the distro-kernel VM and over 60 s
    /// on this machine (CI), which lost the counts.
    pub fn maps(mut self) -> Printed {
        self.check_running();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.bt.id() as i32, libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(60);
        // What it printed since `ready`, then its maps.
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(SENTINEL) => break,
                Ok(l) => lines.push(l),
                Err(_) => {
                    let said: Vec<String> = self.errors.try_iter().collect();
                    if let Ok(Some(status)) = self.bt.try_wait() {
                        panic!("bpftrace exited ({status}) before it printed its maps: {said:?}");
                    }
                    let stacks = crate::thread_stacks(self.bt.id());
                    panic!(
                        "bpftrace did not print its maps within 60 s of SIGUSR1: {said:?}; \
                         its threads' kernel stacks: {stacks}"
                    );
                }
            }
        }
        // Its programs' misses up to the print, as its counts.
        let missed = self.missed();
        Printed {
            lines,
            errors: self.errors.try_iter().collect(),
            missed,
        }
    }
}

/// The map a script's `BEGIN` sets (`@zzzz_end = 1`) for [`Bpftrace::maps`]: named to sort
/// after the others.
const SENTINEL: &str = "@zzzz_end: 1";

impl Drop for Bpftrace {
    fn drop(&mut self) {
        crate::reap(&mut self.bt, "bpftrace");
    }
}

/// The bounding events of the net stages counted by bpftrace (a second method), from start to
/// [`NetCounter::counts`]: receives on the uplink (`rx`), transmits to the tap (`xmit`), the
/// consumes and drops of the skbs sent there (`consume`, `dropped`: by address, as bpftrace users
/// write it), the MSI injections of the threads `msi_filter` (a bpftrace predicate) selects
/// (`msi`), and the other way receives on the tap (`tap_rx`) and transmits on the uplink
/// (`up_xmit`); `extra` adds probes of the caller's (vhost's functions, say); `missed`: the runs
/// of its programs the kernel skipped, nested in another program.
pub struct NetCounter(Bpftrace);

impl NetCounter {
    pub fn start(uplink: &str, tap: &str, msi_filter: &str, extra: &str) -> NetCounter {
        let script = format!(
            r#"BEGIN {{ @zzzz_end = 1; printf("ready\n"); }}
tracepoint:net:netif_receive_skb /str(args->name) == "{uplink}"/ {{ @rx = count(); }}
tracepoint:net:netif_receive_skb /str(args->name) == "{tap}"/ {{ @tap_rx = count(); }}
tracepoint:net:net_dev_start_xmit /str(args->name) == "{uplink}"/ {{ @up_xmit = count(); }}
tracepoint:net:net_dev_start_xmit /str(args->name) == "{tap}"/ {{
  @xmit = count(); @queued[args->skbaddr] = 1;
}}
tracepoint:skb:consume_skb /@queued[args->skbaddr]/ {{
  @consume = count(); delete(@queued[args->skbaddr]);
}}
tracepoint:skb:kfree_skb /@queued[args->skbaddr]/ {{
  @dropped = count(); delete(@queued[args->skbaddr]);
}}
tracepoint:kvm:kvm_msi_set_irq /{msi_filter}/ {{ @msi = count(); }}
{extra}
"#
        );
        NetCounter(Bpftrace::start(&script))
    }

    /// Reads bpftrace's counts (its programs still attached), stops it, and returns them by
    /// name.
    pub fn counts(self) -> NetCounts {
        let p = self.0.maps();
        let mut counts: Vec<(String, u64)> = p
            .lines
            .iter()
            .filter_map(|l| {
                let (name, n) = l.strip_prefix('@')?.split_once(": ")?;
                // `@queued[skb]`: the skbs sent to the tap and not yet freed.
                if name.contains('[') {
                    return None;
                }
                Some((name.to_string(), n.trim().parse().ok()?))
            })
            .collect();
        assert!(
            !counts.is_empty() || p.errors.iter().all(|l| l.contains("RLIMIT_MEMLOCK")),
            "bpftrace printed no counts and said {:?}",
            p.errors
        );
        counts.push(("missed".into(), p.missed));
        NetCounts(counts)
    }
}

/// What an [`NetCounter`] counted, by name (0 for a name it never printed: no such event).
#[derive(Debug)]
pub struct NetCounts(pub Vec<(String, u64)>);

impl NetCounts {
    pub fn of(&self, name: &str) -> u64 {
        self.0.iter().find(|(n, _)| n == name).map_or(0, |c| c.1)
    }
}

/// Attaches to tap `name` as its guest's side (a VMM's backend): frames read are what the host
/// sent the guest, frames written are the guest's.
pub fn open_tap(name: &str) -> std::io::Result<std::fs::File> {
    open_tap_queue(name, false)
}

/// As [`open_tap`]; on a multi-queue tap (`multi_queue`), each call attaches its next queue,
/// as QEMU does for each queue pair of the guest's NIC.
pub fn open_tap_queue(name: &str, multi_queue: bool) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | if multi_queue { IFF_MULTI_QUEUE } else { 0 })
            as libc::c_short,
        _pad: [0; 22],
    };
    let n = name.len().min(15);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // linux/if_tun.h
    const IFF_MULTI_QUEUE: libc::c_int = 0x0100;
    // SAFETY: TUNSETIFF reads an ifreq of the size the kernel expects (40 bytes).
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// A guest's side of a tap, for the transmit stages: frames written to it enter the host stack
/// as a guest's packets do (QEMU's write). Closed on drop.
pub struct TapWriter(std::fs::File);

impl TapWriter {
    pub fn open(tap: &str) -> TapWriter {
        TapWriter(open_tap(tap).unwrap_or_else(|e| panic!("TUNSETIFF {tap}: {e}")))
    }

    /// `count` UDP datagrams from the guest's address (169.254.77.2, MAC 02:00:00:00:77:02) to
    /// the peer's discard port, `gap_us` apart: each one frame, each one packet to the uplink.
    pub fn send_udp(&mut self, peer_mac: [u8; 6], count: u32, gap_us: u64) {
        use std::io::Write as _;
        let payload = [0x5au8; 64];
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 169, 254, 77, 2, 169, 254, 77, 1,
        ];
        let total = (20 + 8 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let sum = ip
            .chunks(2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
            .sum::<u32>();
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let udp_len = (8 + payload.len()) as u16;
        let mut frame = Vec::new();
        frame.extend_from_slice(&peer_mac);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0x77, 0x02]);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);
        // source port 40000, port 9 (discard), no UDP checksum (allowed over IPv4)
        frame.extend_from_slice(&40000u16.to_be_bytes());
        frame.extend_from_slice(&9u16.to_be_bytes());
        frame.extend_from_slice(&udp_len.to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&payload);
        for _ in 0..count {
            self.0.write_all(&frame).expect("write to the tap");
            sleep(Duration::from_micros(gap_us));
        }
    }
}

impl Topology {
    /// The MAC address of the peer end, in the namespace.
    pub fn peer_mac(&self) -> [u8; 6] {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "cat"])
            .arg(format!("/sys/class/net/{}/address", self.peer))
            .output()
            .expect("read the peer's address");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut mac = [0u8; 6];
        for (b, h) in mac.iter_mut().zip(text.trim().split(':')) {
            *b = u8::from_str_radix(h, 16).expect("a MAC address");
        }
        mac
    }

    /// netem `delay` (e.g. "500us") on the uplink's root qdisc; Err with tc's words when the
    /// kernel has no netem.
    pub fn uplink_netem(&self, delay: &str) -> Result<(), String> {
        let out = Command::new("tc")
            .args([
                "qdisc",
                "replace",
                "dev",
                &self.uplink,
                "root",
                "netem",
                "delay",
                delay,
            ])
            .output()
            .expect("tc");
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        match out.status.success() {
            true => Ok(()),
            false if why.contains("unknown") => Err(why),
            false => panic!("tc netem on {}: {why}", self.uplink),
        }
    }
}
