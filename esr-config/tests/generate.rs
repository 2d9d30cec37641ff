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
    frr_dryrun(
        "plain",
        holdfast_esr_config::frr(&example_cluster()).unwrap(),
    );
}

/// The example with an IPv6 pool beside every DN's IPv4 pool.
fn dual_stack_cluster() -> Cluster {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text = std::fs::read_to_string(root.join("examples/cluster-ospf.toml")).unwrap();
    for i in 0..3 {
        text = text.replace(
            &format!("pool = \"10.20{i}.0.0/24\"\n"),
            &format!("pool = \"10.20{i}.0.0/24\"\npool6 = \"fd00:20{i}::/64\"\n"),
        );
    }
    Cluster::parse(&text, &root).unwrap()
}

/// A dual-stack cluster gets OSPFv3 beside OSPFv2 on every DN and ESR, with the same cost
/// scheme over the IPv6 pools, and FRR and BIRD accept it.
#[test]
fn dual_stack_adds_ospfv3_that_frr_and_bird_accept() {
    let cluster = dual_stack_cluster();
    let frr = holdfast_esr_config::frr(&cluster).unwrap();
    let ospf6: Vec<&str> = frr
        .iter()
        .filter(|f| f.path.ends_with("/ospf6d.conf"))
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(
        ospf6,
        [
            "dn1/ospf6d.conf",
            "dn2/ospf6d.conf",
            "dn3/ospf6d.conf",
            "esr1/ospf6d.conf",
            "esr2/ospf6d.conf"
        ]
    );
    let dn1 = &frr
        .iter()
        .find(|f| f.path == "dn1/ospf6d.conf")
        .unwrap()
        .text;
    for line in [
        "ipv6 prefix-list HOLDFAST6-OWN seq 5 permit fd00:200::/64 le 128",
        "ipv6 prefix-list HOLDFAST6-BACKED seq 5 permit fd00:201::/65",
        "ipv6 prefix-list HOLDFAST6-SERVED seq 10 permit fd00:202::/64 le 128",
        " match ipv6 address prefix-list HOLDFAST6-BACKED\n set metric 30",
        " ipv6 ospf6 area 0.0.0.0",
        " ipv6 ospf6 bfd profile holdfast",
        " ospf6 router-id 10.9.0.1",
        " redistribute kernel metric-type 1 route-map HOLDFAST6",
    ] {
        assert!(
            dn1.contains(line),
            "{line:?} missing from dn1/ospf6d.conf:\n{dn1}"
        );
    }
    // The IPv4 plane is what it was: no IPv6 pool in ospfd.
    let plain = holdfast_esr_config::frr(&example_cluster()).unwrap();
    let v4 = |files: &[holdfast_esr_config::File]| {
        files
            .iter()
            .find(|f| f.path == "dn1/ospfd.conf")
            .unwrap()
            .text
            .clone()
    };
    assert_eq!(v4(&frr), v4(&plain));
    frr_dryrun("dual", frr);
    let bird = holdfast_esr_config::bird(&cluster).unwrap();
    let dn1 = &bird
        .iter()
        .find(|f| f.path == "dn1/bird.conf")
        .unwrap()
        .text;
    for part in [
        "protocol kernel holdfast_kernel6",
        "filter holdfast_out6",
        "protocol ospf v3 holdfast6",
        "ipv6 { import all; export filter holdfast_out6; };",
    ] {
        assert!(
            dn1.contains(part),
            "{part:?} missing from dn1/bird.conf:\n{dn1}"
        );
    }
    bird_parse("dual", bird);
}

/// Runs each FRR daemon's own parser (`--dryrun`) over its generated file.
fn frr_dryrun(case: &str, files: Vec<holdfast_esr_config::File>) {
    let dir = std::env::temp_dir().join(format!("esr-config-dryrun-{case}-{}", std::process::id()));
    // bfdd binds its control socket even in a dry run, as the frr user it drops to; never the
    // default one, which a running bfdd owns.
    let bfdctl = dir.join("bfdctl");
    std::fs::create_dir_all(&bfdctl).unwrap();
    std::fs::set_permissions(&bfdctl, std::fs::Permissions::from_mode(0o1777)).unwrap();
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
    let files = holdfast_esr_config::bird(&example_cluster()).unwrap();
    assert_eq!(files.len(), 5);
    bird_parse("plain", files);
}

fn bird_parse(case: &str, files: Vec<holdfast_esr_config::File>) {
    let dir = std::env::temp_dir().join(format!("esr-config-bird-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
