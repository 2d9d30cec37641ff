//! The committed seed corpus: a few valid inputs per target, made with proto's own encoders
//! so that the fuzzer starts from messages that decode and mutates from there. `cargo test`
//! checks that `corpus/<target>/seed-*` holds exactly these; `HOLDFAST_WRITE_SEEDS=1 cargo
//! test` writes them after a format change.

use std::net::Ipv6Addr;

use holdfast_proto::control::{Lease, Message, RefuseCode, MAX_FAILOVER, MAX_REASON};
use holdfast_proto::dn::LeaseRecord;
use holdfast_proto::dns::{DnsSettings, MAX_DOMAIN, MAX_SEARCH};
use holdfast_proto::fd::{LocalMessage, PeerState};
use holdfast_proto::lease::{Lease6, LeaseClaim, LeaseTicket};
use holdfast_proto::peer::{Notice, PeerNotice};
use holdfast_proto::{packet, probe};

use crate::cluster;

/// A seed: its target, its file name (after `seed-`) and its bytes.
pub type Seed = (&'static str, &'static str, Vec<u8>);

/// Unix seconds inside every seed ticket's lifetime.
pub const NOW: u64 = 1_700_000_000;

fn ticket(issuer: &str, address: &str, block: &str) -> LeaseTicket {
    LeaseClaim {
        identity: "laptop-1".into(),
        address: address.parse().unwrap(),
        issuer: issuer.into(),
        block: block.parse().unwrap(),
        issued_at: NOW - 60,
        expires_at: NOW + 3600,
        address6: None,
    }
    .sign(cluster().key_for(issuer))
}

/// A dual-stack ticket of dn1's: an IPv4 and an IPv6 address.
fn dual_ticket() -> LeaseTicket {
    let mut claim = ticket("dn1", "10.200.0.5", "10.200.0.0/25").claim;
    claim.address6 = Some(Lease6 {
        address: "fd00:210::5".parse().unwrap(),
        block: "fd00:210::/49".parse().unwrap(),
    });
    claim.sign(cluster().key_for("dn1"))
}

/// A domain name of the greatest length a lease carries, different for each `i` below 10.
fn longest_domain(i: usize) -> String {
    let label = |n: usize| "a".repeat(n);
    let name = format!("{i}{}.{}.{}.{}", label(62), label(63), label(63), label(61));
    debug_assert_eq!(name.len(), MAX_DOMAIN);
    name
}

fn frames(msgs: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out);
    }
    out
}

fn ipv4(protocol: u8, len: usize, df: bool) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = if df { 0x40 } else { 0 };
    p[8] = 64;
    p[9] = protocol;
    p[12..16].copy_from_slice(&[10, 200, 0, 2]);
    p[16..20].copy_from_slice(&[10, 0, 2, 10]);
    p
}

