//! `lab attack`: what a hostile host, or a client with a valid certificate, can do to a DN,
//! each case against the real binaries.
//!
//! Every case gets a fresh lab: two DNs under their failure detectors, FRR and an ESR, a real
//! client (`en1`) pinging the server at 100/s throughout, and an attacker (`hf-attack`) in a
//! second client namespace. A case holds when its own check holds and the DNs stayed up and
//! unkilled, every DN's routes match the sessions it has, and the real client lost no ping.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::bench::{cpu_seconds, rss_kib};
use crate::cases::{self, CaseReport, CaseResult};
use crate::lab::{
    client_address_towards, dn_address_towards, dn_on_cluster_net, dn_role, Credential, Lab,
    LabSpec, Routing, SERVER,
};
use crate::netns::wait_until;
use crate::traffic::Pinger;

/// Every case, in the order they run.
pub const CASES: &[&str] = &[
    "initial_flood",
    "conn_flood",
    "non_reading_client",
    "reattach_route_leak",
    "block_pull",
    "restart_address_reuse",
    "expired_lease_reuse",
    "home_is_back_replay",
    "log_injection",
    "foreign_ticket",
];

/// The attacker's namespace: client 2's, with a link to every DN.
const ATTACKER: usize = 2;
/// How soon a client arriving right behind a handshake flood must have its lease.
const NEWCOMER_WITHIN_SECS: f64 = 2.0;
/// Lease lifetime in the lab of `expired_lease_reuse`: short enough to expire during the case.
const SHORT_LEASE_SECS: u64 = 8;

/// Runs the named cases (all if `only` is empty).
pub fn run(only: &[String], quiet: bool) -> Result<CaseReport> {
    cases::run("lab attack", CASES, only, quiet, run_case)
}

/// The lab of one case, with the real client pinging through it.
struct Arena {
    lab: Lab,
    /// The real client's primary and secondary DN (1-based).
    primary: usize,
    secondary: usize,
    ping: Pinger,
    /// Each DN's pid when the attack began.
    pids: Vec<u32>,
}

