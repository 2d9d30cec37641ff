//! The TUN device: Linux today (`/dev/net/tun` through tun-rs, configured by ioctl, never by
//! running `ip`). Other platforms get their own file beside this one.

use std::net::IpAddr;

use anyhow::{Context, Result};
use tun_rs::{AsyncDevice, DeviceBuilder};

/// Creates (or re-creates) the TUN device `name` with `address/prefix` and `mtu`, up.
pub fn open(name: &str, address: IpAddr, prefix: u8, mtu: u16) -> Result<AsyncDevice> {
    let builder = DeviceBuilder::new().name(name).mtu(mtu);
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
    Ok(dev)
}

/// Interface index of the device, for routes.
pub fn index(dev: &AsyncDevice) -> Result<u32> {
    dev.if_index().context("cannot read the TUN device's interface index")
}
