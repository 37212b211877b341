//! `--web.config.file`: TLS and basic auth for `iopath serve`, in the file format Prometheus'
//! own exporters read (`tls_server_config`, `basic_auth_users` with bcrypt hashes), so one file
//! can serve node_exporter and iopath alike. Paths in it are relative to the file. A key this
//! reader does not know is an error, not ignored: a setting that silently does nothing is worse
//! than a refusal to start.
//!
//! The file and the files it names are read again when any of them changes (checked on each
//! new connection), so a rotated certificate is served without a restart; a change that does
//! not load, or that would turn TLS or the password check on or off (a file caught half
//! written, say), is logged and the previous settings stay: that takes a restart.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{BuildHasher, RandomState},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

/// The web configuration file could not be used: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("web config {path}: {what}")]
pub struct WebConfigError {
    pub path: PathBuf,
    pub what: String,
}

/// The file as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
}

/// Settings loaded from the file: what each new connection uses.
pub struct Loaded {
    /// TLS, when the file has `tls_server_config`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub users: Arc<Users>,
}

/// The users allowed in (none: no authentication), and the passwords already checked.
pub struct Users {
    hashes: BTreeMap<String, String>,
    /// What an unknown user's password is checked against: the costliest hash, so that an
    /// answer for a name that is not there comes no sooner than the slowest user's.
    decoy: Option<String>,
    /// One bcrypt at a time: wrong passwords, which are never cached, cannot take every CPU
    /// of the host from its VMs.
    one_at_a_time: Mutex<()>,
    /// Keyed digests of (user, hash, password) that matched: bcrypt costs tens of
    /// milliseconds by design, too much for every scrape. The keys are this process's own.
    checked: Mutex<HashSet<u64>>,
    keys: RandomState,
}

/// Digests kept at most; past this the cache starts over.
const CHECKED_MAX: usize = 1024;

impl Users {
    pub fn none() -> Users {
        Users {
            hashes: BTreeMap::new(),
            decoy: None,
            one_at_a_time: Mutex::new(()),
            checked: Mutex::new(HashSet::new()),
            keys: RandomState::new(),
        }
    }

    pub fn required(&self) -> bool {
        !self.hashes.is_empty()
    }

    /// Whether an `Authorization` header value names a user and its password. Blocking: a
    /// password not seen before costs one bcrypt, one at a time; an unknown user costs the
    /// costliest user's (users of one cost, the usual case, then answer in one time whether
    /// they exist or not).
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        let (hash, known) = match (self.hashes.get(&user), &self.decoy) {
            (Some(h), _) => (h, true),
            (None, Some(h)) => (h, false),
            (None, None) => return false,
        };
        let digest = self.keys.hash_one((&user, hash, &password));
        if known
            && self
                .checked
                .lock()
                .expect("no panic holds it")
                .contains(&digest)
        {
            return true;
        }
        let ok = {
            let _one = self.one_at_a_time.lock().expect("no panic holds it");
            bcrypt::verify(&password, hash).unwrap_or(false)
        } && known;
        if ok {
            let mut checked = self.checked.lock().expect("no panic holds it");
            if checked.len() >= CHECKED_MAX {
                checked.clear();
            }
            checked.insert(digest);
        }
        ok
    }
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The web configuration of a running daemon: the settings in use, and the files they came
/// from with their modification times.
pub struct WebConfig {
    path: PathBuf,
    current: Mutex<Current>,
}

struct Current {
    loaded: Arc<Loaded>,
    watched: Vec<Stamp>,
    /// When the files were last looked at: at most every [`CHECK_EVERY`], so a busy
    /// endpoint does not stat them on every request.
    checked: Instant,
}

/// How often the files are looked at for changes, at most.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A file and what says it changed: inode, size, modification and change times (a file
/// rewritten within one timestamp tick still changes ctime or size, a renamed-over one inode).
type Stamp = (PathBuf, Option<(u64, u64, i64, i64, i64, i64)>);

fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok();
            let id = m.map(|m| {
                let (ino, len) = (m.ino(), m.len());
                (
                    ino,
                    len,
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
            });
            (p.clone(), id)
        })
        .collect()
}

