//! Project tasks: `setup`, `run`, `test`, `bench`. `cargo xtask <task>`.

mod e2e;
mod images;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent; seconds when all is there).
    Setup,
    /// Set up if needed, build iopath (release) and run it: `cargo xtask run -- serve`.
    Run {
        /// Arguments for iopath (default: serve).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test: unit tests, the end-to-end tests that load the real
    /// programs into this kernel (root), then the end-to-end tests that run in the distro-kernel
    /// VM. Fails if a test failed, or an end-to-end test skipped for something setup installs.
    Test {
        /// Only the tests whose name contains this.
        filter: Option<String>,
        /// Leave out the distro-kernel VM.
        #[arg(long)]
        no_vm: bool,
    },
    /// Boot Debian's kernel under QEMU (a KVM host with kvm_amd, vhost-net, kprobes, fentry),
    /// run the end-to-end tests that belong there, stop it.
    Vm {
        /// Only the tests whose name contains this.
        filter: Option<String>,
        /// Run this shell command in the VM instead of the tests (with the tests' environment).
        #[arg(long, conflicts_with = "filter")]
        exec: Option<String>,
        /// Record tests/fixtures/kvm_exit.events, kvm_inject.events and
        /// net_nested_vhost.events from a nested guest (with a filter: the tests it names only,
        /// exits_and_injections or vhost_net_stages).
        #[arg(long, conflicts_with = "exec")]
        record_fixtures: bool,
    },
    /// Formatting and clippy (-D warnings): the host crates, then the BPF crate on its own.
    Lint,
    /// Overhead benchmark on a loop device: ns per event (bpf_stats) and IOPS with/without.
    Bench {
        /// Seconds per workload run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Runs of each mode (without / with iopath), interleaved.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Leave out the syscall tax in the distro-kernel VM.
        #[arg(long)]
        no_vm: bool,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

/// Runs a command (in the workspace root unless told otherwise), failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the iopath binary (release) and returns its path.
pub fn build_iopath() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "tracer-user",
        "--bin",
        "iopath",
    ]))?;
    Ok(root().join("target/release/iopath"))
}

