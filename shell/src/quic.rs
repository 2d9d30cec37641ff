//! QUIC transport settings shared by both ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use sha2::{Digest, Sha256};

/// The longest a silent session lives before QUIC ends it: what a DN allows. The client asks for
/// less (three keepalive periods), and the shorter of the two applies. QUIC sends no keepalives
/// of its own: the client's probes keep an idle session alive, so that an idle client sleeps.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Datagrams received and not yet written to the TUN device: room for a burst at gigabit
/// rates while the writer catches up.
const DATAGRAM_BUFFER: usize = 2 * 1024 * 1024;
/// The client's queue of datagrams waiting to be sent. What waits here delays every packet
/// behind it, probes included: 2 MiB is 1.6 s on a 10 Mbit/s uplink, 256 KiB a fifth of a
/// second, and half a millisecond at 4 Gbit/s, which still keeps the sender busy (same upload
/// rate in `lab bench`). The DN keeps the larger buffer: it reads one TUN device for all
/// its clients and drops rather than waits when a client's queue is full, and 256 KiB there
/// cost a tenth of the download rate.
const DATAGRAM_SEND_QUEUE: usize = 256 * 1024;

/// The client's side.
pub fn transport(idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = transport_settings(idle_timeout);
    t.datagram_send_buffer_size(DATAGRAM_SEND_QUEUE);
    Arc::new(t)
}

fn transport_settings(idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let idle = idle_timeout.min(MAX_IDLE_TIMEOUT).as_millis() as u32;
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        idle,
    ))));
    t.keep_alive_interval(None);
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    // The control stream is the only stream; packets ride in datagrams.
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    t
}

/// What QUIC says about a session's path: what limits its rate (the congestion window and the
/// losses that shrank it) and the datagrams it sent and received, for finding out why a tunnel
/// is slow. How many datagrams each system call moved is the process's
/// ([`crate::gso::SENT`]): sessions share sockets.
pub fn path_figures(s: &quinn::ConnectionStats) -> serde_json::Value {
    serde_json::json!({
        "cwnd": s.path.cwnd,
        "lost_packets": s.path.lost_packets,
        "congestion_events": s.path.congestion_events,
        "udp_tx_datagrams": s.udp_tx.datagrams,
        "udp_rx_datagrams": s.udp_rx.datagrams,
    })
}

/// The authenticated frames a connection has taken from its peer: acknowledgements, datagrams,
/// stream data and pings. Each decrypted, so only the peer can have sent it; a count that grew
/// since some moment says the peer was alive after it (`Prober::on_quic_frames`). What arrives
/// before decryption (the UDP datagrams) anyone who saw the connection ID could add to.
pub fn frames_from_peer(conn: &quinn::Connection) -> u64 {
    let f = conn.stats().frame_rx;
    f.acks + f.datagram + f.stream + f.ping
}

/// Moves `endpoint` to `socket` (a client whose path changed), keeping the batching socket.
pub fn rebind(endpoint: &quinn::Endpoint, socket: std::net::UdpSocket) -> Result<()> {
    let socket =
        crate::gso::BatchingSocket::new(socket).context("cannot use the new UDP socket")?;
    endpoint
        .rebind_abstract(socket)
        .context("cannot move the sessions to a new socket")
}

/// Control data a client may have in flight towards the DN: its messages are a few hundred
/// bytes, and a connection must not be a place to park megabytes the DN has not read.
const CONTROL_WINDOW: u32 = 64 * 1024;

/// The DN's side: one control stream per connection, with a small window, so that what a
/// connection can make the DN buffer is bounded (the datagram buffer aside, which only an
/// authenticated client can fill).
fn server_transport() -> Arc<quinn::TransportConfig> {
    let mut t = transport_settings(MAX_IDLE_TIMEOUT);
    t.max_concurrent_bidi_streams(1u32.into());
    t.stream_receive_window(CONTROL_WINDOW.into());
    t.receive_window(CONTROL_WINDOW.into());
    Arc::new(t)
}

pub fn server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(server_transport());
    Ok(config)
}

/// `idle_timeout`: how long a silent session may live (the client's keepalive keeps it shorter
/// than that).
pub fn client_config(
    tls: rustls::ClientConfig,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(idle_timeout));
    Ok(config)
}

