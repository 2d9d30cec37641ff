//! The dual-stack case: a client gets an IPv4 and an IPv6 address in one lease, reaches the
//! server over both families through the tunnel, keeps both when its primary DN is killed, and
//! in a full IPv4 tunnel without an IPv6 pool sends no IPv6 outside the tunnel.
//!
//! Real parts throughout: two DNs under their detectors with IPv6 pools, FRR's ospfd and
//! ospf6d (configured by esr-config) on the DNs and the ESR, the kernel's ping and routes.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};

use crate::lab::{
    client_role, dn_role, Credential, Failure, Lab, LabSpec, Routing, SERVER, SERVER6, SERVER_NET,
    SERVER_NET6,
};
use crate::traffic::Pinger;

/// Lost pings (at 100/s) per family that a failover may cost for the case to hold: a second.
pub const MAX_LOST: u32 = 100;

/// The dual-stack lab: two supervised DNs with IPv6 pools, FRR with OSPFv3, both server
/// networks pushed to the client.
pub fn spec() -> LabSpec {
    spec_with(Routing::Frr)
}

/// [`spec`] with another routing daemon (BIRD's `ospf v3` beside its `ospf v2`).
pub fn spec_with(routing: Routing) -> LabSpec {
    LabSpec {
        dns: 2,
        routing,
        supervised: true,
        dual_stack: true,
        client_routes: vec![SERVER_NET.to_owned(), SERVER_NET6.to_owned()],
        ..LabSpec::default()
    }
}

/// The leak lab: one DN, an IPv4 pool only, a full IPv4 tunnel.
pub fn leak_spec() -> LabSpec {
    LabSpec {
        client_routes: vec!["0.0.0.0/0".to_owned()],
        ..LabSpec::default()
    }
}

/// What the case saw.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub address: Option<String>,
    pub address6: Option<String>,
    /// (sent, answered) of a short ping of each family before the failure.
    pub ping4: (u32, u32),
    pub ping6: (u32, u32),
    /// (sent, answered) of the 100/s pings across the kill of the primary.
    pub failover4: (u32, u32),
    pub failover6: (u32, u32),
    /// The primary that was killed.
    pub killed: Option<usize>,
    /// `dn status` of the primary listed the client once, with both addresses.
    pub dn_shows_both: bool,
}

impl Outcome {
    fn lost(p: (u32, u32)) -> u32 {
        p.0.saturating_sub(p.1)
    }

    pub fn held(&self) -> bool {
        self.held_within(MAX_LOST)
    }

    /// Whether it held with at most `max_lost` pings lost per family on failover.
    pub fn held_within(&self, max_lost: u32) -> bool {
        let answered_all = |p: (u32, u32)| p.0 > 0 && p.0 == p.1;
        let survived = |p: (u32, u32)| p.1 > 0 && Self::lost(p) <= max_lost;
        self.address.is_some()
            && self.address6.is_some()
            && self.dn_shows_both
            && answered_all(self.ping4)
            && answered_all(self.ping6)
            && survived(self.failover4)
            && survived(self.failover6)
    }

    /// One line for a report.
    pub fn detail(&self) -> String {
        format!(
            "addresses {} and {}{}; ping {}/{}, ping -6 {}/{}; dn{} killed at 100/s: IPv4 lost {} of {}, IPv6 lost {} of {}",
            self.address.as_deref().unwrap_or("NONE"),
            self.address6.as_deref().unwrap_or("NONE"),
            if self.dn_shows_both { "" } else { " (NOT both in dn status)" },
            self.ping4.1,
            self.ping4.0,
            self.ping6.1,
            self.ping6.0,
            self.killed.map_or("?".into(), |k| k.to_string()),
            Self::lost(self.failover4),
            self.failover4.0,
            Self::lost(self.failover6),
            self.failover6.0,
        )
    }
}

