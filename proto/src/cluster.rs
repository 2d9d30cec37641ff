//! `cluster.toml`: the one description of a Holdfast cluster, parsed and validated once.
//!
//! Everything downstream works with [`Cluster`], never with strings: a bad key is reported here
//! with its line and path (`cluster.toml:14: dn[1].pool: ...`), and nothing later re-checks it.

mod locate;
mod vrrp;

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use ipnet::IpNet;
use serde::Deserialize;

use crate::dns::{check_domain, check_server, DnsSettings, MAX_SEARCH, MAX_SERVERS};
use crate::lease::{parse_public_key, IssuerKeys};
use crate::plan::{first_overlap, PoolPlan};
use crate::routes::Metrics;
use locate::Locator;
use vrrp::{check_interface, parse_vrrp, RawVrrp};
pub use vrrp::{
    Vrrp, VrrpRouter, DEFAULT_ADVERT_INTERVAL_MS, DEFAULT_SERVICE_INTERFACE, DEFAULT_VRRP_PRIORITY,
};

pub const DEFAULT_PORT: u16 = 4433;
pub const DEFAULT_LEASE_LIFETIME_SECS: u64 = 24 * 3600;
pub const DEFAULT_DN_TUN: &str = "holdfast0";
/// Upper bound of the inner MTU a DN's TUN is given; sessions with a smaller path MTU get ICMP
/// "packet too big" for larger packets.
pub const DEFAULT_DN_MTU: u16 = 1420;
pub const DEFAULT_OSPF_INTERFACE: &str = "eth0";
/// Where a DN keeps its lease journal unless `lease_journal` says otherwise: `<this>/<name>.leases`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/holdfast";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: RawCluster,
    #[serde(default)]
    dn: Vec<RawDn>,
    ospf: Option<RawOspf>,
    #[serde(default)]
    esr: Vec<RawEsr>,
    vrrp: Option<RawVrrp>,
    detector: Option<RawDetector>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetector {
    port: Option<u16>,
    interval_ms: Option<u64>,
    misses: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOspf {
    network: String,
    area: Option<String>,
    hello_interval_secs: Option<u16>,
    dead_interval_secs: Option<u16>,
    home_cost: Option<u32>,
    standby_cost: Option<u32>,
    active_cost: Option<u32>,
    peer_port: Option<u16>,
    bfd: Option<bool>,
    bfd_interval_ms: Option<u16>,
    bfd_multiplier: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEsr {
    name: String,
    router_id: String,
    ospf_interface: Option<String>,
    service_address: Option<String>,
    service_interface: Option<String>,
    priority: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    client_ca: PathBuf,
    #[serde(default)]
    client_routes: Vec<String>,
    #[serde(default)]
    revoked_clients: Vec<String>,
    lease_lifetime_secs: Option<u64>,
    block_prefix: Option<u8>,
    block_prefix6: Option<u8>,
    active_metric: Option<u32>,
    home_metric: Option<u32>,
    standby_metric: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDn {
    name: String,
    endpoint: String,
    listen: Option<String>,
    pool: String,
    pool6: Option<String>,
    public_key: String,
    signing_key: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    lease_journal: Option<PathBuf>,
    tun: Option<String>,
    mtu: Option<u16>,
    router_id: Option<String>,
    ospf_interface: Option<String>,
    #[serde(default)]
    dns_servers: Vec<String>,
    #[serde(default)]
    dns_search: Vec<String>,
}

/// The routing plane: OSPF between the DNs and the edge service routers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ospf {
    /// The cluster network every DN and ESR speaks OSPF on.
    pub network: IpNet,
    pub area: std::net::Ipv4Addr,
    pub hello_interval_secs: u16,
    pub dead_interval_secs: u16,
    /// OSPF external costs DNs announce: own blocks, blocks they back, blocks and clients they
    /// serve for a dead owner. Lower wins.
    pub home_cost: u32,
    pub standby_cost: u32,
    pub active_cost: u32,
    /// BFD on every OSPF adjacency, unless `bfd = false`.
    pub bfd: Option<Bfd>,
    pub esrs: Vec<EsrSpec>,
    /// UDP port of the DNs' peer notices ("home is back") on their cluster-network address.
    pub peer_port: u16,
}

/// BFD timers: a neighbour is down after `multiplier` missed packets `interval_ms` apart. OSPF's
/// own dead interval is whole seconds; BFD is what notices a lost DN host or link in tens of
/// milliseconds (docs/architecture.md, "Failover").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bfd {
    /// Transmit and receive interval.
    pub interval_ms: u16,
    pub multiplier: u8,
}

pub const DEFAULT_BFD_INTERVAL_MS: u16 = 50;
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EsrSpec {
    pub name: String,
    /// Its address on the cluster network, also its OSPF router id.
    pub router_id: std::net::Ipv4Addr,
    /// The interface on the cluster network (default "eth0").
    pub ospf_interface: String,
}

/// A validated cluster description.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// PEM file of the CA that signs client certificates.
    pub client_ca: PathBuf,
    /// Networks every EN routes into the tunnel (e.g. the server network, or `0.0.0.0/0`).
    pub client_routes: Vec<IpNet>,
    /// Client identities or certificate SHA-256 fingerprints (hex) that are refused.
    pub revoked_clients: Vec<String>,
    pub lease_lifetime_secs: u64,
    /// Metrics of the routes DNs install.
    pub metrics: Metrics,
    pub dns: Vec<DnSpec>,
    /// The routing plane, if `[ospf]` describes it.
    pub ospf: Option<Ospf>,
    /// The ESR pair, if `[vrrp]` describes it (then `ospf` has exactly two ESRs).
    pub vrrp: Option<Vrrp>,
    /// How the DNs' failure detectors heartbeat each other (`[detector]`, defaults without).
    pub detector: Detector,
}

/// UDP port the failure detectors (`dn-fd`) heartbeat each other on, on the DNs' cluster
/// network addresses, unless `[detector] port` says otherwise.
pub const DEFAULT_DETECTOR_PORT: u16 = 4435;

/// `[detector]`: the failure detectors' peer heartbeats (thesis 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detector {
    pub port: u16,
    /// Every detector heartbeats every other this often; a peer silent for `misses` intervals
    /// is down.
    pub peers: crate::fd::PeerPolicy,
}

impl Default for Detector {
    fn default() -> Self {
        Self {
            port: DEFAULT_DETECTOR_PORT,
            peers: crate::fd::PeerPolicy::default(),
        }
    }
}

