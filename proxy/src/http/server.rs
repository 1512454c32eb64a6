//! Serving one downstream connection with hyper (HTTP/1.1 and HTTP/2 prior
//! knowledge on one port for codec AUTO), with graceful drain.
use std::sync::Arc;

use http::{header, HeaderMap};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use xds_client::config::Codec;

use super::headers::X_REQUEST_ID;
use super::service::{handle, ConnCtx};

/// Marks the response headers whose value changes from one response to the
/// next, `date` and an echoed `x-request-id`, as never to be indexed by
/// HPACK. Only the HTTP/2 encoder reads the mark (and `HeaderValue`'s
/// `Debug`, which then hides the value); it is set after `finish`, so access
/// logs and filters saw the headers unmarked.
///
/// The `h2` crate's encoder inserts every new value of a header into the
/// connection's dynamic table and finds a value by walking, oldest first,
/// the list of entries that share its name. `date` gets a new value every
/// second and `x-request-id` one per request: on a long-lived connection
/// they fill the 4 KiB table, every response walks their whole list (about
/// 40 value compares per response in `benches/callgrind.sh`), and they evict
/// the entries that do repeat. As never-indexed literals (RFC 7541 section
/// 6.2.3, the only non-indexing form `h2` offers for a field it would
/// otherwise index) they are written out with no table work: `date` by its
/// static-table name, 24 bytes more than an indexed hit within the same
/// second. `x-envoy-upstream-service-time` stays indexed: its 29-character
/// name is not in the static table (as a literal it would go out in full on
/// every response) and its few common values repeat. The decoded headers are the same; the
/// representation differs from Envoy's (its codec adds them to the table).
pub(super) fn mark_unindexed(headers: &mut HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if name == header::DATE || name == X_REQUEST_ID {
            value.set_sensitive(true);
        }
    }
}

/// Serves `stream` until it closes, is drained, or exceeds
/// `max_connection_duration`.
pub async fn serve<IO>(stream: IO, ctx: Arc<ConnCtx>, mut drain: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let h = ctx.hcm.config.clone();
    let mut b = auto::Builder::new(super::connect::StreamExec);
    {
        let mut h1 = b.http1();
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            .max_buf_size(((h.max_request_headers_kb as usize) * 1024 + 4096).max(8192))
            .max_headers(h.max_headers_count as usize + 1);
        // Envoy has no header timeout unless request_headers_timeout is set
        // (hyper would default to 30 s).
        h1.header_read_timeout(h.request_headers_timeout);
    }
    {
        let mut h2 = b.http2();
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(h.http2.max_concurrent_streams)
            .initial_stream_window_size(h.http2.initial_stream_window_size)
            .initial_connection_window_size(h.http2.initial_connection_window_size)
            .max_header_list_size(h.max_request_headers_kb * 2048 + 8192);
        if h.http2.allow_connect {
            h2.enable_connect_protocol();
        }
        if let Some(i) = h.http2.keepalive_interval {
            h2.keep_alive_interval(i);
            if let Some(t) = h.http2.keepalive_timeout {
                h2.keep_alive_timeout(t);
            }
        }
    }
    let b = match h.codec {
        Codec::Auto => b,
        Codec::Http1 => b.http1_only(),
        Codec::Http2 => b.http2_only(),
    };
    let svc_ctx = ctx.clone();
    // The request future is large (the whole filter and router path) and
    // boxed: HTTP/2 spawns a task per stream, which moved the unboxed future
    // through several stack frames into the task (4 copies per request,
    // about half of an h2 request's instructions), and HTTP/1 kept a slot
    // that size per connection, which at 128 connections pushes the
    // per-connection state the next request needs out of the CPU cache.
    // One allocation per request, reused hot from the allocator, is cheaper.
    let svc = service_fn(move |req| Box::pin(handle(req, svc_ctx.clone())));
    let conn = b.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let max_dur = async {
        match h.max_connection_duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(max_dur);
    // A connection accepted while draining (graceful /drain_listeners) is
    // served: its responses carry `connection: close` (see the service).
    let accepted_draining = *drain.borrow();
    let idle = ctx.idle_timeout(h.idle_timeout);
    tokio::pin!(idle);
    if accepted_draining {
        let grace = std::time::Duration::from_secs(ctx.shared.options.drain_time_s);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(grace) => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
        return;
    }
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = drain.wait_for(|d| *d) => {}
        _ = &mut max_dur => ctx.hcm.stats.cx_max_duration_reached.inc(),
        _ = &mut idle => ctx.hcm.stats.cx_idle_timeout.inc(),
        // An HTTP/2 connection reached max_requests_per_connection (Envoy's
        // drain sequence): GOAWAY below; open streams finish.
        _ = ctx.max_requests_reached.notified() => {}
    }
    // --drain-strategy gradual spreads connection closes over the drain
    // time (Envoy raises the close probability linearly); immediate closes
    // at once.
    if *drain.borrow() && ctx.shared.options.drain_strategy == crate::cli::DrainStrategy::Gradual {
        let span = std::time::Duration::from_secs(ctx.shared.options.drain_time_s);
        let wait = span.mul_f64(rand::random::<f64>());
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // A filter-chain update drains HTTP/1 connections by their next
    // response (`connection: close`), not by closing them idle under a
    // client that may be sending; the drain time bounds the wait.
    if *drain.borrow()
        && ctx.update_drain.load(std::sync::atomic::Ordering::Relaxed)
        && !ctx.is_h2.load(std::sync::atomic::Ordering::Relaxed)
    {
        let span = std::time::Duration::from_secs(ctx.shared.options.drain_time_s);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(span) => {}
        }
    }
    // Drain: HTTP/1 answers with `connection: close`, HTTP/2 sends GOAWAY;
    // in-flight requests finish.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
