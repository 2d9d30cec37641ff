//! `en.toml`: the client's configuration, parsed and validated once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use holdfast_proto::dns::DnsMode;
use holdfast_proto::probe::ProbeConfig;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

pub const DEFAULT_TUN: &str = "holdfast0";
pub const DEFAULT_CONTROL: &str = "/run/holdfast/en.sock";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    cert: PathBuf,
    key: PathBuf,
    server_ca: PathBuf,
    tun: Option<String>,
    control_socket: Option<PathBuf>,
    #[serde(default)]
    liveness: RawLiveness,
    #[serde(default)]
    dns: DnsMode,
    #[serde(default)]
    dn: Vec<RawDn>,
}

/// `[liveness]`: how the client checks its own path to each DN. The cluster's failure detector
/// tells clients about dead DNs; these probes cover what only the client sees.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLiveness {
    keepalive_secs: Option<u64>,
    probe_interval_ms: Option<u64>,
    dead_after_ms: Option<u64>,
    probe_misses: Option<u32>,
    rtt_factor: Option<u32>,
    hinted_dead_after_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDn {
    name: String,
    endpoint: String,
    server_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EnConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_ca: PathBuf,
    pub tun: String,
    pub control_socket: PathBuf,
    /// How each session is probed.
    pub liveness: ProbeConfig,
    /// Whether pushed DNS settings are applied.
    pub dns_mode: DnsMode,
    pub dns: Vec<DnEndpoint>,
}

/// The longest keepalive: a QUIC connection that hears nothing for [`MAX_IDLE`] ends.
pub const MAX_KEEPALIVE_SECS: u64 = 100;
/// The QUIC idle timeout the DNs allow at most.
pub const MAX_IDLE: std::time::Duration = holdfast_shell::quic::MAX_IDLE_TIMEOUT;

