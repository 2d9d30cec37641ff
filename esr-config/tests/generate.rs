//! The generated configuration: compared with reviewed golden files, and parsed by FRR, BIRD
//! and keepalived themselves.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use holdfast_proto::cluster::Cluster;

fn example_cluster() -> Cluster {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Cluster::load(&root.join("examples/cluster-ospf.toml")).expect("example parses")
}

fn example() -> Vec<holdfast_esr_config::File> {
    let cluster = example_cluster();
    let mut files = holdfast_esr_config::frr(&cluster).expect("plan has [ospf]");
    files.extend(holdfast_esr_config::bird(&cluster).expect("plan has [ospf]"));
    files.extend(holdfast_esr_config::keepalived(&cluster));
    files
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// `UPDATE_GOLDEN=1 cargo test -p holdfast-esr-config` rewrites the golden files; review the diff.
#[test]
fn output_matches_the_golden_files() {
    let files = example();
    assert_eq!(
        files.len(),
        22,
        "zebra, ospfd, bfdd and bird for three DNs and two ESRs, keepalived for the two ESRs"
    );
    for file in files {
        let path = golden_dir().join(&file.path);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &file.text).unwrap();
            continue;
        }
        let golden = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
        assert_eq!(
            file.text, golden,
            "{} differs from its golden file",
            file.path
        );
    }
}

#[test]
fn without_ospf_there_is_nothing_to_generate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cluster = Cluster::load(&root.join("examples/cluster.toml")).unwrap();
    assert!(holdfast_esr_config::frr(&cluster).is_err());
    assert!(holdfast_esr_config::keepalived(&cluster).is_empty());
}

#[test]
fn bfd_off_leaves_bfd_out() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("examples/cluster-ospf.toml")).unwrap();
    let cluster = Cluster::parse(&text.replace("bfd = true", "bfd = false"), &root).unwrap();
    let mut files = holdfast_esr_config::frr(&cluster).unwrap();
    files.extend(holdfast_esr_config::bird(&cluster).unwrap());
    assert_eq!(files.len(), 15);
    assert!(files.iter().all(|f| !f.text.contains("bfd")), "{files:#?}");
}

/// FRR's own parser (`--dryrun`) accepts every generated file (zebra, ospfd, bfdd). FRR comes
/// from scripts/install-deps.sh.
#[test]
fn frr_accepts_every_file() {
    let dir = std::env::temp_dir().join(format!("esr-config-dryrun-{}", std::process::id()));
    // bfdd binds its control socket even in a dry run, as the frr user it drops to; never the
    // default one, which a running bfdd owns.
    let bfdctl = dir.join("bfdctl");
    std::fs::create_dir_all(&bfdctl).unwrap();
    std::fs::set_permissions(&bfdctl, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let files = holdfast_esr_config::frr(&example_cluster()).unwrap();
    assert!(files.iter().any(|f| f.path.ends_with("bfdd.conf")));
    for file in files {
        let daemon = file
            .path
            .rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches(".conf");
        let conf = dir.join(file.path.replace('/', "-"));
        std::fs::write(&conf, &file.text).unwrap();
        let mut command = Command::new(format!("/usr/lib/frr/{daemon}"));
        if daemon == "bfdd" {
            command.arg("--bfdctl").arg(bfdctl.join("bfdd.sock"));
        }
        let out = command
            .arg("--dryrun")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join(format!("{daemon}.pid")))
            .arg("-z")
            .arg(dir.join("zserv.api"))
            .arg("--vty_socket")
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run FRR's {daemon} (scripts/install-deps.sh installs it): {e}")
            });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{daemon} --dryrun failed on {}: {text}",
            file.path
        );
        assert!(
            !text.contains("config line"),
            "{daemon} rejects {}:\n{text}",
            file.path
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// BIRD's own parser (`bird -p`) accepts every generated bird.conf.
#[test]
fn bird_accepts_every_file() {
    let dir = std::env::temp_dir().join(format!("esr-config-bird-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = holdfast_esr_config::bird(&example_cluster()).unwrap();
    assert_eq!(files.len(), 5);
    for file in files {
        let conf = dir.join(file.path.replace('/', "-"));
        std::fs::write(&conf, &file.text).unwrap();
        let out = Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run bird (scripts/install-deps.sh installs it): {e}")
            });
        assert!(
            out.status.success(),
            "bird rejects {}: {}",
            file.path,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A network namespace this test made, deleted when it goes out of scope, even on a panic.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let status = Command::new("ip").args(["netns", "add", &name]).status();
        // The guard exists before any assertion, so a half-made namespace is deleted too.
        let netns = Netns(name);
        assert!(
            status.is_ok_and(|s| s.success()),
            "ip netns add {} failed (the test needs root)",
            netns.0
        );
        netns
    }

    fn ip(&self, args: &[&str]) {
        let status = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "ip -n {} {args:?} failed",
            self.0
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// keepalived's own check (`keepalived -t`) accepts both ESRs' keepalived.conf, run inside a
/// network namespace that has the interfaces the file names (keepalived rejects a file whose
/// interfaces do not exist). keepalived comes from scripts/install-deps.sh; without it the test
/// is skipped, except under CI=true.
#[test]
fn keepalived_accepts_every_file() {
    let installed = Command::new("keepalived").arg("--version").output().is_ok();
    if !installed {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("keepalived is not installed (scripts/install-deps.sh installs it)");
        }
        // Straight to stderr: the test harness swallows println! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED keepalived_accepts_every_file: keepalived is not installed; run \
             scripts/install-deps.sh (under CI=true this test fails instead)"
        );
        return;
    }
    let cluster = example_cluster();
    let vrrp = cluster
        .vrrp
        .as_ref()
        .expect("the example describes an ESR pair");
    let files = holdfast_esr_config::keepalived(&cluster);
    assert_eq!(files.len(), 2);
    let dir = std::env::temp_dir().join(format!("esr-config-keepalived-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (file, router)) in files.iter().zip(&vrrp.routers).enumerate() {
        assert_eq!(file.path, format!("{}/keepalived.conf", router.name));
        let netns = Netns::new(format!("hf-ka-{}-{i}", std::process::id()));
        let mut names = vec![router.interface.as_str(), router.cluster_interface.as_str()];
        names.dedup();
        for (k, name) in names.iter().enumerate() {
            // A veth pair: this kernel may lack the dummy driver. Both ends stay inside.
            let peer = format!("hfka-peer{k}");
            netns.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
            netns.ip(&["link", "set", name, "up"]);
        }
        netns.ip(&[
            "addr",
            "add",
            &router.address.to_string(),
            "dev",
            &router.interface,
        ]);
        let conf = dir.join(file.path.replace('/', "-"));
        std::fs::write(&conf, &file.text).unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", &netns.0, "keepalived", "-t", "-f"])
            .arg(&conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keepalived -t rejects {} (exit {:?}):\n{}{}",
            file.path,
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
