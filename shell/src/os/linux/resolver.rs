//! Applies the DNS servers and search domains the cluster pushes with the lease, and takes them
//! back when the client stops. The one place that knows how Linux configures its resolver:
//! systemd-resolved over D-Bus (per-link DNS on the TUN device) where resolv.conf points at it,
//! `/etc/resolv.conf` itself otherwise. What to write and what to restore is decided in [`holdfast_proto::dns`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_proto::dns::{
    choose_backend, resolv_conf, restore, Backend, DnsMode, DnsSettings, ResolvBackup,
    ResolvConfKind, Restore,
};
use tracing::{info, warn};

pub const RESOLV_CONF: &str = "/etc/resolv.conf";
const RESOLVED: &str = "org.freedesktop.resolve1";
const RESOLVED_PATH: &str = "/org/freedesktop/resolve1";
const RESOLVED_MANAGER: &str = "org.freedesktop.resolve1.Manager";
/// A D-Bus call that takes longer than this is taken as "resolved is not there".
const BUS_TIMEOUT: Duration = Duration::from_secs(3);

/// What is applied now, and how.
struct Applied {
    settings: DnsSettings,
    via: Via,
}

enum Via {
    Resolved {
        bus: zbus::Connection,
        link: i32,
    },
    /// The backup is also in the file, for a client that crashes.
    ResolvConf(ResolvBackup),
}

pub struct Resolver {
    mode: DnsMode,
    /// Where the resolv.conf backup is kept while the client runs (beside its control socket).
    backup: PathBuf,
    applied: Option<Applied>,
    /// Why the pushed settings are not applied, when they are not.
    note: Option<String>,
}

impl Resolver {
    /// `control_socket`: the backup goes beside it (`en.sock` -> `en.resolv.conf.json`).
    pub fn new(mode: DnsMode, control_socket: &Path) -> Self {
        let stem = control_socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "en".into());
        Self {
            mode,
            backup: control_socket.with_file_name(format!("{stem}.resolv.conf.json")),
            applied: None,
            note: None,
        }
    }

    /// Restores resolv.conf from a backup a client that did not stop cleanly left behind
    /// (whatever `dns` says now: the file is still the crashed client's).
    pub fn recover(&self) {
        let text = match std::fs::read_to_string(&self.backup) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(backup = %self.backup.display(), error = %e, "cannot read the resolv.conf backup");
                return;
            }
        };
        match serde_json::from_str::<ResolvBackup>(&text) {
            Ok(backup) => {
                info!(backup = %self.backup.display(), "a client before this one did not stop cleanly: restoring {RESOLV_CONF}");
                if let Err(e) = put_back(&backup) {
                    warn!(error = %format!("{e:#}"), "cannot restore {RESOLV_CONF}");
                    return;
                }
            }
            Err(e) => {
                warn!(backup = %self.backup.display(), error = %e, "unreadable resolv.conf backup: removed")
            }
        }
        let _ = std::fs::remove_file(&self.backup);
    }

    /// Makes `dns` the applied settings for TUN device `link` (an interface index), if the
    /// client applies DNS at all. Failures are logged and shown in `en status`: the tunnel
    /// works without them.
    pub async fn follow(&mut self, link: u32, dns: &DnsSettings) {
        if self.mode == DnsMode::Off {
            return;
        }
        let same = match &self.applied {
            Some(a) => a.settings == *dns,
            None => dns.is_empty() && self.note.is_none(),
        };
        if same {
            return;
        }
        self.remove().await;
        if dns.is_empty() {
            return;
        }
        match self.apply(link, dns).await {
            Ok(applied) => {
                let via = match applied.via {
                    Via::Resolved { .. } => "systemd-resolved",
                    Via::ResolvConf(_) => RESOLV_CONF,
                };
                info!(servers = ?dns.servers, search = ?dns.search, via, "DNS applied");
                self.applied = Some(applied);
            }
            Err(e) => {
                let e = format!("{e:#}");
                warn!(error = %e, "DNS pushed by the cluster not applied");
                self.note = Some(e);
            }
        }
    }

    async fn apply(&self, link: u32, dns: &DnsSettings) -> Result<Applied> {
        let kind = match std::fs::read_link(RESOLV_CONF) {
            Ok(target) if target.to_string_lossy().contains("run/systemd/resolve/") => {
                ResolvConfKind::ResolvedLink
            }
            _ => ResolvConfKind::Plain,
        };
        let bus = match kind {
            ResolvConfKind::ResolvedLink => resolved_bus().await,
            ResolvConfKind::Plain => None,
        };
        let via = match (choose_backend(bus.is_some(), kind), bus) {
            (Backend::Resolved, Some(bus)) => {
                let link = i32::try_from(link).context("interface index out of range")?;
                set_link(&bus, link, dns).await?;
                Via::Resolved { bus, link }
            }
            (Backend::None(why), _) => anyhow::bail!(why),
            _ => Via::ResolvConf(self.write_resolv_conf(dns)?),
        };
        Ok(Applied {
            settings: dns.clone(),
            via,
        })
    }

    /// Keeps the old content in the backup file first (synced): a crash after it leaves what
    /// the next start needs to restore.
    fn write_resolv_conf(&self, dns: &DnsSettings) -> Result<ResolvBackup> {
        let old = match std::fs::read_to_string(RESOLV_CONF) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).context(format!("cannot read {RESOLV_CONF}")),
        };
        let backup = ResolvBackup {
            written: resolv_conf(old.as_deref(), dns),
            old,
        };
        let mut file = std::fs::File::create(&self.backup)
            .with_context(|| format!("cannot write {}", self.backup.display()))?;
        file.write_all(serde_json::to_string(&backup)?.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", self.backup.display()))?;
        write_in_place(&backup.written)?;
        Ok(backup)
    }

    /// Takes the applied settings back: resolved forgets the link's, resolv.conf gets its old
    /// content (unless someone changed it since).
    pub async fn remove(&mut self) {
        self.note = None;
        let Some(applied) = self.applied.take() else {
            return;
        };
        match applied.via {
            Via::Resolved { bus, link } => {
                let reverted = call(&bus, "RevertLink", &(link,)).await;
                // The link goes with the TUN device anyway; resolved then forgets it.
                if let Err(e) = reverted {
                    warn!(error = %format!("{e:#}"), "cannot revert the TUN device's DNS in systemd-resolved");
                }
            }
            Via::ResolvConf(backup) => {
                if let Err(e) = put_back(&backup) {
                    warn!(error = %format!("{e:#}"), "cannot restore {RESOLV_CONF}");
                    return;
                }
                let _ = std::fs::remove_file(&self.backup);
            }
        }
        info!("DNS settings removed");
    }

    /// For `en status`.
    pub fn status(&self) -> serde_json::Value {
        let (servers, search, via) = match &self.applied {
            Some(a) => (
                a.settings.servers.clone(),
                a.settings.search.clone(),
                Some(match a.via {
                    Via::Resolved { .. } => "systemd-resolved",
                    Via::ResolvConf(_) => "resolv.conf",
                }),
            ),
            None => (Vec::new(), Vec::new(), None),
        };
        serde_json::json!({
            "mode": match self.mode { DnsMode::On => "on", DnsMode::Off => "off" },
            "servers": servers,
            "search": search,
            "via": via,
            "error": self.note,
        })
    }
}

