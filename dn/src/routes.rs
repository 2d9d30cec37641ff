//! Keeps the kernel's routes equal to the set the DN's machine decided, through netlink, with
//! protocol number 200 for the routing daemon to export. Every change is logged with its reason.

use anyhow::Result;
use holdfast_proto::routes::RouteSpec;
use holdfast_shell::netlink::{NextHop, Routes};
use tracing::{info, warn};

pub struct RouteInjector {
    netlink: Routes,
    through_tun: NextHop,
    installed: Vec<RouteSpec>,
    /// The generation of the set installed last: an older set arriving late is dropped.
    generation: Option<u64>,
}

impl RouteInjector {
    /// Routes into the TUN device `oif`; none installed yet.
    pub fn new(oif: u32) -> Result<Self> {
        Ok(Self {
            netlink: Routes::connect()?,
            through_tun: NextHop {
                gateway: None,
                oif: Some(oif),
            },
            installed: Vec::new(),
            generation: None,
        })
    }

    pub fn installed(&self) -> &[RouteSpec] {
        &self.installed
    }

    /// Makes the kernel hold exactly `desired` (set number `generation`). Adds what is missing
    /// first, then removes what is no longer wanted, so that a route changing metric is never
    /// absent in between.
    pub async fn apply(&mut self, generation: u64, desired: Vec<RouteSpec>) -> Result<()> {
        if self.generation.is_some_and(|g| g >= generation) {
            return Ok(());
        }
        self.generation = Some(generation);
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
