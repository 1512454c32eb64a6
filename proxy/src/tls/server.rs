//! Downstream TLS termination for a filter chain.
//!
//! Each handshake reads the ClientHello first (tokio-rustls'
//! `LazyConfigAcceptor`) and picks the server config for it: when the client
//! offers ALPN and shares no protocol with `alpn_protocols`, the handshake
//! goes on without ALPN, as Envoy does (rustls alone would abort). The
//! certificate is chosen per ClientHello too: one whose SANs match the SNI
//! first, then the first one whose key type the client can verify (RSA vs
//! ECDSA). Session state (ticket keys, session cache) survives reloads so
//! resumption keeps working across certificate rotation.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions},
    sign::CertifiedKey,
    ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{server::TlsStream, LazyConfigAcceptor};
use xds_client::config::{DownstreamTls, Name, OcspStaplePolicy, Secret, SecretRef, ValidationRef};

use super::{
    load_certified_key, provider, verify::ClientVerifier, verify::Validator, versions, CertInfo,
    DownstreamTlsInfo, FileStamps,
};
use crate::{io::Rewind, metrics::SslStats};

pub type Secrets = Arc<BTreeMap<Name, Arc<Secret>>>;

struct Built {
    /// Server configs by [TLS 1.3 ClientHello][ALPN overlap][client asks
    /// for OCSP status]. The TLS 1.3 half takes the client's cipher suite
    /// order (see `accept`).
    configs: [[[Arc<ServerConfig>; 2]; 2]; 2],
    /// The certificate choice of those configs, by [client asks for OCSP
    /// status] (to know, per handshake, which of `certs` was presented).
    resolvers: [Arc<Resolver>; 2],
    /// The context allows TLS 1.3.
    tls13: bool,
    /// Stapling can change the choice: the ClientHello is read first to
    /// see whether the client asks for the certificate status.
    ocsp: bool,
    /// Parallel to the resolvers' keys.
    certs: Vec<CertInfo>,
    ca: Vec<CertInfo>,
    stamps: FileStamps,
}

/// A filter chain's TLS server context.
pub struct ServerTls {
    pub config: Arc<DownstreamTls>,
    /// The secrets this context was last built with (SDS updates swap).
    secrets: ArcSwap<BTreeMap<Name, Arc<Secret>>>,
    built: ArcSwap<Built>,
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
    stats: Arc<SslStats>,
}

/// One certificate of a context.
#[derive(Debug)]
struct Key {
    plain: Arc<CertifiedKey>,
    /// The same with its OCSP response (rustls staples it only for clients
    /// that ask).
    stapled: Option<Arc<CertifiedKey>>,
    names: Vec<String>,
    ocsp: Option<super::ocsp::OcspResponse>,
    /// The certificate has the must-staple extension: MUST_STAPLE for it.
    must_staple: bool,
}

/// Envoy's `OcspStapleAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StapleAction {
    Staple,
    NoStaple,
    Fail,
    ClientNotCapable,
}

#[derive(Debug)]
struct Resolver {
    keys: Arc<Vec<Key>>,
    policy: OcspStaplePolicy,
    /// This resolver serves ClientHellos with `status_request`.
    ocsp_capable: bool,
}

fn name_matches(sni: &str, names: &[String]) -> bool {
    names.iter().any(|n| super::verify::dns_matches(n, sni))
}

impl Resolver {
    /// Envoy's `ocspStapleAction` for one certificate.
    fn action(&self, k: &Key, now: i64) -> StapleAction {
        if !self.ocsp_capable {
            return StapleAction::ClientNotCapable;
        }
        let policy = if k.must_staple {
            OcspStaplePolicy::MustStaple
        } else {
            self.policy
        };
        let valid = k.ocsp.as_ref().is_some_and(|r| !r.is_expired(now));
        match policy {
            _ if valid => StapleAction::Staple,
            OcspStaplePolicy::Lenient => StapleAction::NoStaple,
            OcspStaplePolicy::Strict if k.ocsp.is_some() => StapleAction::Fail,
            OcspStaplePolicy::Strict => StapleAction::NoStaple,
            OcspStaplePolicy::MustStaple => StapleAction::Fail,
        }
    }

