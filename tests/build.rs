//! Marks lab tests ignored, so that cargo reports them as such, when the build does not run as
//! root: the lab builds network namespaces and TUN devices. (The tests also check at run time.)
fn main() {
    println!("cargo::rustc-check-cfg=cfg(lab_root)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_USER");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        println!("cargo::rustc-cfg=lab_root");
    }
}
