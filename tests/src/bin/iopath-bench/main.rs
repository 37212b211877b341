//! `iopath-bench`: the benchmark, built by `cargo xtask bench` after its setup (the xtask itself
//! builds before setup has installed the BPF toolchain, so it cannot link iopath).

mod bench;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The whole bench on this machine.
    Run {
        #[arg(long)]
        bin: PathBuf,
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Seconds per workload run.
        #[arg(long)]
        seconds: u32,
        /// Runs of each mode, interleaved.
        #[arg(long)]
        rounds: u32,
        /// The distro-kernel VM's syscall tax (JSON written by `tax`), when measured.
        #[arg(long)]
        l1: Option<PathBuf>,
    },
    /// The syscall tax alone (what the bench runs in the distro-kernel VM).
    Tax {
        #[arg(long)]
        bin: PathBuf,
        #[arg(long)]
        vmm: Option<PathBuf>,
        #[arg(long)]
        rounds: u32,
        /// System calls per loop.
        #[arg(long)]
        calls: u32,
        /// Exits per exit-rate run.
        #[arg(long)]
        exits: u32,
        /// Where the JSON goes.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The workspace root (results go under it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests is in the workspace")
        .to_path_buf()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Run {
            bin,
            vmm,
            seconds,
            rounds,
            l1,
        } => {
            let l1 = match l1 {
                Some(p) => Some(serde_json::from_str(&std::fs::read_to_string(p)?)?),
                None => None,
            };
            bench::bench(&bin, vmm.as_deref(), seconds, rounds, l1)
        }
        Task::Tax {
            bin,
            vmm,
            rounds,
            calls,
            exits,
            out,
        } => bench::tax_only(&bin, vmm.as_deref(), rounds, calls, exits, &out),
    }
}
