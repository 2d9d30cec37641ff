//! `[vrrp]`: two ESRs share the servers' gateway address (VRRPv3, keepalived), and optionally
//! the DNs' gateway towards the servers on the cluster network, moved together with it.
//!
//! The servers' return traffic to every client goes to one virtual address on the service
//! network; whichever ESR is master holds it, and the other takes it over when the master goes
//! silent (docs/architecture.md: measured about 37 ms with 10 ms advertisements).

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

use super::locate::Locator;
use super::{invalid, ConfigError, Ospf, RawEsr};

pub const DEFAULT_SERVICE_INTERFACE: &str = "eth1";
pub const DEFAULT_VRRP_PRIORITY: u8 = 100;
/// keepalived's `advert_int 0.01`, the smallest VRRPv3 allows.
pub const DEFAULT_ADVERT_INTERVAL_MS: u16 = 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVrrp {
    virtual_router_id: u8,
    virtual_address: String,
    cluster_virtual_address: Option<String>,
    advert_interval_ms: Option<u16>,
}

/// The ESR pair, validated: two routers on one service network, and the address they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vrrp {
    pub virtual_router_id: u8,
    /// The servers' gateway, with the service network's prefix length.
    pub virtual_address: Ipv4Net,
    /// The DNs' gateway towards the servers, on the cluster network: held by the same ESR as
    /// `virtual_address` (one keepalived sync group), so both directions move at once.
    pub cluster_virtual_address: Option<Ipv4Net>,
    /// A multiple of 10 in 10..=40950: VRRPv3 counts centiseconds in 12 bits.
    pub advert_interval_ms: u16,
    /// In `[[esr]]` order.
    pub routers: [VrrpRouter; 2],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VrrpRouter {
    /// The ESR's name.
    pub name: String,
    /// Its interface on the service network.
    pub interface: String,
    /// Its own address there, with the prefix length.
    pub address: Ipv4Net,
    /// 1..=254 (255 means "owns the address", which neither does).
    pub priority: u8,
    /// Its interface on the cluster network: without it, it reaches no client.
    pub cluster_interface: String,
    /// Its address on the cluster network (its router id).
    pub cluster_address: std::net::Ipv4Addr,
}

impl Vrrp {
    /// The service network both ESRs and the virtual address are on.
    pub fn network(&self) -> Ipv4Net {
        self.virtual_address.trunc()
    }

    /// The other router of the pair.
    pub fn peer_of(&self, name: &str) -> Option<&VrrpRouter> {
        match &self.routers {
            [a, b] if a.name == name => Some(b),
            [a, b] if b.name == name => Some(a),
            _ => None,
        }
    }
}

/// An interface name as Linux takes it, and safe to write into any daemon's config.
pub(super) fn check_interface(key: &str, name: &str) -> Result<(), ConfigError> {
    super::check_token(key, name, 15)
}

/// A host address on a network (not its network or broadcast address), like `10.0.2.2/24`.
fn parse_host(key: &str, text: &str, example: &str) -> Result<Ipv4Net, ConfigError> {
    let net: Ipv4Net = text.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not an IPv4 address with its prefix length, like {example}"),
        )
    })?;
    if net.prefix_len() > 30 || net.addr() == net.network() || net.addr() == net.broadcast() {
        return Err(invalid(
            key,
            format!("{net} is not a host address of a network of at least 4 addresses"),
        ));
    }
    Ok(net)
}

