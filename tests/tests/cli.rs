//! Bad input and shutdown: a one-line error, a non-zero exit, and nothing left attached.

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Output},
};

use iopath_tests::{Daemon, iopath, iopath_bin, leftover_programs, loaded_programs, require_root};

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

/// Runs a copy of `bin` (in a directory user nobody can read) as nobody, with no
/// capabilities, once with each argument list.
fn as_nobody(bin: &std::path::Path, runs: &[&[&str]]) -> Vec<Output> {
    let dir = std::env::temp_dir().join(format!("iopath-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.join(bin.file_name().unwrap());
    std::fs::copy(bin, &copy).unwrap();
    let outs = runs
        .iter()
        .map(|args| {
            Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--",
                ])
                .arg(&copy)
                .args(*args)
                .current_dir(&dir)
                .output()
                .expect("setpriv (util-linux)")
        })
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    outs
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
fn bad_buckets_families_and_sizes() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["serve", "--buckets", "3"],
            "invalid --buckets \"3\" (1, 2, 4 or 8 per power of two)",
        ),
        (
            &["doctor", "--families", "tp_btf,uprobe"],
            "unknown program family \"uprobe\"",
        ),
        (
            &["doctor", "--event-family", "bogus=kprobe"],
            "--event-family: no event \"bogus\" in the stage table",
        ),
        (
            &["doctor", "--event-family", "kvm_entry=kprobe"],
            "--event-family: kvm_entry has no kprobe program (it has tp_btf, raw_tp, tracepoint)",
        ),
        (
            &["doctor", "--event-family", "kvm_entry"],
            "--event-family \"kvm_entry\": EVENT=FAMILY",
        ),
    ];
    for (args, want) in cases {
        one_line_error(&iopath(args), 2, want);
    }
    for flag in ["--start-entries", "--hist-entries"] {
        one_line_error(
            &iopath(&["serve", flag, "0"]),
            2,
            &format!("invalid value '0' for '{flag}"),
        );
    }
}

#[test]
fn port_in_use() {
    require_root();
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
    require_root();
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
    require_root();
    one_line_error(
        &iopath(&["doctor", "--stages", "blk.nope"]),
        1,
        "unknown stage \"blk.nope\"",
    );
    nothing_left();
}

#[test]
fn not_root() {
    require_root();
    let runs: [&[&str]; 3] = [
        &["doctor"],
        &["serve", "--listen", "127.0.0.1:0"],
        &["record", "--duration", "1s"],
    ];
    for out in as_nobody(&iopath_bin(), &runs) {
        one_line_error(&out, 1, "iopath needs root, or CAP_BPF and CAP_PERFMON");
    }
    nothing_left();
}

