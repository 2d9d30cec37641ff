//! Which kernel routes a DN keeps, at which metric, and why.
//!
//! The routing table is the EN-DN mapping table (thesis 4.3): a DN's routes, exported by its
//! routing daemon into OSPF, tell the edge router where each client address lives. A DN
//! advertises its own blocks at the home metric and the blocks it backs for other DNs at the
//! standby metric, all the time, so that the edge already holds the next best route when a DN
//! dies. Lower metrics win.

use std::fmt;

use ipnet::IpNet;

use crate::cluster::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// A block a backup serves for a dead owner: better than home, so a restarted owner cannot
    /// take it back before its clients return.
    pub active: u32,
    /// A DN's own blocks.
    pub home: u32,
    /// Blocks a DN backs for another DN.
    pub standby: u32,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            active: 100,
            home: 200,
            standby: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// One of this DN's own blocks.
    Home,
    /// A block of `owner`'s pool that this DN backs.
    Standby { owner: String },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Home => write!(f, "own block"),
            Reason::Standby { owner } => write!(f, "standby for {owner}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub net: IpNet,
    pub metric: u32,
    pub reason: Reason,
}

/// The routes DN `me` keeps at all times: its own blocks at home, the blocks other DNs' pools
/// designate it to back at standby. Empty if `me` is not in the cluster.
pub fn standing(cluster: &Cluster, me: &str) -> Vec<RouteSpec> {
    let m = cluster.metrics;
    let mut out = Vec::new();
    for dn in &cluster.dns {
        for block in &dn.plan.blocks {
            if dn.name == me {
                out.push(RouteSpec {
                    net: block.net,
                    metric: m.home,
                    reason: Reason::Home,
                });
            } else if block.backup.as_deref() == Some(me) {
                out.push(RouteSpec {
                    net: block.net,
                    metric: m.standby,
                    reason: Reason::Standby {
                        owner: dn.name.clone(),
                    },
                });
            }
        }
    }
    out
}
