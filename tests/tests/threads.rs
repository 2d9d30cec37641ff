//! Both daemons with more than one thread (`en --threads 2`, `dn --threads 2`, given through
//! their environment variables, as a unit file would): two clients carry traffic both ways at
//! once, and when the first client's DN is killed it switches and its traffic still flows.
//! Each DN's TUN device then has a queue per thread, and its UDP port a socket per thread.
//! The default is one thread; this keeps the multi-threaded runtime working.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use holdfast_lab::lab::{dn_role, role_of, with_lab, Credential, LabSpec, Routing, SERVER};
use holdfast_lab::traffic::{self, IperfTest};

#[test]
#[cfg_attr(
    not(lab_root),
    ignore = "needs root: the lab builds network namespaces"
)]
fn with_several_threads_two_clients_carry_traffic_both_ways_and_fail_over() {
    // Read by every en and dn the lab starts (this test binary is its own process).
    std::env::set_var("HOLDFAST_EN_THREADS", "2");
    std::env::set_var("HOLDFAST_DN_THREADS", "2");
    let spec = LabSpec {
        clients: 2,
        dns: 2,
        routing: Routing::Frr,
        ..LabSpec::default()
    };
    with_lab(spec, |lab| {
        for client in [1, 2] {
            lab.start_client(client, &Credential::Issued(format!("client{client}")))?;
            lab.wait_address(client, Duration::from_secs(15))?;
        }
        for role in ["en1", "dn1", "dn2"] {
            let pid = lab
                .net
                .pid(role)
                .with_context(|| format!("{role} is not running"))?;
            let workers = runtime_workers(pid)?;
            ensure!(
                workers >= 2,
                "{role} runs {workers} runtime threads, not 2 or more"
            );
        }
        // Each DN's TUN device has a queue per thread, each read by its own task.
        for role in ["dn1", "dn2"] {
            let listed = lab
                .net
                .exec(role, &["ls", "/sys/class/net/holdfast0/queues"])?;
            let listed = String::from_utf8_lossy(&listed.stdout);
            let queues = listed
                .split_whitespace()
                .filter(|q| q.starts_with("tx-"))
                .count();
            ensure!(
                queues == 2,
                "{role}'s TUN device has {queues} queues, not 2: {listed}"
            );
        }
        // And its UDP port a socket per thread, each an endpoint of its own.
        for k in [1, 2] {
            let shards = lab.dn_status(k)?["udp_shards"].as_u64();
            ensure!(
                shards == Some(2),
                "dn{k} reports {shards:?} UDP shards, not 2"
            );
            let listed = lab
                .net
                .exec(&dn_role(k), &["ss", "-Huln", "sport = :4433"])?;
            let sockets = String::from_utf8_lossy(&listed.stdout).lines().count();
            ensure!(
                sockets == 2,
                "dn{k} has {sockets} UDP sockets on its port, not 2"
            );
        }
        for role in ["en1", "en2"] {
            let (sent, received) = lab.ping(role, SERVER, 5, &[])?;
            ensure!(
                sent == received,
                "{role}: {received} of {sent} pings answered"
            );
        }
        // Both clients at once: the first uploads, the second pings at 100/s.
        let pinger = traffic::Pinger::start(&lab.net, "en2", SERVER, "0.01")?;
        let upload = traffic::bulk(&mut lab.net, "srv", "en1", SERVER, 3, false, None)?;
        let uploaded = upload.finish(&mut lab.net)?;
        let (sent, answered) = pinger.stop()?;
        eprintln!(
            "en1 uploaded {uploaded} bytes while en2 had {answered} of {sent} pings answered"
        );
        ensure!(uploaded > 0, "the upload carried nothing");
        ensure!(
            sent > 0 && answered * 2 >= sent,
            "en2: {answered} of {sent} pings answered during en1's upload"
        );
        let reverse = IperfTest {
            reverse: true,
            ..IperfTest::default()
        };
        let download = traffic::iperf3_test(&mut lab.net, "srv", "en2", SERVER, 2, &reverse)?;
        ensure!(download.mbps > 0.0, "en2's download carried nothing");

        let (primary, secondary) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        let killed = Instant::now();
        lab.net.stop(&dn_role(primary), libc::SIGKILL)?;
        let mut switched = false;
        while killed.elapsed() < Duration::from_secs(10) {
            let _ = lab.ping("en1", SERVER, 1, &["-W", "0.1"]);
            if role_of(&lab.en_status(1)?, "primary") == Some(secondary) {
                switched = true;
                break;
            }
        }
        ensure!(switched, "en1 did not switch to dn{secondary} within 10 s");
        let after = traffic::iperf3(&mut lab.net, "srv", "en1", SERVER, 2)?;
        ensure!(after.mbps > 0.0, "no upload through dn{secondary}");
        Ok(())
    });
}

/// Threads of process `pid` that tokio started: workers and blocking threads (a one-thread
/// runtime has no workers; it runs on the main thread).
fn runtime_workers(pid: u32) -> Result<usize> {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        if comm.starts_with("tokio-r") {
            n += 1;
        }
    }
    Ok(n)
}