fn liveness(raw: RawLiveness) -> Result<ProbeConfig> {
    let d = ProbeConfig::default();
    let ms =
        |v: Option<u64>, key: &str, default: Duration, range: std::ops::RangeInclusive<u64>| {
            let v = v.unwrap_or(default.as_millis() as u64);
            if !range.contains(&v) {
                bail!(
                    "liveness.{key}: {v} is outside {}..={}",
                    range.start(),
                    range.end()
                );
            }
            Ok(Duration::from_millis(v))
        };
    let keepalive_secs = raw.keepalive_secs.unwrap_or(d.keepalive.as_secs());
    if !(1..=MAX_KEEPALIVE_SECS).contains(&keepalive_secs) {
        bail!("liveness.keepalive_secs: {keepalive_secs} is outside 1..={MAX_KEEPALIVE_SECS} (the DNs end a session silent for {} s)", MAX_IDLE.as_secs());
    }
    let misses = raw.probe_misses.unwrap_or(d.misses);
    let rtt_factor = raw.rtt_factor.unwrap_or(d.rtt_factor);
    if !(1..=100).contains(&misses) {
        bail!("liveness.probe_misses: {misses} is outside 1..=100");
    }
    if !(1..=100).contains(&rtt_factor) {
        bail!("liveness.rtt_factor: {rtt_factor} is outside 1..=100");
    }
    Ok(ProbeConfig {
        interval: ms(
            raw.probe_interval_ms,
            "probe_interval_ms",
            d.interval,
            1..=10_000,
        )?,
        misses,
        rtt_factor,
        min_silence: ms(
            raw.dead_after_ms,
            "dead_after_ms",
            d.min_silence,
            1..=60_000,
        )?,
        hinted_silence: ms(
            raw.hinted_dead_after_ms,
            "hinted_dead_after_ms",
            d.hinted_silence,
            1..=60_000,
        )?,
        keepalive: Duration::from_secs(keepalive_secs),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnEndpoint {
    pub name: String,
    pub endpoint: Endpoint,
    /// The name the DN's certificate must carry.
    pub server_name: String,
}

/// Where a DN is reached: an address, or a host name looked up at each connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl Endpoint {
    /// `192.0.2.1:4433`, `[2001:db8::1]:4433`, `dn1.example.net:4433`, or any of them without
    /// the port (then the default port).
    pub fn parse(text: &str) -> Result<Self> {
        let port = holdfast_proto::cluster::DEFAULT_PORT;
        if let Ok(addr) = text.parse() {
            return Ok(Self::Addr(addr));
        }
        if let Ok(ip) = text.parse::<std::net::IpAddr>() {
            return Ok(Self::Addr(SocketAddr::new(ip, port)));
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, p)) => (
                host,
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| anyhow!("{p:?} is not a port"))?,
            ),
            None => (text, port),
        };
        holdfast_proto::dns::check_domain(host).map_err(|e| {
            anyhow!("{e}; an endpoint is an address like 192.0.2.1:4433 or a host name like dn1.example.net:4433")
        })?;
        Ok(Self::Name {
            host: host.to_owned(),
            port,
        })
    }

    /// The address, if the endpoint is one (no look-up needed).
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Addr(a) => Some(*a),
            Self::Name { .. } => None,
        }
    }

    /// An IPv4 address: a client whose DNs all have one needs no IPv6 socket.
    pub fn is_ipv4_addr(&self) -> bool {
        self.addr().is_some_and(|a| a.is_ipv4())
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => a.fmt(f),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl EnConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let raw: Raw = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        if raw.dn.is_empty() {
            bail!("dn: list at least one [[dn]] to connect to");
        }
        let mut dns = Vec::new();
        for (i, d) in raw.dn.into_iter().enumerate() {
            holdfast_proto::cluster::check_name(&format!("dn[{i}].name"), &d.name)?;
            let endpoint = Endpoint::parse(&d.endpoint)
                .with_context(|| format!("dn[{i}].endpoint: {:?}", d.endpoint))?;
            let server_name = d.server_name.unwrap_or_else(|| d.name.clone());
            dns.push(DnEndpoint {
                name: d.name,
                endpoint,
                server_name,
            });
        }
        let tun = raw.tun.unwrap_or_else(|| DEFAULT_TUN.to_owned());
        if tun.is_empty() || tun.len() > 15 {
            bail!("tun: interface names are 1-15 characters");
        }
        Ok(Self {
            cert: resolve(raw.cert),
            key: resolve(raw.key),
            server_ca: resolve(raw.server_ca),
            tun,
            control_socket: raw
                .control_socket
                .map(resolve)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL)),
            liveness: liveness(raw.liveness)?,
            dns_mode: raw.dns,
            dns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_resolves_paths() {
        let c = EnConfig::parse(
            "cert = \"a.pem\"\nkey = \"/k.pem\"\nserver_ca = \"ca.pem\"\n[[dn]]\nname = \"dn1\"\nendpoint = \"10.0.1.2\"\n",
            Path::new("/etc/holdfast"),
        )
        .unwrap();
        assert_eq!(c.cert, Path::new("/etc/holdfast/a.pem"));
        assert_eq!(c.key, Path::new("/k.pem"));
        assert_eq!(c.dns[0].endpoint.to_string(), "10.0.1.2:4433");
        assert_eq!(c.dns[0].server_name, "dn1");
        assert_eq!(c.tun, DEFAULT_TUN);
        assert_eq!(c.liveness, ProbeConfig::default());
    }

    #[test]
    fn liveness_is_configurable_within_bounds() {
        let head = "cert = \"a\"\nkey = \"b\"\nserver_ca = \"c\"\n[[dn]]\nname = \"dn1\"\nendpoint = \"10.0.1.2\"\n";
        let c = EnConfig::parse(
            &format!("{head}[liveness]\nkeepalive_secs = 60\nprobe_interval_ms = 20\n"),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.liveness.keepalive, Duration::from_secs(60));
        assert_eq!(c.liveness.interval, Duration::from_millis(20));
        let err = format!(
            "{:#}",
            EnConfig::parse(
                &format!("{head}[liveness]\nkeepalive_secs = 500\n"),
                Path::new("/")
            )
            .unwrap_err()
        );
        assert!(err.contains("liveness.keepalive_secs"), "{err}");
    }

    #[test]
    fn endpoints_are_addresses_or_host_names() {
        let ok = |t: &str| Endpoint::parse(t).unwrap().to_string();
        assert_eq!(ok("192.0.2.1"), "192.0.2.1:4433");
        assert_eq!(ok("[2001:db8::1]:5000"), "[2001:db8::1]:5000");
        assert_eq!(ok("2001:db8::1"), "[2001:db8::1]:4433");
        assert_eq!(ok("dn1.example.net"), "dn1.example.net:4433");
        assert_eq!(ok("dn1.example.net:5000"), "dn1.example.net:5000");
        assert!(Endpoint::parse("dn1.example.net:5000")
            .unwrap()
            .addr()
            .is_none());
        assert!(Endpoint::parse("192.0.2.1:1").unwrap().is_ipv4_addr());
        assert!(!Endpoint::parse("dn1").unwrap().is_ipv4_addr());
        for bad in [
            "",
            "dn1.example.net:0",
            "dn1.example.net:x",
            "dn 1",
            "a:b:c",
            "dn1.:4433",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dns_is_on_unless_turned_off() {
        let head = "cert = \"a\"\nkey = \"b\"\nserver_ca = \"c\"\n";
        let dn = "[[dn]]\nname = \"dn1\"\nendpoint = \"dn1.example.net\"\n";
        let parse = |t: &str| EnConfig::parse(&format!("{head}{t}{dn}"), Path::new("/"));
        assert_eq!(parse("").unwrap().dns_mode, DnsMode::On);
        assert_eq!(parse("dns = \"off\"\n").unwrap().dns_mode, DnsMode::Off);
        assert!(format!("{:#}", parse("dns = \"maybe\"\n").unwrap_err()).contains("dns"));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let text = include_str!("../../examples/en.toml");
        let c = EnConfig::parse(text, Path::new("/etc/holdfast")).unwrap();
        assert_eq!(c.dns[0].endpoint.to_string(), "192.0.2.10:4433");
    }

    #[test]
    fn rejects_bad_input_with_the_key_named() {
        let base = Path::new("/");
        let head = "cert = \"a\"\nkey = \"b\"\nserver_ca = \"c\"\n";
        let err = |t: &str| format!("{:#}", EnConfig::parse(t, base).unwrap_err());
        assert!(err(head).contains("dn:"));
        assert!(err(&format!(
            "{head}[[dn]]\nname = \"x\"\nendpoint = \"no pe\"\n"
        ))
        .contains("dn[0].endpoint"));
        assert!(err(&format!("{head}colour = 1\n")).contains("unknown field"));
    }
}