    /// The key for a ClientHello and its stapling: one whose names match
    /// the SNI, else the first the client can verify (skipping those whose
    /// OCSP policy fails, as Envoy), else the first, whatever its policy
    /// says (`Fail`: the handshake fails).
    fn pick(
        &self,
        sni: Option<&str>,
        schemes: &[SignatureScheme],
    ) -> Option<(usize, StapleAction)> {
        let now = super::tickets::unix_now() as i64;
        let ok = |k: &Key| {
            k.plain.key.choose_scheme(schemes).is_some()
                && self.action(k, now) != StapleAction::Fail
        };
        sni.and_then(|sni| {
            self.keys
                .iter()
                .position(|k| name_matches(sni, &k.names) && ok(k))
        })
        .or_else(|| self.keys.iter().position(ok))
        .or((!self.keys.is_empty()).then_some(0))
        .map(|i| (i, self.action(&self.keys[i], now)))
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (i, staple) = self.pick(hello.server_name(), hello.signature_schemes())?;
        let k = &self.keys[i];
        match staple {
            StapleAction::Fail => None,
            StapleAction::Staple => Some(k.stapled.clone().unwrap_or_else(|| k.plain.clone())),
            StapleAction::NoStaple | StapleAction::ClientNotCapable => Some(k.plain.clone()),
        }
    }
}

