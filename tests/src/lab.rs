//! The Holdfast testbed: client namespaces, a DN, a server, real binaries and real traffic.
//!
//! ```text
//!  en1 10.0.1.10 ──veth── 10.0.1.2  ┐
//!  en2 10.0.3.10 ──veth── 10.0.3.2  ├ dn1 (pool 10.200.0.0/24) 10.0.2.1 ─┐
//!  ...                              ┘                                    ├ bridge in srv, 10.0.2.10
//!  en1 10.1.1.10 ──veth── 10.1.1.2  ─ dn2 (pool 10.201.0.0/24) 10.0.2.2 ─┘
//! ```
//! Client i reaches DN k over its own link 10.(k-1).(2i-1).0/24. The server routes each pool
//! to its DN. The clients have no route to the server network except the one the DNs push
//! through the tunnel.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::netns::{run, wait_until, Netns};

pub const SERVER: &str = "10.0.2.10";
pub const SERVER_NET: &str = "10.0.2.0/24";
pub const POOL: &str = "10.200.0.0/24";
/// With [`LabSpec::dual_stack`]: the server's IPv6 address and network.
pub const SERVER6: &str = "fd00:2::10";
pub const SERVER_NET6: &str = "fd00:2::/64";
/// Every IPv6 pool the lab hands out (fd00:200::/64 .. fd00:203::/64).
const ALL_POOLS6: &str = "fd00:200::/30";
const ESR6_ON_CLUSTER_NET: &str = "fd00:9::fe";
const ESR6_ON_SERVER_NET: &str = "fd00:2::fe";

/// DN k's IPv6 pool, with [`LabSpec::dual_stack`]: fd00:200::/64 for DN 1, fd00:201::/64 ...
pub fn dn_pool6(k: usize) -> String {
    format!("fd00:{}::/64", 199 + k)
}

/// Adds an IPv6 address to `dev` in `role`, usable at once (no duplicate address detection).
pub(crate) fn add_v6(net: &Netns, role: &str, address: &str, dev: &str) -> Result<()> {
    net.exec(
        role,
        &["ip", "-6", "addr", "add", address, "dev", dev, "nodad"],
    )?;
    Ok(())
}

/// DN k's name, which is also its namespace role and its process's name.
pub fn dn_role(k: usize) -> String {
    format!("dn{k}")
}

/// DN k's pool: 10.200.0.0/24 for DN 1, 10.201.0.0/24 for DN 2, ...; `prefix` (16 to 24)
/// makes them larger for many clients.
pub fn dn_pool(k: usize, prefix: u8) -> String {
    format!("10.{}.0.0/{prefix}", 199 + k)
}

fn dn_on_server_net(k: usize) -> String {
    format!("10.0.2.{k}")
}

/// DN k's address on the cluster network: its OSPF router id, where its peers reach it.
pub fn dn_on_cluster_net(k: usize) -> String {
    format!("10.9.0.{k}")
}

/// A veth from `ns` (named `ifname`, with `address`) into bridge `bridge` of `bridge_ns`, where
/// its other end is `port`.
fn attach_to_bridge(
    net: &Netns,
    (ns, ifname, address): (&str, &str, &str),
    (bridge_ns, bridge, port): (&str, &str, &str),
) -> Result<()> {
    // `link` addresses both ends; the bridge port then gives its address up.
    net.link((ns, ifname, address), (bridge_ns, port, "192.0.2.1/32"))?;
    net.exec(bridge_ns, &["ip", "addr", "flush", "dev", port])?;
    net.exec(bridge_ns, &["ip", "link", "set", port, "master", bridge])?;
    Ok(())
}

/// Writes one of esr-config's files (`NODE/NAME`) under `root`; returns the node, the file's
/// directory and its path.
/// Client `i` behind its access router: the router has the client's links to the DNs (the
/// DNs see the router where they saw the client), the client two uplinks to the router.
fn mobile_access(net: &mut Netns, i: usize, dns: usize, nat: bool) -> Result<()> {
    let (role, ap) = (client_role(i), access_router(i));
    net.add(&ap)?;
    net.exec(&ap, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for k in 1..=dns {
        net.link(
            (
                &ap,
                &format!("to-dn{k}"),
                &format!("{}/24", client_address_towards(i, k)),
            ),
            (
                &dn_role(k),
                &format!("to-{role}"),
                &format!("{}/24", dn_address_towards(i, k)),
            ),
        )?;
        if !nat {
            for uplink in [Uplink::Wifi, Uplink::Lte] {
                net.exec(
                    &dn_role(k),
                    &[
                        "ip",
                        "route",
                        "add",
                        &uplink.network(i),
                        "via",
                        &client_address_towards(i, k),
                    ],
                )?;
            }
        }
    }
    for uplink in [Uplink::Wifi, Uplink::Lte] {
        net.link(
            (&role, uplink.name(), &format!("{}/24", uplink.address(i))),
            (&ap, uplink.name(), &format!("{}/24", uplink.gateway(i))),
        )?;
        net.exec(
            &role,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &uplink.gateway(i),
                "metric",
                uplink.metric(),
            ],
        )?;
    }
    if nat {
        // Random ports: a flushed NAT state gives the client a new external port, as a NAT
        // rebinding does.
        let rules = "table ip holdfast_lab_nat {\n\
             chain post {\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             oifname \"to-dn*\" masquerade random\n\
             }\n\
             }\n";
        let file = net.dir.join(format!("{ap}-nat.nft"));
        std::fs::write(&file, rules)?;
        net.exec(&ap, &["nft", "-f", &file.display().to_string()])?;
    }
    Ok(())
}

fn write_node_file(
    root: &Path,
    file: &holdfast_esr_config::File,
) -> Result<(String, PathBuf, String)> {
    let path = root.join(&file.path);
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.to_path_buf());
    fs::create_dir_all(&dir)?;
    fs::write(&path, &file.text)?;
    let node = file.path.split('/').next().unwrap_or_default().to_owned();
    Ok((node, dir, path.display().to_string()))
}

