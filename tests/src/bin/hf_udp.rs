//! A UDP stream whose every byte the receiver checks (test tool of the Holdfast lab): the
//! tunnel may merge datagrams into super-packets on the way, and this shows that each one comes
//! out whole, unchanged and in its order. iperf3 counts datagrams but reads no content.
//!
//! `hf-udp receive` prints one JSON object when the stream ends: datagrams received, corrupt
//! (wrong length or content) and out of order.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Send or receive a checked UDP stream (test tool of the Holdfast lab).
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send COUNT datagrams of SIZE bytes to ADDRESS:PORT, BURST at a time with a pause between.
    Send {
        /// Where to send: ADDRESS:PORT (an IPv6 address in brackets).
        #[arg(long)]
        to: SocketAddr,
        /// Datagrams to send, numbered from 0.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Bytes per datagram: its number (8 bytes), then bytes that depend on the number.
        #[arg(long, default_value_t = 1200)]
        size: usize,
        /// Datagrams sent back to back before each pause.
        #[arg(long, default_value_t = 32)]
        burst: u64,
        /// Microseconds of each pause.
        #[arg(long, default_value_t = 1000)]
        pause_us: u64,
    },
    /// Receive on ADDRESS:PORT until COUNT datagrams came or none came for IDLE_MS, then print
    /// what arrived as JSON.
    Receive {
        /// Where to listen: ADDRESS:PORT (an IPv6 address in brackets).
        #[arg(long)]
        bind: SocketAddr,
        /// Datagrams expected: the stream is complete when this many came.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Bytes per datagram, as sent; a datagram of another length counts as corrupt.
        #[arg(long, default_value_t = 1200)]
        size: usize,
        /// Ends the stream when nothing came for this long (after the first datagram, or from
        /// the start when none came).
        #[arg(long, default_value_t = 3000)]
        idle_ms: u64,
    },
}

/// Datagram `seq`: its number, then bytes that depend on the number and their place.
fn fill(seq: u64, buf: &mut [u8]) {
    buf[..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in buf[8..].iter_mut().enumerate() {
        *b = (seq.wrapping_mul(31).wrapping_add(i as u64 * 7)) as u8;
    }
}

fn main() -> Result<()> {
    let command = Cli::parse().command;
    let (Command::Send { size, .. } | Command::Receive { size, .. }) = command;
    if size < 8 {
        bail!("--size must be at least 8 (the sequence number)");
    }
    match command {
        Command::Send {
            to,
            count,
            size,
            burst,
            pause_us,
        } => {
            let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
            let socket = UdpSocket::bind(bind).context("cannot bind the sending socket")?;
            let mut buf = vec![0u8; size];
            for seq in 0..count {
                fill(seq, &mut buf);
                socket
                    .send_to(&buf, to)
                    .with_context(|| format!("cannot send datagram {seq} to {to}"))?;
                if (seq + 1) % burst.max(1) == 0 {
                    std::thread::sleep(Duration::from_micros(pause_us));
                }
            }
            Ok(())
        }
        Command::Receive {
            bind,
            count,
            size,
            idle_ms,
        } => {
            // The tunnel's own large buffers: a test of content, not of buffer sizes.
            let socket = holdfast_shell::os::udp::socket(bind)?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (mut received, mut corrupt, mut out_of_order) = (0u64, 0u64, 0u64);
            let mut next = 0u64;
            let mut buf = vec![0u8; 65536];
            let mut expected = vec![0u8; size];
            let mut last = Instant::now();
            while received < count && last.elapsed() < Duration::from_millis(idle_ms) {
                let n = match socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue
                    }
                    Err(e) => return Err(e).context("cannot receive"),
                };
                last = Instant::now();
                received += 1;
                if n != size {
                    corrupt += 1;
                    continue;
                }
                let mut number = [0u8; 8];
                number.copy_from_slice(&buf[..8]);
                let seq = u64::from_be_bytes(number);
                fill(seq, &mut expected);
                if buf[..n] != expected[..] {
                    corrupt += 1;
                    continue;
                }
                if seq < next {
                    out_of_order += 1;
                }
                next = next.max(seq + 1);
            }
            println!(
                "{}",
                serde_json::json!({
                    "received": received,
                    "corrupt": corrupt,
                    "out_of_order": out_of_order,
                })
            );
            Ok(())
        }
    }
}