impl ServerTls {
    pub fn new(
        config: Arc<DownstreamTls>,
        secrets: Secrets,
        stats: Arc<SslStats>,
    ) -> Result<Arc<ServerTls>, String> {
        let cache_size = if config.session_cache { 4096 } else { 0 };
        let mut sessions: Arc<dyn StoresServerSessions> = if cache_size > 0 {
            rustls::server::ServerSessionMemoryCache::new(cache_size)
        } else {
            Arc::new(rustls::server::NoServerSessionStorage {})
        };
        let mut ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| format!("{}: cannot create a session ticketer: {e}", config.path))?;
        // `session_timeout`: tickets and cached sessions older than this
        // are not resumed.
        if let Some(t) = config.session_timeout {
            let secs = t.as_secs().clamp(1, u64::from(u32::MAX));
            ticketer = Arc::new(Expiring {
                inner: ticketer,
                secs,
            });
            sessions = Arc::new(Expiring {
                inner: sessions,
                secs,
            });
        }
        let mut me = ServerTls {
            config,
            secrets: ArcSwap::new(secrets),
            built: ArcSwap::from_pointee(Built {
                configs: std::array::from_fn(|_| {
                    std::array::from_fn(|_| std::array::from_fn(|_| Arc::new(placeholder())))
                }),
                resolvers: std::array::from_fn(|_| Arc::new(Resolver::empty())),
                tls13: false,
                ocsp: false,
                certs: vec![],
                ca: vec![],
                stamps: FileStamps::default(),
            }),
            sessions,
            ticketer,
            stats,
        };
        let built = me.build()?;
        me.built = ArcSwap::from_pointee(built);
        Ok(Arc::new(me))
    }

    fn build(&self) -> Result<Built, String> {
        let c = &self.config;
        let provider = provider(&c.params);
        let schemes = super::signature_schemes(&c.params);
        let mut stamps = FileStamps::default();
        let mut keys = Vec::new();
        let mut certs = Vec::new();
        for r in &c.certs {
            let t = match r {
                SecretRef::Inline(t) => t.clone(),
                SecretRef::Sds(n) => match self.secrets.load().get(n).map(|s| &**s) {
                    Some(Secret::Certificate(t)) => t.clone(),
                    _ => return Err(format!("{}: secret {n:?} is not available", c.path)),
                },
            };
            let (ck, info) = load_certified_key(&t, &provider, &mut stamps)?;
            let ck = super::restrict_signing(ck, schemes.as_deref());
            let mut names = info.dns_sans.clone();
            if names.is_empty() {
                // No DNS SAN: the subject CN names the host.
                if let Some(cn) = info.subject.split(',').find_map(|p| p.strip_prefix("CN=")) {
                    names.push(cn.to_owned());
                }
            }
            let (ocsp, stapled, must_staple) =
                ocsp_staple(&t, &ck, c.ocsp_staple_policy, &mut stamps)?;
            keys.push(Key {
                plain: ck,
                stapled,
                names,
                ocsp,
                must_staple,
            });
            certs.push(info);
        }
        let ocsp = c.ocsp_staple_policy != OcspStaplePolicy::Lenient
            || keys.iter().any(|k| k.ocsp.is_some() || k.must_staple);
        let algs = provider.signature_verification_algorithms;
        let validator = match &c.validation {
            None => None,
            Some(v) => Some(self.validator(v, algs, &mut stamps)?),
        };
        let ca = match &c.validation {
            Some(v) => self.ca_infos(v),
            None => vec![],
        };
        let verifier = Arc::new(ClientVerifier {
            validator,
            mandatory: c.require_client_cert,
            algs,
            allowed: schemes.clone(),
            stats: Some(self.stats.clone()),
        });
        let keys = Arc::new(keys);
        let resolvers = [false, true].map(|ocsp_capable| {
            Arc::new(Resolver {
                keys: keys.clone(),
                policy: c.ocsp_staple_policy,
                ocsp_capable,
            })
        });
        let mut cfg = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions(&c.params))
            .map_err(|e| format!("{}.common_tls_context.tls_params: {e}", c.path))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolvers[0].clone());
        cfg.session_storage = self.sessions.clone();
        if let Some(keys) = &c.ticket_keys {
            // Configured keys: tickets open on every context with the same
            // keys and session context (other chains, other instances).
            let keys = match keys {
                SecretRef::Inline(k) => k.clone(),
                SecretRef::Sds(n) => match self.secrets.load().get(n).map(|s| &**s) {
                    Some(Secret::SessionTicketKeys(k)) => k.clone(),
                    _ => {
                        return Err(format!(
                            "{}: session ticket keys secret {n:?} is not available",
                            c.path
                        ))
                    }
                },
            };
            let lifetime = c
                .session_timeout
                .map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX))
                .unwrap_or(super::tickets::DEFAULT_LIFETIME_SECS);
            let context = session_context(c, &certs, &ca, &self.secrets.load_full());
            cfg.ticketer = Arc::new(super::tickets::KeyTicketer::new(&keys, context, lifetime));
            cfg.send_tls13_tickets = 2;
        } else if c.session_tickets {
            cfg.ticketer = self.ticketer.clone();
            cfg.send_tls13_tickets = 2;
        } else {
            cfg.send_tls13_tickets = 0;
        }
        // `prefer_client_ciphers` is the TLS 1.2 choice; for TLS 1.3 the
        // client's order wins, as BoringSSL (Envoy) on a CPU with AES
        // instructions: a client that prefers AES-128-GCM (Go, BoringSSL,
        // Envoy as a client) gets it, not our AES-256-GCM.
        let variant = |tls13: bool, alpn: bool, ocsp_capable: bool| {
            let mut v = cfg.clone();
            v.ignore_client_order = !c.prefer_client_ciphers && !tls13;
            if alpn {
                v.alpn_protocols = c.alpn.clone();
            }
            v.cert_resolver = resolvers[usize::from(ocsp_capable)].clone();
            Arc::new(v)
        };
        let half = |tls13: bool| {
            [
                [variant(tls13, false, false), variant(tls13, false, true)],
                [variant(tls13, true, false), variant(tls13, true, true)],
            ]
        };
        Ok(Built {
            configs: [half(false), half(true)],
            tls13: c.params.max_version >= xds_client::config::TlsVersion::V1_3,
            resolvers,
            ocsp,
            certs,
            ca,
            stamps,
        })
    }

    fn validator(
        &self,
        v: &ValidationRef,
        algs: rustls::crypto::WebPkiSupportedAlgorithms,
        stamps: &mut FileStamps,
    ) -> Result<Validator, String> {
        validator(
            v,
            &self.secrets.load_full(),
            algs,
            stamps,
            &self.config.path,
        )
    }

    fn ca_infos(&self, v: &ValidationRef) -> Vec<CertInfo> {
        ca_infos(v, &self.secrets.load_full())
    }

    /// Rebuilds the context with SDS secrets that changed, when it uses
    /// any of them. New handshakes use the new certificates; established
    /// connections keep theirs.
    pub fn update_secrets(&self, secrets: &Secrets, changed: &[Name]) {
        if self.config.sds.iter().any(|r| changed.contains(&r.name)) {
            self.secrets.store(secrets.clone());
            self.rebuild();
        }
    }

    /// Rebuilds the context when a certificate, key, CA or CRL file
    /// changed. New handshakes use the new context; established
    /// connections keep theirs.
    pub fn reload_if_changed(&self) {
        if self.built.load().stamps.changed() {
            self.rebuild();
        }
    }

    fn rebuild(&self) {
        match self.build() {
            Ok(b) => {
                tracing::info!(context = %self.config.path, "TLS certificates reloaded");
                self.built.store(Arc::new(b));
            }
            Err(e) => {
                tracing::warn!(context = %self.config.path, error = %e, "TLS reload failed; keeping the previous certificates");
            }
        }
    }

    /// Our certificates and CAs, for `/certs`.
    pub fn cert_infos(&self) -> (Vec<CertInfo>, Vec<CertInfo>) {
        let b = self.built.load();
        (b.certs.clone(), b.ca.clone())
    }

    /// Runs the handshake on `io`.
    pub async fn accept<T>(
        &self,
        io: Rewind<T>,
        timeout: Option<Duration>,
    ) -> Result<(TlsStream<Rewind<T>>, DownstreamTlsInfo), String>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let hs = async {
            let built = self.built.load_full();
            let (io, ocsp_capable) = if built.ocsp {
                asks_certificate_status(io).await?
            } else {
                (io, false)
            };
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
            let hello = start.client_hello();
            let alpn = &built.configs[0][1][0].alpn_protocols;
            let overlap = match hello.alpn() {
                Some(mut offered) => {
                    alpn.is_empty() || offered.any(|p| alpn.iter().any(|a| a == p))
                }
                None => true,
            };
            // A client offering a TLS 1.3 suite negotiates TLS 1.3 when the
            // context allows it (clients list TLS 1.3 suites only when they
            // offer TLS 1.3).
            let tls13 = built.tls13
                && hello
                    .cipher_suites()
                    .iter()
                    .any(|s| u16::from(*s) >> 8 == 0x13);
            let half = &built.configs[usize::from(tls13)];
            let cfg = half[usize::from(overlap)][usize::from(ocsp_capable)].clone();
            // The certificate this handshake presents (the resolver makes
            // the same choice), for %DOWNSTREAM_LOCAL_*% and XFCC `By=`.
            let picked = built.resolvers[usize::from(ocsp_capable)]
                .pick(hello.server_name(), hello.signature_schemes());
            if built.ocsp {
                // As Envoy's certificate selector.
                if ocsp_capable {
                    self.stats.ocsp_staple_requests.inc();
                }
                match picked.map(|(_, s)| s) {
                    Some(StapleAction::Staple) => self.stats.ocsp_staple_responses.inc(),
                    Some(StapleAction::NoStaple) => self.stats.ocsp_staple_omitted.inc(),
                    Some(StapleAction::Fail) => self.stats.ocsp_staple_failed.inc(),
                    Some(StapleAction::ClientNotCapable) | None => {}
                }
            }
            let local = picked.and_then(|(i, _)| built.certs.get(i).cloned());
            start.into_stream(cfg).await.map(|s| (s, local))
        };
        let res = match timeout {
            Some(t) => tokio::time::timeout(t, hs).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timeout",
                ))
            }),
            None => hs.await,
        };
        let (stream, local) = match res {
            Ok(x) => x,
            Err(e) => {
                // As Envoy: a refused certificate is counted by the
                // verifier (`ssl.fail_verify_*`), a missing required one as
                // `ssl.fail_verify_no_cert`, neither as a connection error.
                if super::is_missing_certificate(&e) {
                    self.stats.fail_verify_no_cert.inc();
                } else if !super::is_refused_certificate(&e) {
                    self.stats.connection_error.inc();
                }
                return Err(e.to_string());
            }
        };
        self.stats.handshake.inc();
        let (_, conn) = stream.get_ref();
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        if resumed {
            self.stats.session_reused.inc();
        }
        let peer_der = conn.peer_certificates().and_then(|c| c.first());
        // As Envoy: successful handshakes without a client certificate.
        if peer_der.is_none() {
            self.stats.no_certificate.inc();
        }
        let info = DownstreamTlsInfo {
            sni: conn.server_name().map(str::to_owned),
            version: super::version_name(conn.protocol_version()),
            cipher: super::cipher_name(conn.negotiated_cipher_suite()),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            resumed,
            peer: peer_der.and_then(CertInfo::parse),
            peer_pem: peer_der.map(|d| super::to_pem(d.as_ref())),
            local,
        };
        Ok((stream, info))
    }
}

