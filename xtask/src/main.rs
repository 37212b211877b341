//! Project tasks: `setup`, `run`, `test`, `bench`. `cargo xtask <task>`.

mod bench;
mod setup;

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
    /// Set up, then run every test: unit tests, then the end-to-end tests that load the real
    /// programs into this kernel (root). Fails if an end-to-end test skipped for something
    /// setup installs.
    Test {
        /// Only the tests whose name contains this.
        filter: Option<String>,
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
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .current_dir(root())
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

/// Prints the skipped tests; fails when one skipped for what setup installs.
fn check_skips() -> anyhow::Result<()> {
    let log = std::fs::read_to_string(skip_log()).unwrap_or_default();
    let skips: Vec<Vec<&str>> = log
        .lines()
        .map(|l| l.splitn(3, '\t').collect::<Vec<_>>())
        .filter(|f| f.len() == 3)
        .collect();
    eprintln!("xtask: {} end-to-end tests skipped", skips.len());
    for f in &skips {
        eprintln!("  skipped ({}): {}: {}", f[0], f[1], f[2]);
    }
    let preventable: Vec<_> = skips.iter().filter(|f| f[0] == "setup").collect();
    if !preventable.is_empty() {
        bail!(
            "{} end-to-end tests skipped for something `cargo xtask setup` installs ({}): setup is incomplete",
            preventable.len(),
            preventable
                .iter()
                .map(|f| f[1])
                .collect::<Vec<_>>()
                .join(", ")
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
        Task::Test { filter } => {
            if !is_root() {
                refuse(
                    "cargo xtask test loads BPF programs and makes loop devices and KVM guests: run it as root (sudo -E cargo xtask test)",
                );
            }
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
            run(&mut unit)?;
            // End-to-end: real programs in this kernel; one at a time, they share kernel state.
            let bin = build_iopath()?;
            let _ = std::fs::remove_file(skip_log());
            let mut e2e = cargo();
            e2e.args(["test", "--release", "--package", "iopath-tests"])
                .env("IOPATH_BIN", &bin)
                .env("IOPATH_SKIPS", skip_log());
            e2e.arg("--");
            if let Some(f) = &filter {
                e2e.arg(f);
            }
            e2e.arg("--test-threads=1");
            let ran = run(&mut e2e);
            check_skips()?;
            ran
        }
        Task::Bench { seconds, rounds } => {
            setup::setup()?;
            let bin = build_iopath()?;
            let vmm = if Path::new("/dev/kvm").exists() {
                run(cargo().args([
                    "build",
                    "--release",
                    "--package",
                    "iopath-tests",
                    "--bin",
                    "iopath-testvmm",
                ]))?;
                Some(root().join("target/release/iopath-testvmm"))
            } else {
                eprintln!("bench: no /dev/kvm, KVM programs not measured");
                None
            };
            bench::bench(&bin, vmm.as_deref(), seconds, rounds)
        }
    }
}
