//! Connection pools: hyper-util's pooling client per (cluster, worker,
//! protocol), keyed inside by endpoint `ip:port`. It gives HTTP/1.1
//! keep-alive reuse, HTTP/2 multiplexing, idle expiry, and transparent retry
//! of a request that hit a pooled connection the peer had already closed.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection},
        Client as HyperClient,
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;
use xds_client::config::Cluster;

use super::ClusterStats;
use crate::body::Body;
use crate::stats::{Counter, Gauge};

pub type Client = HyperClient<Connector, Body>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Http1 = 0,
    Http2 = 1,
}

/// Connects TCP with the cluster's connect timeout and counts connections.
#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
    cx_total: Arc<Counter>,
    cx_active: Arc<Gauge>,
    connect_fail: Arc<Counter>,
    connect_timeout_c: Arc<Counter>,
}

/// Why a connect failed, as Envoy words it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("delayed connect error: {0}")]
    Io(std::io::Error),
    #[error("connect timeout")]
    Timeout,
    #[error("invalid upstream address")]
    BadAddress,
}

impl tower::Service<http::Uri> for Connector {
    type Response = CountedIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<CountedIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: std::net::SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or(ConnectError::BadAddress)?;
            let stream =
                match tokio::time::timeout(this.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        this.connect_fail.inc();
                        return Err(ConnectError::Io(e));
                    }
                    Err(_) => {
                        this.connect_fail.inc();
                        this.connect_timeout_c.inc();
                        return Err(ConnectError::Timeout);
                    }
                };
            let _ = stream.set_nodelay(true);
            this.cx_total.inc();
            this.cx_active.inc();
            Ok(CountedIo {
                io: TokioIo::new(stream),
                active: this.cx_active.clone(),
            })
        })
    }
}

/// A TCP connection that decrements `upstream_cx_active` when closed.
pub struct CountedIo {
    io: TokioIo<TcpStream>,
    active: Arc<Gauge>,
}

impl Drop for CountedIo {
    fn drop(&mut self) {
        self.active.dec();
    }
}

impl Connection for CountedIo {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Builds a pool for one cluster, worker and protocol.
pub fn build(c: &Cluster, kind: PoolKind, stats: &ClusterStats) -> Client {
    let connector = Connector {
        connect_timeout: c.connect_timeout,
        cx_total: stats.upstream_cx_total.clone(),
        cx_active: stats.upstream_cx_active.clone(),
        connect_fail: stats.upstream_cx_connect_fail.clone(),
        connect_timeout_c: stats.upstream_cx_connect_timeout.clone(),
    };
    let mut b = HyperClient::builder(TokioExecutor::new());
    b.pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(c.idle_timeout)
        .pool_max_idle_per_host(usize::MAX)
        .set_host(false)
        .retry_canceled_requests(true);
    if kind == PoolKind::Http2 {
        b.http2_only(true)
            .http2_initial_stream_window_size(c.http2.initial_stream_window_size)
            .http2_initial_connection_window_size(c.http2.initial_connection_window_size)
            .http2_max_concurrent_reset_streams(1024);
        if let Some(i) = c.http2.keepalive_interval {
            b.http2_keep_alive_interval(i);
            if let Some(t) = c.http2.keepalive_timeout {
                b.http2_keep_alive_timeout(t);
            }
        }
    } else {
        b.http1_preserve_header_case(false);
    }
    b.build(connector)
}
