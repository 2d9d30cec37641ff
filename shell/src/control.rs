//! The local status socket: one JSON request line in, one JSON reply line out.
//!
//! `en status` and `dn status` talk to the running daemon through it. The socket is created with
//! mode 0600: status includes client identities and addresses.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

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
    let listener =
        UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    let answer = std::sync::Arc::new(answer);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_ok() {
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