fn parse_detector(raw: Option<RawDetector>, ospf: Option<&Ospf>) -> Result<Detector, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Detector::default());
    };
    let default = Detector::default();
    let port = raw.port.unwrap_or(default.port);
    if port == 0 {
        return Err(invalid("detector.port", "must be a UDP port, 1 to 65535"));
    }
    if ospf.is_some_and(|o| o.peer_port == port) {
        return Err(invalid(
            "detector.port",
            format!("{port} is also ospf.peer_port, the DNs' own notices"),
        ));
    }
    let interval_ms = raw
        .interval_ms
        .unwrap_or(default.peers.interval.as_millis() as u64);
    if !(1..=10_000).contains(&interval_ms) {
        return Err(invalid(
            "detector.interval_ms",
            format!("{interval_ms} is out of range: 1 to 10000 ms"),
        ));
    }
    let misses = raw.misses.unwrap_or(default.peers.misses);
    if !(1..=100).contains(&misses) {
        return Err(invalid(
            "detector.misses",
            format!("{misses} is out of range: 1 to 100"),
        ));
    }
    Ok(Detector {
        port,
        peers: crate::fd::PeerPolicy {
            interval: std::time::Duration::from_millis(interval_ms),
            misses,
        },
    })
}

#[derive(Debug, Clone)]
pub struct DnSpec {
    pub name: String,
    /// Where ENs reach this DN.
    pub endpoint: SocketAddr,
    /// The UDP address the DN binds.
    pub listen: SocketAddr,
    pub plan: PoolPlan,
    /// The IPv6 pool of a dual-stack DN (`pool6`), split among the same backups as `plan`;
    /// `plan` is then the IPv4 pool.
    pub plan6: Option<PoolPlan>,
    pub public_key: VerifyingKey,
    /// Files only the DN itself needs; `None` where this copy of the config omits them.
    pub signing_key: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Where the DN keeps its own pool's leases across restarts.
    pub lease_journal: PathBuf,
    pub tun: String,
    pub mtu: u16,
    /// Its address on the cluster network, also its OSPF router id (with `[ospf]`).
    pub router_id: Option<std::net::Ipv4Addr>,
    /// The interface on the cluster network (default "eth0").
    pub ospf_interface: String,
    /// DNS servers and search domains pushed to the clients whose address is in this pool.
    pub dns: DnsSettings,
}

/// What is wrong with a cluster description, and where.
///
/// Displayed as `FILE:LINE: KEY: MESSAGE`, the form editors and CI logs link to; parts that are
/// not known (no file for [`check_name`] on its own, no line for text that is not TOML) are left
/// out.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The I/O error is part of the message, not a `source`: callers print one line.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// Not TOML, or not the shape of cluster.toml: a missing, unknown or mistyped key.
    #[error("{}{message}", place(.file, .line, .key.as_deref()))]
    Syntax {
        file: Option<String>,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
    /// A well-formed value that is wrong: a bad network, overlapping pools, a duplicate name.
    #[error("{}{message}", place(.file, .line, Some(.key)))]
    Invalid {
        file: Option<String>,
        line: Option<usize>,
        key: String,
        message: String,
    },
}

fn place(file: &Option<String>, line: &Option<usize>, key: Option<&str>) -> String {
    let mut out = match (file, line) {
        (Some(f), Some(l)) => format!("{f}:{l}: "),
        (Some(f), None) => format!("{f}: "),
        (None, Some(l)) => format!("line {l}: "),
        (None, None) => String::new(),
    };
    if let Some(key) = key {
        out.push_str(key);
        out.push_str(": ");
    }
    out
}

impl ConfigError {
    /// The 1-based line of the offending key, where known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => *line,
        }
    }

    /// The offending key's path (`dn[1].pool`), where known.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { key, .. } => key.as_deref(),
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }

    /// Names the file, and the line of the key unless the error already points elsewhere.
    fn locate(mut self, file: &str, locator: &Locator) -> Self {
        if let ConfigError::Syntax { file: f, .. } | ConfigError::Invalid { file: f, .. } =
            &mut self
        {
            *f = Some(file.to_owned());
        }
        if let ConfigError::Invalid { line, key, .. } = &mut self {
            if line.is_none() {
                *line = locator.line(key);
            }
        }
        self
    }

    /// Reports the error at the line of `path` instead of its own key's (for keys that are
    /// absent, such as a missing `[[esr]]`).
    fn at(mut self, locator: &Locator, path: &str) -> Self {
        if let ConfigError::Invalid { line, .. } = &mut self {
            *line = locator.line(path);
        }
        self
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: None,
        line: None,
        key: key.into(),
        message: message.into(),
    }
}

/// A DN or client name: short, printable, safe in file names, interface names and logs.
pub fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    check_token(key, name, 63)
}

/// 1 to `max` letters, digits, '-', '_' or '.': safe to write into any file or config.
pub(crate) fn check_token(key: &str, name: &str, max: usize) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{name:?} must be 1-{max} characters of letters, digits, '-', '_' or '.'"),
        ))
    }
}

