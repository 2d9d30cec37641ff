//! The generated configuration: compared with reviewed golden files, and parsed by FRR itself.

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
        16,
        "zebra, ospfd, bfdd and bird for three DNs and one ESR"
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
}

#[test]
fn bfd_off_leaves_bfd_out() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("examples/cluster-ospf.toml")).unwrap();
    let cluster = Cluster::parse(&text.replace("bfd = true", "bfd = false"), &root).unwrap();
    let mut files = holdfast_esr_config::frr(&cluster).unwrap();
    files.extend(holdfast_esr_config::bird(&cluster).unwrap());
    assert_eq!(files.len(), 12);
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
    let files: Vec<_> = example()
        .into_iter()
        .filter(|f| !f.path.ends_with("bird.conf"))
        .collect();
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
    assert_eq!(files.len(), 4);
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
