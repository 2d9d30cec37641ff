//! What must hold in the simulated cluster, checked after every quantum. The model reads the
//! world as its shells see it (sessions, primary flags, host tables, installed routes, what
//! each detector said) and never asks a machine for its own opinion.

use std::collections::BTreeSet;
use std::net::IpAddr;

use holdfast_proto::en::{Role, SessionState};
use holdfast_proto::routes::Reason;
use ipnet::IpNet;

use crate::world::{Conduct, World};

/// A client that lost its primary has a new one within this long, if any DN can carry it:
/// the longest reconnect back-off, a handshake timeout and some slack.
pub const LIVENESS_MS: u64 = 12_000;
/// After this long with every DN up and reachable, every honest client is home and the
/// routes are the standing ones: the reconnect back-off, one notice interval, and the idle
/// timeout that ends sessions a client left behind a broken path.
pub const SETTLE_MS: u64 = 25_000;

/// A client whose primary died (or went out of reach) sends through another DN within this
/// long, when it holds a live session to one: the detector's word or its own probes' deadline,
/// with room for the simulation's latency.
pub const FAILOVER_MS: u64 = 200;
/// How long after a forged hint the session it named is watched.
const FORGERY_WATCH_MS: u64 = 1_000;

pub fn check(w: &World) -> Result<(), String> {
    addresses(w)?;
    dead_primaries_are_replaced(w)?;
    forged_hints_move_nobody(w)?;
    for dn in 0..w.dns.len() {
        routes_follow_sessions(w, dn)?;
    }
    let calm = w.now.saturating_sub(w.last_disruption);
    if calm >= LIVENESS_MS {
        every_client_has_a_primary(w)?;
        nobody_moves_an_honest_client(w)?;
    }
    if calm >= SETTLE_MS && all_healthy(w) {
        everyone_is_home(w)?;
    }
    Ok(())
}

/// No two identities hold one address, and a client's address never changes while any of its
/// tickets is valid.
fn addresses(w: &World) -> Result<(), String> {
    let unix = w.unix();
    let mut holder: std::collections::BTreeMap<IpAddr, &str> = Default::default();
    for e in &w.ens {
        let valid: BTreeSet<IpAddr> = e
            .tickets
            .iter()
            .filter(|(_, expiry)| *expiry > unix)
            .map(|(a, _)| *a)
            .collect();
        if valid.len() > 1 {
            return Err(format!(
                "{}'s address changed while its tickets were valid: {valid:?}",
                e.identity
            ));
        }
        for a in valid {
            if let Some(other) = holder.insert(a, &e.identity) {
                return Err(format!("{other} and {} both hold {a}", e.identity));
            }
        }
    }
    Ok(())
}

fn dead_primaries_are_replaced(w: &World) -> Result<(), String> {
    for (i, e) in w.ens.iter().enumerate() {
        let (Some(since), Some(carrier)) = (e.stranded_since, e.carrier) else {
            continue;
        };
        if e.conduct != Conduct::Honest || w.now - since <= FAILOVER_MS {
            continue;
        }
        let alternative = (0..w.dns.len()).find(|&d| {
            d != carrier
                && e.machine.state(d) == Some(&SessionState::Up(Role::Secondary))
                && w.session_alive(i, d)
        });
        if let Some(d) = alternative {
            return Err(format!(
                "{} still sends through {} {} ms after it died or went out of reach, while its session to {} is alive",
                e.identity,
                w.dns[carrier].name,
                w.now - since,
                w.dns[d].name
            ));
        }
    }
    Ok(())
}

fn forged_hints_move_nobody(w: &World) -> Result<(), String> {
    for (i, e) in w.ens.iter().enumerate() {
        let Some((d, conn, at)) = e.forged else {
            continue;
        };
        // A rogue's own outages are not tracked.
        if e.conduct != Conduct::Honest {
            continue;
        }
        // Only a hint in calm weather counts: a real outage around it may end the session.
        if w.now - at > FORGERY_WATCH_MS || w.last_disruption + FORGERY_WATCH_MS >= at {
            continue;
        }
        let c = &w.conns[&conn];
        let still_alive = w.dn_running(d)
            && w.path_up(i, d)
            && c.incarnation == w.dns[d].incarnation
            && !c.dn_closed;
        if still_alive && e.conns[d] != Some(conn) {
            return Err(format!(
                "a forged ICMP error ended {}'s session to {}, which is alive",
                e.identity, w.dns[d].name
            ));
        }
    }
    Ok(())
}