fn parse_net(key: &str, text: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = text
        .parse()
        .map_err(|_| invalid(key, format!("{text:?} is not a network like 10.0.0.0/24")))?;
    if net.trunc() != net {
        return Err(invalid(
            key,
            format!("{net} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

fn parse_socket(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    // An address without a port gets the default port.
    text.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| {
            invalid(
                key,
                format!("{text:?} is not an address like 192.0.2.1:4433 or [2001:db8::1]:4433"),
            )
        })
}

/// `dns_servers` and `dns_search` of `dn[i]`.
fn parse_dns(i: usize, d: &RawDn) -> Result<DnsSettings, ConfigError> {
    let key = |field: &str| format!("dn[{i}].{field}");
    if d.dns_servers.len() > MAX_SERVERS {
        return Err(invalid(
            key("dns_servers"),
            format!(
                "{} servers, at most {MAX_SERVERS} (the C library ignores more)",
                d.dns_servers.len()
            ),
        ));
    }
    if d.dns_search.len() > MAX_SEARCH {
        return Err(invalid(
            key("dns_search"),
            format!("{} domains, at most {MAX_SEARCH}", d.dns_search.len()),
        ));
    }
    let mut dns = DnsSettings::default();
    for (j, text) in d.dns_servers.iter().enumerate() {
        let key = key(&format!("dns_servers[{j}]"));
        let ip: std::net::IpAddr = text.parse().map_err(|_| {
            invalid(
                &key,
                format!("{text:?} is not an IP address like 10.0.2.53"),
            )
        })?;
        check_server(ip).map_err(|e| invalid(&key, e))?;
        if dns.servers.contains(&ip) {
            return Err(invalid(key, format!("{ip} is listed twice")));
        }
        dns.servers.push(ip);
    }
    for (j, name) in d.dns_search.iter().enumerate() {
        let key = key(&format!("dns_search[{j}]"));
        check_domain(name).map_err(|e| invalid(&key, e))?;
        if dns.search.iter().any(|o| o.eq_ignore_ascii_case(name)) {
            return Err(invalid(key, format!("{name:?} is listed twice")));
        }
        dns.search.push(name.clone());
    }
    Ok(dns)
}

/// The `pool6` of each DN: IPv6, beside an IPv4 `pool`, overlapping no other pool.
fn parse_pools6(
    raw: &[RawDn],
    pools: &[IpNet],
    locator: &Locator,
) -> Result<Vec<Option<IpNet>>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, d) in raw.iter().enumerate() {
        let key = format!("dn[{i}].pool6");
        let Some(text) = &d.pool6 else {
            out.push(None);
            continue;
        };
        let net = parse_net(&key, text)?;
        if !matches!(net, IpNet::V6(_)) {
            return Err(invalid(
                key,
                format!("{net} is not an IPv6 network like fd00:200::/64"),
            ));
        }
        if !matches!(pools[i], IpNet::V4(_)) {
            return Err(invalid(
                key,
                format!(
                    "a second pool needs an IPv4 pool beside it, and {} is IPv6",
                    pools[i]
                ),
            ));
        }
        // Short enough to split into blocks that hold the IPv4 blocks' clients, long enough
        // not to take a whole site's space for one DN.
        if !(32..=120).contains(&net.prefix_len()) {
            return Err(invalid(
                key,
                format!("/{} is outside /32..=/120", net.prefix_len()),
            ));
        }
        let earlier = out
            .iter()
            .enumerate()
            .filter_map(|(j, p): (usize, &Option<IpNet>)| p.map(|p| (format!("dn[{j}].pool6"), p)));
        let v4 = pools
            .iter()
            .enumerate()
            .map(|(j, p)| (format!("dn[{j}].pool"), *p));
        for (other_key, other) in earlier.chain(v4).collect::<Vec<_>>() {
            if other.contains(&net) || net.contains(&other) {
                return Err(invalid(
                    key,
                    format!(
                        "{net} ({}) overlaps {other} ({})",
                        d.name,
                        locator.refer(&other_key)
                    ),
                ));
            }
        }
        out.push(Some(net));
    }
    Ok(out)
}

/// Splits a DN's IPv6 pool as its IPv4 pool is split. Every IPv6 block must hold at least as
/// many addresses as the IPv4 block it pairs with: a client's IPv6 address sits at its IPv4
/// address's place ([`PoolPlan::twin`]).
fn plan_pool6(
    pool6: IpNet,
    others: &[String],
    plan: &PoolPlan,
    block_prefix6: Option<u8>,
    locator: &Locator,
) -> Result<PoolPlan, String> {
    let plan6 = PoolPlan::new(pool6, others, block_prefix6).map_err(|e| {
        let mut message = e.to_string();
        if block_prefix6.is_some() {
            let _ = write!(
                message,
                " (block size from {})",
                locator.refer("cluster.block_prefix6")
            );
        }
        message
    })?;
    let host_bits = |n: IpNet| n.max_prefix_len() - n.prefix_len();
    let (v4, v6) = (plan.blocks[0].net, plan6.blocks[0].net);
    if host_bits(v6) < host_bits(v4) {
        return Err(format!(
            "its blocks ({v6}) hold fewer addresses than the IPv4 pool's ({v4}): they need at most /{}",
            128 - host_bits(v4)
        ));
    }
    Ok(plan6)
}

fn parse_ospf(
    o: RawOspf,
    esrs: &[RawEsr],
    dns: &[DnSpec],
    locator: &Locator,
) -> Result<Ospf, ConfigError> {
    let network = parse_net("ospf.network", &o.network)?;
    let area_text = o.area.unwrap_or_else(|| "0.0.0.0".into());
    let area = area_text
        .parse::<std::net::Ipv4Addr>()
        .or_else(|_| area_text.parse::<u32>().map(std::net::Ipv4Addr::from))
        .map_err(|_| {
            invalid(
                "ospf.area",
                format!("{area_text:?} is not an area like 0.0.0.0 or 0"),
            )
        })?;
    let hello_interval_secs = o.hello_interval_secs.unwrap_or(1);
    let dead_interval_secs = o.dead_interval_secs.unwrap_or(3);
    if hello_interval_secs == 0 || dead_interval_secs <= hello_interval_secs {
        return Err(invalid(
            "ospf.dead_interval_secs",
            "the dead interval must be longer than a non-zero hello interval",
        ));
    }
    let (active_cost, home_cost, standby_cost) = (
        o.active_cost.unwrap_or(10),
        o.home_cost.unwrap_or(20),
        o.standby_cost.unwrap_or(30),
    );
    if !(active_cost < home_cost && home_cost < standby_cost) {
        return Err(invalid(
            "ospf.active_cost",
            format!("costs must rise from active ({active_cost}) to home ({home_cost}) to standby ({standby_cost})"),
        ));
    }
    let bfd = Bfd {
        interval_ms: o.bfd_interval_ms.unwrap_or(DEFAULT_BFD_INTERVAL_MS),
        multiplier: o.bfd_multiplier.unwrap_or(DEFAULT_BFD_MULTIPLIER),
    };
    // FRR's bfdd accepts no more (BIRD accepts a superset).
    if !(10..=60000).contains(&bfd.interval_ms) {
        return Err(invalid(
            "ospf.bfd_interval_ms",
            format!("{} is outside 10..=60000", bfd.interval_ms),
        ));
    }
    if bfd.multiplier < 2 {
        return Err(invalid(
            "ospf.bfd_multiplier",
            format!("{} is outside 2..=255", bfd.multiplier),
        ));
    }
    let bfd = o.bfd.unwrap_or(true).then_some(bfd);
    let mut ids: Vec<(String, std::net::Ipv4Addr)> = Vec::new();
    for (i, d) in dns.iter().enumerate() {
        let id = d.router_id.ok_or_else(|| {
            invalid(
                format!("dn[{i}].router_id"),
                "every DN needs its cluster-network address when [ospf] is set",
            )
        })?;
        ids.push((format!("dn[{i}].router_id"), id));
    }
    let mut esr_specs = Vec::new();
    for (i, e) in esrs.iter().enumerate() {
        let key = format!("esr[{i}].router_id");
        check_name(&format!("esr[{i}].name"), &e.name)?;
        let first = dns
            .iter()
            .position(|d| d.name == e.name)
            .map(|j| format!("dn[{j}].name"))
            .or_else(|| {
                esr_specs
                    .iter()
                    .position(|x: &EsrSpec| x.name == e.name)
                    .map(|j| format!("esr[{j}].name"))
            });
        if let Some(first) = first {
            return Err(invalid(
                format!("esr[{i}].name"),
                format!("{:?} is also {}", e.name, locator.refer(&first)),
            ));
        }
        let id = e
            .router_id
            .parse::<std::net::Ipv4Addr>()
            .map_err(|_| invalid(&key, format!("{:?} is not an IPv4 address", e.router_id)))?;
        ids.push((key, id));
        let ospf_interface = e
            .ospf_interface
            .clone()
            .unwrap_or_else(|| DEFAULT_OSPF_INTERFACE.into());
        check_interface(&format!("esr[{i}].ospf_interface"), &ospf_interface)?;
        esr_specs.push(EsrSpec {
            name: e.name.clone(),
            router_id: id,
            ospf_interface,
        });
    }
    if esr_specs.is_empty() {
        return Err(invalid("esr", "[ospf] needs at least one [[esr]]").at(locator, "ospf"));
    }
    for (i, (key, id)) in ids.iter().enumerate() {
        if !network.contains(&std::net::IpAddr::V4(*id)) {
            return Err(invalid(
                key,
                format!("{id} is not on the cluster network {network}"),
            ));
        }
        if let Some((other, _)) = ids[..i].iter().find(|(_, x)| x == id) {
            return Err(invalid(
                key,
                format!("{id} is also {}", locator.refer(other)),
            ));
        }
    }
    Ok(Ospf {
        network,
        area,
        hello_interval_secs,
        dead_interval_secs,
        home_cost,
        standby_cost,
        active_cost,
        bfd,
        esrs: esr_specs,
        peer_port: o.peer_port.unwrap_or(crate::peer::DEFAULT_PEER_PORT),
    })
}

impl Cluster {
    /// Reads and validates `path`. Relative file names inside are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_named(&text, base, &path.display().to_string())
    }

    /// Parses and validates config text; `base` resolves relative file names. Errors name the
    /// file `cluster.toml`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        Self::parse_named(text, base, "cluster.toml")
    }

    fn parse_named(text: &str, base: &Path, file: &str) -> Result<Self, ConfigError> {
        let locator = Locator::new(text);
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            ConfigError::Syntax {
                file: Some(file.to_owned()),
                line: offset.map(|o| locator.line_at(o)),
                key: offset.and_then(|o| locator.path_at(o)),
                // toml's own rendering repeats the line with a caret; one line reads better.
                message: e.message().trim().replace('\n', "; "),
            }
        })?;
        Self::validate(raw, base, &locator).map_err(|e| e.locate(file, &locator))
    }

    fn validate(raw: RawFile, base: &Path, locator: &Locator) -> Result<Self, ConfigError> {
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let c = raw.cluster;
        let client_routes = c
            .client_routes
            .iter()
            .enumerate()
            .map(|(i, r)| parse_net(&format!("cluster.client_routes[{i}]"), r))
            .collect::<Result<Vec<_>, _>>()?;
        let lease_lifetime_secs = c.lease_lifetime_secs.unwrap_or(DEFAULT_LEASE_LIFETIME_SECS);
        if lease_lifetime_secs == 0 {
            return Err(invalid("cluster.lease_lifetime_secs", "must be positive"));
        }
        let defaults = Metrics::default();
        let metrics = Metrics {
            active: c.active_metric.unwrap_or(defaults.active),
            home: c.home_metric.unwrap_or(defaults.home),
            standby: c.standby_metric.unwrap_or(defaults.standby),
        };
        if !(metrics.active < metrics.home && metrics.home < metrics.standby) {
            return Err(invalid(
                "cluster.active_metric",
                format!(
                    "metrics must rise from active ({}) to home ({}) to standby ({})",
                    metrics.active, metrics.home, metrics.standby
                ),
            ));
        }
        if raw.dn.is_empty() {
            return Err(
                invalid("dn", "the cluster needs at least one [[dn]]").at(locator, "cluster")
            );
        }
        let mut names = HashMap::new();
        for (i, d) in raw.dn.iter().enumerate() {
            check_name(&format!("dn[{i}].name"), &d.name)?;
            if let Some(first) = names.insert(d.name.as_str(), i) {
                return Err(invalid(
                    format!("dn[{i}].name"),
                    format!(
                        "{:?} is also {}",
                        d.name,
                        locator.refer(&format!("dn[{first}].name"))
                    ),
                ));
            }
        }
        let pools = raw
            .dn
            .iter()
            .enumerate()
            .map(|(i, d)| parse_net(&format!("dn[{i}].pool"), &d.pool))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some((i, j)) = first_overlap(&pools) {
            return Err(invalid(
                format!("dn[{j}].pool"),
                format!(
                    "{} ({}) overlaps {} of {} ({})",
                    pools[j],
                    raw.dn[j].name,
                    pools[i],
                    raw.dn[i].name,
                    locator.refer(&format!("dn[{i}].pool"))
                ),
            ));
        }
        let pools6 = parse_pools6(&raw.dn, &pools, locator)?;
        let mut dns = Vec::with_capacity(raw.dn.len());
        for (i, (d, pool)) in raw.dn.iter().zip(&pools).enumerate() {
            let key = |field: &str| format!("dn[{i}].{field}");
            let others: Vec<String> = raw
                .dn
                .iter()
                .filter(|o| o.name != d.name)
                .map(|o| o.name.clone())
                .collect();
            let plan = PoolPlan::new(*pool, &others, c.block_prefix).map_err(|e| {
                let mut message = e.to_string();
                if c.block_prefix.is_some() {
                    let _ = write!(
                        message,
                        " (block size from {})",
                        locator.refer("cluster.block_prefix")
                    );
                }
                invalid(key("pool"), message)
            })?;
            let plan6 = match pools6[i] {
                Some(pool6) => Some(
                    plan_pool6(pool6, &others, &plan, c.block_prefix6, locator)
                        .map_err(|m| invalid(key("pool6"), m))?,
                ),
                None => None,
            };
            let endpoint = parse_socket(&key("endpoint"), &d.endpoint)?;
            let listen = match &d.listen {
                Some(l) => parse_socket(&key("listen"), l)?,
                None => SocketAddr::new(
                    match endpoint {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                    },
                    endpoint.port(),
                ),
            };
            let public_key = parse_public_key(&d.public_key)
                .map_err(|e| invalid(key("public_key"), e.to_string()))?;
            let tun = d.tun.clone().unwrap_or_else(|| DEFAULT_DN_TUN.to_owned());
            if tun.is_empty() || tun.len() > 15 {
                return Err(invalid(key("tun"), "interface names are 1-15 characters"));
            }
            let mtu = d.mtu.unwrap_or(DEFAULT_DN_MTU);
            if !(1280..=9000).contains(&mtu) {
                return Err(invalid(key("mtu"), format!("{mtu} is outside 1280..=9000")));
            }
            let router_id = d
                .router_id
                .as_deref()
                .map(|r| {
                    r.parse::<std::net::Ipv4Addr>().map_err(|_| {
                        invalid(key("router_id"), format!("{r:?} is not an IPv4 address"))
                    })
                })
                .transpose()?;
            let ospf_interface = d
                .ospf_interface
                .clone()
                .unwrap_or_else(|| DEFAULT_OSPF_INTERFACE.into());
            check_interface(&key("ospf_interface"), &ospf_interface)?;
            let dns_settings = parse_dns(i, d)?;
            dns.push(DnSpec {
                name: d.name.clone(),
                endpoint,
                listen,
                plan,
                plan6,
                public_key,
                signing_key: d.signing_key.clone().map(resolve),
                cert: d.cert.clone().map(resolve),
                key: d.key.clone().map(resolve),
                lease_journal: d.lease_journal.clone().map(resolve).unwrap_or_else(|| {
                    Path::new(DEFAULT_STATE_DIR).join(format!("{}.leases", d.name))
                }),
                tun,
                mtu,
                router_id,
                ospf_interface,
                dns: dns_settings,
            });
        }
        let ospf = raw
            .ospf
            .map(|o| parse_ospf(o, &raw.esr, &dns, locator))
            .transpose()?;
        if ospf.is_none() && !raw.esr.is_empty() {
            return Err(invalid("esr", "[[esr]] needs an [ospf] section"));
        }
        let vrrp = parse_vrrp(raw.vrrp, &raw.esr, ospf.as_ref(), &pools, locator)?;
        let detector = parse_detector(raw.detector, ospf.as_ref())?;
        Ok(Self {
            client_ca: resolve(c.client_ca),
            client_routes,
            revoked_clients: c.revoked_clients,
            lease_lifetime_secs,
            metrics,
            dns,
            ospf,
            vrrp,
            detector,
        })
    }

    /// Where a client of `issuer`'s pool at `address` fails over to, in order: its block's
    /// designated backup first (the edge already holds that DN's standing route for the block),
    /// then every other DN in configuration order; never the issuer.
    pub fn failover_order(&self, issuer: &str, address: std::net::IpAddr) -> Vec<String> {
        let backup = self
            .dn(issuer)
            .and_then(|d| d.plan.block_containing(address))
            .and_then(|b| b.backup.clone());
        backup
            .iter()
            .cloned()
            .chain(
                self.dns
                    .iter()
                    .map(|d| d.name.clone())
                    .filter(|n| n != issuer && Some(n) != backup.as_ref()),
            )
            .collect()
    }

    /// The DNS settings for a client at `address`: those of the pool it belongs to, whichever
    /// DN carries the client (a backup hands out its owner's settings). None outside every pool.
    pub fn dns_for(&self, address: std::net::IpAddr) -> DnsSettings {
        self.dns
            .iter()
            .find(|d| d.plan.pool.contains(&address))
            .map(|d| d.dns.clone())
            .unwrap_or_default()
    }

    pub fn dn(&self, name: &str) -> Option<&DnSpec> {
        self.dns.iter().find(|d| d.name == name)
    }

    pub fn issuer_keys(&self) -> IssuerKeys {
        let mut keys = IssuerKeys::default();
        for d in &self.dns {
            keys.insert(d.name.clone(), d.public_key);
            keys.insert_pool(d.name.clone(), d.plan.pool);
            if let Some(plan6) = &d.plan6 {
                keys.insert_pool6(d.name.clone(), plan6.pool);
            }
        }
        keys
    }
}

