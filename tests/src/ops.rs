//! `lab ops`: what an operator does to a running cluster, measured.
//!
//! One lab: two DNs under dn-fd, FRR, an ESR pair sharing the servers' and the DNs' gateways
//! with keepalived (VRRP adverts every 10 ms), a client with metrics on. It scrapes every
//! daemon's metrics, drains the client's DN ten times (and takes it back after each) during a
//! 100/s ping and a paced download, then cuts the master ESR off (every link down) during
//! another ping and download.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::lab::{
    dn_role, Credential, Lab, LabSpec, Routing, DN_METRICS, EN_METRICS, FD_METRICS, SERVER,
};
use crate::netns::wait_until;
use crate::traffic::{self, Pinger};

/// Metric families each daemon must serve.
pub const DN_FAMILIES: &[&str] = &[
    "holdfast_dn_sessions",
    "holdfast_dn_leases",
    "holdfast_dn_packets_total",
    "holdfast_dn_bytes_total",
    "holdfast_dn_dropped_packets_total",
    "holdfast_dn_handshake_failures_total",
    "holdfast_dn_connection_attempts_total",
    "holdfast_dn_promotions_total",
    "holdfast_dn_demotions_total",
    "holdfast_dn_route_changes_total",
    "holdfast_dn_peer_up",
    "holdfast_dn_udp_datagrams_sent_total",
    "holdfast_dn_udp_send_calls_total",
];
pub const EN_FAMILIES: &[&str] = &[
    "holdfast_en_failovers",
    "holdfast_en_failover_outage_seconds",
    "holdfast_en_session_up",
    "holdfast_en_rtt_seconds",
    "holdfast_en_packets_total",
    "holdfast_en_dropped_packets_total",
    "holdfast_en_quic_cwnd_bytes",
    "holdfast_en_udp_datagrams_sent_total",
    "holdfast_en_udp_send_calls_total",
];
pub const FD_FAMILIES: &[&str] = &[
    "holdfast_dnfd_dn_up",
    "holdfast_dnfd_dn_kills_total",
    "holdfast_dnfd_peer_up",
];

/// The families of `wanted` that a scrape lacks: neither a sample nor a declaration (a family
/// with nothing counted yet, such as failovers before the first, is declared only).
pub fn missing(scrape: &str, wanted: &[&str]) -> Vec<String> {
    wanted
        .iter()
        .filter(|f| {
            let declared = format!("# TYPE {f} ");
            !scrape
                .lines()
                .any(|l| l.starts_with(**f) || l.starts_with(&declared))
        })
        .map(|f| (*f).to_owned())
        .collect()
}

const DRAINS: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct OpsReport {
    /// Every daemon served every family it must.
    pub metrics_ok: bool,
    /// `daemon: family` for each one missing.
    pub metrics_missing: Vec<String>,
    /// Pings lost (of 100/s) in each drain and its undrain.
    pub drain_lost: Vec<u32>,
    pub drain_sent: Vec<u32>,
    /// Pings lost while the master ESR was cut off.
    pub esr_failover_lost: u32,
    pub esr_failover_sent: u32,
    /// The ESR that was master and was cut off, and the one that took over.
    pub esr_killed: String,
    pub esr_took_over: String,
    /// Both downloads (through the drains, through the ESR failover) arrived intact.
    pub download_ok: bool,
}

impl OpsReport {
    pub fn table(&self) -> String {
        let mut out = String::new();
        out += &format!(
            "metrics: {}\n",
            if self.metrics_ok {
                "every daemon serves every family".to_owned()
            } else {
                format!("missing {}", self.metrics_missing.join(", "))
            }
        );
        for (i, (lost, sent)) in self.drain_lost.iter().zip(&self.drain_sent).enumerate() {
            out += &format!(
                "drain {:>2}: {lost} of {sent} pings lost (drain, client on its backup, undrain, client home)\n",
                i + 1
            );
        }
        out += &format!(
            "ESR {} cut off: {} of {} pings lost; {} holds both gateways now\n",
            self.esr_killed, self.esr_failover_lost, self.esr_failover_sent, self.esr_took_over
        );
        out += &format!(
            "downloads (through the drains, through the ESR failover): {}\n",
            if self.download_ok {
                "intact (SHA-256 matches)"
            } else {
                "NOT intact"
            }
        );
        out
    }
}

fn progress(quiet: bool, line: &str) {
    if !quiet {
        eprintln!("lab ops: {line}");
    }
}

