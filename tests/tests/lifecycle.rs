//! The lab's own promises, without the product: it removes what it created (namespaces, every
//! process inside them, recorded files, its marker and work directory), also when a test panics,
//! and it never adopts or deletes a namespace it did not create. Needs root; no `en` or `dn`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use holdfast_lab::netns::{have_root, wait_until, Netns, MARKER_ROOT};

/// Labs in one test binary are built one at a time.
static ONE_LAB: Mutex<()> = Mutex::new(());

fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state is 'Z'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn dropping_a_lab_removes_everything_it_made() {
    if !have_root() {
        return;
    }
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let mut net = Netns::new().expect("lab");
    let (a, b) = (net.add("a").expect("ns a"), net.add("b").expect("ns b"));
    net.link(("a", "to-b", "10.9.0.1/24"), ("b", "to-a", "10.9.0.2/24"))
        .expect("link");
    let out = net
        .exec("a", &["ping", "-n", "-c", "1", "-W", "1", "10.9.0.2"])
        .expect("ping across the link");
    assert!(out.status.success());
    net.spawn("a", "sleeper", &["sleep", "1000"], &[])
        .expect("spawn");
    let sleeper = net.pid("sleeper").expect("pid");
    // A process in the namespace that the lab did not start itself must go too.
    let mut stray = Command::new("ip")
        .args(["netns", "exec", &b, "sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("stray process");
    let stray_pid = stray.id();
    let file = std::env::temp_dir().join(format!("{}-stray.sock", net.id()));
    std::fs::write(&file, "").expect("stray file");
    net.own_file(&file).expect("own_file");
    let marker = Path::new(MARKER_ROOT).join(net.id());
    let dir = net.dir.clone();
    assert!(marker.join("namespaces").is_file() && dir.is_dir());

    drop(net);

    let left = namespaces();
    assert!(
        !left.contains(&a) && !left.contains(&b),
        "namespaces left: {left:?}"
    );
    assert!(!alive(sleeper), "the lab's own process survived");
    let _ = stray.wait();
    assert!(!alive(stray_pid), "a process inside the namespace survived");
    assert!(!file.exists(), "a recorded file survived");
    assert!(!marker.exists(), "the marker survived");
    if std::env::var_os("HOLDFAST_LAB_KEEP").is_none() {
        assert!(!dir.exists(), "the work directory survived");
    }
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_namespace_that_exists_already_is_refused_and_left_alone() {
    if !have_root() {
        return;
    }
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let mut net = Netns::new().expect("lab");
    // Someone else's namespace that happens to have the name the lab is about to use.
    let foreign = net.ns("taken");
    let status = Command::new("ip")
        .args(["netns", "add", &foreign])
        .status()
        .expect("ip netns add");
    assert!(status.success());
    // Whatever happens below, remove the namespace this test made by hand.
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _remove = Remove(foreign.clone());

    let err = net.add("taken").expect_err("the lab adopted a namespace");
    assert!(
        format!("{err:#}").contains("refusing to touch it"),
        "unclear error: {err:#}"
    );
    let marker = PathBuf::from(MARKER_ROOT).join(net.id());
    let recorded = std::fs::read_to_string(marker.join("namespaces")).unwrap_or_default();
    assert!(
        !recorded.contains(&foreign),
        "the refused name was recorded"
    );
    drop(net);
    assert!(
        namespaces().contains(&foreign),
        "cleanup deleted a namespace the lab did not create"
    );
}

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn a_panicking_test_still_cleans_up() {
    if !have_root() {
        return;
    }
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let mut net = Netns::new().expect("lab");
        let name = net.add("p").expect("ns");
        tx.send(name).expect("send");
        panic!("a test failing half-way");
    })
    .join();
    assert!(result.is_err());
    let name = rx.recv().expect("the lab's namespace name");
    wait_until(Duration::from_secs(2), "the namespace to go", || {
        !namespaces().contains(&name)
    })
    .expect("unwinding removed the namespace");
}
