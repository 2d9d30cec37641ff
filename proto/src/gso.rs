//! Joining QUIC's transmits into larger UDP segmentation-offload (GSO) sends.
//!
//! quinn hands its socket at most 10 datagrams per transmit (a constant in quinn), while one
//! `sendmsg` with `UDP_SEGMENT` carries up to 64 equal-sized datagrams (the last may be
//! shorter) in one buffer, which the kernel moves as one packet down to the device and, on a
//! receiver that asks for GRO, up to its socket. So a sender at full rate makes several times
//! more system calls, and both kernels handle several times more packets, than the kernel
//! needs. [`Batch`] decides which consecutive transmits may go out as one send: the same
//! destination (and ECN mark and source address: the `key`), the same segment size, every
//! datagram before the last one full-sized, and no more than the kernel takes in one send.
//! Every datagram stays one datagram, in its order.

/// The most datagrams one `UDP_SEGMENT` send may carry (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// The most bytes one send may carry: what fits in one IPv4 or IPv6 packet of at most 64 KiB,
/// with room to spare for headers.
pub const MAX_BYTES: usize = 64_000;

/// The datagrams waiting to go out as one send: `len` bytes cut into `segment`-byte
/// datagrams, the last possibly shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch<K> {
    key: K,
    segment: usize,
    len: usize,
}

impl<K: PartialEq> Batch<K> {
    /// A batch of one transmit: `len` bytes cut into `segment`-byte datagrams, or one
    /// datagram when `segment` is `None`.
    pub fn new(key: K, len: usize, segment: Option<usize>) -> Self {
        Batch {
            key,
            segment: segment.unwrap_or(len).max(1),
            len,
        }
    }

    pub fn key(&self) -> &K {
        &self.key
    }

    /// Bytes in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The size of every datagram but the last: the send's `UDP_SEGMENT`.
    pub fn segment(&self) -> usize {
        self.segment
    }

    /// Datagrams in the batch.
    pub fn datagrams(&self) -> usize {
        self.len.div_ceil(self.segment)
    }

    /// Whether a transmit of `len` bytes in `segment`-byte datagrams (one datagram when
    /// `None`) may join the end of this batch, with at most `max_segments` datagrams in a send
    /// (what the socket allows now; 1 when the device has no segmentation offload).
    pub fn can_join(
        &self,
        key: &K,
        len: usize,
        segment: Option<usize>,
        max_segments: usize,
    ) -> bool {
        let fits_segment = match segment {
            Some(s) => s == self.segment,
            // One datagram: full-sized, or a shorter last one.
            None => len <= self.segment,
        };
        let joined = self.len + len;
        *key == self.key
            && fits_segment
            && len > 0
            && self.len.is_multiple_of(self.segment)
            && joined <= MAX_BYTES
            && joined.div_ceil(self.segment) <= max_segments.min(MAX_SEGMENTS)
    }

    /// Adds a transmit of `len` bytes that [`Batch::can_join`] allowed.
    pub fn join(&mut self, len: usize) {
        self.len += len;
    }

