//! A test client that presents a chosen lease ticket to a DN and prints the DN's answer as JSON.
//!
//! The real EN only ever presents tickets its DNs issued to it; the lab uses this tool to check
//! that a DN refuses every other claim (another client's ticket, an expired one, one for an
//! address someone else holds).
//!
//! hf-attach --cert C --key K --server-ca CA --endpoint 10.0.1.2:4433 --server-name dn1
//!           [--ticket-hex HEX]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use holdfast_proto::control::Message;
use holdfast_shell::quic::{send_message, ControlReader};
use holdfast_shell::{quic, tls};

/// Present a lease ticket to a DN and print its answer (test tool of the Holdfast lab).
#[derive(Parser)]
struct Cli {
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    server_ca: PathBuf,
    #[arg(long)]
    endpoint: SocketAddr,
    #[arg(long)]
    server_name: String,
    /// The encoded ticket, in hex; none: ask for a fresh lease.
    #[arg(long)]
    ticket_hex: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let ticket = holdfast_lab::session::ticket_from_hex(cli.ticket_hex.as_deref())?;
    let tls = tls::client_config(&cli.cert, &cli.key, &cli.server_ca)?;
    let mut endpoint = quic::endpoint("0.0.0.0:0".parse()?, None, None)?;
    endpoint.set_default_client_config(quic::client_config(tls, quic::MAX_IDLE_TIMEOUT)?);
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        let conn = endpoint.connect(cli.endpoint, &cli.server_name)?.await?;
        let (mut send, recv) = conn.open_bi().await?;
        send_message(&mut send, &Message::Attach { ticket }).await?;
        let answer = ControlReader::new(recv).next().await;
        Ok::<_, anyhow::Error>((conn, answer))
    })
    .await
    .context("no answer within 5 s")?;
    let json = match answer {
        Ok((_, Ok(Some(Message::Leased(lease))))) => serde_json::json!({
            "answer": "leased",
            "address": lease.ticket.claim.address,
        }),
        Ok((_, Ok(Some(Message::Refused { code, reason })))) => serde_json::json!({
            "answer": "refused",
            "code": format!("{code:?}"),
            "reason": reason,
        }),
        Ok((conn, other)) => serde_json::json!({
            "answer": "closed",
            "detail": format!("{other:?} / {:?}", conn.close_reason()),
        }),
        Err(e) => serde_json::json!({"answer": "error", "detail": format!("{e:#}")}),
    };
    println!("{json}");
    Ok(())
}
