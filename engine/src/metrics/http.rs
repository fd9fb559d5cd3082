//! The metrics endpoint: `GET /metrics` on `[server] metrics_listen`, answered by one
//! thread, one connection at a time. Why that small: a scrape every few seconds is its
//! whole load, and nothing here may take a core thread's time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::{Format, Metrics};
use crate::registry::Registry;

/// A request line or header longer than this is refused (bounds what a client can make
/// the thread read).
const REQUEST_BYTES_MAX: usize = 8192;

/// How long one client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves the metrics page on a thread of its own.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>, reg: Arc<Registry>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    std::thread::Builder::new()
        .name("twinsan-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &metrics, &reg) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
        })?;
    Ok(())
}

fn answer(mut s: TcpStream, metrics: &Arc<Metrics>, reg: &Arc<Registry>) -> std::io::Result<()> {
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new(s.try_clone()?).take(REQUEST_BYTES_MAX as u64);
    // Bytes, not text: a request that is not UTF-8 still gets an answer (400).
    let mut raw = Vec::new();
    reader.read_until(b'\n', &mut raw)?;
    let line = String::from_utf8_lossy(&raw).into_owned();
    // The headers are read and ignored (up to the blank line), so that the client's
    // request is consumed before the answer.
    let mut header = Vec::new();
    let mut format = Format::Prometheus;
    loop {
        header.clear();
        if reader.read_until(b'\n', &mut header)? == 0 || header == b"\r\n" || header == b"\n" {
            break;
        }
        let lower = String::from_utf8_lossy(&header).to_ascii_lowercase();
        if lower.starts_with("accept:") && lower.contains("application/openmetrics-text") {
            format = Format::OpenMetrics;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, kind) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            super::render(metrics, reg, format),
            match format {
                Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
                Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            },
        ),
        ("GET", _) => ("404 Not Found", "see /metrics\n".to_string(), "text/plain"),
        (m, _) if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) => (
            "400 Bad Request",
            "not an HTTP request\n".to_string(),
            "text/plain",
        ),
        _ => (
            "405 Method Not Allowed",
            "GET only\n".to_string(),
            "text/plain",
        ),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}
