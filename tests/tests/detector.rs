//! The DN failure detector, `dn-fd`, against the real binaries: it kills a hung DN and deletes
//! its routes, restarts a flapping DN with growing delays, takes its DN with it when it dies,
//! and notices a DN host cut off from the cluster through the peers' heartbeats.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use holdfast_lab::lab::{
    dn_on_cluster_net, dn_role, with_lab, Credential, Failure, Lab, LabSpec, Routing, SERVER,
};
use holdfast_lab::netns::wait_until;
use serde_json::Value;

fn supervised(dns: usize, routing: Routing, fd_args: &[&str]) -> LabSpec {
    LabSpec {
        dns,
        routing,
        supervised: true,
        fd_args: fd_args.iter().map(|s| (*s).to_owned()).collect(),
        ..LabSpec::default()
    }
}

/// Waits until DN k runs (heartbeats) with a pid other than `not`; returns the pid.
fn wait_running(lab: &Lab, k: usize, not: Option<u32>, timeout: Duration) -> Result<u32> {
    let mut pid = None;
    wait_until(timeout, &format!("dn{k} to run under dn-fd"), || {
        pid = lab.fd_status(k).ok().and_then(|s| {
            let p = u32::try_from(s["dn"]["pid"].as_u64()?).ok()?;
            (s["dn"]["state"] == "running" && Some(p) != not).then_some(p)
        });
        pid.is_some()
    })?;
    pid.ok_or_else(|| anyhow!("no pid"))
}

/// Routes with protocol number 200 in DN k's namespace.
fn holdfast_routes(lab: &Lab, k: usize) -> Result<String> {
    let out = lab
        .net
        .exec(&dn_role(k), &["ip", "route", "show", "proto", "200"])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What DN k's detector says of DN `of`.
fn peer_state(lab: &Lab, k: usize, of: usize) -> Option<String> {
    let status = lab.fd_status(k).ok()?;
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == dn_role(of).as_str())
        .and_then(|p| p["state"].as_str().map(str::to_owned))
}

/// Client 1 up with both DNs, whose detectors hear each other; returns the client's address,
/// its primary and its backup.
fn client_with_detectors_in_touch(lab: &mut Lab) -> Result<(std::net::IpAddr, usize, usize)> {
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    let address = lab.wait_address(1, Duration::from_secs(15))?;
    let (primary, backup) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
    wait_until(
        Duration::from_secs(5),
        "the detectors to hear each other",
        || peer_state(lab, backup, primary).as_deref() == Some("up"),
    )?;
    Ok((address, primary, backup))
}

/// The ESR routes the client's address via DN `via`, and 20 pings all come back.
fn traffic_flows_via(lab: &Lab, address: std::net::IpAddr, via: usize) -> Result<()> {
    let hop = dn_on_cluster_net(via);
    wait_until(
        Duration::from_secs(5),
        "the ESR to route the client via the backup",
        || lab.esr_next_hop(address).is_ok_and(|h| h == hop),
    )?;
    let (sent, received) = lab.ping("en1", SERVER, 20, &["-i", "0.05"])?;
    ensure!(
        sent == received,
        "{} of {sent} pings lost after the failover",
        sent - received
    );
    Ok(())
}

