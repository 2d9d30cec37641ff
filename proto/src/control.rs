//! Control messages, carried on one bidirectional QUIC stream that the EN opens.
//!
//! Each frame is `type: u8, length: u16, body`. IP packets never travel here: they are QUIC
//! DATAGRAM frames, one packet each.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::dns::{DnsSettings, MAX_SEARCH, MAX_SERVERS};
use crate::lease::{LeaseTicket, TicketError};
use crate::wire::{truncate_str, DecodeError, Reader, Writer};

const FRAME_HEADER: usize = 3;
/// Largest body a frame may carry; bigger announced lengths are rejected before buffering.
pub const MAX_BODY: usize = u16::MAX as usize;
/// At most this many routes are pushed, so that a `Leased` frame always fits.
pub const MAX_ROUTES: usize = 256;
/// At most this many DNs are named in a lease's failover order.
pub const MAX_FAILOVER: usize = 64;
/// A refusal's reason is cut to this many bytes, so that the frame stays small.
pub const MAX_REASON: usize = 1024;

const T_ATTACH: u8 = 1;
const T_LEASED: u8 = 2;
const T_REFUSED: u8 = 3;
const T_PROMOTED: u8 = 4;
const T_HOME_IS_BACK: u8 = 5;
const T_DEMOTE: u8 = 6;
const T_PEER_DOWN: u8 = 7;
const T_SWITCH: u8 = 8;
const T_DRAIN: u8 = 9;
const T_UNDRAIN: u8 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// EN -> DN, first message of a session: "carry me", with the ticket from an earlier lease
    /// when the EN has one (reconnect, or a secondary session).
    Attach { ticket: Option<LeaseTicket> },
    /// DN -> EN: the lease. The address is `ticket.claim.address`.
    Leased(Lease),
    /// DN -> EN: the DN will not carry this client; the session closes after it.
    Refused { code: RefuseCode, reason: String },
    /// DN -> EN, on a secondary session: the client's traffic arrived here, so this DN has made
    /// itself the client's primary and now routes its address (thesis 4.2).
    Promoted,
    /// DN -> EN, from a DN carrying the client for its dead home DN: the home DN is back. The
    /// EN moves its traffic home as soon as its session to the home DN is up (thesis 3.1).
    HomeIsBack,
    /// EN -> DN: this DN is no longer the client's primary (it went home); the DN stops routing
    /// the client's address. A later data packet would promote it again.
    Demote,
    /// DN -> EN, on a secondary session: the cluster's failure detector found DN `dn` down
    /// (its host silent, or its process dead). An EN whose primary it is switches now, before
    /// its own probes could tell.
    PeerDown { dn: String },
    /// EN -> DN: the client's traffic comes through this DN from now on (it failed over here,
    /// or came home). Data would say so too, but this is ordered after an earlier `Demote` on
    /// the same stream, so a DN that was just left and is chosen again knows at once.
    Switch,
    /// DN -> EN: the DN is being drained (taken out of service by its operator): move the
    /// traffic to another DN now, while this one still delivers, and do not come back until
    /// `Undrain`.
    Drain,
    /// DN -> EN: the drain is over; a client whose home this DN is goes home.
    Undrain,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ticket: LeaseTicket,
    /// The DN's own address in its pool; source of ICMP errors about the tunnel.
    pub gateway: IpAddr,
    /// The largest inner packet the DN forwards to this client.
    pub mtu: u16,
    /// Networks the EN routes into the tunnel.
    pub routes: Vec<IpNet>,
    /// DN names in the order the client should fail over to them: the designated backup of
    /// its block first, whose standing route the edge already holds.
    pub failover: Vec<String>,
    /// DNS servers and search domains of the address's pool; empty when the cluster pushes
    /// none. On the wire an optional trailing section, absent when empty: a lease without DNS
    /// is byte for byte what clients before it decode.
    pub dns: DnsSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseCode {
    /// The ticket does not verify, is expired, or names another identity.
    BadTicket = 1,
    /// The ticket's address belongs to another client or is not this DN's to give.
    AddressUnavailable = 2,
    PoolExhausted = 3,
    /// The client's certificate was revoked in `cluster.toml`.
    Revoked = 4,
    ProtocolError = 5,
}

