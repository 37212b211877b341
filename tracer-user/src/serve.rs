//! `iopath serve`: the daemon. Binds the listen address first (a port in use fails before any
//! probe is attached), attaches, then answers `/metrics` until SIGINT or SIGTERM, and detaches
//! everything on the way out.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
};

use crate::{attach::Options, export, report, session::Session};

const MAX_REQUEST: usize = 8192;
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn run(listen: SocketAddr, opts: &Options<'_>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let session = Session::start(opts)?;
    for r in &session.tracer.report {
        if !r.attached {
            log::warn!("stage {} unavailable: {}", r.stage, r.skipped.join("; "));
        }
    }
    if !session.tracer.any_attached() {
        anyhow::bail!("no stage can attach on this kernel (see `iopath doctor`)");
    }
    let local = listener.local_addr()?;
    eprintln!(
        "iopath: serving http://{local}/metrics ({})",
        session.tracer.attached_stages()
    );
    let session = Arc::new(Mutex::new(session));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let session = session.clone();
                tokio::spawn(async move {
                    // A client that stalls is dropped; it never holds the session.
                    let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, session)).await;
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    eprintln!("iopath: detaching and exiting");
    // Dropping the session detaches and unloads every program; nothing is pinned.
    drop(session);
    Ok(())
}

async fn handle(mut stream: TcpStream, session: Arc<Mutex<Session>>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    // Content negotiation as Prometheus does it: OpenMetrics when the scraper asks for it.
    let openmetrics = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("accept:") && l.contains("application/openmetrics-text")
    });
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => match session.lock().expect("session lock").metrics() {
            Ok(text) if openmetrics => ("200 OK", OPENMETRICS, text),
            Ok(text) => ("200 OK", TEXT, export::openmetrics_to_text(&text)),
            Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
        },
        ("GET", "/quantiles") => {
            let mut s = session.lock().expect("session lock");
            match s.refresh() {
                Ok(()) => ("200 OK", "application/json", report::json(&mut s)),
                Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
            }
        }
        ("GET", "/") => (
            "200 OK",
            "text/plain",
            "iopath: see /metrics and /quantiles\n".to_string(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
