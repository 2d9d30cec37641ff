//! Going home (thesis 3.1): the I/O around the machine's decisions.
//!
//! The DN reads the routes its routing daemon learned from the other DNs; the machine
//! (`proto::node`) decides which own blocks another DN has taken over and whether to tell the
//! peers this DN is back, which this module sends as signed UDP notices. A notice from a peer
//! goes to the machine, which tells that peer's clients carried here to go home.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_proto::cluster::{Cluster, DnSpec};
use holdfast_proto::fd::{Admission, PeerGate, PeerPolicy};
use holdfast_proto::lease::IssuerKeys;
use holdfast_proto::node::{Event, NodePolicy};
use holdfast_proto::peer::{Freshness, Notice, PeerNotice, Sequence};
use holdfast_shell::netlink::Routes;
use holdfast_shell::{unix_millis, unix_now};
use std::sync::atomic::Ordering::Relaxed;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::Dn;

/// How often the DN re-reads the routes its routing daemon learned.
const LEARNED_CHECK: Duration = Duration::from_millis(250);

/// The DN's socket for notices to and from the other DNs, on the cluster network.
pub(super) struct Peers {
    socket: UdpSocket,
    addresses: Vec<(String, SocketAddr)>,
    keys: IssuerKeys,
    signing_key: ed25519_dalek::SigningKey,
    sequence: std::sync::Mutex<Sequence>,
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
            sequence: std::sync::Mutex::new(Sequence::default()),
        }))
    }

    pub(super) async fn announce_home_is_back(&self, me: &str) {
        let seq = self
            .sequence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next(unix_millis());
        let datagram = PeerNotice {
            from: me.to_owned(),
            sent_at: unix_now(),
            notice: Notice::HomeIsBack { seq },
        }
        .seal(&self.signing_key);
        for (name, address) in &self.addresses {
            if let Err(e) = self.socket.send_to(&datagram, address).await {
                debug!(peer = %name, %address, error = %e, "cannot send the peer notice");
            }
        }
    }
}

/// Follows the routes the routing daemon learned from the other DNs: the machine decides which
/// own blocks are held and whether to tell the peers this DN is back.
pub(super) async fn follow_learned(dn: Arc<Dn>, netlink: Routes) {
    let mut tick = tokio::time::interval(LEARNED_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match netlink.learned().await {
            Ok(learned) => {
                failing = false;
                dn.handle(Event::Learned(learned)).await;
            }
            Err(e) => {
                if !failing {
                    warn!(error = %format!("{e:#}"), "cannot read the kernel's routes");
                }
                failing = true;
            }
        }
    }
}

/// Reads the other DNs' notices; the machine tells a returning DN's clients carried here.
pub(super) async fn listen(dn: Arc<Dn>, peers: Arc<Peers>) {
    let mut buf = [0u8; 512];
    // Notices come once a notice interval; the gate keeps a flood from costing signature work.
    let policy = PeerPolicy {
        interval: NodePolicy::default().notice_interval,
        ..PeerPolicy::default()
    };
    let addresses = peers.addresses.iter().map(|(n, a)| (n.clone(), a.ip()));
    let mut gate = PeerGate::new(addresses.collect(), policy, std::time::Instant::now());
    let mut freshness = Freshness::default();
    loop {
        let (n, from) = match peers.socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                debug!(error = %e, "peer socket error");
                continue;
            }
        };
        let Some(claimed) = PeerNotice::claimed_sender(&buf[..n]) else {
            debug!(%from, "ignoring a datagram that is no peer notice");
            continue;
        };
        let admission = gate.admit(&claimed, from.ip(), std::time::Instant::now());
        if !matches!(admission, Admission::Check(_)) {
            debug!(%from, ?claimed, ?admission, "ignoring a peer datagram before its signature");
            continue;
        }
        match PeerNotice::open(&buf[..n], &peers.keys) {
            Ok(
                notice @ PeerNotice {
                    notice: Notice::HomeIsBack { .. },
                    ..
                },
            ) => match freshness.take(&notice, unix_now()) {
                Ok(()) => {
                    dn.counters.peer_notices_taken.fetch_add(1, Relaxed);
                    dn.handle(Event::HomeIsBack { from: notice.from }).await
                }
                Err(e) => {
                    dn.counters.peer_notices_refused.fetch_add(1, Relaxed);
                    warn!(%from, error = %e, "ignoring a peer notice");
                }
            },
            // Heartbeats are between the failure detectors, on their own port.
            Ok(PeerNotice {
                notice: Notice::Alive { .. },
                ..
            }) => debug!(%from, "ignoring a detector heartbeat on the DN's port"),
            Err(e) => {
                dn.counters.peer_notices_refused.fetch_add(1, Relaxed);
                debug!(%from, error = %e, "ignoring a peer datagram");
            }
        }
    }
}