impl RefuseCode {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::BadTicket,
            2 => Self::AddressUnavailable,
            3 => Self::PoolExhausted,
            4 => Self::Revoked,
            5 => Self::ProtocolError,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "refuse code",
                    tag,
                })
            }
        })
    }
}

/// `n`, unless it exceeds the protocol's `max`.
fn at_most(n: usize, max: usize, what: &'static str) -> Result<usize, DecodeError> {
    if n > max {
        return Err(DecodeError::Invalid {
            what,
            detail: format!("{n} > {max}"),
        });
    }
    Ok(n)
}

fn ticket_error(e: TicketError) -> DecodeError {
    match e {
        TicketError::Malformed(d) => d,
        other => DecodeError::Invalid {
            what: "ticket",
            detail: other.to_string(),
        },
    }
}

/// The lease's DNS section. Present only when it says something, and every value checked as
/// `cluster.toml` checks it: the client writes these into a system file.
fn decode_dns(r: &mut Reader) -> Result<DnsSettings, DecodeError> {
    let invalid = |detail: String| DecodeError::Invalid {
        what: "DNS settings",
        detail,
    };
    let count = at_most(
        r.u8("DNS server count")?.into(),
        MAX_SERVERS,
        "DNS server count",
    )?;
    let servers = (0..count)
        .map(|_| r.ip("DNS server"))
        .collect::<Result<_, _>>()?;
    let count = at_most(
        r.u8("DNS search count")?.into(),
        MAX_SEARCH,
        "DNS search count",
    )?;
    let search = (0..count)
        .map(|_| r.short_str("DNS search domain"))
        .collect::<Result<_, _>>()?;
    let dns = DnsSettings { servers, search };
    if dns.is_empty() {
        // The encoder leaves an empty section out; one that is there must say something.
        return Err(invalid("an empty section".into()));
    }
    dns.check().map_err(invalid)?;
    Ok(dns)
}

