//! iopath: eBPF host I/O latency tracer for KVM hosts. The command line; the rest is the
//! library.

use std::{
    io::IsTerminal as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use iopath::{
    attach, hist::Layout, privs, report, serve, session, stages::Family, tui, webconfig::WebConfig,
};

#[derive(Parser, Debug)]
#[command(
    name = "iopath",
    version,
    about = "Per-stage latency of guest I/O paths on a KVM host"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Where tracefs is mounted.
    #[arg(long, default_value = "/sys/kernel/tracing", global = true)]
    tracefs: PathBuf,
    /// Stages to run, comma separated (default: all that attach). See `iopath doctor`.
    #[arg(long, value_delimiter = ',', global = true)]
    stages: Vec<String>,
    /// Let every stage fall back to system call tracepoints where the kernel has neither fentry
    /// nor kprobes (a stage named in --stages may anyway). They put every process on the host
    /// on the slow system call path.
    #[arg(long, global = true)]
    syscall_tracepoints: bool,
    /// Fail when a stage cannot attach, instead of running without it.
    #[arg(long, global = true)]
    strict: bool,
    /// Enable kernel.bpf_stats while running (per-program run time; costs ~20 ns per event).
    #[arg(long, global = true)]
    bpf_stats: bool,
    /// The bench's variants of the block programs (`tracer_common::blk::cut`): where they stop,
    /// or (4) every stage's histogram update with the previous, log-linear bucket pick.
    #[arg(long, hide = true, default_value_t = 0, global = true)]
    blk_cut: u32,
    /// Sampled timelines: every event of one 16.8 ms window in N (a power of two; 64 samples
    /// about 1.6%) is sampled and chained into its I/O's stages (`record` prints the slowest,
    /// `serve` gives them at /timelines and as exemplars); 0 turns the sampling off, and the
    /// verifier drops its code.
    #[arg(long, default_value = "64", value_parser = parse_timeline_every, global = true)]
    timeline_every: u32,
    /// Capacity of the kernel histogram map (series x buckets used); a full map drops samples,
    /// counted in iopath_events_dropped_total.
    #[arg(long, default_value_t = tracer_common::maps::HIST_ENTRIES, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    hist_entries: u32,
    /// Capacity of each kernel map of events in flight (requests, exits, signals); a full map
    /// drops starts, counted in iopath_events_dropped_total.
    #[arg(long, default_value_t = tracer_common::maps::START_ENTRIES, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    start_entries: u32,
    /// How long the series of a VM that exited (or a block device that went) stay exported
    /// before they and its kernel map entries are removed, e.g. 60s, 5m.
    #[arg(long, default_value = "60s", value_parser = parse_duration, global = true)]
    vm_grace: Duration,
    /// Program families the attach plan may use, comma separated, in any order (default: all:
    /// tp_btf, raw_tp, tracepoint, fentry, kprobe, syscall; each event takes the first that
    /// works).
    #[arg(long, value_delimiter = ',', value_parser = parse_family, global = true)]
    families: Vec<Family>,
    /// Force the program family of one event, EVENT=FAMILY, comma separated (e.g.
    /// kvm_apic_accept_irq=kprobe): it tries only that one, whatever --families says. For
    /// diagnosis, and to compare families on one kernel.
    #[arg(long = "event-family", value_delimiter = ',', value_parser = parse_event_family, global = true)]
    event_families: Vec<(String, Family)>,
    /// Histogram buckets exported on /metrics per power of two, from 954 ns to 16 s: 1, 2,
    /// 4 or 8 (8: the kernel's own resolution). /quantiles and record always use all.
    #[arg(long, default_value = "2", value_parser = parse_layout, global = true)]
    buckets: Layout,
    /// vfio.handler: also follow the IRQs whose handler's name starts with one of these,
    /// comma separated (a VFIO device's, vfio-msix[N](BDF) and the like, are always followed;
    /// e.g. virtio1-req to time a host device's own handler).
    #[arg(long = "vfio-irqs", value_delimiter = ',', global = true)]
    vfio_irqs: Vec<String>,
}

fn parse_family(s: &str) -> Result<Family, String> {
    Family::parse(s).ok_or_else(|| {
        format!(
            "unknown program family {s:?} (tp_btf, raw_tp, tracepoint, fentry, kprobe, syscall)"
        )
    })
}

