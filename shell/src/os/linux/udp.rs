//! UDP sockets for QUIC endpoints, with buffers large enough for a tunnel.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use holdfast_proto::steer;
use socket2::{Domain, Protocol, Socket, Type};

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

fn set_buffers(socket: &impl AsRawFd) {
    set_buffer(socket.as_raw_fd(), libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    set_buffer(socket.as_raw_fd(), libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
}

/// A UDP socket on `addr` with large buffers, for an endpoint (or to rebind one to).
pub fn socket(addr: SocketAddr) -> Result<UdpSocket> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr}"))?;
    set_buffers(&socket);
    Ok(socket)
}

/// `shards` UDP sockets sharing `addr` (`SO_REUSEPORT`), each with large buffers, with the
/// kernel handing each datagram to the socket [`steer::shard_of`] names: socket `i` gets what
/// the worker issuing connection IDs for shard `i` must see. One shard is a plain socket.
///
/// The port must be free: a group that another process could have joined first (any process
/// of the same user may) would steer by its own sockets' order, so the address is first bound
/// without `SO_REUSEPORT`, which fails at once if anything holds it.
pub fn sharded_sockets(addr: SocketAddr, shards: u8) -> Result<Vec<UdpSocket>> {
    if shards <= 1 {
        return Ok(vec![socket(addr)?]);
    }
    if shards > steer::MAX_SHARDS {
        bail!(
            "{shards} UDP shards asked for; at most {} are supported",
            steer::MAX_SHARDS
        );
    }
    let addr = {
        let probe = UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr}"))?;
        probe.local_addr()?
    };
    let mut sockets = Vec::with_capacity(usize::from(shards));
    for shard in 0..shards {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .context("cannot open a UDP socket")?;
        socket.set_reuse_port(true)?;
        socket
            .bind(&addr.into())
            .with_context(|| format!("cannot bind UDP shard {shard} to {addr}"))?;
        if shard == 0 {
            attach_steering(&socket, shards)
                .with_context(|| format!("cannot steer the UDP shards of {addr}"))?;
        }
        let socket = UdpSocket::from(socket);
        set_buffers(&socket);
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Attaches [`steer::steering_program`] to the reuseport group `socket` belongs to.
fn attach_steering(socket: &Socket, shards: u8) -> std::io::Result<()> {
    let mut program: Vec<libc::sock_filter> = steer::steering_program(shards)
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the socket is open and owned by the caller; `fprog` points at `program`, which
    // outlives the call (the kernel copies the program).
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Every datagram sent to the group, from several source sockets, short and long headers,
    /// arrives at the socket the steering function names.
    #[test]
    fn the_kernel_hands_each_datagram_to_the_shard_its_connection_id_names() {
        let shards = 3u8;
        let group = sharded_sockets("127.0.0.1:0".parse().unwrap(), shards).unwrap();
        let to = group[0].local_addr().unwrap();
        for s in &group {
            assert_eq!(s.local_addr().unwrap(), to, "every shard on one address");
            s.set_nonblocking(true).unwrap();
        }
        let senders: Vec<UdpSocket> = (0..4)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut sent = Vec::new();
        for n in 0..120u32 {
            let dcid = n.wrapping_mul(2_654_435_761).to_be_bytes();
            let datagram = if n % 2 == 0 {
                [&[0x40][..], &dcid, b"short"].concat()
            } else {
                [&[0xc0, 0, 0, 0, 1, 4][..], &dcid, b"long"].concat()
            };
            senders[n as usize % senders.len()]
                .send_to(&datagram, to)
                .unwrap();
            sent.push(datagram);
        }
        let mut got = vec![Vec::new(); group.len()];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 64];
        while got.iter().map(Vec::len).sum::<usize>() < sent.len() && Instant::now() < deadline {
            for (shard, s) in group.iter().enumerate() {
                while let Ok(n) = s.recv(&mut buf) {
                    got[shard].push(buf[..n].to_vec());
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.iter().map(Vec::len).sum::<usize>(), sent.len());
        for (shard, datagrams) in got.iter().enumerate() {
            assert!(!datagrams.is_empty(), "shard {shard} got nothing");
            for d in datagrams {
                assert_eq!(usize::from(steer::shard_of(d, shards)), shard, "{d:?}");
            }
        }
    }

    #[test]
    fn a_group_needs_its_port_to_itself() {
        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = sharded_sockets(addr, 2).unwrap_err();
        assert!(format!("{err:#}").contains("cannot bind UDP"), "{err:#}");
        let group = sharded_sockets("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert!(
            sharded_sockets(addr, 2).is_err(),
            "a second group joined the first"
        );
        assert!(sharded_sockets(addr, steer::MAX_SHARDS + 1).is_err());
    }
}
