//! The Holdfast testbed: client namespaces, a DN, a server, real binaries and real traffic.
//!
//! ```text
//!  en1 10.0.1.10 ──veth── 10.0.1.2  ┐
//!  en2 10.0.3.10 ──veth── 10.0.3.2  ├ dn (ip_forward; TUN holdfast0 10.200.0.1/24)
//!  ...                              ┘ 10.0.2.1 ──veth── 10.0.2.10 srv (route 10.200.0.0/24 via dn)
//! ```
//! The clients have no route to the server network except the one the DN pushes through the
//! tunnel.

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
pub const DN: &str = "dn1";
const DN_ON_SERVER_NET: &str = "10.0.2.1";

/// Where the product binaries are: `HOLDFAST_BIN_DIR`, or beside this executable (tests run
/// from `target/<profile>/deps/`, so its parent too).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HOLDFAST_BIN_DIR") {
        return Ok(PathBuf::from(dir));
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
}

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            clients: 1,
            revoked: Vec::new(),
            client_routes: vec![SERVER_NET.to_owned()],
        }
    }
}

pub struct Lab {
    pub net: Netns,
    bins: PathBuf,
    pki: PathBuf,
    /// Identities with certificates from the cluster's client CA.
    issued: Vec<String>,
}

/// The EN namespace role and its addresses for client `i` (1-based).
pub fn client_role(i: usize) -> String {
    format!("en{i}")
}

fn client_subnet(i: usize) -> u8 {
    // 10.0.1.0/24, 10.0.3.0/24, ...: 10.0.2.0/24 is the server network.
    (2 * i - 1) as u8
}

pub fn client_underlay_address(i: usize) -> String {
    format!("10.0.{}.10", client_subnet(i))
}

pub fn dn_address_for_client(i: usize) -> String {
    format!("10.0.{}.2", client_subnet(i))
}

impl Lab {
    /// Builds the namespaces and links, writes certificates and `cluster.toml`, starts the DN
    /// and waits until it answers on its status socket.
    pub fn start(spec: &LabSpec) -> Result<Self> {
        let bins = bin_dir()?;
        let mut net = Netns::new()?;
        net.add("dn")?;
        net.add("srv")?;
        net.link(
            ("dn", "to-srv", &format!("{DN_ON_SERVER_NET}/24")),
            ("srv", "to-dn", &format!("{SERVER}/24")),
        )?;
        net.exec(
            "srv",
            &["ip", "route", "add", POOL, "via", DN_ON_SERVER_NET],
        )?;
        net.exec("dn", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for i in 1..=spec.clients {
            let role = client_role(i);
            net.add(&role)?;
            net.link(
                (
                    &role,
                    "to-dn",
                    &format!("{}/24", client_underlay_address(i)),
                ),
                (
                    "dn",
                    &format!("to-{role}"),
                    &format!("{}/24", dn_address_for_client(i)),
                ),
            )?;
        }
        let pki = net.dir.join("pki");
        let mut issued: Vec<String> = (1..=spec.clients).map(|i| format!("client{i}")).collect();
        issued.extend(spec.revoked.iter().cloned());
        let issued_refs: Vec<&str> = issued.iter().map(String::as_str).collect();
        let keys = holdfast_dn::pki::generate(&pki, &[DN], &issued_refs)?;
        let public_key = &keys
            .first()
            .ok_or_else(|| anyhow!("no DN key generated"))?
            .1;
        let routes: Vec<String> = spec
            .client_routes
            .iter()
            .map(|r| format!("{r:?}"))
            .collect();
        let revoked: Vec<String> = spec.revoked.iter().map(|r| format!("{r:?}")).collect();
        let cluster = format!(
            "# Written by the Holdfast lab.\n\
             [cluster]\n\
             client_ca = \"pki/client-ca.pem\"\n\
             client_routes = [{routes}]\n\
             revoked_clients = [{revoked}]\n\n\
             [[dn]]\n\
             name = \"{DN}\"\n\
             endpoint = \"{endpoint}:4433\"\n\
             pool = \"{POOL}\"\n\
             public_key = \"{public_key}\"\n\
             signing_key = \"pki/{DN}.lease.key\"\n\
             cert = \"pki/{DN}.crt.pem\"\n\
             key = \"pki/{DN}.key.pem\"\n\
             tun = \"holdfast0\"\n",
            routes = routes.join(", "),
            revoked = revoked.join(", "),
            endpoint = dn_address_for_client(1),
        );
        fs::write(net.dir.join("cluster.toml"), cluster)?;
        let mut lab = Self {
            net,
            bins,
            pki,
            issued,
        };
        lab.start_dn()?;
        Ok(lab)
    }

    pub fn bin(&self, name: &str) -> String {
        self.bins.join(name).display().to_string()
    }

    pub fn dn_socket(&self) -> PathBuf {
        self.net.dir.join("dn.sock")
    }

    pub fn en_config(&self, i: usize) -> PathBuf {
        self.net.dir.join(format!("{}.toml", client_role(i)))
    }

    /// Starts (or restarts) the DN process and waits for its status socket.
    pub fn start_dn(&mut self) -> Result<()> {
        let config = self.net.dir.join("cluster.toml").display().to_string();
        let socket = self.dn_socket().display().to_string();
        let dn = self.bin("dn");
        self.net.spawn(
            "dn",
            "dn",
            &[&dn, "--config", &config, "--node", DN, "--control", &socket],
            &[("RUST_LOG", "info")],
        )?;
        wait_until(Duration::from_secs(10), "the DN's status socket", || {
            self.dn_status().is_ok()
        })
        .with_context(|| self.net.logs())
    }

    /// Writes client `i`'s `en.toml` with `credential` and starts its `en`.
    pub fn start_client(&mut self, i: usize, credential: &Credential) -> Result<()> {
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
        let config = format!(
            "# Written by the Holdfast lab.\n\
             cert = \"{cert}\"\n\
             key = \"{key}\"\n\
             server_ca = \"{ca}\"\n\
             tun = \"holdfast0\"\n\
             control_socket = \"{socket}\"\n\n\
             [[dn]]\n\
             name = \"{DN}\"\n\
             endpoint = \"{endpoint}:4433\"\n",
            cert = dir.join(format!("{identity}.crt.pem")).display(),
            key = dir.join(format!("{identity}.key.pem")).display(),
            ca = self.pki.join("server-ca.pem").display(),
            socket = self.net.dir.join(format!("{role}.sock")).display(),
            endpoint = dn_address_for_client(i),
        );
        let path = self.en_config(i);
        fs::write(&path, config)?;
        let en = self.bin("en");
        let path = path.display().to_string();
        self.net.spawn(
            &role,
            &role,
            &[&en, "--config", &path, "up"],
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

    /// The DN's `dn status --json`.
    pub fn dn_status(&self) -> Result<Value> {
        let socket = self.dn_socket().display().to_string();
        let out = run(std::process::Command::new(self.bin("dn")).args([
            "status",
            "--control",
            &socket,
            "--json",
        ]))?;
        serde_json::from_slice(&out.stdout).context("dn status printed no JSON")
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

    pub fn pki_dir(&self) -> &Path {
        &self.pki
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
