//! CONNECT clients for the tunnel scenarios: HTTP/2 classic CONNECT over
//! h2c prior knowledge or any stream (the HBONE client's [`H2Conn`] and
//! [`H2Tunnel`], re-exported from [`crate::hbone`]), and HTTP/1.1
//! `CONNECT host:port` on a raw connection.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use crate::hbone::{describe, H2Conn, H2Tunnel, Opened};

/// An HTTP/1.1 CONNECT answered: the status line's code, the head as
/// text, and the connection (the tunnel after a 2xx).
pub struct H1Opened {
    pub status: u16,
    pub head: String,
    pub stream: TcpStream,
    /// Bytes read past the head (the tunnel's first bytes, or the body).
    pub rest: Vec<u8>,
}

impl H1Opened {
    /// A response header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `CONNECT authority HTTP/1.1` (with `Host: authority` and
/// `headers`) on a new connection to `addr` and reads the response head.
pub async fn h1_connect(
    addr: SocketAddr,
    authority: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<H1Opened> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let _ = s.set_nodelay(true);
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .context("no CONNECT response in 10 s")??;
        if n == 0 {
            return Err(anyhow!(
                "connection closed before a response head ({} bytes)",
                buf.len()
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head:?}"))?;
    Ok(H1Opened {
        status,
        head,
        stream: s,
        rest: buf[end..].to_vec(),
    })
}
