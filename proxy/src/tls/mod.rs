//! TLS with rustls (ring provider): server contexts for filter chains,
//! client contexts for clusters, certificate validation as Envoy's
//! `CertificateValidationContext`, peer identity, and certificate rotation.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::SystemTime,
};

use rustls::{
    crypto::{ring as rp, CryptoProvider},
    sign::{CertifiedKey, Signer, SigningKey},
    SignatureScheme, SupportedCipherSuite, SupportedProtocolVersion,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use xds_client::config::{CertData, CipherSuite, Curve, TlsCertificate, TlsParams, TlsVersion};

pub mod client;
pub mod ocsp;
pub mod server;
pub mod tickets;
pub mod verify;

pub use client::ClientTls;
pub use server::ServerTls;

/// Largest certificate, key or CRL file weir reads.
const MAX_PEM: u64 = 1 << 20;

/// Reads PEM bytes from a data source.
pub fn read(d: &CertData) -> Result<Arc<[u8]>, String> {
    match d {
        CertData::Inline(b) => Ok(b.clone()),
        CertData::File(p) => {
            use std::io::Read;
            let mut out = Vec::new();
            std::fs::File::open(p)
                .and_then(|f| f.take(MAX_PEM + 1).read_to_end(&mut out))
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            if out.len() as u64 > MAX_PEM {
                return Err(format!("{} is larger than {MAX_PEM} bytes", p.display()));
            }
            Ok(out.into())
        }
    }
}

/// The files a context reads (watched for rotation) with their mtimes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileStamps(pub Vec<(PathBuf, Option<SystemTime>)>);

impl FileStamps {
    pub fn add(&mut self, d: &CertData) {
        if let CertData::File(p) = d {
            let m = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            self.0.push((p.clone(), m));
        }
    }
    /// Whether any file changed since these stamps were taken.
    pub fn changed(&self) -> bool {
        self.0.iter().any(|(p, m)| {
            let now = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            now != *m
        })
    }
}

/// Parses every certificate in a PEM bundle.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// Loads a certificate chain and its key into a signing identity.
pub fn load_certified_key(
    t: &TlsCertificate,
    provider: &CryptoProvider,
    stamps: &mut FileStamps,
) -> Result<(Arc<CertifiedKey>, CertInfo), String> {
    stamps.add(&t.chain);
    stamps.add(&t.key);
    let chain = read(&t.chain).map_err(|e| format!("{}.certificate_chain: {e}", t.path))?;
    let key = read(&t.key).map_err(|e| format!("{}.private_key: {e}", t.path))?;
    let certs = parse_certs(&chain).map_err(|e| format!("{}.certificate_chain: {e}", t.path))?;
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| format!("{}.private_key: invalid PEM private key: {e}", t.path))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}.private_key: unsupported private key: {e}", t.path))?;
    let info = CertInfo::parse(&certs[0])
        .ok_or_else(|| format!("{}.certificate_chain: cannot parse the certificate", t.path))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "{}: the private key does not match the certificate: {e}",
            t.path
        )
    })?;
    Ok((Arc::new(ck), info))
}

/// `signature_algorithms` as rustls schemes, in preference order (`None`:
/// not configured, rustls' defaults).
pub fn signature_schemes(params: &TlsParams) -> Option<Vec<SignatureScheme>> {
    use xds_client::config::SignatureAlgorithm as A;
    (!params.signature_algorithms.is_empty()).then(|| {
        params
            .signature_algorithms
            .iter()
            .map(|a| match a {
                A::RsaPkcs1Sha256 => SignatureScheme::RSA_PKCS1_SHA256,
                A::RsaPkcs1Sha384 => SignatureScheme::RSA_PKCS1_SHA384,
                A::RsaPkcs1Sha512 => SignatureScheme::RSA_PKCS1_SHA512,
                A::EcdsaSecp256r1Sha256 => SignatureScheme::ECDSA_NISTP256_SHA256,
                A::EcdsaSecp384r1Sha384 => SignatureScheme::ECDSA_NISTP384_SHA384,
                A::RsaPssRsaeSha256 => SignatureScheme::RSA_PSS_SHA256,
                A::RsaPssRsaeSha384 => SignatureScheme::RSA_PSS_SHA384,
                A::RsaPssRsaeSha512 => SignatureScheme::RSA_PSS_SHA512,
                A::Ed25519 => SignatureScheme::ED25519,
            })
            .collect()
    })
}