impl Message {
    /// Appends one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER]);
        let mut w = Writer::new(out);
        let kind = match self {
            Message::Attach { ticket } => {
                match ticket {
                    Some(t) => {
                        let bytes = t.encode();
                        w.u16(bytes.len() as u16);
                        w.bytes(&bytes);
                    }
                    None => w.u16(0),
                }
                T_ATTACH
            }
            Message::Leased(lease) => {
                let bytes = lease.ticket.encode();
                w.u16(bytes.len() as u16);
                w.bytes(&bytes);
                w.ip(lease.gateway);
                w.u16(lease.mtu);
                let routes = &lease.routes[..lease.routes.len().min(MAX_ROUTES)];
                w.u16(routes.len() as u16);
                for r in routes {
                    w.net(*r);
                }
                let failover = &lease.failover[..lease.failover.len().min(MAX_FAILOVER)];
                w.u8(failover.len() as u8);
                for name in failover {
                    w.short_str(name);
                }
                if !lease.dns.is_empty() {
                    let servers = &lease.dns.servers[..lease.dns.servers.len().min(MAX_SERVERS)];
                    w.u8(servers.len() as u8);
                    for s in servers {
                        w.ip(*s);
                    }
                    let search = &lease.dns.search[..lease.dns.search.len().min(MAX_SEARCH)];
                    w.u8(search.len() as u8);
                    for d in search {
                        w.short_str(d);
                    }
                }
                T_LEASED
            }
            Message::Refused { code, reason } => {
                w.u8(*code as u8);
                // Keep the frame bounded whatever the reason's length.
                w.long_str(truncate_str(reason, MAX_REASON));
                T_REFUSED
            }
            Message::Promoted => T_PROMOTED,
            Message::HomeIsBack => T_HOME_IS_BACK,
            Message::Demote => T_DEMOTE,
            Message::PeerDown { dn } => {
                w.short_str(dn);
                T_PEER_DOWN
            }
            Message::Switch => T_SWITCH,
            Message::Drain => T_DRAIN,
            Message::Undrain => T_UNDRAIN,
        };
        let body_len = out.len() - start - FRAME_HEADER;
        out[start] = kind;
        out[start + 1..start + 3].copy_from_slice(&(body_len as u16).to_be_bytes());
    }

    /// Decodes the first frame of `buf`. `Ok(None)` means more bytes are needed; otherwise
    /// returns the message and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
        if buf.len() < FRAME_HEADER {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        if buf.len() < FRAME_HEADER + len {
            return Ok(None);
        }
        let mut r = Reader::new(&buf[FRAME_HEADER..FRAME_HEADER + len]);
        let msg = match kind {
            T_ATTACH => {
                let n = r.u16("ticket length")? as usize;
                let ticket = match n {
                    0 => None,
                    n => Some(LeaseTicket::decode(r.take(n, "ticket")?).map_err(ticket_error)?),
                };
                Message::Attach { ticket }
            }
            T_LEASED => {
                let n = r.u16("ticket length")? as usize;
                let ticket = LeaseTicket::decode(r.take(n, "ticket")?).map_err(ticket_error)?;
                let gateway = r.ip("gateway")?;
                let mtu = r.u16("mtu")?;
                let count = at_most(r.u16("route count")?.into(), MAX_ROUTES, "route count")?;
                let routes = (0..count)
                    .map(|_| r.net("route"))
                    .collect::<Result<_, _>>()?;
                // More than the encoder ever writes is malformed, not a longer list: what is
                // decoded must encode back to the same frame.
                let names = at_most(
                    r.u8("failover count")?.into(),
                    MAX_FAILOVER,
                    "failover count",
                )?;
                let failover = (0..names)
                    .map(|_| r.short_str("failover DN"))
                    .collect::<Result<_, _>>()?;
                let dns = if r.remaining() == 0 {
                    DnsSettings::default()
                } else {
                    decode_dns(&mut r)?
                };
                Message::Leased(Lease {
                    ticket,
                    gateway,
                    mtu,
                    routes,
                    failover,
                    dns,
                })
            }
            T_REFUSED => {
                let code = RefuseCode::from_u8(r.u8("refuse code")?)?;
                let reason = r.long_str("refuse reason")?;
                at_most(reason.len(), MAX_REASON, "refuse reason length")?;
                Message::Refused { code, reason }
            }
            T_PROMOTED => Message::Promoted,
            T_HOME_IS_BACK => Message::HomeIsBack,
            T_DEMOTE => Message::Demote,
            T_PEER_DOWN => Message::PeerDown {
                dn: r.short_str("dn name")?,
            },
            T_SWITCH => Message::Switch,
            T_DRAIN => Message::Drain,
            T_UNDRAIN => Message::Undrain,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "control message",
                    tag,
                })
            }
        };
        r.finish()?;
        Ok(Some((msg, FRAME_HEADER + len)))
    }
}

/// QUIC application close codes, so each end can tell the other (and its logs) why a session ended.
pub mod close {
    /// The DN refused the client (a `Refused` message says why).
    pub const REFUSED: u32 = 1;
    /// A newer session of the same client took over its address.
    pub const REPLACED: u32 = 2;
    /// The peer is shutting down in an orderly way.
    pub const SHUTDOWN: u32 = 3;
    /// The peer broke the control protocol.
    pub const PROTOCOL: u32 = 4;

