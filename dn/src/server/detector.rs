//! The DN's side of its failure detector (`dn-fd`, thesis 3.2): heartbeats and faults to it over
//! a local datagram socket, and what it says about the other DNs back.
//!
//! The detector gives the socket's path in [`FD_SOCKET_ENV`]; a DN started without one (by
//! hand, or by an older supervisor) runs without a detector. The DN binds its own socket next
//! to its control socket so that the detector can answer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use holdfast_proto::fd::{LocalMessage, LoopWatch, FD_SOCKET_ENV};
use holdfast_proto::node::Event;
use tokio::net::UnixDatagram;
use tracing::{debug, info, warn};

use super::Dn;

/// How often the DN tells its detector it is alive: a tenth of the detector's default
/// heartbeat timeout, so that one late tick is never a kill.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
/// The event loop counts as stuck when it has not ticked for this long; the DN then stops
/// heartbeating and its detector kills it. Long enough that a burst of work on the loop
/// (thousands of handshakes, or a notice to every client) is not taken for a hang.
const LOOP_STUCK_AFTER: Duration = Duration::from_secs(1);

pub(super) struct Link {
    socket: UnixDatagram,
    /// The same socket, for the heartbeat thread.
    beats: std::os::unix::net::UnixDatagram,
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
        let bound = holdfast_shell::control::bind_private_datagram(&path)
            .context("cannot open the detector socket")?;
        let beats = bound
            .try_clone()
            .context("cannot share the detector socket")?;
        let socket = UnixDatagram::from_std(bound).context("cannot watch the detector socket")?;
        info!(detector = %detector.display(), "supervised by a failure detector");
        Ok(Some(Self {
            socket,
            beats,
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
    // Peer changes are handled by a task of their own, in order: handling one awaits routes and
    // thousands of notices, and the heartbeats must not wait for that.
    let (changes, mut pending) = tokio::sync::mpsc::unbounded_channel();
    let handler = dn.clone();
    tokio::spawn(async move {
        while let Some(event) = pending.recv().await {
            handler.handle(event).await;
        }
    });
    let ticks = Arc::new(AtomicU64::new(0));
    let (beat_dn, beat_link, beat_ticks) = (dn.clone(), link.clone(), ticks.clone());
    let spawned = std::thread::Builder::new()
        .name("fd-heartbeat".into())
        .spawn(move || heartbeat(&beat_dn, &beat_link, &beat_ticks));
    if let Err(e) = spawned {
        // Without heartbeats the detector kills and restarts the DN: say why first.
        link.report_fault(&format!("cannot start the heartbeat thread: {e}"));
    }
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ticks.fetch_add(1, Relaxed);
            }
            got = link.socket.recv(&mut buf) => match got {
                Ok(n) => match LocalMessage::decode(&buf[..n]) {
                    Some(LocalMessage::Peer { dn: peer, state }) => {
                        let _ = changes.send(Event::Peer { dn: peer, state });
                    }
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

/// The heartbeat thread: a heartbeat every interval while the event loop ticks (`ticks`), off
/// the loop so that a burst of work there does not read as a dead DN.
fn heartbeat(dn: &Dn, link: &Link, ticks: &AtomicU64) {
    let pid = std::process::id();
    let mut watch = LoopWatch::new(LOOP_STUCK_AFTER, ticks.load(Relaxed), Instant::now());
    loop {
        std::thread::sleep(HEARTBEAT_INTERVAL);
        if !watch.alive(Instant::now(), ticks.load(Relaxed)) {
            continue;
        }
        let beat = LocalMessage::Heartbeat {
            pid,
            forwarded: dn.forwarded.load(Relaxed),
            handled: dn.handled.load(Relaxed),
        };
        if let Err(e) = link.beats.send_to(beat.encode().as_bytes(), &link.detector) {
            debug!(error = %e, "cannot reach the failure detector");
        }
    }
}
