//! The end-to-end tests: one binary per file of tests/tests, run one test at a time (they share
//! kernel state), on this machine's kernel and in the distro-kernel VM, with a count per kernel.

use std::{
    fmt,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{cargo, images::Images, root, vm::L1};

/// Files of tests/tests that run in the VM: everything that depends on the kernel and runs
/// there (the guest lab needs this machine's KVM, the HTTP and exposition tests do not depend
/// on the kernel). `nested` needs what only the VM has (kvm_entry, kprobes, nested guests).
pub const IN_VM: &[&str] = &[
    "doctor", "cli", "blk", "metrics", "kvm", "churn", "net", "nested",
];
/// Files that run only in the VM.
pub const VM_ONLY: &[&str] = &["nested"];

#[derive(Default, Clone, Copy)]
pub struct Counts {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// Builds the test binaries (release) and returns them by file name.
pub fn build() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .current_dir(root())
        .args([
            "test",
            "--release",
            "--package",
            "iopath-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if m["reason"] == "compiler-artifact"
            && m["target"]["kind"] == serde_json::json!(["test"])
            && let Some(exe) = m["executable"].as_str()
        {
            let name = m["target"]["name"].as_str().unwrap_or_default().to_string();
            bins.push((name, PathBuf::from(exe)));
        }
    }
    bins.sort();
    Ok(bins)
}

/// Passed and failed of the libtest summaries in `text` (`test result: ok. 4 passed; ...`).
pub fn results(text: &str) -> (Counts, usize) {
    let mut c = Counts::default();
    let mut summaries = 0;
    for l in text.lines() {
        let Some(r) = l.trim().strip_prefix("test result: ") else {
            continue;
        };
        summaries += 1;
        for part in r.split(';') {
            let mut w = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (w.next(), w.next()) else {
                continue;
            };
            let n: u32 = n.parse().unwrap_or(0);
            match what {
                "passed" => c.passed += n,
                "failed" => c.failed += n,
                _ => {}
            }
        }
    }
    (c, summaries)
}

/// Skipped tests in a skip log (`kind<TAB>test<TAB>reason` lines).
pub fn skips(log: &Path) -> Vec<[String; 3]> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(3, '\t').collect();
            (f.len() == 3).then(|| [f[0].into(), f[1].into(), f[2].into()])
        })
        .collect()
}

fn tally(text: &str, ok: bool, bin: &str, total: &mut Counts) {
    let (c, summaries) = results(text);
    total.add(c);
    if summaries == 0 && !ok {
        // It died before its summary: count it as one failure, not zero.
        eprintln!("xtask: {bin} ended without a test summary");
        total.failed += 1;
    }
}

/// Runs the binaries on this machine's kernel.
pub fn run_here(
    bins: &[(String, PathBuf)],
    iopath: &Path,
    skip_log: &Path,
    filter: Option<&str>,
) -> anyhow::Result<Counts> {
    let _ = std::fs::remove_file(skip_log);
    let mut total = Counts::default();
    for (name, exe) in bins.iter().filter(|(n, _)| !VM_ONLY.contains(&n.as_str())) {
        if crate::vm::interrupted() {
            bail!("interrupted");
        }
        println!("\n== {name} (this machine)");
        let mut cmd = Command::new(exe);
        cmd.current_dir(root().join("tests"))
            .env("IOPATH_BIN", iopath)
            .env("IOPATH_SKIPS", skip_log)
            .arg("--test-threads=1")
            .args(filter)
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("cannot run {name}"))?;
        let mut text = String::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line?;
            println!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
        let ok = child.wait()?.success();
        tally(&text, ok, name, &mut total);
    }
    finish(&mut total, skip_log);
    Ok(total)
}

/// A skipped test returns early and libtest counts it passed: it is counted skipped instead.
fn finish(total: &mut Counts, skip_log: &Path) {
    total.skipped = skips(skip_log).len() as u32;
    total.passed = total.passed.saturating_sub(total.skipped);
}

/// What the in-VM tests need to know about it.
pub fn vm_env(img: &Images, iopath: &Path) -> String {
    format!(
        "export IOPATH_BIN={} IOPATH_SKIPS=/run/iopath/skips.tsv IOPATH_EMULATED=1 IOPATH_L2_KERNEL={}",
        iopath.display(),
        img.l2_kernel.display()
    )
}

/// The tests a run that never finished had ended, from its libtest lines (`test NAME ... ok`,
/// with other processes' output possibly between the name and the result): those that passed
/// and those that failed, in order. The one it was running when it stopped is in neither.
/// (`--skip NAME` then leaves them out: it skips the tests whose names contain NAME, and no
/// test's name holds another's.)
fn ended(partial: &str) -> (Vec<String>, Vec<String>) {
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    // Each test's lines: its `test NAME ... ` line and those up to the next test's; libtest
    // prints the result last.
    let mut tests: Vec<(String, Vec<&str>)> = Vec::new();
    for line in partial.lines() {
        if let Some((name, result)) = line
            .strip_prefix("test ")
            .and_then(|r| r.split_once(" ... "))
            .filter(|(n, _)| !n.contains(char::is_whitespace))
        {
            tests.push((name.to_string(), vec![result]));
        } else if let Some((_, lines)) = tests.last_mut() {
            lines.push(line);
        }
    }
    for (name, lines) in tests {
        let last = lines.iter().rev().map(|l| l.trim()).find(|l| !l.is_empty());
        match last {
            Some("ok") => passed.push(name),
            Some("FAILED") => failed.push(name),
            _ => {}
        }
    }
    (passed, failed)
}

