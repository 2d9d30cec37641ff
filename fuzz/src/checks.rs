//! One check per target. Each decodes its input the way the product does and, where the value
//! has an encoder, asserts that encoding it gives the input back (or a value that decodes to the
//! same thing), so that a decoder that accepts something its encoder cannot say is a finding too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ed25519_dalek::Signer;
use holdfast_proto::coalesce::{Coalescer, MAX_WRITE_HEADER};
use holdfast_proto::control::Message;
use holdfast_proto::dn::LeaseRecord;
use holdfast_proto::fd::LocalMessage;
use holdfast_proto::lease::{LeaseClaim, LeaseTicket, TicketError};
use holdfast_proto::offload::{self, Gso, OffloadHeader, OFFLOAD_HEADER_LEN};
use holdfast_proto::packet::{self, PortUnreachable};
use holdfast_proto::peer::{Freshness, Notice, PeerError, PeerNotice, MAX_AGE_SECS};
use holdfast_proto::probe;

use crate::cluster;

/// Control frames back to back, as `shell::quic::ControlReader` takes them off the stream.
pub fn control(data: &[u8]) {
    let mut at = 0;
    while let Ok(Some((msg, used))) = Message::decode(&data[at..]) {
        assert!(used >= 3 && at + used <= data.len(), "used {used} at {at}");
        let frame = &data[at..at + used];
        let mut again = Vec::new();
        msg.encode(&mut again);
        assert_eq!(again, frame, "{msg:?} does not encode back to its frame");
        assert_eq!(Message::decode(&again), Ok(Some((msg, used))));
        // The reader waits for more bytes on a partial frame; it must never decode one.
        assert_eq!(Message::decode(&frame[..used - 1]), Ok(None));
        at += used;
    }
}

/// A ticket as an EN presents it. The fuzzer cannot sign, so the claim it made is also signed
/// with the key of the DN it names, and both tickets are verified against what the claim says.
pub fn lease_ticket(data: &[u8]) {
    let Ok(ticket) = LeaseTicket::decode(data) else {
        return;
    };
    assert_eq!(ticket.encode(), data, "{ticket:?} does not encode back");
    let c = cluster();
    let claim = &ticket.claim;
    let resigned = claim.clone().sign(c.key_for(&claim.issuer));
    assert_eq!(
        LeaseTicket::decode(&resigned.encode()).as_ref(),
        Ok(&resigned)
    );
    let other = format!("not-{}", claim.identity);
    for now in [
        0,
        claim.issued_at,
        claim.expires_at.saturating_sub(1),
        claim.expires_at,
        u64::MAX,
    ] {
        let expected = verdict(claim, now);
        let got = resigned.verify(&c.keys, now).cloned();
        assert_eq!(got.as_ref().map(|_| ()), expected.as_ref().map(|_| ()));
        if let Ok(back) = got {
            assert_eq!(&back, claim);
        }
        assert_eq!(
            resigned
                .verify_for(&c.keys, &claim.identity, now)
                .map(|_| ()),
            expected
        );
        let wrong = resigned.verify_for(&c.keys, &other, now).map(|_| ());
        match expected {
            Ok(()) => assert!(
                matches!(wrong, Err(TicketError::WrongIdentity { .. })),
                "{wrong:?}"
            ),
            Err(_) => assert_eq!(wrong, expected),
        }
        // The fuzzer's own signature is checked first: it is either bad or, for a ticket it
        // replayed from a seed, as good as the re-signed one.
        match ticket.verify(&c.keys, now) {
            Err(TicketError::BadSignature(issuer)) => {
                assert_eq!(issuer, claim.issuer);
                assert!(c.keys.get(&issuer).is_some());
            }
            other => assert_eq!(other.map(|_| ()), expected),
        }
    }
}

