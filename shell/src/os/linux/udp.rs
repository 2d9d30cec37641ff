//! UDP sockets for QUIC endpoints, with buffers large enough for a tunnel.

use std::net::SocketAddr;

use anyhow::{Context, Result};

/// Socket buffer size asked for on both ends. The kernel default (~200 KiB) overflows at
/// gigabit rates with bursts of datagrams, and every overflow is a lost inner packet.
const SOCKET_BUFFER: libc::c_int = 8 * 1024 * 1024;

fn set_buffer(fd: std::os::fd::RawFd, force: libc::c_int, plain: libc::c_int) {
    let size = SOCKET_BUFFER;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let ptr = &size as *const libc::c_int as *const libc::c_void;
    // SAFETY: fd is an open socket owned by the caller; the option value is a valid c_int.
    // The *FORCE variant exceeds net.core.[rw]mem_max when we have CAP_NET_ADMIN (we need it
    // for the TUN device anyway); without it the plain option gets what the limit allows.
    unsafe {
        if libc::setsockopt(fd, libc::SOL_SOCKET, force, ptr, len) != 0 {
            libc::setsockopt(fd, libc::SOL_SOCKET, plain, ptr, len);
        }
    }
}

/// A UDP socket on `addr` with large buffers, for an endpoint (or to rebind one to).
pub fn socket(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let socket =
        std::net::UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr}"))?;
    set_buffer(socket.as_raw_fd(), libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    set_buffer(socket.as_raw_fd(), libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    Ok(socket)
}