/// Keys of `cluster.toml` a running DN applies when told to reload (SIGHUP); a change to any
/// other key needs a restart. The files the configuration names (the client CA, the DN's
/// certificate and key) are read again on reload as well.
pub const LIVE_KEYS: &[&str] = &["cluster.revoked_clients"];

/// The keys (dotted paths; `dn` for the `[[dn]]` list) whose values differ between two versions
/// of `cluster.toml` and that a running DN cannot apply (all but [`LIVE_KEYS`]). Empty: the new
/// version can be applied live. Formatting and comments do not count.
pub fn restart_needed(old: &str, new: &str) -> Result<Vec<String>, toml::de::Error> {
    let old: toml::Table = toml::from_str(old)?;
    let new: toml::Table = toml::from_str(new)?;
    let mut changed = Vec::new();
    differences(
        "",
        &toml::Value::Table(old),
        &toml::Value::Table(new),
        &mut changed,
    );
    changed.retain(|k| !LIVE_KEYS.contains(&k.as_str()));
    Ok(changed)
}

fn differences(path: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                let at = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (x.get(key), y.get(key)) {
                    (Some(a), Some(b)) => differences(&at, a, b, out),
                    _ => out.push(at),
                }
            }
        }
        _ if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        crate::lease::encode_key(&signing.verifying_key().to_bytes())
    }

    fn cluster(dns: &str) -> String {
        format!("[cluster]\nclient_ca = \"ca.pem\"\nclient_routes = [\"10.0.2.0/24\"]\n{dns}")
    }

    fn dn(name: &str, pool: &str) -> String {
        format!("[[dn]]\nname = \"{name}\"\nendpoint = \"10.0.1.2\"\npool = \"{pool}\"\npublic_key = \"{}\"\ncert = \"dn.pem\"\n", key())
    }

    fn err(text: &str) -> String {
        Cluster::parse(text, Path::new("/etc/holdfast"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_valid_cluster_parses_with_defaults() {
        let text = cluster(&(dn("dn1", "10.200.0.0/24") + &dn("dn2", "10.201.0.0/24")));
        let c = Cluster::parse(&text, Path::new("/etc/holdfast")).unwrap();
        assert_eq!(c.client_ca, Path::new("/etc/holdfast/ca.pem"));
        let d = c.dn("dn1").unwrap();
        assert_eq!(d.endpoint.to_string(), "10.0.1.2:4433");
        assert_eq!(d.listen.to_string(), "0.0.0.0:4433");
        assert_eq!(d.plan.blocks[0].backup.as_deref(), Some("dn2"));
        assert_eq!(d.cert.as_deref(), Some(Path::new("/etc/holdfast/dn.pem")));
        assert_eq!(d.tun, DEFAULT_DN_TUN);
        assert!(c.issuer_keys().get("dn2").is_some());
    }

    #[test]
    fn standing_routes_cover_own_blocks_and_backed_blocks() {
        use crate::routes::{standing, Reason};
        let text = cluster(
            &(dn("dn1", "10.200.0.0/24")
                + &dn("dn2", "10.201.0.0/24")
                + &dn("dn3", "10.202.0.0/24")),
        );
        let c = Cluster::parse(&text, Path::new("/")).unwrap();
        let routes = standing(&c, "dn2");
        let show: Vec<String> = routes
            .iter()
            .map(|r| format!("{} {} {}", r.net, r.metric, r.reason))
            .collect();
        assert_eq!(
            show,
            [
                "10.200.0.0/25 300 standby for dn1",
                "10.201.0.0/25 200 own block",
                "10.201.0.128/25 200 own block",
                "10.202.0.128/25 300 standby for dn3",
            ]
        );
        assert_eq!(routes[1].reason, Reason::Home);
        assert!(standing(&c, "nobody").is_empty());
        let bad = text.replace("[cluster]\n", "[cluster]\nhome_metric = 400\n");
        // home_metric is set on line 2; active_metric is absent, so its table's line.
        assert!(err(&bad).starts_with("cluster.toml:1: cluster.active_metric: metrics must rise"));
    }

    #[test]
    fn failover_goes_to_the_blocks_backup_first() {
        let text = cluster(
            &(dn("dn1", "10.200.0.0/24")
                + &dn("dn2", "10.201.0.0/24")
                + &dn("dn3", "10.202.0.0/24")),
        );
        let c = Cluster::parse(&text, Path::new("/")).unwrap();
        // dn1's second block is backed by dn3.
        let order = c.failover_order("dn1", "10.200.0.130".parse().unwrap());
        assert_eq!(order, ["dn3", "dn2"]);
        assert_eq!(
            c.failover_order("dn1", "10.200.0.5".parse().unwrap()),
            ["dn2", "dn3"]
        );
        assert_eq!(
            c.failover_order("dn9", "10.9.9.9".parse().unwrap()),
            ["dn1", "dn2", "dn3"]
        );
    }

    #[test]
    fn ospf_is_checked() {
        let dns = dn("dn1", "10.200.0.0/24")
            .replace("endpoint", "router_id = \"10.9.0.1\"\nendpoint")
            + &dn("dn2", "10.201.0.0/24").replace("endpoint", "router_id = \"10.9.0.2\"\nendpoint");
        let ospf = "[ospf]\nnetwork = \"10.9.0.0/24\"\n[[esr]]\nname = \"esr1\"\nrouter_id = \"10.9.0.254\"\n";
        let good = cluster(&dns) + ospf;
        let c = Cluster::parse(&good, Path::new("/")).unwrap();
        let o = c.ospf.unwrap();
        assert_eq!(
            (o.area.to_string(), o.home_cost, o.esrs[0].name.as_str()),
            ("0.0.0.0".into(), 20, "esr1")
        );
        assert_eq!(
            o.bfd,
            Some(Bfd {
                interval_ms: 50,
                multiplier: 3
            })
        );
        let with = |extra: &str| {
            good.replace(
                "network = \"10.9.0.0/24\"",
                &format!("network = \"10.9.0.0/24\"\n{extra}"),
            )
        };
        let c = Cluster::parse(&with("bfd = false"), Path::new("/")).unwrap();
        assert_eq!(c.ospf.unwrap().bfd, None);
        assert_eq!(
            err(&with("bfd_interval_ms = 5")),
            "cluster.toml:20: ospf.bfd_interval_ms: 5 is outside 10..=60000"
        );
        assert_eq!(
            err(&with("bfd_multiplier = 1")),
            "cluster.toml:20: ospf.bfd_multiplier: 1 is outside 2..=255"
        );
        // Lines: dn[0] 4-10 (router_id 6), dn[1] 11-17 (router_id 13), [ospf] 18,
        // network 19, [[esr]] 20, its router_id 22.
        assert!(err(&good.replace("10.9.0.254", "10.8.0.254")).starts_with(
            "cluster.toml:22: esr[0].router_id: 10.8.0.254 is not on the cluster network"
        ));
        assert_eq!(
            err(&good.replace("10.9.0.254", "10.9.0.2")),
            "cluster.toml:22: esr[0].router_id: 10.9.0.2 is also dn[1].router_id, line 13"
        );
        // A missing key is reported at its table's header.
        assert!(err(&good.replace("router_id = \"10.9.0.1\"\n", ""))
            .starts_with("cluster.toml:4: dn[0].router_id: every DN needs"));
        assert!(
            err(&(cluster(&dns) + "[ospf]\nnetwork = \"10.9.0.0/24\"\n"))
                .starts_with("cluster.toml:18: esr: [ospf] needs at least one [[esr]]")
        );
        assert!(err(&good.replace(
            "network = \"10.9.0.0/24\"",
            "network = \"10.9.0.0/24\"\nhome_cost = 5"
        ))
        .starts_with("cluster.toml:18: ospf.active_cost"));
        assert!(
            err(&good.replace("network = \"10.9.0.0/24\"", "network = \"10.9.0/24\""))
                .starts_with("cluster.toml:19: ospf.network: \"10.9.0/24\" is not a network")
        );
        assert_eq!(
            err(&good.replace("name = \"esr1\"", "name = \"dn2\"")),
            "cluster.toml:21: esr[0].name: \"dn2\" is also dn[1].name, line 12"
        );
    }

    #[test]
    fn the_documented_example_is_valid() {
        let text = include_str!("../../examples/cluster.toml");
        let c = Cluster::parse(text, Path::new("/etc/holdfast")).unwrap();
        assert_eq!(c.dns[0].plan.gateway().to_string(), "10.200.0.1");
        assert_eq!(c.revoked_clients, ["stolen-laptop"]);
    }

    #[test]
    fn errors_name_the_offending_line_and_key() {
        // Lines: [cluster] 1-3; dn[0] 4-9 (name 5, pool 7, public_key 8); dn[1] 10-15
        // (name 11, pool 13).
        let overlap = cluster(&(dn("dn1", "10.200.0.0/16") + &dn("dn2", "10.200.5.0/24")));
        assert_eq!(
            err(&overlap),
            "cluster.toml:13: dn[1].pool: 10.200.5.0/24 (dn2) overlaps 10.200.0.0/16 of dn1 \
             (dn[0].pool, line 7)"
        );
        let e = Cluster::parse(&overlap, Path::new("/")).unwrap_err();
        assert_eq!((e.line(), e.key()), (Some(13), Some("dn[1].pool")));

        let dup = cluster(&(dn("dn1", "10.200.0.0/24") + &dn("dn1", "10.201.0.0/24")));
        assert_eq!(
            err(&dup),
            "cluster.toml:11: dn[1].name: \"dn1\" is also dn[0].name, line 5"
        );
        let bad_name = cluster(&dn("dn/1", "10.200.0.0/24"));
        assert!(err(&bad_name).starts_with("cluster.toml:5: dn[0].name: \"dn/1\" must be"));

        let host_bits = cluster(&dn("dn1", "10.200.0.1/24"));
        assert_eq!(
            err(&host_bits),
            "cluster.toml:7: dn[0].pool: 10.200.0.1/24 has host bits set; \
             did you mean 10.200.0.0/24?"
        );
        let bad_key = cluster(&dn("dn1", "10.200.0.0/24")).replace(&key(), "AAAA");
        assert!(err(&bad_key).starts_with("cluster.toml:8: dn[0].public_key: "));
        let mtu = cluster(&dn("dn1", "10.200.0.0/24")) + "mtu = 100\n";
        assert_eq!(
            err(&mtu),
            "cluster.toml:10: dn[0].mtu: 100 is outside 1280..=9000"
        );
        assert!(err(&cluster("")).starts_with("cluster.toml:1: dn: the cluster needs"));
    }

    #[test]
    fn dns_settings_are_per_pool_and_checked() {
        let base = cluster(&(dn("dn1", "10.200.0.0/24") + &dn("dn2", "10.201.0.0/24")));
        let c = Cluster::parse(&base, Path::new("/")).unwrap();
        assert!(c.dn("dn1").unwrap().dns.is_empty());
        // dn[1]'s keys go at its end, line 16 on.
        let with = |extra: &str| format!("{base}{extra}");
        let c = Cluster::parse(
            &with("dns_servers = [\"10.0.2.53\", \"fd00::53\"]\ndns_search = [\"corp.example\"]\n"),
            Path::new("/"),
        )
        .unwrap();
        let d = &c.dn("dn2").unwrap().dns;
        assert_eq!(d.servers.len(), 2);
        assert_eq!(d.search, ["corp.example"]);
        assert_eq!(c.dns_for("10.201.0.9".parse().unwrap()), *d);
        assert!(c.dns_for("10.200.0.9".parse().unwrap()).is_empty());
        assert!(c.dns_for("192.0.2.1".parse().unwrap()).is_empty());
        assert_eq!(
            err(&with("dns_servers = [\"10.0.2.300\"]\n")),
            "cluster.toml:16: dn[1].dns_servers[0]: \"10.0.2.300\" is not an IP address like 10.0.2.53"
        );
        assert_eq!(
            err(&with(
                "dns_servers = [\"1.1.1.1\", \"1.1.1.2\", \"1.1.1.3\", \"1.1.1.4\"]\n"
            )),
            "cluster.toml:16: dn[1].dns_servers: 4 servers, at most 3 (the C library ignores more)"
        );
        assert_eq!(
            err(&with("dns_servers = [\"10.0.2.53\", \"10.0.2.53\"]\n")),
            "cluster.toml:16: dn[1].dns_servers[1]: 10.0.2.53 is listed twice"
        );
        assert!(err(&with("dns_servers = [\"0.0.0.0\"]\n"))
            .starts_with("cluster.toml:16: dn[1].dns_servers[0]: 0.0.0.0 cannot be"));
        assert!(
            err(&with("dns_search = [\"ok.example\", \"bad domain\"]\n")).starts_with(
                "cluster.toml:16: dn[1].dns_search[1]: \"bad domain\" is not a domain name"
            )
        );
        assert!(err(&with(
            "dns_search = [\"a\", \"b\", \"c\", \"d\", \"e\", \"f\", \"g\"]\n"
        ))
        .starts_with("cluster.toml:16: dn[1].dns_search: 7 domains, at most 6"));
    }

    #[test]
    fn ipv6_pools_are_split_like_ipv4_pools_and_checked() {
        let base = cluster(&(dn("dn1", "10.200.0.0/24") + &dn("dn2", "10.201.0.0/24")));
        // dn[0] is lines 4-9, dn[1] 10-15: a key appended goes to dn[1], line 16.
        let with = |pool6: &str| format!("{base}pool6 = \"{pool6}\"\n");
        let c = Cluster::parse(&with("fd00:201::/64"), Path::new("/")).unwrap();
        assert!(c.dn("dn1").unwrap().plan6.is_none());
        let p = c.dn("dn2").unwrap().plan6.as_ref().unwrap();
        // One other DN: one block, the whole pool, as for IPv4.
        assert_eq!(p.blocks[0].net.to_string(), "fd00:201::/64");
        assert_eq!(p.blocks[0].backup.as_deref(), Some("dn1"));
        assert_eq!(p.gateway().to_string(), "fd00:201::1");
        assert_eq!(
            c.issuer_keys().pool6("dn2"),
            Some("fd00:201::/64".parse().unwrap())
        );
        assert_eq!(
            err(&with("10.202.0.0/24")),
            "cluster.toml:16: dn[1].pool6: 10.202.0.0/24 is not an IPv6 network like fd00:200::/64"
        );
        assert_eq!(
            err(&with("fd00::/16")),
            "cluster.toml:16: dn[1].pool6: /16 is outside /32..=/120"
        );
        let wide = base.replace("10.201.0.0/24", "10.200.4.0/22");
        assert_eq!(
            err(&format!("{wide}pool6 = \"fd00:201::/120\"\n")),
            "cluster.toml:16: dn[1].pool6: its blocks (fd00:201::/120) hold fewer addresses \
             than the IPv4 pool's (10.200.4.0/22): they need at most /118"
        );
        let both = base.replace(
            "pool = \"10.200.0.0/24\"\n",
            "pool = \"10.200.0.0/24\"\npool6 = \"fd00:200::/48\"\n",
        );
        // dn[0].pool6 is line 8, so dn[1] is lines 11-16 and its pool6 line 17.
        assert_eq!(
            err(&format!("{both}pool6 = \"fd00:200:0:1::/64\"\n")),
            "cluster.toml:17: dn[1].pool6: fd00:200:0:1::/64 (dn2) overlaps fd00:200::/48 \
             (dn[0].pool6, line 8)"
        );
        let v6_pool = cluster(&dn("dn1", "fd00:1::/64")) + "pool6 = \"fd00:2::/64\"\n";
        assert!(err(&v6_pool).starts_with("cluster.toml:10: dn[0].pool6: a second pool needs"));
    }

    #[test]
    fn the_detector_section_has_defaults_and_checked_values() {
        let base = cluster(&(dn("dn1", "10.200.0.0/24") + &dn("dn2", "10.201.0.0/24")));
        let c = Cluster::parse(&base, Path::new("/")).unwrap();
        assert_eq!(c.detector, Detector::default());
        let tuned = base.clone() + "[detector]\nport = 5000\ninterval_ms = 20\nmisses = 5\n";
        let c = Cluster::parse(&tuned, Path::new("/")).unwrap();
        assert_eq!(c.detector.port, 5000);
        assert_eq!(
            c.detector.peers.silence_limit(),
            std::time::Duration::from_millis(100)
        );
        // [cluster] 1-3, dn[0] 4-9, dn[1] 10-15, [detector] 16.
        assert_eq!(
            err(&(base.clone() + "[detector]\nmisses = 0\n")),
            "cluster.toml:17: detector.misses: 0 is out of range: 1 to 100"
        );
        assert!(err(&(base.clone() + "[detector]\nport = 0\n"))
            .starts_with("cluster.toml:17: detector.port: "));
        assert!(err(&(base + "[detector]\ninterval = 5\n")).contains("interval"));
    }

    #[test]
    fn blocks_that_do_not_divide_a_pool_name_both_lines() {
        let three =
            dn("dn1", "10.200.0.0/24") + &dn("dn2", "10.201.0.0/30") + &dn("dn3", "10.202.0.0/24");
        // dn[1].pool is on line 13: a /30 cannot hold two blocks of four addresses.
        assert_eq!(
            err(&cluster(&three)),
            "cluster.toml:13: dn[1].pool: pool 10.201.0.0/30 is too small to split into 2 blocks"
        );
        // block_prefix on line 2 moves the body of the file down a line.
        let text = cluster(&three).replace("[cluster]\n", "[cluster]\nblock_prefix = 24\n");
        assert_eq!(
            err(&text.replace("10.201.0.0/30", "10.201.0.0/24")),
            "cluster.toml:8: dn[0].pool: block prefix /24 does not fit pool 10.200.0.0/24: it \
             needs at least /25 and at most /30 (block size from cluster.block_prefix, line 2)"
        );
    }

    #[test]
    fn missing_unknown_and_mistyped_keys_name_their_line() {
        let no_pool = cluster(&(dn("dn1", "10.200.0.0/24") + &dn("dn2", "10.201.0.0/24")))
            .replace("pool = \"10.201.0.0/24\"\n", "");
        assert_eq!(
            err(&no_pool),
            "cluster.toml:10: dn[1]: missing field `pool`"
        );
        let no_ca = cluster(&dn("dn1", "10.200.0.0/24")).replace("client_ca = \"ca.pem\"\n", "");
        assert_eq!(
            err(&no_ca),
            "cluster.toml:1: cluster: missing field `client_ca`"
        );

        let unknown = cluster(&dn("dn1", "10.200.0.0/24")) + "colour = \"red\"\n";
        assert!(err(&unknown).starts_with("cluster.toml:10: dn[0].colour: unknown field `colour`"));
        let unknown_table = cluster(&dn("dn1", "10.200.0.0/24")) + "[vrpp]\n";
        assert!(err(&unknown_table).starts_with("cluster.toml:10: vrpp: unknown field `vrpp`"));

        assert_eq!(
            err("[cluster]\nclient_ca = 1\n"),
            "cluster.toml:2: cluster.client_ca: invalid type: integer `1`, expected path string"
        );
        let mistyped = cluster(&dn("dn1", "10.200.0.0/24")) + "mtu = \"big\"\n";
        assert!(err(&mistyped).starts_with("cluster.toml:10: dn[0].mtu: invalid type: string"));
        // Not TOML at all: the line, and no key.
        assert_eq!(
            err("[cluster]\nclient_ca = \n"),
            "cluster.toml:2: invalid string; expected `\"`, `'`"
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("holdfast-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        std::fs::write(&path, cluster(&dn("dn1", "10.200.0.1/24"))).unwrap();
        let e = Cluster::load(&path).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.starts_with(&format!("{}:7: dn[0].pool: ", path.display())),
            "{e}"
        );
        let missing = Cluster::load(&dir.join("none.toml")).unwrap_err();
        assert!(missing.to_string().starts_with("cannot read "));
        // check_name on its own (the client's config uses it) knows neither file nor line.
        assert_eq!(
            check_name("dn[0].name", "").unwrap_err().to_string(),
            "dn[0].name: \"\" must be 1-63 characters of letters, digits, '-', '_' or '.'"
        );
    }

    #[test]
    fn only_revocations_reload_live() {
        let old = "[cluster]\nclient_ca = \"ca.pem\"\nrevoked_clients = []\n\n[[dn]]\nname = \"dn1\"\nmtu = 1400\n";
        let revoked = old.replace(
            "revoked_clients = []",
            "revoked_clients = [\"laptop\"] # stolen",
        );
        assert_eq!(restart_needed(old, &revoked).unwrap(), Vec::<String>::new());
        let reformatted = old.replace("[cluster]\n", "# the cluster\n[cluster]\n");
        assert_eq!(
            restart_needed(old, &reformatted).unwrap(),
            Vec::<String>::new()
        );
        let mtu = revoked.replace("mtu = 1400", "mtu = 1300");
        assert_eq!(restart_needed(old, &mtu).unwrap(), vec!["dn".to_owned()]);
        let lifetime = old.replace("[[dn]]", "lease_lifetime_secs = 60\n[[dn]]");
        assert_eq!(
            restart_needed(old, &lifetime).unwrap(),
            vec!["cluster.lease_lifetime_secs".to_owned()]
        );
        assert!(restart_needed(old, "[cluster").is_err());
    }
}
