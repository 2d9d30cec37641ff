//! The tunnel, end to end: real `en` and `dn` binaries in network namespaces, real traffic.
//!
//! Each test builds its own lab and tears it down when it ends, passing or failing. They need
//! root; run them one at a time (`--test-threads=1`): they share two cores.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use holdfast_lab::lab::{
    client_role, with_lab, Credential, Lab, LabSpec, SERVER, SERVER6, SERVER_NET, SERVER_NET6,
};
use holdfast_lab::netns::wait_until;
use holdfast_lab::traffic;
use holdfast_proto::lease::{parse_signing_key, LeaseClaim, LeaseTicket};
use std::net::IpAddr;

const UP: Duration = Duration::from_secs(15);

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn ping_reaches_the_server_through_the_tunnel() {
    with_lab(LabSpec::default(), |lab| {
        // Without the tunnel the server network is unreachable from the client.
        let (_, before) = lab.ping("en1", SERVER, 2, &[])?;
        ensure!(
            before == 0,
            "the client reached the server without the tunnel"
        );
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let address = lab.wait_address(1, UP)?;
        ensure!(
            address.to_string().starts_with("10.200.0."),
            "address {address} is not from the pool"
        );
        let (sent, received) = lab.ping("en1", SERVER, 20, &[])?;
        ensure!(received == sent, "lost {} of {sent} pings", sent - received);
        let dn = lab.dn_status(1)?;
        ensure!(dn["clients"][0]["identity"] == "client1", "dn status: {dn}");
        // The echo requests came in from the client and the replies went out to it.
        let traffic = &dn["clients"][0]["traffic"];
        ensure!(
            traffic["rx_packets"].as_u64() >= Some(20)
                && traffic["tx_packets"].as_u64() >= Some(20),
            "dn status: {dn}"
        );
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_100_mb_transfer_arrives_intact() {
    with_lab(LabSpec::default(), |lab| {
        let www = lab.net.dir.join("www");
        let blob = traffic::make_blob(&www, "blob", 100 << 20)?;
        traffic::serve_http(&mut lab.net, "srv", &www, SERVER)?;
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, UP)?;
        let out = lab.net.dir.join("downloaded");
        let url = format!("http://{SERVER}:{}/blob", traffic::HTTP_PORT);
        let got = traffic::download(&lab.net, "en1", &url, &out, Duration::from_secs(120))?;
        ensure!(
            got.bytes == blob.size,
            "downloaded {} of {} bytes",
            got.bytes,
            blob.size
        );
        let digest = traffic::sha256_file(&out)?;
        ensure!(
            digest == blob.sha256,
            "SHA-256 differs: sent {} received {digest}",
            blob.sha256
        );
        eprintln!(
            "100 MB in {:.2} s ({:.0} Mbit/s)",
            got.seconds,
            blob.size as f64 * 8.0 / got.seconds / 1e6
        );
        // The session's QUIC figures count this transfer: at least one datagram per 1500
        // bytes came in.
        let status = lab.en_status(1)?;
        let quic = status["sessions"][0]["quic"].clone();
        ensure!(
            figure(&quic, "udp_rx_datagrams")? >= blob.size / 1500,
            "too few datagrams counted in: {quic}"
        );
        ensure!(figure(&quic, "cwnd")? > 0, "no congestion window: {quic}");
        // The client's sends: none carried less than one datagram.
        let sent = figure(&status["udp"], "datagrams_sent")?;
        let calls = figure(&status["udp"], "send_calls")?;
        ensure!(
            0 < calls && calls <= sent,
            "send calls miscounted: {status}"
        );
        // The DN sent the download joined into segmentation-offload batches: more than
        // quinn's 10 datagrams per call on average.
        let dn = lab.dn_status(1)?;
        let sent = figure(&dn["udp"], "datagrams_sent")?;
        let calls = figure(&dn["udp"], "send_calls")?;
        ensure!(
            sent >= blob.size / 1500 && 0 < calls && sent > 10 * calls,
            "the DN's sends do not show the download in joined batches: {}",
            dn["udp"]
        );
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_udp_flood_beyond_what_the_dn_forwards_keeps_the_session() {
    with_lab(LabSpec::default(), |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, UP)?;
        // 2 Gbit/s of 1200-byte datagrams: more than the DN forwards on this machine, so its
        // queue fills and the echoes of the client's probes wait behind data.
        let flood = traffic::IperfTest {
            udp_rate: Some("2G".into()),
            ..Default::default()
        };
        let run = traffic::iperf3_test(&mut lab.net, "srv", "en1", SERVER, 4, &flood)?;
        eprintln!(
            "UDP flood: {:.0} Mbit/s arrived, {:.1}% lost",
            run.mbps,
            run.lost_percent.unwrap_or(f64::NAN)
        );
        // The DN's QUIC layer acknowledged all along: the client never judged it dead, so
        // it never reconnected and never was without a session.
        let status = lab.en_status(1)?;
        let session = &status["sessions"][0];
        ensure!(
            figure(session, "connects")? == 1
                && figure(&status["traffic"], "dropped_no_session")? == 0,
            "the flood cost the client its session: {status}"
        );
        let (sent, received) = lab.ping("en1", SERVER, 10, &[])?;
        ensure!(
            received == sent,
            "after the flood, lost {} of {sent} pings",
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
fn udp_datagrams_merged_on_the_way_arrive_whole_and_in_order() {
    let spec = LabSpec {
        dual_stack: true,
        client_routes: vec![SERVER_NET.to_owned(), SERVER_NET6.to_owned()],
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, UP)?;
        wait_until(UP, "the client's IPv6 address", || {
            lab.en_status(1)
                .is_ok_and(|s| s["address6"].as_str().is_some())
        })?;
        // IPv6 first and at once: the lab's links skip duplicate address detection, so IPv6
        // works as soon as the client has its address (with it, the DN could not resolve the
        // server for a second or two and only 128-158 of 20,000 datagrams arrived).
        for to in [format!("[{SERVER6}]:5400"), format!("{SERVER}:5400")] {
            udp_stream_arrives_merged(lab, &to)?;
        }
        Ok(())
    });
}

/// 20,000 datagrams to `to` (the server) arrive whole and in order, and the DN wrote them
/// merged.
fn udp_stream_arrives_merged(lab: &mut Lab, to: &str) -> Result<()> {
    let count = 20_000u64;
    let count_arg = count.to_string();
    let hf_udp = lab.bin("hf-udp");
    let tun_writes = |lab: &Lab| -> Result<u64> {
        // The kernel counts one received packet per write to the device.
        let out = lab.net.exec(
            "dn1",
            &["cat", "/sys/class/net/holdfast0/statistics/rx_packets"],
        )?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("rx_packets of the DN's TUN device")
    };
    let before = tun_writes(lab)?;
    let receiver = lab
        .net
        .command(
            "srv",
            &[&hf_udp, "receive", "--bind", to, "--count", &count_arg],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start hf-udp receive")?;
    std::thread::sleep(Duration::from_millis(300));
    // Bursts of 32 datagrams of 1200 bytes, 1 ms apart: about 300 Mbit/s, which the DN
    // forwards without loss, in batches it can merge.
    let sent = lab
        .net
        .exec("en1", &[&hf_udp, "send", "--to", to, "--count", &count_arg]);
    // The receiver ends on its own, when the stream is complete or has stopped.
    let out = receiver.wait_with_output()?;
    sent?;
    let got: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("hf-udp receive printed no JSON")?;
    let writes = tun_writes(lab)? - before;
    eprintln!("UDP stream to {to}: {got}, {writes} writes to the DN's TUN device");
    let received = figure(&got, "received")?;
    ensure!(
        figure(&got, "corrupt")? == 0 && figure(&got, "out_of_order")? == 0,
        "datagrams to {to} came out changed or reordered: {got}"
    );
    ensure!(
        received * 100 >= count * 99,
        "{received} of {count} datagrams to {to} arrived"
    );
    // Merged: fewer writes than datagrams by half at least (one write each before).
    ensure!(
        writes * 2 <= received,
        "{writes} writes for {received} datagrams to {to}: the DN did not merge them"
    );
    Ok(())
}

/// One figure of a status object (a session's `quic`, a daemon's `udp`).
fn figure(object: &serde_json::Value, key: &str) -> Result<u64> {
    object[key]
        .as_u64()
        .with_context(|| format!("status has no {key}: {object}"))
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_second_client_gets_its_own_address() {
    let spec = LabSpec {
        clients: 2,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.start_client(2, &Credential::Issued("client2".into()))?;
        let a = lab.wait_address(1, UP)?;
        let b = lab.wait_address(2, UP)?;
        ensure!(a != b, "both clients got {a}");
        for i in 1..=2 {
            let (sent, received) = lab.ping(&client_role(i), SERVER, 10, &[])?;
            ensure!(
                received == sent,
                "client {i} lost {} pings",
                sent - received
            );
        }
        ensure!(
            lab.dn_status(1)?["sessions"] == 2,
            "the DN does not show two sessions"
        );
        Ok(())
    });
}

/// Waits a while and checks that client 1 never got an address and cannot reach the server.
fn assert_refused(lab: &mut Lab, reason_in_dn_log: &str) -> Result<()> {
    std::thread::sleep(Duration::from_secs(3));
    let status = lab.en_status(1)?;
    ensure!(
        status["address"].is_null(),
        "a refused client got an address: {status}"
    );
    let (_, received) = lab.ping("en1", SERVER, 3, &[])?;
    ensure!(received == 0, "a refused client reached the server");
    let log = std::fs::read_to_string(lab.net.log_path("dn1"))?;
    ensure!(
        log.contains(reason_in_dn_log),
        "the DN log does not give the reason {reason_in_dn_log:?}"
    );
    Ok(())
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_client_with_a_certificate_from_another_ca_is_refused() {
    with_lab(LabSpec::default(), |lab| {
        lab.start_client(1, &Credential::Foreign("intruder".into()))?;
        assert_refused(lab, "client refused: certificate not accepted")
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_revoked_client_is_refused() {
    let spec = LabSpec {
        revoked: vec!["stolen-laptop".into()],
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("stolen-laptop".into()))?;
        assert_refused(lab, "client refused: revoked")
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_forged_source_address_is_dropped_and_counted() {
    with_lab(LabSpec::default(), |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, UP)?;
        let before = lab.dn_status(1)?["dropped_spoofed"].as_u64().unwrap_or(0);
        // A second address on the client's TUN device: the EN forwards what the kernel routes
        // into the tunnel, so the DN is the one that must stop it.
        lab.net.exec(
            "en1",
            &["ip", "addr", "add", "10.200.0.99/32", "dev", "holdfast0"],
        )?;
        let (_, received) = lab.ping("en1", SERVER, 5, &["-I", "10.200.0.99"])?;
        ensure!(received == 0, "a packet with a forged source got through");
        let after = lab.dn_status(1)?["dropped_spoofed"].as_u64().unwrap_or(0);
        ensure!(
            after >= before + 5,
            "dropped_spoofed went from {before} to {after}"
        );
        // The real address still works.
        let (sent, received) = lab.ping("en1", SERVER, 5, &[])?;
        ensure!(received == sent, "the client's own traffic suffered");
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn an_oversized_packet_gets_packet_too_big_not_silence() {
    with_lab(LabSpec::default(), |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let address = lab.wait_address(1, UP)?.to_string();
        // Let path MTU discovery settle, then read the session's datagram size.
        std::thread::sleep(Duration::from_secs(2));
        let dn = lab.dn_status(1)?;
        let max = dn["clients"][0]["max_datagram"]
            .as_u64()
            .context("dn status has no max_datagram")?;
        let dn_mtu = dn["mtu"].as_u64().context("dn status has no mtu")?;
        ensure!(
            max < dn_mtu,
            "session datagrams ({max}) fit the DN's MTU ({dn_mtu}); nothing to test"
        );
        // From the server, a DF packet one byte larger than the session carries: the DN must
        // answer "fragmentation needed" with the session's size.
        let payload = (max + 1 - 28).to_string();
        let out = lab.net.try_exec(
            "srv",
            &[
                "ping", "-n", "-c", "1", "-M", "do", "-s", &payload, &address,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        ensure!(
            text.contains(&format!("Frag needed and DF set (mtu = {max})")),
            "no packet-too-big answer: {text}"
        );
        ensure!(
            lab.dn_status(1)?["icmp_too_big_sent"].as_u64() >= Some(1),
            "not counted"
        );
        // Within the size it goes through.
        let fits = (max - 28).to_string();
        let out = lab.net.try_exec(
            "srv",
            &["ping", "-n", "-c", "2", "-M", "do", "-s", &fits, &address],
        )?;
        ensure!(out.status.success(), "a fitting DF ping failed");
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_client_reconnects_with_its_address_after_the_dn_restarts() {
    with_lab(LabSpec::default(), |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let before = lab.wait_address(1, UP)?;
        lab.net.stop("dn1", libc::SIGKILL)?;
        lab.start_dn(1)?;
        // Traffic makes the EN hit the restarted DN, which resets the stale session.
        comes_back(lab, "en1")?;
        let after = lab.wait_address(1, UP)?;
        ensure!(before == after, "address changed from {before} to {after}");
        let sessions = lab.en_status(1)?["sessions"].clone();
        ensure!(
            sessions[0]["connects"] == 2,
            "expected a second connect: {sessions}"
        );
        Ok(())
    });
}

/// Pings from `client` until one gets through (at most 100 tries).
fn comes_back(lab: &Lab, client: &str) -> Result<()> {
    for _ in 0..100 {
        if lab.ping(client, SERVER, 1, &[])?.1 == 1 {
            return Ok(());
        }
    }
    Err(anyhow!("{client} never came back"))
}

/// A client asleep (SIGSTOP) through its DN's restart still holds a valid ticket: the
/// restarted DN reads its lease journal and gives the next new client another address, and the
/// sleeper wakes up to its own.
#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_restarted_dn_keeps_a_sleeping_clients_address_for_it() {
    let spec = LabSpec {
        clients: 2,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let sleeper = lab.wait_address(1, UP)?;
        lab.net.signal("en1", libc::SIGSTOP)?;
        lab.net.stop("dn1", libc::SIGKILL)?;
        lab.start_dn(1)?;
        lab.start_client(2, &Credential::Issued("client2".into()))?;
        let newcomer = lab.wait_address(2, UP)?;
        lab.net.signal("en1", libc::SIGCONT)?;
        ensure!(
            newcomer != sleeper,
            "the restarted DN gave {sleeper}, still leased to client1, to client2"
        );
        comes_back(lab, "en1")?;
        let after = lab.wait_address(1, UP)?;
        ensure!(
            after == sleeper,
            "client1's address changed from {sleeper} to {after}"
        );
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_pushed_default_route_keeps_the_dn_endpoint_outside_the_tunnel() {
    let spec = LabSpec {
        client_routes: vec!["0.0.0.0/0".into()],
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        lab.wait_address(1, UP)?;
        let routes = lab.net.exec("en1", &["ip", "-4", "route", "show"])?;
        let routes = String::from_utf8_lossy(&routes.stdout).to_string();
        for want in [
            "0.0.0.0/1 dev holdfast0",
            "128.0.0.0/1 dev holdfast0",
            "10.0.1.2 dev to-dn",
        ] {
            ensure!(routes.contains(want), "no route {want:?} in:\n{routes}");
        }
        // Everything goes through the tunnel, and the session itself still reaches the DN.
        let (sent, received) = lab.ping("en1", SERVER, 20, &[])?;
        ensure!(received == sent, "lost {} of {sent} pings", sent - received);
        Ok(())
    });
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn the_dn_routes_its_pool_with_our_protocol_and_the_routes_die_with_it() {
    with_lab(LabSpec::default(), |lab| {
        let show = |lab: &Lab| -> Result<String> {
            let out = lab
                .net
                .exec("dn1", &["ip", "-4", "route", "show", "proto", "200"])?;
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        };
        let routes = show(lab)?;
        ensure!(
            routes.contains("10.200.0.0/24 dev holdfast0") && routes.contains("metric 200"),
            "no home route for the pool:\n{routes}"
        );
        let log = std::fs::read_to_string(lab.net.log_path("dn1"))?;
        ensure!(
            log.contains("route installed"),
            "route changes are not logged"
        );
        lab.net.stop("dn1", libc::SIGKILL)?;
        let routes = show(lab)?;
        ensure!(
            routes.trim().is_empty(),
            "routes outlived the DN:\n{routes}"
        );
        Ok(())
    });
}

/// Runs the lab's test client `hf-attach` in `en1` with `identity`'s certificate, presenting
/// `ticket`, and returns the DN's answer.
fn present(lab: &Lab, identity: &str, ticket: Option<&LeaseTicket>) -> Result<serde_json::Value> {
    let pki = lab.pki_dir();
    let file = |name: String| pki.join(name).display().to_string();
    let hex = ticket.map(|t| hex::encode(t.encode()));
    let mut argv = vec![
        lab.bin("hf-attach"),
        "--cert".into(),
        file(format!("{identity}.crt.pem")),
        "--key".into(),
        file(format!("{identity}.key.pem")),
        "--server-ca".into(),
        file("server-ca.pem".into()),
        "--endpoint".into(),
        "10.0.1.2:4433".into(),
        "--server-name".into(),
        "dn1".into(),
    ];
    if let Some(h) = hex {
        argv.push("--ticket-hex".into());
        argv.push(h);
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = lab.net.exec("en1", &argv)?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_claim_without_a_valid_ticket_of_ones_own_gets_no_address_no_route_and_no_traffic() {
    with_lab(LabSpec::default(), |lab| {
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let taken = lab.wait_address(1, UP)?;
        holdfast_dn::pki::add_client(lab.pki_dir(), "client2")?;
        let key_text = std::fs::read_to_string(lab.pki_dir().join("dn1.lease.key"))?;
        let dn_key = parse_signing_key(&key_text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claim = |identity: &str, address: IpAddr, expires_at: u64| LeaseClaim {
            identity: identity.into(),
            address,
            issuer: "dn1".into(),
            block: "10.200.0.0/24".parse().expect("a network"),
            issued_at: now - 100,
            expires_at,
            address6: None,
        };
        let free: IpAddr = "10.200.0.50".parse()?;
        let cases = [
            (
                "client1's ticket",
                claim("client1", taken, now + 3600).sign(&dn_key),
                "BadTicket",
            ),
            (
                "an expired ticket",
                claim("client2", free, now - 1).sign(&dn_key),
                "BadTicket",
            ),
            (
                "a ticket for client1's address",
                claim("client2", taken, now + 3600).sign(&dn_key),
                "AddressUnavailable",
            ),
            (
                "a ticket signed by another key",
                claim("client2", free, now + 3600)
                    .sign(&ed25519_dalek::SigningKey::from_bytes(&[7; 32])),
                "BadTicket",
            ),
        ];
        let routes_before = lab.dn_status(1)?["routes"].clone();
        for (what, ticket, code) in &cases {
            let answer = present(lab, "client2", Some(ticket))?;
            ensure!(
                answer["answer"] == "refused" && answer["code"] == *code,
                "{what}: expected refusal {code}, got {answer}"
            );
        }
        // The DN counts a refusal once it has closed the connection, a moment after answering.
        wait_until(
            Duration::from_secs(3),
            "the DN to count four refusals",
            || {
                lab.dn_status(1)
                    .is_ok_and(|dn| dn["sessions_refused"].as_u64() >= Some(4))
            },
        )?;
        let dn = lab.dn_status(1)?;
        ensure!(dn["sessions"] == 1, "a refused claim left a session: {dn}");
        ensure!(
            dn["routes"] == routes_before,
            "a refused claim changed the routes: {dn}"
        );
        // The genuine client still works, and client2 asking without a ticket gets a new address.
        let (sent, received) = lab.ping("en1", SERVER, 5, &[])?;
        ensure!(received == sent, "the genuine client lost traffic");
        let fresh = present(lab, "client2", None)?;
        ensure!(
            fresh["answer"] == "leased" && fresh["address"] != taken.to_string(),
            "client2 without a ticket: {fresh}"
        );
        Ok(())
    });
}
