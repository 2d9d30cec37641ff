//! Signals nobody authenticated are hints, never verdicts: real binaries in network namespaces,
//! attacked with forged packets built by a short Python program (raw and UDP sockets).
//!
//! Each test builds its own lab and tears it down when it ends. They need root.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use holdfast_lab::lab::{
    client_address_towards, dn_address_towards, dn_on_cluster_net, dn_role, with_lab, Credential,
    Lab, LabSpec, Routing, SERVER,
};
use holdfast_lab::netns::wait_until;
use serde_json::Value;

/// Sends `count` ICMP "port unreachable" errors to `to`, each quoting a UDP datagram from
/// `from_port` to `dn:4433`, one every `gap` seconds. Arguments: to, quoted source address,
/// quoted source port, quoted destination, count, gap.
const FORGE_ICMP: &str = r#"
import socket, struct, sys, time
to, src, sport, dst, count, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
def checksum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 32, 0, 0x4000, 64, 17, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
inner = inner[:10] + struct.pack("!H", checksum(inner)) + inner[12:]
quoted = inner + struct.pack("!HHHH", sport, 4433, 8 + 32, 0)
body = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
icmp = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for _ in range(count):
    s.sendto(icmp, (to, 0))
    time.sleep(gap)
"#;

/// Floods `to:port` for `secs` seconds with well-formed detector heartbeats claiming to be
/// from `claimed`, signed with garbage. Prints how many it sent.
const FLOOD_HEARTBEATS: &str = r#"
import os, socket, struct, sys, time
to, port, claimed, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end, sent, seq = time.time() + secs, 0, int(time.time() * 1000)
while time.time() < end:
    seq += 1
    body = b"HFPN" + bytes([1, 2]) + struct.pack("!Q", int(time.time())) + bytes([len(claimed)]) + claimed + bytes([1]) + struct.pack("!Q", seq)
    try:
        s.sendto(body + os.urandom(64), (to, port))
        sent += 1
    except OSError:
        pass
print(sent)
"#;

/// The UDP port the client's QUIC endpoint is bound to, from `ss` in its namespace.
fn client_port(lab: &Lab) -> Result<u16> {
    let out = lab.net.exec("en1", &["ss", "-uanpH"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains("\"en\""))
        .find_map(|l| {
            let local = l.split_whitespace().nth(3)?;
            local.rsplit(':').next()?.parse().ok()
        })
        .ok_or_else(|| anyhow!("no UDP socket of en in:\n{text}"))
}

/// `count` pings at 100/s from the client to the server, running.
fn ping_at_100(lab: &Lab, count: u32) -> Result<std::process::Child> {
    let count = count.to_string();
    let mut ping = lab.net.command(
        "en1",
        &["ping", "-n", "-q", "-i", "0.01", "-c", &count, SERVER],
    );
    ping.stdout(std::process::Stdio::piped());
    Ok(ping.spawn()?)
}

/// (sent, received) of a finished ping.
fn ping_result(ping: std::process::Child) -> Result<(u32, u32)> {
    let out = ping.wait_with_output()?;
    holdfast_lab::lab::parse_ping(&String::from_utf8_lossy(&out.stdout))
}

fn session(status: &Value, dn: usize) -> Value {
    status["sessions"][dn - 1].clone()
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_forged_icmp_error_ends_no_session() {
    let spec = LabSpec {
        dns: 2,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, Duration::from_secs(15))?;
        let (primary, secondary) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let before = lab.en_status(1)?;
        let port = client_port(lab)?;
        // A ping at 100/s runs while the errors arrive; the forger is the secondary DN's host,
        // which can reach the client, quoting the client's flow to its primary.
        let ping = ping_at_100(lab, 300)?;
        let forged = lab.net.exec(
            &dn_role(secondary),
            &[
                "python3",
                "-c",
                FORGE_ICMP,
                &client_address_towards(1, secondary),
                &client_address_towards(1, primary),
                &port.to_string(),
                &dn_address_towards(1, primary),
                "20",
                "0.1",
            ],
        )?;
        ensure!(
            forged.status.success(),
            "the forger failed: {}",
            String::from_utf8_lossy(&forged.stderr)
        );
        let (sent, received) = ping_result(ping)?;
        let after = lab.en_status(1)?;
        eprintln!(
            "20 forged errors about the session to dn{primary}: {sent} pings sent, {} lost",
            sent - received
        );
        for dn in [primary, secondary] {
            ensure!(
                session(&after, dn)["connects"] == session(&before, dn)["connects"],
                "the session to dn{dn} was made again: before {} after {}",
                session(&before, dn),
                session(&after, dn)
            );
        }
        ensure!(
            session(&after, primary)["role"] == "primary",
            "the client left its primary: {after}"
        );
        ensure!(sent == received, "{} pings lost", sent - received);
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_flood_of_forged_heartbeats_changes_no_detectors_view() {
    let spec = LabSpec {
        dns: 2,
        routing: Routing::Frr,
        supervised: true,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, Duration::from_secs(15))?;
        let (primary, secondary) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let peer = |lab: &Lab| -> Result<Value> {
            let status = lab.fd_status(primary)?;
            status["peers"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == dn_role(secondary).as_str()))
                .cloned()
                .context("no such peer in dn-fd status")
        };
        wait_until(
            Duration::from_secs(5),
            "the detectors to hear each other",
            || peer(lab).is_ok_and(|p| p["state"] == "up"),
        )?;
        let before = peer(lab)?;
        let ping = ping_at_100(lab, 400)?;
        // The edge router is on the cluster network but is no peer: it floods the primary's
        // detector with heartbeats that claim to be its peer's.
        let flood = lab.net.exec(
            "esr",
            &[
                "python3",
                "-c",
                FLOOD_HEARTBEATS,
                &dn_on_cluster_net(primary),
                "4435",
                &dn_role(secondary),
                "3",
            ],
        )?;
        ensure!(
            flood.status.success(),
            "the flood failed: {}",
            String::from_utf8_lossy(&flood.stderr)
        );
        let flooded = String::from_utf8_lossy(&flood.stdout).trim().to_owned();
        let (sent, received) = ping_result(ping)?;
        let after = peer(lab)?;
        eprintln!(
            "{flooded} forged heartbeats in 3 s at dn{primary}'s detector: peer changes {} -> {}, {sent} pings sent, {} lost",
            before["changes"],
            after["changes"],
            sent - received
        );
        ensure!(
            after["changes"] == before["changes"] && after["state"] == "up",
            "the detector's view of dn{secondary} changed: before {before}, after {after}"
        );
        ensure!(sent == received, "{} pings lost", sent - received);
        Ok(())
    });
}
