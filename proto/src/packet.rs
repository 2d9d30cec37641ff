//! The per-packet view of the data path: header fields and ICMP "packet too big" replies.
//!
//! Functions over byte slices with caller-owned output buffers; nothing here allocates per
//! packet or panics on malformed input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const IPV4_HEADER_MIN: usize = 20;
const IPV6_HEADER: usize = 40;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// RFC 1812: an ICMPv4 error carries as much of the original as fits in 576 bytes.
const ICMPV4_ERROR_MAX: usize = 576;
/// RFC 4443: an ICMPv6 error must not exceed the minimum IPv6 MTU.
const ICMPV6_ERROR_MAX: usize = 1280;

/// Source and destination of an IPv4 or IPv6 packet, or `None` if it is neither or truncated.
pub fn addresses(pkt: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= IPV4_HEADER_MIN => {
            let src: [u8; 4] = pkt[12..16].try_into().ok()?;
            let dst: [u8; 4] = pkt[16..20].try_into().ok()?;
            Some((Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into()))
        }
        6 if pkt.len() >= IPV6_HEADER => {
            let src: [u8; 16] = pkt[8..24].try_into().ok()?;
            let dst: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some((Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into()))
        }
        _ => None,
    }
}

/// Whether `pkt`'s source is one of `own`: a client sends from its leased addresses only (one,
/// or one of each family on a dual-stack lease).
pub fn from_one_of(pkt: &[u8], own: &[IpAddr]) -> bool {
    source(pkt).is_some_and(|s| own.contains(&s))
}

pub fn destination(pkt: &[u8]) -> Option<IpAddr> {
    addresses(pkt).map(|(_, d)| d)
}

pub fn source(pkt: &[u8]) -> Option<IpAddr> {
    addresses(pkt).map(|(s, _)| s)
}

pub(crate) const PROTO_TCP: u8 = 6;

/// The Internet checksum (RFC 1071) over `chunks` taken as one run of bytes.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut acc = 0u64;
    let mut odd_offset = false;
    for chunk in chunks {
        // A chunk that starts at an odd offset has its words' bytes the other way round, and
        // a sum with its bytes swapped is the swapped sum (RFC 1071, 2.B).
        let part = fold(sum(chunk, 0));
        acc += u64::from(if odd_offset { part.swap_bytes() } else { part });
        odd_offset ^= chunk.len() % 2 == 1;
    }
    !fold(acc)
}

/// Adds `data`, taken as big-endian 16-bit words (a last odd byte padded with zero), to `acc`
/// without folding. The words are summed four bytes at a time in the machine's own byte order,
/// which the compiler vectorizes: a 32-bit word is congruent to the sum of its halves modulo
/// 0xffff, and a sum in swapped byte order is the swapped sum (RFC 1071, 2.B).
pub(crate) fn sum(data: &[u8], acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    let mut native = 0u64;
    for w in &mut words {
        native += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u16::from_be(fold(native))) + u64::from(u32::from_be_bytes(tail))
}

/// Folds a sum of words into the 16-bit one's complement sum.
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Whether an address names one host. Both ends of an ICMP error must: it goes to the
/// packet's source, and comes from the packet's destination (see [`packet_too_big`]).
fn one_host(a: IpAddr) -> bool {
    !a.is_unspecified() && !a.is_multicast() && a != IpAddr::V4(Ipv4Addr::BROADCAST)
}

/// Whether an ICMP error may be sent about `pkt` (RFC 1122 / RFC 4443: never about an ICMP
/// error, a non-first fragment, or a packet from or to an address that is not one host).
fn may_answer(pkt: &[u8], src: IpAddr, dst: IpAddr) -> bool {
    if !one_host(src) || !one_host(dst) {
        return false;
    }
    match pkt[0] >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let fragment_offset = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
            if fragment_offset != 0 || ihl < IPV4_HEADER_MIN || pkt.len() < ihl {
                return false;
            }
            // ICMP errors (anything but echo request/reply and a few queries) are not answered.
            !(pkt[9] == PROTO_ICMP && pkt.get(ihl).is_some_and(|t| ![0u8, 8, 13, 14].contains(t)))
        }
        _ => !(pkt[6] == PROTO_ICMPV6 && pkt.get(IPV6_HEADER).is_some_and(|t| *t < 128)),
    }
}