/// Reads control frames from a QUIC stream, keeping partial frames between calls.
pub struct ControlReader {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

impl ControlReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: Vec::new(),
        }
    }

    /// The next message, or `None` when the peer finished the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<holdfast_proto::control::Message>> {
        use holdfast_proto::control::{Message, MAX_BODY};
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((msg, used)) =
                Message::decode(&self.buf).context("malformed control message")?
            {
                self.buf.drain(..used);
                return Ok(Some(msg));
            }
            if self.buf.len() > MAX_BODY + 3 {
                anyhow::bail!("control frame larger than the protocol allows");
            }
            match self
                .recv
                .read(&mut chunk)
                .await
                .context("control stream failed")?
            {
                Some(n) => self.buf.extend_from_slice(&chunk[..n]),
                None if self.buf.is_empty() => return Ok(None),
                None => anyhow::bail!("control stream ended inside a frame"),
            }
        }
    }
}

/// Sends one control message.
pub async fn send_message(
    send: &mut quinn::SendStream,
    msg: &holdfast_proto::control::Message,
) -> Result<()> {
    let mut out = Vec::with_capacity(256);
    msg.encode(&mut out);
    send.write_all(&out)
        .await
        .context("cannot write to the control stream")
}

/// A QUIC endpoint on `addr` with large socket buffers; a server if `server` is given.
///
/// `reset_secret` keys stateless resets. A DN derives it from its long-lived lease key so that
/// after a restart it can still reset its clients' old connections: they then reconnect at
/// once instead of waiting for the idle timeout. `None` picks a random key.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_secret: Option<&[u8]>,
) -> Result<quinn::Endpoint> {
    let socket = crate::os::udp::socket(addr)?;
    let config = endpoint_config(reset_secret, None);
    open(config, server, socket, addr)
}

/// A server's `shards` endpoints on one UDP port, one per worker: the kernel hands each
/// datagram to the endpoint that issued its destination connection ID (see
/// [`holdfast_proto::steer`]), so that a connection stays with its endpoint when the client's
/// address changes. All share the stateless-reset and connection-ID keys of `reset_secret`.
pub fn sharded_endpoints(
    addr: SocketAddr,
    server: quinn::ServerConfig,
    reset_secret: &[u8],
    shards: u8,
) -> Result<Vec<quinn::Endpoint>> {
    let sockets = crate::os::udp::sharded_sockets(addr, shards)?;
    let shards = sockets.len() as u8;
    sockets
        .into_iter()
        .enumerate()
        .map(|(shard, socket)| {
            let steer = (shards > 1).then_some((shard as u8, shards));
            let config = endpoint_config(Some(reset_secret), steer);
            open(config, Some(server.clone()), socket, addr)
        })
        .collect()
}

fn open(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
    addr: SocketAddr,
) -> Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    let socket = crate::gso::BatchingSocket::new(socket)
        .with_context(|| format!("cannot use the UDP socket on {addr}"))?;
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
        .with_context(|| format!("cannot open a QUIC endpoint on {addr}"))
}

/// `steer`: this endpoint's shard and the shard count, when it is one of several on a port.
fn endpoint_config(reset_secret: Option<&[u8]>, steer: Option<(u8, u8)>) -> quinn::EndpointConfig {
    let Some(secret) = reset_secret else {
        return quinn::EndpointConfig::default();
    };
    let mut material = b"holdfast stateless reset v1\0".to_vec();
    material.extend_from_slice(secret);
    let digest = Sha256::digest(&material);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &digest);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    // Connection IDs carry a keyed check; the restarted DN must accept the old ones as "ours"
    // to answer them with a reset, so that key must survive restarts too.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&digest[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        let keyed = quinn_proto::HashedConnectionIdGenerator::from_key(cid_key);
        match steer {
            Some((shard, shards)) => Box::new(ShardConnectionIds {
                keyed,
                shard,
                shards,
            }),
            None => Box::new(keyed),
        }
    });
    config
}

/// Keyed connection IDs (as [`quinn_proto::HashedConnectionIdGenerator`] makes them, so that
/// a DN's resets work across a change of its worker count) whose first byte steers packets to
/// one shard. The first byte is random, so a matching ID comes on average every `shards`
/// tries; IDs are made a handful per connection.
struct ShardConnectionIds {
    keyed: quinn_proto::HashedConnectionIdGenerator,
    shard: u8,
    shards: u8,
}

impl quinn_proto::ConnectionIdGenerator for ShardConnectionIds {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        loop {
            let cid = self.keyed.generate_cid();
            if holdfast_proto::steer::cid_is_for(&cid, self.shard, self.shards) {
                return cid;
            }
        }
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        self.keyed.validate(cid)
    }

    fn cid_len(&self) -> usize {
        self.keyed.cid_len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.keyed.cid_lifetime()
    }
}
