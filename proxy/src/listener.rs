//! Binding listener sockets with socket2 and the per-worker accept loops.
use std::{
    net::{SocketAddr, TcpListener as StdListener},
    sync::{atomic::Ordering, Arc},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::watch;
use xds_client::config::{Listener, RawSocketValue};

use crate::http::service::{ConnCtx, HcmRuntime};
use crate::metrics::ListenerStats;
use crate::Shared;

/// A listener's run-time state shared by workers.
pub struct ListenerRuntime {
    pub config: Arc<Listener>,
    pub hcm: Arc<HcmRuntime>,
    pub stats: ListenerStats,
    /// The bound address (the real port when the config says 0).
    pub bound: SocketAddr,
    /// One socket per worker (SO_REUSEPORT, or dups of one socket), taken
    /// by each worker at start so a drain really closes them.
    pub sockets: std::sync::Mutex<Vec<Option<StdListener>>>,
    /// The listener's `access_log`: one line per connection, at its close.
    pub logs: Vec<Arc<crate::access_log::Logger>>,
    /// true: stop accepting and close the sockets.
    pub stop_accept: watch::Sender<bool>,
    /// true: drain connections (HTTP/1 `connection: close`, HTTP/2 GOAWAY).
    pub drain_conns: watch::Sender<bool>,
}

impl ListenerRuntime {
    /// Starts draining this listener. `graceful` keeps accepting (and
    /// draining the new connections too) for `drain_time`, as Envoy's
    /// `/drain_listeners?graceful`; otherwise the sockets close now.
    pub fn drain(self: &Arc<Self>, graceful: bool, drain_time: std::time::Duration) {
        self.drain_conns.send_replace(true);
        if graceful && !drain_time.is_zero() {
            let me = self.clone();
            std::thread::spawn(move || {
                std::thread::sleep(drain_time);
                me.stop_accept.send_replace(true);
            });
        } else {
            self.stop_accept.send_replace(true);
        }
    }
}

fn socket(addr: SocketAddr, l: &Listener) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if l.socket.reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // Envoy binds IPv6 listeners v6-only unless ipv4_compat.
        s.set_only_v6(true)?;
    }
    if l.socket.freebind {
        s.set_freebind_v4(true)?;
    }
    for o in &l.socket.raw {
        if o.state == 0 {
            apply_raw(&s, o)?;
        }
    }
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(l.socket.backlog as i32)?;
    for o in &l.socket.raw {
        if o.state != 0 {
            apply_raw(&s, o)?;
        }
    }
    Ok(s)
}

fn apply_raw(s: &Socket, o: &xds_client::config::RawSocketOption) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let (level, name) = (o.level, o.name);
    let rc = match &o.value {
        RawSocketValue::Int(v) => {
            let v = *v as libc::c_int;
            setsockopt(fd, level, name, &v.to_ne_bytes())
        }
        RawSocketValue::Bytes(b) => setsockopt(fd, level, name, b),
    };
    rc.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("socket option level {level} name {name}: {e}"),
        )
    })
}

#[allow(unsafe_code)]
fn setsockopt(fd: i32, level: i32, name: i32, val: &[u8]) -> std::io::Result<()> {
    // SAFETY: `val` is a valid buffer of the given length for the call's duration.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds `workers` sockets for a listener (all on the same port).
pub fn bind(l: &Listener, workers: usize) -> std::io::Result<(SocketAddr, Vec<StdListener>)> {
    let first = socket(l.address, l)?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an inet socket"))?;
    let mut out: Vec<StdListener> = vec![first.into()];
    for _ in 1..workers {
        if l.socket.reuse_port {
            out.push(socket(bound, l)?.into());
        } else {
            out.push(out[0].try_clone()?);
        }
    }
    Ok((bound, out))
}

/// Accepts on one worker's socket until drained.
pub async fn accept_loop(lr: Arc<ListenerRuntime>, socket: StdListener, shared: Arc<Shared>) {
    let mut stop = lr.stop_accept.subscribe();
    let drain = lr.drain_conns.subscribe();
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %lr.config.name, error = %e, "cannot register listener");
            return;
        }
    };
    let scheme = "http";
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|d| *d) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        if let Some(max) = shared.max_connections {
            if shared.active_connections.load(Ordering::Relaxed) >= max {
                shared.server_stats.overflow.inc();
                lr.stats.global_cx_overflow.inc();
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(lr.bound);
        let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let ctx = Arc::new(ConnCtx {
            hcm: lr.hcm.clone(),
            shared: shared.clone(),
            peer,
            local,
            id,
            scheme,
            active_streams: std::sync::atomic::AtomicU32::new(0),
            idle_since_ms: std::sync::atomic::AtomicU64::new(0),
            opened: tokio::time::Instant::now(),
            proto_counted: std::sync::atomic::AtomicBool::new(false),
            requests: std::sync::atomic::AtomicU32::new(0),
            drain: drain.clone(),
        });
        let lr2 = lr.clone();
        let shared2 = shared.clone();
        let drain2 = drain.clone();
        shared.active_connections.fetch_add(1, Ordering::Relaxed);
        lr.stats.cx_total.inc();
        lr.stats.cx_active.inc();
        lr.hcm.stats.cx_total.inc();
        lr.hcm.stats.cx_active.inc();
        tokio::spawn(async move {
            let opened = tokio::time::Instant::now();
            crate::http::server::serve(stream, ctx, drain2).await;
            if !lr2.logs.is_empty() {
                let mut info = crate::http::info::StreamInfo::new(
                    opened,
                    "",
                    http::Method::GET,
                    String::new(),
                    String::new(),
                    "",
                    peer,
                    local,
                    id,
                );
                info.has_request = false;
                info.duration = Some(opened.elapsed());
                for l in &lr2.logs {
                    l.log(&info);
                }
            }
            lr2.stats.cx_active.dec();
            lr2.hcm.stats.cx_active.dec();
            shared2.active_connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
