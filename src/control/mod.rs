//! The control socket every daemon answers on (a Unix socket): one JSON request per line,
//! one JSON response per line. `tinylag status` is a client of it.
//!
//! ```text
//! → {"cmd":"status"}
//! ← {"ok":true,"result":{...}}        or        ← {"ok":false,"error":"..."}
//! ```
//!
//! Must never: let a slow or malformed client hold up the daemon (each connection is its
//! own task with a line-length cap and a read timeout), or print credentials in a response.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request: a command name and optional arguments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub cmd: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub args: serde_json::Value,
}

/// A response line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

/// What a daemon does with a request.
#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, request: Request) -> Response;
}

/// Failures of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket (daemon not running, or another path).
    #[error("cannot reach the daemon's control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or the daemon answered nothing.
    #[error("control socket {path}: {reason}")]
    Protocol { path: PathBuf, reason: String },
    /// The daemon answered with an error.
    #[error("daemon at {path} refused {cmd}: {message}")]
    Refused {
        path: PathBuf,
        cmd: String,
        message: String,
    },
}

/// Binds the control socket, replacing a stale socket file (one nothing answers on).
/// Refuses if a live daemon already answers there.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another daemon answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// Serves requests until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = wait_shutdown(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_one(stream, handler).await {
                            tracing::debug!("control connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn wait_shutdown(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // The `Ref` returned by `wait_for` is not `Send`; drop it inside this future.
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

async fn serve_one(stream: UnixStream, handler: Arc<dyn Handler>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    let mut line = String::new();
    let n = match tokio::time::timeout(READ_TIMEOUT, lines.read_line(&mut line)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let response = if n == 0 {
        return Ok(());
    } else if n > MAX_REQUEST || !line.ends_with('\n') {
        Response::error(format!(
            "request longer than {MAX_REQUEST} bytes or not newline-terminated"
        ))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(request) => handler.handle(request).await,
            Err(e) => Response::error(format!("malformed request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

use tokio::io::AsyncReadExt as _;

/// Sends one request and returns the result of a successful response.
pub async fn request(path: &Path, request: &Request) -> Result<serde_json::Value, ControlError> {
    let protocol = |reason: String| ControlError::Protocol {
        path: path.to_path_buf(),
        reason,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut line = serde_json::to_vec(request).map_err(|e| protocol(e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    if answer.is_empty() {
        return Err(protocol(
            "the daemon closed the connection without answering".into(),
        ));
    }
    let response: Response =
        serde_json::from_str(&answer).map_err(|e| protocol(format!("malformed answer: {e}")))?;
    if response.ok {
        Ok(response.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Refused {
            path: path.to_path_buf(),
            cmd: request.cmd.clone(),
            message: response.error.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    #[async_trait]
    impl Handler for Echo {
        async fn handle(&self, request: Request) -> Response {
            match request.cmd.as_str() {
                "status" => Response::ok(serde_json::json!({"mode": "logging"})),
                other => Response::error(format!("unknown command {other:?}")),
            }
        }
    }

    #[tokio::test]
    async fn answers_requests_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = bind(&path).await.unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(listener, Arc::new(Echo), rx));

        let status = Request {
            cmd: "status".into(),
            args: serde_json::Value::Null,
        };
        let result = request(&path, &status).await.unwrap();
        assert_eq!(result["mode"], "logging");

        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(b"not json\n").await.unwrap();
        let mut answer = String::new();
        BufReader::new(raw).read_line(&mut answer).await.unwrap();
        assert!(answer.contains("malformed request"), "{answer}");

        let bogus = Request {
            cmd: "explode".into(),
            args: serde_json::Value::Null,
        };
        assert!(matches!(
            request(&path, &bogus).await,
            Err(ControlError::Refused { .. })
        ));
        // Still serving after the bad ones; a second bind while it runs is refused.
        assert!(request(&path, &status).await.is_ok());
        assert!(bind(&path).await.is_err());
        tx.send(true).unwrap();
        server.await.unwrap();
    }
}
