//! The local status socket: one JSON request line in, one JSON reply line out.
//!
//! `en status` and `dn status` talk to the running daemon through it. The socket is created with
//! mode 0600: status includes client identities and addresses. A request is one line of at
//! most 4 KiB, read within 2 s.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest status request taken: requests are a word or two.
const MAX_REQUEST: u64 = 4096;
/// How long a client has to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A Unix socket of `kind` bound at `path`, mode 0600 from the moment the file exists: the mode
/// is set on the socket before `bind`, which Linux applies to the file it creates, so nobody
/// else can connect in between (a chmod after bind leaves a window).
fn bind_private(path: &Path, kind: socket2::Type) -> Result<socket2::Socket> {
    use std::os::fd::AsRawFd;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, kind, None)
        .context("cannot create a Unix socket")?;
    // SAFETY: fchmod on a descriptor this function owns.
    if unsafe { libc::fchmod(socket.as_raw_fd(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot restrict a Unix socket");
    }
    let address = socket2::SockAddr::unix(path)
        .with_context(|| format!("{} is not usable as a socket path", path.display()))?;
    socket
        .bind(&address)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A datagram socket at `path` only this user (and root) can send to; see [`bind_private`].
pub fn bind_private_datagram(path: &Path) -> Result<std::os::unix::net::UnixDatagram> {
    Ok(bind_private(path, socket2::Type::DGRAM)?.into())
}

/// `path` with `suffix` appended to its file name: the place for another socket that belongs
/// with the daemon whose status socket is `path`.
pub fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Serves `answer(request)` on a Unix socket at `path` until the task is dropped. A stale socket
/// file from an earlier run is replaced; a live one (another daemon answering) is an error.
pub async fn serve<F>(path: PathBuf, answer: F) -> Result<tokio::task::JoinHandle<()>>
where
    F: Fn(&str) -> serde_json::Value + Send + Sync + 'static,
{
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(anyhow!(
                "{} is in use by a running daemon; stop it or choose another --control path",
                path.display()
            ));
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let socket = bind_private(&path, socket2::Type::STREAM)?;
    socket
        .listen(64)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let listener = UnixListener::from_std(socket.into())
        .with_context(|| format!("cannot watch {}", path.display()))?;
    let answer = std::sync::Arc::new(answer);
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: retrying at once would only spin.
                    tracing::warn!(error = %e, "status socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = BufReader::new(read.take(MAX_REQUEST));
                let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
                // A line cut off by the size limit or the deadline is no request.
                if matches!(read, Ok(Ok(_))) && line.ends_with('\n') {
                    let mut reply = answer(line.trim()).to_string();
                    reply.push('\n');
                    let _ = write.write_all(reply.as_bytes()).await;
                }
            });
        }
    }))
}

/// Sends `request` to the daemon at `path` and returns its JSON reply.
pub async fn request(path: &Path, request: &str) -> Result<serde_json::Value> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach the daemon at {} (is it running? is this the right --control/control_socket?)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{request}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line).context("the daemon sent a malformed status reply")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn only_this_user_reaches_the_socket_and_only_short_requests_are_answered() {
        let dir = std::env::temp_dir().join(format!("holdfast-control-{}", std::process::id()));
        let path = dir.join("status.sock");
        let _server = serve(path.clone(), |req| serde_json::json!({ "asked": req }))
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            request(&path, "status").await.unwrap(),
            serde_json::json!({"asked": "status"})
        );
        // 8 KiB without a line end: cut off at 4 KiB, unanswered, the connection closed.
        let stream = UnixStream::connect(&path).await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(&[b'x'; 8192]).await.unwrap();
        let mut reply = String::new();
        let got = tokio::time::timeout(
            REQUEST_TIMEOUT * 2,
            BufReader::new(read).read_line(&mut reply),
        )
        .await;
        // Closed (or reset, with the rest unread), not left hanging, and nothing said.
        assert!(got.is_ok() && reply.is_empty(), "{got:?} {reply:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