/// A web config that cannot be used stops serve before anything is attached: a missing file,
/// a password that is no bcrypt hash, a key the reader does not know, a certificate that is not
/// there, a key that is not the certificate's.
#[test]
fn bad_web_config_files() {
    require_root();
    let dir = std::env::temp_dir().join(format!("iopath-badweb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["a", "b"] {
        iopath_tests::self_signed_cert(&dir, name, "iopath-test");
    }
    let cases = [
        ("", "No such file or directory"),
        ("basic_auth_users:\n  prom: hunter2\n", "not a bcrypt hash"),
        (
            "http_server_config:\n  http2: false\n",
            "unknown field `http_server_config`",
        ),
        (
            "tls_server_config:\n  cert_file: none.crt\n  key_file: a.key\n",
            "none.crt",
        ),
        (
            "tls_server_config:\n  cert_file: a.crt\n  key_file: b.key\n",
            "cert_file",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let web = dir.join(format!("web{i}.yml"));
        if !text.is_empty() {
            std::fs::write(&web, text).unwrap();
        }
        let out = iopath(&[
            "serve",
            "--web.listen-address",
            "127.0.0.1:0",
            "--web.config.file",
            web.to_str().unwrap(),
        ]);
        one_line_error(&out, 1, needle);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("web config {}", web.display())),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    nothing_left();
}

#[test]
fn sigterm_detaches_everything() {
    require_root();
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

#[test]
fn xtask_test_refuses_to_run_without_root() {
    require_root();
    // The xtask binary `cargo xtask` built, copied where an unprivileged user can run it.
    let xtask = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xtask");
    assert!(
        xtask.exists(),
        "{} (cargo xtask builds it)",
        xtask.display()
    );
    let out = as_nobody(&xtask, &[&["test"]]).remove(0);
    one_line_error(&out, 1, "run it as root");
}

/// `compare` and `report` on a capture need no privileges; what is not a capture, or a VM not
/// in it, or a page that cannot be written, is one line and exit 1. The capture is written by
/// hand: one VM with a paravirtual receive stage and a passed-through NIC's interrupts.
#[test]
fn compare_and_report_read_a_capture_without_privileges_and_refuse_bad_ones() {
    require_root();
    let dir = std::env::temp_dir().join(format!("iopath-compare-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let capture = serde_json::json!({
        "series": [
            {"stage": "net.rx.backend_queue",
             "labels": {"vm": "db", "backend": "vhost", "tap": "tap0", "queue": "0"},
             "sum_ns": 20 * 61035, "buckets": [[61035, 20]]},
            {"stage": "vfio.handler_to_inject",
             "labels": {"vm": "db", "device": "0000:01:00.0", "vector": "0"},
             "sum_ns": 10 * 15258, "buckets": [[15258, 10]]},
        ],
        "vfio_devices": [{"device": "0000:01:00.0", "vm": "db", "class": "0x020000",
                          "kind": "network", "posted_vectors": [], "remapped_vectors": ["0"]}],
        "timelines": [{"trace_id": "00000000000000ab", "total_us": 1100.0, "start_unix": 0.0,
                       "steps": [
            {"stage": "net.rx.backend_queue", "labels": {"vm": "db", "tap": "tap0"},
             "start_us": 0.0, "us": 1000.0},
            {"stage": "net.rx.backend_to_irq", "labels": {"vm": "db", "tap": "tap0"},
             "start_us": 1000.0, "us": 100.0}]}],
    });
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let good = file("run.json", &capture.to_string());
    let not_json = file("bad.json", "STAGE LABELS\n");
    let not_capture = file("other.json", "{\"stages\": []}");
    // /tmp is writable by nobody (sticky), the capture's directory is not
    let page = std::env::temp_dir().join(format!("iopath-report-cli-{}.html", std::process::id()));
    let page = page.to_str().unwrap();
    let unwritable = dir.join("report.html");
    // a page over a directory: the temporary file is written beside it, the rename fails
    let over = format!("{page}.d");
    std::fs::create_dir_all(format!("{over}/x")).unwrap();
    let runs: [&[&str]; 12] = [
        &["compare", "--vm", "db", "--input", &good],
        &["compare", "--vm", "web", "--input", &good],
        &["compare", "--vm", "db", "--input", &not_json],
        &["compare", "--vm", "db", "--input", &not_capture],
        &["compare", "--vm", "db", "--input", "/nonexistent/run.json"],
        &["report", &good],
        &["report", &good, "--html", page],
        &["report", &good, "--vm", "web"],
        &["report", &not_capture],
        &["report", &good, "--html", unwritable.to_str().unwrap()],
        &["report", "/nonexistent/run.json"],
        &["report", &good, "--html", &over],
    ];
    let outs = as_nobody(&iopath_bin(), &runs);
    let html = std::fs::read_to_string(page);
    let _ = std::fs::remove_file(page);
    let _ = std::fs::remove_dir_all(&over);
    let tmp_left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("iopath-report-cli-{}.html", std::process::id())))
        .collect();
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    let table = String::from_utf8_lossy(&outs[0].stdout);
    assert!(outs[0].status.success(), "{:?}", outs[0]);
    // 10 interrupts in (15.258, 16.639] µs (bounds of schema 3): p50 halfway, 15.9
    assert!(
        table.contains("passthrough interrupt") && table.contains("15.9"),
        "{table}"
    );
    assert!(table.contains("paravirtual receive"), "{table}");
    one_line_error(
        &outs[1],
        1,
        "no series of vm \"web\" in the capture (vms in it: db)",
    );
    one_line_error(&outs[2], 1, "bad.json is not JSON");
    one_line_error(&outs[3], 1, "not a capture of `iopath record --json`");
    one_line_error(&outs[4], 1, "reading /nonexistent/run.json");
    // report: the passthrough interrupt's waterfall (its stage alone: no kvm.inject_to_entry
    // in the capture), the receive one, and the page
    let table = String::from_utf8_lossy(&outs[5].stdout);
    assert!(outs[5].status.success(), "{:?}", outs[5]);
    for want in [
        "passthrough interrupt (VFIO)",
        "network receive (paravirtual)",
        "not measured: net.rx.host_stack, net.rx.backend_to_irq, kvm.inject_to_entry",
        "an older iopath",
        "Sampled I/Os, the slowest",
        "trace 00000000000000ab vm=\"db\"",
    ] {
        assert!(table.contains(want), "report lacks {want:?}: {table}");
    }
    // the trace's stages, each with its start after the first and its length
    assert!(
        table.lines().any(|l| l.contains("net.rx.backend_to_irq")
            && l.contains("+    1000.0 µs")
            && l.contains("100.0 µs")),
        "{table}"
    );
    assert!(outs[6].status.success(), "{:?}", outs[6]);
    let html = html.expect("report --html wrote its page");
    assert!(
        html.contains("id=\"waterfall-passthrough-interrupt\"")
            && html.contains("id=\"hist-vfio-handler-to-inject\""),
        "{html}"
    );
    assert!(
        html.contains("<section id=\"timelines\">")
            && html.contains("data-trace=\"00000000000000ab\"")
            && html.contains("<td>net.rx.backend_to_irq</td><td>+1000.0</td><td>100.0</td>"),
        "{html}"
    );
    one_line_error(
        &outs[7],
        1,
        "no series of vm \"web\" in the capture (vms in it: db)",
    );
    one_line_error(&outs[8], 1, "not a capture of `iopath record --json`");
    one_line_error(&outs[9], 1, "report.html");
    one_line_error(&outs[10], 1, "reading /nonexistent/run.json");
    // a refused page leaves nothing behind: no half-written or temporary file
    assert_eq!(left.len(), 3, "files left: {left:?}");
    one_line_error(&outs[11], 1, &format!("writing {over}"));
    assert!(
        tmp_left.is_empty(),
        "left in the temporary directory: {tmp_left:?}"
    );
}

/// `record --output` into a directory that is not there is refused before anything attaches.
#[test]
fn record_output_that_cannot_be_written_is_refused_before_attaching() {
    require_root();
    one_line_error(
        &iopath(&[
            "record",
            "--duration",
            "1s",
            "--output",
            "/nonexistent/dir/run.json",
        ]),
        1,
        "cannot write /nonexistent/dir/run.json: /nonexistent/dir is not a writable directory",
    );
    one_line_error(
        &iopath(&["record", "--duration", "1s", "--output", "/tmp"]),
        1,
        "/tmp is a directory",
    );
    // A directory that goes while recording: the capture is not lost, it goes to stdout.
    let dir = std::env::temp_dir().join(format!("iopath-gone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("run.json");
    let mut rec = std::process::Command::new(iopath_bin())
        .args([
            "record",
            "--duration",
            "2s",
            "--stages",
            "blk.device",
            "--output",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(rec.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("recording for") {
        use std::io::BufRead as _;
        let n = err.read_line(&mut said).unwrap();
        assert!(n > 0, "record ended before recording: {said}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let done = rec.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(1), "{rest}");
    assert!(
        rest.trim_end()
            .ends_with("the capture went to stdout instead")
            || rest.contains("the capture went to stdout instead"),
        "{rest}"
    );
    let capture: serde_json::Value =
        serde_json::from_slice(&done.stdout).expect("the capture on stdout");
    assert!(capture["series"].is_array(), "{capture}");
    nothing_left();
}
