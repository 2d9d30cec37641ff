//! Splitting what a TUN device with offloads hands over into the packets a tunnel carries.
//!
//! With offloads on, Linux hands a reader TCP (and UDP) super-packets of up to 64 KiB with a
//! small header saying how to cut them (GSO), and packets whose transport checksum it left for
//! the reader to finish. [`split`] does both and gives each resulting packet to the caller as a
//! header (built here) and a payload (a slice of the input), so that the caller copies each
//! byte once, straight into the buffer it sends from.

use thiserror::Error;

use crate::packet::{fold, sum, PROTO_TCP, PROTO_UDP};

/// What the kernel says about one read (Linux's `struct virtio_net_hdr`, little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadHeader {
    /// The transport checksum is partial (the pseudo-header sum only) and must be finished.
    pub needs_checksum: bool,
    pub gso: Gso,
    /// Bytes per segment's payload when `gso` is not [`Gso::None`].
    pub gso_size: u16,
    /// Where the transport header starts: the IP header's length, extensions included.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field is.
    pub csum_offset: u16,
}

/// How a super-packet is to be cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gso {
    None,
    TcpV4,
    TcpV6,
    /// UDP (USO): each segment its own datagram.
    Udp,
}

/// Length of the header in front of every read.
pub const OFFLOAD_HEADER_LEN: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
/// Set with a TCP type when the kernel left ECN's congestion-window-reduced flag to us.
const GSO_ECN: u8 = 0x80;
/// Where a TCP header holds its flags.
pub(crate) const TCP_FLAGS: usize = 13;
const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
/// Where TCP's and UDP's headers hold their checksums.
pub(crate) const TCP_CHECKSUM: u16 = 16;
pub(crate) const UDP_CHECKSUM: u16 = 6;
pub(crate) const UDP_HEADER: usize = 8;
/// Room for the headers each segment repeats: IPv6 with extensions and the largest TCP header.
const MAX_HEADERS: usize = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OffloadError {
    #[error("read shorter than its offload header")]
    Truncated,
    #[error("unknown GSO type {0:#x}")]
    UnknownGso(u8),
    #[error("GSO packet with segment size 0")]
    ZeroSegmentSize,
    #[error("GSO type does not match IP version {0}")]
    VersionMismatch(u8),
    #[error("headers of {0} bytes do not fit the packet or exceed what is supported")]
    BadHeaders(usize),
    #[error("checksum offset {0} outside the packet")]
    BadChecksumOffset(usize),
    #[error("packet of {0} bytes, longer than an IP packet can be")]
    TooLong(usize),
}

