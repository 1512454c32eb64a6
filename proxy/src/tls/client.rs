//! Upstream TLS origination for a cluster (`UpstreamTlsContext`).
use std::{net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{client::Resumption, ClientConfig};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};
use xds_client::config::{Secret, SecretRef, UpstreamTls};

use super::{
    load_certified_key, server::validator, server::Secrets, verify::ServerVerifier, versions,
    CertInfo, FileStamps,
};
use crate::metrics::SslStats;

/// ALPN weir offers when the context lists none, per upstream protocol
/// (as Envoy: the codec's protocol, or both for `auto_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlpnFallback {
    Http1 = 0,
    Http2 = 1,
    Auto = 2,
    /// tcp_proxy: no ALPN unless configured.
    None = 3,
}

struct Built {
    configs: [Arc<ClientConfig>; 4],
    cert: Option<CertInfo>,
    stamps: FileStamps,
}

/// A cluster's (or transport-socket match's) TLS client context.
pub struct ClientTls {
    pub config: Arc<UpstreamTls>,
    /// The secrets this context was last built with (SDS updates swap).
    secrets: ArcSwap<
        std::collections::BTreeMap<xds_client::config::Name, Arc<xds_client::config::Secret>>,
    >,
    built: ArcSwap<Built>,
    resumption: Resumption,
    pub stats: Arc<SslStats>,
    /// `auto_san_validation`: the certificate must match the SNI.
    auto_san: bool,
}

impl ClientTls {
    pub fn new(
        config: Arc<UpstreamTls>,
        secrets: Secrets,
        stats: Arc<SslStats>,
        auto_san: bool,
    ) -> Result<Arc<ClientTls>, String> {
        let resumption = if config.max_session_keys == 0 {
            Resumption::disabled()
        } else {
            Resumption::in_memory_sessions(config.max_session_keys as usize * 8)
        };
        let built = build(&config, &secrets, &resumption, &stats, auto_san)?;
        Ok(Arc::new(ClientTls {
            config,
            secrets: ArcSwap::new(secrets),
            built: ArcSwap::from_pointee(built),
            resumption,
            stats,
            auto_san,
        }))
    }

    /// Rebuilds the context with SDS secrets that changed, when it uses
    /// any of them (new connections use them; pooled ones keep theirs).
    pub fn update_secrets(&self, secrets: &Secrets, changed: &[xds_client::config::Name]) {
        if self.config.sds.iter().any(|r| changed.contains(&r.name)) {
            self.secrets.store(secrets.clone());
            self.rebuild();
        }
    }

    pub fn reload_if_changed(&self) {
        if self.built.load().stamps.changed() {
            self.rebuild();
        }
    }

    fn rebuild(&self) {
        match build(
            &self.config,
            &self.secrets.load_full(),
            &self.resumption,
            &self.stats,
            self.auto_san,
        ) {
            Ok(b) => {
                tracing::info!(context = %self.config.path, "upstream TLS certificates reloaded");
                self.built.store(Arc::new(b));
            }
            Err(e) => {
                tracing::warn!(context = %self.config.path, error = %e, "upstream TLS reload failed; keeping the previous context");
            }
        }
    }

    /// `auto_host_sni`: the SNI for a host, its hostname (`Endpoint.hostname`
    /// or the DNS name it was resolved from) when it has one. Callers use it
    /// after `auto_sni` (the request's host wins, as Envoy) and before the
    /// context's `sni` (which `connect_with` falls back to).
    pub fn host_sni(&self, hostname: &str) -> Option<Arc<str>> {
        (self.config.auto_host_sni && !hostname.is_empty()).then(|| hostname.into())
    }

    /// The client certificate, for `/certs`.
    pub fn cert_info(&self) -> Option<CertInfo> {
        self.built.load().cert.clone()
    }

    /// The certificates of a connection this context made (once per
    /// connection).
    pub fn upstream_info(&self, s: &TlsStream<TcpStream>) -> super::UpstreamTlsInfo {
        super::UpstreamTlsInfo {
            peer: s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(super::CertInfo::parse),
            local: self.cert_info(),
        }
    }

