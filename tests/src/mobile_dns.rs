//! The DNS case: the cluster pushes a DNS server and a search domain with the lease, and the
//! client applies them while its tunnel is up and puts its resolver back when it stops.
//!
//! Real parts throughout: dnsmasq on the server answers for `web.corp.example`; the client's
//! namespace has its own `/etc/netns/<ns>/resolv.conf` (which `ip netns exec` bind-mounts over
//! `/etc/resolv.conf`, so en writes it in place); the C library's resolver (`getent hosts`) looks
//! the short name up through the tunnel, the only way from the client to the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::lab::{client_role, Credential, Lab, LabSpec, SERVER};
use crate::netns::wait_until;

/// The search domain the lab's cluster pushes, and the name dnsmasq answers for in it.
pub const SEARCH: &str = "corp.example";
pub const SHORT_NAME: &str = "web";
/// What the client's resolv.conf says before en starts (and must say again after it stops).
pub const ORIGINAL: &str =
    "# the client's own resolver\nnameserver 192.0.2.53\nsearch home.example\noptions ndots:1\n";

/// dnsmasq's path, if it is installed (Debian's dnsmasq-base puts it in /usr/sbin).
pub fn dnsmasq() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("dnsmasq"))
        .find(|p| p.is_file())
}

/// The lab the case needs: one client, one DN, its pool pushing the server as DNS server.
pub fn spec() -> LabSpec {
    LabSpec {
        dns_servers: vec![SERVER.to_owned()],
        dns_search: vec![SEARCH.to_owned()],
        ..LabSpec::default()
    }
}

/// What the case saw.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// resolv.conf named the pushed server and search domain while en ran.
    pub pushed_seen: bool,
    /// `en status --json` reported the pushed server as applied.
    pub status_seen: bool,
    /// What the short name resolved to through the tunnel.
    pub resolved: Option<String>,
    /// resolv.conf was as before once en stopped (SIGTERM).
    pub restored: bool,
}

impl Outcome {
    pub fn held(&self) -> bool {
        self.pushed_seen
            && self.status_seen
            && self.resolved.as_deref() == Some(SERVER)
            && self.restored
    }

    /// One line for a report.
    pub fn detail(&self) -> String {
        format!(
            "pushed {SERVER} (search {SEARCH}) {} in resolv.conf{}; {SHORT_NAME} {}; resolv.conf {} after SIGTERM",
            if self.pushed_seen { "seen" } else { "NOT seen" },
            if self.status_seen { " and en status" } else { ", NOT in en status" },
            match &self.resolved {
                Some(a) => format!("resolved to {a} through the tunnel"),
                None => "did NOT resolve".into(),
            },
            if self.restored { "restored" } else { "NOT restored" },
        )
    }
}

/// Runs the case in `lab` (built from [`spec`], no client started): dnsmasq on the server, the
/// client's own resolv.conf, en up, checks, en stopped with SIGTERM, the file checked again.
pub fn run(lab: &mut Lab) -> Result<Outcome> {
    let role = client_role(1);
    lab.start_dnsmasq(&[(&format!("{SHORT_NAME}.{SEARCH}"), SERVER)])?;
    let file = lab.net.etc_file(&role, "resolv.conf", ORIGINAL)?;
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    lab.wait_address(1, Duration::from_secs(15))?;
    let mut out = Outcome::default();
    let pushed = |text: &str| {
        text.lines().any(|l| l == format!("nameserver {SERVER}"))
            && text.lines().any(|l| l == format!("search {SEARCH}"))
            && !text.contains("192.0.2.53")
    };
    out.pushed_seen = wait_until(
        Duration::from_secs(10),
        "the pushed DNS in resolv.conf",
        || std::fs::read_to_string(&file).is_ok_and(|t| pushed(&t)),
    )
    .is_ok();
    let status = lab.en_status(1)?;
    out.status_seen = status["dns"]["servers"]
        .as_array()
        .is_some_and(|s| s.iter().any(|x| x == SERVER))
        && status["dns"]["via"] == "resolv.conf";
    out.resolved = resolve(lab, &role, SHORT_NAME)?;
    lab.net.stop(&role, libc::SIGTERM)?;
    out.restored = read(&file)? == ORIGINAL;
    Ok(out)
}

/// What `getent hosts NAME` (the C library's resolver, as any program uses it) says in `role`.
pub fn resolve(lab: &Lab, role: &str, name: &str) -> Result<Option<String>> {
    let out = lab.net.try_exec(role, &["getent", "hosts", name])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The DNS case on a fresh lab of its own, for `lab mobile`: whether it held, and one line of
/// detail (pushed servers seen, the name resolved, the file restored). An error means the case
/// could not run at all: not root, or no dnsmasq (the message then starts with "skipped:").
pub fn dns_case() -> Result<(bool, String)> {
    if dnsmasq().is_none() {
        return Err(anyhow!(
            "skipped: the DNS case needs dnsmasq (scripts/install-deps.sh installs dnsmasq-base)"
        ));
    }
    if !crate::netns::have_root() {
        return Err(anyhow!(
            "skipped: the lab needs root (network namespaces, TUN)"
        ));
    }
    let mut lab = Lab::start(&spec())?;
    let outcome = run(&mut lab).with_context(|| lab.net.logs())?;
    Ok((outcome.held(), outcome.detail()))
}