impl WebConfig {
    /// Reads and checks the file and everything it names (certificates, key, hashes).
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let (loaded, files) = load(path);
        Ok(WebConfig {
            path: path.to_path_buf(),
            current: Mutex::new(Current {
                loaded: Arc::new(loaded?),
                watched: stamps(&files),
                checked: Instant::now(),
            }),
        })
    }

    /// Whether connections are TLS.
    pub fn tls(&self) -> bool {
        self.current
            .lock()
            .expect("no panic holds it")
            .loaded
            .tls
            .is_some()
    }

    /// The settings for a new connection, read again first if a file changed since.
    pub fn current(&self) -> Arc<Loaded> {
        let mut cur = self.current.lock().expect("no panic holds it");
        if cur.checked.elapsed() < CHECK_EVERY {
            return cur.loaded.clone();
        }
        cur.checked = Instant::now();
        let now = stamps(&cur.watched.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
        if now == cur.watched {
            return cur.loaded.clone();
        }
        // The files as they were before this read: a change made while it reads them is seen
        // at the next look.
        let before = now;
        let (loaded, files) = load(&self.path);
        let refused = match loaded {
            Ok(l) if l.tls.is_some() != cur.loaded.tls.is_some() => {
                Some("turning TLS on or off takes a restart".to_string())
            }
            Ok(l) if l.users.required() != cur.loaded.users.required() => {
                Some("turning basic auth on or off takes a restart".to_string())
            }
            Ok(mut l) => {
                // The same users keep the passwords already checked (a certificate rotated).
                if l.users.hashes == cur.loaded.users.hashes {
                    l.users = cur.loaded.users.clone();
                }
                log::info!("web config {}: reloaded", self.path.display());
                cur.loaded = Arc::new(l);
                None
            }
            Err(e) => Some(e.what),
        };
        let stamp_of = |f: &PathBuf| {
            before
                .iter()
                .find(|w| w.0 == *f)
                .cloned()
                .unwrap_or_else(|| stamps(std::slice::from_ref(f)).remove(0))
        };
        match refused {
            // Watched from now on: the files this load read or looked for.
            None => cur.watched = files.iter().map(stamp_of).collect(),
            Some(why) => {
                // One warning per change: kept until the files change again. The old files
                // and those this load looked for (a certificate not there yet) are watched.
                log::warn!(
                    "web config {}: {why}; the previous settings stay",
                    self.path.display()
                );
                let mut watched = before.clone();
                for f in &files {
                    if !watched.iter().any(|w| w.0 == *f) {
                        watched.push(stamp_of(f));
                    }
                }
                cur.watched = watched;
            }
        }
        cur.loaded.clone()
    }
}

/// Loads the file: its settings, and every file it read or looked for (whether it loaded or
/// not).
fn load(path: &Path) -> (Result<Loaded, WebConfigError>, Vec<PathBuf>) {
    let mut files = vec![path.to_path_buf()];
    let loaded = load_into(path, &mut files);
    (loaded, files)
}