/// Whether an IPv4 packet forbids fragmentation (IPv6 always does, in transit).
pub fn dont_fragment(pkt: &[u8]) -> bool {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => pkt.len() >= IPV4_HEADER_MIN && pkt[6] & 0x40 != 0,
        Some(6) => true,
        _ => false,
    }
}

/// Writes into `out` an ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) error
/// about `pkt`, to `pkt`'s source, announcing `mtu`. Returns `false`, leaving `out` empty, when
/// no error may be sent (see RFC 1122, RFC 4443).
///
/// The error comes from `pkt`'s destination, as if the far end had sent it: it is written into
/// the local TUN device, and a source that is one of the host's own addresses would be dropped
/// as martian, one that does not route back through the tunnel by reverse-path filtering.
pub fn packet_too_big(pkt: &[u8], mtu: u16, out: &mut Vec<u8>) -> bool {
    out.clear();
    let Some((src, from)) = addresses(pkt) else {
        return false;
    };
    if !may_answer(pkt, src, from) {
        return false;
    }
    match (src, from) {
        (IpAddr::V4(to), IpAddr::V4(from)) => {
            let quoted = &pkt[..pkt.len().min(ICMPV4_ERROR_MAX - IPV4_HEADER_MIN - 8)];
            let total = (IPV4_HEADER_MIN + 8 + quoted.len()) as u16;
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 64, PROTO_ICMP, 0, 0]);
            out.extend_from_slice(&from.octets());
            out.extend_from_slice(&to.octets());
            let ip_sum = checksum(&[&out[..IPV4_HEADER_MIN]]);
            out[10..12].copy_from_slice(&ip_sum.to_be_bytes());
            // Type 3 code 4, unused, next-hop MTU (RFC 1191).
            let mut icmp = [3u8, 4, 0, 0, 0, 0, 0, 0];
            icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
            let sum = checksum(&[&icmp, quoted]);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(&icmp);
            out.extend_from_slice(quoted);
            true
        }
        (IpAddr::V6(to), IpAddr::V6(from)) => {
            let quoted = &pkt[..pkt.len().min(ICMPV6_ERROR_MAX - IPV6_HEADER - 8)];
            let payload_len = (8 + quoted.len()) as u32;
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
            out.extend_from_slice(&[PROTO_ICMPV6, 64]);
            out.extend_from_slice(&from.octets());
            out.extend_from_slice(&to.octets());
            let mut icmp = [2u8, 0, 0, 0, 0, 0, 0, 0];
            icmp[4..8].copy_from_slice(&u32::from(mtu.max(1280)).to_be_bytes());
            let pseudo_len = payload_len.to_be_bytes();
            let pseudo_next = [0, 0, 0, PROTO_ICMPV6];
            let sum = checksum(&[
                &from.octets(),
                &to.octets(),
                &pseudo_len,
                &pseudo_next,
                &icmp,
                quoted,
            ]);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(&icmp);
            out.extend_from_slice(quoted);
            true
        }
        // A packet's addresses are always of one family.
        _ => false,
    }
}

/// A UDP datagram an ICMP error reports undeliverable: the original's source port and where it
/// was sent. For the EN, a DN's port answering "unreachable" means the `dn` process is gone
/// (thesis 3.3): no need to wait for probes to go unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortUnreachable {
    pub local_port: u16,
    pub remote: SocketAddr,
}

pub(crate) const PROTO_UDP: u8 = 17;
const ICMP_HEADER: usize = 8;

