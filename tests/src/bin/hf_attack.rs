//! The attacker of `lab attack`: what a hostile host, or a client with a valid certificate,
//! can send a DN. Each subcommand does one thing and prints one JSON object on stdout.
//!
//! Certificates are issued in memory by the lab's client CA (`--pki`), with any common name,
//! including ones the product's own `dn pki` would refuse.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use holdfast_lab::session::{attach, parse_dn, Attached};
use holdfast_proto::control::Message;
use holdfast_proto::lease::{parse_signing_key, LeaseClaim, LeaseTicket};
use holdfast_proto::peer::{Notice, PeerNotice};
use holdfast_shell::quic::send_message;
use holdfast_shell::{quic, tls, unix_now};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Attack a Holdfast DN (test tool of the Holdfast lab; `lab attack` runs it).
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Who the attacker is towards a DN: a certificate from the lab's client CA, and the DN.
#[derive(clap::Args, Clone)]
struct Client {
    /// The lab's PKI directory (client CA certificate and key, server CA).
    #[arg(long)]
    pki: PathBuf,
    /// The DN: NAME=ADDRESS:PORT.
    #[arg(long, value_parser = parse_dn)]
    dn: (String, SocketAddr),
    /// The certificate's common name (the client identity), escapes like \n allowed.
    #[arg(long)]
    cn: String,
    /// A lease ticket to present, in hex; none: ask for a fresh lease.
    #[arg(long)]
    ticket_hex: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Attach (fresh lease or ticket), print the address and ticket, leave.
    Lease(Client),
    /// Send COUNT valid QUIC Initials (real ClientHellos, right ALPN, fresh connection IDs) as
    /// fast as possible, answering nothing.
    InitialFlood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        server_name: String,
        #[arg(long)]
        count: usize,
        /// Send the batch this many times (new connection IDs each round).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Local addresses to send from, in turn (repeatable); none: the system's choice.
        #[arg(long = "from")]
        from: Vec<IpAddr>,
    },
    /// Open CONNECTIONS connections with one certificate, never attach, hold them.
    ConnFlood {
        #[command(flatten)]
        client: Client,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 3)]
        hold_secs: u64,
    },
    /// Attach, then never read the control stream while asking for answers (Switch, Demote,
    /// ...); report how the DN ended the session.
    NoRead {
        #[command(flatten)]
        client: Client,
        #[arg(long, default_value_t = 400)]
        switches: usize,
        #[arg(long, default_value_t = 15)]
        wait_secs: u64,
    },
    /// Attach with the ticket and send a packet (promoted), then attach again with the same
    /// ticket (the older session is replaced), then leave.
    Reattach {
        #[command(flatten)]
        client: Client,
        /// Destination of the data packet sent through the first session.
        #[arg(long)]
        packet_to: IpAddr,
    },
    /// Attach with the ticket and send a packet every 200 ms for SECS seconds.
    Pull {
        #[command(flatten)]
        client: Client,
        #[arg(long)]
        packet_to: IpAddr,
        #[arg(long, default_value_t = 3)]
        secs: u64,
    },
    /// Sign a lease ticket with KEY as ISSUER (a DN key the attacker holds).
    ForgeTicket {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        identity: String,
        #[arg(long)]
        address: IpAddr,
        #[arg(long)]
        block: ipnet::IpNet,
        #[arg(long, default_value_t = 3600)]
        lifetime_secs: u64,
    },
    /// Sign one "home is back" notice from FROM with its KEY and send the same datagram COUNT
    /// times (a capture replayed).
    ReplayNotice {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 2)]
        count: usize,
        #[arg(long, default_value_t = 300)]
        gap_ms: u64,
        /// Sequence number the notice carries.
        #[arg(long, default_value_t = 1)]
        seq: u64,
    },
}

/// How long `lease` waits for the DN's answer.
const LEASE_WITHIN: Duration = Duration::from_secs(15);

/// A client certificate from the lab's client CA with common name `cn`, unchecked.
fn issue(pki: &Path, cn: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let read = |f: &str| {
        std::fs::read_to_string(pki.join(f))
            .with_context(|| format!("cannot read {}", pki.join(f).display()))
    };
    let ca_key = KeyPair::from_pem(&read("client-ca.key.pem")?)?;
    let ca = Issuer::from_ca_cert_pem(&read("client-ca.pem")?, ca_key)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

/// `\n`, `\r`, `\t`, `\e` and `\\` in a command-line argument, as the characters.
fn unescape(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('e') => out.push('\x1b'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

struct Conn {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    dn: (String, SocketAddr),
    ticket: Option<LeaseTicket>,
}

fn connector(client: &Client, tune: impl FnOnce(&mut quinn::TransportConfig)) -> Result<Conn> {
    let (cert, key) = issue(&client.pki, &unescape(&client.cn))?;
    let roots = tls::roots(&client.pki.join("server-ca.pem"))?;
    let tls = tls::client_config_with(
        roots,
        vec![CertificateDer::from(cert)],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    )?;
    let mut config = quic::client_config(tls, quic::MAX_IDLE_TIMEOUT)?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        30_000,
    ))));
    tune(&mut transport);
    config.transport_config(Arc::new(transport));
    let ticket = holdfast_lab::session::ticket_from_hex(client.ticket_hex.as_deref())?;
    Ok(Conn {
        endpoint: quic::endpoint("0.0.0.0:0".parse()?, None, None)?,
        config,
        dn: client.dn.clone(),
        ticket,
    })
}