/// Reads the ClientHello (and puts it back) to learn whether the client
/// asks for the certificate status (`status_request`). Anything that is not
/// a well-formed hello is left to rustls to refuse.
async fn asks_certificate_status<T: AsyncRead + Unpin>(
    io: Rewind<T>,
) -> std::io::Result<(Rewind<T>, bool)> {
    use filters::listener::{
        tls_inspector::{inspect, TlsDetect, MAX_CLIENT_HELLO},
        Inspect,
    };
    use tokio::io::AsyncReadExt;
    let (mut buf, mut inner) = io.into_parts();
    let asks = loop {
        match inspect(&buf) {
            Inspect::Done(TlsDetect::Tls(h)) => break h.status_request,
            Inspect::Done(_) => break false,
            Inspect::NeedMore if buf.len() >= MAX_CLIENT_HELLO => break false,
            Inspect::NeedMore => {}
        }
        if inner.read_buf(&mut buf).await? == 0 {
            break false;
        }
    };
    Ok((Rewind::new(buf, inner), asks))
}

/// A certificate's OCSP response (`ocsp_staple`) checked as Envoy does at
/// load: it parses, is for this certificate, and is present when the policy
/// or the certificate (must-staple extension) requires one. Returns the
/// response, the stapled identity and whether the certificate is must-staple.
#[allow(clippy::type_complexity)]
fn ocsp_staple(
    t: &xds_client::config::TlsCertificate,
    ck: &Arc<CertifiedKey>,
    policy: OcspStaplePolicy,
    stamps: &mut FileStamps,
) -> Result<
    (
        Option<super::ocsp::OcspResponse>,
        Option<Arc<CertifiedKey>>,
        bool,
    ),
    String,