/// How many times a test file may start in L1, a fresh one each time after L1 stops answering.
const ATTEMPTS: u32 = 3;

/// Runs the binaries named in IN_VM in the VM; the skip log comes back to `skip_log`. Nested
/// SVM under TCG can wedge L1: in CI, with the test VMM's or a nested guest's vCPU running,
/// both of L1's vCPUs at 100% of the host's and the main loop idle, once with a soft lockup
/// report of a task waiting on the other CPU. Then the file runs again in a fresh L1 from the
/// test that was running (those that ended are counted as they ended), up to [`ATTEMPTS`]
/// times, saying so. A file that still could not finish counts the test it stopped in as one
/// failure, and the next file gets a fresh L1.
pub fn run_in_vm(
    img: &Images,
    bins: &[(String, PathBuf)],
    iopath: &Path,
    skip_log: &Path,
    filter: Option<&str>,
) -> anyhow::Result<Counts> {
    let mut l1: Option<L1> = None;
    let mut total = Counts::default();
    let mut skipped = String::new();
    let files: Vec<_> = bins
        .iter()
        .filter(|(n, _)| IN_VM.contains(&n.as_str()))
        .collect();
    for (i, (name, exe)) in files.iter().enumerate() {
        // The tests ended in attempts that never finished: not run again.
        let mut done: Vec<String> = Vec::new();
        let mut tries = 0;
        let ran = loop {
            let script = format!(
                "{}\ncd {} && exec {} --test-threads=1 {}{}\n",
                vm_env(img, iopath),
                root().join("tests").display(),
                exe.display(),
                filter
                    .map(|f| format!("'{}'", f.replace('\'', "")))
                    .unwrap_or_default(),
                done.iter()
                    .map(|t| format!(" --skip {t}"))
                    .collect::<String>()
            );
            let vm = match l1.as_mut() {
                Some(vm) => vm,
                None => match L1::boot(img) {
                    Ok(vm) => l1.insert(vm),
                    Err(e) if crate::vm::interrupted() => return Err(e),
                    Err(e) => {
                        // no VM for what is left: each file one failure
                        eprintln!("xtask: {e:#}: {} files not run", files.len() - i);
                        total.failed += (files.len() - i) as u32;
                        std::fs::write(skip_log, &skipped)?;
                        finish(&mut total, skip_log);
                        return Ok(total);
                    }
                },
            };
            println!("\n== {name} (L1, {})", img.kver);
            let _ = std::fs::remove_file(vm.xchg().join("skips.tsv"));
            match vm.exec(&script, Duration::from_secs(1800), true) {
                Ok(r) => {
                    skipped +=
                        &std::fs::read_to_string(vm.xchg().join("skips.tsv")).unwrap_or_default();
                    break Some(r);
                }
                Err(e) if crate::vm::interrupted() => return Err(e),
                Err(e) => {
                    let wedged = e.is::<crate::vm::Hung>() || vm.died();
                    eprintln!("xtask: {name} in L1: {e:#}; console: {}", vm.console_tail());
                    if wedged && !vm.died() {
                        eprintln!(
                            "xtask: QEMU's threads (CPU over 1 s): {}",
                            vm.qemu_threads()
                        );
                        eprintln!("xtask: L1's vCPUs: {}", vm.qemu_registers());
                    }
                    // What ended before it stopped counts; the rest runs again.
                    let (passed, failed) = ended(vm.partial());
                    skipped +=
                        &std::fs::read_to_string(vm.xchg().join("skips.tsv")).unwrap_or_default();
                    total.passed += passed.len() as u32;
                    total.failed += failed.len() as u32;
                    for t in failed.iter() {
                        eprintln!("xtask: {name}: {t} failed before L1 stopped");
                    }
                    done.extend(passed);
                    done.extend(failed);
                    l1 = None; // stopped; the next run boots a fresh one
                    tries += 1;
                    if wedged && tries < ATTEMPTS {
                        eprintln!(
                            "xtask: running {name} again in a fresh L1, without the {} tests \
                             that ended (attempt {} of {ATTEMPTS})",
                            done.len(),
                            tries + 1
                        );
                        continue;
                    }
                    break None;
                }
            }
        };
        match ran {
            Some((rc, text)) => tally(&text, rc == 0, name, &mut total),
            None => {
                eprintln!("xtask: {name}: the test it stopped in counted as one failure");
                total.failed += 1;
            }
        }
    }
    drop(l1);
    std::fs::write(skip_log, &skipped)?;
    finish(&mut total, skip_log);
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_ended_tests_are_told_from_the_one_it_stopped_in() {
        let partial = "\nrunning 4 tests\n\
            test a_first ... ok\n\
            test b_second ... l2: ready, qemu pid 936, vhost=on\n\
            ok\n\
            test c_third ... FAILED\n\
            test d_fourth ... l2: ready, qemu pid 1454, vhost=on\n\
            l2: test ok\n";
        let (passed, failed) = ended(partial);
        assert_eq!(passed, ["a_first", "b_second"]);
        assert_eq!(failed, ["c_third"]);
        assert_eq!(ended("test x ... ").0.len(), 0);
    }

    #[test]
    fn libtest_summaries_are_added_up() {
        let text = "test a ... ok\n\
            test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 23.00s\n\
            test result: FAILED. 2 passed; 3 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3s\n";
        let (c, n) = results(text);
        assert_eq!((c.passed, c.failed, n), (6, 3, 2));
        assert_eq!(results("thread panicked").1, 0);
    }
}