/// What verifying a correctly signed ticket for `claim` must say at `now`.
fn verdict(claim: &LeaseClaim, now: u64) -> Result<(), TicketError> {
    if cluster().keys.get(&claim.issuer).is_none() {
        Err(TicketError::UnknownIssuer(claim.issuer.clone()))
    } else if now >= claim.expires_at {
        Err(TicketError::Expired {
            expires_at: claim.expires_at,
            now,
        })
    } else if !claim.block.contains(&claim.address) {
        Err(TicketError::AddressOutsideBlock {
            address: claim.address,
            block: claim.block,
        })
    } else if let Some(v6) = claim
        .address6
        .filter(|v6| !v6.block.contains(&IpAddr::V6(v6.address)))
    {
        Err(TicketError::AddressOutsideBlock {
            address: v6.address.into(),
            block: v6.block,
        })
    } else {
        let keys = &cluster().keys;
        let outside = |block, pool| TicketError::OutsideIssuerPool {
            issuer: claim.issuer.clone(),
            block,
            pool,
        };
        match keys.pool(&claim.issuer) {
            // The block must be a subnet of the issuer's pool (ipnet's own test of that).
            Some(pool) if !pool.contains(&claim.block) => Err(outside(claim.block, pool)),
            // A DN whose pools are known vouches for an IPv6 address only in its IPv6 pool.
            Some(_) => match (claim.address6, keys.pool6(&claim.issuer)) {
                (None, _) => Ok(()),
                (Some(v6), None) => Err(TicketError::NoIpv6Pool {
                    issuer: claim.issuer.clone(),
                    block: v6.block,
                }),
                (Some(v6), Some(pool6)) if !pool6.contains(&v6.block) => {
                    Err(outside(v6.block, pool6))
                }
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }
}

/// `proto::peer`'s signing context, which is private there. A drift shows at once: every signed
/// input would fail with `BadSignature`, which [`peer_signed`] treats as a finding.
const PEER_SIGNING_CONTEXT: &[u8] = b"holdfast peer notice v1\0";

/// A datagram on a DN's or a detector's peer port. The first byte picks how the rest is used:
/// even, as the datagram itself (only a replayed seed has a good signature); odd, as a second
/// byte that moves the receiver's clock and then a notice body, which the check signs with the
/// key of the DN it names, so that the fuzzer reaches everything after the signature check.
/// What opens is then put to a receiver's [`Freshness`].
pub fn peer_notice(data: &[u8]) {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 0 => peer_datagram(rest),
        Some((_, [skew, body @ ..])) => peer_signed(*skew as i8, body),
        _ => {}
    }
}

/// Where `sent_at` sits in a notice: after the magic, the version and the kind.
fn sent_at(datagram: &[u8]) -> u64 {
    datagram
        .get(6..14)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()))
}

fn peer_datagram(datagram: &[u8]) {
    let c = cluster();
    let claimed = PeerNotice::claimed_sender(datagram);
    match PeerNotice::open(datagram, &c.keys) {
        Ok(n) => {
            assert_eq!(claimed.as_deref(), Some(n.from.as_str()));
            // The body is canonical; the signature is whatever valid one the sender chose.
            let sealed = n.seal(c.key_for(&n.from));
            assert_eq!(sealed.len(), datagram.len());
            let body = datagram.len() - 64;
            assert_eq!(sealed[..body], datagram[..body], "{n:?}");
            freshness(&n, n.sent_at);
        }
        Err(PeerError::Malformed(_)) => {}
        Err(e) => assert!(claimed.is_some(), "{e} yet no sender could be read"),
    }
}

fn peer_signed(skew: i8, body: &[u8]) {
    let c = cluster();
    let claimed = PeerNotice::claimed_sender(body);
    let key = c.key_for(claimed.as_deref().unwrap_or(""));
    let mut signed = PEER_SIGNING_CONTEXT.to_vec();
    signed.extend_from_slice(body);
    let mut datagram = body.to_vec();
    datagram.extend_from_slice(&key.sign(&signed).to_bytes());
    let opened = PeerNotice::open(&datagram, &c.keys);
    let Some(from) = claimed else {
        assert!(matches!(opened, Err(PeerError::Malformed(_))), "{opened:?}");
        return;
    };
    match opened {
        // The body is not exactly one notice: the signature is then read from the wrong place.
        Err(PeerError::Malformed(_)) => {}
        Err(PeerError::UnknownPeer(p)) => {
            assert_eq!(p, from);
            assert!(c.keys.get(&from).is_none());
        }
        Err(e) => panic!("{e}: a notice signed with {from:?}'s own key"),
        Ok(n) => {
            assert_eq!(n.from, from);
            assert_eq!(n.sent_at, sent_at(body));
            assert!(c.keys.get(&from).is_some());
            // Ed25519 signs deterministically: the same notice seals to the same datagram.
            assert_eq!(n.seal(key), datagram, "{n:?}");
            freshness(&n, n.sent_at.saturating_add_signed(i64::from(skew)));
        }
    }
}

