//! Bad input and shutdown: a one-line error, a non-zero exit, and nothing left attached.

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Output},
};

use iopath_tests::{Daemon, can_trace, iopath, iopath_bin, leftover_programs, loaded_programs};

/// Fails unless `out` is a failure with exactly one line on stderr containing `needle`.
fn one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit status; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line, got: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
}

fn nothing_left() {
    assert!(
        leftover_programs().is_empty(),
        "programs left loaded: {:?}",
        leftover_programs()
    );
}

#[test]
fn unknown_flag() {
    one_line_error(
        &iopath(&["serve", "--no-such-flag"]),
        2,
        "unexpected argument '--no-such-flag'",
    );
    one_line_error(&iopath(&["frobnicate"]), 2, "unrecognized subcommand");
}

#[test]
fn bad_listen_address_and_duration() {
    one_line_error(
        &iopath(&["serve", "--listen", "localhost:notaport"]),
        2,
        "invalid value 'localhost:notaport'",
    );
    one_line_error(
        &iopath(&["record", "--duration", "soon"]),
        2,
        "invalid duration",
    );
}

#[test]
fn port_in_use() {
    if !can_trace("port_in_use") {
        return;
    }
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    one_line_error(
        &iopath(&["serve", "--listen", &addr]),
        1,
        &format!("cannot listen on {addr}"),
    );
    nothing_left();
}

#[test]
fn missing_tracefs() {
    if !can_trace("missing_tracefs") {
        return;
    }
    for args in [
        &[
            "serve",
            "--tracefs",
            "/nonexistent/tracing",
            "--listen",
            "127.0.0.1:0",
        ][..],
        &["record", "--tracefs", "/nonexistent/tracing"],
        &["doctor", "--tracefs", "/nonexistent/tracing"],
    ] {
        one_line_error(
            &iopath(args),
            1,
            "tracefs is not mounted at /nonexistent/tracing",
        );
    }
    nothing_left();
}

#[test]
fn unknown_stage() {
    if !can_trace("unknown_stage") {
        return;
    }
    one_line_error(
        &iopath(&["doctor", "--stages", "blk.nope"]),
        1,
        "unknown stage \"blk.nope\"",
    );
    nothing_left();
}

#[test]
fn not_root() {
    if !can_trace("not_root") {
        return;
    }
    // A copy of the binary that an unprivileged user can run.
    let dir = std::env::temp_dir().join(format!("iopath-noroot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("iopath");
    std::fs::copy(iopath_bin(), &bin).unwrap();
    for args in [
        &["doctor"][..],
        &["serve", "--listen", "127.0.0.1:0"],
        &["record", "--duration", "1s"],
    ] {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ])
            .arg(&bin)
            .args(args)
            .output()
            .expect("setpriv (util-linux)");
        one_line_error(&out, 1, "iopath needs root, or CAP_BPF and CAP_PERFMON");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    nothing_left();
}

#[test]
fn sigterm_detaches_everything() {
    if !can_trace("sigterm_detaches_everything") {
        return;
    }
    let d = Daemon::start(&[]);
    assert!(!loaded_programs().is_empty(), "serve has programs loaded");
    let status = d.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    nothing_left();
    // Nothing pinned either.
    let pinned: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !pinned
            .iter()
            .any(|n| n.to_string_lossy().contains("iopath")),
        "{pinned:?}"
    );
}
