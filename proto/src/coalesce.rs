//! Merging a batch's TCP segments and UDP datagrams into super-packets, one TUN write each
//! (GRO).
//!
//! A TUN device with offloads takes a super-packet behind a header saying how to cut it again
//! (the same header [`crate::offload`] reads). The receiving TCP stack then runs, and ACKs, once
//! per super-packet instead of once per segment; a UDP flow costs the kernel one write and one
//! trip through routing per super-packet instead of per datagram (it is cut into datagrams
//! again, at the latest where a socket or a link without the offload takes it).
//! [`Coalescer::plan`] groups a batch (it only reads the packets); the caller writes each group
//! as [`Coalescer::header`] followed by [`Coalescer::payloads`] in one vectored write, so that
//! no payload byte is copied on the way.
//!
//! Segments merge only where the kernel's cut gives them back as they came: the same flow and
//! headers, equal sizes but for a shorter last one; for TCP, sequence numbers that follow each
//! other and nothing but ACK (and PSH on the last). Each merged segment's checksum is checked
//! first: the kernel trusts a super-packet's checksum to be made fresh, so a segment corrupted
//! before it reached us is written alone, for the receiver to drop, rather than laundered.

use crate::offload::{
    Gso, OffloadHeader, OFFLOAD_HEADER_LEN, TCP_CHECKSUM, TCP_FLAGS, TCP_PSH, UDP_CHECKSUM,
    UDP_HEADER,
};
use crate::packet::{fold, sum, PROTO_TCP, PROTO_UDP};

/// Most segments merged into one write.
pub const MAX_SEGMENTS: usize = 64;
/// Longest header of one write: the offload header, then the largest IP and TCP headers.
pub const MAX_WRITE_HEADER: usize = OFFLOAD_HEADER_LEN + 60 + 60;
/// Groups a segment looks back over for its flow: a batch interleaves few flows.
const LOOK_BACK: usize = 8;
/// The largest IP packet (IPv4's total length; IPv6's payload length without jumbograms).
const MAX_IP: usize = 65535;
const END: u32 = u32::MAX;
const TCP_ACK: u8 = 0x10;

/// What a write needs of a TCP segment or a UDP datagram.
#[derive(Clone, Copy, Debug)]
struct Segment {
    v6: bool,
    udp: bool,
    ip_len: usize,
    /// The transport header's length: TCP's with its options, or UDP's 8.
    l4_len: usize,
    /// TCP's sequence number (0 for UDP).
    seq: u32,
    payload: usize,
    /// Data and not a fragment; for TCP, only ACK or ACK and PSH: a segment that may be merged.
    mergeable: bool,
    psh: bool,
}

impl Segment {
    fn parse(pkt: &[u8]) -> Option<Self> {
        let transport = |p: u8| p == PROTO_TCP || p == PROTO_UDP;
        let (v6, ip_len, fragment, protocol) = match pkt.first().map(|b| b >> 4) {
            Some(4) if pkt.len() >= 20 && transport(pkt[9]) => {
                let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
                // More fragments, or an offset: the segment is in pieces.
                let fragment = pkt[6] & 0x3f != 0 || pkt[7] != 0;
                (total == pkt.len()).then_some(())?;
                (false, usize::from(pkt[0] & 0x0f) * 4, fragment, pkt[9])
            }
            Some(6) if pkt.len() >= 40 && transport(pkt[6]) => {
                let payload = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
                (payload + 40 == pkt.len()).then_some(())?;
                (true, 40, false, pkt[6])
            }
            _ => return None,
        };
        if protocol == PROTO_UDP {
            let udp = pkt
                .get(ip_len..)
                .filter(|u| ip_len >= 20 && u.len() >= UDP_HEADER)?;
            // The length field must agree with the IP header's: the cut makes it anew.
            (usize::from(u16::from_be_bytes([udp[4], udp[5]])) == udp.len()).then_some(())?;
            let payload = udp.len() - UDP_HEADER;
            return Some(Self {
                v6,
                udp: true,
                ip_len,
                l4_len: UDP_HEADER,
                seq: 0,
                payload,
                mergeable: payload > 0 && !fragment,
                psh: false,
            });
        }
        let tcp = pkt
            .get(ip_len..)
            .filter(|t| ip_len >= 20 && t.len() >= 20)?;
        let tcp_len = usize::from(tcp[12] >> 4) * 4;
        if tcp_len < 20 || tcp_len > tcp.len() {
            return None;
        }
        let flags = tcp[TCP_FLAGS];
        let payload = tcp.len() - tcp_len;
        Some(Self {
            v6,
            udp: false,
            ip_len,
            l4_len: tcp_len,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            payload,
            mergeable: (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH) && payload > 0 && !fragment,
            psh: flags & TCP_PSH != 0,
        })
    }