/// A signing key that signs only with the configured schemes, in their
/// order (BoringSSL's signing preferences: the first configured scheme the
/// peer offered and the key can do). None in common: the handshake fails.
#[derive(Debug)]
struct RestrictedKey {
    inner: Arc<dyn SigningKey>,
    allowed: Vec<SignatureScheme>,
}

impl SigningKey for RestrictedKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        self.allowed
            .iter()
            .filter(|s| offered.contains(s))
            .find_map(|s| self.inner.choose_scheme(&[*s]))
    }
    fn public_key(&self) -> Option<rustls_pki_types::SubjectPublicKeyInfoDer<'_>> {
        self.inner.public_key()
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.inner.algorithm()
    }
}

/// Restricts a loaded identity's signatures to `allowed` (when configured).
pub fn restrict_signing(
    ck: Arc<CertifiedKey>,
    allowed: Option<&[SignatureScheme]>,
) -> Arc<CertifiedKey> {
    match allowed {
        None => ck,
        Some(a) => {
            let mut out = CertifiedKey::new(
                ck.cert.clone(),
                Arc::new(RestrictedKey {
                    inner: ck.key.clone(),
                    allowed: a.to_vec(),
                }),
            );
            out.ocsp = ck.ocsp.clone();
            Arc::new(out)
        }
    }
}

/// The provider for upstream TLS: as [`provider`], with the suites in the
/// order Envoy (BoringSSL) offers them as a client on a CPU with AES
/// instructions: TLS 1.3 AES-128-GCM, AES-256-GCM, ChaCha20; TLS 1.2 by
/// default ECDSA then RSA with AES-128-GCM and ChaCha20 before AES-256-GCM
/// (configured `cipher_suites` keep their configured order). rustls alone
/// offers AES-256-GCM first.
pub fn client_provider(params: &TlsParams) -> Arc<CryptoProvider> {
    use rustls::CipherSuite as C;
    let mut p = Arc::unwrap_or_clone(provider(params));
    let configured = !params.cipher_suites.is_empty();
    // rustls offers every suite of the provider, whatever the versions:
    // as BoringSSL, only those of the enabled versions.
    p.cipher_suites.retain(|s| match s {
        SupportedCipherSuite::Tls13(_) => params.max_version >= TlsVersion::V1_3,
        SupportedCipherSuite::Tls12(_) => params.min_version <= TlsVersion::V1_2,
    });
    p.cipher_suites.sort_by_key(|s| match s {
        SupportedCipherSuite::Tls13(t) => match t.common.suite {
            C::TLS13_AES_128_GCM_SHA256 => 0,
            C::TLS13_AES_256_GCM_SHA384 => 1,
            _ => 2,
        },
        // A stable sort: configured TLS 1.2 suites keep their order.
        SupportedCipherSuite::Tls12(_) if configured => 3,
        SupportedCipherSuite::Tls12(t) => match t.common.suite {
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 3,
            C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => 4,
            C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 5,
            C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 6,
            C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => 7,
            _ => 8,
        },
    });
    Arc::new(p)
}

/// A crypto provider restricted to the configured suites and groups.
pub fn provider(params: &TlsParams) -> Arc<CryptoProvider> {
    let mut p = rp::default_provider();
    if !params.cipher_suites.is_empty() {
        let mut suites: Vec<SupportedCipherSuite> = p
            .cipher_suites
            .iter()
            .copied()
            .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_)))
            .collect();
        use rp::cipher_suite as cs;
        for c in &params.cipher_suites {
            suites.push(match c {
                CipherSuite::EcdheEcdsaAes128GcmSha256 => {
                    cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                }
                CipherSuite::EcdheEcdsaAes256GcmSha384 => {
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                }
                CipherSuite::EcdheEcdsaChacha20Poly1305 => {
                    cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                }
                CipherSuite::EcdheRsaAes128GcmSha256 => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::EcdheRsaAes256GcmSha384 => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                CipherSuite::EcdheRsaChacha20Poly1305 => {
                    cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
                }
            });
        }
        p.cipher_suites = suites;
    }
    if !params.curves.is_empty() {
        p.kx_groups = params
            .curves
            .iter()
            .map(|c| match c {
                Curve::X25519 => rp::kx_group::X25519,
                Curve::P256 => rp::kx_group::SECP256R1,
                Curve::P384 => rp::kx_group::SECP384R1,
            })
            .collect();
    }
    Arc::new(p)
}

