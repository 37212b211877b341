//! Debian's Prometheus, run by a test on loopback: its configuration written by the test, its
//! data in a directory of its own, stopped and removed on drop. Its HTTP API is read with curl
//! (Go answers in chunks, which [`crate::http_get`] does not decode).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use crate::free_port;

pub struct Prometheus {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

/// GET `url` with curl and `args`: the body, as JSON.
fn curl_json(url: &str, args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl (cargo xtask setup)");
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

impl Prometheus {
    /// Starts Prometheus with `config` (prometheus.yml's text) and `extra` flags; returns once
    /// it is ready.
    pub fn start(config: &str, extra: &[&str]) -> Prometheus {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("iopath-prom-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (cargo xtask setup installs it)");
        let mut p = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = Command::new("curl")
                .args(["-sf", "--max-time", "2"])
                .arg(format!("http://127.0.0.1:{port}/-/ready"))
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return p;
            }
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!("prometheus exited with {st}: {}", p.log());
            }
            sleep(Duration::from_millis(200));
        }
        panic!("prometheus not ready within 60 s: {}", p.log());
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `data` of an API answer (`path` with its query string).
    pub fn api(&self, path: &str, args: &[&str]) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let v = curl_json(&url, args).unwrap_or_else(|| panic!("prometheus {path} {args:?}"));
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let q = format!("query={expr}");
        self.api("/api/v1/query", &["-G", "--data-urlencode", &q])["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The active targets once each has been scraped (health `up` or `down`), within `within`.
    pub fn scraped_targets(&self, within: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let targets = self.api("/api/v1/targets", &[])["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !targets.is_empty() && targets.iter().all(|t| t["health"] != "unknown") {
                return targets;
            }
            assert!(
                Instant::now() < deadline,
                "targets not scraped within {within:?}: {targets:?}"
            );
            sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        crate::exit_within(&mut self.child, Duration::from_secs(10));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
