//! The TUN device: Linux today (`/dev/net/tun` through tun-rs, configured by ioctl, never by
//! running `ip`). Other platforms get their own file beside this one.
//!
//! With offloads on (IFF_VNET_HDR), the kernel hands us TCP/UDP super-packets of up to 64 KiB
//! that [`Reader`] splits into MTU-sized packets, and [`Writer`] coalesces the packets it writes
//! (GRO), so that the kernel's TCP stack runs once per super-packet instead of once per packet.

use std::io::{self, IoSlice};
use std::net::IpAddr;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use holdfast_proto::coalesce::{Coalescer, MAX_SEGMENTS, MAX_WRITE_HEADER};
use holdfast_proto::offload::{self, OffloadHeader, OFFLOAD_HEADER_LEN};
use tun_rs::{AsyncDevice, DeviceBuilder};

/// A super-packet read with offloads can be 64 KiB plus its virtio header.
const MAX_READ: usize = OFFLOAD_HEADER_LEN + 65535;
const SLAB: usize = 512 * 1024;

pub struct Tun {
    /// One file per queue; the first also configures the device.
    queues: Vec<AsyncDevice>,
    name: String,
    /// The kernel takes UDP super-packets (USO, Linux 6.2 and later).
    udp_offload: bool,
}

/// Creates the TUN device `name` with `address/prefix` and `mtu`, up, with offloads.
pub fn open(name: &str, address: IpAddr, prefix: u8, mtu: u16) -> Result<Tun> {
    open_queues(name, address, prefix, mtu, 1)
}

/// As [`open`], with `queues` queues: the kernel hands each flow's packets to one queue (by its
/// hash), so that a reader per queue spreads many clients' traffic over threads. Writes may go
/// to any queue.
pub fn open_queues(
    name: &str,
    address: IpAddr,
    prefix: u8,
    mtu: u16,
    queues: usize,
) -> Result<Tun> {
    // Created down, so that nothing is sent before IPv6 is switched off below.
    let builder = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .offload(true)
        .multi_queue(queues > 1)
        .enable(false);
    let builder = match address {
        IpAddr::V4(v4) => builder.ipv4(v4, prefix, None),
        IpAddr::V6(v6) => builder.ipv6(v6, prefix),
    };
    let dev = builder.build_async().with_context(|| {
        format!("cannot create TUN device {name} (running as root? /dev/net/tun present?)")
    })?;
    if address.is_ipv4() {
        // Without this the kernel sends IPv6 router solicitations and MLD reports from a
        // link-local address into the tunnel, which the DN rightly drops as spoofed.
        let knob = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if let Err(e) = std::fs::write(&knob, "1") {
            tracing::debug!(error = %e, "cannot disable IPv6 on {name}");
        }
    }
    let mut all = vec![dev];
    for queue in 1..queues {
        let more = all[0]
            .try_clone()
            .with_context(|| format!("cannot open queue {queue} of TUN device {name}"))?;
        all.push(more);
    }
    all[0]
        .enabled(true)
        .with_context(|| format!("cannot bring {name} up"))?;
    let udp_offload = all[0].udp_gso();
    if !udp_offload {
        tracing::info!("{name}: the kernel takes no UDP super-packets (before Linux 6.2); UDP is written one datagram at a time");
    }
    Ok(Tun {
        queues: all,
        name: name.to_owned(),
        udp_offload,
    })
}

impl Tun {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's first queue: configuration and writes.
    fn dev(&self) -> &AsyncDevice {
        // `open_queues` always opens at least one.
        &self.queues[0]
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Interface index of the device, for routes.
    pub fn index(&self) -> Result<u32> {
        self.dev()
            .if_index()
            .context("cannot read the TUN device's interface index")
    }

    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        self.dev().set_mtu(mtu)
    }