impl Conn {
    async fn attach(&self) -> Result<Attached> {
        attach(
            &self.endpoint,
            self.config.clone(),
            &self.dn,
            self.ticket.clone(),
        )
        .await
    }
}

/// An IPv4/UDP packet from `src` to `dst`, as a client's application would send.
fn udp_packet(src: IpAddr, dst: IpAddr) -> Result<bytes::Bytes> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        bail!("the attacker builds IPv4 packets only");
    };
    let payload = b"holdfast lab attack";
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
    ]);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = holdfast_proto::packet::checksum(&[&p]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp_len = (8 + payload.len()) as u16;
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&9u16.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    Ok(bytes::Bytes::from(p))
}

/// Waits up to `within` for `Promoted` on the session's control stream.
async fn promoted(session: &mut Attached, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            match session.reader.next().await {
                Ok(Some(Message::Promoted)) => return true,
                Ok(Some(_)) => {}
                _ => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

async fn lease(client: Client) -> Result<serde_json::Value> {
    let conn = connector(&client, |_| {})?;
    let started = Instant::now();
    let attached = tokio::time::timeout(LEASE_WITHIN, conn.attach())
        .await
        .unwrap_or_else(|_| Err(anyhow!("no lease within {LEASE_WITHIN:?}")));
    Ok(match attached {
        Ok(s) => {
            let json = serde_json::json!({
                "answer": "leased",
                "address": s.ticket.claim.address,
                "expires_at": s.ticket.claim.expires_at,
                "ticket_hex": hex::encode(s.ticket.encode()),
                "seconds": started.elapsed().as_secs_f64(),
            });
            s.conn.close(0u32.into(), b"done");
            conn.endpoint.wait_idle().await;
            json
        }
        Err(e) => serde_json::json!({"answer": "refused", "detail": format!("{e:#}")}),
    })
}

/// Builds the Initials first (the ClientHellos cost the sender), then sends them all at once.
fn initial_flood(
    to: SocketAddr,
    server_name: &str,
    count: usize,
    rounds: usize,
    from: &[IpAddr],
) -> Result<serde_json::Value> {
    let roots = rustls::RootCertStore::empty();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![holdfast_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("TLS config unusable for QUIC")?;
    let config = quinn_proto::ClientConfig::new(Arc::new(crypto));
    let sockets = if from.is_empty() {
        vec![std::net::UdpSocket::bind("0.0.0.0:0")?]
    } else {
        from.iter()
            .map(|ip| {
                std::net::UdpSocket::bind(SocketAddr::new(*ip, 0))
                    .with_context(|| format!("cannot bind {ip}"))
            })
            .collect::<Result<_>>()?
    };
    let (mut sent, mut built_secs, mut send_secs) = (0usize, 0.0, 0.0);
    for _ in 0..rounds {
        let started = Instant::now();
        let mut endpoint = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            true,
            None,
        );
        let mut datagrams = Vec::with_capacity(count);
        for _ in 0..count {
            let now = Instant::now();
            let (_, mut conn) = endpoint
                .connect(now, config.clone(), to, server_name)
                .context("cannot build an Initial")?;
            let mut buf = Vec::new();
            if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
                buf.truncate(t.size);
                datagrams.push(buf);
            }
        }
        built_secs += started.elapsed().as_secs_f64();
        let sending = Instant::now();
        for (d, socket) in datagrams.iter().zip(sockets.iter().cycle()) {
            if socket.send_to(d, to).is_ok() {
                sent += 1;
            }
        }
        send_secs += sending.elapsed().as_secs_f64();
    }
    Ok(serde_json::json!({"sent": sent, "build_seconds": built_secs, "send_seconds": send_secs}))
}

async fn conn_flood(
    client: Client,
    connections: usize,
    hold: Duration,
) -> Result<serde_json::Value> {
    let conn = Arc::new(connector(&client, |_| {})?);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let conn = conn.clone();
        tasks.spawn(async move {
            let c = conn
                .endpoint
                .connect_with(conn.config.clone(), conn.dn.1, &conn.dn.0)?
                .await?;
            // A connection the DN closes at once counts as refused.
            tokio::select! {
                _ = c.closed() => Ok::<_, anyhow::Error>(None),
                _ = tokio::time::sleep(hold) => Ok(Some(c)),
            }
        });
    }
    let (mut held, mut closed, mut failed) = (Vec::new(), 0, 0);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(Some(c))) => held.push(c),
            Ok(Ok(None)) => closed += 1,
            _ => failed += 1,
        }
    }
    let still_open = held.iter().filter(|c| c.close_reason().is_none()).count();
    Ok(serde_json::json!({
        "asked": connections,
        "held_for_the_period": still_open,
        "closed_by_dn": closed + held.len() - still_open,
        "failed": failed,
    }))
}