impl Arena {
    fn new(lease_lifetime_secs: Option<u64>) -> Result<Self> {
        let mut lab = Lab::start(&LabSpec {
            clients: 2,
            dns: 2,
            routing: Routing::Frr,
            supervised: true,
            lease_lifetime_secs,
            ..LabSpec::default()
        })?;
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, Duration::from_secs(15))?;
        let (primary, secondary) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let ping = Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
        let pids = (1..=2).map(|k| lab.dn_pid(k)).collect::<Result<_>>()?;
        Ok(Self {
            lab,
            primary,
            secondary,
            ping,
            pids,
        })
    }

    /// `hf-attack ARGS` in the attacker's namespace; its JSON answer.
    fn attack(&self, args: &[&str]) -> Result<Value> {
        let bin = self.lab.bin("hf-attack");
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        let out = self.lab.net.try_exec(&format!("en{ATTACKER}"), &argv)?;
        if !out.status.success() {
            bail!(
                "hf-attack {} failed: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("hf-attack printed no JSON")
    }

    /// `--pki P --dn NAME=ADDR:4433 --cn CN` for the attacker towards DN k.
    fn client_args(&self, k: usize, cn: &str) -> Vec<String> {
        vec![
            "--pki".into(),
            self.lab.pki_dir().display().to_string(),
            "--dn".into(),
            format!("{}={}:4433", dn_role(k), dn_address_towards(ATTACKER, k)),
            "--cn".into(),
            cn.into(),
        ]
    }

    fn attack_as(&self, sub: &str, k: usize, cn: &str, extra: &[&str]) -> Result<Value> {
        let mut args: Vec<String> = vec![sub.into()];
        args.extend(self.client_args(k, cn));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        self.attack(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A fresh lease for `cn` from DN k: (address, ticket in hex).
    fn lease(&self, k: usize, cn: &str) -> Result<(IpAddr, String)> {
        let got = self.attack_as("lease", k, cn, &[])?;
        if got["answer"] != "leased" {
            bail!("{} gave {cn} no lease: {got}", dn_role(k));
        }
        let address = got["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("no address in {got}"))?;
        let ticket = got["ticket_hex"].as_str().unwrap_or_default().to_owned();
        Ok((address, ticket))
    }

    /// Ends the case: the checks every case shares, then the lab goes.
    fn finish(self, restarted: &[usize]) -> Result<Vec<String>> {
        // Let the last effects land (routes withdrawn, sessions closed).
        std::thread::sleep(Duration::from_secs(1));
        let mut broken = Vec::new();
        for k in 1..=2 {
            match self.lab.dn_pid(k) {
                Ok(pid) if pid == self.pids[k - 1] || restarted.contains(&k) => {}
                Ok(pid) => broken.push(format!(
                    "{} was restarted (pid {} -> {pid})",
                    dn_role(k),
                    self.pids[k - 1]
                )),
                Err(e) => broken.push(format!("{} is not running: {e:#}", dn_role(k))),
            }
            if let Ok(status) = self.lab.dn_status(k) {
                broken.extend(route_mismatches(k, &status));
            }
        }
        let (sent, answered) = self.ping.stop()?;
        let lost = sent.saturating_sub(answered);
        if lost > 0 {
            broken.push(format!("the real client lost {lost} of {sent} pings"));
        }
        Ok(broken)
    }
}

/// Routes DN k keeps that no session of its justifies.
fn route_mismatches(k: usize, status: &Value) -> Vec<String> {
    let primaries: Vec<String> = status["clients"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| c["primary"] == true)
                .filter_map(|c| c["address"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let peers_down = status["peers_down"]
        .as_array()
        .is_some_and(|p| !p.is_empty());
    let mut out = Vec::new();
    for route in status["routes"].as_array().into_iter().flatten() {
        let net = route["net"].as_str().unwrap_or_default();
        let reason = route["reason"].as_str().unwrap_or_default();
        let host = net.split('/').next().unwrap_or_default();
        let justified = if reason.starts_with("host for") || reason == "own client back home" {
            primaries.iter().any(|p| p == host)
        } else if reason.starts_with("serving for") {
            peers_down
        } else {
            true
        };
        if !justified {
            out.push(format!(
                "{} routes {net} ({reason}) for no session",
                dn_role(k)
            ));
        }
    }
    if status["held_blocks"]
        .as_array()
        .is_some_and(|h| !h.is_empty())
    {
        out.push(format!(
            "{} holds back own blocks: {}",
            dn_role(k),
            status["held_blocks"]
        ));
    }
    out
}

fn verdict(name: &str, own: Vec<String>, shared: Vec<String>, detail: String) -> CaseResult {
    let broken: Vec<String> = own.into_iter().chain(shared).collect();
    CaseResult {
        name: name.to_owned(),
        held: broken.is_empty(),
        detail: if broken.is_empty() {
            detail
        } else {
            format!("{}; {detail}", broken.join("; "))
        },
    }
}

fn run_case(name: &str) -> Result<CaseResult> {
    let lifetime = (name == "expired_lease_reuse").then_some(SHORT_LEASE_SECS);
    let arena = Arena::new(lifetime)?;
    let (own, restarted, detail) = match name {
        "initial_flood" => initial_flood(&arena)?,
        "conn_flood" => conn_flood(&arena)?,
        "non_reading_client" => non_reading_client(&arena)?,
        "reattach_route_leak" => reattach_route_leak(&arena)?,
        "block_pull" => block_pull(&arena)?,
        "restart_address_reuse" => restart_address_reuse(&arena)?,
        "expired_lease_reuse" => expired_lease_reuse(&arena)?,
        "home_is_back_replay" => home_is_back_replay(&arena)?,
        "log_injection" => log_injection(&arena)?,
        "foreign_ticket" => foreign_ticket(&arena)?,
        other => bail!("no case {other:?}"),
    };
    let shared = arena.finish(&restarted)?;
    Ok(verdict(name, own, shared, detail))
}

/// What a case found wrong, which DNs it restarted on purpose, and what it saw.
type Outcome = (Vec<String>, Vec<usize>, String);

/// 40,000 valid Initials in a burst at the real client's idle backup DN, from 16 addresses.
fn initial_flood(a: &Arena) -> Result<Outcome> {
    let k = a.secondary;
    let to = format!("{}:4433", dn_address_towards(ATTACKER, k));
    let ours = client_address_towards(ATTACKER, k);
    let net = ours
        .rsplit_once('.')
        .map(|(n, _)| n.to_owned())
        .unwrap_or_default();
    let link = if k == 1 {
        "to-dn".to_owned()
    } else {
        format!("to-dn{k}")
    };
    let sources: Vec<String> = (100..116).map(|h| format!("{net}.{h}")).collect();
    for s in &sources {
        a.lab.net.exec(
            &format!("en{ATTACKER}"),
            &["ip", "addr", "add", &format!("{s}/24"), "dev", &link],
        )?;
    }
    let mut args = vec![
        "initial-flood",
        "--to",
        &to,
        "--server-name",
        &dn_role(k),
        "--count",
        "20000",
        "--rounds",
        "2",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    for s in &sources {
        args.extend(["--from".to_owned(), s.clone()]);
    }
    let pid = a.lab.dn_pid(k)?;
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let sent = a.attack(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    // A new client right behind the flood must still get in.
    let newcomer = a.attack_as("lease", k, "newcomer", &[])?;
    // The DN works through what it accepted; give it the time a handshake may take.
    std::thread::sleep(Duration::from_secs(6));
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let status = a.lab.dn_status(k)?;
    let admission = &status["admission"];
    let mut own = Vec::new();
    let waited = newcomer["seconds"].as_f64();
    match waited {
        Some(s) if s <= NEWCOMER_WITHIN_SECS => {}
        Some(s) => own.push(format!("a new client waited {s:.1} s for its lease")),
        None => own.push(format!("a new client got no lease: {}", newcomer["detail"])),
    }
    Ok((
        own,
        vec![],
        format!(
            "{} Initials from {} addresses in {:.2} s; {}: {} retried, {} dropped, {} handshakes failed, {cpu:.1} CPU s; a new client leased in {}",
            sent["sent"],
            sources.len(),
            sent["send_seconds"].as_f64().unwrap_or(0.0),
            dn_role(k),
            admission["retried"],
            admission["ignored"],
            status["handshakes_failed"],
            waited.map_or("-".to_owned(), |s| format!("{s:.2} s")),
        ),
    ))
}

/// One certificate opens 200 connections and never attaches.
fn conn_flood(a: &Arena) -> Result<Outcome> {
    let k = a.secondary;
    let rss_before = rss_kib(a.lab.dn_pid(k)?)?;
    let got = a.attack_as(
        "conn-flood",
        k,
        "flooder",
        &["--connections", "200", "--hold-secs", "3"],
    )?;
    let rss_after = rss_kib(a.lab.dn_pid(k)?)?;
    let held = got["held_for_the_period"].as_u64().unwrap_or(u64::MAX);
    let mut own = Vec::new();
    if held > 8 {
        own.push(format!(
            "{held} unattached connections of one identity held"
        ));
    }
    Ok((
        own,
        vec![],
        format!(
            "200 asked: {held} held, {} closed by the DN, {} failed; DN memory {} -> {} KiB",
            got["closed_by_dn"], got["failed"], rss_before, rss_after
        ),
    ))
}

/// A client attached as a secondary asks for answers and never reads them.
fn non_reading_client(a: &Arena) -> Result<Outcome> {
    let home = a.primary;
    let k = a.secondary;
    let (_, ticket) = a.lease(home, "deaf")?;
    let got = a.attack_as("no-read", k, "deaf", &["--ticket-hex", &ticket])?;
    let mut own = Vec::new();
    if got["closed_by_dn"] != true {
        own.push("the DN kept a client that does not read".to_owned());
    }
    Ok((
        own,
        vec![],
        format!(
            "{} Switch/Demote pairs sent; closed by the DN after {:.1} s: {}",
            got["switches_sent"],
            got["after_seconds"].as_f64().unwrap_or(0.0),
            got["reason"]
        ),
    ))
}

/// A client promoted on its backup attaches again there before the first session ends.
fn reattach_route_leak(a: &Arena) -> Result<Outcome> {
    let (home, k) = (a.primary, a.secondary);
    let (address, ticket) = a.lease(home, "blip")?;
    let got = a.attack_as(
        "reattach",
        k,
        "blip",
        &["--ticket-hex", &ticket, "--packet-to", SERVER],
    )?;
    let mut own = Vec::new();
    if got["first_promoted"] != true {
        own.push("the first session was never promoted (the case tested nothing)".into());
    }
    // Both sessions are gone: nothing of the address may stay routed at the backup.
    std::thread::sleep(Duration::from_secs(1));
    let status = a.lab.dn_status(k)?;
    let leaked: Vec<String> = status["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["net"].as_str().unwrap_or_default() == format!("{address}/32"))
        .map(|r| r.to_string())
        .collect();
    if !leaked.is_empty() {
        own.push(format!("routes left behind: {}", leaked.join(", ")));
    }
    Ok((
        own,
        vec![],
        format!(
            "{address}: first session promoted: {}, closed by the DN: {}",
            got["first_promoted"], got["first_closed_by_dn"]
        ),
    ))
}

/// A client sends through its backup while its home is healthy.
fn block_pull(a: &Arena) -> Result<Outcome> {
    let (home, k) = (a.primary, a.secondary);
    let (address, ticket) = a.lease(home, "puller")?;
    let mut own = Vec::new();
    let mut during = Vec::new();
    let got = a.attack_as(
        "pull",
        k,
        "puller",
        &[
            "--ticket-hex",
            &ticket,
            "--packet-to",
            SERVER,
            "--secs",
            "2",
        ],
    )?;
    let status = a.lab.dn_status(k)?;
    for r in status["routes"].as_array().into_iter().flatten() {
        let reason = r["reason"].as_str().unwrap_or_default();
        if reason.starts_with("serving for") {
            own.push(format!("the backup serves {} for a healthy home", r["net"]));
        }
        if reason.starts_with("host for") {
            during.push(r["net"].as_str().unwrap_or_default().to_owned());
        }
    }
    let fresh = a.attack_as("lease", home, "newcomer", &[])?;
    if fresh["answer"] != "leased" {
        own.push(format!(
            "the home refused a new client: {}",
            fresh["detail"]
        ));
    }
    Ok((
        own,
        vec![],
        format!(
            "{address} promoted at the backup: {}; host routes there: {during:?}; home still leases: {}",
            got["promoted"],
            fresh["answer"] == "leased"
        ),
    ))
}

/// A DN restarts; another identity asks for an address.
fn restart_address_reuse(a: &Arena) -> Result<Outcome> {
    let k = a.secondary;
    let (first, ticket) = a.lease(k, "sleeper")?;
    let pid = a.lab.dn_pid(k)?;
    // SAFETY: the pid of the lab's own DN, from its detector.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    wait_until(Duration::from_secs(20), "the DN to be restarted", || {
        a.lab.dn_pid(k).is_ok_and(|p| p != pid) && a.lab.dn_status(k).is_ok()
    })?;
    // The peer served the DN's blocks while it was down; until it lets them go (the homecoming
    // period) the restarted DN leases nothing from them, by design.
    wait_until(
        Duration::from_secs(90),
        "the restarted DN to free its blocks",
        || {
            a.lab
                .dn_status(k)
                .is_ok_and(|s| s["held_blocks"].as_array().is_some_and(|h| h.is_empty()))
        },
    )?;
    let (other, _) = a.lease(k, "newcomer")?;
    let back = a.attack_as("lease", k, "sleeper", &["--ticket-hex", &ticket])?;
    let mut own = Vec::new();
    if other == first {
        own.push(format!(
            "{first} given to another identity after the restart"
        ));
    }
    if back["address"].as_str() != Some(first.to_string().as_str()) {
        own.push(format!("the holder did not get {first} back: {back}"));
    }
    Ok((
        own,
        vec![k],
        format!(
            "held {first} before the restart; a newcomer got {other}; the holder got {}",
            back["address"]
        ),
    ))
}

/// Leases live {SHORT_LEASE_SECS} s: a client whose session outlives that keeps its address
/// (renewed), and an expired ticket buys nothing.
fn expired_lease_reuse(a: &Arena) -> Result<Outcome> {
    let mut own = Vec::new();
    let en1 = a.lab.en_status(1)?;
    let en1_address = en1["address"].as_str().unwrap_or_default().to_owned();
    let (first, ticket) = a.lease(a.primary, "lapsed")?;
    std::thread::sleep(Duration::from_secs(SHORT_LEASE_SECS + 2));
    // en1 has been up all along: its lease must have been renewed, its address still its own.
    let now = crate::unix_micros() / 1_000_000;
    let expires = a.lab.en_status(1)?["lease_expires_at"]
        .as_u64()
        .unwrap_or(0);
    if expires <= now {
        own.push(format!(
            "the live client's lease expired {} s ago, not renewed",
            now - expires
        ));
    }
    let (other, _) = a.lease(a.primary, "latecomer")?;
    if other.to_string() == en1_address {
        own.push(format!(
            "{en1_address}, held by a live client, given to another"
        ));
    }
    let stale = a.attack_as("lease", a.secondary, "lapsed", &["--ticket-hex", &ticket])?;
    if stale["answer"] == "leased" {
        own.push(format!("an expired ticket for {first} accepted: {stale}"));
    }
    Ok((
        own,
        vec![],
        format!(
            "live client {en1_address}, its lease now ends in {} s; a latecomer got {other}; the expired ticket for {first}: {}",
            expires as i64 - now as i64,
            stale["answer"]
        ),
    ))
}

/// DN k's lease signing key file: what an attacker who stole it would sign with.
fn lease_key(a: &Arena, k: usize) -> String {
    a.lab
        .pki_dir()
        .join(format!("{}.lease.key", dn_role(k)))
        .display()
        .to_string()
}

/// A signed "home is back" notice from the real client's home, captured and replayed.
fn home_is_back_replay(a: &Arena) -> Result<Outcome> {
    let (from, to) = (a.primary, a.secondary);
    let key = lease_key(a, from);
    let before = a.lab.dn_status(to)?;
    let target = format!("{}:4434", dn_on_cluster_net(to));
    let bin = a.lab.bin("hf-attack");
    // Sent from the home DN's own address on the cluster network, as a capture would be.
    let out = a.lab.net.try_exec(
        &dn_role(from),
        &[
            &bin,
            "replay-notice",
            "--key",
            &key,
            "--from",
            &dn_role(from),
            "--to",
            &target,
            "--count",
            "3",
            "--seq",
            &crate::unix_micros().to_string(),
        ],
    )?;
    if !out.status.success() {
        bail!(
            "replay-notice failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = a.lab.dn_status(to)?;
    let taken = after["peer_notices_taken"].as_u64().unwrap_or(0)
        - before["peer_notices_taken"].as_u64().unwrap_or(0);
    let refused = after["peer_notices_refused"].as_u64().unwrap_or(0)
        - before["peer_notices_refused"].as_u64().unwrap_or(0);
    let mut own = Vec::new();
    if taken > 1 {
        own.push(format!("the same notice was taken {taken} times"));
    }
    Ok((
        own,
        vec![],
        format!("one notice sent 3 times: taken {taken}, refused {refused}"),
    ))
}

/// A certificate whose common name carries a newline and a forged log line.
fn log_injection(a: &Arena) -> Result<Outcome> {
    let forged = "FORGED-LINE dn: client attached";
    let cn = format!("mallory\\n{forged}\\e[2J");
    let k = a.secondary;
    let got = a.attack_as("lease", k, &cn, &[])?;
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(a.lab.net.log_path(&Lab::fd_role(k))).unwrap_or_default();
    let mut own = Vec::new();
    if log.lines().any(|l| l.starts_with("FORGED-LINE")) {
        own.push("a forged line starts a line of the DN's log".to_owned());
    }
    if log.contains('\x1b') {
        own.push("an escape sequence reached the DN's log".to_owned());
    }
    let mentions = log.lines().filter(|l| l.contains("mallory")).count();
    Ok((
        own,
        vec![],
        format!(
            "the DN answered {}; {mentions} log lines name the identity, escaped",
            got["answer"]
        ),
    ))
}

/// A ticket signed by a DN's key for an address outside that DN's pool.
fn foreign_ticket(a: &Arena) -> Result<Outcome> {
    let (victim, signer) = (a.primary, a.secondary);
    let en1 = a.lab.en_status(1)?;
    let stolen = en1["address"].as_str().unwrap_or_default().to_owned();
    let stolen_ip: IpAddr = stolen
        .parse()
        .with_context(|| format!("en1 has no address: {en1}"))?;
    let block = ipnet::IpNet::new(stolen_ip, 25)?.trunc().to_string();
    let key = lease_key(a, signer);
    let forged = a.attack(&[
        "forge-ticket",
        "--key",
        &key,
        "--issuer",
        &dn_role(signer),
        "--identity",
        "thief",
        "--address",
        &stolen,
        "--block",
        &block,
    ])?;
    let ticket = forged["ticket_hex"].as_str().unwrap_or_default().to_owned();
    let got = a.attack_as("lease", victim, "thief", &["--ticket-hex", &ticket])?;
    let mut own = Vec::new();
    if got["answer"] == "leased" {
        own.push(format!(
            "{} accepted {}'s ticket for its own client's address {stolen}",
            dn_role(victim),
            dn_role(signer)
        ));
    }
    Ok((
        own,
        vec![],
        format!(
            "{}-signed ticket for {stolen} (in {}'s pool) presented to {}: {}",
            dn_role(signer),
            dn_role(victim),
            dn_role(victim),
            got["answer"]
        ),
    ))
}
