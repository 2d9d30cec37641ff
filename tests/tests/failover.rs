//! Failover between DNs, as far as it goes without the routing daemons: the client holds a
//! session to every DN, and when its primary DN dies it switches to a secondary at once; the
//! secondary promotes itself on the client's first packet and routes the client's address.
//! (The edge router learning that route through OSPF comes with the routing-daemon lab.)

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use holdfast_lab::lab::{dn_role, with_lab, Credential, Lab, LabSpec, Routing, SERVER};
use serde_json::Value;

/// The DN (1-based) whose session has `role` and is up.
fn role_of(status: &Value, role: &str) -> Option<usize> {
    status["sessions"]
        .as_array()?
        .iter()
        .position(|s| s["state"] == "up" && s["role"] == role)
        .map(|p| p + 1)
}

#[test]
fn the_client_fails_over_to_its_secondary_which_promotes_itself_and_routes_the_client() {
    let spec = LabSpec {
        dns: 2,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let address = lab.wait_address(1, Duration::from_secs(15))?;
        // Both sessions up: one primary, one secondary.
        let (primary, secondary) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let (sent, received) = lab.ping("en1", SERVER, 5, &[])?;
        ensure!(sent == received, "no traffic before the failure");

        let killed = Instant::now();
        lab.net.stop(&dn_role(primary), libc::SIGKILL)?;
        // Keep sending: the first packet through the secondary promotes it.
        let mut switched = None;
        while killed.elapsed() < Duration::from_secs(5) {
            let _ = lab.ping("en1", SERVER, 1, &["-W", "0.05"]);
            if role_of(&lab.en_status(1)?, "primary") == Some(secondary) {
                switched = Some(killed.elapsed());
                break;
            }
        }
        let switched =
            switched.ok_or_else(|| anyhow!("the client never switched to dn{secondary}"))?;
        eprintln!("client switched to dn{secondary} {switched:?} after dn{primary} was killed");
        ensure!(
            switched < Duration::from_secs(1),
            "switching took {switched:?}"
        );

        // The secondary routes the client's address at the active metric.
        let mut routed = false;
        for _ in 0..50 {
            let _ = lab.ping("en1", SERVER, 1, &["-W", "0.05"]);
            let dn = lab.dn_status(secondary)?;
            routed = dn["routes"].as_array().is_some_and(|r| {
                r.iter().any(|x| {
                    x["metric"] == 100
                        && x["net"]
                            .as_str()
                            .and_then(|n| n.parse::<ipnet::IpNet>().ok())
                            .is_some_and(|n| n.contains(&address))
                })
            });
            if routed {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ensure!(
            routed,
            "dn{secondary} does not route {address}: {}",
            lab.dn_status(secondary)?
        );
        let log = std::fs::read_to_string(lab.net.log_path("en1"))?;
        ensure!(
            log.contains("routes its address"),
            "the client was not told it was promoted"
        );
        Ok(())
    });
}

#[test]
fn with_frr_the_edge_router_follows_the_client_to_its_backup_dn() {
    the_edge_router_follows_the_client_to_its_backup_dn(Routing::Frr);
}

#[test]
fn with_bird_the_edge_router_follows_the_client_to_its_backup_dn() {
    the_edge_router_follows_the_client_to_its_backup_dn(Routing::Bird);
}

fn the_edge_router_follows_the_client_to_its_backup_dn(routing: Routing) {
    let spec = LabSpec {
        dns: 2,
        routing,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let address = lab.wait_address(1, Duration::from_secs(15))?;
        let (primary, _) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let (sent, received) = lab.ping("en1", SERVER, 10, &[])?;
        ensure!(sent == received, "no traffic before the failure");
        // The ESR reaches the client through the DN whose pool leased the address.
        let home = if address.to_string().starts_with("10.200.") {
            1
        } else {
            2
        };
        let backup = 3 - home;
        ensure!(
            lab.esr_next_hop(address)? == format!("10.9.0.{home}"),
            "ESR does not route {address} to its home dn{home}:\n{}",
            lab.esr_routes()?
        );
        ensure!(
            primary == home,
            "the primary dn{primary} is not the home dn{home}"
        );

        // 100 packets/s from the client while the primary dies.
        let mut pinger = lab.net.command(
            "en1",
            &[
                "ping", "-n", "-q", "-i", "0.01", "-c", "400", "-W", "1", SERVER,
            ],
        );
        pinger.stdout(std::process::Stdio::piped());
        let pinger = pinger.spawn()?;
        std::thread::sleep(Duration::from_secs(1));
        lab.net.stop(&dn_role(home), libc::SIGKILL)?;
        let out = pinger.wait_with_output()?;
        let (sent, received) =
            holdfast_lab::lab::parse_ping(&String::from_utf8_lossy(&out.stdout))?;
        eprintln!(
            "{routing:?}: ping at 100/s across kill -9 of dn{home}: {sent} sent, {received} received, {} lost",
            sent - received
        );
        ensure!(
            lab.esr_next_hop(address)? == format!("10.9.0.{backup}"),
            "ESR does not route {address} to the backup dn{backup}:\n{}",
            lab.esr_routes()?
        );
        // After the failover, traffic flows both ways through the backup.
        let (sent, received) = lab.ping("en1", SERVER, 20, &[])?;
        ensure!(
            sent == received,
            "lost {} of {sent} pings after the failover",
            sent - received
        );
        Ok(())
    });
}

#[test]
fn after_the_primary_and_then_its_backup_die_the_third_dn_carries_the_client() {
    let spec = LabSpec {
        dns: 3,
        routing: Routing::Frr,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let address = lab.wait_address(1, Duration::from_secs(15))?;
        let (first, _) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let mut alive: Vec<usize> = (1..=3).filter(|k| *k != first).collect();
        lab.net.stop(&dn_role(first), libc::SIGKILL)?;
        // Traffic moves the client to a secondary, which routes it; then that one dies too.
        let second = wait_for_primary(lab, &alive)?;
        alive.retain(|k| *k != second);
        lab.net.stop(&dn_role(second), libc::SIGKILL)?;
        let third = wait_for_primary(lab, &alive)?;
        let via = format!("10.9.0.{third}");
        let mut routed = false;
        for _ in 0..100 {
            let _ = lab.ping("en1", SERVER, 1, &["-W", "0.05"]);
            if lab.esr_next_hop(address)? == via {
                routed = true;
                break;
            }
        }
        ensure!(
            routed,
            "the ESR does not route {address} via dn{third}:\n{}",
            lab.esr_routes()?
        );
        let routes = lab.dn_status(third)?["routes"].to_string();
        ensure!(
            routes.contains(&format!("{address}/32")) || routes.contains("serving for"),
            "dn{third} announces neither a host route nor the block's halves: {routes}"
        );
        let (sent, received) = lab.ping("en1", SERVER, 20, &[])?;
        ensure!(
            sent == received,
            "lost {} of {sent} pings on dn{third}",
            sent - received
        );
        Ok(())
    });
}

/// Sends traffic until the client's primary is one of `candidates`; returns it.
fn wait_for_primary(lab: &Lab, candidates: &[usize]) -> Result<usize> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let _ = lab.ping("en1", SERVER, 1, &["-W", "0.05"]);
        if let Some(p) = role_of(&lab.en_status(1)?, "primary") {
            if candidates.contains(&p) {
                return Ok(p);
            }
        }
    }
    Err(anyhow!("the client found no primary among {candidates:?}"))
}