/// Where the product binaries are: `HOLDFAST_BIN_DIR`, or beside this executable (tests run
/// from `target/<profile>/deps/`, so its parent too).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HOLDFAST_BIN_DIR") {
        return checked_bin_dir(PathBuf::from(dir)).context("HOLDFAST_BIN_DIR");
    }
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let candidates = exe.ancestors().skip(1).take(2);
    for dir in candidates {
        if dir.join("en").is_file() && dir.join("dn").is_file() {
            return Ok(dir.to_path_buf());
        }
    }
    bail!(
        "cannot find the en and dn binaries next to {}: run `cargo build --release --workspace` first, or set HOLDFAST_BIN_DIR",
        exe.display()
    )
}

/// `dir`, if it holds the `en` and `dn` binaries.
pub fn checked_bin_dir(dir: PathBuf) -> Result<PathBuf> {
    for bin in ["en", "dn"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} has no {bin} binary: build it with `cargo build --release --workspace`",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// A client's credential.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A certificate from the cluster's client CA, with this identity.
    Issued(String),
    /// A certificate with this identity from a CA the cluster does not know.
    Foreign(String),
}

/// What the lab is built with.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Client namespaces en1..enN.
    pub clients: usize,
    /// Identities `cluster.toml` lists as revoked.
    pub revoked: Vec<String>,
    /// Networks the DN pushes to clients.
    pub client_routes: Vec<String>,
    /// DNs dn1..dnN.
    pub dns: usize,
    /// How the server's side learns where client addresses live.
    pub routing: Routing,
    /// Each DN runs under its failure detector (`dn-fd`, process `fd-dnK`) instead of alone.
    pub supervised: bool,
    /// Extra arguments for every `dn-fd` (e.g. `--restart-base-ms 300`).
    pub fd_args: Vec<String>,
    /// Where `en`, `dn` and `dn-fd` are; `None`: [`bin_dir`].
    pub bins: Option<PathBuf>,
    /// Every DN's `--threads` (given as `HOLDFAST_DN_THREADS`, as a unit file would); `None`:
    /// the DN's default, or what the lab's own environment says.
    pub dn_threads: Option<usize>,
    /// Prefix length of every DN's pool: 24 (253 clients) down to 16 (65,533).
    pub pool_prefix: u8,
    /// `cluster.lease_lifetime_secs`; `None`: the default (a day).
    pub lease_lifetime_secs: Option<u64>,
    /// Two ESRs (`esr`, `esr2`) sharing the servers' and the DNs' gateway addresses with
    /// keepalived (VRRPv3, esr-config's configuration); needs FRR or BIRD.
    pub esr_pair: bool,
    /// How clients reach the DNs.
    pub access: Access,
    /// The clients' `liveness.keepalive_secs`; `None`: en's default.
    pub client_keepalive_secs: Option<u64>,
    /// `dns_servers` and `dns_search` of every pool: what the DNs push to clients.
    pub dns_servers: Vec<String>,
    pub dns_search: Vec<String>,
    /// Dual stack: IPv6 on the server and cluster networks, an IPv6 pool for every DN
    /// ([`dn_pool6`]), IPv6 forwarding, and OSPFv3 beside OSPFv2 (FRR's ospf6d, or BIRD's
    /// `ospf v3`). One ESR.
    pub dual_stack: bool,
}

/// How a client's namespace reaches the DNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A link of its own to each DN.
    Direct,
    /// Through an access router (`apI`) over two uplinks, `wifi` (the default route) and
    /// `lte` (a second default route, lower priority), as a laptop or a phone has; with
    /// `nat`, the router masquerades the client behind its own address with random ports
    /// (nftables), as a home router or a carrier-grade NAT does.
    Mobile { nat: bool },
}

/// A mobile client's uplink: its interface, its address and its gateway (the access router).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    Wifi,
    Lte,
}

impl Uplink {
    pub fn name(self) -> &'static str {
        match self {
            Uplink::Wifi => "wifi",
            Uplink::Lte => "lte",
        }
    }

    fn subnet(self) -> u8 {
        match self {
            Uplink::Wifi => 16,
            Uplink::Lte => 17,
        }
    }

    /// Client `i`'s address on this uplink.
    pub fn address(self, i: usize) -> String {
        format!("172.{}.{i}.10", self.subnet())
    }

    /// Client `i`'s network on this uplink.
    pub fn network(self, i: usize) -> String {
        format!("172.{}.{i}.0/24", self.subnet())
    }

    pub fn gateway(self, i: usize) -> String {
        format!("172.{}.{i}.1", self.subnet())
    }

    /// The route metric: Wi-Fi preferred, as network managers do.
    pub fn metric(self) -> &'static str {
        match self {
            Uplink::Wifi => "600",
            Uplink::Lte => "700",
        }
    }
}

/// The access router of client `i` (with [`Access::Mobile`]).
pub fn access_router(i: usize) -> String {
    format!("ap{i}")
}

/// How a DN is failed in tests and experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Failure {
    /// `kill -9` of the `dn` process.
    Kill,
    /// Every link of the DN's namespace down at once: its host is cut off.
    Host,
    /// Only the DN's link to the cluster network down: its clients still reach it, but it
    /// reaches neither the ESR nor the other DNs.
    Link,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Kill => "kill",
            Failure::Host => "host",
            Failure::Link => "link",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The server routes each DN's pool to that DN: no failover of the return path.
    Static,
    /// The thesis's testbed: DNs and an edge service router (ESR) on a cluster network, FRR
    /// (zebra + ospfd, configured by esr-config) on each; the server routes every pool to the
    /// ESR, which learns from OSPF which DN reaches which address.
    Frr,
    /// The same testbed with BIRD 2 (the thesis's own choice) instead of FRR.
    Bird,
}

impl Routing {
    pub fn name(self) -> &'static str {
        match self {
            Routing::Static => "static",
            Routing::Frr => "frr",
            Routing::Bird => "bird",
        }
    }

    /// Whether the lab has an ESR and runs a routing daemon.
    pub fn dynamic(self) -> bool {
        self != Routing::Static
    }
}

