//! The HTTP side of `--metrics-listen`: hyper's HTTP/1 server answering `GET /metrics` (and
//! `HEAD`) with a scrape of the [`Hub`]; 404 for any other path, 405 for other methods.
//!
//! Must never: read a request body, keep a connection past shutdown or past
//! `HEADER_TIMEOUT` without a request, or answer anything but metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{Format, Hub, MetricsError};

/// How long a client may take to send its request head (a stalled scraper, or a connection
/// opened and left idle, is closed after it).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
use crate::control::wait_shutdown;

/// A bound metrics endpoint, not serving yet.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    /// The address bound (the port is known here when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Binds `addr` (before the daemon claims anything, so a port in use fails the start).
pub async fn bind(addr: SocketAddr) -> Result<MetricsListener, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(MetricsListener { listener, addr })
}

/// Serves scrapes of `hub` until `shutdown` turns true.
pub async fn serve(listener: MetricsListener, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = wait_shutdown(&mut shutdown) => return,
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let hub = hub.clone();
                    let mut stop = shutdown.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| answer(hub.clone(), req));
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::pin!(conn);
                        tokio::select! {
                            r = conn.as_mut() => if let Err(e) = r {
                                tracing::debug!("metrics connection: {e}");
                            },
                            _ = wait_shutdown(&mut stop) => {}
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    // Out of descriptors and the like: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn answer(
    hub: Arc<Hub>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "only /metrics is served here\n",
        ));
    }
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let format = Format::from_accept(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    let body = hub.render(format).await;
    let mut r = Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from(body)
    }));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    Ok(r)
}