/// A receiver that has heard nothing from the sender yet takes `n` at `now` if `now` is close
/// to the time it was sent; once it has taken one, it takes only higher sequences, whatever the
/// clocks say.
fn freshness(n: &PeerNotice, now: u64) {
    let mut fresh = Freshness::default();
    let age = now.abs_diff(n.sent_at);
    match fresh.take(n, now) {
        Ok(()) => assert!(age <= MAX_AGE_SECS, "taken {age} s off the clock"),
        Err(PeerError::Stale { from, age: a }) => {
            assert_eq!((from.as_str(), a), (n.from.as_str(), age));
            assert!(age > MAX_AGE_SECS);
            return;
        }
        Err(e) => panic!("{e}: the first notice from {}", n.from),
    }
    assert_eq!(fresh.last(&n.from), Some(n.notice.seq()));
    assert!(
        matches!(fresh.take(n, now), Err(PeerError::Replayed { .. })),
        "{n:?} taken twice"
    );
    let Some(seq) = n.notice.seq().checked_add(1) else {
        return;
    };
    let next = PeerNotice {
        sent_at: n.sent_at.wrapping_add(1 << 40),
        notice: match n.notice {
            Notice::HomeIsBack { .. } => Notice::HomeIsBack { seq },
            Notice::Alive { dn_up, .. } => Notice::Alive { dn_up, seq },
        },
        ..n.clone()
    };
    assert_eq!(fresh.take(&next, now), Ok(()), "{next:?} after {n:?}");
}

/// A datagram on the local socket between a DN and its detector.
pub fn local_message(data: &[u8]) {
    let Some(m) = LocalMessage::decode(data) else {
        return;
    };
    let text = m.encode();
    assert_eq!(
        LocalMessage::decode(text.as_bytes()).as_ref(),
        Some(&m),
        "{m:?} encodes to {text:?}"
    );
}

/// A line of the DN's lease journal, read back at start. Both ways: the line as the fuzzer
/// wrote it, and a record built from the same bytes, written as the journal writes it.
pub fn lease_record(data: &[u8]) {
    if let Some(r) = std::str::from_utf8(data)
        .ok()
        .and_then(LeaseRecord::from_line)
    {
        let line = r.to_line();
        assert_eq!(LeaseRecord::from_line(&line).as_ref(), Some(&r), "{line:?}");
    }
    if let Some(r) = record_from(data) {
        let line = r.to_line() + "\n";
        assert!(!line.trim_end_matches('\n').contains('\n'), "{line:?}");
        assert_eq!(LeaseRecord::from_line(&line), Some(r), "{line:?}");
    }
}

/// A record made of raw bytes: expiry, an address family byte and address, with bit 1 of that
/// byte an IPv6 address (dual stack), then the identity.
fn record_from(data: &[u8]) -> Option<LeaseRecord> {
    let (expires, rest) = data.split_first_chunk::<8>()?;
    let (family, rest) = rest.split_first()?;
    let (address, rest): (IpAddr, _) = if family & 1 == 0 {
        let (a, rest) = rest.split_first_chunk::<4>()?;
        (Ipv4Addr::from(*a).into(), rest)
    } else {
        let (a, rest) = rest.split_first_chunk::<16>()?;
        (Ipv6Addr::from(*a).into(), rest)
    };
    let (address6, identity) = if family & 2 == 0 {
        (None, rest)
    } else {
        let (a, rest) = rest.split_first_chunk::<16>()?;
        (Some(Ipv6Addr::from(*a)), rest)
    };
    Some(LeaseRecord {
        identity: String::from_utf8_lossy(identity).into_owned(),
        address,
        expires_at: u64::from_be_bytes(*expires),
        address6,
    })
}