/// Runs the dual-stack part in `lab` (built from [`spec`], no client started).
pub fn run(lab: &mut Lab) -> Result<Outcome> {
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    let mut out = Outcome {
        address: Some(lab.wait_address(1, Duration::from_secs(15))?.to_string()),
        ..Outcome::default()
    };
    let status = lab.en_status(1)?;
    out.address6 = status["address6"].as_str().map(str::to_owned);
    ensure!(
        out.address6.is_some(),
        "no IPv6 address in en status: {status}"
    );
    let (primary, _) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
    let listed: Vec<serde_json::Value> = lab.dn_status(primary)?["clients"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    out.dn_shows_both = listed.len() == 1
        && listed[0]["address"].as_str() == out.address.as_deref()
        && listed[0]["address6"].as_str() == out.address6.as_deref();
    out.ping4 = lab.ping("en1", SERVER, 5, &[])?;
    out.ping6 = lab.ping("en1", SERVER6, 5, &["-6"])?;
    let ping4 = Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
    let ping6 = Pinger::start(&lab.net, "en1", SERVER6, "0.01")?;
    std::thread::sleep(Duration::from_secs(1));
    lab.fail_dn(primary, Failure::Kill)?;
    out.killed = Some(primary);
    std::thread::sleep(Duration::from_secs(4));
    out.failover4 = ping4.stop()?;
    out.failover6 = ping6.stop()?;
    Ok(out)
}

/// What the leak check saw: in a full IPv4 tunnel with no IPv6 address, IPv6 to the server
/// had a way out before en started, none while it ran, and had it back after en stopped.
#[derive(Debug, Clone, Default)]
pub struct Leak {
    pub before: String,
    pub during: String,
    /// What `ping -6` said while en ran.
    pub ping: String,
    pub after: String,
}

impl Leak {
    pub fn held(&self) -> bool {
        // The kernel answers an unreachable IPv6 route with EHOSTUNREACH: "No route to host".
        let refused = |t: &str| t.contains("unreachable") || t.contains("No route to host");
        self.before.contains("via")
            && !self.during.contains("via")
            && refused(&self.during)
            && refused(&self.ping)
            && self.after.contains("via")
    }

    pub fn detail(&self) -> String {
        if !self.held() {
            return format!(
                "full IPv4 tunnel without pool6: IPv6 to {SERVER6} NOT as expected: before {:?}, during {:?} (ping {:?}), after {:?}",
                self.before, self.during, self.ping, self.after
            );
        }
        format!(
            "full IPv4 tunnel without pool6: IPv6 to {SERVER6} unreachable while en ran ({}), routed again after its exit",
            self.ping.trim(),
        )
    }
}

/// `ip -6 route get SERVER6` in `role`: the route, or the error the kernel gave.
fn route6(lab: &Lab, role: &str) -> Result<String> {
    let out = lab
        .net
        .try_exec(role, &["ip", "-6", "route", "get", SERVER6])?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Runs the leak check in `lab` (built from [`leak_spec`], no client started): the client gets
/// an IPv6 address and default route on its link to the DN (as an ISP would give it), then en.
pub fn run_leak(lab: &mut Lab) -> Result<Leak> {
    let role = client_role(1);
    let dn = dn_role(1);
    for (ns, address, dev) in [
        (role.as_str(), "fd00:1::10/64", "to-dn"),
        (dn.as_str(), "fd00:1::2/64", "to-en1"),
    ] {
        crate::lab::add_v6(&lab.net, ns, address, dev)?;
    }
    lab.net.exec(
        &role,
        &["ip", "-6", "route", "add", "default", "via", "fd00:1::2"],
    )?;
    let mut leak = Leak {
        before: route6(lab, &role)?,
        ..Leak::default()
    };
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    lab.wait_address(1, Duration::from_secs(15))?;
    leak.during = route6(lab, &role)?;
    let out = lab
        .net
        .try_exec(&role, &["ping", "-6", "-n", "-c", "1", "-W", "1", SERVER6])?;
    leak.ping = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .lines()
    .find(|l| !l.trim().is_empty() && !l.starts_with("PING"))
    .unwrap_or_default()
    .to_owned();
    lab.net.stop(&role, libc::SIGTERM)?;
    leak.after = route6(lab, &role)?;
    Ok(leak)
}

/// The dual-stack case on fresh labs of its own, for `lab mobile`: whether it held, and one line
/// of detail (both addresses, pings of each family, pings lost per family when the primary DN
/// is killed, the full tunnel's IPv6 blocked). An error means the case could not run at all
/// (the message then starts with "skipped:").
pub fn dual_stack_case() -> Result<(bool, String)> {
    if !crate::netns::have_root() {
        return Err(anyhow!(
            "skipped: the lab needs root (network namespaces, TUN)"
        ));
    }
    let outcome = {
        let mut lab = Lab::start(&spec())?;
        run(&mut lab).with_context(|| lab.net.logs())?
    };
    let leak = {
        let mut lab = Lab::start(&leak_spec())?;
        run_leak(&mut lab).with_context(|| lab.net.logs())?
    };
    Ok((
        outcome.held() && leak.held(),
        format!("{}; {}", outcome.detail(), leak.detail()),
    ))
}