    pub fn describe(code: u64) -> &'static str {
        match code {
            0x1 => "refused",
            0x2 => "replaced by a newer session",
            0x3 => "peer shut down",
            0x4 => "protocol error",
            _ => "unknown reason",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseClaim;
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    fn ticket(address: u32, expires_at: u64) -> LeaseTicket {
        LeaseClaim {
            identity: "laptop-1".into(),
            address: std::net::Ipv4Addr::from(address).into(),
            issuer: "dn1".into(),
            block: "0.0.0.0/0".parse().unwrap(),
            issued_at: 0,
            expires_at,
            address6: None,
        }
        .sign(&SigningKey::from_bytes(&[3; 32]))
    }

    /// Valid settings (distinct servers and domains), empty as often as not.
    fn arb_dns() -> impl Strategy<Value = DnsSettings> {
        (
            proptest::collection::btree_set(1u32..u32::MAX / 2, 0..=MAX_SERVERS),
            proptest::collection::btree_set(
                "[a-z][a-z0-9]{0,10}(\\.[a-z]{2,6}){0,2}",
                0..=MAX_SEARCH,
            ),
        )
            .prop_map(|(servers, search)| DnsSettings {
                servers: servers
                    .into_iter()
                    .map(|s| std::net::Ipv4Addr::from(s).into())
                    .collect(),
                search: search.into_iter().collect(),
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let net = (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
            IpNet::new(std::net::Ipv4Addr::from(a).into(), l)
                .unwrap()
                .trunc()
        });
        prop_oneof![
            (any::<bool>(), any::<u32>(), any::<u64>()).prop_map(|(some, a, e)| Message::Attach {
                ticket: some.then(|| ticket(a, e))
            }),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u128>(),
                any::<u16>(),
                proptest::collection::vec(net, 0..20),
                proptest::collection::vec("[a-z0-9-]{1,20}", 0..5),
                arb_dns(),
            )
                .prop_map(|(a, e, gw, mtu, routes, failover, dns)| Message::Leased(
                    Lease {
                        ticket: ticket(a, e),
                        gateway: std::net::Ipv6Addr::from(gw).into(),
                        mtu,
                        routes,
                        failover,
                        dns,
                    }
                )),
            (1u8..=5, "\\PC{0,100}").prop_map(|(c, reason)| Message::Refused {
                code: RefuseCode::from_u8(c).unwrap(),
                reason
            }),
            Just(Message::Promoted),
            Just(Message::HomeIsBack),
            Just(Message::Demote),
            Just(Message::Switch),
            Just(Message::Drain),
            Just(Message::Undrain),
            "[a-z0-9-]{1,30}".prop_map(|dn| Message::PeerDown { dn }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip_back_to_back(msgs in proptest::collection::vec(arb_message(), 1..4)) {
            let mut buf = Vec::new();
            for m in &msgs {
                m.encode(&mut buf);
            }
            let mut at = 0;
            for m in &msgs {
                let (back, used) = Message::decode(&buf[at..]).unwrap().unwrap();
                prop_assert_eq!(&back, m);
                at += used;
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn a_partial_frame_asks_for_more(m in arb_message(), cut in 0usize..1000) {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            let cut = cut % buf.len();
            prop_assert_eq!(Message::decode(&buf[..cut]).unwrap(), None);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn corrupted_bodies_are_errors_or_other_valid_messages(m in arb_message(), at in any::<usize>(), byte in any::<u8>()) {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            prop_assume!(buf.len() > FRAME_HEADER);
            let at = FRAME_HEADER + at % (buf.len() - FRAME_HEADER);
            buf[at] = byte;
            // Must not panic; if it decodes, it must re-encode to the same bytes.
            if let Ok(Some((back, used))) = Message::decode(&buf) {
                let mut again = Vec::new();
                back.encode(&mut again);
                prop_assert_eq!(&again[..], &buf[..used]);
            }
        }
    }

    #[test]
    fn bodiless_messages_have_no_body_and_reject_one() {
        for (m, tag) in [
            (Message::Promoted, T_PROMOTED),
            (Message::HomeIsBack, T_HOME_IS_BACK),
            (Message::Demote, T_DEMOTE),
        ] {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            assert_eq!(buf, [tag, 0, 0]);
            assert!(Message::decode(&[tag, 0, 1, 0]).is_err());
        }
    }

    /// Found writing the fuzz checks (fuzz/corpus/control/found-*): the decoder took longer
    /// reasons and failover lists than the encoder writes, so a decoded message did not encode
    /// back to its frame. The longest each writes is taken; one more is malformed.
    #[test]
    fn lists_and_reasons_longer_than_the_encoder_writes_are_rejected() {
        for (reason, ok) in [(MAX_REASON, true), (MAX_REASON + 1, false)] {
            let body = [
                &[1u8][..],
                &(reason as u16).to_be_bytes(),
                &vec![b'x'; reason],
            ]
            .concat();
            let frame = [&[T_REFUSED][..], &(body.len() as u16).to_be_bytes(), &body].concat();
            assert_eq!(
                Message::decode(&frame).is_ok(),
                ok,
                "reason of {reason} bytes"
            );
        }
        for (names, ok) in [(MAX_FAILOVER, true), (MAX_FAILOVER + 1, false)] {
            let mut frame = Vec::new();
            Message::Leased(Lease {
                ticket: ticket(7, 9),
                gateway: "10.200.0.1".parse().unwrap(),
                mtu: 1380,
                routes: vec![],
                failover: vec![],
                dns: DnsSettings::default(),
            })
            .encode(&mut frame);
            // Replace the empty failover list (its count, the last byte) with `names` empty names.
            frame.pop();
            frame.push(names as u8);
            frame.resize(frame.len() + names, 0);
            let len = (frame.len() - FRAME_HEADER) as u16;
            frame[1..3].copy_from_slice(&len.to_be_bytes());
            match Message::decode(&frame) {
                Ok(Some((m, _))) if ok => {
                    let mut again = Vec::new();
                    m.encode(&mut again);
                    assert_eq!(again, frame);
                }
                Err(DecodeError::Invalid { .. }) if !ok => {}
                other => panic!("{names} failover names: {other:?}"),
            }
        }
    }

    fn leased(dns: DnsSettings) -> Vec<u8> {
        let mut frame = Vec::new();
        Message::Leased(Lease {
            ticket: ticket(7, 9),
            gateway: "10.200.0.1".parse().unwrap(),
            mtu: 1380,
            routes: vec!["10.0.2.0/24".parse().unwrap()],
            failover: vec!["dn2".into()],
            dns,
        })
        .encode(&mut frame);
        frame
    }

    /// Appends `section` to a lease frame without DNS, fixing the frame's length.
    fn with_section(mut frame: Vec<u8>, section: &[u8]) -> Vec<u8> {
        frame.extend_from_slice(section);
        let len = (frame.len() - FRAME_HEADER) as u16;
        frame[1..3].copy_from_slice(&len.to_be_bytes());
        frame
    }

    /// A lease without DNS is the frame clients before the DNS section decode; one with DNS
    /// carries it as a trailing section that such clients reject (they refuse trailing bytes),
    /// so a cluster pushes DNS only once its clients are new enough.
    #[test]
    fn the_dns_section_is_optional_and_checked() {
        let plain = leased(DnsSettings::default());
        let dns = DnsSettings {
            servers: vec!["10.0.2.53".parse().unwrap()],
            search: vec!["corp.example".into()],
        };
        let full = leased(dns.clone());
        let section = [&[1u8, 4, 10, 0, 2, 53, 1, 12][..], b"corp.example"].concat();
        assert_eq!(full, with_section(plain.clone(), &section));
        match Message::decode(&full) {
            Ok(Some((Message::Leased(l), n))) => assert_eq!((l.dns, n), (dns, full.len())),
            other => panic!("{other:?}"),
        }
        match Message::decode(&plain) {
            Ok(Some((Message::Leased(l), _))) => assert!(l.dns.is_empty()),
            other => panic!("{other:?}"),
        }
        let bad = |section: &[u8]| Message::decode(&with_section(plain.clone(), section)).is_err();
        // Present but empty: not what the encoder writes.
        assert!(bad(&[0, 0]));
        // More servers or domains than allowed, before reading them.
        assert!(bad(&[4]));
        assert!(bad(&[0, 7]));
        // A domain that would write a second line into resolv.conf.
        let evil = b"corp.example\nnameserver 6.6.6.6";
        assert!(bad(&[&[0, 1, evil.len() as u8][..], evil].concat()));
        // The same server twice, a multicast server.
        assert!(bad(&[2, 4, 10, 0, 2, 53, 4, 10, 0, 2, 53, 0]));
        assert!(bad(&[1, 4, 224, 0, 0, 1, 0]));
        // Truncated, and trailing bytes after the section.
        assert!(bad(&[1, 4, 10, 0]));
        assert!(bad(&[1, 4, 10, 0, 2, 53, 0, 9]));
    }

    #[test]
    fn unknown_types_and_trailing_bytes_are_rejected() {
        assert!(Message::decode(&[99, 0, 0]).is_err());
        let mut buf = Vec::new();
        Message::Attach { ticket: None }.encode(&mut buf);
        buf[2] += 1;
        buf.push(0);
        assert!(matches!(
            Message::decode(&buf),
            Err(DecodeError::Trailing(1))
        ));
    }
}
