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
    /// programs into this kernel (root).
    Test {
        /// Only the tests whose name contains this.
        filter: Option<String>,
    },
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
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
            let mut e2e = cargo();
            e2e.args(["test", "--release", "--package", "iopath-tests"])
                .env("IOPATH_BIN", &bin);
            e2e.arg("--");
            if let Some(f) = &filter {
                e2e.arg(f);
            }
            e2e.arg("--test-threads=1");
            run(&mut e2e)
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