fn owner_of(w: &World, address: IpAddr) -> Option<usize> {
    w.cluster
        .dns
        .iter()
        .position(|d| d.plan.pool.contains(&address))
}

fn block_of(w: &World, address: IpAddr) -> Option<IpNet> {
    let owner = owner_of(w, address)?;
    w.cluster.dns[owner]
        .plan
        .block_containing(address)
        .map(|b| b.net)
}

/// Every route a DN has is justified by the sessions it carries, its detector's word and the
/// routes it learned; every client it carries as primary is routed to it.
fn routes_follow_sessions(w: &World, dn: usize) -> Result<(), String> {
    let d = &w.dns[dn];
    if d.machine.is_none() {
        if !d.routes.is_empty() {
            return Err(format!("{} is not running but has routes", d.name));
        }
        return Ok(());
    }
    let me = &w.cluster.dns[dn];
    let primaries = w.primaries(dn);
    let held: BTreeSet<IpNet> = me
        .plan
        .blocks
        .iter()
        .map(|b| b.net)
        .filter(|b| {
            d.learned
                .iter()
                .any(|r| r.prefix_len() == b.prefix_len() + 1 && b.contains(r))
        })
        .collect();
    let backed_by_me = |net: &IpNet| {
        w.cluster.dns.iter().any(|o| {
            o.plan
                .blocks
                .iter()
                .any(|b| b.net == *net && b.backup.as_deref() == Some(d.name.as_str()))
        })
    };
    let fail = |what: String| Err(format!("{}: {what}; routes {:?}", d.name, d.routes));
    for r in &d.routes {
        match &r.reason {
            Reason::Home => {
                if !me.plan.blocks.iter().any(|b| b.net == r.net) {
                    return fail(format!("{} is not an own block", r.net));
                }
                if held.contains(&r.net) {
                    return fail(format!(
                        "own block {} is advertised while another DN holds it",
                        r.net
                    ));
                }
            }
            Reason::Standby { .. } => {
                if !backed_by_me(&r.net) {
                    return fail(format!("{} is not a block it backs", r.net));
                }
            }
            Reason::Active { .. } => {
                let whole = r.net.supernet().filter(backed_by_me);
                let Some(block) = whole else {
                    return fail(format!("{} is not a half of a block it backs", r.net));
                };
                if !d.may_take_over.contains(&block) {
                    return fail(format!(
                        "block {block} is announced whole, but its owner is not down by the detector here (nor was it while a client of it is carried)"
                    ));
                }
            }
            Reason::Host { .. } | Reason::Returning => {
                let a = r.net.addr();
                if r.net.prefix_len() != r.net.max_prefix_len() {
                    return fail(format!("{} is not a host route", r.net));
                }
                if !primaries.contains_key(&a) {
                    return fail(format!(
                        "{a} is routed here but no session here carries it as primary"
                    ));
                }
                let own = me.plan.pool.contains(&a);
                if own != (r.reason == Reason::Returning) {
                    return fail(format!("{} has the wrong reason", r.net));
                }
                if own && !block_of(w, a).is_some_and(|b| held.contains(&b)) {
                    return fail(format!(
                        "own client {a} has a host route but its block is not held"
                    ));
                }
                if !own && block_of(w, a).is_some_and(|b| d.may_take_over.contains(&b)) {
                    return fail(format!(
                        "{a} has a host route inside a block taken over whole"
                    ));
                }
            }
        }
    }
    // Every client carried as primary is routed here.
    for a in primaries.keys() {
        let covered = d.routes.iter().any(|r| {
            r.net.contains(a)
                && match r.reason {
                    Reason::Home => true,
                    Reason::Standby { .. } => false,
                    _ => true,
                }
        });
        if !covered {
            return fail(format!("primary client {a} is not routed here"));
        }
    }
    // A block this DN may take over while its owner is down is announced whole.
    for block in &d.may_take_over {
        let halves = d
            .routes
            .iter()
            .filter(|r| {
                matches!(r.reason, Reason::Active { .. }) && r.net.supernet() == Some(*block)
            })
            .count();
        if halves != 2 {
            return fail(format!(
                "block {block} is taken over but not announced whole"
            ));
        }
    }
    Ok(())
}

