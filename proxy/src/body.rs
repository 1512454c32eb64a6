//! One body type for downstream responses and upstream requests, so the
//! hot path needs no boxing: empty, a full buffer, or a streamed hyper body,
//! plus wrappers that watch a stream's timers (Envoy's `request_timeout`,
//! `stream_idle_timeout`, `max_stream_duration`) and count bytes for logs.
use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::upstream::h1::InlineBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why weir ended a stream's body.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("request timeout")]
    RequestTimeout,
    #[error("stream idle timeout")]
    Idle,
    #[error("max stream duration reached")]
    Duration,
}

/// Shared facts about one stream, updated by its bodies.
#[derive(Debug)]
pub struct StreamState {
    pub start: Instant,
    /// Milliseconds since `start` of the last byte seen in either direction.
    last_activity_ms: AtomicU64,
    pub request_complete: AtomicBool,
    pub body_error: AtomicBool,
    pub request_timed_out: AtomicBool,
    /// Request body bytes read from downstream.
    bytes_received: AtomicU64,
}

impl StreamState {
    pub fn new(start: Instant) -> Arc<Self> {
        Arc::new(StreamState {
            start,
            last_activity_ms: AtomicU64::new(0),
            request_complete: AtomicBool::new(false),
            body_error: AtomicBool::new(false),
            request_timed_out: AtomicBool::new(false),
            bytes_received: AtomicU64::new(0),
        })
    }

    pub fn touch(&self) {
        self.last_activity_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Relaxed)
    }

    pub fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_activity_ms.load(Relaxed))
    }
}

pub enum Body {
    Empty,
    /// Empty, but with no declared length (no content-length is written).
    None,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// An upstream HTTP/1 response body weir reads itself (see
    /// [`crate::upstream::h1`]).
    Inline(InlineBody),
    /// The downstream request body: records activity, completion and
    /// errors (a malformed chunked body must become a 400, not an upstream
    /// failure), and ends with an error at `request_timeout`.
    Watched(Box<Watched>),
    /// An upstream response body under the stream idle timeout and the max
    /// stream duration: a stall ends it with an error (the stream is reset).
    Timed(Box<Timed>),
    /// A body with a hook that runs when the stream ends or is dropped
    /// (access logs, stats).
    Tracked(Box<Tracked>),
    /// A response body through the HTTP filters' body and trailer hooks
    /// (only when an instance asked for them).
    Filtered(Box<Filtered>),
}

/// A response body whose chunks and trailers run through filter hooks.
pub struct Filtered {
    pub inner: Body,
    pub chain: filters::ResponseBodyChain,
    /// Trailers held while the data a filter added before them goes out.
    trailers: Option<http::HeaderMap>,
    /// The hooks have seen the end of the stream.
    ended: bool,
}

pub struct Watched {
    pub inner: Incoming,
    pub state: Arc<StreamState>,
    pub deadline: Option<Pin<Box<Sleep>>>,
    /// HTTP filters watching the request body (`None` without such a filter).
    pub observer: Option<Box<dyn filters::RequestBodyObserver>>,
}

pub struct Timed {
    pub inner: UpstreamBody,
    pub state: Arc<StreamState>,
    pub idle: Option<Duration>,
    /// The stream's end of life (`max_stream_duration`).
    pub deadline: Option<Instant>,
    /// Armed only while the body waits for data: most responses are ready
    /// at once and never touch the timer wheel.
    pub sleep: Option<Pin<Box<Sleep>>>,
}

/// What a tracked body saw when it ended.
#[derive(Debug, Clone, Copy)]
pub struct TrackedEnd {
    /// Data bytes.
    pub bytes: u64,
    /// It reached its end (else it was dropped or failed).
    pub complete: bool,
    /// `grpc-status` of its trailers, if it had any.
    pub grpc_status: Option<u32>,
    /// The HTTP/1 chunk framing its data frames take when sent chunked
    /// ([`crate::http::wire::chunk_framing`]).
    pub framing: u64,
}

/// The end-of-stream hook of a [`Tracked`] body: a closure run at most once.
pub trait OnEnd: Send {
    /// Runs the hook, if it has not run yet.
    fn call(&mut self, end: TrackedEnd);
    /// Whether the hook has yet to run.
    fn pending(&self) -> bool;
}

impl<F: FnOnce(TrackedEnd) + Send> OnEnd for Option<F> {
    fn call(&mut self, end: TrackedEnd) {
        if let Some(f) = self.take() {
            f(end);
        }
    }

