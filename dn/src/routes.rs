//! Keeps the kernel's routes equal to what the DN's [`RoutePlan`] wants, through netlink, with
//! protocol number 200 for the routing daemon to export. Every change is logged with its reason.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Result;
use holdfast_proto::cluster::Cluster;
use holdfast_proto::routes::{RoutePlan, RouteSpec};
use holdfast_shell::netlink::{NextHop, Routes};
use ipnet::IpNet;
use tracing::{info, warn};

pub struct RouteInjector {
    netlink: Routes,
    through_tun: NextHop,
    plan: RoutePlan,
    installed: Vec<RouteSpec>,
}

impl RouteInjector {
    /// Installs the DN's standing routes into the TUN device `oif`, leaving out the own blocks
    /// another DN serves actively (`held`).
    pub async fn start(
        cluster: &Cluster,
        me: &str,
        oif: u32,
        held: BTreeSet<IpNet>,
    ) -> Result<Self> {
        let mut injector = Self {
            netlink: Routes::connect()?,
            through_tun: NextHop {
                gateway: None,
                oif: Some(oif),
            },
            plan: RoutePlan::new(cluster, me),
            installed: Vec::new(),
        };
        injector.plan.set_held(held);
        injector.sync().await?;
        Ok(injector)
    }

    /// This DN became the primary of a client of `owner`'s pool.
    pub async fn serve(&mut self, address: IpAddr, owner: &str, block: IpNet) -> Result<()> {
        self.plan.serve(address, owner, block);
        self.sync().await
    }

    /// The client at `address` left this DN.
    pub async fn release(&mut self, address: IpAddr) -> Result<()> {
        self.plan.release(address);
        self.sync().await
    }

    /// Another DN serves these own blocks actively (or no longer does): follow.
    pub async fn set_held(&mut self, held: BTreeSet<IpNet>) -> Result<()> {
        if self.plan.set_held(held) {
            self.sync().await?;
        }
        Ok(())
    }

    /// The failure detector says DN `owner` is down (or up again): the blocks this DN backs
    /// for it go active at once (or back to standby once no client of it is carried here).
    pub async fn set_down(&mut self, owner: &str, down: bool) -> Result<()> {
        if self.plan.set_down(owner, down) {
            self.sync().await?;
        }
        Ok(())
    }

    /// DNs the failure detector reports down.
    pub fn down(&self) -> &BTreeSet<String> {
        self.plan.down()
    }

    /// Own blocks another DN serves actively.
    pub fn held(&self) -> &BTreeSet<IpNet> {
        self.plan.held()
    }

    pub fn installed(&self) -> &[RouteSpec] {
        &self.installed
    }

    /// Adds what is missing first, then removes what is no longer wanted, so that a route
    /// changing metric is never absent in between.
    async fn sync(&mut self) -> Result<()> {
        let desired = self.plan.desired();
        for route in &desired {
            if !self.installed.contains(route) {
                self.netlink
                    .replace(route.net, &self.through_tun, Some(route.metric))
                    .await?;
                info!(route = %route.net, metric = route.metric, reason = %route.reason, "route installed");
            }
        }
        for old in &self.installed {
            if !desired.contains(old) {
                match self
                    .netlink
                    .delete(old.net, self.through_tun.oif, Some(old.metric))
                    .await
                {
                    Ok(()) => {
                        info!(route = %old.net, metric = old.metric, was = %old.reason, "route removed")
                    }
                    Err(e) => {
                        warn!(route = %old.net, error = %format!("{e:#}"), "cannot remove route")
                    }
                }
            }
        }
        self.installed = desired;
        Ok(())
    }
}