> {
    let leaf = ck.cert.first().map(|c| c.as_ref()).unwrap_or_default();
    let must_staple = super::ocsp::is_must_staple(leaf);
    let Some(d) = &t.ocsp_staple else {
        if must_staple {
            return Err(format!(
                "{}: OCSP response is required for must-staple certificate",
                t.path
            ));
        }
        if policy == OcspStaplePolicy::MustStaple {
            return Err(format!(
                "{}: Required OCSP response is missing from TLS context",
                t.path
            ));
        }
        return Ok((None, None, false));
    };
    stamps.add(d);
    let der = super::read(d).map_err(|e| format!("{}.ocsp_staple: {e}", t.path))?;
    let resp = super::ocsp::parse(&der).map_err(|e| format!("{}.ocsp_staple: {e}", t.path))?;
    let serial = super::ocsp::cert_serial(leaf).unwrap_or_default();
    if !resp.matches_serial(&serial) {
        return Err(format!(
            "{}.ocsp_staple: OCSP response does not match its TLS certificate",
            t.path
        ));
    }
    let mut stapled = (**ck).clone();
    stapled.ocsp = Some(der.to_vec());
    Ok((Some(resp), Some(Arc::new(stapled)), must_staple))
}

/// Session state that expires after `session_timeout`: an 8-byte creation
/// time is prepended to each ticket and cached session.
#[derive(Debug)]
struct Expiring<T: ?Sized> {
    inner: Arc<T>,
    secs: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl<T: ?Sized> Expiring<T> {
    fn stamp(&self, v: Vec<u8>) -> Vec<u8> {
        let mut out = unix_now().to_be_bytes().to_vec();
        out.extend_from_slice(&v);
        out
    }
    fn check(&self, v: &[u8]) -> Option<Vec<u8>> {
        let (ts, rest) = v.split_at_checked(8)?;
        let ts = u64::from_be_bytes(ts.try_into().ok()?);
        (unix_now().saturating_sub(ts) <= self.secs).then(|| rest.to_vec())
    }
}

impl ProducesTickets for Expiring<dyn ProducesTickets> {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }
    fn lifetime(&self) -> u32 {
        self.inner
            .lifetime()
            .min(u32::try_from(self.secs).unwrap_or(u32::MAX))
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(plain).map(|c| self.stamp(c))
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.check(cipher).and_then(|c| self.inner.decrypt(&c))
    }
}

impl StoresServerSessions for Expiring<dyn StoresServerSessions> {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, self.stamp(value))
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(key).and_then(|v| self.check(&v))
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.take(key).and_then(|v| self.check(&v))
    }
    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// The session context of a TLS context, as Envoy's session id context:
