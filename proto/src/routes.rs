//! Which kernel routes a DN keeps, at which metric, and why.
//!
//! The routing table is the EN-DN mapping table (thesis 4.3): a DN's routes, exported by its
//! routing daemon into OSPF, tell the edge router where each client address lives. A DN
//! advertises its own blocks at the home metric and the blocks it backs for other DNs at the
//! standby metric, all the time, so that the edge already holds the next best route when a DN
//! dies. Lower metrics win.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

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
    /// A half of a backed block of `owner`'s whose clients this DN now carries.
    Active { owner: String },
    /// A client of `owner`'s whose block another DN backs, carried here.
    Host { owner: String },
    /// An own client back home while another DN still serves its block: the host route wins
    /// over that DN's block halves until it lets the block go.
    Returning,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Home => write!(f, "own block"),
            Reason::Standby { owner } => write!(f, "standby for {owner}"),
            Reason::Active { owner } => write!(f, "serving for {owner}"),
            Reason::Host { owner } => write!(f, "host for {owner}"),
            Reason::Returning => write!(f, "own client back home"),
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
        // Both families alike: a dual-stack DN's IPv6 blocks are backed as its IPv4 ones.
        for block in dn
            .plan
            .blocks
            .iter()
            .chain(dn.plan6.iter().flat_map(|p| &p.blocks))
        {
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

/// A DN's route decisions over time: the standing routes, plus what serving clients of other
/// DNs adds. The shell applies the difference between successive [`RoutePlan::desired`] sets.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    me: String,
    metrics: Metrics,
    standing: Vec<RouteSpec>,
    /// Blocks of other DNs that this DN backs, by block.
    backed: Vec<(IpNet, String)>,
    /// Clients of other DNs this DN actively carries: address -> (owner, block).
    active: BTreeMap<IpAddr, (String, IpNet)>,
    /// Own blocks another DN serves actively (learned from the kernel after a restart): neither
    /// advertised nor allocated from until that DN lets them go.
    held: BTreeSet<IpNet>,
    /// Own clients whose traffic comes through this DN: address -> block.
    home: BTreeMap<IpAddr, IpNet>,
    /// DNs the failure detector reports down: the blocks this DN backs for them go active at
    /// once, before their clients' traffic arrives.
    down: BTreeSet<String>,
    /// Backed blocks this DN has taken over: their owner went down (by the detector), and they
    /// stay taken over while the owner is down or any of their clients is carried here. Only
    /// these are announced as halves; a client carried here otherwise gets a host route, so
    /// that one client sending through a secondary never pulls its whole block away from a
    /// healthy home.
    taken_over: BTreeSet<IpNet>,
}

/// The own blocks another DN has taken over: those whose halves (the taking DN's announcement)
/// are among `learned`, the routes the routing daemon put into the kernel. A host route inside a
/// block moves one client, not the block, and does not hold it.
pub fn held_blocks<'a>(
    own: impl IntoIterator<Item = &'a IpNet>,
    learned: &[IpNet],
) -> BTreeSet<IpNet> {
    own.into_iter()
        .filter(|block| {
            learned
                .iter()
                .any(|r| r.prefix_len() == block.prefix_len() + 1 && block.contains(r))
        })
        .copied()
        .collect()
}

/// The own blocks some of whose clients another DN carries: those with any route more specific
/// than the block (halves or host routes) among `learned`. A DN back from a restart tells its
/// peers while any is, so that those clients come home.
pub fn blocks_carried_elsewhere<'a>(
    own: impl IntoIterator<Item = &'a IpNet>,
    learned: &[IpNet],
) -> BTreeSet<IpNet> {
    own.into_iter()
        .filter(|block| {
            learned
                .iter()
                .any(|r| r.prefix_len() > block.prefix_len() && block.contains(r))
        })
        .copied()
        .collect()
}

impl RoutePlan {
    pub fn new(cluster: &Cluster, me: &str) -> Self {
        let standing = standing(cluster, me);
        let backed = standing
            .iter()
            .filter_map(|r| match &r.reason {
                Reason::Standby { owner } => Some((r.net, owner.clone())),
                _ => None,
            })
            .collect();
        Self {
            me: me.to_owned(),
            metrics: cluster.metrics,
            standing,
            backed,
            active: Default::default(),
            held: Default::default(),
            home: Default::default(),
            down: Default::default(),
            taken_over: Default::default(),
        }
    }