fn load_into(path: &Path, files: &mut Vec<PathBuf>) -> Result<Loaded, WebConfigError> {
    let err = |what: String| WebConfigError {
        path: path.to_path_buf(),
        what,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    // An empty file is a valid one that asks for nothing, as in the exporters'.
    let file: File = if text.trim().is_empty() {
        File::default()
    } else {
        serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tls = match &file.tls_server_config {
        Some(t) => {
            let config = tls_config(t, dir, files).map_err(err)?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        }
        None => None,
    };
    let mut decoy: Option<(u32, &String)> = None;
    for (user, hash) in &file.basic_auth_users {
        let cost = bcrypt_cost(hash).ok_or_else(|| {
            err(format!(
                "basic_auth_users: {user}'s password is not a bcrypt hash ($2b$, $2y$ or $2a$, \
                 cost 4 to 31)"
            ))
        })?;
        if decoy.is_none_or(|(c, _)| cost > c) {
            decoy = Some((cost, hash));
        }
    }
    let users = Users {
        decoy: decoy.map(|(_, h)| h.clone()),
        hashes: file.basic_auth_users,
        ..Users::none()
    };
    Ok(Loaded {
        tls,
        users: Arc::new(users),
    })
}

/// The cost of a well-formed bcrypt hash: `$2b$` (or 2a, 2y), a cost of 4 to 31, 22
/// characters of salt and 31 of hash in bcrypt's base64 alphabet.
fn bcrypt_cost(hash: &str) -> Option<u32> {
    let rest = ["$2a$", "$2b$", "$2y$"]
        .iter()
        .find_map(|p| hash.strip_prefix(p))?;
    let (cost, body) = rest.split_once('$')?;
    let cost: u32 = cost.parse().ok().filter(|c| (4..=31).contains(c))?;
    let alphabet = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '/';
    (body.len() == 53 && body.chars().all(alphabet)).then_some(cost)
}

fn tls_config(t: &TlsFile, dir: &Path, files: &mut Vec<PathBuf>) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(v) => {
            return Err(format!(
                "tls_server_config: min_version {v:?} is not offered (TLS12 or TLS13)"
            ));
        }
    };
    let cert_file = dir.join(&t.cert_file);
    let key_file = dir.join(&t.key_file);
    // watched before they are read: one that is not there yet is loaded when it comes
    files.extend([cert_file.clone(), key_file.clone()]);
    let certs = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {}: no PEM certificate in it",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .map_err(|e| format!("key_file {}: {e}", key_file.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let builder = match (t.client_auth_type.as_deref(), &t.client_ca_file) {
        (None | Some("NoClientCert"), None) => builder.with_no_client_auth(),
        (Some("RequireAndVerifyClientCert"), Some(ca)) => {
            let ca = dir.join(ca);
            files.push(ca.clone());
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&ca)
                .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        (Some("RequireAndVerifyClientCert"), None) => {
            return Err(
                "tls_server_config: client_auth_type RequireAndVerifyClientCert needs \
                 client_ca_file"
                    .into(),
            );
        }
        (None | Some("NoClientCert"), Some(_)) => {
            return Err(
                "tls_server_config: client_ca_file without client_auth_type \
                        RequireAndVerifyClientCert"
                    .into(),
            );
        }
        (Some(other), _) => {
            return Err(format!(
                "tls_server_config: client_auth_type {other:?} is not supported \
                 (NoClientCert, RequireAndVerifyClientCert)"
            ));
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("cert_file {}: {e}", cert_file.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(hashes: &[(&str, &str)]) -> Users {
        Users {
            hashes: hashes
                .iter()
                .map(|(u, h)| (u.to_string(), h.to_string()))
                .collect(),
            ..Users::none()
        }
    }

    fn basic(user: &str, password: &str) -> Vec<u8> {
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {creds}").into_bytes()
    }

    #[test]
    fn a_user_gets_in_with_its_password_only() {
        let hash = bcrypt::hash("s3cret:with colon", 4).unwrap();
        let u = users(&[("prom", &hash)]);
        assert!(u.required());
        // Twice: the second answer comes from the cache.
        assert!(u.allows(Some(&basic("prom", "s3cret:with colon"))));
        assert!(u.allows(Some(&basic("prom", "s3cret:with colon"))));
        assert!(!u.allows(Some(&basic("prom", "s3cret"))));
        assert!(!u.allows(Some(&basic("other", "s3cret:with colon"))));
        assert!(!u.allows(None));
        assert!(!u.allows(Some(b"Bearer abc")));
        assert!(!u.allows(Some(b"Basic !!!")));
        assert!(!Users::none().allows(Some(&basic("prom", "x"))));
    }

    #[test]
    fn the_file_is_checked_before_use() {
        let dir = std::env::temp_dir().join(format!("iopath-webconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.yml");
        let refused = |text: &str, what: &str| {
            std::fs::write(&path, text).unwrap();
            let e = WebConfig::load(&path).err().expect("refused").to_string();
            assert!(e.contains(what), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        };
        refused(
            "basic_auth_users:\n  prom: plaintext\n",
            "not a bcrypt hash",
        );
        let good = bcrypt::hash("x", 4).unwrap();
        let cost_99 = good.replacen("$04$", "$99$", 1);
        refused(
            &format!("basic_auth_users:\n  prom: '{cost_99}'\n"),
            "cost 4 to 31",
        );
        refused("http_server_config:\n  http2: false\n", "unknown field");
        refused("basic_auth_users: [\n", "web config");
        refused(
            "tls_server_config:\n  cert_file: none.crt\n  key_file: none.key\n",
            "none.crt",
        );
        std::fs::write(&path, "").unwrap();
        let empty = WebConfig::load(&path).unwrap();
        assert!(!empty.tls() && !empty.current().users.required());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
