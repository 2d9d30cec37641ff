//! Dual stack against the real binaries: both addresses, both families through the tunnel and
//! across a killed primary, and no IPv6 outside a full IPv4 tunnel without an IPv6 pool.

use holdfast_lab::mobile_v6;
use holdfast_lab::netns::have_root;

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn dual_stack_case_holds() {
    if !have_root() {
        eprintln!("skipped: needs root (the lab builds network namespaces)");
        return;
    }
    let (held, detail) = mobile_v6::dual_stack_case().expect("the dual-stack case could not run");
    eprintln!("dual_stack: {detail}");
    assert!(held, "the dual-stack case did not hold: {detail}");
}
