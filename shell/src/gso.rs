//! The UDP socket both ends give quinn: it sends what quinn hands it in fewer, larger
//! segmentation-offload batches (which transmits join is [`holdfast_proto::gso`]'s rule).
//!
//! quinn's connection driver makes at most 10 datagrams per transmit and 20 per turn before it
//! lets other tasks run. This socket copies a transmit that may still be joined into its
//! batch and returns; a task of its own sends the batch once the driver has stopped adding to
//! it (after the driver's turn, or a few turns while it keeps adding), and a batch that can take
//! no more goes out at once. Receiving is quinn's own (`recvmmsg` with GRO).

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{ready, Context, Poll};

use holdfast_proto::gso::Batch;
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::Notify;
use tracing::debug;

/// What must match for transmits to join: destination, ECN mark, source address.
type Key = (SocketAddr, Option<EcnCodepoint>, Option<IpAddr>);

/// How many times the sending task lets the driver add to a batch before it sends anyway: a
/// bound on the delay batching adds (a turn of the driver is 20 datagrams).
const MAX_WAITS: usize = 4;

/// quinn's UDP socket at both ends (see the module).
pub struct BatchingSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    pending: Mutex<Pending>,
    /// Wakes the sending task; shared with it so that it can outlive the socket by a moment
    /// and then end.
    wake: Arc<Notify>,
}

#[derive(Default)]
struct Pending {
    batch: Option<Batch<Key>>,
    buf: Vec<u8>,
    /// Counts joins, so the sending task can tell whether the driver is still adding.
    joins: u64,
}

/// What this process's QUIC sockets have handed the kernel: one client's sessions share one
/// socket, and a DN's workers each have their own, so the figures are the process's.
#[derive(Debug)]
pub struct SendCounters {
    calls: AtomicU64,
    datagrams: AtomicU64,
}

pub static SENT: SendCounters = SendCounters {
    calls: AtomicU64::new(0),
    datagrams: AtomicU64::new(0),
};

impl SendCounters {
    /// `sendmsg` calls made (one the kernel refused included: quinn-udp drops its datagrams,
    /// as a lossy path would, and QUIC recovers).
    pub fn calls(&self) -> u64 {
        self.calls.load(Relaxed)
    }

    /// Datagrams in them; `datagrams / calls` is the segmentation-offload batch.
    pub fn datagrams(&self) -> u64 {
        self.datagrams.load(Relaxed)
    }

    /// `{"send_calls", "datagrams_sent"}`, for a status.
    pub fn figures(&self) -> serde_json::Value {
        serde_json::json!({
            "send_calls": self.calls(),
            "datagrams_sent": self.datagrams(),
        })
    }
}

impl BatchingSocket {
    /// Wraps `socket`, with its sending task on the current Tokio runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Arc<Self>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        let io = tokio::net::UdpSocket::from_std(socket)?;
        let wake = Arc::new(Notify::new());
        let socket = Arc::new(BatchingSocket {
            io,
            state,
            pending: Mutex::new(Pending::default()),
            wake: wake.clone(),
        });
        runtime.spawn(send_batches(Arc::downgrade(&socket), wake));
        Ok(socket)
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while the lock was held leaves nothing half-done that matters: the batch is
        // bytes and a length.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `transmit` now, as one `sendmsg`.
    fn send_now(&self, transmit: &Transmit) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), transmit)
        })?;
        let datagrams = match transmit.segment_size {
            Some(s) if s > 0 => transmit.contents.len().div_ceil(s),
            _ => 1,
        };
        SENT.calls.fetch_add(1, Relaxed);
        SENT.datagrams.fetch_add(datagrams as u64, Relaxed);
        Ok(())
    }

    /// Sends the waiting batch, if any. The only error is `WouldBlock`, and the batch then
    /// stays; on any other error it is dropped and logged, lost like any datagram (quinn-udp
    /// drops what the kernel refuses the same way), and QUIC recovers.
    fn send_pending(&self, p: &mut Pending) -> io::Result<()> {
        let Some(batch) = p.batch else {
            return Ok(());
        };
        let &(destination, ecn, src_ip) = batch.key();
        let sent = self.send_now(&Transmit {
            destination,
            ecn,
            contents: &p.buf,
            segment_size: (batch.datagrams() > 1).then_some(batch.segment()),
            src_ip,
        });
        match sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
            Err(e) => debug!(error = %e, "UDP send failed"),
            Ok(()) => {}
        }
        p.batch = None;
        p.buf.clear();
        Ok(())
    }
}

impl Drop for BatchingSocket {
    fn drop(&mut self) {
        // The sending task holds only a weak reference: wake it to find the socket gone.
        self.wake.notify_one();
    }
}

impl fmt::Debug for BatchingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchingSocket")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

