//! dn-fd's Prometheus metrics: the figures `dn-fd status` shows, read at scrape time.

use std::sync::{Arc, Mutex};

use holdfast_shell::metrics::{label, Families, Scraper};
use prometheus_client::registry::Registry;

use crate::supervise::State;

/// The detector's registry; its figures come from `State::status` at each scrape.
pub fn registry(state: Arc<Mutex<State>>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scraper::new(move |f| {
        let status = state.lock().unwrap_or_else(|e| e.into_inner()).status();
        write(f, &status);
    })));
    registry
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The status object (see `State::status`) as metric families.
pub fn write(f: &mut Families<'_>, s: &serde_json::Value) {
    let node = s["node"].as_str().unwrap_or("").to_owned();
    let dn = &s["dn"];
    f.gauge(
        "holdfast_dnfd_dn_up",
        "1 while the local DN runs and heartbeats.",
        &[(label("node", node), i64::from(dn["state"] == "running"))],
    );
    f.counter_one(
        "holdfast_dnfd_dn_starts",
        "Times the DN was started.",
        count(&s["starts"]),
    );
    f.counter_one(
        "holdfast_dnfd_dn_restarts",
        "Times the DN was started again after it died or was killed.",
        count(&s["restarts"]),
    );
    let kills: Vec<_> = ["heartbeat", "fault", "limit"]
        .iter()
        .map(|r| (label("reason", *r), count(&s["kills_by_reason"][r])))
        .collect();
    f.counter(
        "holdfast_dnfd_dn_kills",
        "Times the detector killed the DN, by reason.",
        &kills,
    );
    f.gauge_one(
        "holdfast_dnfd_dn_recent_failures",
        "Failures since the DN last ran healthily; the restart back-off grows with it.",
        count(&s["recent_failures"]) as i64,
    );
    if let Some(age) = dn["heartbeat_age_ms"].as_f64() {
        f.gauge_one(
            "holdfast_dnfd_dn_heartbeat_age_seconds",
            "Time since the DN's last heartbeat.",
            age / 1000.0,
        );
    }
    f.counter_one(
        "holdfast_dnfd_dn_forwarded_packets",
        "Packets the DN says it has forwarded (its last heartbeat).",
        count(&dn["forwarded"]),
    );
    f.counter_one(
        "holdfast_dnfd_routes_deleted",
        "Protocol-200 routes the detector deleted after the DN died.",
        count(&s["routes_deleted"]),
    );
    let peers = s["peers"].as_array().cloned().unwrap_or_default();
    let peer = |p: &serde_json::Value| label("peer", p["name"].as_str().unwrap_or(""));
    f.gauge(
        "holdfast_dnfd_peer_up",
        "1 while the peer's detector heartbeats and says its DN is up.",
        &peers
            .iter()
            .map(|p| (peer(p), i64::from(p["up"] == true)))
            .collect::<Vec<_>>(),
    );
    f.gauge(
        "holdfast_dnfd_peer_heartbeat_age_seconds",
        "Time since the peer's last heartbeat (absent: never heard).",
        &peers
            .iter()
            .filter_map(|p| Some((peer(p), p["heartbeat_age_ms"].as_f64()? / 1000.0)))
            .collect::<Vec<_>>(),
    );
    f.counter(
        "holdfast_dnfd_peer_changes",
        "State changes of the peer (up, dn-down, silent).",
        &peers
            .iter()
            .map(|p| (peer(p), count(&p["changes"])))
            .collect::<Vec<_>>(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_as_prometheus_text() {
        let status = serde_json::json!({
            "node": "dn1",
            "dn": {"state": "running", "pid": 7, "heartbeat_age_ms": 4, "forwarded": 10},
            "starts": 3, "restarts": 2, "kills": 2,
            "kills_by_reason": {"heartbeat": 1, "fault": 0, "limit": 1},
            "recent_failures": 2, "routes_deleted": 4,
            "peers": [
                {"name": "dn2", "state": "up", "up": true, "heartbeat_age_ms": 8, "changes": 1},
                {"name": "dn3", "state": "unknown", "up": false, "heartbeat_age_ms": null, "changes": 0},
            ],
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scraper::new(move |f| write(f, &status))));
        let text = holdfast_shell::metrics::render(&registry);
        for line in [
            "holdfast_dnfd_dn_up{node=\"dn1\"} 1",
            "holdfast_dnfd_dn_restarts_total 2",
            "holdfast_dnfd_dn_kills_total{reason=\"limit\"} 1",
            "holdfast_dnfd_dn_heartbeat_age_seconds 0.004",
            "holdfast_dnfd_peer_up{peer=\"dn2\"} 1",
            "holdfast_dnfd_peer_up{peer=\"dn3\"} 0",
            "holdfast_dnfd_peer_heartbeat_age_seconds{peer=\"dn2\"} 0.008",
            "# TYPE holdfast_dnfd_routes_deleted counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("peer_heartbeat_age_seconds{peer=\"dn3\"}"));
    }
}