/// the certificates' subject CN, DNS/URI/IP SANs and issuer, the trusted
/// CAs and the rest of the validation settings, and the filter chain's
/// server names. Tickets sealed with shared keys open only where this is
/// the same, so a session never resumes into a context that would not have
/// accepted the original handshake (another CA, other names).
fn session_context(
    c: &DownstreamTls,
    certs: &[CertInfo],
    ca: &[CertInfo],
    secrets: &Secrets,
) -> [u8; 32] {
    let mut d = ring::digest::Context::new(&ring::digest::SHA256);
    let mut put = |b: &[u8]| {
        d.update(&(b.len() as u64).to_be_bytes());
        d.update(b);
    };
    for info in certs {
        if let Some(cn) = info.subject.split(',').find_map(|p| p.strip_prefix("CN=")) {
            put(cn.as_bytes());
        }
        for san in info
            .dns_sans
            .iter()
            .chain(&info.uri_sans)
            .chain(&info.ip_sans)
        {
            put(san.as_bytes());
        }
        put(info.issuer.as_bytes());
    }
    put(b"--");
    for info in ca {
        put(&info.sha256);
    }
    // The validation settings without their field paths (the same context
    // on two listeners has two paths).
    let sds = |n: &Name| match secrets.get(n).map(|s| &**s) {
        Some(Secret::Validation(v)) => Some(v),
        _ => None,
    };
    let contexts: Vec<&xds_client::config::CertValidation> = match &c.validation {
        None => vec![],
        Some(ValidationRef::Inline(v)) => vec![v],
        Some(ValidationRef::Sds(n)) => sds(n).into_iter().collect(),
        Some(ValidationRef::Combined { default, sds: n }) => {
            std::iter::once(default).chain(sds(n)).collect()
        }
    };
    for v in contexts {
        put(format!(
            "{:?}/{:?}/{:?}/{}/{}/{}/{:?}/{}",
            v.san_matchers,
            v.spki_hashes,
            v.cert_hashes,
            v.allow_expired,
            v.accept_untrusted,
            v.only_verify_leaf_cert_crl,
            v.max_verify_depth,
            v.crl.is_some(),
        )
        .as_bytes());
    }
    put(&[u8::from(c.require_client_cert)]);
    put(b"--");
    for n in &c.chain_server_names {
        put(n.as_bytes());
    }
    let out = d.finish();
    let mut id = [0u8; 32];
    id.copy_from_slice(out.as_ref());
    id
}

/// Builds the validator a validation reference names.
pub fn validator(
    v: &ValidationRef,
    secrets: &Secrets,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
    stamps: &mut FileStamps,
    path: &str,
) -> Result<Validator, String> {
    let sds = |n: &Name| match secrets.get(n).map(|s| &**s) {
        Some(Secret::Validation(v)) => Ok(v.clone()),
        _ => Err(format!("{path}: validation secret {n:?} is not available")),
    };
    match v {
        ValidationRef::Inline(v) => Validator::build(v, None, algs, stamps),
        ValidationRef::Sds(n) => Validator::build(&sds(n)?, None, algs, stamps),
        ValidationRef::Combined { default, sds: n } => {
            Validator::build(default, Some(&sds(n)?), algs, stamps)
        }
    }
}

fn ca_infos(v: &ValidationRef, secrets: &Secrets) -> Vec<CertInfo> {
    let ctx = match v {
        ValidationRef::Inline(v) => Some(v.clone()),
        ValidationRef::Sds(n) | ValidationRef::Combined { sds: n, .. } => {
            match secrets.get(n).map(|s| &**s) {
                Some(Secret::Validation(v)) => Some(v.clone()),
                _ => None,
            }
        }
    };
    ctx.and_then(|v| v.trusted_ca)
        .and_then(|ca| super::read(&ca).ok())
        .and_then(|pem| super::parse_certs(&pem).ok())
        .map(|certs| certs.iter().filter_map(CertInfo::parse).collect())
        .unwrap_or_default()
}

impl Resolver {
    fn empty() -> Resolver {
        Resolver {
            keys: Arc::default(),
            policy: OcspStaplePolicy::Lenient,
            ocsp_capable: false,
        }
    }
}

/// A config that is never used for a handshake (replaced before `new`
/// returns).
fn placeholder() -> ServerConfig {
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver::empty()))
}