    /// Handshakes over `tcp`. Returns the stream and the negotiated ALPN.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        alpn: AlpnFallback,
        auto_sni: Option<&str>,
    ) -> Result<(TlsStream<TcpStream>, Option<Vec<u8>>), String> {
        self.connect_with(tcp, addr, alpn, auto_sni, None).await
    }

    /// [`ClientTls::connect`] offering `alpn_override` when given (filter
    /// state `envoy.network.application_protocols`), which wins over the
    /// context's `alpn_protocols` and the fallback, as Envoy's
    /// `ClientContextImpl::newSsl`.
    pub async fn connect_with(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        alpn: AlpnFallback,
        auto_sni: Option<&str>,
        alpn_override: Option<&[Vec<u8>]>,
    ) -> Result<(TlsStream<TcpStream>, Option<Vec<u8>>), String> {
        let mut cfg = self.built.load().configs[alpn as usize].clone();
        if let Some(list) = alpn_override {
            // Per new connection only: pooled connections are keyed by the
            // override, so this copy is made once per connection.
            let mut c = (*cfg).clone();
            c.alpn_protocols = list.to_vec();
            cfg = Arc::new(c);
        }
        // `auto_sni` (the request's host) wins over the context's `sni`; no
        // SNI at all: the IP address as server name makes rustls send none.
        let name = match auto_sni.or(self.config.sni.as_deref()) {
            Some(s) => ServerName::try_from(s.to_owned()).map_err(|e| e.to_string())?,
            None => super::ip_server_name(addr),
        };
        match TlsConnector::from(cfg).connect(name, tcp).await {
            Ok(s) => {
                self.stats.handshake.inc();
                let (_, conn) = s.get_ref();
                if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    self.stats.session_reused.inc();
                }
                let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                Ok((s, alpn))
            }
            Err(e) => {
                // As Envoy: verification failures have their own counters.
                if !super::is_refused_certificate(&e) {
                    self.stats.connection_error.inc();
                }
                Err(transport_failure(&e))
            }
        }
    }
}

/// Envoy-like `%UPSTREAM_TRANSPORT_FAILURE_REASON%` text for a failed
/// handshake.
fn transport_failure(e: &std::io::Error) -> String {
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .map(|r| match r {
            rustls::Error::InvalidCertificate(c) => {
                format!("TLS_error:|CERTIFICATE_VERIFY_FAILED:{c:?}:TLS_error_end")
            }
            rustls::Error::AlertReceived(a) => format!("TLS_error:|alert:{a:?}:TLS_error_end"),
            other => format!("TLS_error:|{other}:TLS_error_end"),
        });
    inner.unwrap_or_else(|| format!("TLS_error:|{e}:TLS_error_end"))
}

/// Presents the configured client certificate whenever asked.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn build(
    c: &UpstreamTls,
    secrets: &Secrets,
    resumption: &Resumption,
    stats: &Arc<SslStats>,
    auto_san: bool,
) -> Result<Built, String> {
    let provider = super::client_provider(&c.params);
    let schemes = super::signature_schemes(&c.params);
    let mut stamps = FileStamps::default();
    let validator = match &c.validation {
        Some(v) => Some(validator(
            v,
            secrets,
            provider.signature_verification_algorithms,
            &mut stamps,
            &c.path,
        )?),
        None => None,
    };
    let verifier = Arc::new(ServerVerifier {
        validator,
        algs: provider.signature_verification_algorithms,
        allowed: schemes.clone(),
        stats: Some(stats.clone()),
        auto_san,
        auto_sni_san: c.auto_sni_san_validation,
    });
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(&c.params))
        .map_err(|e| format!("{}.common_tls_context.tls_params: {e}", c.path))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cert = None;
    let mut cfg = match &c.cert {
        Some(r) => {
            let t = match r {
                SecretRef::Inline(t) => t.clone(),
                SecretRef::Sds(n) => match secrets.get(n).map(|s| &**s) {
                    Some(Secret::Certificate(t)) => t.clone(),
                    _ => return Err(format!("{}: secret {n:?} is not available", c.path)),
                },
            };
            let (ck, info) = load_certified_key(&t, &provider, &mut stamps)?;
            let ck = super::restrict_signing(ck, schemes.as_deref());
            cert = Some(info);
            builder.with_client_cert_resolver(Arc::new(ClientCert(ck)))
        }
        None => builder.with_no_client_auth(),
    };
    cfg.resumption = resumption.clone();
    let variant = |alpn: Vec<Vec<u8>>| {
        let mut v = cfg.clone();
        v.alpn_protocols = if c.alpn.is_empty() {
            alpn
        } else {
            c.alpn.clone()
        };
        Arc::new(v)
    };
    let configs = [
        variant(vec![b"http/1.1".to_vec()]),
        variant(vec![b"h2".to_vec()]),
        variant(vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
        variant(vec![]),
    ];
    Ok(Built {
        configs,
        cert,
        stamps,
    })
}
