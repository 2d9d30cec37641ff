//! The client's underlay: which of the host's own routes carries the client's sessions to a
//! DN once the tunnel's routes are in place (a full tunnel routes everything into the tunnel,
//! so the kernel's own answer for a DN endpoint is the tunnel itself).

use std::net::IpAddr;

use ipnet::IpNet;

/// A unicast route of the host's main table that the client did not install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// The kernel's priority: lower wins among routes of the same prefix length.
    pub metric: u32,
}

/// The route the kernel would pick for `to` from `table` alone: the longest prefix that
/// contains it, then the lowest metric (then the first listed, as the kernel keeps them).
pub fn route_to(to: IpAddr, table: &[Route]) -> Option<&Route> {
    table
        .iter()
        .filter(|r| r.dest.contains(&to))
        .min_by_key(|r| (std::cmp::Reverse(r.dest.prefix_len()), r.metric))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(dest: &str, gw: &str, oif: u32, metric: u32) -> Route {
        Route {
            dest: dest.parse().unwrap(),
            gateway: Some(gw.parse().unwrap()),
            oif: Some(oif),
            metric,
        }
    }

    #[test]
    fn the_preferred_default_route_then_the_other_when_it_goes() {
        let wifi = route("0.0.0.0/0", "172.16.1.1", 2, 600);
        let lte = route("0.0.0.0/0", "172.17.1.1", 3, 700);
        let to = "10.0.1.2".parse().unwrap();
        let both = [lte.clone(), wifi.clone()];
        assert_eq!(route_to(to, &both), Some(&wifi));
        assert_eq!(route_to(to, &both[..1]), Some(&lte));
        // A more specific route wins over any metric; an unrelated one is not taken.
        let direct = route("10.0.1.0/24", "10.0.1.1", 4, 1000);
        let other = route("10.9.0.0/16", "10.9.0.1", 5, 0);
        assert_eq!(
            route_to(to, &[wifi.clone(), direct.clone(), other.clone()]),
            Some(&direct)
        );
        assert_eq!(
            route_to("192.0.2.1".parse().unwrap(), &[direct, other]),
            None
        );
        assert_eq!(route_to(to, &[]), None);
    }

    proptest! {
        /// The route picked contains the address, and no route that contains it is more
        /// specific, or as specific with a lower metric.
        #[test]
        fn the_pick_is_the_longest_match_then_the_lowest_metric(
            routes in proptest::collection::vec((any::<u32>(), 0u8..=32, 0u32..4), 0..12),
            to in any::<u32>(),
        ) {
            let table: Vec<Route> = routes
                .iter()
                .map(|&(net, len, metric)| Route {
                    dest: IpNet::new(IpAddr::V4(net.into()), len).unwrap().trunc(),
                    gateway: None,
                    oif: Some(1),
                    metric,
                })
                .collect();
            let to = IpAddr::V4(to.into());
            match route_to(to, &table) {
                Some(best) => {
                    prop_assert!(best.dest.contains(&to));
                    for r in table.iter().filter(|r| r.dest.contains(&to)) {
                        let better = r.dest.prefix_len() > best.dest.prefix_len()
                            || (r.dest.prefix_len() == best.dest.prefix_len() && r.metric < best.metric);
                        prop_assert!(!better);
                    }
                }
                None => prop_assert!(table.iter().all(|r| !r.dest.contains(&to))),
            }
        }
    }
}
