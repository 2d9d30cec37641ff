//! Kernel routes through rtnetlink. Every route Holdfast installs carries protocol number
//! [`PROTO_HOLDFAST`] so that it can be recognised, listed and removed as ours (and so that the
//! routing daemons, configured to, can pick up a DN's routes).

use std::net::IpAddr;

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use holdfast_proto::underlay;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

/// Our routing protocol number (name it `holdfast` in /etc/iproute2/rt_protos.d/).
pub const PROTO_HOLDFAST: u8 = 200;
/// RT_TABLE_MAIN.
const MAIN_TABLE: u32 = 254;

pub struct Routes {
    handle: Handle,
}

/// Where the kernel currently sends packets for an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

impl Routes {
    /// Opens a netlink connection; its driver runs on the current tokio runtime.
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    fn message(
        dest: IpNet,
        oif: Option<u32>,
        gateway: Option<IpAddr>,
        metric: Option<u32>,
    ) -> Result<RouteMessage> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dest.addr(), dest.prefix_len())
            .map_err(|e| anyhow!("bad route {dest}: {e}"))?
            .protocol(RouteProtocol::Other(PROTO_HOLDFAST));
        if let Some(oif) = oif {
            b = b.output_interface(oif);
        }
        if let Some(gw) = gateway {
            b = b
                .gateway(gw)
                .map_err(|e| anyhow!("bad gateway {gw}: {e}"))?;
        }
        if let Some(metric) = metric {
            b = b.priority(metric);
        }
        Ok(b.build())
    }

    /// Adds or replaces (same destination and metric) a route to `dest` through `hop`.
    pub async fn replace(&self, dest: IpNet, hop: &NextHop, metric: Option<u32>) -> Result<()> {
        let msg = Self::message(dest, hop.oif, hop.gateway, metric)?;
        self.install(msg)
            .await
            .with_context(|| format!("cannot add route {dest} via {hop:?}"))
    }

    async fn install(&self, msg: RouteMessage) -> Result<(), rtnetlink::Error> {
        self.handle.route().add(msg).replace().execute().await
    }

    pub async fn delete(&self, dest: IpNet, oif: Option<u32>, metric: Option<u32>) -> Result<()> {
        let msg = Self::message(dest, oif, None, metric)?;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("cannot delete route {dest}"))
    }

    /// Every route of the main table, IPv4 and IPv6.
    async fn dump(&self) -> Result<Vec<RouteMessage>> {
        let mut out = Vec::new();
        let dumps = [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ];
        for request in dumps {
            let mut replies = self.handle.route().get(request).execute();
            while let Some(route) = replies
                .try_next()
                .await
                .context("cannot list the kernel's routes")?
            {
                let table = route
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(route.header.table));
                if table == MAIN_TABLE {
                    out.push(route);
                }
            }
        }
        Ok(out)
    }

    fn is_ours(route: &RouteMessage) -> bool {
        route.header.protocol == RouteProtocol::Other(PROTO_HOLDFAST)
    }

    /// Destinations of the main table's routes that others installed (a routing daemon, the
    /// administrator): every protocol but ours, IPv4 and IPv6.
    pub async fn learned(&self) -> Result<Vec<IpNet>> {
        Ok(self
            .dump()
            .await?
            .iter()
            .filter(|r| !Self::is_ours(r))
            // A route without a destination is a default route.
            .filter_map(destination)
            .collect())
    }

    /// Deletes every route of ours in the main table (a dead DN's), whoever installed it.
    /// Returns the destinations deleted; a route that vanished meanwhile is not an error.
    pub async fn delete_ours(&self) -> Result<Vec<IpNet>> {
        let mut deleted = Vec::new();
        for route in self.dump().await?.into_iter().filter(Self::is_ours) {
            let net = destination(&route);
            match self.handle.route().del(route).execute().await {
                Ok(()) => deleted.extend(net),
                // ESRCH: gone already (its device went with the DN).
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -ESRCH => {}
                Err(e) => {
                    return Err(e).with_context(|| match net {
                        Some(net) => format!("cannot delete route {net}"),
                        None => "cannot delete a default route".to_owned(),
                    })
                }
            }
        }
        Ok(deleted)
    }

    /// Asks the kernel how it routes `addr` right now (like `ip route get`): the next hop and
    /// the source address it would give a packet.
    pub async fn lookup(&self, addr: IpAddr) -> Result<(NextHop, Option<IpAddr>)> {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, prefix)
            .map_err(|e| anyhow!("bad address {addr}: {e}"))?
            .build();
        let mut replies = self.handle.route().get(msg).execute();
        let reply = replies
            .try_next()
            .await
            .with_context(|| format!("no route to {addr}"))?
            .ok_or_else(|| anyhow!("no route to {addr}"))?;
        let mut hop = NextHop {
            gateway: None,
            oif: None,
        };
        let mut source = None;
        for attr in reply.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => hop.gateway = Some(a.into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => hop.gateway = Some(a.into()),
                RouteAttribute::Oif(i) => hop.oif = Some(i),
                RouteAttribute::PrefSource(RouteAddress::Inet(a)) => source = Some(a.into()),
                RouteAttribute::PrefSource(RouteAddress::Inet6(a)) => source = Some(a.into()),
                _ => {}
            }
        }
        Ok((hop, source))
    }
}

