//! Test support for weir: echo upstreams, proxy process launchers (Envoy and
//! weir), raw HTTP clients, and the Envoy-vs-weir differential harness.
//!
//! The differential test lives in `tests/tests/differential.rs`; its inputs
//! are `tests/diff/configs/*.yaml` (bootstraps) and `tests/diff/cases/*.yaml`
//! (requests). See `tests/diff/ALLOWLIST.md`.
pub mod client;
pub mod config;
pub mod diff;
pub mod hbone;
pub mod hbone_server;
pub mod proc;
pub mod scenario;
pub mod tcp;
pub mod tls;
pub mod tmp;
pub mod tunnel;
pub mod upstream;
pub mod waypoint;
pub mod xds;

pub use proc::{EnvoyProc, ProxyProc, WeirProc};

/// A port that was free a moment ago on 127.0.0.1, for components that must
/// be told their port up front (a bootstrap). Racy by nature, so it is drawn
/// from below the kernel's ephemeral range (Linux default 32768-60999):
/// ports the kernel hands to `bind(:0)` listeners and to outgoing
/// connections never collide with it. Falls back to `bind(:0)`.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Start at a per-process offset so concurrent test binaries spread out.
    let base = (std::process::id().wrapping_mul(7919)) % SPAN;
    for _ in 0..200 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (base + n.wrapping_mul(37)) % SPAN;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Asserts that a condition becomes true, retrying with a short sleep
/// (linkerd's `assert_eventually!`). Blocking: from async code, prefer
/// checking inside `tokio::task::spawn_blocking` or keep the condition cheap.
///
/// ```
/// # use weir_tests::assert_eventually;
/// let start = std::time::Instant::now();
/// assert_eventually!(start.elapsed() > std::time::Duration::from_millis(20));
/// assert_eventually!(true, retries: 3, "never {}", "fails");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, retries: $retries:expr, $($arg:tt)+) => {{
        let delay = ::std::time::Duration::from_millis(20);
        let start = ::std::time::Instant::now();
        let mut i: u32 = 0;
        loop {
            if $cond {
                break;
            }
            if i >= $retries {
                panic!(
                    "assertion failed after {:?} ({} retries): {}",
                    start.elapsed(),
                    i,
                    format_args!($($arg)+)
                );
            }
            i += 1;
            ::std::thread::sleep(delay);
        }
    }};
    ($cond:expr, $($arg:tt)+) => {
        $crate::assert_eventually!($cond, retries: 150, $($arg)+)
    };
    ($cond:expr) => {
        $crate::assert_eventually!($cond, retries: 150, "{}", stringify!($cond))
    };
}