/// Parses what a raw ICMPv4 socket delivers (the IPv4 header, then the ICMP message): a
/// "destination unreachable, port unreachable" about a UDP datagram.
pub fn icmpv4_port_unreachable(pkt: &[u8]) -> Option<PortUnreachable> {
    let icmp = ipv4_payload(pkt, PROTO_ICMP)?;
    // Type 3 (destination unreachable), code 3 (port unreachable).
    if icmp.get(..2)? != [3, 3] {
        return None;
    }
    let original = icmp.get(ICMP_HEADER..)?;
    let udp = ipv4_payload(original, PROTO_UDP)?;
    let dst: [u8; 4] = original.get(16..20)?.try_into().ok()?;
    udp_ports(udp, Ipv4Addr::from(dst).into())
}

/// What follows the header of an IPv4 packet carrying `protocol`. A header length under the
/// minimum of 5 words (RFC 791) is malformed: the payload would overlap the header.
fn ipv4_payload(pkt: &[u8], protocol: u8) -> Option<&[u8]> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    if pkt[0] >> 4 != 4 || ihl < IPV4_HEADER_MIN || *pkt.get(9)? != protocol {
        return None;
    }
    pkt.get(ihl..)
}

/// Parses what a raw ICMPv6 socket delivers (the ICMPv6 message, without the IPv6 header): a
/// "destination unreachable, port unreachable" about a UDP datagram.
pub fn icmpv6_port_unreachable(msg: &[u8]) -> Option<PortUnreachable> {
    // Type 1 (destination unreachable), code 4 (port unreachable).
    if msg.get(..2)? != [1, 4] {
        return None;
    }
    let original = msg.get(ICMP_HEADER..)?;
    if original.first()? >> 4 != 6 || *original.get(6)? != PROTO_UDP {
        return None;
    }
    let dst: [u8; 16] = original.get(24..40)?.try_into().ok()?;
    udp_ports(original.get(IPV6_HEADER..)?, Ipv6Addr::from(dst).into())
}

fn udp_ports(udp: &[u8], dst: IpAddr) -> Option<PortUnreachable> {
    let ports = udp.get(..4)?;
    Some(PortUnreachable {
        local_port: u16::from_be_bytes([ports[0], ports[1]]),
        remote: SocketAddr::new(dst, u16::from_be_bytes([ports[2], ports[3]])),
    })
}