/// A paced download of the lab's blob that runs on while the lab does other things.
struct Download {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Download {
    fn start(lab: &Lab, name: &str, rate_mib: u64) -> Result<Self> {
        let out = lab.net.dir.join(name);
        let url = format!("http://{SERVER}:{}/blob", traffic::HTTP_PORT);
        let child = traffic::paced_download(&lab.net, "en1", &url, &out, rate_mib)
            .spawn()
            .context("cannot start curl")?;
        Ok(Self { child, out })
    }

    /// Waits for it; whether it arrived whole and unchanged.
    fn intact(self, sha256: &str) -> Result<bool> {
        let output = self.child.wait_with_output()?;
        Ok(output.status.success() && traffic::sha256_file(&self.out)? == sha256)
    }
}

pub fn run(quiet: bool) -> Result<OpsReport> {
    progress(
        quiet,
        "building the lab: 2 DNs under dn-fd, FRR, an ESR pair (keepalived), a client",
    );
    let mut lab = Lab::start(&LabSpec {
        dns: 2,
        routing: Routing::Frr,
        supervised: true,
        esr_pair: true,
        ..LabSpec::default()
    })?;
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    lab.wait_address(1, Duration::from_secs(15))?;
    let (home, backup) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
    let www = lab.net.dir.join("www");
    let blob = traffic::make_blob(&www, "blob", 24 << 20)?;
    traffic::serve_http(&mut lab.net, "srv", &www, SERVER)?;

    progress(quiet, "scraping every daemon's metrics");
    // One round trip first, so that every counter has something to count.
    let (sent, received) = lab.ping("en1", SERVER, 10, &[])?;
    if received != sent {
        bail!("the lab does not carry traffic: {received} of {sent} pings answered");
    }
    let mut metrics_missing = Vec::new();
    let en = lab.scrape("en1", EN_METRICS)?;
    metrics_missing.extend(
        missing(&en, EN_FAMILIES)
            .into_iter()
            .map(|f| format!("en: {f}")),
    );
    for k in 1..=2 {
        let dn = lab.scrape(&dn_role(k), DN_METRICS)?;
        let fd = lab.scrape(&dn_role(k), FD_METRICS)?;
        let (name, fd_name) = (dn_role(k), Lab::fd_role(k));
        metrics_missing.extend(
            missing(&dn, DN_FAMILIES)
                .into_iter()
                .map(|f| format!("{name}: {f}")),
        );
        metrics_missing.extend(
            missing(&fd, FD_FAMILIES)
                .into_iter()
                .map(|f| format!("{fd_name}: {f}")),
        );
    }

    progress(
        quiet,
        &format!("{DRAINS} drains of dn{home} during a ping at 100/s and a download"),
    );
    let download = Download::start(&lab, "through-drains", 2)?;
    let (mut drain_lost, mut drain_sent) = (Vec::new(), Vec::new());
    for _ in 0..DRAINS {
        let ping = Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
        std::thread::sleep(Duration::from_millis(300));
        lab.drain(home, true)?;
        wait_until(Duration::from_secs(5), "the client on its backup", || {
            lab.primary_of(1) == Some(backup)
        })?;
        std::thread::sleep(Duration::from_millis(300));
        lab.drain(home, false)?;
        wait_until(Duration::from_secs(5), "the client home again", || {
            lab.primary_of(1) == Some(home)
        })?;
        std::thread::sleep(Duration::from_millis(300));
        let (sent, answered) = ping.stop()?;
        drain_lost.push(sent.saturating_sub(answered));
        drain_sent.push(sent);
    }
    let drains_intact = download.intact(&blob.sha256)?;

    let master = lab.esr_master()?;
    progress(
        quiet,
        &format!("cutting the master ESR ({master}) off during a ping and a download"),
    );
    let download = Download::start(&lab, "through-esr-failover", 4)?;
    let ping = Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
    std::thread::sleep(Duration::from_secs(2));
    lab.cut_links(&master)?;
    std::thread::sleep(Duration::from_secs(3));
    let (sent, answered) = ping.stop()?;
    let other = if master == "esr" { "esr2" } else { "esr" };
    let took_over = if lab.holds_gateways(other)? {
        other.to_owned()
    } else {
        "none".to_owned()
    };
    let failover_intact = download.intact(&blob.sha256)?;
    Ok(OpsReport {
        metrics_ok: metrics_missing.is_empty(),
        metrics_missing,
        drain_lost,
        drain_sent,
        esr_failover_lost: sent.saturating_sub(answered),
        esr_failover_sent: sent,
        esr_killed: master,
        esr_took_over: took_over,
        download_ok: drains_intact && failover_intact,
    })
}
