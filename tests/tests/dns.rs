//! DNS through the tunnel: what the cluster pushes with the lease is applied in the client's
//! namespace and taken back when the client stops; DN endpoints given as host names.
//!
//! Real binaries and a real dnsmasq in network namespaces. They need root; run them one at a
//! time (`--test-threads=1`). Without dnsmasq they say they are skipped (scripts/install-deps.sh
//! installs it).

use std::time::Duration;

use anyhow::ensure;
use holdfast_lab::lab::{client_role, dn_address_towards, with_lab, Credential, LabSpec, SERVER};
use holdfast_lab::mobile_dns;
use holdfast_lab::netns::wait_until;

const UP: Duration = Duration::from_secs(15);

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn pushed_dns_is_applied_and_restored_on_sigterm() {
    if mobile_dns::dnsmasq().is_none() {
        eprintln!("skipped: this test needs dnsmasq (scripts/install-deps.sh)");
        return;
    }
    with_lab(mobile_dns::spec(), |lab| {
        let outcome = mobile_dns::run(lab)?;
        eprintln!("{}", outcome.detail());
        ensure!(outcome.held(), "{}", outcome.detail());
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn dn_endpoints_may_be_host_names() {
    let spec = LabSpec {
        dns: 2,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        let role = client_role(1);
        // The client's own name service: dn1's name in its hosts file, and a resolver that
        // answers nothing, so that the name it does not know fails at once.
        lab.net.etc_file(
            &role,
            "hosts",
            &format!(
                "127.0.0.1 localhost\n{} dn1.lab.test\n",
                dn_address_towards(1, 1)
            ),
        )?;
        lab.net
            .etc_file(&role, "resolv.conf", "nameserver 127.0.0.1\n")?;
        lab.start_client_with(1, &Credential::Issued("client1".into()), |k| match k {
            1 => "dn1.lab.test:4433".into(),
            _ => "nowhere.lab.test".into(),
        })?;
        lab.wait_address(1, UP)?;
        let (sent, received) = lab.ping(&role, SERVER, 10, &[])?;
        ensure!(received == sent, "lost {} of {sent} pings", sent - received);
        let mut status = serde_json::Value::Null;
        wait_until(UP, "dn2's look-up to fail in en status", || {
            status = lab.en_status(1).unwrap_or_default();
            status["sessions"][1]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot resolve nowhere.lab.test"))
        })?;
        let dn1 = &status["sessions"][0];
        ensure!(
            dn1["endpoint"] == "dn1.lab.test:4433"
                && dn1["address"] == format!("{}:4433", dn_address_towards(1, 1)),
            "dn1 in en status: {dn1}"
        );
        eprintln!(
            "dn1.lab.test resolved to {}; dn2: {}",
            dn1["address"], status["sessions"][1]["last_error"]
        );
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_killed_clients_resolv_conf_is_restored_at_its_next_start() {
    if mobile_dns::dnsmasq().is_none() {
        eprintln!("skipped: this test needs dnsmasq (scripts/install-deps.sh)");
        return;
    }
    with_lab(mobile_dns::spec(), |lab| {
        let role = client_role(1);
        let file = lab
            .net
            .etc_file(&role, "resolv.conf", mobile_dns::ORIGINAL)?;
        let pushed = || {
            std::fs::read_to_string(&file)
                .is_ok_and(|t| t.contains(&format!("nameserver {SERVER}")))
        };
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        wait_until(UP, "the pushed DNS in resolv.conf", pushed)?;
        // Killed: no chance to restore anything.
        lab.net.stop(&role, libc::SIGKILL)?;
        ensure!(pushed(), "resolv.conf changed without en");
        // The next start restores the backup before it applies the cluster's DNS again, so
        // that what it restores at its own exit is the original, not the killed client's file.
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let log = lab.net.log_path(&role);
        wait_until(UP, "the second en to restore the backup", || {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("did not stop cleanly: restoring"))
        })?;
        lab.wait_address(1, UP)?;
        wait_until(UP, "the pushed DNS in resolv.conf again", pushed)?;
        lab.net.stop(&role, libc::SIGTERM)?;
        let now = std::fs::read_to_string(&file)?;
        ensure!(
            now == mobile_dns::ORIGINAL,
            "resolv.conf after the second en: {now:?}"
        );
        Ok(())
    });
}
