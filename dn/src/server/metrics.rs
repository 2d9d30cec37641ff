//! The DN's Prometheus metrics, read at scrape time from the counters and sessions it keeps.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use holdfast_shell::metrics::{label, Families, Scraper};
use holdfast_shell::unix_now;
use prometheus_client::registry::Registry;

use super::Dn;

pub(super) fn registry(dn: Arc<Dn>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scraper::new(move |f| write(&dn, f))));
    registry
}

fn write(dn: &Dn, f: &mut Families<'_>) {
    let c = &dn.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    let (primary, secondary) = {
        let hosts = dn.hosts.read().unwrap_or_else(|e| e.into_inner());
        let primary = hosts.values().filter(|s| s.primary.load(Relaxed)).count();
        (primary, hosts.len() - primary)
    };
    let connections = dn.sessions.read().unwrap_or_else(|e| e.into_inner()).len();
    f.gauge(
        "holdfast_dn_sessions",
        "Attached client sessions, by role: primary (the client's traffic comes here) or secondary.",
        &[
            (label("role", "primary"), primary as i64),
            (label("role", "secondary"), secondary as i64),
        ],
    );
    f.gauge_one(
        "holdfast_dn_connections",
        "Client connections, attached or not yet.",
        connections as i64,
    );
    let (leases, held, down) = {
        let m = dn.lock_machine();
        (
            m.active_leases(unix_now()),
            m.held().len(),
            m.peers_down().clone(),
        )
    };
    f.gauge_one(
        "holdfast_dn_leases",
        "Unexpired leases of this DN's own pool.",
        leases as i64,
    );
    f.gauge_one(
        "holdfast_dn_held_blocks",
        "Own blocks another DN serves until their clients come home.",
        held as i64,
    );
    let peers: Vec<_> = dn
        .peer_names
        .iter()
        .map(|p| (label("peer", p.clone()), i64::from(!down.contains(p))))
        .collect();
    f.gauge(
        "holdfast_dn_peer_up",
        "0 while the failure detector says the peer DN is down.",
        &peers,
    );
    let t = &dn.traffic;
    f.counter(
        "holdfast_dn_packets",
        "Packets through the DN: in (from clients) and out (to clients).",
        &[
            (label("direction", "in"), get(&t.rx_packets)),
            (label("direction", "out"), get(&t.tx_packets)),
        ],
    );
    f.counter(
        "holdfast_dn_bytes",
        "Bytes of IP packets through the DN, by direction.",
        &[
            (label("direction", "in"), get(&t.rx_bytes)),
            (label("direction", "out"), get(&t.tx_bytes)),
        ],
    );
    f.counter(
        "holdfast_dn_dropped_packets",
        "Packets dropped, by reason.",
        &[
            (label("reason", "spoofed"), get(&c.dropped_spoofed)),
            (label("reason", "oversized"), get(&c.dropped_too_big)),
            (label("reason", "no_session"), get(&c.dropped_no_session)),
            (label("reason", "malformed"), get(&c.dropped_malformed)),
            (label("reason", "to_cluster"), get(&c.dropped_to_cluster)),
        ],
    );
    f.counter_one(
        "holdfast_dn_icmp_too_big_sent",
        "ICMP 'packet too big' answers to oversized packets.",
        get(&c.icmp_too_big_sent),
    );
    f.counter_one(
        "holdfast_dn_sessions_accepted",
        "Sessions that attached.",
        get(&c.sessions_accepted),
    );
    f.counter_one(
        "holdfast_dn_sessions_refused",
        "Sessions refused at attach (bad ticket, address taken, pool exhausted, no attach).",
        get(&c.sessions_refused),
    );
    let failed = get(&c.handshakes_failed);
    let timed_out = get(&c.handshakes_timed_out);
    f.counter(
        "holdfast_dn_handshake_failures",
        "Handshakes that failed, by reason: timeout, or tls (a refused certificate, a TLS or transport error).",
        &[
            (label("reason", "timeout"), timed_out),
            (label("reason", "tls"), failed.saturating_sub(timed_out)),
        ],
    );
    let admission = dn.lock_admission();
    f.counter(
        "holdfast_dn_connection_attempts",
        "Connection attempts by what the admission policy did: accepted (handshake started), retried (QUIC Retry), refused, ignored.",
        &[
            (label("outcome", "retried"), admission.retried),
            (label("outcome", "refused"), admission.refused),
            (label("outcome", "ignored"), admission.ignored),
        ],
    );
    f.counter_one(
        "holdfast_dn_identity_limit_closes",
        "Connections closed because their identity held too many unattached ones.",
        admission.over_identity_limit,
    );
    f.gauge_one(
        "holdfast_dn_handshakes_in_flight",
        "Handshakes started and not yet ended.",
        admission.in_flight() as i64,
    );
    drop(admission);
    f.counter_one(
        "holdfast_dn_promotions",
        "Clients whose traffic arrived on a secondary session here: this DN became their primary.",
        get(&c.promotions),
    );
    f.counter_one(
        "holdfast_dn_demotions",
        "Clients that moved their traffic away from this DN.",
        get(&c.demotions),
    );
    f.counter_one(
        "holdfast_dn_route_changes",
        "Route sets applied to the kernel.",
        get(&c.route_changes),
    );
    let udp = &holdfast_shell::gso::SENT;
    f.counter_one(
        "holdfast_dn_udp_datagrams_sent",
        "UDP datagrams the DN sent to its clients, all workers together.",
        udp.datagrams(),
    );
    f.counter_one(
        "holdfast_dn_udp_send_calls",
        "System calls that sent them: datagrams_sent / send_calls is the segmentation-offload batch.",
        udp.calls(),
    );
    f.counter(
        "holdfast_dn_peer_notices",
        "Signed notices from peer DNs, taken or refused (bad signature, replayed, stale).",
        &[
            (label("outcome", "taken"), get(&c.peer_notices_taken)),
            (label("outcome", "refused"), get(&c.peer_notices_refused)),
        ],
    );
}