    /// Turns IPv6 on for a device opened with an IPv4 address (dual stack) and adds `v6`/128.
    /// No link-local address is made: the kernel's own router solicitations and MLD reports
    /// from it would be spoofed sources to the far end.
    pub fn enable_ipv6(&self, v6: std::net::Ipv6Addr) -> io::Result<()> {
        let knob = |k: &str| format!("/proc/sys/net/ipv6/conf/{}/{k}", self.name);
        // 1: no link-local address (IN6_ADDR_GEN_MODE_NONE).
        std::fs::write(knob("addr_gen_mode"), "1")?;
        std::fs::write(knob("accept_ra"), "0")?;
        std::fs::write(knob("disable_ipv6"), "0")?;
        self.dev().add_address_v6(v6, 128)
    }

    /// Replaces the device's IPv4 address, or adds an IPv6 one.
    pub fn set_address(&self, address: IpAddr) -> io::Result<()> {
        match address {
            IpAddr::V4(v4) => self.dev().set_network_address(v4, 32, None),
            IpAddr::V6(v6) => self.dev().add_address_v6(v6, 128),
        }
    }
}

/// Reads packets from the device, splitting offloaded super-packets. One per reading task.
pub struct Reader {
    raw: Vec<u8>,
    slab: BytesMut,
    /// Reads dropped since [`Reader::take_dropped`] last asked.
    dropped: u64,
}

impl Default for Reader {
    fn default() -> Self {
        Self {
            raw: vec![0; MAX_READ],
            slab: BytesMut::with_capacity(SLAB),
            dropped: 0,
        }
    }
}

impl Reader {
    /// Waits for the next read and appends its packets to `out`.
    pub async fn recv(&mut self, tun: &Tun, out: &mut Vec<Bytes>) -> io::Result<()> {
        self.recv_queue(tun, 0, out).await
    }

    /// As [`Reader::recv`], from queue `queue` of a multi-queue device.
    ///
    /// Each packet is cut from the read straight into a shared slab (one copy), where it lives
    /// as a cheap `Bytes` handle without an allocation of its own. A read the kernel describes
    /// in a way we cannot follow is dropped, as a link would drop a mangled frame.
    pub async fn recv_queue(
        &mut self,
        tun: &Tun,
        queue: usize,
        out: &mut Vec<Bytes>,
    ) -> io::Result<()> {
        let dev = tun.queues.get(queue).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no TUN queue {queue}"))
        })?;
        let n = dev.recv(&mut self.raw).await?;
        let read = &mut self.raw[..n];
        let result = OffloadHeader::decode(read).and_then(|hdr| {
            let slab = &mut self.slab;
            offload::split(&hdr, &mut read[OFFLOAD_HEADER_LEN..], |headers, payload| {
                let len = headers.len() + payload.len();
                if slab.capacity() - slab.len() < len {
                    *slab = BytesMut::with_capacity(SLAB.max(len));
                }
                slab.extend_from_slice(headers);
                slab.extend_from_slice(payload);
                out.push(slab.split().freeze());
            })
        });
        if let Err(e) = result {
            self.dropped += 1;
            tracing::debug!(error = %e, "dropping a TUN read");
        }
        Ok(())
    }

    /// Reads dropped because the kernel described them in a way we cannot follow, since the
    /// last call (for the caller's counters).
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

/// Writes batches of packets to the device, coalescing them where offloads allow. One per
/// writing task.
#[derive(Default)]
pub struct Writer {
    coalescer: Coalescer,
}

impl Writer {
    /// Writes `pkts` (whole IP packets). Packets the kernel refuses are dropped, as a link would.
    ///
    /// TCP segments and UDP datagrams are coalesced (GRO, planned by [`Coalescer`]): the
    /// receiving TCP stack then runs, and ACKs, once per super-packet, and a UDP flow takes
    /// one write per super-packet (UDP only where the kernel takes UDP super-packets). Each
    /// write is vectored: the headers, then the segments' payloads where they lie, so no
    /// payload byte is copied here. Everything else is written as it came.
    pub async fn send(&mut self, tun: &Tun, pkts: &[Bytes]) -> io::Result<()> {
        let writes = self.coalescer.plan(pkts, tun.udp_offload);
        let mut header = [0u8; MAX_WRITE_HEADER];
        for k in 0..writes {
            let len = self.coalescer.header(k, pkts, &mut header);
            let mut parts = [IoSlice::new(&[]); 1 + MAX_SEGMENTS];
            parts[0] = IoSlice::new(&header[..len]);
            let mut n = 1;
            for (part, payload) in parts[1..].iter_mut().zip(self.coalescer.payloads(k, pkts)) {
                *part = IoSlice::new(payload);
                n += 1;
            }
            dropped_if_refused(tun.dev().send_vectored(&parts[..n]).await)?;
        }
        Ok(())
    }
}

