//! `iopath serve`: the daemon. Binds the listen address first (a port in use fails before any
//! probe is attached), attaches, then serves HTTP with hyper until SIGINT or SIGTERM, and
//! detaches everything on the way out.
//!
//! One task owns the timers: it collects what has been gone for the grace period (every quarter
//! of it), and it names new VMs as soon as the kernel's notices arrive. Scrapes share snapshots: a
//! scrape takes the newest one read after it arrived, or reads one that every scrape waiting
//! behind it then shares. Connections are capped (the rest get 503), slow or oversized requests
//! are cut off (408 by closing, 431, 400), and accept errors (EMFILE) back off.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    sync::{Mutex, OwnedSemaphorePermit, Semaphore},
};

use crate::{
    export, protobuf, report,
    session::{Options, Session},
    webconfig::WebConfig,
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Timelines /timelines lists, the slowest.
const TIMELINES_SHOWN: usize = 50;
/// How often the timeline ring is read (it holds 26,000 samples).
const TIMELINES_EVERY: Duration = Duration::from_millis(100);
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 128;
/// Request head (line and headers) larger than this: 431.
const MAX_HEAD: usize = 16 * 1024;
/// A client must send a request head within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this, whatever it does.
const CONN_LIFETIME: Duration = Duration::from_secs(300);
/// Pause after a failed accept (EMFILE, ENFILE): the error repeats until a connection closes.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often the network backend threads are looked for: a new one's cost counts from the read
/// that first sees it (`backend`), so from at most this long after its first packet. The look is
/// one walk of NET_RX_BATCH, which holds only backend threads.
const BACKENDS_EVERY: Duration = Duration::from_secs(1);
/// How often what is gone is collected: a quarter of the grace period, between 250 ms and 10 s
/// (each collection walks every growing map's keys, the histogram's included).
fn collect_every(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

/// A scrape's worth of exposition, shared by every scrape that asked for it; each form is
/// made the first time one is asked for.
struct Rendered {
    /// When the read behind it started.
    at: Instant,
    exposition: Arc<export::Exposition>,
    /// OpenMetrics without exemplars (what the other text forms are made from).
    plain: OnceLock<String>,
    openmetrics: OnceLock<Bytes>,
    text: OnceLock<Bytes>,
    protobuf: OnceLock<Bytes>,
}

impl Rendered {
    fn plain(&self) -> &str {
        self.plain
            .get_or_init(|| export::Exposition::openmetrics(&self.exposition))
    }

    fn body(&self, format: &Format) -> Bytes {
        match format {
            Format::Protobuf => self
                .protobuf
                .get_or_init(|| Bytes::from(self.exposition.encode_protobuf())),
            Format::OpenMetrics => self
                .openmetrics
                .get_or_init(|| Bytes::from(self.exposition.with_exemplars(self.plain()))),
            Format::Text => self
                .text
                .get_or_init(|| Bytes::from(export::openmetrics_to_text(self.plain()))),
        }
        .clone()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Format {
    Protobuf,
    OpenMetrics,
    Text,
}

impl Format {
    const fn content_type(&self) -> &'static str {
        match self {
            Format::Protobuf => protobuf::CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS,
            Format::Text => TEXT,
        }
    }
}

/// The format an Accept header prefers, by its q values; on a tie a named type beats a
/// wildcard, then the first listed wins. Prometheus' text format when it names none iopath
/// writes.
fn negotiate(accept: &str) -> Format {
    // (q, named rather than a wildcard, format)
    let mut best: Option<(f64, bool, Format)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let (mut q, mut proto, mut delimited) = (1.0f64, false, false);
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => q = v.parse::<f64>().unwrap_or(0.0).clamp(0.0, 1.0),
                "proto" => proto = v == "io.prometheus.client.MetricFamily",
                "encoding" => delimited = v.eq_ignore_ascii_case("delimited"),
                _ => {}
            }
        }
        let (format, named) = match media.as_str() {
            "application/vnd.google.protobuf" if proto && delimited => (Format::Protobuf, true),
            "application/openmetrics-text" => (Format::OpenMetrics, true),
            "text/plain" => (Format::Text, true),
            "*/*" | "text/*" => (Format::Text, false),
            _ => continue,
        };
        let better = best
            .as_ref()
            .is_none_or(|(b, n, _)| q > *b || (q == *b && named && !n));
        if q > 0.0 && better {
            best = Some((q, named, format));
        }
    }
    best.map_or(Format::Text, |(_, _, f)| f)
}

struct Inner {
    session: Session,
    latest: Option<Arc<Rendered>>,
}

