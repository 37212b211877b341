//! The deployment files in `deploy/`: the systemd unit passes `systemd-analyze verify`, and the
//! daemon run with exactly its capabilities (uid 0, no others) attaches the same stages as
//! with full root and answers on /metrics; the Kubernetes DaemonSet parses and hands the binary
//! flags it accepts, with the capabilities the unit names.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use iopath_tests::{Daemon, iopath, iopath_bin, require_root};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn unit() -> String {
    std::fs::read_to_string(deploy().join("iopath.service")).unwrap()
}

/// The values of `key=` lines of the unit.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// The unit's capabilities as setpriv names them (cap_bpf -> bpf).
fn unit_caps(unit: &str) -> BTreeSet<String> {
    let bounding = unit_values(unit, "CapabilityBoundingSet");
    let ambient = unit_values(unit, "AmbientCapabilities");
    assert_eq!(bounding, ambient, "the unit's bounding and ambient sets");
    bounding[0]
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

#[test]
fn the_systemd_unit_verifies_and_its_capabilities_attach_what_root_does() {
    require_root();
    let unit = unit();
    let exec = unit_values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1, "{exec:?}");
    let mut argv = exec[0].split_whitespace();
    assert_eq!(argv.next(), Some("/usr/local/bin/iopath"));
    let args: Vec<&str> = argv.collect();
    assert_eq!(args[0], "serve", "{args:?}");
    // The unit as shipped but for where the binary is (systemd-analyze checks it exists):
    // no warning, no error.
    let dir = std::env::temp_dir().join(format!("iopath-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("iopath.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/iopath", iopath_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (systemd)");
    std::fs::remove_dir_all(&dir).unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    // Its flags, on a free port, run as uid 0 with its capabilities only.
    let caps = unit_caps(&unit);
    for c in ["bpf", "perfmon"] {
        assert!(caps.contains(c), "{caps:?}");
    }
    // uid 0 with the unit's bounding set: root's effective set is then exactly that (the
    // ambient set only matters for another user). setpriv drops the rest.
    let set = caps
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let bound = format!("--bounding-set=-all,{set}");
    let wrapper = ["setpriv", &bound, "--"];
    let extra: Vec<&str> = args[1..]
        .chunks(2)
        .filter(|kv| kv[0] != "--web.listen-address")
        .flatten()
        .copied()
        .collect();
    let attached = |d: &Daemon| -> BTreeSet<String> {
        let m = d.metrics();
        m.find("iopath_stage_attached", &[])
            .iter()
            .filter(|s| s.value == 1.0)
            .map(|s| s.labels["stage"].clone())
            .collect()
    };
    let capped = Daemon::start_under(&wrapper, &iopath_bin(), &extra);
    // the daemon's own effective set is the unit's, nothing more
    let status = std::fs::read_to_string(format!("/proc/{}/status", capped.child.id())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    // linux/capability.h; a capability this machine's own bounding set lacks (a container's,
    // say) cannot be had either
    let number = |c: &str| match c {
        "sys_ptrace" => 19,
        "sys_resource" => 24,
        "syslog" => 34,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("the unit names {other}: add its number here"),
    };
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let own_bound = own
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let want = caps.iter().fold(0u64, |m, c| m | 1 << number(c)) & own_bound;
    assert_eq!(
        eff, want,
        "CapEff {eff:#x}: the unit's {caps:?} that this machine has"
    );
    let with_caps = attached(&capped);
    assert!(capped.stop().success());
    let root = Daemon::start(&extra);
    let with_root = attached(&root);
    assert!(root.stop().success());
    eprintln!("stages attached with the unit's capabilities: {with_caps:?}");
    assert!(with_caps.contains("blk.device"), "{with_caps:?}");
    assert_eq!(with_caps, with_root, "the unit's capabilities against root");
}

#[test]
fn the_daemonset_parses_and_passes_flags_the_binary_accepts() {
    let path = deploy().join("iopath-daemonset.yaml");
    let ds = iopath_tests::yaml(&path);
    assert_eq!(ds["kind"], "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "VMs are named from the host's /proc");
    assert_eq!(pod["hostNetwork"], true, "the taps are the host's");
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    let added: BTreeSet<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_lowercase())
        .collect();
    assert_eq!(
        added,
        unit_caps(&unit()),
        "the DaemonSet's capabilities and the unit's"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The binary takes them: a bad flag or value exits 2 at once; these get as far as the
    // privilege check (as nobody) or serving, so run them with a value check only: `--help`
    // after them parses the lot.
    let mut check: Vec<&str> = args.clone();
    check.push("--help");
    let out = iopath(&check);
    assert!(
        out.status.success(),
        "iopath {}: {}",
        check.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8_lossy(&iopath(&["serve", "--help"]).stdout).into_owned();
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag), "serve has no {flag}: {help}");
    }
    let port = args[args
        .iter()
        .position(|a| *a == "--web.listen-address")
        .unwrap()
        + 1]
    .rsplit(':')
    .next()
    .unwrap()
    .to_string();
    assert_eq!(c["ports"][0]["containerPort"].to_string(), port);
    let mounts: BTreeSet<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(mounts.contains("/sys/kernel/tracing"), "{mounts:?}");
    // each mount is the host's own path
    for v in pod["volumes"].as_array().unwrap() {
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == v["name"])
            .unwrap();
        assert_eq!(v["hostPath"]["path"], m["mountPath"], "{v}");
    }
    // VM names need another process's /proc/PID/fd: no AppArmor confinement
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");
}
