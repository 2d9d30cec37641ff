//! Stable-toolchain checks of the harness: the committed seeds are current and decode as meant,
//! and every committed input (`seed-*`, and `found-*`: the inputs of bugs found while writing
//! and running the targets) passes its target's check. `scripts/fuzz.sh` runs these before fuzzing, and on a machine without nightly.

use std::path::PathBuf;

use holdfast_proto::coalesce::Coalescer;
use holdfast_proto::control::Message;
use holdfast_proto::lease::LeaseTicket;
use holdfast_proto::peer::PeerNotice;

use crate::seeds::{self, NOW};
use crate::{cluster, TARGETS};

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

#[test]
fn committed_seeds_are_the_generated_ones() {
    let write = std::env::var_os("HOLDFAST_WRITE_SEEDS").is_some();
    for (target, name, bytes) in seeds::all() {
        assert!(TARGETS.iter().any(|(t, _)| *t == target), "{target}");
        let path = corpus(target).join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(corpus(target)).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (HOLDFAST_WRITE_SEEDS=1 writes it)", path.display())
        });
        assert!(
            committed == bytes,
            "{} is stale (HOLDFAST_WRITE_SEEDS=1 rewrites it)",
            path.display()
        );
    }
}

/// Seeds that decode only partway would start the fuzzer far from the interesting code.
#[test]
fn seeds_decode_and_verify() {
    let c = cluster();
    for (target, name, bytes) in seeds::all() {
        match target {
            "control" => {
                let mut at = 0;
                while at < bytes.len() {
                    let (_, used) = Message::decode(&bytes[at..]).unwrap().unwrap();
                    at += used;
                }
            }
            "lease_ticket" => {
                let t = LeaseTicket::decode(&bytes).unwrap();
                if name != "unknown-issuer" {
                    t.verify_for(&c.keys, "laptop-1", NOW).unwrap();
                }
            }
            "peer_notice" if bytes[0] == 0 => {
                PeerNotice::open(&bytes[1..], &c.keys).unwrap();
            }
            "coalesce" => {
                let pkts = crate::checks::batch(&bytes);
                let writes = Coalescer::default().plan(&pkts, true);
                assert!(writes < pkts.len(), "{name}: nothing merges");
            }
            _ => {}
        }
    }
}

#[test]
fn every_committed_input_passes_its_check() {
    let mut replayed = 0;
    for (target, check) in TARGETS {
        let dir = corpus(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            // Only what is committed: a local run leaves thousands of its own inputs here.
            let name = path.file_name().unwrap().to_string_lossy();
            if !name.starts_with("seed-") && !name.starts_with("found-") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&bytes));
            assert!(outcome.is_ok(), "{target}: {} fails", path.display());
            replayed += 1;
        }
    }
    assert!(replayed >= seeds::all().len());
}