/// The session, behind an async lock (it cannot be poisoned: a panicking scrape leaves it
/// usable).
struct State {
    inner: Mutex<Inner>,
}

impl State {
    /// The newest snapshot read after `asked`, reading one if there is none.
    async fn rendered(&self, asked: Instant) -> Result<Arc<Rendered>, String> {
        let mut inner = self.inner.lock().await;
        if let Some(r) = &inner.latest
            && r.at >= asked
        {
            return Ok(r.clone());
        }
        let at = Instant::now();
        // Blocking work on this worker; the other one takes the scrapes that arrive meanwhile.
        inner.session.refresh().map_err(|e| e.to_string())?;
        let exposition = Arc::new(inner.session.exposition());
        let r = Arc::new(Rendered {
            at,
            plain: OnceLock::new(),
            openmetrics: OnceLock::new(),
            exposition,
            text: OnceLock::new(),
            protobuf: OnceLock::new(),
        });
        inner.latest = Some(r.clone());
        Ok(r)
    }

    /// The slowest kept timelines, or the one `id` names (None: not kept).
    async fn timelines(&self, id: Option<u64>) -> Option<String> {
        let mut inner = self.inner.lock().await;
        let session = &mut inner.session;
        session.drain_timelines();
        let json = match id {
            Some(id) => {
                let t = session.timelines.get(id)?.clone();
                serde_json::to_value(session.shown(&t))
            }
            None => serde_json::to_value(serde_json::json!({
                "timelines": session.slowest_timelines(TIMELINES_SHOWN),
                "samples": session.timelines.samples,
                "ambiguous": session.timelines.ambiguous,
            })),
        };
        Some(serde_json::to_string_pretty(&json.expect("serializable")).expect("a value") + "\n")
    }

    async fn quantiles(&self) -> Result<String, String> {
        let mut inner = self.inner.lock().await;
        inner.session.refresh().map_err(|e| e.to_string())?;
        Ok(report::json(&mut inner.session))
    }
}

/// Serves until SIGINT or SIGTERM; `web` (checked by the caller before anything was attached)
/// adds TLS and basic auth.
pub async fn run(
    listen: SocketAddr,
    web: Option<WebConfig>,
    opts: &Options<'_>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let session = Session::start(opts)?;
    for r in &session.tracer.report {
        if !r.attached && !r.opt_in_off {
            log::warn!("stage {} unavailable: {}", r.stage, r.skipped.join("; "));
        }
    }
    if !session.tracer.any_attached() {
        anyhow::bail!("no stage can attach on this kernel (see `iopath doctor`)");
    }
    let notices = session.notice_waiter().context("notice ring buffer")?;
    let web = web.map(Arc::new);
    let scheme = if web.as_ref().is_some_and(|w| w.tls()) {
        "https"
    } else {
        "http"
    };
    eprintln!(
        "iopath: serving {scheme}://{}/metrics ({})",
        listener.local_addr()?,
        session.tracer.attached_stages()
    );
    let state = Arc::new(State {
        inner: Mutex::new(Inner {
            session,
            latest: None,
        }),
    });
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut collect = tokio::time::interval(collect_every(opts.vm_grace));
    let mut backends = tokio::time::interval(BACKENDS_EVERY);
    let mut timelines = tokio::time::interval(TIMELINES_EVERY);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let tls = web.as_ref().and_then(|w| w.current().tls.clone());
                    match conns.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(accepted_connection(stream, state.clone(), web.clone(), tls, permit));
                        }
                        // A TLS client could not read a plain 503: it gets the close alone.
                        Err(_) if tls.is_some() => {}
                        Err(_) => {
                            tokio::spawn(busy(stream));
                        }
                    }
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // A scrape that holds the session drains the ring itself: skip, do not wait.
            _ = timelines.tick() => {
                if let Ok(mut inner) = state.inner.try_lock() {
                    inner.session.drain_timelines();
                }
            }
            _ = collect.tick() => {
                let session = &mut state.inner.lock().await.session;
                if let Err(e) = session.collect() {
                    log::warn!("collection: {e}");
                }
            }
            _ = backends.tick() => {
                let session = &mut state.inner.lock().await.session;
                if let Err(e) = session.watch() {
                    log::warn!("backend threads: {e}");
                }
            }
            ready = async { notices.as_ref().expect("guarded").readable().await }, if notices.is_some() => {
                if let Ok(mut guard) = ready {
                    state.inner.lock().await.session.drain_notices();
                    guard.clear_ready();
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    eprintln!("iopath: detaching and exiting");
    drop(notices);
    // Dropping the session detaches and unloads every program; nothing is pinned.
    drop(state);
    Ok(())
}

/// Over the connection cap: a short 503, then close.
async fn busy(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        stream.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
        ),
    )
    .await;
}