fn ipv6(next: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    p[6] = next;
    p[7] = 64;
    p[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
    p[24..40].copy_from_slice(&"fd01::9".parse::<Ipv6Addr>().unwrap().octets());
    p
}

/// A TUN read with offloads: the kernel's header (`virtio_net_hdr`), then `pkt` with a TCP or
/// UDP header after its IP header and `payload` bytes of payload.
fn offload_read(gso_type: u8, gso_size: u16, mut pkt: Vec<u8>, payload: usize) -> Vec<u8> {
    let ip = if pkt[0] >> 4 == 6 { 40 } else { 20 };
    let tcp = pkt[if ip == 40 { 6 } else { 9 }] == 6;
    let transport = if tcp { 20 } else { 8 };
    pkt.resize(ip + transport + payload, 0);
    if tcp {
        pkt[ip + 12] = 5 << 4;
        pkt[ip + 13] = 0x18;
    }
    for (i, b) in pkt[ip + transport..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let csum_offset: u16 = if tcp { 16 } else { 6 };
    let mut hdr = vec![1, gso_type];
    for field in [(ip + transport) as u16, gso_size, ip as u16, csum_offset] {
        hdr.extend_from_slice(&field.to_le_bytes());
    }
    [hdr, pkt].concat()
}

/// A TCP segment from port `port` with sequence number `seq`, flags ACK (and PSH where `push`)
/// and `payload` bytes, its checksums right.
fn tcp_segment(mut pkt: Vec<u8>, port: u16, seq: u32, push: bool, payload: usize) -> Vec<u8> {
    let ip = if pkt[0] >> 4 == 6 { 40 } else { 20 };
    pkt.resize(ip + 20 + payload, 0);
    let total = pkt.len();
    if ip == 40 {
        pkt[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    } else {
        pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let c = packet::checksum(&[&pkt[..20]]);
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
    }
    pkt[ip..ip + 2].copy_from_slice(&port.to_be_bytes());
    pkt[ip + 2..ip + 4].copy_from_slice(&80u16.to_be_bytes());
    pkt[ip + 4..ip + 8].copy_from_slice(&seq.to_be_bytes());
    pkt[ip + 12] = 5 << 4;
    pkt[ip + 13] = if push { 0x18 } else { 0x10 };
    for (i, b) in pkt[ip + 20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let addresses = if ip == 40 { 8..40 } else { 12..20 };
    let len = ((total - ip) as u16).to_be_bytes();
    let c = packet::checksum(&[&pkt[addresses], &[0, 6], &len, &pkt[ip..]]);
    pkt[ip + 16..ip + 18].copy_from_slice(&c.to_be_bytes());
    pkt
}

/// Packets for one TUN write call, each behind its length.
fn batch(pkts: &[Vec<u8>]) -> Vec<u8> {
    pkts.iter()
        .flat_map(|p| [(p.len() as u16).to_be_bytes().to_vec(), p.clone()])
        .flatten()
        .collect()
}

fn with_mtu(mtu: u16, pkt: Vec<u8>) -> Vec<u8> {
    [mtu.to_be_bytes().to_vec(), pkt].concat()
}

pub fn all() -> Vec<Seed> {
    let c = cluster();
    let v4 = ticket("dn1", "10.200.0.5", "10.200.0.0/25");
    let lease = Lease {
        ticket: v4.clone(),
        gateway: "10.200.0.1".parse().unwrap(),
        mtu: 1380,
        routes: vec!["10.0.0.0/8".parse().unwrap(), "fd01::/64".parse().unwrap()],
        failover: vec!["dn2".into(), "dn3".into()],
        dns: DnsSettings::default(),
    };
    let alive = PeerNotice {
        from: "dn1".into(),
        sent_at: NOW,
        notice: Notice::Alive {
            dn_up: true,
            seq: 1_700_000_000_123,
        },
    };
    let home = PeerNotice {
        from: "dn2".into(),
        sent_at: NOW,
        notice: Notice::HomeIsBack {
            seq: 1_700_000_000_456,
        },
    };
    let sealed = |n: &PeerNotice| n.seal(c.key_for(&n.from));
    // Mode byte 1 and no clock skew, then the body the check signs itself.
    let body = |n: &PeerNotice| {
        let d = sealed(n);
        [&[1, 0], &d[..d.len() - 64]].concat()
    };
    let record = |identity: &str, address: &str, address6: Option<&str>| {
        LeaseRecord {
            identity: identity.into(),
            address: address.parse().unwrap(),
            expires_at: NOW + 3600,
            address6: address6.map(|a| a.parse().unwrap()),
        }
        .to_line()
            + "\n"
    };
    let mut icmp4 = vec![
        0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
    ];
    icmp4.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    icmp4.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1]);
    icmp4.extend_from_slice(&[10, 0, 0, 2, 0xc3, 0x50, 0x11, 0x51, 0, 8, 0, 0]);
    let mut icmp6 = vec![1, 4, 0, 0, 0, 0, 0, 0];
    icmp6.extend_from_slice(&ipv6(17, 48));
    icmp6[48..52].copy_from_slice(&[0xc3, 0x50, 0x11, 0x51]);
    let mut echo_request = ipv4(1, 84, true);
    echo_request[20] = 8;
    vec![
        (
            "control",
            "attach",
            frames(&[Message::Attach { ticket: None }]),
        ),
        (
            "control",
            "attach-ticket",
            frames(&[Message::Attach {
                ticket: Some(v4.clone()),
            }]),
        ),
        (
            "control",
            "leased",
            frames(&[Message::Leased(lease.clone())]),
        ),
        // The longest lists and reason the protocol allows: one step from the limits.
        (
            "control",
            "longest",
            frames(&[
                Message::Leased(Lease {
                    failover: (0..MAX_FAILOVER).map(|i| format!("dn{i}")).collect(),
                    dns: DnsSettings {
                        servers: vec![
                            "10.0.2.53".parse().unwrap(),
                            "fd00::53".parse().unwrap(),
                            "10.0.3.53".parse().unwrap(),
                        ],
                        search: (0..MAX_SEARCH).map(longest_domain).collect(),
                    },
                    ..lease.clone()
                }),
                Message::Refused {
                    code: RefuseCode::PoolExhausted,
                    reason: "é".repeat(MAX_REASON / 2),
                },
            ]),
        ),
        (
            "control",
            "leased-dual",
            frames(&[Message::Leased(Lease {
                ticket: dual_ticket(),
                ..lease.clone()
            })]),
        ),
        (
            "control",
            "leased-dns",
            frames(&[Message::Leased(Lease {
                dns: DnsSettings {
                    servers: vec!["10.0.2.53".parse().unwrap()],
                    search: vec!["corp.example".into()],
                },
                ..lease.clone()
            })]),
        ),
        (
            "control",
            "stream",
            frames(&[
                Message::Refused {
                    code: RefuseCode::BadTicket,
                    reason: "ticket expired".into(),
                },
                Message::Promoted,
                Message::HomeIsBack,
                Message::Demote,
                Message::PeerDown { dn: "dn2".into() },
                Message::Switch,
            ]),
        ),
        ("lease_ticket", "v4", v4.encode()),
        ("lease_ticket", "dual", dual_ticket().encode()),
        (
            "lease_ticket",
            "v6",
            ticket("dn2", "fd00:200::5", "fd00:200::/64").encode(),
        ),
        (
            "lease_ticket",
            "unknown-issuer",
            ticket("dn9", "10.200.0.5", "10.200.0.0/25").encode(),
        ),
        (
            "lease_ticket",
            "no-pool",
            ticket("dn3", "10.203.0.5", "10.203.0.0/25").encode(),
        ),
        ("peer_notice", "alive", [&[0], &sealed(&alive)[..]].concat()),
        ("peer_notice", "home", [&[0], &sealed(&home)[..]].concat()),
        ("peer_notice", "alive-body", body(&alive)),
        ("peer_notice", "home-body", body(&home)),
        (
            "local_message",
            "heartbeat",
            LocalMessage::Heartbeat {
                pid: 4242,
                forwarded: 7,
                handled: 3,
            }
            .encode()
            .into_bytes(),
        ),
        (
            "local_message",
            "fault",
            LocalMessage::Fault {
                pid: 4242,
                reason: "TUN reader stopped: EIO".into(),
            }
            .encode()
            .into_bytes(),
        ),
        (
            "local_message",
            "peer",
            LocalMessage::Peer {
                dn: "dn2".into(),
                state: PeerState::DnDown,
            }
            .encode()
            .into_bytes(),
        ),
        (
            "lease_record",
            "v4",
            record("laptop-1", "10.200.0.5", None).into_bytes(),
        ),
        (
            "lease_record",
            "v6",
            record("CN=é ü", "fd00:200::5", None).into_bytes(),
        ),
        (
            "lease_record",
            "dual",
            record("laptop-1", "10.200.0.5", Some("fd00:210::5")).into_bytes(),
        ),
        ("packet", "v4-tcp-df", with_mtu(1380, ipv4(6, 60, true))),
        ("packet", "v4-echo", with_mtu(40, echo_request)),
        ("packet", "v6-udp", with_mtu(1280, ipv6(17, 80))),
        (
            "packet",
            "probe",
            with_mtu(1380, probe::encode_probe(7).to_vec()),
        ),
        (
            "packet",
            "echo",
            with_mtu(
                1380,
                probe::echo_for(&probe::encode_probe(7)).unwrap().to_vec(),
            ),
        ),
        ("icmp", "v4-port-unreachable", icmp4),
        ("icmp", "v6-port-unreachable", icmp6),
        (
            "offload",
            "tcp4-gso",
            offload_read(1, 1348, ipv4(6, 20, true), 4000),
        ),
        (
            "offload",
            "udp6-gso",
            offload_read(5, 1200, ipv6(17, 40), 2500),
        ),
        (
            "offload",
            "tcp4-partial",
            offload_read(0, 0, ipv4(6, 20, true), 100),
        ),
        (
            "coalesce",
            "tcp4-two-flows-and-udp",
            batch(&[
                tcp_segment(ipv4(6, 20, true), 40000, 0, false, 1000),
                tcp_segment(ipv4(6, 20, true), 40001, 0, false, 1000),
                tcp_segment(ipv4(6, 20, true), 40000, 1000, false, 1000),
                ipv4(17, 60, true),
                tcp_segment(ipv4(6, 20, true), 40000, 2000, true, 500),
                tcp_segment(ipv4(6, 20, true), 40001, 1000, false, 1000),
            ]),
        ),
        (
            "coalesce",
            "tcp6",
            batch(&[
                tcp_segment(ipv6(6, 40), 40000, 7, false, 1200),
                tcp_segment(ipv6(6, 40), 40000, 1207, false, 1200),
                tcp_segment(ipv6(6, 40), 40000, 2407, false, 1200),
            ]),
        ),
    ]
}
