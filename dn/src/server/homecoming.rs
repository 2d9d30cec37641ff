//! Going home (ARCHITECTURE "Failover" 5, thesis 3.1).
//!
//! A DN restarted after its death finds, in the kernel's routes learned by its routing daemon,
//! the own blocks another DN still serves actively (that DN's block halves or host routes). It
//! neither advertises nor allocates from them, and tells its peers it is back. A peer carrying
//! clients of a returning DN tells each of them; the client moves its traffic home and demotes
//! the peer, which lowers the block to standby when its last client has left. The returning
//! DN's clients get host routes until then, and once the block is free again it is advertised
//! as before.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use holdfast_proto::cluster::{Cluster, DnSpec};
use holdfast_proto::control::Message;
use holdfast_proto::lease::IssuerKeys;
use holdfast_proto::peer::{Notice, PeerNotice};
use holdfast_proto::routes::held_blocks;
use holdfast_shell::netlink::Routes;
use holdfast_shell::quic::send_message;
use holdfast_shell::unix_now;
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::{Dn, Session};

/// How often the DN re-reads the kernel's routes to see which own blocks are held.
const HELD_CHECK: Duration = Duration::from_millis(250);
/// How often a DN whose blocks are held tells its peers it is back (UDP: repeat until heard).
const NOTICE_INTERVAL: Duration = Duration::from_secs(1);

/// Own blocks another DN serves actively, as the kernel's routes show now.
pub(super) async fn held_now(netlink: &Routes, spec: &DnSpec) -> Result<BTreeSet<IpNet>> {
    let learned = netlink.learned().await?;
    Ok(held_blocks(
        spec.plan.blocks.iter().map(|b| &b.net),
        &learned,
    ))
}

/// The DN's socket for notices to and from the other DNs, on the cluster network.
pub(super) struct Peers {
    socket: UdpSocket,
    addresses: Vec<(String, SocketAddr)>,
    keys: IssuerKeys,
    signing_key: ed25519_dalek::SigningKey,
}

impl Peers {
    /// `None` without `[ospf]`: no routing plane, so no blocks to hold and no peer addresses.
    pub(super) async fn bind(
        cluster: &Cluster,
        spec: &DnSpec,
        signing_key: ed25519_dalek::SigningKey,
    ) -> Result<Option<Self>> {
        let (Some(ospf), Some(me)) = (&cluster.ospf, spec.router_id) else {
            return Ok(None);
        };
        let local = SocketAddr::from((me, ospf.peer_port));
        let socket = UdpSocket::bind(local)
            .await
            .with_context(|| format!("cannot bind the peer socket {local} (ospf.peer_port)"))?;
        let addresses = cluster
            .dns
            .iter()
            .filter(|d| d.name != spec.name)
            .filter_map(|d| {
                Some((
                    d.name.clone(),
                    SocketAddr::from((d.router_id?, ospf.peer_port)),
                ))
            })
            .collect();
        Ok(Some(Self {
            socket,
            addresses,
            keys: cluster.issuer_keys(),
            signing_key,
        }))
    }

    async fn announce_home_is_back(&self, me: &str) {
        let datagram = PeerNotice {
            from: me.to_owned(),
            sent_at: unix_now(),
            notice: Notice::HomeIsBack,
        }
        .seal(&self.signing_key);
        for (name, address) in &self.addresses {
            if let Err(e) = self.socket.send_to(&datagram, address).await {
                debug!(peer = %name, %address, error = %e, "cannot send the peer notice");
            }
        }
    }
}

/// Follows the kernel's routes: which own blocks are held, and tells the peers while any is.
pub(super) async fn follow_held(
    dn: Arc<Dn>,
    netlink: Routes,
    mut held: BTreeSet<IpNet>,
    peers: Option<Arc<Peers>>,
) {
    let mut tick = tokio::time::interval(HELD_CHECK);
    let mut last_notice: Option<Instant> = None;
    let mut failing = false;
    loop {
        tick.tick().await;
        match held_now(&netlink, &dn.spec).await {
            Ok(now_held) => {
                failing = false;
                if now_held != held {
                    for block in now_held.difference(&held) {
                        info!(%block, "another DN serves this own block: not advertising or allocating from it");
                    }
                    for block in held.difference(&now_held) {
                        info!(%block, "own block free again: advertising and allocating from it");
                    }
                    dn.book
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .set_held(now_held.clone());
                    if let Err(e) = dn.routes.lock().await.set_held(now_held.clone()).await {
                        warn!(error = %format!("{e:#}"), "cannot follow the held blocks");
                    }
                    held = now_held;
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %format!("{e:#}"), "cannot read the kernel's routes");
                }
                failing = true;
            }
        }
        let due = last_notice.is_none_or(|t| t.elapsed() >= NOTICE_INTERVAL);
        if let (false, true, Some(peers)) = (held.is_empty(), due, &peers) {
            peers.announce_home_is_back(&dn.spec.name).await;
            last_notice = Some(Instant::now());
        }
    }
}

/// Reads the other DNs' notices; a returning DN's clients carried here are told to go home.
pub(super) async fn listen(dn: Arc<Dn>, peers: Arc<Peers>) {
    let mut buf = [0u8; 512];
    loop {
        let (n, from) = match peers.socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                debug!(error = %e, "peer socket error");
                continue;
            }
        };
        match PeerNotice::open(&buf[..n], &peers.keys, unix_now()) {
            Ok(PeerNotice {
                from: home,
                notice: Notice::HomeIsBack,
                ..
            }) => tell_clients_home_is_back(&dn, &home).await,
            // Heartbeats are between the failure detectors, on their own port.
            Ok(PeerNotice {
                notice: Notice::Alive { .. },
                ..
            }) => debug!(%from, "ignoring a detector heartbeat on the DN's port"),
            Err(e) => debug!(%from, error = %e, "ignoring a peer datagram"),
        }
    }
}

async fn tell_clients_home_is_back(dn: &Dn, home: &str) {
    let carried: Vec<Arc<Session>> = dn
        .hosts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|s| s.owner == home && s.promoted.load(std::sync::atomic::Ordering::Relaxed))
        .cloned()
        .collect();
    if carried.is_empty() {
        return;
    }
    info!(%home, clients = carried.len(), "home DN is back: telling its clients carried here");
    for session in carried {
        let mut control = session.control.lock().await;
        if let Err(e) = send_message(&mut control, &Message::HomeIsBack).await {
            debug!(client = %session.identity, error = %format!("{e:#}"), "cannot tell the client");
        }
    }
}
