//! DNS settings a cluster pushes to its clients with the lease, and what a client writes into
//! `/etc/resolv.conf` to apply them (where systemd-resolved does not run).
//!
//! The settings come from the network and end up in a system file, so they are validated both
//! where they enter (`cluster.toml`) and where they are decoded (the lease): no value can carry
//! a newline or a second keyword into resolv.conf.

use std::net::IpAddr;

/// `dns`: whether the client applies the DNS servers and search domains the cluster pushes
/// with the lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    /// Apply them while the tunnel is up (systemd-resolved, or /etc/resolv.conf).
    #[default]
    On,
    /// Leave the system's DNS alone.
    Off,
}

/// At most this many servers: what the C library reads from resolv.conf (`MAXNS`).
pub const MAX_SERVERS: usize = 3;
/// At most this many search domains (the traditional `MAXDNSRCH`).
pub const MAX_SEARCH: usize = 6;
/// The longest domain name, in its dotted text form without the final dot.
pub const MAX_DOMAIN: usize = 253;

/// DNS servers and search domains for the clients of one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsSettings {
    pub servers: Vec<IpAddr>,
    pub search: Vec<String>,
}

impl DnsSettings {
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.search.is_empty()
    }

    /// Checks every bound and value; the message names what is wrong (the caller names the
    /// key or the message it came from).
    pub fn check(&self) -> Result<(), String> {
        if self.servers.len() > MAX_SERVERS {
            return Err(format!(
                "{} servers, at most {MAX_SERVERS} (the C library ignores more)",
                self.servers.len()
            ));
        }
        for (i, s) in self.servers.iter().enumerate() {
            check_server(*s)?;
            if self.servers[..i].contains(s) {
                return Err(format!("{s} is listed twice"));
            }
        }
        if self.search.len() > MAX_SEARCH {
            return Err(format!(
                "{} search domains, at most {MAX_SEARCH}",
                self.search.len()
            ));
        }
        for (i, d) in self.search.iter().enumerate() {
            check_domain(d)?;
            if self.search[..i].iter().any(|o| o.eq_ignore_ascii_case(d)) {
                return Err(format!("{d:?} is listed twice"));
            }
        }
        Ok(())
    }
}

/// A server a resolver can send queries to: no unspecified or multicast address.
pub fn check_server(ip: IpAddr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{ip} cannot be a DNS server"));
    }
    Ok(())
}

/// A domain name in dotted form: labels of 1-63 letters, digits or '-' (not at either end),
/// at most [`MAX_DOMAIN`] characters, no final dot.
pub fn check_domain(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > MAX_DOMAIN || !name.split('.').all(label_ok) {
        return Err(format!(
            "{:?} is not a domain name like corp.example (labels of letters, digits and '-', \
             at most {MAX_DOMAIN} characters, no final dot)",
            crate::wire::truncate_str(name, 80)
        ));
    }
    Ok(())
}

/// The first line of a resolv.conf that a client wrote, so that a person reading it knows.
pub const RESOLV_CONF_HEADER: &str =
    "# Written by holdfast en while its tunnel is up; the previous content returns when it stops.";

/// What resolv.conf should say while `dns` applies, given its content before (`None`: there was
/// no file). Pushed servers replace every `nameserver` line and pushed search domains replace
/// `search` and `domain` lines (a later `domain` line would override `search`); what the cluster
/// did not push, and every other line (`options`, `sortlist`, comments), is kept.
pub fn resolv_conf(old: Option<&str>, dns: &DnsSettings) -> String {
    let mut out = String::new();
    out.push_str(RESOLV_CONF_HEADER);
    out.push('\n');
    for s in &dns.servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !dns.search.is_empty() {
        out.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    for line in old.unwrap_or("").lines() {
        let keyword = line.split_whitespace().next().unwrap_or("");
        let replaced = (keyword == "nameserver" && !dns.servers.is_empty())
            || (matches!(keyword, "search" | "domain") && !dns.search.is_empty())
            || line == RESOLV_CONF_HEADER;
        if !replaced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What a client remembers about resolv.conf before it writes it: kept in a file beside its
/// control socket, so that a client that crashed restores it at its next start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvBackup {
    /// The content before (`None`: there was no file).
    pub old: Option<String>,
    /// What the client wrote.
    pub written: String,
}

/// What to do to resolv.conf when the client stops (or starts after a crash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// Write the old content back.
    Write(String),
    /// There was no file before: remove it.
    Remove,
    /// Someone else changed the file since the client wrote it (a DHCP client, a person):
    /// theirs is newer than the backup, so it stays.
    Leave,
}

/// Restores only what the client itself wrote; `current` is the file's content now.
pub fn restore(current: Option<&str>, backup: &ResolvBackup) -> Restore {
    if current != Some(backup.written.as_str()) {
        return Restore::Leave;
    }
    match &backup.old {
        Some(old) => Restore::Write(old.clone()),
        None => Restore::Remove,
    }
}

/// How `/etc/resolv.conf` stands on this machine, as far as choosing a way to apply DNS goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvConfKind {
    /// A file, a symlink to a file of another manager (resolvconf), or no file.
    Plain,
    /// A symlink into systemd-resolved's own directory (`/run/systemd/resolve/`).
    ResolvedLink,
}