/// Packets for tests, here and in the crates built on this one.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    /// A packet of `total` bytes from the client (10.200.0.2, or fd00::2) to the server
    /// (10.0.2.10, or fd00::a) carrying `protocol`: its IP header with lengths, the TTL and
    /// the addresses set, the rest zero for the test to fill in (IPv4's header checksum too).
    pub fn ip_packet(v6: bool, protocol: u8, total: usize) -> Vec<u8> {
        let mut p = vec![0u8; total];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = protocol;
            p[7] = 64;
            p[8] = 0xfd;
            p[23] = 2;
            p[24] = 0xfd;
            p[39] = 10;
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[8] = 64;
            p[9] = protocol;
            p[12..16].copy_from_slice(&[10, 200, 0, 2]);
            p[16..20].copy_from_slice(&[10, 0, 2, 10]);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4_tcp(len: usize, df: bool) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 200, 0, 2]);
        p[16..20].copy_from_slice(&[10, 0, 2, 10]);
        p
    }

    #[test]
    fn addresses_are_read() {
        let p = v4_tcp(60, true);
        assert_eq!(
            addresses(&p),
            Some(("10.200.0.2".parse().unwrap(), "10.0.2.10".parse().unwrap()))
        );
        assert!(dont_fragment(&p));
        assert!(!dont_fragment(&v4_tcp(60, false)));
        assert_eq!(addresses(&p[..19]), None);
        assert_eq!(addresses(&[0x10; 60]), None);
    }

    #[test]
    fn a_client_sends_from_its_own_addresses_only() {
        let v4 = v4_tcp(60, true);
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"fd00:200::2".parse::<Ipv6Addr>().unwrap().octets());
        let own: [IpAddr; 2] = [
            "10.200.0.2".parse().unwrap(),
            "fd00:200::2".parse().unwrap(),
        ];
        assert!(from_one_of(&v4, &own) && from_one_of(&v6, &own));
        // An IPv4-only lease: its address twice, as the DN passes it.
        let v4_only = [own[0], own[0]];
        assert!(from_one_of(&v4, &v4_only) && !from_one_of(&v6, &v4_only));
        v6[23] = 3;
        assert!(!from_one_of(&v6, &own));
        assert!(!from_one_of(&v6[..39], &own));
    }

    #[test]
    fn icmpv4_frag_needed_is_well_formed() {
        let p = v4_tcp(1500, true);
        let mut out = Vec::new();
        assert!(packet_too_big(&p, 1380, &mut out));
        assert_eq!(out.len(), 576);
        assert_eq!(checksum(&[&out[..20]]), 0, "IP header checksum");
        assert_eq!(checksum(&[&out[20..]]), 0, "ICMP checksum");
        assert_eq!(&out[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), 1380);
        assert_eq!(
            addresses(&out),
            Some(("10.0.2.10".parse().unwrap(), "10.200.0.2".parse().unwrap()))
        );
        assert_eq!(&out[28..48], &p[..20]);
    }

    #[test]
    fn icmpv6_packet_too_big_is_well_formed() {
        let mut p = vec![0u8; 1500];
        p[0] = 0x60;
        p[6] = 17;
        p[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd01::9".parse::<Ipv6Addr>().unwrap().octets());
        let mut out = Vec::new();
        let from: Ipv6Addr = "fd01::9".parse().unwrap();
        assert!(packet_too_big(&p, 1300, &mut out));
        assert_eq!(out.len(), 1280);
        let to = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        let len = ((out.len() - 40) as u32).to_be_bytes();
        let sum = checksum(&[&from.octets(), &to, &len, &[0, 0, 0, 58], &out[40..]]);
        assert_eq!(sum, 0);
        assert_eq!(out[40], 2);
    }

    #[test]
    fn errors_are_not_answered_with_errors() {
        let mut p = v4_tcp(1500, true);
        p[9] = PROTO_ICMP;
        p[20] = 3; // destination unreachable
        let mut out = Vec::new();
        assert!(!packet_too_big(&p, 1380, &mut out));
        p[20] = 8; // echo request is answered
        assert!(packet_too_big(&p, 1380, &mut out));
        let mut frag = v4_tcp(1500, true);
        frag[7] = 10; // non-first fragment
        assert!(!packet_too_big(&frag, 1380, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn packets_to_or_from_no_one_host_are_not_answered() {
        // Found by fuzzing: a packet to 0.0.0.0 (or to a multicast or broadcast address) got an
        // error sent from that address, which names no host.
        let mut out = Vec::new();
        for (at, addr) in [
            (16, [0, 0, 0, 0]),
            (16, [224, 0, 0, 251]),
            (16, [255, 255, 255, 255]),
            (12, [255, 255, 255, 255]),
            (12, [0, 0, 0, 0]),
        ] {
            let mut p = v4_tcp(1500, true);
            p[at..at + 4].copy_from_slice(&addr);
            assert!(!packet_too_big(&p, 1380, &mut out), "{addr:?} at {at}");
            assert!(out.is_empty());
        }
        let mut p = vec![0u8; 1500];
        p[0] = 0x60;
        p[6] = 17;
        p[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"ff02::fb".parse::<Ipv6Addr>().unwrap().octets());
        assert!(!packet_too_big(&p, 1300, &mut out));
    }

    proptest! {
        #[test]
        fn the_checksum_of_chunks_is_that_of_their_bytes_in_one_run(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
        ) {
            // Chunks of odd length put the next chunk's words the other way round.
            let parts: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(checksum(&parts), checksum(&[&chunks.concat()]));
        }

        #[test]
        fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600), mtu in any::<u16>()) {
            let mut out = Vec::new();
            let _ = addresses(&bytes);
            let _ = dont_fragment(&bytes);
            if packet_too_big(&bytes, mtu, &mut out) {
                prop_assert!(out.len() <= ICMPV6_ERROR_MAX);
                prop_assert_eq!(addresses(&out).map(|(_, to)| to), source(&bytes));
                if out[0] >> 4 == 4 {
                    prop_assert!(out.len() <= ICMPV4_ERROR_MAX);
                    prop_assert_eq!(checksum(&[&out[..20]]), 0);
                }
            }
        }
    }

    /// An IPv4 packet from `from` carrying ICMP type/code about a UDP datagram
    /// 10.0.0.1:`sport` -> 10.0.0.2:`dport`.
    fn icmpv4_about_udp(kind: [u8; 2], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut original = vec![0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, proto, 0, 0];
        original.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        original.extend_from_slice(&sport.to_be_bytes());
        original.extend_from_slice(&dport.to_be_bytes());
        original.extend_from_slice(&[0, 28, 0, 0]);
        let mut pkt = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0];
        pkt.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        pkt.extend_from_slice(&[kind[0], kind[1], 0, 0, 0, 0, 0, 0]);
        pkt.extend_from_slice(&original);
        pkt
    }

    #[test]
    fn port_unreachable_names_the_datagram_it_is_about() {
        let pkt = icmpv4_about_udp([3, 3], PROTO_UDP, 50000, 4433);
        assert_eq!(
            icmpv4_port_unreachable(&pkt),
            Some(PortUnreachable {
                local_port: 50000,
                remote: "10.0.0.2:4433".parse().unwrap()
            })
        );
        // Other codes, other protocols, and every truncation are not.
        assert_eq!(
            icmpv4_port_unreachable(&icmpv4_about_udp([3, 1], PROTO_UDP, 1, 2)),
            None
        );
        assert_eq!(
            icmpv4_port_unreachable(&icmpv4_about_udp([11, 0], PROTO_UDP, 1, 2)),
            None
        );
        assert_eq!(
            icmpv4_port_unreachable(&icmpv4_about_udp([3, 3], 6, 1, 2)),
            None
        );
        for cut in 0..pkt.len() - 4 {
            assert_eq!(icmpv4_port_unreachable(&pkt[..cut]), None, "cut at {cut}");
        }
        // Found by fuzzing: a header length under 5 words, quoted or outer, was read as given,
        // taking header bytes for ports.
        let mut quoted = pkt.clone();
        quoted[28] = 0x42;
        assert_eq!(icmpv4_port_unreachable(&quoted), None);
        // An outer header of 4 words, its ICMP message where the destination would be.
        let mut outer = [&pkt[..16], &pkt[20..]].concat();
        outer[0] = 0x44;
        assert_eq!(icmpv4_port_unreachable(&outer), None);

        let mut v6 = vec![1, 4, 0, 0, 0, 0, 0, 0];
        let mut original = vec![0x60, 0, 0, 0, 0, 8, PROTO_UDP, 64];
        original.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        original.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        original.extend_from_slice(&[0xc3, 0x50, 0x11, 0x51, 0, 8, 0, 0]);
        v6.extend_from_slice(&original);
        assert_eq!(
            icmpv6_port_unreachable(&v6),
            Some(PortUnreachable {
                local_port: 50000,
                remote: "[fd00::2]:4433".parse().unwrap()
            })
        );
        v6[1] = 3;
        assert_eq!(icmpv6_port_unreachable(&v6), None);
    }

    proptest::proptest! {
        #[test]
        fn icmp_parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let _ = icmpv4_port_unreachable(&bytes);
            let _ = icmpv6_port_unreachable(&bytes);
        }
    }
}