pub(super) fn parse_vrrp(
    raw: Option<RawVrrp>,
    esrs: &[RawEsr],
    ospf: Option<&Ospf>,
    pools: &[IpNet],
    locator: &Locator,
) -> Result<Option<Vrrp>, ConfigError> {
    let Some(raw) = raw else {
        // Service-side keys alone would be silently ignored: say what they need.
        for (i, e) in esrs.iter().enumerate() {
            let set = [
                ("service_address", e.service_address.is_some()),
                ("service_interface", e.service_interface.is_some()),
                ("priority", e.priority.is_some()),
            ];
            if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    format!("esr[{i}].{field}"),
                    "describes the ESR pair; it needs a [vrrp] section",
                ));
            }
        }
        return Ok(None);
    };
    let Some(ospf) = ospf else {
        return Err(invalid(
            "vrrp",
            "the ESR pair needs [ospf] and its two [[esr]]",
        ));
    };
    if esrs.len() != 2 {
        return Err(invalid(
            "vrrp",
            format!(
                "[vrrp] makes a pair of exactly two [[esr]], not {}",
                esrs.len()
            ),
        ));
    }
    if raw.virtual_router_id == 0 {
        return Err(invalid("vrrp.virtual_router_id", "0 is outside 1..=255"));
    }
    let advert_interval_ms = raw.advert_interval_ms.unwrap_or(DEFAULT_ADVERT_INTERVAL_MS);
    if !(10..=40950).contains(&advert_interval_ms) || advert_interval_ms % 10 != 0 {
        return Err(invalid(
            "vrrp.advert_interval_ms",
            format!(
                "{advert_interval_ms} is not a multiple of 10 in 10..=40950 (VRRPv3 counts \
                 centiseconds)"
            ),
        ));
    }
    let virtual_address = parse_host("vrrp.virtual_address", &raw.virtual_address, "10.0.2.1/24")?;
    let mut routers = Vec::with_capacity(2);
    for (i, (e, spec)) in esrs.iter().zip(&ospf.esrs).enumerate() {
        let key = |field: &str| format!("esr[{i}].{field}");
        let Some(text) = &e.service_address else {
            return Err(invalid(
                key("service_address"),
                "the ESR pair needs each ESR's own address on the service network, like \
                 10.0.2.2/24",
            ));
        };
        let address = parse_host(&key("service_address"), text, "10.0.2.2/24")?;
        let interface = e
            .service_interface
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVICE_INTERFACE.into());
        check_interface(&key("service_interface"), &interface)?;
        let priority = e.priority.unwrap_or(DEFAULT_VRRP_PRIORITY);
        if !(1..=254).contains(&priority) {
            return Err(invalid(
                key("priority"),
                format!("{priority} is outside 1..=254 (255 is for an ESR that owns the virtual address)"),
            ));
        }
        routers.push(VrrpRouter {
            name: spec.name.clone(),
            interface,
            address,
            priority,
            cluster_interface: spec.ospf_interface.clone(),
            cluster_address: spec.router_id,
        });
    }
    // The ESRs' own addresses define the service network; the virtual address must be on it.
    let network = routers[0].address.trunc();
    let first = locator.refer("esr[0].service_address");
    if routers[1].address.trunc() != network {
        return Err(invalid(
            "esr[1].service_address",
            format!(
                "{} is not on esr[0]'s service network {network} ({first})",
                routers[1].address
            ),
        ));
    }
    if routers[1].address.addr() == routers[0].address.addr() {
        return Err(invalid(
            "esr[1].service_address",
            format!("{} is also {first}", routers[1].address.addr()),
        ));
    }
    if !network.contains(&virtual_address.addr()) {
        return Err(invalid(
            "vrrp.virtual_address",
            format!(
                "{} is not on the ESRs' service network {network} ({first})",
                virtual_address.addr()
            ),
        ));
    }
    if virtual_address.prefix_len() != network.prefix_len() {
        return Err(invalid(
            "vrrp.virtual_address",
            format!(
                "/{} is not the prefix length of the ESRs' service network {network} ({first})",
                virtual_address.prefix_len()
            ),
        ));
    }
    if let Some(i) = routers
        .iter()
        .position(|r| r.address.addr() == virtual_address.addr())
    {
        return Err(invalid(
            "vrrp.virtual_address",
            format!(
                "{} is also esr[{i}]'s own address ({})",
                virtual_address.addr(),
                locator.refer(&format!("esr[{i}].service_address"))
            ),
        ));
    }
    let service = IpNet::V4(network);
    if service.contains(&ospf.network) || ospf.network.contains(&service) {
        return Err(invalid(
            "vrrp.virtual_address",
            format!(
                "the service network {network} overlaps the cluster network {} ({})",
                ospf.network,
                locator.refer("ospf.network")
            ),
        ));
    }
    if let Some(j) = pools
        .iter()
        .position(|p| p.contains(&service) || service.contains(p))
    {
        return Err(invalid(
            "vrrp.virtual_address",
            format!(
                "the service network {network} overlaps the client pool {} ({})",
                pools[j],
                locator.refer(&format!("dn[{j}].pool"))
            ),
        ));
    }
    let cluster_virtual_address = match &raw.cluster_virtual_address {
        None => None,
        Some(text) => {
            let key = "vrrp.cluster_virtual_address";
            let address = parse_host(key, text, "10.9.0.250/24")?;
            let on_cluster = IpNet::V4(address.trunc()) == ospf.network;
            if !on_cluster {
                return Err(invalid(
                    key,
                    format!(
                        "{address} is not on the cluster network {} with its prefix length ({})",
                        ospf.network,
                        locator.refer("ospf.network")
                    ),
                ));
            }
            if let Some(i) = routers
                .iter()
                .position(|r| r.cluster_address == address.addr())
            {
                return Err(invalid(
                    key,
                    format!(
                        "{} is also esr[{i}]'s router_id ({})",
                        address.addr(),
                        locator.refer(&format!("esr[{i}].router_id"))
                    ),
                ));
            }
            Some(address)
        }
    };
    let [a, b]: [VrrpRouter; 2] = routers.try_into().map_err(|_| {
        // Unreachable: there are exactly two ESRs, each pushed once.
        invalid("vrrp", "[vrrp] makes a pair of exactly two [[esr]]")
    })?;
    Ok(Some(Vrrp {
        virtual_router_id: raw.virtual_router_id,
        virtual_address,
        cluster_virtual_address,
        advert_interval_ms,
        routers: [a, b],
    }))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::cluster::Cluster;

    fn key() -> String {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        crate::lease::encode_key(&signing.verifying_key().to_bytes())
    }

    /// Line numbers below refer to this text.
    fn text() -> String {
        [
            "[cluster]",                            // 1
            "client_ca = \"ca.pem\"",               // 2
            "client_routes = [\"10.0.2.0/24\"]",    // 3
            "[[dn]]",                               // 4
            "name = \"dn1\"",                       // 5
            "router_id = \"10.9.0.1\"",             // 6
            "endpoint = \"10.0.1.2\"",              // 7
            "pool = \"10.200.0.0/24\"",             // 8
            &format!("public_key = \"{}\"", key()), // 9
            "[ospf]",                               // 10
            "network = \"10.9.0.0/24\"",            // 11
            "[vrrp]",                               // 12
            "virtual_router_id = 51",               // 13
            "virtual_address = \"10.0.2.1/24\"",    // 14
            "[[esr]]",                              // 15
            "name = \"esr1\"",                      // 16
            "router_id = \"10.9.0.254\"",           // 17
            "service_address = \"10.0.2.2/24\"",    // 18
            "priority = 150",                       // 19
            "[[esr]]",                              // 20
            "name = \"esr2\"",                      // 21
            "router_id = \"10.9.0.253\"",           // 22
            "service_address = \"10.0.2.3/24\"",    // 23
            "service_interface = \"ens5\"",         // 24
            "",
        ]
        .join("\n")
    }

    fn err(text: &str) -> String {
        Cluster::parse(text, Path::new("/"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_pair_parses_with_defaults() {
        let c = Cluster::parse(&text(), Path::new("/")).unwrap();
        let v = c.vrrp.unwrap();
        assert_eq!(v.virtual_router_id, 51);
        assert_eq!(v.virtual_address.to_string(), "10.0.2.1/24");
        assert_eq!(v.network().to_string(), "10.0.2.0/24");
        assert_eq!(v.advert_interval_ms, 10);
        let [a, b] = &v.routers;
        assert_eq!(
            (a.name.as_str(), a.interface.as_str(), a.priority),
            ("esr1", "eth1", 150)
        );
        assert_eq!(
            (b.name.as_str(), b.interface.as_str(), b.priority),
            ("esr2", "ens5", 100)
        );
        assert_eq!(
            (a.address.to_string(), a.cluster_interface.as_str()),
            ("10.0.2.2/24".into(), "eth0")
        );
        assert_eq!(v.peer_of("esr1").map(|p| p.name.as_str()), Some("esr2"));
        assert_eq!(v.peer_of("esr2").map(|p| p.name.as_str()), Some("esr1"));
        assert_eq!(v.peer_of("dn1"), None);
        // Without [vrrp] there is no pair.
        let plain: String = text()
            .lines()
            .filter(|l| !l.starts_with("service_") && !l.starts_with("priority"))
            .filter(|l| !l.starts_with("virtual_") && *l != "[vrrp]")
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(Cluster::parse(&plain, Path::new("/"))
            .unwrap()
            .vrrp
            .is_none());
    }

    #[test]
    fn the_dns_gateway_moves_with_the_servers_gateway() {
        let with = |v: &str| {
            text().replace(
                "virtual_address = \"10.0.2.1/24\"",
                &format!("virtual_address = \"10.0.2.1/24\"\ncluster_virtual_address = \"{v}\""),
            )
        };
        let c = Cluster::parse(&with("10.9.0.250/24"), Path::new("/")).unwrap();
        let v = c.vrrp.unwrap();
        assert_eq!(
            v.cluster_virtual_address.map(|a| a.to_string()),
            Some("10.9.0.250/24".into())
        );
        assert_eq!(v.routers[1].cluster_address.to_string(), "10.9.0.253");
        assert!(err(&with("10.8.0.250/24")).contains("is not on the cluster network 10.9.0.0/24"));
        assert!(err(&with("10.9.0.254/24")).contains("is also esr[0]'s router_id"));
        assert!(Cluster::parse(&text(), Path::new("/"))
            .unwrap()
            .vrrp
            .is_some_and(|v| v.cluster_virtual_address.is_none()));
    }

    #[test]
    fn a_pair_is_exactly_two_esrs() {
        let third = "[[esr]]\nname = \"esr3\"\nrouter_id = \"10.9.0.252\"\nservice_address = \"10.0.2.4/24\"\n";
        assert_eq!(
            err(&(text() + third)),
            "cluster.toml:12: vrrp: [vrrp] makes a pair of exactly two [[esr]], not 3"
        );
        let one: String = text().lines().take(19).map(|l| format!("{l}\n")).collect();
        assert_eq!(
            err(&one),
            "cluster.toml:12: vrrp: [vrrp] makes a pair of exactly two [[esr]], not 1"
        );
    }

    #[test]
    fn the_virtual_address_is_on_the_service_network() {
        let t = text();
        assert_eq!(
            err(&t.replace("10.0.2.1/24", "10.0.3.1/24")),
            "cluster.toml:14: vrrp.virtual_address: 10.0.3.1 is not on the ESRs' service network \
             10.0.2.0/24 (esr[0].service_address, line 18)"
        );
        assert_eq!(
            err(&t.replace("10.0.2.1/24", "10.0.2.1/25")),
            "cluster.toml:14: vrrp.virtual_address: /25 is not the prefix length of the ESRs' \
             service network 10.0.2.0/24 (esr[0].service_address, line 18)"
        );
        assert_eq!(
            err(&t.replace("10.0.2.1/24", "10.0.2.3/24")),
            "cluster.toml:14: vrrp.virtual_address: 10.0.2.3 is also esr[1]'s own address \
             (esr[1].service_address, line 23)"
        );
        assert!(err(&t.replace("10.0.2.1/24", "10.0.2.0/24"))
            .starts_with("cluster.toml:14: vrrp.virtual_address: 10.0.2.0/24 is not a host"));
        assert!(err(&t.replace("\"10.0.2.1/24\"", "\"10.0.2.1\""))
            .starts_with("cluster.toml:14: vrrp.virtual_address: \"10.0.2.1\" is not an IPv4"));
        assert_eq!(
            err(&t.replace("10.0.2.3/24", "10.0.4.3/24")),
            "cluster.toml:23: esr[1].service_address: 10.0.4.3/24 is not on esr[0]'s service \
             network 10.0.2.0/24 (esr[0].service_address, line 18)"
        );
        assert_eq!(
            err(&t.replace("10.0.2.3/24", "10.0.2.2/24")),
            "cluster.toml:23: esr[1].service_address: 10.0.2.2 is also \
             esr[0].service_address, line 18"
        );
        // The servers' gateway must not be inside the routing plane or a client pool.
        let on_cluster = t
            .replace("10.0.2.", "10.9.0.")
            .replace("10.9.0.254", "10.9.0.250");
        assert!(err(&on_cluster).starts_with(
            "cluster.toml:14: vrrp.virtual_address: the service network 10.9.0.0/24 overlaps the \
             cluster network 10.9.0.0/24 (ospf.network, line 11)"
        ));
        assert_eq!(
            err(&t.replace("10.0.2.", "10.200.0.")),
            "cluster.toml:14: vrrp.virtual_address: the service network 10.200.0.0/24 overlaps \
             the client pool 10.200.0.0/24 (dn[0].pool, line 8)"
        );
    }

    #[test]
    fn missing_and_bad_keys_name_their_line() {
        let t = text();
        assert_eq!(
            err(&t.replace("service_address = \"10.0.2.3/24\"\n", "")),
            "cluster.toml:20: esr[1].service_address: the ESR pair needs each ESR's own address \
             on the service network, like 10.0.2.2/24"
        );
        assert_eq!(
            err(&t.replace("virtual_router_id = 51\n", "")),
            "cluster.toml:12: vrrp: missing field `virtual_router_id`"
        );
        assert_eq!(
            err(&t.replace("virtual_router_id = 51", "virtual_router_id = 0")),
            "cluster.toml:13: vrrp.virtual_router_id: 0 is outside 1..=255"
        );
        assert!(
            err(&t.replace("virtual_router_id = 51", "virtual_router_id = 256")).starts_with(
                "cluster.toml:13: vrrp.virtual_router_id: invalid value: integer `256`"
            )
        );
        assert!(err(&t.replace("priority = 150", "priority = 255"))
            .starts_with("cluster.toml:19: esr[0].priority: 255 is outside 1..=254"));
        assert!(err(&t.replace("priority = 150", "priority = 0"))
            .starts_with("cluster.toml:19: esr[0].priority: 0 is outside 1..=254"));
        let advert = |ms: &str| {
            t.replace(
                "virtual_router_id = 51",
                &format!("virtual_router_id = 51\nadvert_interval_ms = {ms}"),
            )
        };
        assert!(Cluster::parse(&advert("1000"), Path::new("/")).is_ok());
        for bad in ["15", "0", "40960"] {
            assert!(
                err(&advert(bad)).starts_with(&format!(
                    "cluster.toml:14: vrrp.advert_interval_ms: {bad} is not a multiple of 10 in \
                     10..=40950"
                )),
                "{bad}"
            );
        }
        assert!(err(&t.replace("\"ens5\"", "\"ens 5\""))
            .starts_with("cluster.toml:24: esr[1].service_interface: \"ens 5\" must be 1-15"));
        assert!(err(&t.replace(
            "[[esr]]\nname = \"esr1\"",
            "[[esr]]\nname = \"esr1\"\nospf_interface = \"a{b\""
        ))
        .starts_with("cluster.toml:17: esr[0].ospf_interface: \"a{b\" must be 1-15"));
    }

    #[test]
    fn service_keys_need_a_vrrp_section() {
        let t = text().replace(
            "[vrrp]\nvirtual_router_id = 51\nvirtual_address = \"10.0.2.1/24\"\n",
            "",
        );
        // [vrrp] took lines 12-14; esr[0].service_address moves from 18 to 15.
        assert_eq!(
            err(&t),
            "cluster.toml:15: esr[0].service_address: describes the ESR pair; it needs a [vrrp] \
             section"
        );
        let no_ospf = "[cluster]\nclient_ca = \"ca.pem\"\n[[dn]]\nname = \"dn1\"\nendpoint = \"10.0.1.2\"\npool = \"10.200.0.0/24\"\n"
            .to_owned()
            + &format!("public_key = \"{}\"\n", key())
            + "[vrrp]\nvirtual_router_id = 51\nvirtual_address = \"10.0.2.1/24\"\n";
        assert_eq!(
            err(&no_ospf),
            "cluster.toml:8: vrrp: the ESR pair needs [ospf] and its two [[esr]]"
        );
    }
}