/// How a client applies pushed DNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Per-link DNS on the TUN device through systemd-resolved's D-Bus API: nothing global
    /// changes, and resolved forgets the settings when the device goes.
    Resolved,
    /// Rewrite `/etc/resolv.conf` in place and restore it on exit.
    ResolvConf,
    /// Apply nothing, and say why.
    None(&'static str),
}

/// Chooses the backend. systemd-resolved only where resolv.conf points at it: only then do
/// this system's look-ups go through it (a plain file wins otherwise, and a process in another
/// network namespace, as under `ip netns exec`, reaches the host's resolved over D-Bus, which
/// knows nothing of its links). Where resolv.conf is resolved's but resolved is stopped, the
/// stub address in it answers nothing and whatever is written there is replaced when resolved
/// starts: not ours to edit.
pub fn choose_backend(resolved_running: bool, kind: ResolvConfKind) -> Backend {
    match (kind, resolved_running) {
        (ResolvConfKind::Plain, _) => Backend::ResolvConf,
        (ResolvConfKind::ResolvedLink, true) => Backend::Resolved,
        (ResolvConfKind::ResolvedLink, false) => Backend::None(
            "/etc/resolv.conf belongs to systemd-resolved (a symlink into /run/systemd/resolve), \
             which is not running: start systemd-resolved, or make /etc/resolv.conf a file",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(servers: &[&str], search: &[&str]) -> DnsSettings {
        DnsSettings {
            servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
            search: search.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn pushed_servers_and_search_replace_the_old_ones_and_keep_the_rest() {
        let old = "# from DHCP\nnameserver 192.168.1.1\nnameserver 192.168.1.2\ndomain home.lan\n\
                   search home.lan\noptions edns0 trust-ad\n";
        let new = resolv_conf(
            Some(old),
            &settings(&["10.0.2.53", "fd00::53"], &["corp.example", "lab.example"]),
        );
        assert_eq!(
            new,
            format!(
                "{RESOLV_CONF_HEADER}\nnameserver 10.0.2.53\nnameserver fd00::53\n\
                 search corp.example lab.example\n# from DHCP\noptions edns0 trust-ad\n"
            )
        );
        // Written twice (a crashed client's file as the old one) gives the same text.
        assert_eq!(
            resolv_conf(
                Some(&new),
                &settings(&["10.0.2.53", "fd00::53"], &["corp.example", "lab.example"])
            ),
            new
        );
    }

    #[test]
    fn what_was_not_pushed_is_kept() {
        let old = "nameserver 192.168.1.1\nsearch home.lan\n";
        assert_eq!(
            resolv_conf(Some(old), &settings(&["10.0.2.53"], &[])),
            format!("{RESOLV_CONF_HEADER}\nnameserver 10.0.2.53\nsearch home.lan\n")
        );
        assert_eq!(
            resolv_conf(Some(old), &settings(&[], &["corp.example"])),
            format!("{RESOLV_CONF_HEADER}\nsearch corp.example\nnameserver 192.168.1.1\n")
        );
        assert_eq!(
            resolv_conf(None, &settings(&["10.0.2.53"], &[])),
            format!("{RESOLV_CONF_HEADER}\nnameserver 10.0.2.53\n")
        );
    }

    #[test]
    fn only_what_the_client_wrote_is_restored() {
        let backup = ResolvBackup {
            old: Some("nameserver 192.168.1.1\n".into()),
            written: "nameserver 10.0.2.53\n".into(),
        };
        assert_eq!(
            restore(Some("nameserver 10.0.2.53\n"), &backup),
            Restore::Write("nameserver 192.168.1.1\n".into())
        );
        assert_eq!(
            restore(Some("nameserver 172.16.0.1\n"), &backup),
            Restore::Leave
        );
        assert_eq!(restore(None, &backup), Restore::Leave);
        let none_before = ResolvBackup {
            old: None,
            ..backup
        };
        assert_eq!(
            restore(Some("nameserver 10.0.2.53\n"), &none_before),
            Restore::Remove
        );
    }

    #[test]
    fn resolved_serves_where_resolv_conf_is_its_and_is_left_alone_while_stopped() {
        assert_eq!(
            choose_backend(true, ResolvConfKind::ResolvedLink),
            Backend::Resolved
        );
        assert_eq!(
            choose_backend(true, ResolvConfKind::Plain),
            Backend::ResolvConf
        );
        assert_eq!(
            choose_backend(false, ResolvConfKind::Plain),
            Backend::ResolvConf
        );
        assert!(matches!(
            choose_backend(false, ResolvConfKind::ResolvedLink),
            Backend::None(_)
        ));
    }

    #[test]
    fn settings_are_bounded_and_checked() {
        assert!(settings(&["10.0.2.53", "fd00::53"], &["corp.example"])
            .check()
            .is_ok());
        assert!(settings(&["1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4"], &[])
            .check()
            .unwrap_err()
            .contains("at most 3"));
        assert!(settings(&["0.0.0.0"], &[]).check().is_err());
        assert!(settings(&["224.0.0.1"], &[]).check().is_err());
        assert!(settings(&["10.0.2.53", "10.0.2.53"], &[])
            .check()
            .unwrap_err()
            .contains("twice"));
        assert!(settings(&[], &["a.example", "A.example"]).check().is_err());
        let seven: Vec<String> = (0..7).map(|i| format!("d{i}.example")).collect();
        let seven: Vec<&str> = seven.iter().map(String::as_str).collect();
        assert!(settings(&[], &seven).check().is_err());
        for bad in [
            "",
            "corp.example.",
            "corp..example",
            "-corp.example",
            "corp example",
            "corp.example\nnameserver 6.6.6.6",
            "corp_x.example",
            &"a".repeat(64),
            &format!("{}.example", ["a"; 125].join(".")),
        ] {
            assert!(check_domain(bad).is_err(), "{bad:?}");
        }
        for good in ["corp", "corp.example", "xn--bcher-kva.example", "1.example"] {
            assert!(check_domain(good).is_ok(), "{good:?}");
        }
    }

    proptest! {
        /// Whatever the old file said, the new one names exactly the pushed servers, and a
        /// pushed search list is the only one.
        #[test]
        fn the_pushed_settings_are_exactly_what_resolv_conf_says(
            old in proptest::collection::vec("(nameserver|search|domain|options|#)[ a-z0-9.]{0,20}", 0..8),
            servers in proptest::collection::vec(any::<[u8; 4]>(), 1..=MAX_SERVERS),
            search in proptest::collection::vec("[a-z]{1,8}\\.example", 1..=MAX_SEARCH),
        ) {
            let dns = DnsSettings {
                servers: servers.iter().map(|o| IpAddr::from(*o)).collect(),
                search: search.clone(),
            };
            let old = old.join("\n");
            let new = resolv_conf(Some(&old), &dns);
            let named: Vec<&str> = new
                .lines()
                .filter(|l| l.split_whitespace().next() == Some("nameserver"))
                .filter_map(|l| l.strip_prefix("nameserver "))
                .collect();
            let pushed: Vec<String> = dns.servers.iter().map(|s| s.to_string()).collect();
            prop_assert_eq!(named, pushed.iter().map(String::as_str).collect::<Vec<_>>());
            let searches: Vec<&str> = new
                .lines()
                .filter(|l| matches!(l.split_whitespace().next(), Some("search" | "domain")))
                .collect();
            let expected = format!("search {}", search.join(" "));
            prop_assert_eq!(searches, vec![expected.as_str()]);
        }
    }
}