/// A malformed packet from a peer must not stop the data path: what the device refuses as
/// invalid is dropped, as a link would; any other error stands.
fn dropped_if_refused(result: io::Result<usize>) -> io::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            tracing::debug!(error = %e, "TUN rejected a packet");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Writers lent to the tasks that write to the device, for as long as one write takes: a DN
/// with thousands of sessions keeps only as many writers (and their planning buffers) as
/// write at once, not one per session.
#[derive(Default)]
pub struct WriterPool {
    idle: std::sync::Mutex<Vec<Writer>>,
}

impl WriterPool {
    /// Writers kept for reuse; more are made while more tasks write at once.
    const KEEP: usize = 8;

    /// Writes `pkts` as [`Writer::send`] does, with a lent writer.
    pub async fn send(&self, tun: &Tun, pkts: &[Bytes]) -> io::Result<()> {
        let lent = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut writer = lent.unwrap_or_default();
        let result = writer.send(tun, pkts).await;
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < Self::KEEP {
                idle.push(writer);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_proto::packet::testing::ip_packet;
    use proptest::prelude::*;
    use tun_rs::VirtioNetHdr;

    /// A super-packet as the kernel hands it over: one IP header, one transport header, then
    /// `payload`; `v6` picks the family, `tcp` the transport.
    fn super_packet(v6: bool, tcp: bool, payload: &[u8], flags: u8) -> Vec<u8> {
        let ip = if v6 { 40 } else { 20 };
        let transport = if tcp { 32 } else { 8 };
        let protocol = if tcp { 6 } else { 17 };
        let mut p = ip_packet(v6, protocol, ip + transport + payload.len());
        if !v6 {
            p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        }
        p[ip..ip + 4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
        if tcp {
            p[ip + 4..ip + 8].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
            p[ip + 12] = 8 << 4;
            p[ip + 13] = flags;
        }
        p[ip + transport..].copy_from_slice(payload);
        p
    }

    proptest! {
        /// Our cut is byte for byte the one tun-rs (after wireguard-go) makes.
        #[test]
        fn the_split_matches_tun_rs(
            payload in proptest::collection::vec(any::<u8>(), 1..20_000),
            gso_size in 1u16..1500,
            v6: bool,
            tcp: bool,
            flags: u8,
        ) {
            let packet = super_packet(v6, tcp, &payload, flags);
            let ip = if v6 { 40u16 } else { 20 };
            let gso_type = match (tcp, v6) {
                (true, false) => 1,
                (true, true) => 4,
                (false, _) => 5,
            };
            let hdr = VirtioNetHdr {
                flags: 1,
                gso_type,
                hdr_len: ip + if tcp { 32 } else { 8 },
                gso_size,
                csum_start: ip,
                csum_offset: if tcp { 16 } else { 6 },
            };
            let segments = payload.len().div_ceil(usize::from(gso_size));
            let mut bufs = vec![vec![0u8; 2000]; segments];
            let mut sizes = vec![0; segments];
            let n = tun_rs::gso_split(&mut packet.clone(), hdr, &mut bufs, &mut sizes, 0, v6)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let theirs: Vec<&[u8]> = bufs.iter().zip(&sizes).take(n).map(|(b, &s)| &b[..s]).collect();

            let mut raw = vec![0u8; OFFLOAD_HEADER_LEN];
            hdr.encode(&mut raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let ours_hdr = OffloadHeader::decode(&raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut ours = Vec::new();
            let mut input = packet.clone();
            offload::split(&ours_hdr, &mut input, |h, p| ours.push([h, p].concat()))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ours.len(), theirs.len());
            for (a, b) in ours.iter().zip(&theirs) {
                prop_assert_eq!(a.as_slice(), *b);
            }
        }
    }
}