async fn no_read(client: Client, switches: usize, wait: Duration) -> Result<serde_json::Value> {
    // A tiny receive window: the DN's answers fill it at once.
    let conn = connector(&client, |t| {
        t.stream_receive_window(256u32.into());
        t.receive_window(1024u32.into());
    })?;
    let mut s = conn.attach().await?;
    let started = Instant::now();
    let mut written = 0;
    for _ in 0..switches {
        if send_message(&mut s.send, &Message::Switch).await.is_err()
            || send_message(&mut s.send, &Message::Demote).await.is_err()
        {
            break;
        }
        written += 1;
    }
    let closed = tokio::time::timeout(wait, s.conn.closed()).await;
    Ok(serde_json::json!({
        "switches_sent": written,
        "closed_by_dn": closed.is_ok(),
        "after_seconds": started.elapsed().as_secs_f64(),
        "reason": closed.map(|r| r.to_string()).unwrap_or_default(),
    }))
}

async fn reattach(client: Client, packet_to: IpAddr) -> Result<serde_json::Value> {
    let conn = connector(&client, |_| {})?;
    let mut first = conn.attach().await?;
    let address = first.ticket.claim.address;
    first.conn.send_datagram(udp_packet(address, packet_to)?)?;
    let was_promoted = promoted(&mut first, Duration::from_secs(2)).await;
    let second = conn.attach().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first_closed = first.conn.close_reason().map(|r| r.to_string());
    second.conn.close(0u32.into(), b"done");
    first.conn.close(0u32.into(), b"done");
    conn.endpoint.wait_idle().await;
    Ok(serde_json::json!({
        "address": address,
        "first_promoted": was_promoted,
        "first_closed_by_dn": first_closed,
    }))
}

async fn pull(client: Client, packet_to: IpAddr, secs: u64) -> Result<serde_json::Value> {
    let conn = connector(&client, |_| {})?;
    let mut s = conn.attach().await?;
    let address = s.ticket.claim.address;
    let packet = udp_packet(address, packet_to)?;
    let mut was_promoted = false;
    for _ in 0..secs * 5 {
        s.conn.send_datagram(packet.clone())?;
        was_promoted |= promoted(&mut s, Duration::from_millis(200)).await;
    }
    Ok(serde_json::json!({"address": address, "promoted": was_promoted}))
}

fn forge_ticket(
    key: &Path,
    issuer: String,
    identity: String,
    address: IpAddr,
    block: ipnet::IpNet,
    lifetime_secs: u64,
) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
    let key = parse_signing_key(&text).map_err(|e| anyhow!("{}: {e}", key.display()))?;
    let now = unix_now();
    let ticket = LeaseClaim {
        identity,
        address,
        issuer,
        block,
        issued_at: now,
        expires_at: now + lifetime_secs,
        address6: None,
    }
    .sign(&key);
    Ok(serde_json::json!({"ticket_hex": hex::encode(ticket.encode())}))
}

fn replay_notice(
    key: &Path,
    from: String,
    to: SocketAddr,
    count: usize,
    gap: Duration,
    seq: u64,
) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
    let key = parse_signing_key(&text).map_err(|e| anyhow!("{}: {e}", key.display()))?;
    let datagram = PeerNotice {
        from,
        sent_at: unix_now(),
        notice: Notice::HomeIsBack { seq },
    }
    .seal(&key);
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(gap);
        }
        socket.send_to(&datagram, to)?;
    }
    Ok(serde_json::json!({"sent": count}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let json = match Cli::parse().command {
        Command::Lease(client) => lease(client).await?,
        Command::InitialFlood {
            to,
            server_name,
            count,
            rounds,
            from,
        } => initial_flood(to, &server_name, count, rounds, &from)?,
        Command::ConnFlood {
            client,
            connections,
            hold_secs,
        } => conn_flood(client, connections, Duration::from_secs(hold_secs)).await?,
        Command::NoRead {
            client,
            switches,
            wait_secs,
        } => no_read(client, switches, Duration::from_secs(wait_secs)).await?,
        Command::Reattach { client, packet_to } => reattach(client, packet_to).await?,
        Command::Pull {
            client,
            packet_to,
            secs,
        } => pull(client, packet_to, secs).await?,
        Command::ForgeTicket {
            key,
            issuer,
            identity,
            address,
            block,
            lifetime_secs,
        } => forge_ticket(&key, issuer, identity, address, block, lifetime_secs)?,
        Command::ReplayNotice {
            key,
            from,
            to,
            count,
            gap_ms,
            seq,
        } => replay_notice(&key, from, to, count, Duration::from_millis(gap_ms), seq)?,
    };
    println!("{json}");
    Ok(())
}