    fn headers(&self) -> usize {
        self.ip_len + self.l4_len
    }

    fn protocol(&self) -> u8 {
        if self.udp {
            PROTO_UDP
        } else {
            PROTO_TCP
        }
    }

    /// The addresses, in the IP header.
    fn addresses(&self) -> std::ops::Range<usize> {
        if self.v6 {
            8..40
        } else {
            12..20
        }
    }
}

/// One write: a packet alone, or segments merged.
#[derive(Clone, Copy, Debug)]
struct Group {
    first: u32,
    last: u32,
    members: usize,
    /// The first member, when it is TCP or UDP.
    head: Option<Segment>,
    /// Payload bytes of all members.
    payload: usize,
    last_payload: usize,
    last_psh: bool,
    /// The first member's checksum was checked (done when a second one joins).
    head_checked: bool,
}

impl Group {
    /// The first member, when segments were merged: the write then needs new headers.
    fn merged(&self) -> Option<Segment> {
        self.head.filter(|_| self.members > 1)
    }
}

/// Plans the writes of a batch. Keeps its buffers from batch to batch: no allocation once warm.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// For each packet of the batch, the next member of its group, or `END`.
    next: Vec<u32>,
    groups: Vec<Group>,
}

impl Coalescer {
    /// Groups `pkts` (whole IP packets) into writes and returns how many. Writing the groups in
    /// order keeps every flow's packets in order; packets of different flows may pass each
    /// other, as they may on any link. UDP datagrams merge only with `udp`: where the device
    /// takes UDP super-packets (Linux 6.2 and later), which would otherwise refuse each such
    /// write whole.
    pub fn plan<P: AsRef<[u8]>>(&mut self, pkts: &[P], udp: bool) -> usize {
        self.groups.clear();
        self.next.clear();
        self.next.resize(pkts.len(), END);
        for (i, pkt) in pkts.iter().enumerate() {
            let pkt = pkt.as_ref();
            let segment = Segment::parse(pkt);
            if let Some(s) = segment {
                if let Some(g) = self.joinable(pkts, pkt, &s, udp) {
                    let group = &mut self.groups[g];
                    self.next[group.last as usize] = i as u32;
                    group.last = i as u32;
                    group.members += 1;
                    group.payload += s.payload;
                    group.last_payload = s.payload;
                    group.last_psh = s.psh;
                    group.head_checked = true;
                    continue;
                }
            }
            self.groups.push(Group {
                first: i as u32,
                last: i as u32,
                members: 1,
                head: segment,
                payload: segment.map_or(0, |s| s.payload),
                last_payload: segment.map_or(0, |s| s.payload),
                last_psh: segment.is_some_and(|s| s.psh),
                head_checked: false,
            });
        }
        self.groups.len()
    }