impl Routes {
    /// The unicast routes of the main table that others installed (the host's own: its
    /// uplinks, its default routes), skipping those whose next hop is down: the routes the
    /// client's sessions may take outside the tunnel.
    pub async fn underlay(&self) -> Result<Vec<underlay::Route>> {
        Ok(self
            .dump()
            .await?
            .iter()
            .filter(|r| !Self::is_ours(r))
            .filter(|r| r.header.kind == RouteType::Unicast)
            .filter(|r| {
                !(r.header.flags.contains(RouteFlags::Linkdown)
                    || r.header.flags.contains(RouteFlags::Dead))
            })
            .map(|r| {
                let prefix = r.header.destination_prefix_length;
                let any = match r.header.address_family {
                    AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                    _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                };
                let mut route = underlay::Route {
                    dest: destination(r)
                        .unwrap_or_else(|| IpNet::new(any, prefix).unwrap_or(IpNet::from(any))),
                    gateway: None,
                    oif: None,
                    metric: 0,
                };
                for attr in &r.attributes {
                    match attr {
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                            route.gateway = Some((*a).into())
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                            route.gateway = Some((*a).into())
                        }
                        RouteAttribute::Oif(i) => route.oif = Some(*i),
                        RouteAttribute::Priority(m) => route.metric = *m,
                        _ => {}
                    }
                }
                route
            })
            .collect())
    }

    /// Makes `dest` unreachable (the kernel refuses to send there): better than letting the
    /// tunnel's own routes swallow what must never enter it.
    pub async fn replace_unreachable(&self, dest: IpNet) -> Result<()> {
        let mut msg = Self::message(dest, None, None, None)?;
        msg.header.kind = RouteType::Unreachable;
        self.install(msg)
            .await
            .with_context(|| format!("cannot make {dest} unreachable"))
    }
}

/// Notices of changes to the host's links, addresses and routes, each as `()`, except for
/// routes of ours (the client's own changes must not wake it again).
pub fn watch() -> Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    use rtnetlink::constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
    };
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    let (mut connection, _, mut messages) =
        rtnetlink::new_connection().context("cannot open a netlink socket")?;
    let groups = RTMGRP_LINK
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV6_ROUTE;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .context("cannot listen to the kernel's network changes")?;
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((message, _)) = futures::StreamExt::next(&mut messages).await {
            let ours = matches!(
                &message.payload,
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r)
                ) if Routes::is_ours(r)
            );
            if !ours && tx.send(()).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// errno "no such process", which netlink answers for a route that is not there.
const ESRCH: i32 = 3;

fn destination(route: &RouteMessage) -> Option<IpNet> {
    let prefix = route.header.destination_prefix_length;
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(d)) => {
            IpNet::new(IpAddr::V4(*d), prefix).ok()
        }
        RouteAttribute::Destination(RouteAddress::Inet6(d)) => {
            IpNet::new(IpAddr::V6(*d), prefix).ok()
        }
        _ => None,
    })
}
