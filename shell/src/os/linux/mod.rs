//! Linux: TUN devices with offloads (tun-rs), routes and network changes through rtnetlink, the
//! raw ICMP socket that hears "port unreachable", the resolver (resolv.conf or
//! systemd-resolved over D-Bus), and UDP socket buffers beyond the default limits.

pub mod icmp;
pub mod netlink;
pub mod resolver;
pub mod tun;
pub mod udp;