/// The protocol versions allowed by `params` (never below TLS 1.2).
pub fn versions(params: &TlsParams) -> Vec<&'static SupportedProtocolVersion> {
    let mut v = Vec::new();
    if params.min_version <= TlsVersion::V1_2 && params.max_version >= TlsVersion::V1_2 {
        v.push(&rustls::version::TLS12);
    }
    if params.max_version >= TlsVersion::V1_3 {
        v.push(&rustls::version::TLS13);
    }
    v
}

/// Whether a failed handshake is a certificate the validation context
/// refused (already counted as `ssl.fail_verify_*` by the verifier).
pub fn is_refused_certificate(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_))
    )
}

/// A handshake that failed because the client sent no certificate while one
/// is required.
pub fn is_missing_certificate(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::NoCertificatesPresented)
    )
}

/// What weir knows about one certificate (its own or a peer's).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CertInfo {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub email_sans: Vec<String>,
    pub ip_sans: Vec<String>,
    /// RFC 2253 form, as Envoy prints it (`CN=foo,O=bar`).
    pub subject: String,
    pub issuer: String,
    /// Lower-case hex serial number.
    pub serial: String,
    /// SHA-256 of the DER certificate.
    pub sha256: [u8; 32],
    /// SHA-256 of the SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
    pub not_before: i64,
    pub not_after: i64,
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Option<CertInfo> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
        let mut info = CertInfo {
            subject: rfc2253(cert.subject()),
            issuer: rfc2253(cert.issuer()),
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            sha256: sha256(der.as_ref()),
            spki_sha256: sha256(cert.public_key().raw),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            ..Default::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::URI(u) => info.uri_sans.push((*u).to_owned()),
                    GeneralName::DNSName(d) => info.dns_sans.push((*d).to_owned()),
                    GeneralName::RFC822Name(e) => info.email_sans.push((*e).to_owned()),
                    GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            info.ip_sans.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        Some(info)
    }

    /// Lower-case hex of the certificate's SHA-256.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    use x509_parser::der_parser::oid;
    let mut parts = Vec::new();
    for rdn in name.iter() {
        let mut attrs = Vec::new();
        for a in rdn.iter() {
            let oid = a.attr_type();
            let key = if *oid == oid!(2.5.4 .3) {
                "CN".to_owned()
            } else if *oid == oid!(2.5.4 .6) {
                "C".to_owned()
            } else if *oid == oid!(2.5.4 .7) {
                "L".to_owned()
            } else if *oid == oid!(2.5.4 .8) {
                "ST".to_owned()
            } else if *oid == oid!(2.5.4 .10) {
                "O".to_owned()
            } else if *oid == oid!(2.5.4 .11) {
                "OU".to_owned()
            } else if *oid == oid!(1.2.840 .113549 .1 .9 .1) {
                "emailAddress".to_owned()
            } else {
                oid.to_id_string()
            };
            let value = a.as_str().map(str::to_owned).unwrap_or_default();
            let mut escaped = String::with_capacity(value.len());
            for (i, c) in value.chars().enumerate() {
                if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
                    || (i == 0 && (c == '#' || c == ' '))
                {
                    escaped.push('\\');
                }
                escaped.push(c);
            }
            attrs.push(format!("{key}={escaped}"));
        }
        parts.push(attrs.join("+"));
    }
    // RFC 2253 lists the most specific RDN first.
    parts.reverse();
    parts.join(",")
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The TLS facts of one downstream connection, for routing, headers, XFCC
/// and access logs.
#[derive(Debug, Clone, Default)]
pub struct DownstreamTlsInfo {
    pub sni: Option<String>,
    pub version: &'static str,
    pub cipher: String,
    pub alpn: Option<Vec<u8>>,
    pub resumed: bool,
    /// The validated peer certificate.
    pub peer: Option<CertInfo>,
    /// PEM of the peer leaf (XFCC `Cert`).
    pub peer_pem: Option<String>,
    /// Our own certificate's identity (for %DOWNSTREAM_LOCAL_URI_SAN%).
    pub local: Option<CertInfo>,
}

