//! The DN's side of its failure detector (`dn-fd`, thesis 3.2): heartbeats and faults to it over
//! a local datagram socket, and what it says about the other DNs back.
//!
//! The detector gives the socket's path in [`FD_SOCKET_ENV`]; a DN started without one (by
//! hand, or by an older supervisor) runs without a detector. The DN binds its own socket next
//! to its control socket so that the detector can answer.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_proto::fd::{LocalMessage, FD_SOCKET_ENV};
use holdfast_proto::node::Event;
use tokio::net::UnixDatagram;
use tracing::{debug, info, warn};

use super::Dn;

/// How often the DN tells its detector it is alive: a tenth of the detector's default
/// heartbeat timeout, so that one late tick is never a kill.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);

pub(super) struct Link {
    socket: UnixDatagram,
    path: PathBuf,
    detector: PathBuf,
}

impl Link {
    /// `None` when no detector supervises this DN.
    pub(super) fn connect(control: &Path) -> Result<Option<Self>> {
        let Some(detector) = std::env::var_os(FD_SOCKET_ENV).map(PathBuf::from) else {
            return Ok(None);
        };
        let path = holdfast_shell::control::beside(control, ".fd");
        // A socket file left by an earlier process of this DN.
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)
            .with_context(|| format!("cannot bind the detector socket {}", path.display()))?;
        info!(detector = %detector.display(), "supervised by a failure detector");
        Ok(Some(Self {
            socket,
            path,
            detector,
        }))
    }

    fn send(&self, message: &LocalMessage) {
        if let Err(e) = self
            .socket
            .try_send_to(message.encode().as_bytes(), &self.detector)
        {
            debug!(error = %e, "cannot reach the failure detector");
        }
    }

    /// Tells the detector the DN cannot go on; it kills and restarts it.
    pub(super) fn report_fault(&self, reason: &str) {
        self.send(&LocalMessage::Fault {
            pid: std::process::id(),
            reason: reason.to_owned(),
        });
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Heartbeats to the detector, and peer changes from it, for the DN's life.
pub(super) async fn run(dn: Arc<Dn>, link: Arc<Link>) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let pid = std::process::id();
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => link.send(&LocalMessage::Heartbeat {
                pid,
                forwarded: dn.forwarded.load(Relaxed),
            }),
            got = link.socket.recv(&mut buf) => match got {
                Ok(n) => match LocalMessage::decode(&buf[..n]) {
                    Some(LocalMessage::Peer { dn: peer, up }) => dn.handle(Event::Peer { dn: peer, up }).await,
                    other => debug!(?other, "ignoring a detector datagram"),
                },
                Err(e) => {
                    warn!(error = %e, "detector socket failed");
                    tokio::time::sleep(HEARTBEAT_INTERVAL).await;
                }
            },
        }
    }
}