    fn pending(&self) -> bool {
        self.is_some()
    }
}

/// Counts bytes and calls `done` exactly once. The hook is stored inline
/// (`Tracked<dyn OnEnd>` is unsized): one allocation per response carries
/// the counters and the hook with what it captured.
pub struct Tracked<D: ?Sized + OnEnd = dyn OnEnd> {
    pub inner: Body,
    pub bytes: u64,
    /// `grpc-status` seen in the trailers.
    pub grpc_status: Option<u32>,
    /// See [`TrackedEnd::framing`].
    pub framing: u64,
    done: D,
}

impl<D: ?Sized + OnEnd> Tracked<D> {
    fn finish(&mut self, complete: bool) {
        let end = TrackedEnd {
            bytes: self.bytes,
            complete,
            grpc_status: self.grpc_status,
            framing: self.framing,
        };
        self.done.call(end);
    }
}

impl<D: ?Sized + OnEnd> Drop for Tracked<D> {
    fn drop(&mut self) {
        // A body at its end counts as complete even if never polled again
        // (hyper skips polling bodies it knows are empty).
        let complete = http_body::Body::is_end_stream(&self.inner);
        self.finish(complete);
    }
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Body {
        let b = b.into();
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }

    /// Wraps the body so `done` runs once at its end.
    pub fn tracked(self, done: impl FnOnce(TrackedEnd) + Send + 'static) -> Body {
        Body::Tracked(Box::new(Tracked {
            inner: self,
            bytes: 0,
            grpc_status: None,
            framing: 0,
            done: Some(done),
        }))
    }

    /// The downstream request body, watched.
    pub fn watched(
        inner: Incoming,
        state: Arc<StreamState>,
        request_timeout: Option<Duration>,
    ) -> Body {
        let deadline = request_timeout.map(|t| Box::pin(tokio::time::sleep_until(state.start + t)));
        Body::Watched(Box::new(Watched {
            inner,
            state,
            deadline,
            observer: None,
        }))
    }

    /// The downstream request body for the router: watched, unless it has
    /// already ended and no filter observes it (it is never polled then, so
    /// the wrapper would only cost an allocation; the stream state marks
    /// the request complete when the router is entered).
    pub fn request(
        inner: Incoming,
        state: &Arc<StreamState>,
        request_timeout: Option<Duration>,
        observer: Option<Box<dyn filters::RequestBodyObserver>>,
    ) -> Body {
        if observer.is_none() && http_body::Body::is_end_stream(&inner) {
            return Body::Incoming(inner);
        }
        Body::watched(inner, state.clone(), request_timeout).observed(observer)
    }

    /// Lets `observer` watch a downstream request body's chunks.
    pub fn observed(mut self, observer: Option<Box<dyn filters::RequestBodyObserver>>) -> Body {
        if let Body::Watched(w) = &mut self {
            w.observer = observer;
        }
        self
    }

    /// Runs the response body through `chain`'s body and trailer hooks.
    pub fn filtered(self, chain: filters::ResponseBodyChain) -> Body {
        Body::Filtered(Box::new(Filtered {
            inner: self,
            chain,
            trailers: None,
            ended: false,
        }))
    }

    /// An upstream response body under the stream's idle and duration timers.
    pub fn timed(
        inner: UpstreamBody,
        state: Arc<StreamState>,
        idle: Option<Duration>,
        max_duration: Option<Duration>,
    ) -> Body {
        if idle.is_none() && max_duration.is_none() {
            return match inner {
                UpstreamBody::Hyper(i) => Body::Incoming(i),
                UpstreamBody::Inline(i) => Body::Inline(i),
            };
        }
        let deadline = max_duration.map(|d| state.start + d);
        Body::Timed(Box::new(Timed {
            inner,
            state,
            idle,
            deadline,
            sleep: None,
        }))
    }
}

