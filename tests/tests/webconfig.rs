//! `--web.config.file`: TLS and basic auth, proven with the clients that use them: Debian's
//! Prometheus scraping a running daemon (the right password: up, with data; a wrong one: down
//! with 401) and curl (no password, plain HTTP, a rotated certificate, client certificates).
//! Certificates are made by openssl and the bcrypt hash by python3's crypt (libxcrypt), not by
//! the crates iopath checks them with.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use iopath_tests::{Daemon, prom::Prometheus, require_root, self_signed_cert};

const USER: &str = "prom";
const PASSWORD: &str = "correct horse battery staple";

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{} (cargo xtask setup): {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory of the test's own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("iopath-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bcrypt hash of `password` at cost 10, as htpasswd -B would write it.
fn bcrypt(password: &str) -> String {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt, sys; print(crypt.crypt(sys.argv[1], \
             crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1024)))",
            password,
        ])
        .output()
        .expect("python3 (cargo xtask setup)");
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$2b$10$"), "python3's crypt: {hash:?}");
    hash
}

/// curl's HTTP status for `url` with `args` ("000": no HTTP answer), and the headers and body.
fn curl(url: &str, args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl (cargo xtask setup)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().to_string(), rest.to_string())
}

#[test]
fn prometheus_scrapes_over_tls_with_the_right_password_and_gets_401_with_a_wrong_one() {
    require_root();
    let dir = Dir::new("webconfig");
    self_signed_cert(&dir.0, "server", "iopath-test");
    let web = dir.path("web.yml");
    std::fs::write(
        &web,
        format!(
            "# written by the test\ntls_server_config:\n  cert_file: server.crt\n  key_file: \
             server.key\nbasic_auth_users:\n  {USER}: '{}'\n",
            bcrypt(PASSWORD)
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--web.config.file", &web]);
    let url = format!("https://127.0.0.1:{}/metrics", d.port);
    let ca = dir.path("server.crt");
    let right = format!("{USER}:{PASSWORD}");

    let (code, body) = curl(&url, &["--cacert", &ca, "-u", &right]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("iopath_stage_attached"), "{body}");
    let (code, head) = curl(&url, &["--cacert", &ca, "-u", &format!("{USER}:wrong")]);
    assert_eq!(code, "401", "{head}");
    let (code, head) = curl(&url, &["--cacert", &ca]);
    assert_eq!(code, "401", "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"iopath\""),
        "{head}"
    );
    // Every path is behind the password, not only /metrics.
    let quantiles = format!("https://127.0.0.1:{}/quantiles", d.port);
    assert_eq!(curl(&quantiles, &["--cacert", &ca]).0, "401");
    // No plain HTTP on a TLS port, and no TLS without the server's certificate trusted.
    assert_eq!(
        curl(&url.replace("https", "http"), &["-u", &right]).0,
        "000"
    );
    assert_eq!(curl(&url, &["-u", &right]).0, "000");

    // Prometheus itself, two jobs on the same target: the right password and a wrong one.
    let job = |name: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    \
             basic_auth:\n      username: {USER}\n      password: '{password}'\n    \
             static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            d.port
        )
    };
    let config = format!(
        "# written by the test\nglobal:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n\
         scrape_configs:\n{}{}",
        job("right", PASSWORD),
        job("wrong", "wrong")
    );
    let p = Prometheus::start(&config, &[]);
    // Until the right job is up and the wrong one was refused (a first scrape on a busy
    // machine may time out: its TLS handshake and bcrypt are the slow ones).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (ok, refused) = loop {
        let targets = p.scraped_targets(Duration::from_secs(60));
        let of = |name: &str| {
            targets
                .iter()
                .find(|t| t["labels"]["job"] == name)
                .unwrap_or_else(|| panic!("no {name} target in {targets:?}"))
                .clone()
        };
        let (ok, refused) = (of("right"), of("wrong"));
        let settled = ok["health"] == "up"
            && refused["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("401"));
        if settled || std::time::Instant::now() > deadline {
            break (ok, refused);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "right password: {}, {:?}; wrong: {}, {:?}",
        ok["health"], ok["lastError"], refused["health"], refused["lastError"]
    );
    assert_eq!(ok["health"], "up", "{ok}");
    assert_eq!(refused["health"], "down", "{refused}");
    assert!(
        refused["lastError"].as_str().unwrap_or("").contains("401"),
        "{refused}"
    );
    let series = p.query(r#"iopath_stage_attached{job="right"}"#);
    assert!(!series.is_empty(), "no iopath_stage_attached scraped");
    assert!(p.query(r#"iopath_stage_attached{job="wrong"}"#).is_empty());
    drop(p);

    // A rotated certificate is served on the next connection, without a restart.
    self_signed_cert(&dir.0, "next", "iopath-test-rotated");
    std::fs::rename(dir.path("next.key"), dir.path("server.key")).unwrap();
    std::fs::rename(dir.path("next.crt"), dir.path("rotated.crt")).unwrap();
    std::fs::copy(dir.path("rotated.crt"), dir.path("server.crt")).unwrap();
    let rotated = dir.path("rotated.crt");
    // (the files are looked at once a second at most)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (code, body) = loop {
        let (code, body) = curl(&url, &["--cacert", &rotated, "-u", &right]);
        if code == "200" || std::time::Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(code, "200", "after rotation: {body}");
    assert!(d.stop().success());
}

#[test]
fn client_certificates_are_required_when_the_file_says_so() {
    require_root();
    let dir = Dir::new("webconfig-mtls");
    self_signed_cert(&dir.0, "server", "iopath-test");
    // A CA and a client certificate it signed (clientAuth, a v3 certificate as webpki wants).
    self_signed_cert(&dir.0, "ca", "iopath-test-ca");
    run(
        &dir.0,
        &[
            "openssl",
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=scraper",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
        ],
    );
    std::fs::write(dir.0.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(
        &dir.0,
        &[
            "openssl",
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "client.ext",
            "-out",
            "client.crt",
        ],
    );
    let web = dir.path("web.yml");
    std::fs::write(
        &web,
        "# written by the test\ntls_server_config:\n  cert_file: server.crt\n  key_file: \
         server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  \
         min_version: TLS13\n",
    )
    .unwrap();
    let d = Daemon::start(&["--web.config.file", &web]);
    let url = format!("https://127.0.0.1:{}/metrics", d.port);
    let ca = dir.path("server.crt");
    // curl trusting the server, presenting `name`.crt and .key, with `more` arguments
    let with_cert = |name: &str, more: &[&str]| {
        let (cert, key) = (
            dir.path(&format!("{name}.crt")),
            dir.path(&format!("{name}.key")),
        );
        let mut args = vec!["--cacert", &ca, "--cert", &cert, "--key", &key];
        args.extend(more);
        curl(&url, &args)
    };
    let (code, body) = with_cert("client", &[]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("iopath_stage_attached"));
    // Without a client certificate, or with one the CA did not sign: no HTTP at all.
    assert_eq!(curl(&url, &["--cacert", &ca]).0, "000");
    let (code, _) = with_cert("server", &[]);
    assert_eq!(code, "000", "a certificate the CA did not sign");
    // min_version TLS13: a TLS 1.2 client is refused.
    let (code, _) = with_cert("client", &["--tls-max", "1.2"]);
    assert_eq!(code, "000", "TLS 1.2 against min_version TLS13");
    assert!(d.stop().success());
}
