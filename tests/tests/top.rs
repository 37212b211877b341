//! `iopath top` in a real terminal: tmux at 80x24 runs it under block I/O on a loop device;
//! its first screen has the columns and a live row, keys change the sort and the filter, and
//! `q` exits 0 with the terminal as it was (main screen, the tty's settings).

use std::{
    process::{Command, Output},
    thread::sleep,
    time::{Duration, Instant},
};

use iopath_tests::{LoopDev, Vmm, Why, have, iopath_bin, require_root, skip};

const TEST: &str = "top_shows_live_rows_at_80x24_and_q_leaves_the_terminal_as_it_was";

/// tmux on a server of the test's own.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        // -f /dev/null: none of the user's tmux settings
        Command::new("tmux")
            .args(["-f", "/dev/null", "-L", &self.0])
            .args(args)
            .output()
            .expect("tmux (cargo xtask setup)")
    }

    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen satisfies `ok` (within `within`), and returns it.
    fn wait_for(&self, within: Duration, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {within:?}; the screen:\n{s}"
            );
            sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The RATE/s of the screen's first `stage` row, if any.
fn rate_of(screen: &str, stage: &str) -> Option<f64> {
    let line = screen.lines().find(|l| l.contains(stage))?;
    let after = &line[line.find(stage)? + stage.len()..];
    after.split_whitespace().next()?.parse().ok()
}

#[test]
fn top_shows_live_rows_at_80x24_and_q_leaves_the_terminal_as_it_was() {
    require_root();
    if !have("tmux") {
        skip(TEST, Why::Setup, "tmux is not installed");
        return;
    }
    let lo = LoopDev::new("top", 16);
    let tmux = Tmux(format!("iopath-top-{}", std::process::id()));
    // The tty's settings before and after, and the exit status, printed where the test reads
    // them once top is gone.
    let script = format!(
        "a=$(stty -g); {} top --syscall-tracepoints; rc=$?; b=$(stty -g); [ \"$a\" = \"$b\" ] && echo tty-same; \
         echo exit=$rc; sleep 120",
        iopath_bin().display()
    );
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "80",
        "-y",
        "24",
        "sh",
        "-c",
        &script,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Load until a blk.device row shows a rate and the test VMM's exits have a row (bounded:
    // 30 s, 300 rounds).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut screen = String::new();
    for round in 0..300 {
        lo.direct_io(20, 20);
        if round % 10 == 0 {
            Vmm::run("top-vm", &["pio", "--count", "20"], 300).wait();
        }
        sleep(Duration::from_millis(100));
        screen = tmux.screen();
        let live = rate_of(&screen, "blk.device").is_some_and(|r| r > 0.0)
            && screen.contains("kvm.userspace_exit");
        if live || Instant::now() > deadline {
            break;
        }
    }
    eprintln!("{screen}");
    for col in [
        "VM", "STAGE", "RATE/s", "P50 us", "P99 us", "MAX us", "TREND",
    ] {
        assert!(screen.contains(col), "no {col} column:\n{screen}");
    }
    let rate = rate_of(&screen, "blk.device");
    assert!(
        rate.is_some_and(|r| r > 0.0),
        "no live blk.device row:\n{screen}"
    );
    // Laid out for 80x24: the key line last, the trend column's title whole, the loop
    // device's row with figures (a host disk's: under "(host)").
    let lines: Vec<&str> = screen.lines().collect();
    assert!(
        lines.len() == 24 && lines[23].starts_with("q quit"),
        "the key line is the 24th:\n{screen}"
    );
    assert!(lines[1].trim_end().ends_with("TREND"), "{}", lines[1]);
    let blk = lines
        .iter()
        .find(|l| l.starts_with("(host)") && l.contains("blk.device"))
        .unwrap_or_else(|| panic!("no host blk.device row:\n{screen}"));
    let figures: Vec<&str> = blk.split_whitespace().collect();
    assert!(
        figures.len() >= 6 && figures[3..6].iter().all(|f| *f != "-"),
        "p50, p99 and max of the loop device's I/O: {blk}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("top-vm") && l.contains("kvm.userspace_exit")),
        "the test VMM's exits under its name:\n{screen}"
    );
    // Keys: the sort goes from p99 to p50, the path filter to one path.
    assert!(screen.contains("sort p99"), "{screen}");
    tmux.run(&["send-keys", "-t", "top", "s"]);
    tmux.wait_for(Duration::from_secs(5), "sort p50", |s| {
        s.contains("sort p50")
    });
    tmux.run(&["send-keys", "-t", "top", "p"]);
    let filtered = tmux.wait_for(Duration::from_secs(5), "a path filter", |s| {
        !s.contains("path all")
    });
    assert!(filtered.contains("path block"), "{filtered}");
    assert!(!filtered.contains("kvm."), "only block rows:\n{filtered}");
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let after = tmux.wait_for(Duration::from_secs(15), "top's exit", |s| {
        s.contains("exit=")
    });
    assert!(after.contains("exit=0"), "{after}");
    assert!(
        after.contains("tty-same"),
        "the tty's settings changed:\n{after}"
    );
    assert!(
        !after.contains("STAGE"),
        "top's screen is still shown:\n{after}"
    );
    let alt = tmux.run(&["display-message", "-p", "-t", "top", "#{alternate_on}"]);
    assert_eq!(
        String::from_utf8_lossy(&alt.stdout).trim(),
        "0",
        "still on the alternate screen"
    );
}

#[test]
fn top_without_a_terminal_is_a_one_line_error() {
    require_root();
    let out = Command::new(iopath_bin())
        .arg("top")
        .output()
        .expect("run iopath");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("needs a terminal"), "{err}");
}
