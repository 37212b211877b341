//! iopath: eBPF host I/O latency tracer for KVM hosts.

mod attach;
mod btf;
mod export;
mod gc;
mod hist;
mod labels;
mod offsets;
mod privs;
mod report;
mod serve;
mod session;
mod stages;
mod tracefs;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

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
    /// Fail when a stage cannot attach, instead of running without it.
    #[arg(long, global = true)]
    strict: bool,
    /// Enable kernel.bpf_stats while running (per-program run time; costs ~20 ns per event).
    #[arg(long, global = true)]
    bpf_stats: bool,
    /// Capacity of the kernel histogram map (series x buckets used); a full map drops samples,
    /// counted in iopath_events_dropped_total.
    #[arg(long, default_value_t = tracer_common::maps::HIST_ENTRIES, global = true)]
    hist_entries: u32,
    /// How long the series of a VM that exited stay exported before they and the VM's kernel
    /// map entries are removed, e.g. 60s, 5m.
    #[arg(long, default_value = "60s", value_parser = parse_duration, global = true)]
    vm_grace: Duration,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon: export per-stage histograms on /metrics.
    Serve {
        /// Address to listen on (loopback by default).
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: SocketAddr,
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
    fn options(&self) -> attach::Options<'_> {
        attach::Options {
            tracefs: &self.tracefs,
            stages: &self.stages,
            hist_entries: self.hist_entries,
            strict: self.strict,
            bpf_stats: self.bpf_stats,
            vm_grace: self.vm_grace,
        }
    }
}

fn main() -> ExitCode {
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
    privs::check()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Serve { listen, common } => {
            rt.block_on(serve::run(listen, &common.options()))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Record {
            duration,
            json,
            common,
        } => rt.block_on(record(duration, json, &common)),
        Cmd::Doctor { json, common } => doctor(json, &common),
    }
}

async fn record(duration: Duration, json: bool, common: &Common) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut session = session::Session::start(&common.options())?;
    if !session.tracer.any_attached() {
        anyhow::bail!("no stage can attach on this kernel (see `iopath doctor`)");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    eprintln!(
        "iopath: recording for {duration:?} or until Ctrl-C ({})",
        session.tracer.attached_stages()
    );
    let deadline = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick() => session.refresh()?,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    session.refresh()?;
    print!(
        "{}",
        if json {
            report::json(&mut session)
        } else {
            report::table(&mut session)
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn doctor(json: bool, common: &Common) -> anyhow::Result<ExitCode> {
    let opts = attach::Options {
        strict: false,
        ..common.options()
    };
    let tracer = attach::Tracer::start(&opts)?;
    if json {
        let out = serde_json::json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "btf": std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            "tracefs": common.tracefs,
            "stages": tracer.report,
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
            let (state, attach, detail) = match r.attach {
                Some(a) => ("attached", a, r.points.join(", ")),
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
    }
    // Dropping the tracer detaches what the check attached.
    Ok(if tracer.any_attached() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