/// The certificates of an upstream TLS connection, made once per
/// connection and shared by reference with the streams it carries:
/// `%UPSTREAM_PEER_*%` / `%UPSTREAM_LOCAL_*%` and the principals of
/// Istio's `source` reporter.
#[derive(Debug, Default)]
pub struct UpstreamTlsInfo {
    /// The upstream's leaf certificate.
    pub peer: Option<CertInfo>,
    /// The certificate we presented (the cluster's), if any.
    pub local: Option<CertInfo>,
}

impl UpstreamTlsInfo {
    /// The peer's first URI SAN.
    pub fn peer_uri_san(&self) -> Option<&str> {
        self.peer.as_ref()?.uri_sans.first().map(String::as_str)
    }
    /// Our first URI SAN.
    pub fn local_uri_san(&self) -> Option<&str> {
        self.local.as_ref()?.uri_sans.first().map(String::as_str)
    }
}

pub fn version_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        _ => "",
    }
}

/// OpenSSL-style cipher name of a negotiated suite.
pub fn cipher_name(s: Option<SupportedCipherSuite>) -> String {
    use rustls::CipherSuite as C;
    let Some(s) = s else {
        return String::new();
    };
    match s.suite() {
        C::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        C::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        C::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => return format!("{other:?}"),
    }
    .to_owned()
}

/// PEM text of a DER certificate.
pub fn to_pem(der: &[u8]) -> String {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(ALPHA[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Every live TLS context, for `/certs` and the rotation watcher.
#[derive(Default)]
pub struct Registry {
    servers: Mutex<Vec<Weak<ServerTls>>>,
    clients: Mutex<Vec<Weak<ClientTls>>>,
}

impl Registry {
    pub fn add_server(&self, s: &Arc<ServerTls>) {
        self.servers
            .lock()
            .expect("tls registry")
            .push(Arc::downgrade(s));
    }
    pub fn add_client(&self, c: &Arc<ClientTls>) {
        self.clients
            .lock()
            .expect("tls registry")
            .push(Arc::downgrade(c));
    }
    pub fn servers(&self) -> Vec<Arc<ServerTls>> {
        let mut v = self.servers.lock().expect("tls registry");
        v.retain(|w| w.strong_count() > 0);
        v.iter().filter_map(Weak::upgrade).collect()
    }
    pub fn clients(&self) -> Vec<Arc<ClientTls>> {
        let mut v = self.clients.lock().expect("tls registry");
        v.retain(|w| w.strong_count() > 0);
        v.iter().filter_map(Weak::upgrade).collect()
    }
    /// SDS secrets changed: contexts that use them rebuild.
    pub fn secrets_changed(&self, secrets: &server::Secrets, changed: &[xds_client::config::Name]) {
        for s in self.servers() {
            s.update_secrets(secrets, changed);
        }
        for c in self.clients() {
            c.update_secrets(secrets, changed);
        }
    }

    /// Reloads contexts whose files changed (called every second by the
    /// control thread). A failed reload keeps the old context.
    pub fn reload_changed(&self) {
        for s in self.servers() {
            s.reload_if_changed();
        }
        for c in self.clients() {
            c.reload_if_changed();
        }
    }
}

/// `/certs` entry for one certificate, in Envoy's shape.
pub fn cert_json(info: &CertInfo, path: &str) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut sans = Vec::new();
    for u in &info.uri_sans {
        sans.push(serde_json::json!({ "uri": u }));
    }
    for d in &info.dns_sans {
        sans.push(serde_json::json!({ "dns": d }));
    }
    for i in &info.ip_sans {
        sans.push(serde_json::json!({ "ip_address": i }));
    }
    let iso = |t: i64| {
        // Civil date from days since the epoch (Howard Hinnant's algorithm).
        let days = t.div_euclid(86400);
        let secs = t.rem_euclid(86400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    };
    serde_json::json!({
        "path": path,
        "serial_number": info.serial,
        "subject_alt_names": sans,
        "days_until_expiration": ((info.not_after - now) / 86400).max(0).to_string(),
        "valid_from": iso(info.not_before),
        "expiration_time": iso(info.not_after),
    })
}

/// The address an upstream connection dials, for SNI-less TLS.
pub fn ip_server_name(addr: SocketAddr) -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::IpAddress(addr.ip().into())
}
