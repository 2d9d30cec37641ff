//! ICMP "port unreachable" errors about the EN's UDP datagrams, read from raw ICMP sockets.
//!
//! quinn does not surface ICMP errors, so the EN watches for them itself: a DN host whose `dn`
//! process is gone answers every datagram with "port unreachable", and the EN can give up on
//! that session at once instead of waiting for its probes to go unanswered (thesis 3.3). Raw
//! sockets need CAP_NET_RAW, which the EN holds anyway for its TUN device; a kernel filter lets
//! only "destination unreachable" messages through, so ping traffic costs nothing here.

use std::io::Read;
use std::os::fd::AsRawFd;

use anyhow::{anyhow, bail, Context, Result};
use holdfast_proto::packet::{icmpv4_port_unreachable, icmpv6_port_unreachable, PortUnreachable};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, warn};

const SOL_RAW: libc::c_int = 255;
const ICMP_FILTER: libc::c_int = 1;
const ICMP6_FILTER: libc::c_int = 1;
const ICMP_DEST_UNREACH: u32 = 3;
const ICMP6_DST_UNREACH: u32 = 1;

fn set_filter<T>(socket: &Socket, level: libc::c_int, name: libc::c_int, value: &T) -> Result<()> {
    // SAFETY: `value` points to a live, fully initialised `T` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set the ICMP filter");
    }
    Ok(())
}

fn open_v4() -> Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .context("cannot open a raw ICMP socket")?;
    // Bits set are types the kernel drops before they reach us.
    let blocked: u32 = !(1 << ICMP_DEST_UNREACH);
    set_filter(&socket, SOL_RAW, ICMP_FILTER, &blocked)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn open_v6() -> Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .context("cannot open a raw ICMPv6 socket")?;
    let mut blocked = [u32::MAX; 8];
    blocked[(ICMP6_DST_UNREACH / 32) as usize] &= !(1 << (ICMP6_DST_UNREACH % 32));
    set_filter(&socket, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &blocked)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn register(socket: Socket) -> Result<AsyncFd<Socket>> {
    // SAFETY: the socket owns its descriptor, and the AsyncFd owns the socket until it drops.
    unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow!("cannot register the ICMP socket: {e}"))
}

type Opener = fn() -> Result<Socket>;
type Parser = fn(&[u8]) -> Option<PortUnreachable>;

/// Starts watching; every "port unreachable" about a UDP datagram arrives on the receiver.
/// Fails only if neither an IPv4 nor an IPv6 raw socket can be opened.
pub fn watch() -> Result<mpsc::UnboundedReceiver<PortUnreachable>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut opened = 0;
    let families: [(&str, Opener, Parser); 2] = [
        ("IPv4", open_v4, icmpv4_port_unreachable),
        ("IPv6", open_v6, icmpv6_port_unreachable),
    ];
    let mut errors = Vec::new();
    for (family, open, parse) in families {
        match open().and_then(register) {
            Ok(fd) => {
                opened += 1;
                tokio::spawn(read(fd, parse, tx.clone()));
            }
            Err(e) => {
                debug!(family, error = %format!("{e:#}"), "no ICMP watch");
                errors.push(format!("{family}: {e:#}"));
            }
        }
    }
    if opened == 0 {
        bail!("cannot watch for ICMP errors: {}", errors.join("; "));
    }
    Ok(rx)
}

async fn read(fd: AsyncFd<Socket>, parse: Parser, tx: mpsc::UnboundedSender<PortUnreachable>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "the ICMP watch stopped");
                return;
            }
        };
        match guard.try_io(|inner| inner.get_ref().read(&mut buf)) {
            Ok(Ok(n)) => {
                if let Some(unreachable) = buf.get(..n).and_then(parse) {
                    if tx.send(unreachable).is_err() {
                        return;
                    }
                }
            }
            Ok(Err(e)) => debug!(error = %e, "ICMP read failed"),
            Err(_would_block) => continue,
        }
    }
}