/// The sending task: woken when a batch starts, it lets the driver add to it while it keeps
/// adding, then sends it (waiting for the socket when its buffer is full).
async fn send_batches(socket: Weak<BatchingSocket>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(socket) = socket.upgrade() else {
            return;
        };
        let mut joins = socket.pending().joins;
        for _ in 0..MAX_WAITS {
            tokio::task::yield_now().await;
            let now = socket.pending().joins;
            if now == joins {
                break;
            }
            joins = now;
        }
        // Only `WouldBlock` comes back: wait until the socket takes more.
        while socket.send_pending(&mut socket.pending()).is_err() {
            if let Err(e) = socket.io.writable().await {
                debug!(error = %e, "UDP socket failed while waiting to send");
                break;
            }
        }
    }
}

impl AsyncUdpSocket for BatchingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let key = (transmit.destination, transmit.ecn, transmit.src_ip);
        let len = transmit.contents.len();
        let max = self.state.max_gso_segments();
        let mut p = self.pending();
        if let Some(batch) = p.batch.as_mut() {
            if batch.can_join(&key, len, transmit.segment_size, max) {
                batch.join(len);
                let closed = batch.is_closed(max);
                p.buf.extend_from_slice(transmit.contents);
                p.joins += 1;
                // Accepted either way: a batch that found the socket full waits for the
                // sending task, and the next transmit that cannot join tells quinn to wait.
                if closed && self.send_pending(&mut p).is_err() {
                    self.wake.notify_one();
                }
                return Ok(());
            }
            // What waits goes first; if the socket is full, quinn keeps this one and waits.
            self.send_pending(&mut p)?;
        }
        let batch = Batch::new(key, len, transmit.segment_size);
        if batch.is_closed(max) {
            // Nothing can join it: no copy, no wait.
            drop(p);
            return self.send_now(transmit);
        }
        p.batch = Some(batch);
        p.buf.extend_from_slice(transmit.contents);
        p.joins += 1;
        drop(p);
        self.wake.notify_one();
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            if let Ok(n) = self.io.try_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            }) {
                return Poll::Ready(Ok(n));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

type WritableFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Tells quinn's driver when the socket can take more.
struct Writable {
    socket: Arc<BatchingSocket>,
    waiting: Option<WritableFuture>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // quinn asks before every transmit: the socket is cloned only when a wait starts.
        let waiting = this.waiting.get_or_insert_with(|| {
            let socket = this.socket.clone();
            Box::pin(async move { socket.io.writable().await })
        });
        let ready = waiting.as_mut().poll(cx);
        if ready.is_ready() {
            this.waiting = None;
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A transmit as quinn makes one: `count` datagrams of `size` bytes to `to`, each filled
    /// with its own number (from `first`).
    fn transmit_bytes(first: u8, count: usize, size: usize) -> Vec<u8> {
        (0..count)
            .flat_map(|i| std::iter::repeat_n(first.wrapping_add(i as u8), size))
            .collect()
    }

    /// What quinn's driver does: wait until the socket is writable, then hand it a transmit.
    async fn send(
        socket: &Arc<BatchingSocket>,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) {
        let mut poller = socket.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .expect("writable");
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        socket.try_send(&t).expect("loopback takes it");
    }

    fn receiver() -> std::net::UdpSocket {
        let r = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        r.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        r
    }

    /// Each datagram as it arrived: (first byte, length).
    fn received(r: &std::net::UdpSocket, n: usize) -> Vec<(u8, usize)> {
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| {
                let len = r.recv(&mut buf).expect("a datagram within 2 s");
                assert!(buf[..len].iter().all(|&b| b == buf[0]), "a datagram mixed");
                (buf[0], len)
            })
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn transmits_join_into_one_send_and_every_datagram_arrives_whole_in_order() {
        let socket =
            BatchingSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        if socket.state.max_gso_segments() < 64 {
            eprintln!("skipped: no UDP segmentation offload on loopback here");
            return;
        }
        let (a, b) = (receiver(), receiver());
        let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let calls_before = SENT.calls.load(Relaxed);
        // Four of quinn's transmits of 10 full datagrams, a shorter last one, then one to
        // another destination.
        for k in 0..4u8 {
            send(&socket, to_a, &transmit_bytes(k * 10, 10, 1200), Some(1200)).await;
        }
        send(&socket, to_a, &transmit_bytes(40, 1, 300), None).await;
        send(&socket, to_b, &transmit_bytes(99, 2, 500), Some(500)).await;
        // The sending task runs once this task lets it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut want: Vec<(u8, usize)> = (0..40).map(|i| (i, 1200)).collect();
        want.push((40, 300));
        assert_eq!(received(&a, 41), want);
        assert_eq!(received(&b, 2), vec![(99, 500), (100, 500)]);
        // 41 datagrams to `a` in one call (closed by the short one), 2 to `b` in another.
        let calls = SENT.calls.load(Relaxed) - calls_before;
        assert_eq!(calls, 2, "sendmsg calls");
    }
}