pub const CLUSTER_NET: &str = "10.9.0.0/24";
/// Where each daemon serves its metrics, on its namespace's loopback: `en` (the lab turns them
/// on), `dn` and `dn-fd` (their defaults).
pub const EN_METRICS: &str = "127.0.0.1:9437";
pub const DN_METRICS: &str = "127.0.0.1:9436";
pub const FD_METRICS: &str = "127.0.0.1:9435";
const ESR_ON_CLUSTER_NET: &str = "10.9.0.254";
const ESR_ON_SERVER_NET: &str = "10.0.2.254";
/// The second ESR of a pair, and the addresses the pair shares (VRRP).
const ESR2_ON_CLUSTER_NET: &str = "10.9.0.253";
const ESR2_ON_SERVER_NET: &str = "10.0.2.253";
pub const SERVERS_GATEWAY: &str = "10.0.2.1";
pub const DNS_GATEWAY: &str = "10.9.0.250";
/// Every pool the lab hands out (10.200.0.0/16 .. 10.203.0.0/16 at most).
const ALL_POOLS: &str = "10.200.0.0/14";
const FRR: &str = "/usr/lib/frr";

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            clients: 1,
            revoked: Vec::new(),
            client_routes: vec![SERVER_NET.to_owned()],
            dns: 1,
            routing: Routing::Static,
            supervised: false,
            fd_args: Vec::new(),
            bins: None,
            dn_threads: None,
            pool_prefix: 24,
            lease_lifetime_secs: None,
            esr_pair: false,
            access: Access::Direct,
            client_keepalive_secs: None,
            dns_servers: Vec::new(),
            dns_search: Vec::new(),
            dual_stack: false,
        }
    }
}

pub struct Lab {
    pub net: Netns,
    dns: usize,
    bins: PathBuf,
    pki: PathBuf,
    /// Identities with certificates from the cluster's client CA.
    issued: Vec<String>,
    /// DNs run under `dn-fd`.
    pub supervised: bool,
    fd_args: Vec<String>,
    dn_threads: Option<String>,
    client_keepalive_secs: Option<u64>,
}

/// The EN namespace role and its addresses for client `i` (1-based).
pub fn client_role(i: usize) -> String {
    format!("en{i}")
}

fn client_subnet(i: usize) -> u8 {
    // 10.0.1.0/24, 10.0.3.0/24, ...: 10.0.2.0/24 is the server network.
    (2 * i - 1) as u8
}

/// Client i's address on its link to DN 1.
pub fn client_underlay_address(i: usize) -> String {
    client_address_towards(i, 1)
}

/// Client i's address on its link to DN k.
pub fn client_address_towards(i: usize, k: usize) -> String {
    format!("10.{}.{}.10", k - 1, client_subnet(i))
}

/// DN 1's address on client i's link.
pub fn dn_address_for_client(i: usize) -> String {
    dn_address_towards(i, 1)
}

/// DN k's address on client i's link.
pub fn dn_address_towards(i: usize, k: usize) -> String {
    format!("10.{}.{}.2", k - 1, client_subnet(i))
}

