//! Dual stack against the real binaries: both addresses, both families through the tunnel and
//! across a killed primary, and no IPv6 outside a full IPv4 tunnel without an IPv6 pool.

use holdfast_lab::lab::{with_lab, Routing};
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
    let _one = holdfast_lab::lab::one_lab();
    let (held, detail) = mobile_v6::dual_stack_case().expect("the dual-stack case could not run");
    eprintln!("dual_stack: {detail}");
    assert!(held, "the dual-stack case did not hold: {detail}");
}

/// The same with BIRD 2 (OSPFv3 with an `ipv6` channel): both families reach the server and come
/// back after the primary is killed. BIRD acts on a withdrawn route at its next `tick` (1 s), so
/// the losses are reported, and held to three seconds' worth.
#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn dual_stack_with_bird() {
    if !have_root() {
        eprintln!("skipped: needs root (the lab builds network namespaces)");
        return;
    }
    with_lab(mobile_v6::spec_with(Routing::Bird), |lab| {
        let outcome = mobile_v6::run(lab)?;
        eprintln!("dual_stack with bird: {}", outcome.detail());
        anyhow::ensure!(
            outcome.held_within(300),
            "did not hold: {}",
            outcome.detail()
        );
        Ok(())
    });
}