fn all_healthy(w: &World) -> bool {
    (0..w.dns.len()).all(|d| w.dn_running(d) && !w.dns[d].cut)
        && w.ens.iter().all(|e| e.asleep_until.is_none())
}

/// A started, awake, honest client with a DN it can reach has a primary there.
fn every_client_has_a_primary(w: &World) -> Result<(), String> {
    for (i, e) in w.ens.iter().enumerate() {
        if !e.started || e.asleep_until.is_some() || e.conduct != Conduct::Honest {
            continue;
        }
        let reachable = (0..w.dns.len()).any(|d| w.dn_running(d) && w.path_up(i, d));
        if !reachable {
            continue;
        }
        match e.carrier {
            Some(d) if w.dn_running(d) && w.path_up(i, d) => {}
            other => {
                return Err(format!(
                    "{} has no working primary ({other:?}) {} ms after the last failure",
                    e.identity,
                    w.now - w.last_disruption
                ))
            }
        }
    }
    Ok(())
}

/// The edge sends every honest client's traffic to the DN the client sends through, whatever
/// other clients do.
fn nobody_moves_an_honest_client(w: &World) -> Result<(), String> {
    for e in &w.ens {
        if !e.started || e.asleep_until.is_some() || e.conduct != Conduct::Honest {
            continue;
        }
        let (Some(carrier), Some(lease)) = (e.carrier, e.machine.lease()) else {
            continue;
        };
        let address = lease.ticket.claim.address;
        let hops = w.edge_next_hops(address);
        if hops != vec![carrier] {
            let names: Vec<&str> = hops.iter().map(|h| w.dns[*h].name.as_str()).collect();
            return Err(format!(
                "{} sends through {} but the edge routes {address} to {names:?}",
                e.identity, w.dns[carrier].name
            ));
        }
    }
    Ok(())
}

/// With every DN up for long enough: every honest client is home, and no DN routes anything but
/// its standing routes (and the host routes rogue clients pulled to themselves).
fn everyone_is_home(w: &World) -> Result<(), String> {
    let mut rogue_addresses = BTreeSet::new();
    for e in &w.ens {
        let Some(lease) = e.machine.lease() else {
            continue;
        };
        let address = lease.ticket.claim.address;
        if e.conduct == Conduct::Rogue {
            rogue_addresses.insert(address);
            continue;
        }
        if !e.started {
            continue;
        }
        let home = owner_of(w, address);
        if e.carrier != home {
            return Err(format!(
                "{} is not home: it sends through {:?}, home is {:?}",
                e.identity, e.carrier, home
            ));
        }
    }
    for d in &w.dns {
        for r in &d.routes {
            let stray = match r.reason {
                Reason::Home | Reason::Standby { .. } => false,
                Reason::Host { .. } | Reason::Returning => !rogue_addresses.contains(&r.net.addr()),
                Reason::Active { .. } => true,
            };
            if stray {
                return Err(format!(
                    "{} still routes {} ({}) with every DN up",
                    d.name, r.net, r.reason
                ));
            }
        }
        let halves_learned: Vec<&IpNet> = d
            .learned
            .iter()
            .filter(|r| r.prefix_len() < r.max_prefix_len())
            .filter(|r| {
                !w.cluster
                    .dns
                    .iter()
                    .any(|o| o.plan.blocks.iter().any(|b| b.net == **r))
            })
            .collect();
        if !halves_learned.is_empty() {
            return Err(format!("{} still learns {halves_learned:?}", d.name));
        }
    }
    Ok(())
}
