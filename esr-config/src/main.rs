use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use holdfast_proto::cluster::Cluster;

/// Holdfast's configuration generator: one cluster.toml in, routing-daemon configuration for
/// every DN and edge service router (ESR) out, and keepalived's for the ESR pair.
///
/// Check a plan:   esr-config check --config cluster.toml
///                 errors name the line and key: cluster.toml:13: dn[1].pool: ...
/// Generate:       esr-config generate --config cluster.toml --out /etc/holdfast/routing
///                 writes <out>/<node>/zebra.conf, ospfd.conf and bfdd.conf (FRR) for each
///                 DN and ESR, or <out>/<node>/bird.conf with --daemon bird (BFD inside it);
///                 bfdd.conf only while [ospf] bfd is on (the default).
///                 With [vrrp], also <out>/<esr>/keepalived.conf (VRRPv3) for both ESRs of
///                 the pair, whichever --daemon.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The cluster description (see README.md and examples/cluster.toml).
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/holdfast/cluster.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Daemon {
    Frr,
    Bird,
}

#[derive(Subcommand)]
enum Command {
    /// Validate cluster.toml (pools, blocks, names, keys, OSPF plan, ESR pair) and summarise it.
    Check,
    /// Write routing-daemon configuration for every DN and ESR, and keepalived.conf for the ESR
    /// pair, into OUT/<node>/.
    Generate {
        #[arg(long)]
        out: PathBuf,
        /// FRR (zebra.conf, ospfd.conf, bfdd.conf) or BIRD 2 (bird.conf).
        #[arg(long, value_enum, default_value_t = Daemon::Frr)]
        daemon: Daemon,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let cluster = Cluster::load(&cli.config)?;
    match cli.command {
        Command::Check => {
            print!("{}", holdfast_esr_config::summary(&cluster));
            println!("{}: ok", cli.config.display());
        }
        Command::Generate { out, daemon } => {
            let mut files = match daemon {
                Daemon::Frr => holdfast_esr_config::frr(&cluster)?,
                Daemon::Bird => holdfast_esr_config::bird(&cluster)?,
            };
            files.extend(holdfast_esr_config::keepalived(&cluster));
            for file in files {
                let path = out.join(&file.path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                std::fs::write(&path, &file.text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
