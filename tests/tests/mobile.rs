//! `lab mobile`'s cases, each against the real binaries in a lab of its own: roaming between
//! two uplinks, a NAT, a NAT rebinding, a 30 s sleep, pushed DNS.

use holdfast_lab::mobile;
use holdfast_lab::netns::have_root;

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn every_mobile_case_holds() {
    if !have_root() {
        eprintln!("skipped: needs root (the lab builds network namespaces)");
        return;
    }
    let report = mobile::run(&[], false).expect("lab mobile could not run");
    eprint!("{}", report.table());
    assert!(
        report.all_held(),
        "not every case held:\n{}",
        report.table()
    );
}
