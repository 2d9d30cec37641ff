//! Prometheus metrics for every daemon, through `prometheus-client`, served over HTTP at
//! `GET /metrics`.
//!
//! A daemon reads most of its figures at scrape time from the state it keeps anyway (its
//! counters, its sessions): it registers a [`Scraper`], which writes them through [`Families`].
//! What it observes as it happens (durations) are real `prometheus-client` histograms in the
//! same registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// A request larger than this, or slower than the timeout, is dropped.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One label set of a family: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Writes metric families at scrape time.
pub struct Families<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl Families<'_> {
    /// A counter family, `name` without `_total` (the encoder appends it).
    pub fn counter(&mut self, name: &str, help: &str, samples: &[(Labels, u64)]) {
        self.family(name, help, samples, ConstCounter::new);
    }

    /// A counter with no labels.
    pub fn counter_one(&mut self, name: &str, help: &str, value: u64) {
        self.counter(name, help, &[(Vec::new(), value)]);
    }

    /// A gauge family; values are `i64` (counts, states) or `f64` (seconds, ratios).
    pub fn gauge<N>(&mut self, name: &str, help: &str, samples: &[(Labels, N)])
    where
        N: prometheus_client::encoding::EncodeGaugeValue + Copy + Default,
    {
        self.family(name, help, samples, ConstGauge::new);
    }

    fn family<V: Copy + Default, M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Labels, V)],
        metric: impl Fn(V) -> M,
    ) {
        let kind = metric(V::default()).metric_type();
        let Ok(mut family) = self.encoder.encode_descriptor(name, help, None, kind) else {
            return;
        };
        for (labels, value) in samples {
            if let Ok(encoder) = family.encode_family(labels) {
                let _ = metric(*value).encode(encoder);
            }
        }
    }

    /// A gauge with no labels.
    pub fn gauge_one<N>(&mut self, name: &str, help: &str, value: N)
    where
        N: prometheus_client::encoding::EncodeGaugeValue + Copy + Default,
    {
        self.gauge(name, help, &[(Vec::new(), value)]);
    }
}

/// Reads a daemon's figures at scrape time.
pub struct Scraper(Box<dyn Fn(&mut Families<'_>) + Send + Sync>);

impl Scraper {
    pub fn new(scrape: impl Fn(&mut Families<'_>) + Send + Sync + 'static) -> Self {
        Self(Box::new(scrape))
    }
}

impl std::fmt::Debug for Scraper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraper")
    }
}

impl prometheus_client::collector::Collector for Scraper {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        (self.0)(&mut Families { encoder });
        Ok(())
    }
}

/// The registry in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        debug!(error = %e, "metrics encoding failed");
    }
    out
}

/// Serves `registry` at `http://addr/metrics` until the task is dropped. `what` names the
/// daemon on the index page and in errors (`--metrics` is the flag that moves it).
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    what: &'static str,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "{what}: cannot listen for metrics on {addr} (choose another address with --metrics)"
        )
    })?;
    info!(%addr, "metrics at http://{addr}/metrics");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(got) => got,
                Err(e) => {
                    // Out of descriptors, say: retrying at once would only spin.
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &registry, what).await {
                    debug!(%peer, error = %e, "metrics request failed");
                }
            });
        }
    }))
}

/// A minimal HTTP/1.x responder: one request per connection.
async fn answer(mut stream: TcpStream, registry: &Registry, what: &str) -> std::io::Result<()> {
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
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(registry),
        ),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            format!("Holdfast {what}: metrics at /metrics\n"),
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

/// One label.
pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_as_openmetrics_text() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scraper::new(|f| {
            f.counter(
                "holdfast_test_drops",
                "Dropped packets, by reason.",
                &[
                    (label("reason", "spoofed"), 3),
                    (label("reason", "oversized"), 0),
                ],
            );
            f.gauge_one("holdfast_test_sessions", "Sessions.", 2i64);
            f.gauge_one("holdfast_test_rtt_seconds", "RTT.", 0.25);
        })));
        let text = render(&registry);
        for line in [
            "# TYPE holdfast_test_drops counter",
            "holdfast_test_drops_total{reason=\"spoofed\"} 3",
            "holdfast_test_drops_total{reason=\"oversized\"} 0",
            "holdfast_test_sessions 2",
            "holdfast_test_rtt_seconds 0.25",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