    /// The group `pkt` (parsed as `s`) may join: the latest one of its flow, if that can take
    /// it. A segment never joins an earlier group of its flow, which would put it ahead of
    /// packets of the flow written between.
    fn joinable<P: AsRef<[u8]>>(
        &self,
        pkts: &[P],
        pkt: &[u8],
        s: &Segment,
        udp: bool,
    ) -> Option<usize> {
        let from = self.groups.len().saturating_sub(LOOK_BACK);
        let g = (from..self.groups.len()).rev().find(|&g| {
            self.groups[g].head.is_some_and(|head| {
                same_flow(pkts[self.groups[g].first as usize].as_ref(), &head, pkt, s)
            })
        })?;
        let group = &self.groups[g];
        let head = group.head?;
        let first = pkts[group.first as usize].as_ref();
        let fits = head.mergeable
            && s.mergeable
            && (udp || !s.udp)
            && group.members < MAX_SEGMENTS
            && !group.last_psh
            // Every segment but the last is as long as the first.
            && group.last_payload == head.payload
            && s.payload <= head.payload
            && (s.udp || s.seq == head.seq.wrapping_add(group.payload as u32))
            && merged_len(&head, group.payload + s.payload) <= MAX_IP
            && (s.ip_len, s.l4_len) == (head.ip_len, head.l4_len)
            && same_headers(first, &head, pkt)
            && checksum_ok(pkt, s)
            && (group.head_checked || checksum_ok(first, &head));
        fits.then_some(g)
    }

    /// Writes the header of write `k` into `out` and returns its length: the offload header,
    /// then, for merged segments, the IP and transport headers of the super-packet.
    pub fn header<P: AsRef<[u8]>>(
        &self,
        k: usize,
        pkts: &[P],
        out: &mut [u8; MAX_WRITE_HEADER],
    ) -> usize {
        let group = &self.groups[k];
        let Some(head) = group.merged() else {
            // A zeroed header: no offload asked of the kernel.
            out[..OFFLOAD_HEADER_LEN].fill(0);
            return OFFLOAD_HEADER_LEN;
        };
        let first = pkts[group.first as usize].as_ref();
        let headers = head.headers();
        let ip_len = head.ip_len;
        let (gso, checksum_offset) = match (head.udp, head.v6) {
            (true, _) => (Gso::Udp, UDP_CHECKSUM),
            (false, true) => (Gso::TcpV6, TCP_CHECKSUM),
            (false, false) => (Gso::TcpV4, TCP_CHECKSUM),
        };
        let offload = OffloadHeader {
            needs_checksum: true,
            gso,
            gso_size: head.payload as u16,
            csum_start: ip_len as u16,
            csum_offset: checksum_offset,
        };
        // Lengths below fit 16 bits: `plan` kept the merged packet within `MAX_IP`.
        out[..OFFLOAD_HEADER_LEN].copy_from_slice(&offload.encode(headers as u16));
        let packet = &mut out[OFFLOAD_HEADER_LEN..OFFLOAD_HEADER_LEN + headers];
        packet.copy_from_slice(&first[..headers]);
        let l4_total = head.l4_len + group.payload;
        if head.v6 {
            packet[4..6].copy_from_slice(&(l4_total as u16).to_be_bytes());
        } else {
            packet[2..4].copy_from_slice(&((ip_len + l4_total) as u16).to_be_bytes());
            packet[10..12].fill(0);
            let ip_checksum = !fold(sum(&packet[..ip_len], 0));
            packet[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        }
        if group.last_psh {
            packet[ip_len + TCP_FLAGS] |= TCP_PSH;
        }
        if head.udp {
            // The whole super-packet's length: the kernel swaps it (in the checksum too) for
            // each datagram's as it cuts.
            packet[ip_len + 4..ip_len + 6].copy_from_slice(&(l4_total as u16).to_be_bytes());
        }
        // A partial checksum, as the kernel keeps one: the pseudo-header's sum, not inverted;
        // the kernel (or the NIC) adds the rest.
        let pseudo = fold(sum(
            &first[head.addresses()],
            u64::from(head.protocol()) + l4_total as u64,
        ));
        let at = ip_len + usize::from(checksum_offset);
        packet[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
        OFFLOAD_HEADER_LEN + headers
    }

    /// What follows write `k`'s header: the whole packet when it goes alone, else each merged
    /// segment's payload.
    pub fn payloads<'a, P: AsRef<[u8]>>(
        &'a self,
        k: usize,
        pkts: &'a [P],
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        let skip = self.groups[k].merged().map_or(0, |head| head.headers());
        self.indices(k).map(move |i| &pkts[i].as_ref()[skip..])
    }

    /// The packets of the batch write `k` carries, by their index, in order.
    pub fn indices(&self, k: usize) -> impl Iterator<Item = usize> + '_ {
        let mut at = self.groups[k].first;
        std::iter::from_fn(move || {
            let i = at as usize;
            at = *self.next.get(i)?;
            Some(i)
        })
    }

