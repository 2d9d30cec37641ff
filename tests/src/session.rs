//! Client sessions for the lab's own test clients (`hf-load`, `hf-attack`): real QUIC, TLS and
//! control messages, as `en` opens them, without the rest of the client.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use holdfast_proto::control::Message;
use holdfast_proto::lease::LeaseTicket;
use holdfast_shell::quic::{send_message, ControlReader};

/// A session that attached: its connection, control stream and the ticket the DN answered with.
pub struct Attached {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub reader: ControlReader,
    pub ticket: LeaseTicket,
}

/// Connects to DN `name` at `addr`, sends `Attach` with `ticket` and waits for the lease.
pub async fn attach(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    (name, addr): &(String, SocketAddr),
    ticket: Option<LeaseTicket>,
) -> Result<Attached> {
    let conn = endpoint
        .connect_with(config, *addr, name)
        .with_context(|| format!("cannot connect to {name}"))?
        .await
        .with_context(|| format!("handshake with {name} failed"))?;
    let (mut send, recv) = conn.open_bi().await?;
    send_message(&mut send, &Message::Attach { ticket }).await?;
    let mut reader = ControlReader::new(recv);
    match reader.next().await? {
        Some(Message::Leased(lease)) => Ok(Attached {
            conn,
            send,
            reader,
            ticket: lease.ticket,
        }),
        Some(Message::Refused { code, reason }) => bail!("{name} refused: {code:?}: {reason}"),
        other => bail!("{name} answered {other:?}"),
    }
}

/// Parses `NAME=ADDRESS:PORT`, how the lab names a DN to its test clients.
pub fn parse_dn(text: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=ADDRESS:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an ADDRESS:PORT"))?;
    Ok((name.to_owned(), addr))
}

/// A ticket given on the command line in hex (`--ticket-hex`), if any.
pub fn ticket_from_hex(hex_text: Option<&str>) -> Result<Option<LeaseTicket>> {
    hex_text
        .map(|h| {
            let bytes = hex::decode(h).context("--ticket-hex is not hex")?;
            LeaseTicket::decode(&bytes).map_err(|e| anyhow::anyhow!("bad ticket: {e}"))
        })
        .transpose()
}