    /// This DN now carries `address` (of `owner`'s pool, in `block`) for a client whose
    /// primary it has become. Own clients change nothing while their block is routed here.
    /// Returns whether [`RoutePlan::desired`] changed: most often it did not (the block is
    /// routed here whole), and thousands of clients switching at once need not each rebuild it.
    pub fn serve(&mut self, address: IpAddr, owner: &str, block: IpNet) -> bool {
        let before = self.host_route(&address);
        if owner == self.me {
            self.home.insert(address, block);
        } else {
            self.active.insert(address, (owner.to_owned(), block));
        }
        before != self.host_route(&address)
    }

    /// The host routes [`RoutePlan::desired`] holds for `address`: one for a client of another
    /// DN (with its owner), one for an own client returning home.
    fn host_route(&self, address: &IpAddr) -> (Option<String>, bool) {
        let carried = self
            .active
            .get(address)
            .filter(|(_, block)| !self.taken_over.contains(block))
            .map(|(owner, _)| owner.clone());
        let returning = self
            .home
            .get(address)
            .is_some_and(|block| self.held.contains(block));
        (carried, returning)
    }

    /// The client at `address` has left this DN.
    pub fn release(&mut self, address: IpAddr) {
        self.active.remove(&address);
        self.home.remove(&address);
        self.settle_taken_over();
    }

    /// Lets go of taken-over blocks whose owner is up again and of which no client is carried.
    fn settle_taken_over(&mut self) {
        let (backed, down, active) = (&self.backed, &self.down, &self.active);
        self.taken_over.retain(|block| {
            let owner_down = backed
                .iter()
                .any(|(b, owner)| b == block && down.contains(owner));
            owner_down || active.values().any(|(_, b)| b == block)
        });
    }

    /// Stops announcing the blocks taken over from `owner` whole, if it is up: the clients of
    /// those blocks still carried here get host routes instead. Says whether that changed
    /// anything.
    pub fn let_go_of(&mut self, owner: &str) -> bool {
        if self.down.contains(owner) {
            return false;
        }
        let before = self.taken_over.len();
        let backed = &self.backed;
        self.taken_over
            .retain(|block| !backed.iter().any(|(b, o)| b == block && o == owner));
        self.taken_over.len() != before
    }

    /// Whether any block taken over from `owner` is still announced whole.
    pub fn holds_blocks_of(&self, owner: &str) -> bool {
        self.backed
            .iter()
            .any(|(b, o)| o == owner && self.taken_over.contains(b))
    }

    /// Backed blocks this DN announces as halves now.
    pub fn taken_over(&self) -> &BTreeSet<IpNet> {
        &self.taken_over
    }

    /// Records which own blocks another DN serves actively; says whether that changed.
    pub fn set_held(&mut self, held: BTreeSet<IpNet>) -> bool {
        let changed = held != self.held;
        self.held = held;
        changed
    }

    pub fn held(&self) -> &BTreeSet<IpNet> {
        &self.held
    }

    /// Records whether DN `owner` is down, as the failure detector says; says whether that
    /// changed.
    pub fn set_down(&mut self, owner: &str, down: bool) -> bool {
        let changed = if down {
            let blocks = self.backed.iter().filter(|(_, o)| o == owner);
            self.taken_over.extend(blocks.map(|(b, _)| *b));
            self.down.insert(owner.to_owned())
        } else {
            self.down.remove(owner)
        };
        self.settle_taken_over();
        changed
    }

    pub fn down(&self) -> &BTreeSet<String> {
        &self.down
    }