    /// How many packets write `k` carries.
    pub fn members(&self, k: usize) -> usize {
        self.groups[k].members
    }
}

/// Length of the packet `head`'s headers with `payload` bytes behind them, as its length field
/// counts it.
fn merged_len(head: &Segment, payload: usize) -> usize {
    if head.v6 {
        head.l4_len + payload
    } else {
        head.headers() + payload
    }
}

/// Both are TCP, or both UDP, between the same addresses and ports.
fn same_flow(a: &[u8], sa: &Segment, b: &[u8], sb: &Segment) -> bool {
    (sa.v6, sa.udp) == (sb.v6, sb.udp)
        && a[sa.addresses()] == b[sb.addresses()]
        && a[sa.ip_len..sa.ip_len + 4] == b[sb.ip_len..sb.ip_len + 4]
}

/// `b`'s headers equal `a`'s (parsed as `head`) but for what each segment of a super-packet has
/// of its own: the IP length, identification and checksum; TCP's sequence number, PSH and
/// checksum; UDP's length and checksum.
fn same_headers(a: &[u8], head: &Segment, b: &[u8]) -> bool {
    let ip = head.ip_len;
    let l4_len = head.l4_len;
    let ip_same = if head.v6 {
        a[..4] == b[..4] && a[6..40] == b[6..40]
    } else {
        a[..2] == b[..2] && a[6..10] == b[6..10] && a[12..ip] == b[12..ip]
    };
    // Both hold `ip + l4_len` bytes of headers (the caller checked their lengths match).
    let ports_same = a[ip..ip + 4] == b[ip..ip + 4];
    // TCP's acknowledgement, header length; window; urgent pointer and options.
    let tcp_same = head.udp
        || (a[ip + 8..ip + 13] == b[ip + 8..ip + 13]
            && a[ip + 14..ip + 16] == b[ip + 14..ip + 16]
            && a[ip + 18..ip + l4_len] == b[ip + 18..ip + l4_len]);
    ip_same && ports_same && tcp_same
}

