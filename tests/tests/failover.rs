//! Failover between DNs, as far as it goes without the routing daemons: the client holds a
//! session to every DN, and when its primary DN dies it switches to a secondary at once; the
//! secondary promotes itself on the client's first packet and routes the client's address.
//! (The edge router learning that route through OSPF comes with the routing-daemon lab.)

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use std::process::Stdio;

use holdfast_lab::lab::{dn_role, role_of, with_lab, Credential, Lab, LabSpec, Routing, SERVER};
use holdfast_lab::netns::wait_until;
use holdfast_lab::traffic;
use serde_json::Value;

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
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
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn with_frr_the_edge_router_follows_the_client_to_its_backup_dn() {
    the_edge_router_follows_the_client_to_its_backup_dn(Routing::Frr);
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
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
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
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

/// A traffic process that is killed if the test ends before it does.
struct Running(Option<std::process::Child>);

impl Running {
    fn finish(mut self) -> Result<std::process::Output> {
        let child = self.0.take().ok_or_else(|| anyhow!("already finished"))?;
        Ok(child.wait_with_output()?)
    }

    fn is_running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn with_frr_the_client_goes_home_when_its_dn_returns() {
    the_client_goes_home_when_its_dn_returns(Routing::Frr);
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn with_bird_the_client_goes_home_when_its_dn_returns() {
    the_client_goes_home_when_its_dn_returns(Routing::Bird);
}

/// Kill the client's home DN, let the backup carry it, restart the home DN: the backup tells
/// the client its home is back, the client moves home, the backup lowers the block, the home
/// DN advertises it again and the ESR routes the client home, while a download and a ping run
/// across all of it (same address, same TCP connection).
fn the_client_goes_home_when_its_dn_returns(routing: Routing) {
    let spec = LabSpec {
        dns: 2,
        routing,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        let www = lab.net.dir.join("www");
        let blob = traffic::make_blob(&www, "blob", 64 << 20)?;
        traffic::serve_http(&mut lab.net, "srv", &www, SERVER)?;
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let address = lab.wait_address(1, Duration::from_secs(15))?;
        let (home, backup) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let via = |k: usize| format!("10.9.0.{k}");
        let esr_routes_via = |lab: &Lab, k: usize, within: Duration| {
            let start = Instant::now();
            while start.elapsed() < within {
                if lab.esr_next_hop(address).ok() == Some(via(k)) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(anyhow!(
                "the ESR does not route {address} via dn{k} after {within:?}:\n{}",
                lab.esr_routes().unwrap_or_default()
            ))
        };
        esr_routes_via(lab, home, Duration::from_secs(10))?;

        // 64 MiB at 2 MiB/s: long enough to span the failover and the way home.
        let out = lab.net.dir.join("downloaded");
        let url = format!("http://{SERVER}:{}/blob", traffic::HTTP_PORT);
        let mut curl = Running(Some(
            traffic::paced_download(&lab.net, "en1", &url, &out, 2).spawn()?,
        ));
        let mut ping = lab.net.command(
            "en1",
            &["ping", "-n", "-q", "-i", "0.01", "-w", "34", SERVER],
        );
        ping.stdout(Stdio::piped());
        let ping = Running(Some(ping.spawn()?));

        std::thread::sleep(Duration::from_secs(2));
        lab.net.stop(&dn_role(home), libc::SIGKILL)?;
        esr_routes_via(lab, backup, Duration::from_secs(10))?;
        ensure!(
            wait_for_primary(lab, &[backup])? == backup,
            "the client did not fail over to dn{backup}"
        );
        std::thread::sleep(Duration::from_secs(1));

        lab.start_dn(home)?;
        let came_home = Instant::now();
        let mut at_home = false;
        while came_home.elapsed() < Duration::from_secs(20) {
            if role_of(&lab.en_status(1)?, "primary") == Some(home) {
                at_home = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ensure!(
            at_home,
            "the client did not go home to dn{home}: {}",
            lab.en_status(1)?
        );
        eprintln!(
            "{routing:?}: client back on dn{home} {:?} after its restart",
            came_home.elapsed()
        );
        esr_routes_via(lab, home, Duration::from_secs(15))?;
        // The backup lowered the block to standby; home advertises it again, without host routes.
        let settled = Instant::now();
        loop {
            let backup_routes = lab.dn_status(backup)?["routes"].to_string();
            let home_status = lab.dn_status(home)?;
            let home_routes = home_status["routes"].to_string();
            if !backup_routes.contains("serving for")
                && home_routes.contains("own block")
                && !home_routes.contains("back home")
                && home_status["held_blocks"] == serde_json::json!([])
            {
                break;
            }
            ensure!(
                settled.elapsed() < Duration::from_secs(15),
                "routes did not settle: dn{backup} {backup_routes}, dn{home} {home_status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ensure!(
            lab.en_status(1)?["address"] == address.to_string(),
            "the client's address changed"
        );
        ensure!(
            curl.is_running(),
            "the download ended before the client was home: lengthen it"
        );
        let log = std::fs::read_to_string(lab.net.log_path(&dn_role(home)))?;
        // Without a failure detector the backup carries the client by a host route (the block
        // is taken whole only when a detector says its owner is down).
        ensure!(
            log.contains("another DN carries clients of this own block"),
            "the restarted dn{home} did not see its client carried by dn{backup}"
        );
        let curl = curl.finish()?;
        ensure!(
            curl.status.success(),
            "the download failed: {}",
            String::from_utf8_lossy(&curl.stderr)
        );
        ensure!(
            traffic::sha256_file(&out)? == blob.sha256,
            "the download arrived damaged"
        );
        let ping = ping.finish()?;
        let (sent, received) =
            holdfast_lab::lab::parse_ping(&String::from_utf8_lossy(&ping.stdout))?;
        eprintln!(
            "{routing:?}: ping at 100/s across the failover and the way home: {sent} sent, {} lost",
            sent - received
        );
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_dn_whose_port_answers_unreachable_counts_as_dead_at_once() {
    let spec = LabSpec {
        dns: 2,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        // dn2's host is up but its `dn` is not: its port answers "unreachable".
        lab.net.stop(&dn_role(2), libc::SIGKILL)?;
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, Duration::from_secs(15))?;
        // Without the ICMP watch the handshake would only give up after its 5 s timeout.
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < Duration::from_secs(3) {
            last = lab.en_status(1)?["sessions"][1].clone();
            if last["last_error"] == "Unreachable" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(anyhow!("dn2 was not marked unreachable: {last}"))
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn ten_drains_of_the_clients_dn_lose_no_ping_nor_the_download_and_it_comes_home_after_each() {
    let spec = LabSpec {
        clients: 2,
        dns: 2,
        routing: Routing::Frr,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, Duration::from_secs(15))?;
        let (home, backup) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        // A TCP download paced to last through every drain, and a ping at 100/s.
        let www = lab.net.dir.join("www");
        let blob = traffic::make_blob(&www, "blob", 48 << 20)?;
        traffic::serve_http(&mut lab.net, "srv", &www, SERVER)?;
        let out = lab.net.dir.join("downloaded");
        let url = format!("http://{SERVER}:{}/blob", traffic::HTTP_PORT);
        let curl = Running(Some(
            traffic::paced_download(&lab.net, "en1", &url, &out, 2).spawn()?,
        ));
        let ping = traffic::Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
        std::thread::sleep(Duration::from_millis(500));
        let primary = |lab: &Lab| lab.primary_of(1);
        for round in 1..=10 {
            lab.drain(home, true)?;
            wait_until(
                Duration::from_secs(5),
                "the client to leave the drained DN",
                || primary(lab) == Some(backup),
            )?;
            let status = lab.dn_status(home)?;
            ensure!(
                status["draining"] == true,
                "round {round}: not draining: {status}"
            );
            std::thread::sleep(Duration::from_millis(700));
            lab.drain(home, false)?;
            wait_until(Duration::from_secs(5), "the client to come home", || {
                primary(lab) == Some(home)
            })?;
            std::thread::sleep(Duration::from_millis(700));
        }
        let (sent, answered) = ping.stop()?;
        eprintln!("10 drains: {answered} of {sent} pings answered");
        ensure!(
            answered == sent,
            "{} of {sent} pings lost over 10 drains",
            sent - answered
        );
        let curl = curl.finish()?;
        ensure!(
            curl.status.success(),
            "the download through the drains failed: {}",
            String::from_utf8_lossy(&curl.stderr)
        );
        ensure!(
            traffic::sha256_file(&out)? == blob.sha256,
            "the download through the drains arrived corrupted"
        );
        // A drained DN takes no new client.
        lab.drain(home, true)?;
        lab.start_client(2, &Credential::Issued("client2".into()))?;
        std::thread::sleep(Duration::from_secs(2));
        let status = lab.dn_status(home)?;
        ensure!(
            status["leases"] == 1,
            "the drained DN leased to a new client: {status}"
        );
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_reloaded_dn_list_moves_the_client_off_a_removed_dn_without_loss_and_refuses_bad_files() {
    let spec = LabSpec {
        dns: 3,
        routing: Routing::Frr,
        client_routes: vec!["0.0.0.0/0".into()],
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, Duration::from_secs(15))?;
        let (home, _) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let ping = traffic::Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
        let path = lab.en_config(1);
        let original = std::fs::read_to_string(&path)?;
        let reload = |lab: &mut Lab, text: &str| -> Result<()> {
            std::fs::write(&path, text)?;
            lab.net.signal("en1", libc::SIGHUP)?;
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        };
        let log = |lab: &Lab| std::fs::read_to_string(lab.net.log_path("en1"));
        let listed = |lab: &Lab| -> Result<Vec<String>> {
            let status = lab.en_status(1)?;
            Ok(status["sessions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["state"] == "up")
                .filter_map(|s| s["dn"].as_str().map(str::to_owned))
                .collect())
        };
        let endpoint = holdfast_lab::lab::dn_address_towards(1, home);
        let exempted = |lab: &Lab| -> Result<bool> {
            let out = lab.net.exec("en1", &["ip", "-4", "route", "show"])?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with(&format!("{endpoint} "))))
        };
        ensure!(
            exempted(lab)?,
            "no route keeps {endpoint} outside the tunnel"
        );

        // A file that does not parse, and one that changes what needs a restart: refused,
        // nothing dropped.
        reload(lab, &original.replace("[[dn]]", "[[dn]"))?;
        reload(lab, &original.replace("holdfast0", "holdfast9"))?;
        let text = log(lab)?;
        ensure!(
            text.matches("reload refused").count() == 2,
            "expected two refused reloads in the log:\n{text}"
        );
        ensure!(
            text.contains("tun changed, which needs a restart of en"),
            "the refusal does not name the key:\n{text}"
        );
        ensure!(listed(lab)?.len() == 3, "a refused reload dropped sessions");

        // The home DN taken out of the list: the client moves off it make before break, its
        // session is closed and its endpoint's route goes.
        let home_entry = format!(
            "\n[[dn]]\nname = \"{}\"\nendpoint = \"{endpoint}:4433\"\n",
            dn_role(home)
        );
        ensure!(
            original.contains(&home_entry),
            "unexpected en.toml:\n{original}"
        );
        reload(lab, &original.replace(&home_entry, ""))?;
        wait_until(
            Duration::from_secs(10),
            "the removed DN's session to close",
            || {
                listed(lab).is_ok_and(|l| l.len() == 2 && !l.contains(&dn_role(home)))
                    && lab.primary_of(1).is_some_and(|p| p != home)
            },
        )?;
        ensure!(!exempted(lab)?, "the removed DN's endpoint route stayed");
        let (sent, received) = lab.ping("en1", SERVER, 20, &[])?;
        ensure!(
            received == sent,
            "no traffic after the reload: {received} of {sent}"
        );

        // Listed again: connected to again, and its endpoint kept out of the tunnel again.
        reload(lab, &original)?;
        wait_until(
            Duration::from_secs(10),
            "the DN listed again to be up",
            || listed(lab).is_ok_and(|l| l.len() == 3),
        )?;
        ensure!(exempted(lab)?, "no route for the DN listed again");
        let (sent, answered) = ping.stop()?;
        eprintln!("reloads: {answered} of {sent} pings answered");
        ensure!(
            answered == sent,
            "{} of {sent} pings lost over the reloads",
            sent - answered
        );
        ensure!(
            log(lab)?.matches("configuration reloaded").count() == 2,
            "expected two applied reloads in the log"
        );
        Ok(())
    });
}