/// Restores resolv.conf as [`restore`] decides.
fn put_back(backup: &ResolvBackup) -> Result<()> {
    let current = std::fs::read_to_string(RESOLV_CONF).ok();
    match restore(current.as_deref(), backup) {
        Restore::Write(old) => write_in_place(&old)?,
        Restore::Remove => std::fs::remove_file(RESOLV_CONF)
            .with_context(|| format!("cannot remove {RESOLV_CONF}"))?,
        Restore::Leave => {
            warn!("{RESOLV_CONF} was changed by something else while en ran: left as it is now")
        }
    }
    Ok(())
}

/// Writes into the existing file rather than replacing it: it may be a bind mount (as `ip netns
/// exec` makes of `/etc/netns/NS/resolv.conf`) or a symlink another manager owns.
fn write_in_place(text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(RESOLV_CONF)
        .with_context(|| format!("cannot open {RESOLV_CONF}"))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {RESOLV_CONF}"))
}

/// The system bus, if systemd-resolved is on it.
async fn resolved_bus() -> Option<zbus::Connection> {
    let probe = async {
        let bus = zbus::Connection::system().await.ok()?;
        let reply = bus
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "NameHasOwner",
                &(RESOLVED,),
            )
            .await
            .ok()?;
        let running: bool = reply.body().deserialize().ok()?;
        running.then_some(bus)
    };
    tokio::time::timeout(BUS_TIMEOUT, probe)
        .await
        .ok()
        .flatten()
}

/// Gives the link `dns`: its servers, and its search domains (not routing-only, so that short
/// names get them appended).
async fn set_link(bus: &zbus::Connection, link: i32, dns: &DnsSettings) -> Result<()> {
    let servers: Vec<(i32, Vec<u8>)> = dns
        .servers
        .iter()
        .map(|ip| match ip {
            std::net::IpAddr::V4(v4) => (libc::AF_INET, v4.octets().to_vec()),
            std::net::IpAddr::V6(v6) => (libc::AF_INET6, v6.octets().to_vec()),
        })
        .collect();
    let domains: Vec<(&str, bool)> = dns.search.iter().map(|d| (d.as_str(), false)).collect();
    call(bus, "SetLinkDNS", &(link, servers)).await?;
    call(bus, "SetLinkDomains", &(link, domains)).await
}

async fn call<B>(bus: &zbus::Connection, method: &str, body: &B) -> Result<()>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    let reply = bus.call_method(
        Some(RESOLVED),
        RESOLVED_PATH,
        Some(RESOLVED_MANAGER),
        method,
        body,
    );
    tokio::time::timeout(BUS_TIMEOUT, reply)
        .await
        .with_context(|| format!("systemd-resolved did not answer {method}"))?
        .with_context(|| format!("systemd-resolved refused {method}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backup_lives_beside_the_control_socket() {
        let r = Resolver::new(DnsMode::On, Path::new("/run/holdfast/en.sock"));
        assert_eq!(r.backup, Path::new("/run/holdfast/en.resolv.conf.json"));
        assert_eq!(r.status()["mode"], "on");
        assert_eq!(r.status()["via"], serde_json::Value::Null);
    }
}