/// How many of the routes in a DN's status announce DN `owner`'s blocks whole.
fn routes_serving_for(dn_status: &Value, owner: usize) -> usize {
    let reason = format!("serving for dn{owner}");
    dn_status["routes"].as_array().map_or(0, |r| {
        r.iter().filter(|x| x["reason"] == reason.as_str()).count()
    })
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_stopped_dn_is_killed_its_routes_deleted_and_it_is_restarted() {
    // A slow restart leaves time to see that no route outlives the kill.
    let spec = supervised(1, Routing::Static, &["--restart-base-ms", "1500"]);
    with_lab(spec, |lab| {
        let pid = wait_running(lab, 1, None, Duration::from_secs(10))?;
        ensure!(
            !holdfast_routes(lab, 1)?.is_empty(),
            "the DN installed no routes"
        );
        let stopped = Instant::now();
        // SAFETY: the DN's pid, as its detector reports it.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        let mut status = Value::Null;
        wait_until(
            Duration::from_secs(3),
            "dn-fd to kill the stopped DN",
            || {
                status = lab.fd_status(1).unwrap_or(Value::Null);
                status["kills"].as_u64() >= Some(1)
            },
        )?;
        let detected = stopped.elapsed();
        let routes = holdfast_routes(lab, 1)?;
        eprintln!("killed {detected:?} after SIGSTOP (heartbeat timeout 100 ms); status {status}");
        ensure!(
            status["last_kill"]
                .as_str()
                .is_some_and(|k| k.starts_with("no heartbeat")),
            "wrong kill reason: {status}"
        );
        ensure!(status["kills_by_reason"]["heartbeat"] == 1, "{status}");
        ensure!(
            routes.is_empty(),
            "protocol-200 routes left after the kill:\n{routes}"
        );
        ensure!(
            status["routes_deleted"].as_u64() > Some(0),
            "dn-fd deleted no routes: {status}"
        );
        wait_until(
            Duration::from_secs(2),
            "the stopped DN to be reaped",
            || !alive(pid),
        )?;
        let again = wait_running(lab, 1, Some(pid), Duration::from_secs(10))?;
        let restarted = stopped.elapsed();
        eprintln!("dn restarted as pid {again} {restarted:?} after SIGSTOP");
        ensure!(
            restarted >= Duration::from_millis(1500),
            "restarted after {restarted:?}, before the 1.5 s back-off"
        );
        let status = lab.fd_status(1)?;
        ensure!(status["starts"] == 2 && status["restarts"] == 1, "{status}");
        wait_until(Duration::from_secs(5), "the restarted DN's routes", || {
            holdfast_routes(lab, 1).is_ok_and(|r| !r.is_empty())
        })?;
        // The same figures as Prometheus metrics, inside the DN's namespace.
        let out = lab
            .net
            .exec("dn1", &["curl", "-sf", "http://127.0.0.1:9435/metrics"])?;
        let metrics = String::from_utf8_lossy(&out.stdout);
        for line in [
            "holdfast_dnfd_dn_kills_total{reason=\"heartbeat\"} 1",
            "holdfast_dnfd_dn_restarts_total 1",
            "holdfast_dnfd_dn_up{node=\"dn1\"} 1",
        ] {
            ensure!(
                metrics.lines().any(|l| l == line),
                "no {line:?} in the metrics:\n{metrics}"
            );
        }
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_flapping_dn_is_restarted_with_growing_delays() {
    let spec = supervised(1, Routing::Static, &["--restart-base-ms", "300"]);
    with_lab(spec, |lab| {
        let mut pid = wait_running(lab, 1, None, Duration::from_secs(10))?;
        let mut delays = Vec::new();
        for _ in 0..4 {
            let killed = Instant::now();
            // SAFETY: the DN's pid, as its detector reports it.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            pid = wait_running(lab, 1, Some(pid), Duration::from_secs(15))?;
            delays.push(killed.elapsed());
        }
        eprintln!("kill to running again: {delays:?} (back-off 300, 600, 1200, 2400 ms)");
        for (i, d) in delays.iter().enumerate() {
            let floor = Duration::from_millis(300 << i);
            ensure!(*d >= floor, "restart {i} after {d:?}, before {floor:?}");
        }
        ensure!(
            delays.windows(2).all(|w| w[1] > w[0]),
            "delays do not grow: {delays:?}"
        );
        let status = lab.fd_status(1)?;
        ensure!(
            status["restarts"] == 4 && status["recent_failures"] == 4,
            "{status}"
        );
        ensure!(
            status["last_exit"]
                .as_str()
                .is_some_and(|e| e.contains("signal 9")),
            "{status}"
        );
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn no_dn_outlives_its_detector_which_alone_runs_at_realtime_priority() {
    with_lab(supervised(1, Routing::Static, &[]), |lab| {
        let pid = wait_running(lab, 1, None, Duration::from_secs(10))?;
        let fd_pid = lab
            .net
            .pid(&Lab::fd_role(1))
            .context("the lab did not start dn-fd")?;
        // SAFETY: sched_getscheduler only reads the policy of a pid.
        let policy = |p: u32| unsafe { libc::sched_getscheduler(p as libc::pid_t) };
        ensure!(
            policy(fd_pid) == libc::SCHED_FIFO,
            "dn-fd runs with scheduling policy {}, not SCHED_FIFO",
            policy(fd_pid)
        );
        ensure!(
            policy(pid) == libc::SCHED_OTHER,
            "its DN runs with scheduling policy {}, not the normal one",
            policy(pid)
        );
        lab.net.stop(&Lab::fd_role(1), libc::SIGKILL)?;
        wait_until(Duration::from_secs(3), "the DN to die with dn-fd", || {
            !alive(pid)
        })
        .context("dn-fd was killed with SIGKILL and its DN still runs")
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_dn_host_cut_off_is_reported_down_by_its_peer_which_takes_its_blocks() {
    with_lab(supervised(2, Routing::Frr, &[]), |lab| {
        let (address, primary, backup) = client_with_detectors_in_touch(lab)?;
        let (sent, received) = lab.ping("en1", SERVER, 5, &[])?;
        ensure!(sent == received, "no traffic before the failure");

        let cut = Instant::now();
        lab.fail_dn(primary, Failure::Host)?;
        wait_until(
            Duration::from_secs(2),
            "the backup's detector to report the peer silent",
            || peer_state(lab, backup, primary).as_deref() == Some("silent"),
        )?;
        eprintln!(
            "dn{backup}'s detector reported dn{primary} silent {:?} after the cut",
            cut.elapsed()
        );
        // The backup's DN heard it from its detector and serves the dead peer's blocks.
        let dn_status = lab.dn_status(backup)?;
        ensure!(
            dn_status["peers_down"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == dn_role(primary).as_str())),
            "dn{backup} does not know dn{primary} is down: {dn_status}"
        );
        let active = routes_serving_for(&dn_status, primary);
        ensure!(
            active > 0,
            "dn{backup} serves no block of dn{primary}: {dn_status}"
        );
        eprintln!(
            "the client's sessions now: {}",
            lab.en_status(1)?["sessions"]
        );
        traffic_flows_via(lab, address, backup)
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_dn_cut_from_the_cluster_network_is_reported_down_its_clients_told_to_switch_and_its_blocks_given_back_when_it_is_heard_again(
) {
    with_lab(supervised(2, Routing::Frr, &[]), |lab| {
        let (address, primary, backup) = client_with_detectors_in_touch(lab)?;
        // The client still reaches its primary; only the detectors and OSPF lose it. The
        // client learns it from the backup, over its secondary session.
        lab.cut_cluster_link(primary)?;
        let mut status = Value::Null;
        wait_until(
            Duration::from_secs(3),
            "the client to switch to the backup",
            || {
                status = lab.en_status(1).unwrap_or(Value::Null);
                status["sessions"][backup - 1]["role"] == "primary"
            },
        )?;
        let dead = &status["sessions"][primary - 1];
        ensure!(
            dead["last_error"] == "ReportedDead",
            "the client dropped dn{primary} for another reason: {dead}"
        );
        traffic_flows_via(lab, address, backup)?;
        let serving = |lab: &Lab| {
            lab.dn_status(backup)
                .is_ok_and(|s| routes_serving_for(&s, primary) > 0)
        };
        ensure!(
            serving(lab),
            "dn{backup} never took dn{primary}'s blocks over"
        );
        // The link comes back: dn{primary}'s DN never stopped, so its blocks go back at once,
        // not after the homecoming period, and its client keeps a host route until it is home.
        lab.restore_cluster_link(primary)?;
        let back = Instant::now();
        wait_until(
            Duration::from_secs(5),
            "the detectors to hear each other again",
            || peer_state(lab, backup, primary).as_deref() == Some("up"),
        )?;
        let heard = back.elapsed();
        wait_until(
            Duration::from_millis(500),
            "the backup to give the blocks back",
            || !serving(lab),
        )?;
        eprintln!(
            "dn{primary} heard again {heard:?} after its link came back, its blocks given back {:?} after (the homecoming period is {:?})",
            back.elapsed() - heard,
            holdfast_proto::node::NodePolicy::default().homecoming
        );
        wait_until(Duration::from_secs(30), "the client to go home", || {
            lab.en_status(1)
                .is_ok_and(|s| s["sessions"][primary - 1]["role"] == "primary")
        })?;
        traffic_flows_via(lab, address, primary)
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn with_log_format_json_the_detector_and_its_dn_log_one_json_object_per_line() {
    with_lab(
        supervised(1, Routing::Static, &["--log-format", "json"]),
        |lab| {
            lab.start_client(1, &Credential::Issued("client1".into()))?;
            lab.wait_address(1, Duration::from_secs(15))?;
            let log = std::fs::read_to_string(lab.net.log_path(&Lab::fd_role(1)))?;
            let mut targets = std::collections::BTreeSet::new();
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("not a JSON log line: {line:?}"))?;
                ensure!(
                    v["timestamp"].is_string()
                        && v["level"].is_string()
                        && v["message"].is_string(),
                    "a JSON log line lacks timestamp, level or message: {line}"
                );
                targets.insert(v["target"].as_str().unwrap_or_default().to_owned());
            }
            // The DN inherits the format from its detector: both write here.
            ensure!(
                targets.iter().any(|t| t.starts_with("dn_fd"))
                    && targets.iter().any(|t| t.starts_with("holdfast_dn")),
                "expected lines of dn-fd and of its dn, got targets {targets:?}"
            );
            Ok(())
        },
    );
}

/// The value of the sample `series` (name and labels, exactly) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn every_daemon_serves_its_metrics_and_a_failover_shows_in_them() {
    use holdfast_lab::lab::{DN_METRICS, EN_METRICS, FD_METRICS};
    use holdfast_lab::ops::{missing, DN_FAMILIES, EN_FAMILIES, FD_FAMILIES};
    with_lab(supervised(2, Routing::Frr, &[]), |lab| {
        let (_, primary, backup) = client_with_detectors_in_touch(lab)?;
        let (sent, received) = lab.ping("en1", SERVER, 20, &[])?;
        ensure!(received == sent, "{received} of {sent} pings came back");
        let dn = lab.scrape(&dn_role(primary), DN_METRICS)?;
        let lacking = missing(&dn, DN_FAMILIES);
        ensure!(lacking.is_empty(), "dn metrics lack {lacking:?}:\n{dn}");
        let out = sample(&dn, "holdfast_dn_packets_total{direction=\"out\"}").unwrap_or(0.0);
        ensure!(
            out >= 20.0,
            "the DN counts {out} packets out after 20 pings:\n{dn}"
        );
        ensure!(
            sample(&dn, "holdfast_dn_sessions{role=\"primary\"}") == Some(1.0),
            "the client's primary DN counts no primary session:\n{dn}"
        );
        let fd = lab.scrape(&dn_role(primary), FD_METRICS)?;
        let lacking = missing(&fd, FD_FAMILIES);
        ensure!(lacking.is_empty(), "dn-fd metrics lack {lacking:?}:\n{fd}");
        lab.fail_dn(primary, Failure::Kill)?;
        wait_until(Duration::from_secs(10), "the client on its backup", || {
            lab.primary_and_secondary(1, Duration::from_millis(10))
                .is_ok_and(|(p, _)| p == backup)
                || lab
                    .en_status(1)
                    .is_ok_and(|s| s["sessions"][backup - 1]["role"] == "primary")
        })?;
        let en = lab.scrape("en1", EN_METRICS)?;
        let failovers: f64 = en
            .lines()
            .filter(|l| l.starts_with("holdfast_en_failovers_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        ensure!(
            failovers == 1.0,
            "one failover, the client's metrics count {failovers}:\n{en}"
        );
        ensure!(
            sample(&en, "holdfast_en_failover_outage_seconds_count") == Some(1.0),
            "no failover outage observed:\n{en}"
        );
        let lacking = missing(&en, EN_FAMILIES);
        ensure!(lacking.is_empty(), "en metrics lack {lacking:?}:\n{en}");
        let backup_dn = lab.scrape(&dn_role(backup), DN_METRICS)?;
        ensure!(
            sample(&backup_dn, "holdfast_dn_promotions_total").unwrap_or(0.0) >= 1.0,
            "the backup counts no promotion:\n{backup_dn}"
        );
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_reload_revokes_a_live_client_and_refuses_bad_or_restart_only_changes() {
    let spec = LabSpec {
        clients: 2,
        ..supervised(1, Routing::Static, &[])
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.start_client(2, &Credential::Issued("client2".into()))?;
        lab.wait_address(1, Duration::from_secs(15))?;
        lab.wait_address(2, Duration::from_secs(15))?;
        let path = lab.net.dir.join("cluster.toml");
        let original = std::fs::read_to_string(&path)?;
        let sessions = |lab: &Lab| {
            lab.dn_status(1)
                .map(|s| s["sessions"].as_u64().unwrap_or(0))
        };
        let log = |lab: &Lab| std::fs::read_to_string(lab.net.log_path(&Lab::fd_role(1)));
        let reload = |lab: &mut Lab, text: &str| -> Result<()> {
            std::fs::write(&path, text)?;
            lab.net.signal(&Lab::fd_role(1), libc::SIGHUP)?;
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        };
        // A file that does not parse, and one that changes what needs a restart: refused,
        // nothing dropped.
        reload(lab, &original.replace("[cluster]", "[cluster"))?;
        reload(
            lab,
            &original.replace(
                "revoked_clients = []",
                "revoked_clients = []\nlease_lifetime_secs = 99",
            ),
        )?;
        let text = log(lab)?;
        ensure!(
            text.matches("reload refused").count() == 2,
            "expected two refused reloads in the log:\n{text}"
        );
        ensure!(
            text.contains("lease_lifetime_secs changed, which needs a restart"),
            "the refusal does not name the key:\n{text}"
        );
        ensure!(sessions(lab)? == 2, "a refused reload dropped sessions");
        // Revoking client1: its live session is closed, it cannot come back; client2 stays.
        reload(
            lab,
            &original.replace("revoked_clients = []", "revoked_clients = [\"client1\"]"),
        )?;
        wait_until(Duration::from_secs(5), "client1's session to close", || {
            sessions(lab).is_ok_and(|n| n == 1)
        })?;
        let status = lab.dn_status(1)?;
        ensure!(
            status["clients"][0]["identity"] == "client2",
            "the session left is not client2's: {status}"
        );
        std::thread::sleep(Duration::from_secs(2));
        ensure!(
            sessions(lab)? == 1,
            "client1 came back after its revocation: {}",
            lab.dn_status(1)?
        );
        let (sent, received) = lab.ping("en2", SERVER, 10, &[])?;
        ensure!(received == sent, "client2 lost pings: {received} of {sent}");
        ensure!(
            log(lab)?.contains("client revoked: closing its session"),
            "no log line for the revoked session"
        );
        Ok(())
    });
}