    /// Every route the DN should have now. One route per destination.
    ///
    /// A taken-over block keeps its standby route and gains its two halves at the active metric:
    /// longer prefixes win everywhere, whatever the metric (ospfd cannot set an OSPF cost from a
    /// kernel metric; see docs/routing-daemons.md), so a restarted owner cannot take the block
    /// back before its clients return. Other clients of other DNs carried here get host routes.
    pub fn desired(&self) -> Vec<RouteSpec> {
        let mut out: Vec<RouteSpec> = Vec::with_capacity(self.standing.len() + self.active.len());
        for r in &self.standing {
            if r.reason == Reason::Home && self.held.contains(&r.net) {
                continue;
            }
            out.push(r.clone());
            let Reason::Standby { owner } = &r.reason else {
                continue;
            };
            if !self.taken_over.contains(&r.net) {
                continue;
            }
            let halves = r
                .net
                .subnets(r.net.prefix_len() + 1)
                .map(|s| s.collect::<Vec<_>>())
                .unwrap_or_default();
            for half in halves {
                out.push(RouteSpec {
                    net: half,
                    metric: self.metrics.active,
                    reason: Reason::Active {
                        owner: owner.clone(),
                    },
                });
            }
        }
        for (address, (owner, block)) in &self.active {
            if !self.taken_over.contains(block) {
                out.push(RouteSpec {
                    net: IpNet::from(*address),
                    metric: self.metrics.active,
                    reason: Reason::Host {
                        owner: owner.clone(),
                    },
                });
            }
        }
        for (address, block) in &self.home {
            if self.held.contains(block) {
                out.push(RouteSpec {
                    net: IpNet::from(*address),
                    metric: self.metrics.active,
                    reason: Reason::Returning,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cluster(n: usize) -> Cluster {
        let key = crate::lease::encode_key(
            &ed25519_dalek::SigningKey::from_bytes(&[9; 32])
                .verifying_key()
                .to_bytes(),
        );
        let mut text = "[cluster]\nclient_ca = \"ca.pem\"\n".to_owned();
        for i in 1..=n {
            text += &format!(
                "[[dn]]\nname = \"dn{i}\"\nendpoint = \"10.0.0.{i}\"\npool = \"10.20{i}.0.0/24\"\npublic_key = \"{key}\"\n"
            );
        }
        Cluster::parse(&text, Path::new("/")).unwrap()
    }

    fn show(plan: &RoutePlan) -> Vec<String> {
        plan.desired()
            .iter()
            .map(|r| format!("{} {} {}", r.net, r.metric, r.reason))
            .collect()
    }

    #[test]
    fn a_client_of_a_healthy_owner_moves_alone_and_a_dead_owners_block_moves_whole() {
        let mut plan = RoutePlan::new(&cluster(3), "dn2");
        let standby = show(&plan);
        // dn1's block backed by dn2 is 10.201.0.0/25.
        let block: IpNet = "10.201.0.0/25".parse().unwrap();
        // dn1 is up: a client sending here moves its own address, never its block.
        assert!(plan.serve("10.201.0.5".parse().unwrap(), "dn1", block));
        assert!(
            !plan.serve("10.201.0.5".parse().unwrap(), "dn1", block),
            "no change"
        );
        let alone = show(&plan);
        assert!(alone.contains(&"10.201.0.5/32 100 host for dn1".to_owned()));
        assert!(!alone.iter().any(|r| r.contains("serving")), "{alone:?}");
        plan.release("10.201.0.5".parse().unwrap());
        assert_eq!(show(&plan), standby);
        // dn1 is down: the block is taken over as its halves, and its clients ride on them.
        plan.set_down("dn1", true);
        let taken_over = show(&plan);
        // The block is routed here whole: its clients change no route.
        assert!(!plan.serve("10.201.0.5".parse().unwrap(), "dn1", block));
        assert!(!plan.serve("10.201.0.6".parse().unwrap(), "dn1", block));
        let serving = show(&plan);
        assert_eq!(serving, taken_over);
        for want in [
            "10.201.0.0/25 300 standby for dn1",
            "10.201.0.0/26 100 serving for dn1",
            "10.201.0.64/26 100 serving for dn1",
        ] {
            assert!(
                serving.contains(&want.to_owned()),
                "{want} missing from {serving:?}"
            );
        }
        assert!(!serving.iter().any(|r| r.contains("/32")), "{serving:?}");
        // dn1 is back: the block stays taken over until its last client has left.
        plan.set_down("dn1", false);
        plan.release("10.201.0.5".parse().unwrap());
        assert_eq!(show(&plan), serving);
        plan.release("10.201.0.6".parse().unwrap());
        assert_eq!(show(&plan), standby);
        assert!(plan.taken_over().is_empty());
        // A client that never goes home does not keep the block whole: once let go of, it keeps
        // a host route of its own.
        plan.set_down("dn1", true);
        plan.serve("10.201.0.5".parse().unwrap(), "dn1", block);
        assert!(!plan.let_go_of("dn1"), "dn1 is still down");
        plan.set_down("dn1", false);
        assert!(plan.holds_blocks_of("dn1"));
        assert!(plan.let_go_of("dn1"));
        assert!(!plan.holds_blocks_of("dn1"));
        assert_eq!(show(&plan), alone);
    }

    #[test]
    fn a_dead_owners_backed_blocks_go_active_at_once_and_stay_while_clients_remain() {
        let c = cluster(2);
        let mut plan = RoutePlan::new(&c, "dn2");
        let before = show(&plan);
        assert!(plan.set_down("dn1", true));
        assert!(!plan.set_down("dn1", true));
        assert_eq!(
            show(&plan),
            vec![
                "10.201.0.0/24 300 standby for dn1",
                "10.201.0.0/25 100 serving for dn1",
                "10.201.0.128/25 100 serving for dn1",
                "10.202.0.0/24 200 own block",
            ]
        );
        // A client carried here keeps its block active after the owner is back up.
        let block: IpNet = "10.201.0.0/24".parse().unwrap();
        plan.serve("10.201.0.9".parse().unwrap(), "dn1", block);
        assert!(plan.set_down("dn1", false));
        assert_eq!(show(&plan).len(), before.len() + 2);
        plan.release("10.201.0.9".parse().unwrap());
        assert_eq!(show(&plan), before);
    }

    #[test]
    fn a_client_beyond_its_blocks_backup_gets_a_host_route() {
        let mut plan = RoutePlan::new(&cluster(3), "dn2");
        // dn1's second block is backed by dn3; dn2 carries one of its clients anyway.
        plan.serve(
            "10.201.0.130".parse().unwrap(),
            "dn1",
            "10.201.0.128/25".parse().unwrap(),
        );
        assert!(show(&plan).contains(&"10.201.0.130/32 100 host for dn1".to_owned()));
        // Own clients add nothing.
        let before = show(&plan);
        plan.serve(
            "10.202.0.7".parse().unwrap(),
            "dn2",
            "10.202.0.0/25".parse().unwrap(),
        );
        assert_eq!(show(&plan), before);
    }

    #[test]
    fn a_held_block_is_not_advertised_and_its_returning_clients_get_host_routes() {
        let mut plan = RoutePlan::new(&cluster(2), "dn1");
        let normal = show(&plan);
        assert!(normal.contains(&"10.201.0.0/24 200 own block".to_owned()));
        // dn2 serves dn1's block as its halves: the kernel learned them by OSPF.
        let learned: Vec<IpNet> = ["10.201.0.0/25", "10.201.0.128/25", "10.202.0.0/24"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let own: Vec<IpNet> = vec!["10.201.0.0/24".parse().unwrap()];
        let held = held_blocks(&own, &learned);
        assert_eq!(held, own.iter().copied().collect());
        assert!(plan.set_held(held.clone()));
        assert!(!plan.set_held(held));
        assert!(!show(&plan).iter().any(|r| r.contains("own block")));
        // A client comes home before dn2 lets the block go: a host route wins over the halves.
        plan.serve("10.201.0.9".parse().unwrap(), "dn1", own[0]);
        assert!(show(&plan).contains(&"10.201.0.9/32 100 own client back home".to_owned()));
        // dn2 let go: the block is advertised again and covers the client.
        assert!(plan.set_held(BTreeSet::new()));
        assert_eq!(show(&plan), normal);
        // The standby copy of one's own block (same prefix) does not hold it, nor does a host
        // route: that moves one client, which is carried elsewhere.
        assert!(held_blocks(&own, &["10.201.0.0/24".parse().unwrap()]).is_empty());
        let host: Vec<IpNet> = vec!["10.201.0.9/32".parse().unwrap()];
        assert!(held_blocks(&own, &host).is_empty());
        assert_eq!(
            blocks_carried_elsewhere(&own, &host),
            own.iter().copied().collect()
        );
    }

    #[test]
    fn one_route_per_destination() {
        let mut plan = RoutePlan::new(&cluster(4), "dn3");
        for (i, r) in plan.clone().desired().iter().enumerate() {
            if let Reason::Standby { owner } = &r.reason {
                plan.serve(r.net.addr(), owner, r.net);
            }
            plan.serve(
                format!("10.204.0.{}", 200 + i).parse().unwrap(),
                "dn4",
                "10.204.0.192/26".parse().unwrap(),
            );
        }
        let routes = plan.desired();
        let mut nets: Vec<IpNet> = routes.iter().map(|r| r.net).collect();
        nets.sort();
        nets.dedup();
        assert_eq!(nets.len(), routes.len());
    }
}