/// The segment's checksums are right: the transport's, and IPv4's over its header, which the
/// kernel's own GRO checks too (a merged packet gets a header made anew). A UDP datagram sent
/// without a checksum (0 over IPv4) fails here and goes alone, as it came.
fn checksum_ok(pkt: &[u8], s: &Segment) -> bool {
    let pseudo = sum(
        &pkt[s.addresses()],
        u64::from(s.protocol()) + (s.l4_len + s.payload) as u64,
    );
    (s.v6 || fold(sum(&pkt[..s.ip_len], 0)) == 0xffff)
        && fold(sum(&pkt[s.ip_len..], pseudo)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{self, OffloadHeader};
    use crate::packet::checksum;
    use crate::packet::testing::ip_packet;
    use proptest::prelude::*;

    /// A TCP segment of flow `flow` (which also picks the family) with valid checksums.
    fn segment(flow: u8, v6: bool, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let ip = if v6 { 40 } else { 20 };
        // Timestamps, as Linux sends them: every segment of a flow has the same here.
        let tcp_len = 32;
        let mut p = ip_packet(v6, PROTO_TCP, ip + tcp_len + payload.len());
        if !v6 {
            p[6] = 0x40;
            let c = checksum(&[&p[..20]]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        p[ip..ip + 2].copy_from_slice(&(40000 + u16::from(flow)).to_be_bytes());
        p[ip + 2..ip + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[ip + 4..ip + 8].copy_from_slice(&seq.to_be_bytes());
        p[ip + 8..ip + 12].copy_from_slice(&7u32.to_be_bytes());
        p[ip + 12] = (tcp_len as u8 / 4) << 4;
        p[ip + TCP_FLAGS] = flags;
        p[ip + 14..ip + 16].copy_from_slice(&512u16.to_be_bytes());
        p[ip + 20..ip + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        p[ip + tcp_len..].copy_from_slice(payload);
        let s = Segment::parse(&p).expect("a TCP segment");
        let pseudo = sum(
            &p[s.addresses()],
            u64::from(PROTO_TCP) + (tcp_len + payload.len()) as u64,
        );
        let c = !fold(sum(&p[ip..], pseudo));
        p[ip + 16..ip + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// A UDP datagram of flow `flow` with a valid checksum.
    fn datagram(flow: u8, v6: bool, payload: &[u8]) -> Vec<u8> {
        let ip = if v6 { 40 } else { 20 };
        let mut p = ip_packet(v6, PROTO_UDP, ip + UDP_HEADER + payload.len());
        if !v6 {
            let c = checksum(&[&p[..20]]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        p[ip..ip + 2].copy_from_slice(&(50000 + u16::from(flow)).to_be_bytes());
        p[ip + 2..ip + 4].copy_from_slice(&5201u16.to_be_bytes());
        let udp_len = (UDP_HEADER + payload.len()) as u16;
        p[ip + 4..ip + 6].copy_from_slice(&udp_len.to_be_bytes());
        p[ip + UDP_HEADER..].copy_from_slice(payload);
        let s = Segment::parse(&p).expect("a UDP datagram");
        let pseudo = sum(&p[s.addresses()], u64::from(PROTO_UDP) + u64::from(udp_len));
        let c = !fold(sum(&p[ip..], pseudo));
        p[ip + 6..ip + 8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
        p
    }

    /// The packets the kernel makes of each write, in write order: a merged write is cut as
    /// the kernel cuts it (`offload::split` is held to its cut), its checksum finished.
    fn written(c: &Coalescer, pkts: &[Vec<u8>]) -> Vec<Vec<Vec<u8>>> {
        (0..c.groups.len())
            .map(|k| {
                let mut header = [0u8; MAX_WRITE_HEADER];
                let n = c.header(k, pkts, &mut header);
                let mut write = header[..n].to_vec();
                c.payloads(k, pkts).for_each(|p| write.extend_from_slice(p));
                let hdr = OffloadHeader::decode(&write).expect("a header");
                let mut out = Vec::new();
                offload::split(&hdr, &mut write[OFFLOAD_HEADER_LEN..], |h, p| {
                    out.push([h, p].concat())
                })
                .expect("a write the kernel takes");
                out
            })
            .collect()
    }

    /// IPv4's identification (and so its header checksum) is the one field a cut makes anew.
    fn without_ip_id(p: &[u8]) -> Vec<u8> {
        let mut p = p.to_vec();
        if p[0] >> 4 == 4 {
            p[4..6].fill(0);
            p[10..12].fill(0);
        }
        p
    }

    /// Each flow sends data segments of up to `mss` bytes in order; some segments are pure
    /// ACKs, FINs or carry PSH; flows interleave; UDP datagrams of four flows come between,
    /// runs of them as long as each other.
    fn batch() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let step = (0u8..4, 0u8..10, 1usize..1400, any::<u8>());
        (
            any::<bool>(),
            100usize..1400,
            proptest::collection::vec(step, 0..80),
        )
            .prop_map(|(v6, mss, steps)| {
                let mut seqs = [0xffff_f000u32; 4];
                steps
                    .into_iter()
                    .map(|(flow, kind, len, fill)| {
                        let seq = &mut seqs[usize::from(flow)];
                        let payload = vec![fill; len.min(mss)];
                        let (flags, payload) = match kind {
                            0 => (TCP_ACK, Vec::new()),
                            1 => (TCP_ACK | 0x01, Vec::new()),
                            2 => (TCP_ACK | TCP_PSH, payload),
                            3 => return datagram(flow, v6, &payload),
                            4 | 5 => return datagram(flow, v6, &vec![fill; mss]),
                            // Mostly full-size segments, as a bulk transfer sends.
                            _ => (TCP_ACK, vec![fill; mss]),
                        };
                        let p = segment(flow, v6, *seq, flags, &payload);
                        *seq = seq.wrapping_add(payload.len() as u32);
                        p
                    })
                    .collect()
            })
    }

    proptest! {
        /// What the kernel cuts out of the writes is the batch itself, each flow in its order.
        #[test]
        fn the_kernel_gets_back_every_packet_in_its_flows_order(pkts in batch()) {
            let mut c = Coalescer::default();
            let writes = c.plan(&pkts, true);
            prop_assert!(writes <= pkts.len());
            let out: Vec<Vec<u8>> = written(&c, &pkts).into_iter().flatten().collect();
            prop_assert_eq!(out.len(), pkts.len());
            let flow_of = |p: &[u8]| {
                let ip = if p[0] >> 4 == 6 { 40 } else { 20 };
                (p[if ip == 40 { 6 } else { 9 }], p[ip..ip + 4].to_vec())
            };
            for p in &pkts {
                let flow = flow_of(p);
                let ours: Vec<Vec<u8>> = pkts.iter().filter(|q| flow_of(q) == flow).map(|q| without_ip_id(q)).collect();
                let theirs: Vec<Vec<u8>> = out.iter().filter(|q| flow_of(q) == flow).map(|q| without_ip_id(q)).collect();
                prop_assert_eq!(ours, theirs);
            }
        }

        /// A merged write's headers are valid: the IPv4 header checksum holds, and the partial
        /// TCP checksum, finished over the super-packet, checks out.
        #[test]
        fn merged_headers_are_valid(pkts in batch()) {
            let mut c = Coalescer::default();
            for k in 0..c.plan(&pkts, true) {
                if c.members(k) < 2 {
                    continue;
                }
                let mut header = [0u8; MAX_WRITE_HEADER];
                let n = c.header(k, &pkts, &mut header);
                let mut packet = header[OFFLOAD_HEADER_LEN..n].to_vec();
                c.payloads(k, &pkts).for_each(|p| packet.extend_from_slice(p));
                let hdr = OffloadHeader::decode(&header).expect("a header");
                let v6 = packet[0] >> 4 == 6;
                if !v6 {
                    prop_assert_eq!(checksum(&[&packet[..20]]), 0);
                }
                let whole = OffloadHeader { gso: Gso::None, ..hdr };
                let mut finished = Vec::new();
                offload::split(&whole, &mut packet, |h, _| finished = h.to_vec()).expect("finished");
                let s = Segment::parse(&finished).expect("a TCP or UDP super-packet");
                prop_assert!(checksum_ok(&finished, &s));
                prop_assert_eq!(finished.len() - s.headers(), c.payloads(k, &pkts).map(<[u8]>::len).sum::<usize>());
            }
        }

        /// Any bytes: planning and writing never panic, and every packet is written once.
        #[test]
        fn any_batch_is_planned(pkts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..20)) {
            let mut c = Coalescer::default();
            let mut written = 0;
            for k in 0..c.plan(&pkts, true) {
                let mut header = [0u8; MAX_WRITE_HEADER];
                c.header(k, &pkts, &mut header);
                written += c.payloads(k, &pkts).count();
            }
            prop_assert_eq!(written, pkts.len());
        }
    }

    #[test]
    fn a_bulk_stream_merges_into_full_super_packets() {
        let mss = 1362;
        let pkts: Vec<Vec<u8>> = (0..100u32)
            .map(|i| segment(0, false, i * mss as u32, TCP_ACK, &[i as u8; 1362]))
            .collect();
        let mut c = Coalescer::default();
        // 65535 bytes hold 48 segments of 1362 behind 52 bytes of headers.
        assert_eq!(c.plan(&pkts, true), 3);
        assert_eq!(
            (0..3).map(|k| c.members(k)).collect::<Vec<_>>(),
            [48, 48, 4]
        );
    }

    #[test]
    fn a_udp_stream_merges_and_the_kernel_cuts_it_into_the_same_datagrams() {
        for v6 in [false, true] {
            let mut pkts: Vec<Vec<u8>> = (0..80u8).map(|i| datagram(0, v6, &[i; 1000])).collect();
            // A shorter one ends a write; the next starts another.
            pkts.insert(70, datagram(0, v6, &[9; 300]));
            let mut c = Coalescer::default();
            assert_eq!(c.plan(&pkts, true), 3);
            assert_eq!(
                (0..3).map(|k| c.members(k)).collect::<Vec<_>>(),
                [MAX_SEGMENTS, 7, 10]
            );
            let cut: Vec<Vec<u8>> = written(&c, &pkts).into_iter().flatten().collect();
            assert_eq!(
                cut.iter().map(|p| without_ip_id(p)).collect::<Vec<_>>(),
                pkts.iter().map(|p| without_ip_id(p)).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn udp_datagrams_without_a_checksum_or_of_other_flows_do_not_merge() {
        let mut unchecked = datagram(0, false, &[1; 1000]);
        unchecked[26..28].fill(0);
        let pkts = [
            datagram(0, false, &[1; 1000]),
            unchecked,
            datagram(1, false, &[1; 1000]),
            datagram(0, false, &[1; 1000]),
        ];
        let mut c = Coalescer::default();
        assert_eq!(c.plan(&pkts, true), 4);
        // A device without UDP offloads gets each datagram alone.
        let stream: Vec<Vec<u8>> = (0..4).map(|_| datagram(0, true, &[1; 1000])).collect();
        assert_eq!(c.plan(&stream, true), 1);
        assert_eq!(c.plan(&stream, false), 4);
    }

    #[test]
    fn a_segment_with_a_bad_checksum_is_written_alone() {
        let mut pkts: Vec<Vec<u8>> = (0..4u32)
            .map(|i| segment(0, true, i * 1000, TCP_ACK, &[7; 1000]))
            .collect();
        let last = pkts[2].len() - 1;
        pkts[2][last] ^= 1;
        let mut c = Coalescer::default();
        // The two before merge; the bad one goes alone; the one after cannot follow it.
        assert_eq!(c.plan(&pkts, true), 3);
        assert_eq!((0..3).map(|k| c.members(k)).collect::<Vec<_>>(), [2, 1, 1]);
        let alone: Vec<&[u8]> = c.payloads(1, &pkts).collect();
        assert_eq!(alone, [pkts[2].as_slice()]);
    }

    #[test]
    fn segments_after_a_shorter_one_or_a_push_start_a_new_write() {
        let mut c = Coalescer::default();
        let short = [
            segment(0, false, 0, TCP_ACK, &[1; 1000]),
            segment(0, false, 1000, TCP_ACK, &[1; 500]),
            segment(0, false, 1500, TCP_ACK, &[1; 500]),
        ];
        assert_eq!(c.plan(&short, true), 2);
        let push = [
            segment(0, false, 0, TCP_ACK | TCP_PSH, &[1; 1000]),
            segment(0, false, 1000, TCP_ACK, &[1; 1000]),
        ];
        assert_eq!(c.plan(&push, true), 2);
        let gap = [
            segment(0, false, 0, TCP_ACK, &[1; 1000]),
            segment(0, false, 2000, TCP_ACK, &[1; 1000]),
        ];
        assert_eq!(c.plan(&gap, true), 2);
    }
}