/// An upstream response body: hyper's (HTTP/2, and HTTP/1 requests weir
/// leaves to hyper's client) or read inline by weir.
pub enum UpstreamBody {
    Hyper(Incoming),
    Inline(InlineBody),
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(i) => Pin::new(i).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Inline(i) => Pin::new(i).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(i) => i.is_end_stream(),
            UpstreamBody::Inline(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(i) => i.size_hint(),
            UpstreamBody::Inline(i) => i.size_hint(),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty | Body::None => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(i) => Pin::new(i).poll_frame(cx).map_err(Into::into),
            Body::Inline(i) => Pin::new(i).poll_frame(cx),
            Body::Watched(w) => {
                let r = Pin::new(&mut w.inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        w.state.touch();
                        if let Some(d) = f.data_ref() {
                            w.state.bytes_received.fetch_add(d.len() as u64, Relaxed);
                            if let Some(o) = &mut w.observer {
                                o.on_data(d);
                            }
                        }
                        if w.inner.is_end_stream() {
                            w.state.request_complete.store(true, Relaxed);
                            if let Some(mut o) = w.observer.take() {
                                o.on_end();
                            }
                        }
                    }
                    Poll::Ready(None) => {
                        w.state.request_complete.store(true, Relaxed);
                        if let Some(mut o) = w.observer.take() {
                            o.on_end();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => w.state.body_error.store(true, Relaxed),
                    Poll::Pending => {
                        if let Some(d) = &mut w.deadline {
                            if d.as_mut().poll(cx).is_ready() {
                                w.state.request_timed_out.store(true, Relaxed);
                                return Poll::Ready(Some(Err(StreamError::RequestTimeout.into())));
                            }
                        }
                    }
                }
                r.map_err(Into::into)
            }
            Body::Timed(t) => {
                let r = Pin::new(&mut t.inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(_))) => t.state.touch(),
                    Poll::Pending => {
                        let now = Instant::now();
                        let idle_at = t.idle.map(|i| t.state.last_activity() + i);
                        if t.deadline.is_some_and(|d| now >= d) {
                            return Poll::Ready(Some(Err(StreamError::Duration.into())));
                        }
                        if idle_at.is_some_and(|d| now >= d) {
                            return Poll::Ready(Some(Err(StreamError::Idle.into())));
                        }
                        let next = match (idle_at, t.deadline) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        if let Some(next) = next {
                            let s = t
                                .sleep
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
                            if s.deadline() != next {
                                s.as_mut().reset(next);
                            }
                            // Registers the wake-up; the checks above decide on it.
                            if s.as_mut().poll(cx).is_ready() {
                                cx.waker().wake_by_ref();
                            }
                        }
                    }
                    _ => {}
                }
                r.map_err(Into::into)
            }
            Body::Tracked(t) => {
                let r = Pin::new(&mut t.inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            t.bytes += d.len() as u64;
                            t.framing += crate::http::wire::chunk_framing(d.len());
                        } else if let Some(tr) = f.trailers_ref() {
                            t.grpc_status = tr
                                .get("grpc-status")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok());
                        }
                        if t.inner.is_end_stream() {
                            t.finish(true);
                        }
                    }
                    Poll::Ready(None) => t.finish(true),
                    Poll::Ready(Some(Err(_))) => t.finish(false),
                    Poll::Pending => {}
                }
                r
            }
            Body::Filtered(f) => f.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty | Body::None => true,
            Body::Full(b) => b.is_none(),
            Body::Incoming(i) => i.is_end_stream(),
            Body::Inline(i) => i.is_end_stream(),
            Body::Watched(w) => w.inner.is_end_stream(),
            Body::Timed(t) => t.inner.is_end_stream(),
            Body::Tracked(t) => t.inner.is_end_stream() && !t.done.pending(),
            // Only once the hooks saw the end (they may add data at it).
            Body::Filtered(f) => f.ended && f.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::None => SizeHint::default(),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Incoming(i) => i.size_hint(),
            Body::Inline(i) => i.size_hint(),
            Body::Watched(w) => w.inner.size_hint(),
            Body::Timed(t) => t.inner.size_hint(),
            Body::Tracked(t) => t.inner.size_hint(),
            // Filters may change the length (content-length is theirs to
            // remove); hyper must not derive one from the inner body.
            Body::Filtered(_) => SizeHint::default(),
        }
    }
}

impl Filtered {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use http_body::Body as _;
        loop {
            if let Some(t) = self.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    let out = self.chain.data(Bytes::new(), true);
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Ok(f))) => f,
            };
            match frame.into_data() {
                Ok(d) => {
                    let eos = self.inner.is_end_stream();
                    self.ended = eos;
                    let out = self.chain.data(d, eos);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(frame) => {
                    if let Ok(mut t) = frame.into_trailers() {
                        self.ended = true;
                        let out = self.chain.trailers(&mut t);
                        if out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::trailers(t))));
                        }
                        self.trailers = Some(t);
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }
}