/// One line on stderr and exit 1: for conditions the user must fix before anything runs.
fn refuse(msg: &str) -> ! {
    eprintln!("xtask: error: {msg}");
    std::process::exit(1);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Where the end-to-end tests write the tests they skipped (`kind<TAB>test<TAB>reason`).
fn skip_log() -> PathBuf {
    root().join("target/e2e-skips.tsv")
}

/// The same, for the tests that ran in the distro-kernel VM.
fn vm_skip_log() -> PathBuf {
    root().join("target/e2e-skips-vm.tsv")
}

fn require_root(what: &str) {
    if !is_root() {
        refuse(&format!(
            "{what} loads BPF programs and makes loop devices and KVM guests: run it as root (sudo -E {what})"
        ));
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Boots the distro-kernel VM, runs its tests, stops it (also on error and Ctrl-C).
fn in_vm(
    bins: &[(String, PathBuf)],
    bin: &Path,
    filter: Option<&str>,
) -> anyhow::Result<(String, e2e::Counts)> {
    let _ = std::fs::remove_file(vm_skip_log());
    let img = images::prepare()?;
    let c = e2e::run_in_vm(&img, bins, bin, &vm_skip_log(), filter)?;
    Ok((img.kver, c))
}

/// Boots L1 and runs a shell command there with the tests' environment; returns its exit
/// status and L1, still up (its exchange folder holds what the command left).
fn exec_in_l1(
    bin: &Path,
    cmd: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<(i32, vm::L1)> {
    let img = images::prepare()?;
    let mut l1 = vm::L1::boot(&img)?;
    let script = format!("{}\n{cmd}\n", e2e::vm_env(&img, bin));
    let (rc, _) = l1.exec(&script, timeout, true)?;
    Ok((rc, l1))
}

/// The syscall tax in the distro-kernel VM: the bench's loops and exit rate, scaled down for
/// TCG (a system call there costs microseconds), with L1's function probes in the default mode.
fn l1_tax(bin: &Path, vmm: Option<&Path>, rounds: u32) -> anyhow::Result<serde_json::Value> {
    let mut cmd = format!(
        "{} tax --bin {} --rounds {} --calls 20000 --exits 2000 --out /run/iopath/tax.json",
        root().join("target/release/iopath-bench").display(),
        bin.display(),
        rounds * 3
    );
    if let Some(v) = vmm {
        cmd += &format!(" --vmm {}", v.display());
    }
    eprintln!(
        "bench: syscall tax in the distro-kernel VM ({} rounds)",
        rounds * 3
    );
    // TCG can wedge L1 (see e2e::run_in_vm): once more in a fresh one, saying so.
    let timeout = std::time::Duration::from_secs(1800);
    let (rc, l1) = match exec_in_l1(bin, &cmd, timeout) {
        Ok(done) => done,
        Err(e) => {
            eprintln!("bench: the distro-kernel VM failed ({e:#}): once more in a fresh one");
            exec_in_l1(bin, &cmd, timeout)?
        }
    };
    if rc != 0 {
        bail!("the syscall tax in the distro-kernel VM failed (exit {rc}); --no-vm leaves it out");
    }
    let text = std::fs::read_to_string(l1.xchg().join("tax.json"))?;
    Ok(serde_json::from_str(&text)?)
}

/// Records the replay fixtures from a nested guest in the VM: runs the nested tests that record
/// them (`filter`: some of them), which write them to the exchange folder (L1's own writes to
/// the clone would stay in L1), and copies what they wrote into tests/fixtures.
fn record(bins: &[(String, PathBuf)], bin: &Path, filter: Option<&str>) -> anyhow::Result<()> {
    let (_, nested) = bins
        .iter()
        .find(|(n, _)| n == "nested")
        .context("no nested test binary")?;
    let cmd = format!(
        "cd {} && IOPATH_RECORD=/run/iopath/fixtures {} --test-threads=1 --nocapture {}",
        root().join("tests").display(),
        nested.display(),
        filter.unwrap_or("exits_and_injections vhost_net_stages")
    );
    let (rc, l1) = exec_in_l1(bin, &cmd, std::time::Duration::from_secs(900))?;
    if rc != 0 {
        bail!("the nested test failed: nothing recorded");
    }
    for f in [
        "kvm_exit.events",
        "kvm_inject.events",
        "net_nested_vhost.events",
    ] {
        let from = l1.xchg().join("fixtures").join(f);
        if !from.exists() {
            continue;
        }
        let to = root().join("tests/fixtures").join(f);
        std::fs::copy(from, &to)?;
        eprintln!("xtask: recorded {}", to.display());
    }
    Ok(())
}

fn report_skips(log: &Path, kernel: &str) {
    let skips = e2e::skips(log);
    eprintln!(
        "xtask: {} end-to-end tests skipped on {kernel}",
        skips.len()
    );
    for [kind, test, reason] in &skips {
        eprintln!("  skipped ({kind}): {test}: {reason}");
    }
}

/// Fails when a test skipped for what setup installs.
fn check_skips(logs: &[PathBuf]) -> anyhow::Result<()> {
    let preventable: Vec<String> = logs
        .iter()
        .flat_map(|l| e2e::skips(l))
        .filter(|[kind, ..]| kind == "setup")
        .map(|[_, test, _]| test)
        .collect();
    if !preventable.is_empty() {
        bail!(
            "{} end-to-end tests skipped for something `cargo xtask setup` installs ({}): setup is incomplete",
            preventable.len(),
            preventable.join(", ")
        );
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The BPF crate on its own, for its own target: with the host crates, feature unification
    // would pull aya's user side into it.
    run(Command::new("cargo")
        .current_dir(root().join("tracer-ebpf"))
        .args([
            "+nightly",
            "clippy",
            "--package",
            "tracer-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(root().join("target/bpf-lint"))
        .args(["--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        ))
}

fn main() {
    if let Err(e) = task(Cli::parse().cmd) {
        // One line: the error and its causes.
        refuse(&format!("{e:#}"));
    }
}

fn task(cmd: Task) -> anyhow::Result<()> {
    match cmd {
        Task::Lint => {
            setup::setup()?;
            lint()
        }
        Task::Setup => setup::setup(),
        Task::Run { args } => {
            setup::setup()?;
            let bin = build_iopath()?;
            let args = if args.is_empty() {
                vec!["serve".to_string()]
            } else {
                args
            };
            let status = Command::new(bin).args(&args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test { filter, no_vm } => {
            require_root("cargo xtask test");
            vm::catch_signals();
            setup::setup()?;
            // Unit tests: no root, no kernel (the default members leave tracer-ebpf out).
            let mut unit = cargo();
            unit.args([
                "test",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--exclude",
                "iopath-tests",
            ]);
            if let Some(f) = &filter {
                unit.arg(f);
            }
            let unit_ok = run(&mut unit);
            if vm::interrupted() {
                bail!("interrupted");
            }
            let bin = build_iopath()?;
            let bins = e2e::build()?;
            let here = e2e::run_here(&bins, &bin, &skip_log(), filter.as_deref())?;
            let mut lines = vec![format!(
                "kernel {} (this machine): {here}",
                kernel_release()
            )];
            let mut vm_failed = None;
            let mut failed = here.failed;
            if !no_vm {
                match in_vm(&bins, &bin, filter.as_deref()) {
                    Ok((kver, c)) => {
                        failed += c.failed;
                        lines.push(format!("kernel {kver} (distro-kernel VM): {c}"));
                    }
                    Err(e) => {
                        lines.push(format!("distro-kernel VM: did not run: {e:#}"));
                        vm_failed = Some(e);
                    }
                }
            }
            // The verdict first, then the counts: the last lines are per kernel.
            let mut logs = vec![skip_log()];
            if !no_vm {
                logs.push(vm_skip_log());
            }
            let verdict = if let Err(e) = &unit_ok {
                Err(anyhow::anyhow!("unit tests failed: {e:#}"))
            } else if let Some(e) = vm_failed {
                Err(e)
            } else if failed > 0 {
                Err(anyhow::anyhow!("{failed} end-to-end tests failed"))
            } else {
                check_skips(&logs)
            };
            eprintln!();
            report_skips(&skip_log(), "this machine");
            if !no_vm {
                report_skips(&vm_skip_log(), "distro-kernel VM");
            }
            if let Err(e) = &verdict {
                eprintln!("xtask: error: {e:#}");
            }
            eprintln!(
                "xtask: unit tests: {}",
                if unit_ok.is_ok() { "passed" } else { "FAILED" }
            );
            for l in &lines {
                eprintln!("xtask: {l}");
            }
            if verdict.is_err() {
                std::process::exit(1);
            }
            Ok(())
        }
        Task::Vm {
            filter,
            exec,
            record_fixtures,
        } => {
            require_root("cargo xtask vm");
            vm::catch_signals();
            setup::setup()?;
            let bin = build_iopath()?;
            let bins = e2e::build()?;
            if record_fixtures {
                return record(&bins, &bin, filter.as_deref());
            }
            if let Some(cmd) = exec {
                let (rc, l1) = exec_in_l1(&bin, &cmd, std::time::Duration::from_secs(3600))?;
                drop(l1);
                std::process::exit(rc);
            }
            let (kver, c) = in_vm(&bins, &bin, filter.as_deref())?;
            report_skips(&vm_skip_log(), "distro-kernel VM");
            eprintln!("xtask: kernel {kver} (distro-kernel VM): {c}");
            check_skips(&[vm_skip_log()])?;
            if c.failed > 0 {
                bail!("end-to-end tests failed in the distro-kernel VM");
            }
            Ok(())
        }
        Task::Bench {
            seconds,
            rounds,
            no_vm,
        } => {
            require_root("cargo xtask bench");
            setup::setup()?;
            let bin = build_iopath()?;
            // The bench is a binary of the tests' crate: it links iopath, which only builds
            // once setup has run.
            run(cargo().args([
                "build",
                "--release",
                "--package",
                "iopath-tests",
                "--bin",
                "iopath-testvmm",
                "--bin",
                "iopath-bench",
            ]))?;
            let vmm = if Path::new("/dev/kvm").exists() {
                Some(root().join("target/release/iopath-testvmm"))
            } else {
                eprintln!("bench: no /dev/kvm, KVM programs not measured");
                None
            };
            let l1 = if no_vm {
                None
            } else {
                vm::catch_signals();
                let l1 = l1_tax(&bin, vmm.as_deref(), rounds)?;
                let file = root().join("target/bench/l1-tax.json");
                std::fs::create_dir_all(root().join("target/bench"))?;
                std::fs::write(&file, serde_json::to_string(&l1)?)?;
                Some(file)
            };
            let mut cmd = Command::new(root().join("target/release/iopath-bench"));
            cmd.arg("run").arg("--bin").arg(&bin).args([
                "--seconds",
                &seconds.to_string(),
                "--rounds",
                &rounds.to_string(),
            ]);
            if let Some(v) = &vmm {
                cmd.arg("--vmm").arg(v);
            }
            if let Some(f) = &l1 {
                cmd.arg("--l1").arg(f);
            }
            run(&mut cmd)
        }
    }
}