impl OffloadHeader {
    /// Reads the header at the start of `read`.
    pub fn decode(read: &[u8]) -> Result<Self, OffloadError> {
        let b: &[u8; OFFLOAD_HEADER_LEN] = read
            .get(..OFFLOAD_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(OffloadError::Truncated)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let gso = match b[1] & !GSO_ECN {
            GSO_NONE => Gso::None,
            GSO_TCPV4 => Gso::TcpV4,
            GSO_TCPV6 => Gso::TcpV6,
            GSO_UDP_L4 => Gso::Udp,
            other => return Err(OffloadError::UnknownGso(other)),
        };
        Ok(Self {
            needs_checksum: b[0] & F_NEEDS_CSUM != 0,
            gso,
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// The header as the kernel reads it in front of a write; `hdr_len` is the length of the
    /// IP and transport headers every segment repeats.
    pub fn encode(&self, hdr_len: u16) -> [u8; OFFLOAD_HEADER_LEN] {
        let gso = match self.gso {
            Gso::None => GSO_NONE,
            Gso::TcpV4 => GSO_TCPV4,
            Gso::TcpV6 => GSO_TCPV6,
            Gso::Udp => GSO_UDP_L4,
        };
        let mut b = [0u8; OFFLOAD_HEADER_LEN];
        b[0] = if self.needs_checksum { F_NEEDS_CSUM } else { 0 };
        b[1] = gso;
        for (at, value) in [
            (2, hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
        ] {
            b[at..at + 2].copy_from_slice(&value.to_le_bytes());
        }
        b
    }
}

/// Cuts `packet` (what followed the header `hdr` in one read) into whole IP packets with correct
/// lengths, sequence numbers and checksums, and gives each to `emit` as its headers and its
/// payload (a slice of `packet`; empty when the packet needed no cutting). Returns how many
/// packets were emitted. A packet the kernel did not mark for cutting goes out as it is, its
/// checksum finished if it asked for that (which is why `packet` is mutable).
pub fn split(
    hdr: &OffloadHeader,
    packet: &mut [u8],
    mut emit: impl FnMut(&[u8], &[u8]),
) -> Result<usize, OffloadError> {
    if hdr.gso == Gso::None {
        if hdr.needs_checksum {
            finish_checksum(packet, usize::from(hdr.csum_start), hdr.csum_offset)?;
        }
        emit(packet, &[]);
        return Ok(1);
    }
    let version = packet.first().map_or(0, |b| b >> 4);
    let (is_v6, protocol) = match (hdr.gso, version) {
        (Gso::TcpV4, 4) => (false, PROTO_TCP),
        (Gso::TcpV6, 6) => (true, PROTO_TCP),
        (Gso::Udp, 4) => (false, PROTO_UDP),
        (Gso::Udp, 6) => (true, PROTO_UDP),
        _ => return Err(OffloadError::VersionMismatch(version)),
    };
    if hdr.gso_size == 0 {
        return Err(OffloadError::ZeroSegmentSize);
    }
    if packet.len() > usize::from(u16::MAX) {
        return Err(OffloadError::TooLong(packet.len()));
    }
    let ip_len = usize::from(hdr.csum_start);
    // The kernel's own header length can cover a whole first packet on the forwarding path:
    // the transport header's length is read from the packet instead.
    let (transport_len, min_transport) = match protocol {
        PROTO_TCP => (
            packet
                .get(ip_len + 12)
                .map_or(0, |offset| usize::from(offset >> 4) * 4),
            20,
        ),
        _ => (UDP_HEADER, UDP_HEADER),
    };
    let headers = ip_len + transport_len;
    let min_ip = if is_v6 { 40 } else { 20 };
    if ip_len < min_ip
        || transport_len < min_transport
        || headers > MAX_HEADERS
        || headers > packet.len()
    {
        return Err(OffloadError::BadHeaders(headers));
    }
    let (addresses, ip_id) = if is_v6 {
        (&packet[8..40], 0)
    } else {
        (&packet[12..20], u16::from_be_bytes([packet[4], packet[5]]))
    };
    let address_sum = sum(addresses, 0);
    let first_seq = u32::from_be_bytes([
        packet[ip_len + 4],
        packet[ip_len + 5],
        packet[ip_len + 6],
        packet[ip_len + 7],
    ]);
    let gso_size = usize::from(hdr.gso_size);
    let checksum_at = ip_len
        + usize::from(if protocol == PROTO_TCP {
            TCP_CHECKSUM
        } else {
            UDP_CHECKSUM
        });
    let mut out = [0u8; MAX_HEADERS];
    out[..headers].copy_from_slice(&packet[..headers]);
    let payload = &packet[headers..];
    let segments = payload.len().div_ceil(gso_size);
    for (i, chunk) in payload.chunks(gso_size).enumerate() {
        let total = headers + chunk.len();
        let transport_total = total - ip_len;
        // Both fit in 16 bits: `packet` came from one read of at most 64 KiB.
        let (total16, transport16) = (total as u16, transport_total as u16);
        if is_v6 {
            out[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            out[2..4].copy_from_slice(&total16.to_be_bytes());
            out[4..6].copy_from_slice(&ip_id.wrapping_add(i as u16).to_be_bytes());
            out[10..12].fill(0);
            let ip_checksum = !fold(sum(&out[..ip_len], 0));
            out[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        }
        if protocol == PROTO_TCP {
            let seq = first_seq.wrapping_add((gso_size * i) as u32);
            out[ip_len + 4..ip_len + 8].copy_from_slice(&seq.to_be_bytes());
            let mut flags = packet[ip_len + TCP_FLAGS];
            if i > 0 {
                flags &= !TCP_CWR;
            }
            if i + 1 < segments {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            out[ip_len + TCP_FLAGS] = flags;
        } else {
            out[ip_len + 4..ip_len + 6].copy_from_slice(&transport16.to_be_bytes());
        }
        out[checksum_at..checksum_at + 2].fill(0);
        // Pseudo-header (addresses, protocol, transport length), transport header, payload:
        // the transport header's length is even, so the payload's words stay aligned.
        let pseudo = address_sum + u64::from(protocol) + u64::from(transport16);
        let mut checksum = !fold(sum(chunk, sum(&out[ip_len..headers], pseudo)));
        if protocol == PROTO_UDP && checksum == 0 {
            checksum = 0xffff;
        }
        out[checksum_at..checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
        emit(&out[..headers], chunk);
    }
    Ok(segments)
}

/// Finishes a partial checksum: the field holds the pseudo-header's sum; the rest is summed
/// from `start` to the end.
fn finish_checksum(packet: &mut [u8], start: usize, offset: u16) -> Result<(), OffloadError> {
    let at = start + usize::from(offset);
    if at + 2 > packet.len() {
        return Err(OffloadError::BadChecksumOffset(at));
    }
    let partial = u64::from(u16::from_be_bytes([packet[at], packet[at + 1]]));
    packet[at..at + 2].fill(0);
    let checksum = !fold(sum(&packet[start..], partial));
    packet[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::checksum;
    use proptest::prelude::*;

    fn ipv4_tcp(payload: &[u8], flags: u8) -> Vec<u8> {
        let total = 40 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfff0u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 200, 0, 2]);
        p[16..20].copy_from_slice(&[10, 0, 2, 10]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p[40..].copy_from_slice(payload);
        p
    }

    fn ipv6_udp(payload: &[u8]) -> Vec<u8> {
        let total = 48 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        p[6] = PROTO_UDP;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]);
        p[40..42].copy_from_slice(&5353u16.to_be_bytes());
        p[42..44].copy_from_slice(&53u16.to_be_bytes());
        p[48..].copy_from_slice(payload);
        p
    }

    /// The transport checksum of a whole packet checks out (sums to 0xffff with the pseudo
    /// header), computed with the plain byte-by-byte checksum as the independent reference.
    fn transport_checksum_ok(p: &[u8], ip_len: usize, protocol: u8) -> bool {
        let addresses = if p[0] >> 4 == 6 {
            &p[8..40]
        } else {
            &p[12..20]
        };
        let len = ((p.len() - ip_len) as u16).to_be_bytes();
        checksum(&[addresses, &[0, protocol], &len, &p[ip_len..]]) == 0
    }

    fn cut(hdr: &OffloadHeader, packet: &mut [u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut out = Vec::new();
        let n = split(hdr, packet, |h, p| out.push([h, p].concat()))?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    fn tso(gso: Gso, gso_size: u16, csum_start: u16, csum_offset: u16) -> OffloadHeader {
        OffloadHeader {
            needs_checksum: true,
            gso,
            gso_size,
            csum_start,
            csum_offset,
        }
    }

    proptest! {
        #[test]
        fn tcp_segments_carry_the_stream_in_order_with_valid_headers(
            payload in proptest::collection::vec(any::<u8>(), 1..6000),
            gso_size in 1u16..2000,
            flags in any::<u8>(),
        ) {
            let mut p = ipv4_tcp(&payload, flags);
            let segments = cut(&tso(Gso::TcpV4, gso_size, 20, 16), &mut p).unwrap();
            prop_assert_eq!(segments.len(), payload.len().div_ceil(usize::from(gso_size)));
            let mut carried = Vec::new();
            for (i, s) in segments.iter().enumerate() {
                let last = i + 1 == segments.len();
                prop_assert!(s.len() <= 40 + usize::from(gso_size));
                prop_assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                prop_assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0xfff0u16.wrapping_add(i as u16));
                prop_assert_eq!(checksum(&[&s[..20]]), 0, "IPv4 header checksum");
                prop_assert!(transport_checksum_ok(s, 20, PROTO_TCP));
                let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
                prop_assert_eq!(seq, 0xffff_fff0u32.wrapping_add(carried.len() as u32));
                let mut expected = flags;
                if i > 0 { expected &= !TCP_CWR; }
                if !last { expected &= !(TCP_FIN | TCP_PSH); }
                prop_assert_eq!(s[33], expected);
                carried.extend_from_slice(&s[40..]);
            }
            prop_assert_eq!(carried, payload);
        }

        #[test]
        fn udp_segments_are_datagrams_of_their_own(
            payload in proptest::collection::vec(any::<u8>(), 1..5000),
            gso_size in 1u16..1500,
        ) {
            let mut p = ipv6_udp(&payload);
            let segments = cut(&tso(Gso::Udp, gso_size, 40, 6), &mut p).unwrap();
            let mut carried = Vec::new();
            for s in &segments {
                prop_assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
                prop_assert_eq!(usize::from(u16::from_be_bytes([s[44], s[45]])), s.len() - 40);
                prop_assert!(transport_checksum_ok(s, 40, PROTO_UDP));
                prop_assert_ne!(u16::from_be_bytes([s[46], s[47]]), 0);
                carried.extend_from_slice(&s[48..]);
            }
            prop_assert_eq!(carried, payload);
        }

        #[test]
        fn a_partial_checksum_is_finished(payload in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut p = ipv4_tcp(&payload, 0x18);
            // What the kernel leaves: the pseudo header's sum, not complemented.
            let len = ((p.len() - 20) as u16).to_be_bytes();
            let partial = !checksum(&[&p[12..20], &[0, PROTO_TCP], &len]);
            p[36..38].copy_from_slice(&partial.to_be_bytes());
            let out = cut(&tso(Gso::None, 0, 20, 16), &mut p).unwrap();
            prop_assert_eq!(out.len(), 1);
            prop_assert!(transport_checksum_ok(&out[0], 20, PROTO_TCP));
        }

        #[test]
        fn no_input_panics(
            raw in proptest::collection::vec(any::<u8>(), 0..200),
            header in proptest::collection::vec(any::<u8>(), 10),
        ) {
            if let Ok(hdr) = OffloadHeader::decode(&header) {
                let mut raw = raw;
                let len = raw.len();
                let mut emitted = 0;
                if let Ok(n) = split(&hdr, &mut raw, |h, p| emitted += h.len() + p.len()) {
                    // Nothing is lost: every byte read goes out (headers repeated per segment).
                    let whole = if n == 0 { emitted == 0 } else { emitted >= len };
                    prop_assert!(whole, "{n} packets, {emitted} of {len} bytes");
                }
            }
        }
    }

    #[test]
    fn the_header_is_read_as_the_kernel_writes_it() {
        let raw = [1, 0x81, 66, 0, 0x50, 0x05, 20, 0, 16, 0];
        assert_eq!(
            OffloadHeader::decode(&raw),
            Ok(OffloadHeader {
                needs_checksum: true,
                gso: Gso::TcpV4,
                gso_size: 0x0550,
                csum_start: 20,
                csum_offset: 16,
            })
        );
        assert_eq!(
            OffloadHeader::decode(&raw[..9]),
            Err(OffloadError::Truncated)
        );
        assert_eq!(
            OffloadHeader::decode(&[0, 3, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(OffloadError::UnknownGso(3))
        );
    }

    #[test]
    fn a_packet_without_offload_goes_out_untouched() {
        let mut p = ipv4_tcp(b"hello", 0x18);
        let before = p.clone();
        let hdr = OffloadHeader {
            needs_checksum: false,
            ..tso(Gso::None, 0, 0, 0)
        };
        assert_eq!(cut(&hdr, &mut p).unwrap(), vec![before]);
    }

    #[test]
    fn a_super_packet_of_the_wrong_family_or_short_headers_is_refused() {
        let mut p = ipv4_tcp(&[0; 100], 0);
        assert_eq!(
            cut(&tso(Gso::TcpV6, 50, 40, 16), &mut p),
            Err(OffloadError::VersionMismatch(4))
        );
        assert_eq!(
            cut(&tso(Gso::TcpV4, 0, 20, 16), &mut p),
            Err(OffloadError::ZeroSegmentSize)
        );
        assert!(matches!(
            cut(&tso(Gso::TcpV4, 50, 10, 16), &mut p),
            Err(OffloadError::BadHeaders(_))
        ));
        let mut short = p[..30].to_vec();
        assert!(cut(&tso(Gso::TcpV4, 50, 20, 16), &mut short).is_err());
    }
}
