//! Prometheus metrics over HTTP: the figures `dn-fd status` shows, in the text exposition
//! format, at `GET /metrics`. A minimal HTTP/1.x responder: one request per connection.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::supervise::State;

/// A request larger than this, or slower than the timeout, is dropped.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for metrics on {addr} (choose another with --metrics, or --no-metrics)"
        )
    })?;
    info!(%addr, "metrics at http://{addr}/metrics");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &state).await {
                    debug!(%peer, error = %e, "metrics request failed");
                }
            });
        }
    }))
}

async fn answer(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let head_read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(head_read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            let status = state.lock().unwrap_or_else(|e| e.into_inner()).status();
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(&status),
            )
        }
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "Holdfast dn-fd: metrics at /metrics\n".to_owned(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The status object (see `State::status`) in Prometheus' text format.
pub fn render(s: &serde_json::Value) -> String {
    let mut out = String::new();
    let node = s["node"].as_str().unwrap_or("");
    let dn = &s["dn"];
    let running = dn["state"] == "running";
    metric(
        &mut out,
        "holdfast_dnfd_dn_up",
        "gauge",
        "1 while the local DN runs and heartbeats.",
        &[(format!("{{node=\"{node}\"}}"), f64::from(u8::from(running)))],
    );
    let one = |v: &serde_json::Value| vec![(String::new(), num(v))];
    metric(
        &mut out,
        "holdfast_dnfd_dn_starts_total",
        "counter",
        "Times the DN was started.",
        &one(&s["starts"]),
    );
    metric(
        &mut out,
        "holdfast_dnfd_dn_restarts_total",
        "counter",
        "Times the DN was started again after it died or was killed.",
        &one(&s["restarts"]),
    );
    let kills: Vec<(String, f64)> = ["heartbeat", "fault", "limit"]
        .iter()
        .map(|r| (format!("{{reason=\"{r}\"}}"), num(&s["kills_by_reason"][r])))
        .collect();
    metric(
        &mut out,
        "holdfast_dnfd_dn_kills_total",
        "counter",
        "Times the detector killed the DN, by reason.",
        &kills,
    );
    metric(
        &mut out,
        "holdfast_dnfd_dn_recent_failures",
        "gauge",
        "Failures since the DN last ran healthily; the restart back-off grows with it.",
        &one(&s["recent_failures"]),
    );
    if let Some(age) = dn["heartbeat_age_ms"].as_f64() {
        metric(
            &mut out,
            "holdfast_dnfd_dn_heartbeat_age_seconds",
            "gauge",
            "Time since the DN's last heartbeat.",
            &[(String::new(), age / 1000.0)],
        );
    }
    metric(
        &mut out,
        "holdfast_dnfd_dn_forwarded_packets",
        "counter",
        "Packets the DN says it has forwarded (its last heartbeat).",
        &one(&dn["forwarded"]),
    );
    metric(
        &mut out,
        "holdfast_dnfd_routes_deleted_total",
        "counter",
        "Protocol-200 routes the detector deleted after the DN died.",
        &one(&s["routes_deleted"]),
    );
    let peers = s["peers"].as_array().cloned().unwrap_or_default();
    let label =
        |p: &serde_json::Value| format!("{{peer=\"{}\"}}", p["name"].as_str().unwrap_or(""));
    metric(
        &mut out,
        "holdfast_dnfd_peer_up",
        "gauge",
        "1 while the peer's detector heartbeats and says its DN is up.",
        &peers
            .iter()
            .map(|p| (label(p), f64::from(u8::from(p["up"] == true))))
            .collect::<Vec<_>>(),
    );
    metric(
        &mut out,
        "holdfast_dnfd_peer_heartbeat_age_seconds",
        "gauge",
        "Time since the peer's last heartbeat (absent: never heard).",
        &peers
            .iter()
            .filter_map(|p| Some((label(p), p["heartbeat_age_ms"].as_f64()? / 1000.0)))
            .collect::<Vec<_>>(),
    );
    metric(
        &mut out,
        "holdfast_dnfd_peer_changes_total",
        "counter",
        "State changes of the peer (up, dn-down, silent).",
        &peers
            .iter()
            .map(|p| (label(p), num(&p["changes"])))
            .collect::<Vec<_>>(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_as_prometheus_text() {
        let status = serde_json::json!({
            "node": "dn1",
            "dn": {"state": "running", "pid": 7, "heartbeat_age_ms": 4, "forwarded": 10},
            "starts": 3, "restarts": 2, "kills": 2,
            "kills_by_reason": {"heartbeat": 1, "fault": 0, "limit": 1},
            "recent_failures": 2, "routes_deleted": 4,
            "peers": [
                {"name": "dn2", "state": "up", "up": true, "heartbeat_age_ms": 8, "changes": 1},
                {"name": "dn3", "state": "unknown", "up": false, "heartbeat_age_ms": null, "changes": 0},
            ],
        });
        let text = render(&status);
        for line in [
            "holdfast_dnfd_dn_up{node=\"dn1\"} 1",
            "holdfast_dnfd_dn_restarts_total 2",
            "holdfast_dnfd_dn_kills_total{reason=\"limit\"} 1",
            "holdfast_dnfd_dn_heartbeat_age_seconds 0.004",
            "holdfast_dnfd_peer_up{peer=\"dn2\"} 1",
            "holdfast_dnfd_peer_up{peer=\"dn3\"} 0",
            "holdfast_dnfd_peer_heartbeat_age_seconds{peer=\"dn2\"} 0.008",
            "# TYPE holdfast_dnfd_routes_deleted_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("peer_heartbeat_age_seconds{peer=\"dn3\"}"));
    }
}
