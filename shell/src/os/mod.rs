//! Everything that depends on the operating system, behind one boundary: the rest of Holdfast
//! (the protocol in `holdfast_proto`, QUIC, TLS, metrics, the control socket, the client's and
//! the DN's drivers) is portable. Porting the client to another system means one module beside
//! `linux/` with the same items:
//!
//! - `tun`: `open` a TUN device with an address and MTU, `Tun` (`index`, `name`, `set_mtu`,
//!   `set_address`), batched `Reader` / `Writer` (and the DN's `WriterPool`);
//! - `netlink`: `Routes` (`connect`, `replace`, `replace_unreachable`, `delete`, `lookup`,
//!   `underlay`, and for the DN `learned`, `delete_ours`), `NextHop`, `PROTO_HOLDFAST`, and
//!   `watch`, the notices of network changes that let the client roam;
//! - `icmp`: `watch`, "port unreachable" errors about the client's datagrams (optional: the
//!   client falls back to its probes);
//! - `resolver`: `Resolver`, which applies the DNS a lease pushes and restores it;
//! - `udp`: `socket`, a UDP socket with large buffers, and `sharded_sockets`, a group of them on
//!   one port with datagrams steered by connection ID (optional: a port can run one worker).
//!
//! tun-rs, which the Linux TUN code uses, supports macOS, Windows, Android and iOS as well.
//! Outside this module the client assumes a Unix (its status socket is a Unix-domain socket
//! and it takes SIGHUP and SIGTERM): macOS, Android and iOS need nothing more, Windows would
//! also need those two.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
compile_error!(
    "holdfast-shell's platform layer exists for Linux only: a port adds a module beside \
     shell/src/os/linux/ with the same items (see shell/src/os/mod.rs)"
);
