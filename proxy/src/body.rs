//! One body type for downstream responses and upstream requests, so the
//! hot path needs no boxing: empty, a full buffer, or a streamed hyper body.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

pub enum Body {
    Empty,
    /// Empty, but with no declared length (no content-length is written).
    None,
    /// A downstream body whose errors are recorded (a malformed chunked
    /// body must become a 400, not an upstream failure).
    Watched(Incoming, std::sync::Arc<std::sync::atomic::AtomicBool>),
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// A streamed body with a hook that runs when the stream ends or is dropped
    /// (access logs, stats).
    Tracked(Box<Tracked>),
}

/// Counts bytes and calls `done` exactly once.
pub struct Tracked {
    pub inner: Body,
    pub bytes: u64,
    pub done: Option<Box<dyn FnOnce(u64, bool) + Send>>,
}

impl Tracked {
    fn finish(&mut self, complete: bool) {
        if let Some(f) = self.done.take() {
            f(self.bytes, complete);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish(false);
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

    /// Wraps the body so `done(bytes, completed)` runs once at its end.
    pub fn tracked(self, done: Box<dyn FnOnce(u64, bool) + Send>) -> Body {
        Body::Tracked(Box::new(Tracked {
            inner: self,
            bytes: 0,
            done: Some(done),
        }))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Empty | Body::None => Poll::Ready(None),
            Body::Watched(i, flag) => {
                let r = Pin::new(i).poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &r {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                r
            }
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(i) => Pin::new(i).poll_frame(cx),
            Body::Tracked(t) => {
                let r = Pin::new(&mut t.inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            t.bytes += d.len() as u64;
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty | Body::None => true,
            Body::Watched(i, _) => i.is_end_stream(),
            Body::Full(b) => b.is_none(),
            Body::Incoming(i) => i.is_end_stream(),
            Body::Tracked(t) => t.inner.is_end_stream() && t.done.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::None => SizeHint::default(),
            Body::Watched(i, _) => i.size_hint(),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Incoming(i) => i.size_hint(),
            Body::Tracked(t) => t.inner.size_hint(),
        }
    }
}
