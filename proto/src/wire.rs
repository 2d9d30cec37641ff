//! Byte-level encoding shared by control messages and lease tickets.
//!
//! Big-endian integers, length-prefixed strings and lists, tagged IP addresses. The reader never
//! panics: every read checks the remaining length and returns [`DecodeError`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: needed {needed} more bytes while reading {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("{0} trailing bytes after the end of the message")]
    Trailing(usize),
}

const FAMILY_V4: u8 = 4;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
const FAMILY_V6: u8 = 6;

/// Appends encoded values to a caller-owned buffer.
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out }
    }

    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub fn bytes(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }

    /// A string of at most 255 bytes; longer strings are cut at a character boundary so that
    /// encoding never fails (names are validated to be short where they enter the system).
    pub fn short_str(&mut self, s: &str) {
        let s = truncate_str(s, u8::MAX as usize);
        self.u8(s.len() as u8);
        self.bytes(s.as_bytes());
    }

    /// A string of at most 65535 bytes, cut like [`Writer::short_str`].
    pub fn long_str(&mut self, s: &str) {
        let s = truncate_str(s, u16::MAX as usize);
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
    }

    pub fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(FAMILY_V4);
                self.bytes(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(FAMILY_V6);
                self.bytes(&v6.octets());
            }
        }
    }

    pub fn net(&mut self, net: IpNet) {
        self.ip(net.addr());
        self.u8(net.prefix_len());
    }
}

/// Reads encoded values from a byte slice, checking every length.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless every byte was consumed: a message with trailing garbage is malformed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    pub fn fixed<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        self.array(what)
    }

    fn utf8(bytes: &[u8], what: &'static str) -> Result<String, DecodeError> {
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid {
            what,
            detail: "not UTF-8".into(),
        })
    }

    pub fn short_str(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u8(what)? as usize;
        Self::utf8(self.take(len, what)?, what)
    }

    pub fn long_str(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u16(what)? as usize;
        Self::utf8(self.take(len, what)?, what)
    }

    pub fn ip(&mut self, what: &'static str) -> Result<IpAddr, DecodeError> {
        match self.u8(what)? {
            FAMILY_V4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>(what)?))),
            FAMILY_V6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>(what)?))),
            tag => Err(DecodeError::UnknownTag {
                what: "address family",
                tag,
            }),
        }
    }

    pub fn net(&mut self, what: &'static str) -> Result<IpNet, DecodeError> {
        let addr = self.ip(what)?;
        let len = self.u8(what)?;
        IpNet::new(addr, len).map_err(|_| DecodeError::Invalid {
            what,
            detail: format!("prefix length {len} too long for {addr}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reader_never_panics_on_arbitrary_input(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&bytes);
            let _ = r.net("net");
            let _ = r.short_str("s");
            let _ = r.long_str("s");
            let _ = r.u64("n");
        }

        #[test]
        fn strings_round_trip(s in "\\PC{0,80}") {
            let mut buf = Vec::new();
            Writer::new(&mut buf).short_str(&s);
            let mut r = Reader::new(&buf);
            let back = r.short_str("s").unwrap();
            prop_assert!(s.starts_with(&back));
            prop_assert!(back.len() <= 255);
            r.finish().unwrap();
        }
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        Writer::new(&mut buf).ip("10.0.0.1".parse().unwrap());
        for cut in 0..buf.len() {
            assert!(Reader::new(&buf[..cut]).ip("ip").is_err());
        }
    }

    #[test]
    fn over_long_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(200); // 400 bytes
        let mut buf = Vec::new();
        Writer::new(&mut buf).short_str(&s);
        let back = Reader::new(&buf).short_str("s").unwrap();
        assert_eq!(back.len(), 254);
    }
}