/// A QUIC datagram or TUN packet on the data path: an MTU (two bytes), then the datagram. The
/// data path tells probes from IP packets, reads addresses, and answers oversized packets with
/// ICMP; the answer is checked against the RFCs independently of `proto::packet`.
pub fn packet(data: &[u8]) {
    let Some((mtu, pkt)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mtu = u16::from_be_bytes(*mtu);
    probes(pkt);
    let addrs = packet::addresses(pkt);
    assert_eq!(packet::source(pkt), addrs.map(|a| a.0));
    assert_eq!(packet::destination(pkt), addrs.map(|a| a.1));
    if probe::is_probe(pkt) {
        assert_eq!(addrs, None, "a probe read as an IP packet");
    }
    let _ = packet::dont_fragment(pkt);
    let mut out = vec![0xaa; 7];
    if !packet::packet_too_big(pkt, mtu, &mut out) {
        assert!(out.is_empty());
        return;
    }
    let (src, dst) = addrs.expect("an answer about a packet without addresses");
    assert_eq!(packet::addresses(&out), Some((dst, src)));
    // RFC 1122 3.2.2, RFC 4443 2.4: an error goes from and to unicast addresses only, and
    // never about an error, so the answer itself is not answered.
    for a in [src, dst] {
        assert!(unicast(a), "an ICMP error between {dst} and {src}");
    }
    let mut again = Vec::new();
    assert!(!packet::packet_too_big(&out, mtu, &mut again));
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            assert!(out.len() <= 576);
            assert_eq!(&out[..2], [0x45, 0]);
            assert_eq!(usize::from(u16::from_be_bytes([out[2], out[3]])), out.len());
            assert_eq!(out[9], 1);
            assert_eq!(checksum(&[&out[..20]]), 0, "IPv4 header checksum");
            assert_eq!(checksum(&[&out[20..]]), 0, "ICMP checksum");
            assert_eq!(&out[20..22], [3, 4]);
            assert_eq!(u16::from_be_bytes([out[26], out[27]]), mtu);
            assert_eq!(&out[28..], &pkt[..pkt.len().min(576 - 28)]);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            assert!(out.len() <= 1280);
            assert_eq!(out[0], 0x60);
            let payload = usize::from(u16::from_be_bytes([out[4], out[5]]));
            assert_eq!(payload, out.len() - 40);
            assert_eq!(out[6], 58);
            let len = (payload as u32).to_be_bytes();
            let sum = checksum(&[&d.octets(), &s.octets(), &len, &[0, 0, 0, 58], &out[40..]]);
            assert_eq!(sum, 0, "ICMPv6 checksum");
            assert_eq!(&out[40..42], [2, 0]);
            let announced = u32::from_be_bytes(out[44..48].try_into().unwrap());
            assert_eq!(announced, u32::from(mtu.max(1280)));
            assert_eq!(&out[48..], &pkt[..pkt.len().min(1280 - 48)]);
        }
        _ => panic!("addresses of two families: {src}, {dst}"),
    }
}

/// A TUN read with offloads: the kernel's header, then a packet or a super-packet. Every byte
/// of the payload goes out once and in order, in packets no longer than a segment allows, with
/// lengths and checksums right by this file's own checksum; a packet not to be cut goes out as
/// it came, its checksum field aside.
pub fn offload(data: &[u8]) {
    let Ok(hdr) = OffloadHeader::decode(data) else {
        return;
    };
    let original = &data[OFFLOAD_HEADER_LEN..];
    let mut input = original.to_vec();
    let mut out: Vec<(usize, Vec<u8>)> = Vec::new();
    let result = offload::split(&hdr, &mut input, |h, p| {
        out.push((h.len(), [h, p].concat()))
    });
    let Ok(n) = result else {
        assert!(out.is_empty(), "packets emitted before an error");
        return;
    };
    assert_eq!(n, out.len());
    let ip_len = usize::from(hdr.csum_start);
    if hdr.gso == Gso::None {
        let [(_, pkt)] = out.as_slice() else {
            panic!("{} packets from one not to be cut", out.len());
        };
        assert_eq!(pkt.len(), original.len());
        let field = ip_len + usize::from(hdr.csum_offset);
        for (i, (a, b)) in pkt.iter().zip(original).enumerate() {
            assert!(a == b || (hdr.needs_checksum && (i == field || i == field + 1)));
        }
        return;
    }
    let Some((headers, _)) = out.first() else {
        assert!(original.len() <= ip_len + 60, "a payload and no packet");
        return;
    };
    let headers = *headers;
    let (v6, protocol) = match hdr.gso {
        Gso::TcpV6 => (true, 6),
        Gso::TcpV4 => (false, 6),
        _ => (original[0] >> 4 == 6, 17),
    };
    let addresses = if v6 {
        &original[8..40]
    } else {
        &original[12..20]
    };
    let mut carried = Vec::new();
    for (h, pkt) in &out {
        assert_eq!(*h, headers);
        assert!(pkt.len() > headers && pkt.len() <= headers + usize::from(hdr.gso_size));
        let ip_field = usize::from(u16::from_be_bytes([
            pkt[2 + 2 * usize::from(v6)],
            pkt[3 + 2 * usize::from(v6)],
        ]));
        assert_eq!(ip_field, if v6 { pkt.len() - 40 } else { pkt.len() });
        if !v6 {
            assert_eq!(checksum(&[&pkt[..ip_len]]), 0, "IPv4 header checksum");
        }
        let len = ((pkt.len() - ip_len) as u16).to_be_bytes();
        let sum = checksum(&[addresses, &[0, protocol], &len, &pkt[ip_len..]]);
        assert_eq!(sum, 0, "transport checksum");
        carried.extend_from_slice(&pkt[headers..]);
    }
    assert_eq!(carried, &original[headers..]);
}