/// A connection: its TLS handshake first (bounded like a request head), then HTTP; the web
/// config's users are read again for each request (a password removed is refused at once).
async fn accepted_connection(
    stream: TcpStream,
    state: Arc<State>,
    web: Option<Arc<WebConfig>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    permit: OwnedSemaphorePermit,
) {
    match tls {
        Some(acceptor) => match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => connection(tls, state, web, permit).await,
            Ok(Err(e)) => log::debug!("TLS handshake: {e}"),
            Err(_) => log::debug!("TLS handshake: timed out"),
        },
        None => connection(stream, state, web, permit).await,
    }
}

async fn connection<S>(
    stream: S,
    state: Arc<State>,
    web: Option<Arc<WebConfig>>,
    _permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        let web = web.clone();
        async move { Ok::<_, Infallible>(respond(req, &state, web).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    // hyper answers a malformed head with 400 and an oversized one with 431 before closing.
    let _ = tokio::time::timeout(CONN_LIFETIME, conn).await;
}

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .body(Full::new(body.into()))
        .expect("a static header is valid")
}

async fn respond(
    req: Request<Incoming>,
    state: &State,
    web: Option<Arc<WebConfig>>,
) -> Response<Full<Bytes>> {
    let asked = Instant::now();
    if let Some(users) = web.map(|w| w.current().users.clone())
        && users.required()
    {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        // bcrypt takes milliseconds: off the runtime's workers.
        let allowed = tokio::task::spawn_blocking(move || users.allows(auth.as_deref()))
            .await
            .unwrap_or(false);
        if !allowed {
            let mut r = reply(StatusCode::UNAUTHORIZED, "text/plain", "unauthorized\n");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"iopath\""),
            );
            return r;
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",");
            match state.rendered(asked).await {
                Ok(r) => {
                    let format = negotiate(&accept);
                    let mut resp = reply(StatusCode::OK, format.content_type(), r.body(&format));
                    // the body depends on Accept: caches must key on it
                    resp.headers_mut()
                        .insert(header::VARY, header::HeaderValue::from_static("Accept"));
                    resp
                }
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e + "\n"),
            }
        }
        "/timelines" => {
            let id = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("trace_id=")));
            let id = match id.map(|id| u64::from_str_radix(id, 16)) {
                Some(Ok(id)) => Some(id),
                Some(Err(_)) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        "trace_id is 16 hexadecimal digits\n",
                    );
                }
                None => None,
            };
            match state.timelines(id).await {
                Some(json) => reply(StatusCode::OK, "application/json", json),
                None => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "no such timeline kept (the newest 2000 are)\n",
                ),
            }
        }
        "/quantiles" => match state.quantiles().await {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e + "\n"),
        },
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "iopath: see /metrics, /quantiles and /timelines[?trace_id=ID]\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_q_values() {
        // What Prometheus 2.42 sends with --enable-feature=native-histograms, and without.
        let with = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let without = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(with), Format::Protobuf);
        assert_eq!(negotiate(without), Format::OpenMetrics);
        assert_eq!(negotiate(""), Format::Text);
        assert_eq!(negotiate("*/*"), Format::Text);
        assert_eq!(negotiate("application/json"), Format::Text);
        // protobuf of another message, or not delimited: not ours
        assert_eq!(
            negotiate("application/vnd.google.protobuf;proto=x.Y;encoding=delimited"),
            Format::Text
        );
        assert_eq!(
            negotiate("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily"),
            Format::Text
        );
        assert_eq!(
            negotiate("text/plain;q=0.9, application/openmetrics-text;q=0.3"),
            Format::Text
        );
        assert_eq!(
            negotiate("application/openmetrics-text;q=0, text/plain;q=0.1"),
            Format::Text
        );
        // a named type beats a wildcard of the same q; parameter names in any case, quoted
        assert_eq!(
            negotiate("*/*, application/openmetrics-text"),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate(
                "application/vnd.google.protobuf; Proto=\"io.prometheus.client.MetricFamily\"; Encoding=delimited; Q=0.5, text/plain;q=0.4"
            ),
            Format::Protobuf
        );
        // q over 1 counts as 1: the first listed of equals wins
        assert_eq!(
            negotiate("text/plain;q=5, application/openmetrics-text"),
            Format::Text
        );
    }
}
