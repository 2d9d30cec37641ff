//! Failover between DNs, as far as it goes without the routing daemons: the client holds a
//! session to every DN, and when its primary DN dies it switches to a secondary at once; the
//! secondary promotes itself on the client's first packet and routes the client's address.
//! (The edge router learning that route through OSPF comes with the routing-daemon lab.)

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use holdfast_lab::lab::{dn_role, Credential, Lab, LabSpec, SERVER};
use holdfast_lab::netns::have_root;
use serde_json::Value;

fn role_of(status: &Value, role: &str) -> Option<usize> {
    status["sessions"]
        .as_array()?
        .iter()
        .position(|s| s["state"] == "up" && s["role"] == role)
}

#[test]
fn the_client_fails_over_to_its_secondary_which_promotes_itself_and_routes_the_client() {
    if !have_root() {
        return;
    }
    let spec = LabSpec {
        dns: 2,
        ..LabSpec::default()
    };
    let mut lab = Lab::start(&spec).expect("lab starts");
    let result = (|| -> Result<()> {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let address = lab.wait_address(1, Duration::from_secs(15))?;
        // Both sessions up: one primary, one secondary.
        let mut status = Value::Null;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            status = lab.en_status(1)?;
            if role_of(&status, "primary").is_some() && role_of(&status, "secondary").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let primary =
            role_of(&status, "primary").ok_or_else(|| anyhow!("no primary: {status}"))? + 1;
        let secondary =
            role_of(&status, "secondary").ok_or_else(|| anyhow!("no secondary: {status}"))? + 1;
        let (sent, received) = lab.ping("en1", SERVER, 5, &[])?;
        ensure!(sent == received, "no traffic before the failure");

        let killed = Instant::now();
        lab.net.stop(&dn_role(primary), libc::SIGKILL)?;
        // Keep sending: the first packet through the secondary promotes it.
        let mut switched = None;
        while killed.elapsed() < Duration::from_secs(5) {
            let _ = lab.ping("en1", SERVER, 1, &["-W", "0.05"]);
            if role_of(&lab.en_status(1)?, "primary") == Some(secondary - 1) {
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
    })();
    if let Err(e) = result {
        panic!("{e:#}\n\n{}", lab.net.logs());
    }
}
