//! `lab attack`: every hostile-input case against the real binaries (see `lab attack --help`).
//! Each case builds its own lab and tears it down. Needs root.

use holdfast_lab::attack;
use holdfast_lab::netns::have_root;

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn every_attack_case_holds() {
    if !have_root() {
        return;
    }
    let report = match attack::run(&[], false) {
        Ok(r) => r,
        Err(e) => panic!("lab attack did not run: {e:#}"),
    };
    assert!(report.all_held(), "{}", report.table());
    assert_eq!(report.cases.len(), attack::CASES.len());
}