impl Lab {
    /// Builds the namespaces and links, writes certificates and `cluster.toml`, starts the DN
    /// and waits until it answers on its status socket.
    pub fn start(spec: &LabSpec) -> Result<Self> {
        if !(16..=24).contains(&spec.pool_prefix) {
            bail!(
                "pool prefix /{} is outside the lab's /16../24",
                spec.pool_prefix
            );
        }
        let bins = match &spec.bins {
            Some(dir) => checked_bin_dir(dir.clone())?,
            None => bin_dir()?,
        };
        if spec.supervised && !bins.join("dn-fd").is_file() {
            bail!(
                "no dn-fd binary in {}: build it with `cargo build --release --workspace`",
                bins.display()
            );
        }
        let mut net = Netns::new()?;
        net.add("srv")?;
        net.exec("srv", &["ip", "link", "add", "br0", "type", "bridge"])?;
        net.exec(
            "srv",
            &["ip", "addr", "add", &format!("{SERVER}/24"), "dev", "br0"],
        )?;
        net.exec("srv", &["ip", "link", "set", "br0", "up"])?;
        if spec.esr_pair && !spec.routing.dynamic() {
            bail!("an ESR pair needs a routing daemon (FRR or BIRD)");
        }
        if spec.dual_stack && spec.esr_pair {
            bail!("the lab's dual stack runs with one ESR");
        }
        if spec.dual_stack {
            add_v6(&net, "srv", &format!("{SERVER6}/64"), "br0")?;
        }
        // Where the cluster network's bridge lives: in the ESR, or with a pair in a switch of
        // its own, so that either ESR can die without taking the network with it.
        let cluster_switch = if spec.esr_pair { "sw" } else { "esr" };
        if spec.routing.dynamic() {
            net.add("esr")?;
            if spec.esr_pair {
                net.add("sw")?;
                net.add("esr2")?;
            }
            net.exec(
                cluster_switch,
                &["ip", "link", "add", "cl0", "type", "bridge"],
            )?;
            net.exec(cluster_switch, &["ip", "link", "set", "cl0", "up"])?;
            let esrs: &[(&str, &str, &str)] = if spec.esr_pair {
                &[
                    ("esr", ESR_ON_CLUSTER_NET, ESR_ON_SERVER_NET),
                    ("esr2", ESR2_ON_CLUSTER_NET, ESR2_ON_SERVER_NET),
                ]
            } else {
                &[("esr", ESR_ON_CLUSTER_NET, ESR_ON_SERVER_NET)]
            };
            for (role, on_cluster, on_server) in esrs {
                if spec.esr_pair {
                    attach_to_bridge(
                        &net,
                        (role, "cl0", &format!("{on_cluster}/24")),
                        ("sw", "cl0", &format!("to-{role}")),
                    )?;
                } else {
                    net.exec(
                        role,
                        &[
                            "ip",
                            "addr",
                            "add",
                            &format!("{on_cluster}/24"),
                            "dev",
                            "cl0",
                        ],
                    )?;
                }
                net.exec(role, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
                attach_to_bridge(
                    &net,
                    (role, "to-srv", &format!("{on_server}/24")),
                    ("srv", "br0", &format!("to-{role}")),
                )?;
                if spec.dual_stack {
                    net.exec(role, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
                    add_v6(&net, role, &format!("{ESR6_ON_CLUSTER_NET}/64"), "cl0")?;
                    add_v6(&net, role, &format!("{ESR6_ON_SERVER_NET}/64"), "to-srv")?;
                }
            }
            if spec.dual_stack {
                net.exec(
                    "srv",
                    &[
                        "ip",
                        "-6",
                        "route",
                        "add",
                        ALL_POOLS6,
                        "via",
                        ESR6_ON_SERVER_NET,
                    ],
                )?;
            }
            let gateway = if spec.esr_pair {
                SERVERS_GATEWAY
            } else {
                ESR_ON_SERVER_NET
            };
            net.exec("srv", &["ip", "route", "add", ALL_POOLS, "via", gateway])?;
        }
        for k in 1..=spec.dns {
            let dn = dn_role(k);
            net.add(&dn)?;
            net.exec(&dn, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            if spec.dual_stack {
                net.exec(&dn, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            }
            match spec.routing {
                Routing::Static => {
                    let own = format!("{}/24", dn_on_server_net(k));
                    attach_to_bridge(
                        &net,
                        (&dn, "to-srv", &own),
                        ("srv", "br0", &format!("to-{dn}")),
                    )?;
                    net.exec(
                        "srv",
                        &[
                            "ip",
                            "route",
                            "add",
                            &dn_pool(k, spec.pool_prefix),
                            "via",
                            &dn_on_server_net(k),
                        ],
                    )?;
                    if spec.dual_stack {
                        let own6 = format!("fd00:2::{}", 100 + k);
                        add_v6(&net, &dn, &format!("{own6}/64"), "to-srv")?;
                        net.exec(
                            "srv",
                            &["ip", "-6", "route", "add", &dn_pool6(k), "via", &own6],
                        )?;
                    }
                }
                Routing::Frr | Routing::Bird => {
                    let own = format!("{}/24", dn_on_cluster_net(k));
                    attach_to_bridge(
                        &net,
                        (&dn, "to-esr", &own),
                        (cluster_switch, "cl0", &format!("to-{dn}")),
                    )?;
                    let gateway = if spec.esr_pair {
                        DNS_GATEWAY
                    } else {
                        ESR_ON_CLUSTER_NET
                    };
                    net.exec(&dn, &["ip", "route", "add", SERVER_NET, "via", gateway])?;
                    if spec.dual_stack {
                        add_v6(&net, &dn, &format!("fd00:9::{k}/64"), "to-esr")?;
                        net.exec(
                            &dn,
                            &[
                                "ip",
                                "-6",
                                "route",
                                "add",
                                SERVER_NET6,
                                "via",
                                ESR6_ON_CLUSTER_NET,
                            ],
                        )?;
                    }
                }
            }
        }
        for i in 1..=spec.clients {
            let role = client_role(i);
            net.add(&role)?;
            if let Access::Mobile { nat } = spec.access {
                mobile_access(&mut net, i, spec.dns, nat)?;
                continue;
            }
            for k in 1..=spec.dns {
                let ifname = if k == 1 {
                    "to-dn".to_owned()
                } else {
                    format!("to-dn{k}")
                };
                net.link(
                    (
                        &role,
                        &ifname,
                        &format!("{}/24", client_address_towards(i, k)),
                    ),
                    (
                        &dn_role(k),
                        &format!("to-{role}"),
                        &format!("{}/24", dn_address_towards(i, k)),
                    ),
                )?;
            }
        }
        let pki = net.dir.join("pki");
        let mut issued: Vec<String> = (1..=spec.clients).map(|i| format!("client{i}")).collect();
        issued.extend(spec.revoked.iter().cloned());
        let issued_refs: Vec<&str> = issued.iter().map(String::as_str).collect();
        let names: Vec<String> = (1..=spec.dns).map(dn_role).collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let keys = holdfast_dn::pki::generate(&pki, &name_refs, &issued_refs)?;
        let routes: Vec<String> = spec
            .client_routes
            .iter()
            .map(|r| format!("{r:?}"))
            .collect();
        let revoked: Vec<String> = spec.revoked.iter().map(|r| format!("{r:?}")).collect();
        let mut cluster = format!(
            "# Written by the Holdfast lab.\n\
             [cluster]\n\
             client_ca = \"pki/client-ca.pem\"\n\
             client_routes = [{routes}]\n\
             revoked_clients = [{revoked}]\n",
            routes = routes.join(", "),
            revoked = revoked.join(", "),
        );
        if let Some(secs) = spec.lease_lifetime_secs {
            cluster += &format!("lease_lifetime_secs = {secs}\n");
        }
        if spec.routing.dynamic() {
            cluster += &format!(
                "\n[ospf]\nnetwork = \"{CLUSTER_NET}\"\n\n[[esr]]\nname = \"esr\"\nrouter_id = \"{ESR_ON_CLUSTER_NET}\"\nospf_interface = \"cl0\"\n"
            );
            if spec.esr_pair {
                cluster += &format!(
                    "service_address = \"{ESR_ON_SERVER_NET}/24\"\nservice_interface = \"to-srv\"\npriority = 150\n\n\
                     [[esr]]\nname = \"esr2\"\nrouter_id = \"{ESR2_ON_CLUSTER_NET}\"\nospf_interface = \"cl0\"\n\
                     service_address = \"{ESR2_ON_SERVER_NET}/24\"\nservice_interface = \"to-srv\"\n\n\
                     [vrrp]\nvirtual_router_id = 51\nvirtual_address = \"{SERVERS_GATEWAY}/24\"\n\
                     cluster_virtual_address = \"{DNS_GATEWAY}/24\"\nadvert_interval_ms = 10\n"
                );
            }
        }
        for (k, (name, public_key)) in keys.iter().enumerate() {
            let k = k + 1;
            cluster += &format!(
                "\n[[dn]]\n\
                 name = \"{name}\"\n\
                 endpoint = \"{endpoint}:4433\"\n\
                 pool = \"{pool}\"\n\
                 public_key = \"{public_key}\"\n\
                 signing_key = \"pki/{name}.lease.key\"\n\
                 cert = \"pki/{name}.crt.pem\"\n\
                 key = \"pki/{name}.key.pem\"\n\
                 lease_journal = \"state/{name}.leases\"\n\
                 tun = \"holdfast0\"\n",
                endpoint = dn_address_towards(1, k),
                pool = dn_pool(k, spec.pool_prefix),
            );
            if spec.routing.dynamic() {
                cluster += &format!(
                    "router_id = \"{}\"\nospf_interface = \"to-esr\"\n",
                    dn_on_cluster_net(k)
                );
            }
            if spec.dual_stack {
                cluster += &format!("pool6 = \"{}\"\n", dn_pool6(k));
            }
            let quoted = |v: &[String]| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>();
            if !spec.dns_servers.is_empty() {
                cluster += &format!("dns_servers = [{}]\n", quoted(&spec.dns_servers).join(", "));
            }
            if !spec.dns_search.is_empty() {
                cluster += &format!("dns_search = [{}]\n", quoted(&spec.dns_search).join(", "));
            }
        }
        fs::write(net.dir.join("cluster.toml"), cluster)?;
        let mut lab = Self {
            net,
            dns: spec.dns,
            bins,
            pki,
            issued,
            supervised: spec.supervised,
            fd_args: spec.fd_args.clone(),
            dn_threads: spec.dn_threads.map(|n| n.to_string()),
            client_keepalive_secs: spec.client_keepalive_secs,
        };
        match spec.routing {
            Routing::Static => {}
            Routing::Frr => lab.start_frr()?,
            Routing::Bird => lab.start_bird()?,
        }
        if spec.esr_pair {
            lab.start_keepalived()?;
        }
        for k in 1..=spec.dns {
            lab.start_dn(k)?;
        }
        if spec.routing.dynamic() {
            // Every DN's pool must have reached the ESR, through that DN, before anything is
            // measured: its first client address is in a block the DN announces at home cost.
            let want: Vec<(IpAddr, String)> = (1..=spec.dns)
                .filter_map(|k| {
                    let first = format!("10.{}.0.2", 199 + k).parse().ok()?;
                    Some((first, dn_on_cluster_net(k)))
                })
                .collect();
            let esrs: &[&str] = if spec.esr_pair {
                &["esr", "esr2"]
            } else {
                &["esr"]
            };
            wait_until(
                Duration::from_secs(30),
                "OSPF to bring every pool to the ESRs",
                || {
                    esrs.iter().all(|esr| {
                        want.iter()
                            .all(|(a, via)| lab.next_hop_in(esr, *a).is_ok_and(|hop| hop == *via))
                    })
                },
            )
            .with_context(|| lab.net.logs())?;
            if spec.dual_stack {
                // And every IPv6 pool, by OSPFv3 over the cluster network's link-local addresses.
                wait_until(
                    Duration::from_secs(30),
                    "OSPFv3 to bring every IPv6 pool to the ESR",
                    || {
                        (1..=spec.dns).all(|k| {
                            let first = format!("fd00:{}::2", 199 + k);
                            lab.net
                                .exec("esr", &["ip", "-6", "route", "get", &first])
                                .is_ok_and(|o| {
                                    String::from_utf8_lossy(&o.stdout).contains("dev cl0")
                                })
                        })
                    },
                )
                .with_context(|| lab.net.logs())?;
            }
        }
        Ok(lab)
    }

    /// Writes esr-config's keepalived configuration for the ESR pair and starts keepalived on
    /// both (VRRP only, in the foreground); waits until one of them holds both gateways.
    fn start_keepalived(&mut self) -> Result<()> {
        let cluster = holdfast_proto::cluster::Cluster::load(&self.net.dir.join("cluster.toml"))?;
        let root = self.net.dir.join("keepalived");
        for file in holdfast_esr_config::keepalived(&cluster) {
            let (node, dir, conf) = write_node_file(&root, &file)?;
            let pid = |name: &str| dir.join(name).display().to_string();
            self.net.spawn(
                &node,
                &format!("keepalived-{node}"),
                &[
                    "keepalived",
                    "--dont-fork",
                    "--log-console",
                    "--vrrp",
                    "--use-file",
                    &conf,
                    "--pid",
                    &pid("keepalived.pid"),
                    "--vrrp_pid",
                    &pid("vrrp.pid"),
                    "--checkers_pid",
                    &pid("checkers.pid"),
                ],
                &[],
            )?;
        }
        wait_until(
            Duration::from_secs(15),
            "an ESR to hold both gateways",
            || self.esr_master().is_ok(),
        )
        .with_context(|| self.net.logs())
    }

    /// The ESR of the pair that holds the servers' and the DNs' gateway addresses (on links
    /// that are up).
    pub fn esr_master(&self) -> Result<String> {
        for role in ["esr", "esr2"] {
            if self.holds_gateways(role)? {
                return Ok(role.to_owned());
            }
        }
        bail!("no ESR holds both {SERVERS_GATEWAY} and {DNS_GATEWAY}")
    }

    /// Whether ESR `role` holds both shared gateway addresses on links that are up.
    pub fn holds_gateways(&self, role: &str) -> Result<bool> {
        let out = self
            .net
            .exec(role, &["ip", "-4", "-o", "addr", "show", "up"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let has = |a: &str| text.contains(&format!("inet {a}/"));
        Ok(has(SERVERS_GATEWAY) && has(DNS_GATEWAY))
    }

    /// Writes esr-config's BIRD configuration and starts BIRD on every DN and the ESR, in the
    /// foreground so that the lab owns (and always stops) it.
    fn start_bird(&mut self) -> Result<()> {
        let cluster = holdfast_proto::cluster::Cluster::load(&self.net.dir.join("cluster.toml"))?;
        let root = self.net.dir.join("routing");
        for file in holdfast_esr_config::bird(&cluster)? {
            let (node, dir, conf) = write_node_file(&root, &file)?;
            let sock = dir.join("bird.ctl").display().to_string();
            let pid = dir.join("bird.pid").display().to_string();
            self.net.spawn(
                &node,
                &format!("bird-{node}"),
                &["bird", "-f", "-c", &conf, "-s", &sock, "-P", &pid],
                &[],
            )?;
        }
        Ok(())
    }

    /// Writes esr-config's FRR configuration and starts zebra, bfdd and ospfd on every DN and the ESR,
    /// in the foreground so that the lab owns (and always stops) them.
    fn start_frr(&mut self) -> Result<()> {
        let cluster = holdfast_proto::cluster::Cluster::load(&self.net.dir.join("cluster.toml"))?;
        let files = holdfast_esr_config::frr(&cluster)?;
        let root = self.net.dir.join("routing");
        for file in &files {
            let path = root.join(&file.path);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::write(&path, &file.text)?;
        }
        // The daemons run as the package's frr user (root is refused: not in group frrvty).
        run(std::process::Command::new("chown")
            .args(["-R", "frr:frr"])
            .arg(&root))?;
        let nodes: Vec<String> = cluster
            .dns
            .iter()
            .map(|d| d.name.clone())
            .chain(
                cluster
                    .ospf
                    .iter()
                    .flat_map(|o| o.esrs.iter().map(|e| e.name.clone())),
            )
            .collect();
        for node in nodes {
            let dir = root.join(&node);
            let d = |f: &str| dir.join(f).display().to_string();
            let pathspace = format!("{}-{node}", self.net.id());
            // bfdd only where esr-config wrote its file ([ospf] bfd, on by default).
            let daemons = ["zebra", "bfdd", "ospfd", "ospf6d"]
                .into_iter()
                .filter(|daemon| dir.join(format!("{daemon}.conf")).exists());
            for daemon in daemons {
                let bin = format!("{FRR}/{daemon}");
                let (conf, pid) = (d(&format!("{daemon}.conf")), d(&format!("{daemon}.pid")));
                let (zsock, vty) = (d("zserv.api"), dir.display().to_string());
                let bfdctl = d("bfdd.sock");
                let mut argv = vec![
                    bin.as_str(),
                    "-N",
                    &pathspace,
                    "-f",
                    &conf,
                    "-i",
                    &pid,
                    "-z",
                    &zsock,
                    "--vty_socket",
                    &vty,
                    "--log",
                    "stdout",
                ];
                if daemon == "bfdd" {
                    // Never the default control socket, which a bfdd of the host may own.
                    argv.extend(["--bfdctl", &bfdctl]);
                }
                self.net
                    .spawn(&node, &format!("{daemon}-{node}"), &argv, &[])?;
                if daemon == "zebra" {
                    // ospfd connects to zebra's socket at start.
                    let sock = dir.join("zserv.api");
                    wait_until(Duration::from_secs(10), "zebra's socket", || sock.exists())
                        .with_context(|| self.net.logs())?;
                }
            }
        }
        Ok(())
    }

    /// The ESR's kernel routes, as `ip route show` prints them.
    pub fn esr_routes(&self) -> Result<String> {
        let out = self.net.exec("esr", &["ip", "-4", "route", "show"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn bin(&self, name: &str) -> String {
        self.bins.join(name).display().to_string()
    }

    pub fn dn_socket(&self, k: usize) -> PathBuf {
        self.net.dir.join(format!("{}.sock", dn_role(k)))
    }

    pub fn en_config(&self, i: usize) -> PathBuf {
        self.net.dir.join(format!("{}.toml", client_role(i)))
    }

    /// The process name of DN k's failure detector in a supervised lab.
    pub fn fd_role(k: usize) -> String {
        format!("fd-{}", dn_role(k))
    }

    pub fn fd_socket(&self, k: usize) -> PathBuf {
        self.net.dir.join(format!("{}.sock", Self::fd_role(k)))
    }

    /// Starts (or restarts) DN k, under its failure detector in a supervised lab, and waits for
    /// the DN's status socket.
    pub fn start_dn(&mut self, k: usize) -> Result<()> {
        let config = self.net.dir.join("cluster.toml").display().to_string();
        let socket = self.dn_socket(k).display().to_string();
        let dn = self.bin("dn");
        let name = dn_role(k);
        let mut env = vec![("RUST_LOG", "info")];
        if let Some(threads) = &self.dn_threads {
            env.push(("HOLDFAST_DN_THREADS", threads));
        }
        if self.supervised {
            let fd = self.bin("dn-fd");
            let fd_socket = self.fd_socket(k).display().to_string();
            let mut argv = vec![
                fd.as_str(),
                "--config",
                &config,
                "--node",
                &name,
                "--control",
                &fd_socket,
                "--dn",
                &dn,
                "--dn-control",
                &socket,
            ];
            argv.extend(self.fd_args.iter().map(String::as_str));
            self.net.spawn(&name, &Self::fd_role(k), &argv, &env)?;
        } else {
            self.net.spawn(
                &name,
                &name,
                &[
                    &dn,
                    "--config",
                    &config,
                    "--node",
                    &name,
                    "--control",
                    &socket,
                ],
                &env,
            )?;
        }
        wait_until(Duration::from_secs(10), "the DN's status socket", || {
            self.dn_status(k).is_ok()
        })
        .with_context(|| self.net.logs())
    }

    /// DN k's failure detector's `dn-fd status --json`.
    pub fn fd_status(&self, k: usize) -> Result<Value> {
        self.status_of("dn-fd", &self.fd_socket(k))
    }

    /// The pid of DN k's `dn` process (its detector's child in a supervised lab).
    pub fn dn_pid(&self, k: usize) -> Result<u32> {
        if self.supervised {
            let status = self.fd_status(k)?;
            let pid = status["dn"]["pid"]
                .as_u64()
                .with_context(|| format!("dn-fd of {} runs no DN now: {status}", dn_role(k)))?;
            return u32::try_from(pid).context("pid out of range");
        }
        self.net
            .pid(&dn_role(k))
            .with_context(|| format!("{} is not running", dn_role(k)))
    }

    /// Fails DN k the way `how` says: SIGKILL of its `dn` process, every link of its namespace
    /// down at once, or only its cluster link down.
    pub fn fail_dn(&mut self, k: usize, how: Failure) -> Result<()> {
        match how {
            Failure::Kill if self.supervised => {
                let pid = self.dn_pid(k)?;
                // SAFETY: a pid the lab's own detector reported for its child.
                if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
                    bail!(
                        "cannot kill dn pid {pid}: {}",
                        std::io::Error::last_os_error()
                    );
                }
                Ok(())
            }
            Failure::Kill => self.net.stop(&dn_role(k), libc::SIGKILL),
            Failure::Host => self.cut_links(&dn_role(k)),
            Failure::Link => self.cut_cluster_link(k),
        }
    }

    /// Sets every link of `role`'s namespace but loopback down, in one `ip -batch` run.
    pub fn cut_links(&self, role: &str) -> Result<()> {
        let out = self.net.exec(role, &["ip", "-o", "link", "show"])?;
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n != "lo")
            .collect();
        let batch: String = names
            .iter()
            .map(|n| format!("link set dev {n} down\n"))
            .collect();
        let path = self.net.dir.join(format!("cut-{role}.batch"));
        fs::write(&path, batch)?;
        self.net
            .exec(role, &["ip", "-batch", &path.display().to_string()])?;
        Ok(())
    }

    /// Cuts DN k off the cluster network only (its link to the ESR and the other DNs); its
    /// clients still reach it.
    pub fn cut_cluster_link(&self, k: usize) -> Result<()> {
        self.net
            .exec(&dn_role(k), &["ip", "link", "set", "dev", "to-esr", "down"])?;
        Ok(())
    }

    /// Undoes [`Lab::cut_cluster_link`] in a lab with one ESR: the link up again, and the route
    /// to the server network that the kernel dropped with it.
    pub fn restore_cluster_link(&self, k: usize) -> Result<()> {
        let dn = dn_role(k);
        self.net
            .exec(&dn, &["ip", "link", "set", "dev", "to-esr", "up"])?;
        self.net.exec(
            &dn,
            &[
                "ip",
                "route",
                "replace",
                SERVER_NET,
                "via",
                ESR_ON_CLUSTER_NET,
            ],
        )?;
        Ok(())
    }

    /// Writes client `i`'s `en.toml` with `credential` and starts its `en`.
    pub fn start_client(&mut self, i: usize, credential: &Credential) -> Result<()> {
        self.start_client_with(i, credential, |k| {
            format!("{}:4433", dn_address_towards(i, k))
        })
    }

    /// Starts DNS server dnsmasq on the server (at [`SERVER`], port 53) with `records` (name,
    /// IPv4 address) and nothing else: no upstream, no /etc/hosts. Fails if dnsmasq is not
    /// installed (see [`crate::mobile_dns::dnsmasq`]).
    pub fn start_dnsmasq(&mut self, records: &[(&str, &str)]) -> Result<()> {
        let bin = crate::mobile_dns::dnsmasq()
            .ok_or_else(|| anyhow!("dnsmasq is not installed (scripts/install-deps.sh)"))?;
        let pid = self.net.dir.join("dnsmasq.pid").display().to_string();
        let mut argv: Vec<String> = [
            bin.display().to_string(),
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={SERVER}"),
            format!("--pid-file={pid}"),
            "--log-queries".into(),
            "--log-facility=-".into(),
        ]
        .into();
        argv.extend(
            records
                .iter()
                .map(|(name, ip)| format!("--host-record={name},{ip}")),
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.net.spawn("srv", "dnsmasq", &argv, &[])?;
        let log = self.net.log_path("dnsmasq");
        wait_until(Duration::from_secs(10), "dnsmasq to start", || {
            fs::read_to_string(&log).is_ok_and(|l| l.contains("started"))
        })
        .with_context(|| self.net.logs())
    }

    /// Like [`Lab::start_client`], with DN k's endpoint in `en.toml` given by `endpoint(k)`
    /// (a host name, say).
    pub fn start_client_with(
        &mut self,
        i: usize,
        credential: &Credential,
        endpoint: impl Fn(usize) -> String,
    ) -> Result<()> {
        let (dir, identity) = match credential {
            Credential::Issued(name) => {
                if !self.issued.contains(name) {
                    holdfast_dn::pki::add_client(&self.pki, name)?;
                    self.issued.push(name.clone());
                }
                (self.pki.clone(), name.clone())
            }
            Credential::Foreign(name) => {
                let foreign = self.net.dir.join("foreign-pki");
                holdfast_dn::pki::generate(&foreign, &[], &[name])?;
                (foreign, name.clone())
            }
        };
        let role = client_role(i);
        let mut config = format!(
            "# Written by the Holdfast lab.\n\
             cert = \"{cert}\"\n\
             key = \"{key}\"\n\
             server_ca = \"{ca}\"\n\
             tun = \"holdfast0\"\n\
             control_socket = \"{socket}\"\n",
            cert = dir.join(format!("{identity}.crt.pem")).display(),
            key = dir.join(format!("{identity}.key.pem")).display(),
            ca = self.pki.join("server-ca.pem").display(),
            socket = self.net.dir.join(format!("{role}.sock")).display(),
        );
        if let Some(secs) = self.client_keepalive_secs {
            config += &format!("\n[liveness]\nkeepalive_secs = {secs}\n");
        }
        for k in 1..=self.dns {
            config += &format!(
                "\n[[dn]]\nname = \"{}\"\nendpoint = \"{}\"\n",
                dn_role(k),
                endpoint(k)
            );
        }
        let path = self.en_config(i);
        fs::write(&path, config)?;
        let en = self.bin("en");
        let path = path.display().to_string();
        // Metrics on the namespace's own loopback: harmless, and there to scrape.
        self.net.spawn(
            &role,
            &role,
            &[&en, "--config", &path, "up", "--metrics", EN_METRICS],
            &[("RUST_LOG", "info")],
        )
    }

    /// Client `i`'s `en status --json`.
    pub fn en_status(&self, i: usize) -> Result<Value> {
        let path = self.en_config(i).display().to_string();
        let out = run(std::process::Command::new(self.bin("en"))
            .args(["--config", &path, "status", "--json"]))?;
        serde_json::from_slice(&out.stdout).context("en status printed no JSON")
    }

    /// DN k's `dn status --json`.
    pub fn dn_status(&self, k: usize) -> Result<Value> {
        self.status_of("dn", &self.dn_socket(k))
    }

    /// `<bin> status --control <socket> --json`, parsed.
    fn status_of(&self, bin: &str, socket: &Path) -> Result<Value> {
        let socket = socket.display().to_string();
        let out = run(std::process::Command::new(self.bin(bin)).args([
            "status",
            "--control",
            &socket,
            "--json",
        ]))?;
        serde_json::from_slice(&out.stdout).with_context(|| format!("{bin} status printed no JSON"))
    }

    /// Waits until client `i` has a lease and returns its address.
    pub fn wait_address(&self, i: usize, timeout: Duration) -> Result<IpAddr> {
        let mut address = None;
        wait_until(timeout, &format!("client {i} to get an address"), || {
            address = self.en_status(i).ok().and_then(|s| {
                let up = s["sessions"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x["state"] == "up"));
                s["address"]
                    .as_str()
                    .filter(|_| up)
                    .and_then(|a| a.parse().ok())
            });
            address.is_some()
        })
        .with_context(|| self.net.logs())?;
        address.ok_or_else(|| anyhow!("no address"))
    }

    /// Waits until client `i` has a primary and a secondary session up; returns their DN
    /// numbers (1-based).
    pub fn primary_and_secondary(&self, i: usize, timeout: Duration) -> Result<(usize, usize)> {
        let mut found = None;
        wait_until(timeout, "a primary and a secondary session", || {
            found = self
                .en_status(i)
                .ok()
                .and_then(|s| Some((role_of(&s, "primary")?, role_of(&s, "secondary")?)));
            found.is_some()
        })
        .with_context(|| self.net.logs())?;
        found.ok_or_else(|| anyhow!("no sessions"))
    }

    /// The ESR's next hop towards `address`.
    pub fn esr_next_hop(&self, address: IpAddr) -> Result<String> {
        self.next_hop_in("esr", address)
    }

    /// `role`'s next hop towards `address`.
    fn next_hop_in(&self, role: &str, address: IpAddr) -> Result<String> {
        let out = self
            .net
            .exec(role, &["ip", "-4", "route", "get", &address.to_string()])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .skip_while(|w| *w != "via")
            .nth(1)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{role} has no route to {address}: {text:?}"))
    }

    /// Pings `target` from `role`; returns (sent, received).
    pub fn ping(&self, role: &str, target: &str, count: u32, extra: &[&str]) -> Result<(u32, u32)> {
        let count_s = count.to_string();
        let mut argv = vec!["ping", "-n", "-q", "-c", &count_s, "-i", "0.05", "-W", "1"];
        argv.extend_from_slice(extra);
        argv.push(target);
        let out = self.net.try_exec(role, &argv)?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() && !text.contains("packets transmitted") {
            // No route at all ("Network is unreachable"): nothing could be sent or received.
            return Ok((count, 0));
        }
        parse_ping(&text)
    }

    /// `dn drain` (`on`) or `dn undrain` of DN k, through its control socket.
    pub fn drain(&self, k: usize, on: bool) -> Result<()> {
        let socket = self.dn_socket(k).display().to_string();
        let verb = if on { "drain" } else { "undrain" };
        let dn = self.bin("dn");
        let out = self
            .net
            .try_exec(&dn_role(k), &[&dn, "--control", &socket, verb])?;
        if !out.status.success() {
            bail!(
                "dn {verb} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The DN (1-based) client `i` sends through now.
    pub fn primary_of(&self, i: usize) -> Option<usize> {
        role_of(&self.en_status(i).ok()?, "primary")
    }

    /// What the daemon serving metrics at `addr` in `role`'s namespace says, in Prometheus'
    /// text format.
    pub fn scrape(&self, role: &str, addr: &str) -> Result<String> {
        let out = self
            .net
            .exec(role, &["curl", "-sf", &format!("http://{addr}/metrics")])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn pki_dir(&self) -> &Path {
        &self.pki
    }
}

/// The DN (1-based) whose session has `role` and is up, in a client's `en status --json`.
pub fn role_of(status: &Value, role: &str) -> Option<usize> {
    // By the DN's name (dnK): the list's order changes when a reload retires a DN.
    status["sessions"]
        .as_array()?
        .iter()
        .find(|s| s["state"] == "up" && s["role"] == role)?["dn"]
        .as_str()?
        .strip_prefix("dn")?
        .parse()
        .ok()
}

/// Labs are heavy; even if the test harness runs tests in parallel, build one at a time.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held while a test's labs run, so that the tests of one binary take turns (cargo runs them on
/// threads at once); [`with_lab`] takes it, a test that starts labs itself takes it too.
pub fn one_lab() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `body` in a fresh lab built from `spec`, for a test: skipped (with a message) without
/// root; on failure, panics with the error and every daemon's log. The lab is torn down either
/// way.
pub fn with_lab(spec: LabSpec, body: impl FnOnce(&mut Lab) -> Result<()>) {
    if !crate::netns::have_root() {
        return;
    }
    let _one = one_lab();
    let mut lab = match Lab::start(&spec) {
        Ok(lab) => lab,
        Err(e) => panic!("the lab did not start: {e:#}"),
    };
    if let Err(e) = body(&mut lab) {
        panic!("{e:#}\n\n{}", lab.net.logs());
    }
}

/// Reads "N packets transmitted, M received" from ping's summary.
pub fn parse_ping(text: &str) -> Result<(u32, u32)> {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| anyhow!("ping printed no summary: {text}"))?;
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    match nums.as_slice() {
        [sent, received, ..] => Ok((*sent, *received)),
        _ => bail!("cannot read ping summary {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summaries_are_read() {
        let text = "--- 10.0.2.10 ping statistics ---\n5 packets transmitted, 3 received, 40% packet loss, time 204ms\n";
        assert_eq!(parse_ping(text).unwrap(), (5, 3));
        assert!(parse_ping("nothing").is_err());
    }

    #[test]
    fn client_subnets_skip_the_server_network() {
        assert_eq!(client_underlay_address(1), "10.0.1.10");
        assert_eq!(dn_address_for_client(2), "10.0.3.2");
    }
}