fn parse_event_family(s: &str) -> Result<(String, Family), String> {
    let (event, family) = s.split_once('=').ok_or_else(|| {
        format!("--event-family {s:?}: EVENT=FAMILY, e.g. kvm_apic_accept_irq=kprobe")
    })?;
    let family = parse_family(family)?;
    let e = iopath::stages::events()
        .into_iter()
        .find(|e| e.name == event)
        .ok_or_else(|| format!("--event-family: no event {event:?} in the stage table"))?;
    if !e.families.contains(&family) {
        let names: Vec<_> = e.families.iter().map(|f| f.name()).collect();
        return Err(format!(
            "--event-family: {event} has no {} program (it has {})",
            family.name(),
            names.join(", ")
        ));
    }
    Ok((event.to_string(), family))
}

fn parse_layout(s: &str) -> Result<Layout, String> {
    s.parse()
        .ok()
        .and_then(Layout::per_octave)
        .ok_or_else(|| format!("invalid --buckets {s:?} (1, 2, 4 or 8 per power of two)"))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon: export per-stage histograms on /metrics.
    Serve {
        /// Address to listen on (loopback by default; `--listen` is an older name of it).
        #[arg(
            long = "web.listen-address",
            visible_alias = "listen",
            value_name = "ADDR",
            default_value = "127.0.0.1:9464"
        )]
        listen: SocketAddr,
        /// TLS and basic auth, in the web configuration file format of Prometheus' exporters
        /// (tls_server_config, basic_auth_users with bcrypt hashes).
        #[arg(long = "web.config.file", value_name = "FILE")]
        web_config: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Trace for a while and print per-stage quantiles.
    Record {
        /// How long to record, e.g. 10s, 500ms, 2m (Ctrl-C ends early).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the capture (the JSON) to FILE, for `iopath report` or `compare --input`.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Show a capture (`record --output`): each path's stage waterfall (p50 and p99 bars that
    /// add up) and each stage's histogram, as tables or a self-contained HTML page.
    Report {
        /// The capture, written by `iopath record --output FILE` (or `--json`).
        input: PathBuf,
        /// Write a self-contained HTML page (SVG plots, nothing fetched) to FILE instead.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Only this VM's series (and the host stacks of its taps).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Put one VM's paravirtual and passthrough paths side by side, per kind of I/O: host-side
    /// time (p50, p99, p99.9), host CPU per I/O, what passthrough could save and what it costs.
    Compare {
        /// The VM (its name as the `vm` label has it).
        #[arg(long)]
        vm: String,
        /// A capture of `iopath record --json` to compare (no privileges needed); without it,
        /// iopath records for --duration first.
        #[arg(long)]
        input: Option<PathBuf>,
        /// How long to record when there is no --input, e.g. 30s.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
    /// A live view in the terminal: one row per VM and stage, p50, p99, max and rate, sortable,
    /// filtered by VM or path, with each row's p99 trend (q quits).
    Top {
        /// How often to read and redraw, e.g. 1s, 500ms.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        #[command(flatten)]
        common: Common,
    },
    /// Show which stages can attach on this kernel, and how, or why not.
    Doctor {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s, m, h)")),
    };
    if !(secs > 0.0 && secs < 1e7) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl Common {
    fn attach(&self) -> attach::Options<'_> {
        attach::Options {
            tracefs: &self.tracefs,
            stages: &self.stages,
            families: &self.families,
            event_families: &self.event_families,
            hist_entries: self.hist_entries,
            start_entries: self.start_entries,
            strict: self.strict,
            bpf_stats: self.bpf_stats,
            blk_cut: self.blk_cut,
            timeline_every: self.timeline_every,
            syscall_tracepoints: self.syscall_tracepoints,
        }
    }

    fn options(&self, keep_collected: bool) -> session::Options<'_> {
        session::Options {
            attach: self.attach(),
            vm_grace: self.vm_grace,
            layout: self.buckets.clone(),
            keep_collected,
            vfio_irqs: &self.vfio_irqs,
        }
    }
}

fn parse_timeline_every(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .ok()
        .filter(|n| *n == 0 || (n.is_power_of_two() && *n <= 1 << 20))
        .ok_or_else(|| {
            format!("invalid --timeline-every {s:?} (0, or a power of two up to 1048576)")
        })
}