    /// Whether no transmit could join any more: the last datagram is short, or the batch is
    /// at the kernel's limit. Such a batch is best sent at once.
    pub fn is_closed(&self, max_segments: usize) -> bool {
        !self.len.is_multiple_of(self.segment)
            || self.datagrams() >= max_segments.min(MAX_SEGMENTS)
            || self.len + self.segment > MAX_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A transmit as quinn makes one: `count` datagrams of `segment` bytes, the last `last`
    /// bytes (1..=segment), to destination `key`.
    #[derive(Clone, Debug)]
    struct Transmit {
        key: u8,
        segment: usize,
        count: usize,
        last: usize,
    }

    impl Transmit {
        fn datagrams(&self) -> Vec<usize> {
            let mut d = vec![self.segment; self.count - 1];
            d.push(self.last);
            d
        }
        fn len(&self) -> usize {
            self.datagrams().iter().sum()
        }
        fn segment_size(&self) -> Option<usize> {
            (self.count > 1).then_some(self.segment)
        }
    }

    fn transmit() -> impl Strategy<Value = Transmit> {
        (
            0u8..3,
            prop::sample::select(vec![40usize, 1200, 1452]),
            1usize..=10,
        )
            .prop_flat_map(|(key, segment, count)| {
                (1..=segment).prop_map(move |last| Transmit {
                    key,
                    segment,
                    count,
                    last,
                })
            })
    }

    /// Runs the transmits through batches as the socket does: join while allowed, send a
    /// batch before one that cannot join and as soon as it is closed. Returns each send as
    /// (key, the datagram sizes it carries when cut at its segment size).
    fn plan(transmits: &[Transmit], max_segments: usize) -> Vec<(u8, Vec<usize>)> {
        let mut sends = Vec::new();
        let mut open: Option<Batch<u8>> = None;
        let cut = |b: &Batch<u8>| {
            let mut d = vec![b.segment(); b.len() / b.segment()];
            if !b.len().is_multiple_of(b.segment()) {
                d.push(b.len() % b.segment());
            }
            (*b.key(), d)
        };
        for t in transmits {
            match open.as_mut() {
                Some(b) if b.can_join(&t.key, t.len(), t.segment_size(), max_segments) => {
                    b.join(t.len())
                }
                _ => {
                    if let Some(b) = open.take() {
                        sends.push(cut(&b));
                    }
                    open = Some(Batch::new(t.key, t.len(), t.segment_size()));
                }
            }
            if let Some(b) = open.filter(|b| b.is_closed(max_segments)) {
                sends.push(cut(&b));
                open = None;
            }
        }
        sends.extend(open.as_ref().map(cut));
        sends
    }

    proptest! {
        /// Every datagram goes out once, whole, in its order, to its own destination, and
        /// every send is one the kernel takes.
        #[test]
        fn joined_sends_carry_every_datagram_in_order(
            transmits in prop::collection::vec(transmit(), 1..40),
            max_segments in prop::sample::select(vec![1usize, 10, 64]),
        ) {
            // quinn never makes a transmit of more datagrams than the socket allows.
            let transmits: Vec<Transmit> = transmits
                .into_iter()
                .map(|t| Transmit { count: t.count.min(max_segments), ..t })
                .collect();
            let sends = plan(&transmits, max_segments);
            let sent: Vec<(u8, usize)> = sends
                .iter()
                .flat_map(|(k, d)| d.iter().map(move |&n| (*k, n)))
                .collect();
            let wanted: Vec<(u8, usize)> = transmits
                .iter()
                .flat_map(|t| t.datagrams().into_iter().map(move |n| (t.key, n)))
                .collect();
            prop_assert_eq!(sent, wanted);
            for (_, d) in &sends {
                prop_assert!(d.len() <= max_segments);
                prop_assert!(d.iter().sum::<usize>() <= MAX_BYTES);
                // Every datagram but the last is full-sized.
                prop_assert!(d[..d.len() - 1].iter().all(|&n| n == d[0]));
                prop_assert!(d[d.len() - 1] <= d[0]);
            }
        }
    }

    #[test]
    fn full_transmits_join_up_to_the_kernel_limit() {
        let mut b = Batch::new(0u8, 14_520, Some(1452));
        for _ in 0..3 {
            assert!(b.can_join(&0, 14_520, Some(1452), 64));
            b.join(14_520);
        }
        // 40 datagrams; 10 more would pass 64,000 bytes.
        assert_eq!(b.datagrams(), 40);
        assert!(!b.can_join(&0, 14_520, Some(1452), 64));
        assert!(b.can_join(&0, 1452 * 4, Some(1452), 64));
    }

    #[test]
    fn a_short_datagram_ends_the_batch() {
        let mut b = Batch::new(0u8, 1452 * 3 + 100, Some(1452));
        assert!(b.is_closed(64));
        assert!(!b.can_join(&0, 1452, None, 64));
        b = Batch::new(0u8, 1452, None);
        assert!(b.can_join(&0, 300, None, 64), "a shorter last datagram");
        b.join(300);
        assert!(b.is_closed(64));
    }

    #[test]
    fn other_destinations_sizes_and_no_offload_do_not_join() {
        let b = Batch::new(0u8, 14_520, Some(1452));
        assert!(
            !b.can_join(&1, 14_520, Some(1452), 64),
            "another destination"
        );
        assert!(
            !b.can_join(&0, 12_000, Some(1200), 64),
            "another segment size"
        );
        assert!(!b.can_join(&0, 1500, None, 64), "a longer datagram");
        assert!(!b.can_join(&0, 1452, None, 10), "the socket's limit");
        let one = Batch::new(0u8, 1452, None);
        assert!(!one.can_join(&0, 1452, None, 1), "no segmentation offload");
        assert!(one.is_closed(1));
    }
}
