//! Smoke runs of `lab experiment`, `lab bench`, `lab compare`, `lab scale` (2 runs, small
//! sizes, 2,000 sessions) and `lab ops`, so that the commands behind docs/results.md cannot rot unnoticed.
//! The full runs are not part of the suite.

use std::path::{Path, PathBuf};
use std::process::Command;

use holdfast_lab::bench::allowed_cores;
use holdfast_lab::lab::bin_dir;
use holdfast_lab::netns::have_root;
use serde_json::Value;

fn lab(args: &[&str]) -> Value {
    let bin = bin_dir().expect("built binaries").join("lab");
    let out = Command::new(&bin).args(args).output().expect("lab runs");
    assert!(
        out.status.success(),
        "lab {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lab {args:?} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A directory for a test's output, removed however the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("hf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Scratch(dir)
}

fn assert_files(dir: &Path, names: &[&str]) {
    for name in names {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} not written: {e}", path.display()));
        assert!(text.len() > 50, "{} is nearly empty", path.display());
    }
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn the_icmp_experiment_counts_losses_per_run_and_writes_csv_and_chart() {
    if !have_root() {
        return;
    }
    let scratch = scratch("icmp");
    let (dir, d) = (&scratch.0, scratch.0.display().to_string());
    let j = lab(&[
        "experiment",
        "icmp",
        "--rate",
        "100",
        "--runs",
        "2",
        "--json",
        "--out",
        &d,
    ]);
    let lost = j["lost"].as_array().expect("lost list");
    assert_eq!(lost.len(), 2, "{j}");
    assert!(lost.iter().all(Value::is_u64), "{j}");
    assert_eq!(j["summary"]["n"], 2, "{j}");
    assert!(j["setups"][0]["sent"][0].as_u64() >= Some(400), "{j}");
    assert_files(dir, &["icmp-100.csv", "icmp-100.svg"]);
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn the_http_experiment_times_downloads_with_and_without_a_failure() {
    if !have_root() {
        return;
    }
    let scratch = scratch("http");
    let (dir, d) = (&scratch.0, scratch.0.display().to_string());
    let j = lab(&[
        "experiment",
        "http",
        "--size",
        "20M",
        "--runs",
        "2",
        "--fail-at",
        "40%",
        "--json",
        "--out",
        &d,
    ]);
    for key in ["typical_s", "failure_s"] {
        let times = j[key].as_array().expect("times");
        assert_eq!(times.len(), 2, "{key}: {j}");
        assert!(
            times.iter().all(|t| t.as_f64().is_some_and(|s| s > 0.0)),
            "{j}"
        );
    }
    assert!(j["difference"]["median"].is_f64(), "{j}");
    assert_files(dir, &["http-20M.csv", "http-20M.svg"]);
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn the_bench_writes_its_csv_and_charts() {
    if !have_root() {
        return;
    }
    let scratch = scratch("bench");
    let (dir, d) = (&scratch.0, scratch.0.display().to_string());
    let j = lab(&["bench", "--seconds", "1", "--json", "--out", &d]);
    for setup in ["holdfast", "wireguard_go", "veth"] {
        for figure in [
            "mbps",
            "reverse_mbps",
            "streams4_mbps",
            "udp_mbps",
            "rtt_p50_us",
            "loaded_rtt_p50_us",
        ] {
            let key = format!("{setup}_{figure}");
            assert!(j[&key].as_f64() > Some(0.0), "{key}: {j}");
        }
    }
    assert!(j["holdfast_cpu_s_per_gb"].as_f64() > Some(0.0), "{j}");
    assert!(j["holdfast_percent_of_veth"].as_f64() > Some(0.0), "{j}");
    // Every core this process may use (the lab inherits its affinity).
    let cores = allowed_cores().expect("the CPU affinity").len();
    assert_eq!(
        j["cores"].as_u64(),
        Some(cores as u64),
        "every core by default: {j}"
    );
    // boringtun is measured where scripts/install-deps.sh could build it, or says why not.
    assert!(
        j["boringtun_mbps"].as_f64() > Some(0.0) || j["skipped"]["boringtun"].is_string(),
        "{j}"
    );
    assert_files(
        dir,
        &[
            "bench.csv",
            "bench-throughput.svg",
            "bench-reverse.svg",
            "bench-streams4.svg",
            "bench-rtt.svg",
            "bench-rtt-loaded.svg",
        ],
    );
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn the_bench_reports_each_figures_median_over_its_runs_on_the_cores_asked_for() {
    if !have_root() {
        return;
    }
    let j = lab(&[
        "bench",
        "--setups",
        "holdfast",
        "--seconds",
        "1",
        "--runs",
        "2",
        "--cores",
        "1",
        "--json",
    ]);
    assert_eq!(j["runs"], 2, "{j}");
    assert_eq!(j["cores"], 1, "{j}");
    let runs = j["per_run"].as_array().expect("per_run");
    assert_eq!(runs.len(), 2, "{j}");
    let each: Vec<f64> = runs
        .iter()
        .filter_map(|r| r["holdfast_mbps"].as_f64())
        .collect();
    assert_eq!(each.len(), 2, "{j}");
    // The median of two is their mean.
    let median = j["holdfast_mbps"].as_f64().expect("holdfast_mbps");
    assert!((median - (each[0] + each[1]) / 2.0).abs() < 1e-6, "{j}");
    assert!(
        j.get("veth_mbps").is_none(),
        "only the setups asked for: {j}"
    );
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn lab_compare_measures_two_builds_in_turn() {
    if !have_root() {
        return;
    }
    // The build against itself: one round each way through two labs at once.
    let dir = bin_dir().expect("built binaries");
    let dir = dir.to_str().expect("a UTF-8 path");
    let j = lab(&[
        "compare",
        "--baseline",
        dir,
        "--rounds",
        "1",
        "--seconds",
        "2",
        "--cores",
        "1",
        "--json",
    ]);
    assert_eq!(j["cores"], 1, "{j}");
    for figure in [
        "up_mbps",
        "up_cpu_s_per_gb",
        "down_mbps",
        "down_cpu_s_per_gb",
    ] {
        let f = &j["figures"][figure];
        for build in ["baseline", "candidate"] {
            let values = f[build].as_array().expect("per-round figures");
            assert_eq!(values.len(), 1, "{figure}: {j}");
            assert!(values[0].as_f64().unwrap_or(0.0) > 0.0, "{figure}: {j}");
        }
        assert_eq!(f["rounds"], 1, "{figure}: {j}");
        assert!(f["change"].as_f64().is_some(), "{figure}: {j}");
    }
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn lab_scale_opens_thousands_of_sessions_and_every_one_switches_when_their_dn_is_killed() {
    if !have_root() {
        return;
    }
    let j = lab(&["scale", "--sessions", "2000", "--fail", "kill", "--json"]);
    assert_eq!(j["sessions"], 2000, "{j}");
    assert_eq!(j["switched"], 2000, "every session told and switched: {j}");
    assert_eq!(j["promoted"], 2000, "the backup confirmed every one: {j}");
    for key in ["dn_cpu_percent_idle", "dn_rss_kib_per_session"] {
        assert!(j[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {j}");
    }
    for key in ["p50", "p99", "max"] {
        assert!(j["switched_within_ms"][key].is_f64(), "{key}: {j}");
    }
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn lab_ops_scrapes_metrics_drains_ten_times_and_fails_the_esr_pair_over() {
    if !have_root() {
        return;
    }
    let j = lab(&["ops", "--json"]);
    assert_eq!(j["metrics_ok"], true, "{j}");
    assert_eq!(j["drain_lost"].as_array().map(Vec::len), Some(10), "{j}");
    assert_eq!(j["download_ok"], true, "{j}");
    // The backup ESR holds both gateways after the master is cut off (the loss is a figure,
    // reported, not asserted).
    assert!(
        j["esr_took_over"]
            .as_str()
            .is_some_and(|e| e != "none" && j["esr_killed"] != e),
        "{j}"
    );
    assert!(j["esr_failover_lost"].is_u64(), "{j}");
}