/// A batch of packets for one TUN write call, each `length: u16, bytes` (a short last one is
/// cut to what is there). Every packet is written exactly once; each TCP and UDP flow's packets
/// in their order; a packet alone goes out untouched, and a merged write, cut again as the kernel
/// cuts it, gives back exactly its packets but for IPv4's identification and header checksum,
/// which the cut makes anew.
pub fn coalesce(data: &[u8]) {
    let pkts = batch(data);
    let mut c = Coalescer::default();
    let mut written = vec![false; pkts.len()];
    let mut order = Vec::new();
    for k in 0..c.plan(&pkts, true) {
        let members: Vec<usize> = c.indices(k).collect();
        assert_eq!(members.len(), c.members(k));
        for &i in &members {
            assert!(
                !std::mem::replace(&mut written[i], true),
                "packet {i} written twice"
            );
        }
        order.extend_from_slice(&members);
        let mut header = [0u8; MAX_WRITE_HEADER];
        let n = c.header(k, &pkts, &mut header);
        let mut write = header[..n].to_vec();
        c.payloads(k, &pkts)
            .for_each(|p| write.extend_from_slice(p));
        if let [alone] = members[..] {
            assert_eq!(
                header[..n],
                [0; OFFLOAD_HEADER_LEN],
                "an offload asked for one packet"
            );
            assert_eq!(write[n..], pkts[alone]);
            continue;
        }
        let hdr = OffloadHeader::decode(&write).expect("a merged write's header");
        let mut cut = Vec::new();
        offload::split(&hdr, &mut write[OFFLOAD_HEADER_LEN..], |h, p| {
            cut.push([h, p].concat())
        })
        .expect("a merged write the kernel's cut refuses");
        assert_eq!(cut.len(), members.len());
        for (again, &i) in cut.iter().zip(&members) {
            assert_eq!(without_ip_id(again), without_ip_id(&pkts[i]), "packet {i}");
        }
    }
    assert!(written.iter().all(|&w| w), "a packet not written");
    let flows: Vec<Option<Vec<u8>>> = pkts.iter().map(|p| flow(p)).collect();
    for (at, &a) in order.iter().enumerate() {
        for &b in &order[at + 1..] {
            let same = flows[a].is_some() && flows[a] == flows[b];
            assert!(!same || a < b, "packet {b} written after {a} of its flow");
        }
    }
}

/// The packets of a `coalesce` input.
pub(crate) fn batch(data: &[u8]) -> Vec<Vec<u8>> {
    let mut pkts = Vec::new();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        pkts.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    pkts
}

/// Protocol, addresses and ports of a well-formed TCP segment (its IP length field says its
/// length and its TCP header fits) or UDP datagram (its length field agrees).
fn flow(p: &[u8]) -> Option<Vec<u8>> {
    let (ip, protocol, addresses) = match p.first()? >> 4 {
        4 if p.len() >= 20 && usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len() => {
            (usize::from(p[0] & 0x0f) * 4, p[9], 12..20)
        }
        6 if p.len() >= 40 && usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 == p.len() => {
            (40, p[6], 8..40)
        }
        _ => return None,
    };
    let transport = p.get(ip..).filter(|t| ip >= 20 && t.len() >= 8)?;
    let well_formed = match protocol {
        6 => {
            let tcp_len = usize::from(transport.get(12)? >> 4) * 4;
            tcp_len >= 20 && tcp_len <= transport.len()
        }
        17 => usize::from(u16::from_be_bytes([transport[4], transport[5]])) == transport.len(),
        _ => false,
    };
    well_formed.then(|| [&[protocol][..], &p[addresses], &transport[..4]].concat())
}

/// `p` with IPv4's identification and header checksum zeroed.
fn without_ip_id(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    if p.len() >= 20 && p[0] >> 4 == 4 {
        p[4..6].fill(0);
        p[10..12].fill(0);
    }
    p
}

fn unicast(a: IpAddr) -> bool {
    !a.is_unspecified() && !a.is_multicast() && a != IpAddr::V4(Ipv4Addr::BROADCAST)
}

