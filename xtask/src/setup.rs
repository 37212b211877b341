//! `cargo xtask setup`: everything the build and tests need on a fresh machine of ours, each
//! step skipped when already done, so a second run takes seconds.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{is_root, root, run};

/// Debian packages the tests and the benchmark use: promtool (prometheus) validates /metrics,
/// fio and iperf3 drive the benchmark, bpftool lists programs left behind, losetup makes loop devices;
/// the guest-lab test boots a real QEMU guest (qemu-system-x86, ping, xz, bc), and bpftrace
/// gives the independent counts the tests and the benchmark compare with; python3-yaml and
/// systemd check the deployment files (`deploy/`); openssl, curl and python3 (its bcrypt)
/// make and use the web config test's certificates and password. A test that skips for
/// one of these fails `cargo xtask test`. The distro-kernel VM boots with QEMU and runs its
/// nested guests with the same packages (L1 sees this machine's `/`).
const PACKAGES: &[&str] = &[
    "prometheus",
    "fio",
    "iperf3",
    "bpftool",
    "util-linux",
    "iproute2",
    "qemu-system-x86",
    "bpftrace",
    "iputils-ping",
    "xz-utils",
    "bc",
    "python3",
    // the deployment files' tests: the DaemonSet parsed, the unit checked by systemd-analyze
    "python3-yaml",
    "systemd",
    // --web.config.file's test: certificates, a bcrypt hash (python3's crypt), an HTTPS client
    "openssl",
    "curl",
    // iopath top's test: a real terminal of 80x24
    "tmux",
    // iopath report's test: the HTML page opened headless (its DOM, console and a screenshot)
    "chromium",
    // the distro-kernel VM (cargo xtask vm): its initramfs, its kernel package's module index,
    // the ext4 scratch disk it formats
    "busybox-static",
    "cpio",
    "kmod",
    "e2fsprogs",
];

pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    eprintln!("setup: {what}");
}

pub fn setup() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages()?;
    mounts()?;
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed to build the BPF programs")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// LLVM major version and libLLVM of the nightly toolchain, read from the toolchain itself.
fn nightly_llvm() -> anyhow::Result<(String, PathBuf)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV names no LLVM version")?
        .to_string();
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let lib = fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| format!("no libLLVM in {}/lib", sysroot.display()))?;
    Ok((major, lib))
}

/// bpf-linker built against the nightly's own LLVM. A stamp beside it records that LLVM, so a
/// new nightly with another LLVM rebuilds it.
fn bpf_linker() -> anyhow::Result<()> {
    let (major, lib) = nightly_llvm()?;
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let stamp = home.join("bpf-linker.llvm");
    // It loads the nightly's libLLVM at run time: run it as aya-build does, under the nightly.
    let have = Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    // A linker that predates the stamp was installed by hand; trust it if it runs.
    let stamp_ok = fs::read_to_string(&stamp).map_or(have, |s| s.trim() == major);
    if have && stamp_ok {
        return Ok(());
    }
    step(&format!(
        "building bpf-linker against the nightly's LLVM {major} (a few minutes)"
    ));
    let prefix = root().join("target/llvm-prefix");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    fs::write(&stamp, format!("{major}\n"))?;
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    install(PACKAGES)
}

pub fn install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "setup: not root, not installing {} (tests that need them will fail)",
            missing.join(" ")
        );
        return Ok(());
    }
    step(&format!("installing {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn mounted(fstype: &str, at: &str) -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            l.split_whitespace().nth(1) == Some(at) && l.split_whitespace().nth(2) == Some(fstype)
        })
    })
}

fn mounts() -> anyhow::Result<()> {
    for (fstype, at) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        if mounted(fstype, at) {
            continue;
        }
        if !is_root() {
            eprintln!("setup: not root, cannot mount {fstype} at {at}");
            continue;
        }
        step(&format!("mounting {fstype} at {at}"));
        run(Command::new("mount").args(["-t", fstype, fstype, at]))?;
    }
    Ok(())
}