fn main() -> ExitCode {
    // One malloc arena for the daemon's few threads: memory one frees, another reuses. With
    // glibc's per-thread arenas the daemon's RSS grew by 40% over 400 short-lived VMs before it
    // settled; with one it stays flat.
    #[cfg(target_env = "gnu")]
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first line, without the usage block.
            let msg = e.to_string();
            let first = msg
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("iopath: error: {first} (see iopath --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("iopath: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Cmd::Compare {
        vm,
        input: Some(input),
        json,
        ..
    } = &cli.cmd
    {
        // A capture needs no privileges.
        return compare(&read_capture(input)?, vm, *json);
    }
    if let Cmd::Report { input, html, vm } = &cli.cmd {
        // A capture needs no privileges either.
        let capture = read_capture(input)?;
        let r = iopath::waterfall::report(&capture, vm.as_deref())?;
        match html {
            Some(path) => {
                write_atomically(path, iopath::html::page(&r).as_bytes())?;
                eprintln!("iopath: wrote {}", path.display());
            }
            None => print!("{}", iopath::waterfall::table(&r)),
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Bad settings are refused before the privilege check and before anything is attached.
    if let Cmd::Record {
        output: Some(path), ..
    } = &cli.cmd
    {
        writable(path)?;
    }
    let web = match &cli.cmd {
        Cmd::Serve {
            web_config: Some(path),
            ..
        } => Some(WebConfig::load(path)?),
        _ => None,
    };
    // Before the privilege check and before anything is attached.
    if matches!(cli.cmd, Cmd::Top { .. }) && !std::io::stdout().is_terminal() {
        anyhow::bail!("iopath top needs a terminal (for a report, use iopath record)");
    }
    privs::check()?;
    match cli.cmd {
        Cmd::Serve { listen, common, .. } => {
            // Two workers: while one reads the kernel's counts, the other takes the scrapes
            // that arrive meanwhile, which then share the next read.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(serve::run(listen, web, &common.options(false)))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Record {
            duration,
            json,
            output,
            common,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(record(duration, json, output.as_deref(), &common)),
        Cmd::Report { .. } => unreachable!("answered before the privilege check"),
        Cmd::Compare {
            vm,
            duration,
            json,
            common,
            ..
        } => {
            let capture = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let mut session = trace_for(duration, &common).await?;
                    anyhow::Ok(report::json(&mut session))
                })?;
            compare(&serde_json::from_str(&capture)?, &vm, json)
        }
        Cmd::Doctor { json, common } => doctor(json, &common),
        Cmd::Top { interval, common } => {
            let mut session = session::Session::start(&common.options(false))?;
            if !session.tracer.any_attached() {
                anyhow::bail!("no stage can attach on this kernel (see `iopath doctor`)");
            }
            tui::run(&mut session, interval.max(Duration::from_millis(100)))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn compare(capture: &serde_json::Value, vm: &str, json: bool) -> anyhow::Result<ExitCode> {
    let c = iopath::compare::compare(capture, vm)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", iopath::compare::table(&c));
    }
    Ok(ExitCode::SUCCESS)
}

fn read_capture(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Whether `path` can be written (a file in a writable directory), asked before a recording
/// starts rather than found out after it.
fn writable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    if path.is_dir() {
        anyhow::bail!("{} is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: access(2) on a NUL-terminated path.
    if !dir.is_dir() || unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        anyhow::bail!(
            "cannot write {}: {} is not a writable directory",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Writes `data` to a temporary file beside `path`, then renames it there: a reader never sees
/// half a file, and a failed write leaves any old one whole.
fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("writing {}", path.display()))
}

async fn record(
    duration: Duration,
    json: bool,
    output: Option<&Path>,
    common: &Common,
) -> anyhow::Result<ExitCode> {
    let mut session = trace_for(duration, common).await?;
    let capture = (json || output.is_some()).then(|| report::json(&mut session));
    if let (Some(path), Some(capture)) = (output, &capture) {
        if let Err(e) = write_atomically(path, capture.as_bytes()) {
            // The recording is not lost: the capture goes to stdout instead.
            print!("{capture}");
            return Err(e.context("the capture went to stdout instead"));
        }
        eprintln!(
            "iopath: wrote the capture to {} (iopath report {0} [--html FILE])",
            path.display()
        );
    }
    match capture {
        Some(capture) if json => print!("{capture}"),
        _ => print!("{}", report::table(&mut session)),
    }
    Ok(ExitCode::SUCCESS)
}

/// A session that traced for `duration` (or until SIGINT or SIGTERM), its counts read last.
async fn trace_for(duration: Duration, common: &Common) -> anyhow::Result<session::Session> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut session = session::Session::start(&common.options(true))?;
    if !session.tracer.any_attached() {
        anyhow::bail!("no stage can attach on this kernel (see `iopath doctor`)");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    eprintln!(
        "iopath: recording for {duration:?} or until Ctrl-C ({})",
        session.tracer.attached_stages()
    );
    // New VMs are named as soon as the kernel tells of them, so a VM that exits before the
    // report keeps its name.
    let notices = session.notice_waiter()?;
    let started = tokio::time::Instant::now();
    let deadline = started + duration;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The timeline ring holds 26,000 samples: read often.
    let mut timelines = tokio::time::interval(Duration::from_millis(100));
    let mut progress = Progress::new(duration);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = timelines.tick() => {
                session.drain_timelines();
            }
            // collect() reads the counts itself when something goes; the report reads them last.
            _ = tick.tick() => {
                session.collect()?;
                session.watch()?;
                let elapsed = started.elapsed();
                if progress.due(elapsed) {
                    session.refresh()?;
                    progress.show(elapsed, session.events_since_start());
                }
            }
            ready = async { notices.as_ref().expect("guarded").readable().await }, if notices.is_some() => {
                if let Ok(mut guard) = ready {
                    session.drain_notices();
                    guard.clear_ready();
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    drop(progress);
    session.refresh()?;
    Ok(session)
}

/// A long recording's progress on stderr (one longer than 10 s): a line redrawn every second
/// when stderr is a terminal, a line every 10 s otherwise (a log).
struct Progress {
    total: Duration,
    tty: bool,
    /// When the next line is due: on whole periods from the start, so a late tick does not
    /// push the later ones back.
    next: Duration,
    shown: bool,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(10);

    fn new(total: Duration) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            total,
            tty,
            next: Self::every(tty),
            shown: false,
        }
    }

    fn every(tty: bool) -> Duration {
        if tty {
            Duration::from_secs(1)
        } else {
            Self::EVERY
        }
    }

    fn due(&self, elapsed: Duration) -> bool {
        self.total > Self::EVERY && elapsed < self.total && elapsed >= self.next
    }

    fn show(&mut self, elapsed: Duration, events: u64) {
        let line = format!(
            "iopath: recorded {:.0} s of {:.0} s, {events} events so far",
            elapsed.as_secs_f64(),
            self.total.as_secs_f64()
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        self.shown = true;
        let every = Self::every(self.tty);
        self.next = every * (elapsed.as_millis() / every.as_millis() + 1) as u32;
    }
}

impl Drop for Progress {
    /// Clears a redrawn line, however the recording ended (an error's line starts clean).
    fn drop(&mut self) {
        if self.tty && self.shown {
            eprint!("\r\x1b[K");
        }
    }
}

/// How the VMM disk stages tell a disk's notify and vector (`learn`), as doctor says it.
const DISK_SIGNALS: &str = "observed pairing (a kick with the VMM's next request, a completion \
    with its next interrupt); the VMM's GSI routing and KVM_IRQFD ioctls are not followed";

fn doctor(json: bool, common: &Common) -> anyhow::Result<ExitCode> {
    let opts = attach::Options {
        strict: false,
        ..common.attach()
    };
    let tracer = attach::Tracer::start(&opts)?;
    if json {
        let out = serde_json::json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "btf": std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            "btf_modules": tracer.btf_modules,
            "tracefs": common.tracefs,
            "stages": tracer.report,
            // Every program the object holds, attached or not: what to look for if one is
            // left loaded.
            "programs": iopath::stages::all_programs(),
            "maps": iopath::maps::all().iter().map(|m| m.name).collect::<Vec<_>>(),
            "disk_signals": DISK_SIGNALS,
            "posted_interrupts": iopath::posted::this_host(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let w = tracer
            .report
            .iter()
            .map(|r| r.stage.len())
            .max()
            .unwrap_or(5);
        println!(
            "{:<w$} {:<6} {:<9} {:<18} DETAIL",
            "STAGE", "PATH", "STATE", "ATTACH"
        );
        for r in &tracer.report {
            let (state, attach, detail) = match &r.attach {
                Some(a) => ("attached", a.as_str(), r.points.join(", ")),
                None => ("missing", "-", r.skipped.join("; ")),
            };
            println!(
                "{:<w$} {:<6} {:<9} {:<18} {}",
                r.stage, r.path, state, attach, detail
            );
            if r.attached && !r.skipped.is_empty() {
                println!(
                    "{:<w$} {:<6} {:<9} {:<18} (preferred, skipped: {})",
                    "",
                    "",
                    "",
                    "",
                    r.skipped.join("; ")
                );
            }
        }
        let vm_disk_stages = ["blk.kick_to_submit", "blk.complete_to_irq"];
        if tracer
            .report
            .iter()
            .any(|r| r.attached && vm_disk_stages.contains(&r.stage))
        {
            println!("\nwhich notify and vector are a disk's: {DISK_SIGNALS}");
        }
        let posted = iopath::posted::this_host();
        println!(
            "\nposted interrupts for assigned devices: {} ({})",
            if posted.posted { "yes" } else { "no" },
            posted.why
        );
    }
    // Dropping the tracer detaches what the check attached.
    Ok(if tracer.any_attached() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