/// The Internet checksum (RFC 1071) over the concatenated chunks, written apart from proto's.
fn checksum(chunks: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = chunks.concat();
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Probes and echoes: the DN echoes exactly the well-formed probes, the EN reads exactly the
/// well-formed echoes, and both are what the encoder makes.
fn probes(d: &[u8]) {
    if let Some(echo) = probe::echo_for(d) {
        assert!(probe::is_probe(d) && probe::is_probe(&echo));
        let seq = u32::from_be_bytes(d[1..5].try_into().unwrap());
        assert_eq!(d, probe::encode_probe(seq));
        assert_eq!(probe::parse_echo(&echo), Some(seq));
        assert_eq!(probe::echo_for(&echo), None, "an echo echoed again");
    }
    if let Some(seq) = probe::parse_echo(d) {
        assert!(probe::is_probe(d));
        assert_eq!(
            probe::echo_for(&probe::encode_probe(seq)).map(|e| e.to_vec()),
            Some(d.to_vec())
        );
    }
}

/// What the EN's raw ICMP sockets deliver, checked against a reading of RFC 792 / RFC 4443
/// written here, and against a message rebuilt from what was parsed.
pub fn icmp(data: &[u8]) {
    let v4 = packet::icmpv4_port_unreachable(data);
    assert_eq!(v4, reference_v4(data), "ICMPv4 {data:02x?}");
    let v6 = packet::icmpv6_port_unreachable(data);
    assert_eq!(v6, reference_v6(data), "ICMPv6 {data:02x?}");
    if let Some(p) = v4 {
        assert_eq!(packet::icmpv4_port_unreachable(&build_v4(p)), Some(p));
    }
    if let Some(p) = v6 {
        assert_eq!(packet::icmpv6_port_unreachable(&build_v6(p)), Some(p));
    }
}

/// An IPv4 header of at least 5 words (RFC 791), its length, and the rest.
fn ipv4(pkt: &[u8], protocol: u8) -> Option<(&[u8], &[u8])> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    if pkt[0] >> 4 != 4 || ihl < 20 || pkt.len() < ihl || pkt[9] != protocol {
        return None;
    }
    Some(pkt.split_at(ihl))
}

fn ports(udp: &[u8], dst: IpAddr) -> Option<PortUnreachable> {
    let p = udp.get(..4)?;
    Some(PortUnreachable {
        local_port: u16::from_be_bytes([p[0], p[1]]),
        remote: SocketAddr::new(dst, u16::from_be_bytes([p[2], p[3]])),
    })
}

fn reference_v4(pkt: &[u8]) -> Option<PortUnreachable> {
    let (_, icmp) = ipv4(pkt, 1)?;
    if icmp.len() < 8 || icmp[..2] != [3, 3] {
        return None;
    }
    let (header, udp) = ipv4(&icmp[8..], 17)?;
    let dst: [u8; 4] = header[16..20].try_into().ok()?;
    ports(udp, Ipv4Addr::from(dst).into())
}

fn reference_v6(msg: &[u8]) -> Option<PortUnreachable> {
    if msg.len() < 8 + 40 || msg[..2] != [1, 4] {
        return None;
    }
    let original = &msg[8..];
    if original[0] >> 4 != 6 || original[6] != 17 {
        return None;
    }
    let dst: [u8; 16] = original[24..40].try_into().ok()?;
    ports(&original[40..], Ipv6Addr::from(dst).into())
}

fn build_v4(p: PortUnreachable) -> Vec<u8> {
    let IpAddr::V4(dst) = p.remote.ip() else {
        panic!("an ICMPv4 error about {}", p.remote)
    };
    let mut pkt = vec![
        0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 9, 10, 0, 0, 1,
    ];
    pkt.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    pkt.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1]);
    pkt.extend_from_slice(&dst.octets());
    pkt.extend_from_slice(&p.local_port.to_be_bytes());
    pkt.extend_from_slice(&p.remote.port().to_be_bytes());
    pkt.extend_from_slice(&[0, 8, 0, 0]);
    pkt
}

fn build_v6(p: PortUnreachable) -> Vec<u8> {
    let IpAddr::V6(dst) = p.remote.ip() else {
        panic!("an ICMPv6 error about {}", p.remote)
    };
    let mut msg = vec![1, 4, 0, 0, 0, 0, 0, 0, 0x60, 0, 0, 0, 0, 8, 17, 64];
    msg.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    msg.extend_from_slice(&dst.octets());
    msg.extend_from_slice(&p.local_port.to_be_bytes());
    msg.extend_from_slice(&p.remote.port().to_be_bytes());
    msg.extend_from_slice(&[0, 8, 0, 0]);
    msg
}
