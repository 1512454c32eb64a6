//! TLS peers for integration tests: certificates generated at run time, TLS
//! upstreams (HTTP echo and raw byte echo), TLS clients that report what they
//! negotiated, and wrappers around the `openssl s_client` / `curl` CLIs.
//!
//! Everything is real: rustls (ring provider) over real sockets on
//! `127.0.0.1:0`. Private keys only ever exist in memory or in a [`TempDir`].
//!
//! # Certificates
//!
//! ```no_run
//! use weir_tests::tls::{KeyType, LeafSpec, TempDir, TestCa};
//! let ca = TestCa::new("root");
//! let server = ca.issue(LeafSpec::server("backend.example.com"));
//! let rsa = ca.issue(LeafSpec::server("backend.example.com").key(KeyType::Rsa2048));
//! let sleep = ca.issue(LeafSpec::spiffe("spiffe://cluster.local/ns/default/sa/sleep"));
//! let expired = ca.issue(LeafSpec::client("old").expired());
//! let dir = TempDir::new("tls").unwrap();
//! let files = server.write_files(&dir, "server"); // cert/key/chain `filename:` paths
//! let ca_path = dir.write("ca.pem", ca.pem());
//! let crl_path = dir.write("ca.crl", ca.crl(&[&expired]).pem);
//! // Envoy `verify_certificate_hash` / `verify_certificate_spki`:
//! let _ = (&server.sha256_fingerprint, &server.spki_sha256_base64);
//! # let _ = (rsa, sleep, files, ca_path, crl_path);
//! ```
//!
//! RSA keys: ring (the crypto backend here) cannot *generate* RSA keys, so
//! [`KeyType::Rsa2048`] keys come from `openssl genpkey` (the CLI, ~0.1 s per
//! key) and are then used by rcgen/rustls through ring as usual.
//!
//! # Peers
//!
//! * [`tls_upstream`]: HTTP/1.1 and/or h2 (by ALPN; sniffed when no ALPN was
//!   negotiated) echo upstream answering exactly like
//!   [`crate::upstream`] (same [`EchoView`] JSON and `x-echo-*` controls),
//!   plus response headers describing the TLS session (see
//!   [`TLS_HEADERS`]) and a per-connection log ([`TlsServer::connections`]).
//! * [`tls_tcp_echo`]: echoes raw bytes after the handshake.
//! * [`TlsClient`]: handshakes, HTTP/1.1 or h2 requests over TLS, raw
//!   ClientHello bytes, session resumption, and restricted capabilities
//!   (ECDSA-only / RSA-only, key-exchange groups, versions, suites).
//! * [`openssl_s_client`], [`curl`]: non-rustls clients.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{Acceptor, WebPkiClientVerifier};
use rustls::{
    ClientConfig, CommonState, HandshakeKind, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where tests keep certificates: see [`crate::tmp`].
pub use crate::tmp::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::scenario::Resp;

/// How long connects, handshakes and requests may take before failing.
pub const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// Response headers [`tls_upstream`] adds to every answer (absent when the
/// value is absent): SNI, negotiated ALPN, protocol version (`TLSv1_3`,
/// `TLSv1_2`), `true`/`false` for a resumed session, and about the client
/// certificate: SHA-256 fingerprint (lower-case hex), subject CN, URI SANs
/// and DNS SANs (comma-separated).
pub const TLS_HEADERS: [&str; 8] = [
    "x-upstream-sni",
    "x-upstream-alpn",
    "x-upstream-tls-version",
    "x-upstream-tls-resumed",
    "x-upstream-client-cert-sha256",
    "x-upstream-client-cert-subject-cn",
    "x-upstream-client-cert-uri-san",
    "x-upstream-client-cert-dns-san",
];

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

// ---------------------------------------------------------------------------
// Keys and certificates
// ---------------------------------------------------------------------------

/// Key algorithm of a generated key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    /// Generated with `openssl genpkey` (ring cannot generate RSA keys).
    Rsa2048,
}

impl KeyType {
    /// The algorithm a certificate with such a key reports.
    pub fn alg(self) -> KeyAlg {
        match self {
            KeyType::EcdsaP256 => KeyAlg::EcdsaP256,
            KeyType::EcdsaP384 => KeyAlg::EcdsaP384,
            KeyType::Ed25519 => KeyAlg::Ed25519,
            KeyType::Rsa2048 => KeyAlg::Rsa,
        }
    }
}

/// The public-key algorithm found in a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlg {
    EcdsaP256,
    EcdsaP384,
    /// An EC key on another curve.
    Ecdsa,
    Ed25519,
    /// Any RSA key size.
    Rsa,
    Unknown,
}

impl KeyAlg {
    pub fn is_ecdsa(self) -> bool {
        matches!(self, KeyAlg::EcdsaP256 | KeyAlg::EcdsaP384 | KeyAlg::Ecdsa)
    }
}

fn generate_key(kt: KeyType) -> KeyPair {
    let key = match kt {
        KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
        KeyType::Rsa2048 => {
            KeyPair::from_pkcs8_pem_and_sign_algo(&openssl_rsa_key(2048), &rcgen::PKCS_RSA_SHA256)
        }
    };
    key.unwrap_or_else(|e| panic!("generate {kt:?} key: {e}"))
}

/// A PKCS#8 PEM RSA private key from `openssl genpkey`.
fn openssl_rsa_key(bits: u32) -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("run `openssl genpkey` for an RSA key (is openssl installed?): {e}")
        });
    assert!(
        out.status.success(),
        "openssl genpkey failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("openssl genpkey output is PEM")
}

/// A random positive serial number (16 bytes).
fn random_serial() -> Vec<u8> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system random");
    b[0] = (b[0] & 0x7f) | 0x01;
    b.to_vec()
}

/// Converts a `SystemTime` into rcgen's date type without naming the `time`
/// crate (rcgen's dates are `time::OffsetDateTime`).
macro_rules! rcgen_time {
    ($t:expr) => {{
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        match $t.duration_since(UNIX_EPOCH) {
            Ok(d) => epoch + d,
            Err(e) => epoch - e.duration(),
        }
    }};
}

const DAY: Duration = Duration::from_secs(86_400);

/// Which extended key usages a leaf carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eku {
    /// `serverAuth` only.
    Server,
    /// `clientAuth` only.
    Client,
    /// Both `serverAuth` and `clientAuth` (like Istio workload certificates).
    #[default]
    Both,
    /// No EKU extension at all (any use).
    None,
}

/// What [`TestCa::issue`] puts in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Subject CN; empty = no CN.
    pub common_name: String,
    pub dns_sans: Vec<String>,
    /// E.g. `spiffe://cluster.local/ns/default/sa/sleep`.
    pub uri_sans: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    pub email_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub key_type: KeyType,
    pub eku: Eku,
}

impl Default for LeafSpec {
    fn default() -> Self {
        let now = SystemTime::now();
        LeafSpec {
            common_name: String::new(),
            dns_sans: Vec::new(),
            uri_sans: Vec::new(),
            ip_sans: Vec::new(),
            email_sans: Vec::new(),
            not_before: now - Duration::from_secs(3600),
            not_after: now + 30 * DAY,
            key_type: KeyType::EcdsaP256,
            eku: Eku::Both,
        }
    }
}

impl LeafSpec {
    /// A leaf with subject CN `cn` and nothing else (EKU: both).
    pub fn new(cn: &str) -> LeafSpec {
        LeafSpec {
            common_name: cn.to_owned(),
            ..LeafSpec::default()
        }
    }

    /// A server certificate: CN and DNS SAN `name` (or an IP SAN when `name`
    /// is an IP address), EKU `serverAuth`.
    pub fn server(name: &str) -> LeafSpec {
        let spec = LeafSpec::new(name).eku(Eku::Server);
        match name.parse::<IpAddr>() {
            Ok(ip) => spec.ip(ip),
            Err(_) => spec.dns(name),
        }
    }

    /// A client certificate: CN `cn`, EKU `clientAuth`.
    pub fn client(cn: &str) -> LeafSpec {
        LeafSpec::new(cn).eku(Eku::Client)
    }

    /// A workload (SPIFFE) certificate: URI SAN `uri`, no CN, both EKUs.
    pub fn spiffe(uri: &str) -> LeafSpec {
        LeafSpec::default().uri(uri)
    }

    pub fn cn(mut self, cn: &str) -> Self {
        self.common_name = cn.to_owned();
        self
    }

    pub fn dns(mut self, name: &str) -> Self {
        self.dns_sans.push(name.to_owned());
        self
    }

    pub fn uri(mut self, uri: &str) -> Self {
        self.uri_sans.push(uri.to_owned());
        self
    }

    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip_sans.push(ip);
        self
    }

    pub fn email(mut self, email: &str) -> Self {
        self.email_sans.push(email.to_owned());
        self
    }

    pub fn key(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }

    pub fn eku(mut self, eku: Eku) -> Self {
        self.eku = eku;
        self
    }

    pub fn validity(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Valid from 30 days ago until yesterday.
    pub fn expired(self) -> Self {
        let now = SystemTime::now();
        self.validity(now - 30 * DAY, now - DAY)
    }

    /// Valid from tomorrow for 30 days.
    pub fn not_yet_valid(self) -> Self {
        let now = SystemTime::now();
        self.validity(now + DAY, now + 30 * DAY)
    }
}

/// An issued certificate with its private key.
#[derive(Clone)]
pub struct Leaf {
    /// The leaf alone.
    pub cert_pem: String,
    /// PKCS#8 PEM private key.
    pub key_pem: String,
    /// Leaf, then the issuing CA chain up to and including the root.
    pub chain_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// PKCS#8 DER private key.
    pub key_der: Vec<u8>,
    /// Same order as `chain_pem`.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// SHA-256 of the certificate DER, lower-case hex without colons (Envoy
    /// `verify_certificate_hash` accepts this form).
    pub sha256_fingerprint: String,
    /// Base64 SHA-256 of the SubjectPublicKeyInfo DER (Envoy
    /// `verify_certificate_spki`).
    pub spki_sha256_base64: String,
    /// Serial number (big-endian, positive).
    pub serial: Vec<u8>,
    pub spec: LeafSpec,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("cn", &self.spec.common_name)
            .field("dns", &self.spec.dns_sans)
            .field("uri", &self.spec.uri_sans)
            .field("key", &self.spec.key_type)
            .field("sha256", &self.sha256_fingerprint)
            .finish_non_exhaustive()
    }
}

/// Paths written by [`Leaf::write_files`].
#[derive(Debug, Clone)]
pub struct LeafFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub chain: PathBuf,
}

impl Leaf {
    /// The fingerprint as upper-case colon-separated hex (`AB:CD:...`), the
    /// other form Envoy's `verify_certificate_hash` accepts.
    pub fn sha256_fingerprint_colons(&self) -> String {
        colon_hex(&self.sha256_fingerprint)
    }

    /// The certificate as parsed by [`CertInfo::parse`].
    pub fn info(&self) -> CertInfo {
        CertInfo::parse(&self.cert_der)
    }

    /// The private key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `<stem>.crt` (leaf), `<stem>.key` and `<stem>-chain.crt`.
    pub fn write_files(&self, dir: &TempDir, stem: &str) -> LeafFiles {
        LeafFiles {
            cert: dir.write(&format!("{stem}.crt"), &self.cert_pem),
            key: dir.write(&format!("{stem}.key"), &self.key_pem),
            chain: dir.write(&format!("{stem}-chain.crt"), &self.chain_pem),
        }
    }
}

/// A certificate revocation list.
#[derive(Debug, Clone)]
pub struct Crl {
    pub pem: String,
    pub der: Vec<u8>,
}

/// A certificate authority (a root, or an intermediate from
/// [`TestCa::intermediate`]).
pub struct TestCa {
    name: String,
    key_type: KeyType,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    /// The CAs above this one, nearest first (empty for a root).
    parents: Vec<(CertificateDer<'static>, String)>,
    crl_number: AtomicU64,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .field("key", &self.key_type)
            .field("depth", &self.parents.len())
            .finish_non_exhaustive()
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "weir tests");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    p.not_before = rcgen_time!(now - DAY);
    p.not_after = rcgen_time!(now + 3650 * DAY);
    p.use_authority_key_identifier_extension = true;
    p
}

impl TestCa {
    /// A root CA with an ECDSA P-256 key and subject CN `name`.
    pub fn new(name: &str) -> TestCa {
        TestCa::with_key(name, KeyType::EcdsaP256)
    }

    /// A root CA with a `key_type` key.
    pub fn with_key(name: &str, key_type: KeyType) -> TestCa {
        let key = generate_key(key_type);
        let params = ca_params(name);
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("self-sign CA {name}: {e}"));
        TestCa {
            name: name.to_owned(),
            key_type,
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            parents: Vec::new(),
            crl_number: AtomicU64::new(1),
        }
    }

    /// An intermediate CA signed by this one (same key type).
    pub fn intermediate(&self, name: &str) -> TestCa {
        let key = generate_key(self.key_type);
        let params = ca_params(name);
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("sign intermediate CA {name}: {e}"));
        let mut parents = vec![(self.cert_der.clone(), self.cert_pem.clone())];
        parents.extend(self.parents.iter().cloned());
        TestCa {
            name: name.to_owned(),
            key_type: self.key_type,
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            parents,
            crl_number: AtomicU64::new(1),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This CA's certificate (PEM). For a root: the trust anchor.
    pub fn pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The CA's private key (PKCS#8 PEM).
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// This CA then its parents up to the root (PEM).
    pub fn chain_pem(&self) -> String {
        let mut s = self.cert_pem.clone();
        for (_, pem) in &self.parents {
            s.push_str(pem);
        }
        s
    }

    /// The root at the top of this CA's chain (PEM); `pem()` for a root.
    pub fn root_pem(&self) -> String {
        self.parents
            .last()
            .map(|(_, pem)| pem.clone())
            .unwrap_or_else(|| self.cert_pem.clone())
    }

    /// The root at the top of this CA's chain (DER).
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.parents
            .last()
            .map(|(der, _)| der.clone())
            .unwrap_or_else(|| self.cert_der.clone())
    }

    /// SHA-256 fingerprint of this CA's certificate (lower-case hex).
    pub fn sha256_fingerprint(&self) -> String {
        hex(&sha256(&self.cert_der))
    }

    /// Issues a leaf certificate signed by this CA.
    pub fn issue(&self, spec: LeafSpec) -> Leaf {
        let key = generate_key(spec.key_type);
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if !spec.common_name.is_empty() {
            dn.push(DnType::CommonName, spec.common_name.as_str());
        }
        p.distinguished_name = dn;
        let ia5 = |s: &str| -> rcgen::string::Ia5String {
            s.to_owned()
                .try_into()
                .unwrap_or_else(|e| panic!("SAN {s:?} is not IA5: {e}"))
        };
        for d in &spec.dns_sans {
            p.subject_alt_names.push(SanType::DnsName(ia5(d)));
        }
        for u in &spec.uri_sans {
            p.subject_alt_names.push(SanType::URI(ia5(u)));
        }
        for ip in &spec.ip_sans {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for e in &spec.email_sans {
            p.subject_alt_names.push(SanType::Rfc822Name(ia5(e)));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = match spec.key_type {
            KeyType::Rsa2048 => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            _ => vec![KeyUsagePurpose::DigitalSignature],
        };
        p.extended_key_usages = match spec.eku {
            Eku::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Eku::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Eku::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Eku::None => Vec::new(),
        };
        let serial = random_serial();
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.not_before = rcgen_time!(spec.not_before);
        p.not_after = rcgen_time!(spec.not_after);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("issue {spec:?}: {e}"));

        let cert_der = cert.der().clone();
        let cert_pem = cert.pem();
        let mut chain_pem = cert_pem.clone();
        chain_pem.push_str(&self.chain_pem());
        let mut chain_der = vec![cert_der.clone(), self.cert_der.clone()];
        chain_der.extend(self.parents.iter().map(|(d, _)| d.clone()));
        let info = CertInfo::parse(&cert_der);
        Leaf {
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            cert_pem,
            chain_pem,
            chain_der,
            sha256_fingerprint: info.sha256_fingerprint,
            spki_sha256_base64: info.spki_sha256_base64,
            cert_der,
            serial,
            spec,
        }
    }

    /// A CRL signed by this CA revoking `revoked` (which must have been
    /// issued by this CA to mean anything). Valid from an hour ago for a day.
    pub fn crl(&self, revoked: &[&Leaf]) -> Crl {
        let now = SystemTime::now();
        let n = self.crl_number.fetch_add(1, Ordering::Relaxed);
        let params = CertificateRevocationListParams {
            this_update: rcgen_time!(now - Duration::from_secs(3600)),
            next_update: rcgen_time!(now + DAY),
            crl_number: SerialNumber::from_slice(&n.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|l| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&l.serial),
                    revocation_time: rcgen_time!(now - Duration::from_secs(60)),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .unwrap_or_else(|e| panic!("sign CRL: {e}"));
        Crl {
            pem: crl.pem().unwrap_or_else(|e| panic!("CRL PEM: {e}")),
            der: crl.der().to_vec(),
        }
    }
}

// ---------------------------------------------------------------------------
// Certificate inspection (a minimal DER walker; no x509 parser dependency)
// ---------------------------------------------------------------------------

/// What a certificate says, as far as tests care. Parsing is best effort:
/// fields stay empty for DER it does not understand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub der: Vec<u8>,
    /// SHA-256 of the DER, lower-case hex without colons.
    pub sha256_fingerprint: String,
    /// Base64 SHA-256 of the SubjectPublicKeyInfo.
    pub spki_sha256_base64: String,
    pub key_alg: KeyAlg,
    pub serial_hex: String,
    pub subject_cn: Option<String>,
    pub issuer_cn: Option<String>,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    pub email_sans: Vec<String>,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> CertInfo {
        let mut info = CertInfo {
            der: der.to_vec(),
            sha256_fingerprint: hex(&sha256(der)),
            spki_sha256_base64: String::new(),
            key_alg: KeyAlg::Unknown,
            serial_hex: String::new(),
            subject_cn: None,
            issuer_cn: None,
            dns_sans: Vec::new(),
            uri_sans: Vec::new(),
            ip_sans: Vec::new(),
            email_sans: Vec::new(),
        };
        let _ = parse_cert_into(der, &mut info);
        info
    }

    /// Whether this is `leaf`'s certificate.
    pub fn is(&self, leaf: &Leaf) -> bool {
        self.der == leaf.cert_der.as_ref()
    }
}

/// One DER element: (tag, contents, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

fn parse_cert_into(der: &[u8], info: &mut CertInfo) -> Option<()> {
    let (_, cert, _) = der_tlv(der)?;
    let (_, tbs, _) = der_tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = der_tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
    }
    let (_, serial, r) = der_tlv(rest)?;
    info.serial_hex = hex(serial);
    let (_, _sig_alg, r) = der_tlv(r)?;
    let (_, issuer, r) = der_tlv(r)?;
    info.issuer_cn = name_cn(issuer);
    let (_, _validity, r) = der_tlv(r)?;
    let (_, subject, r) = der_tlv(r)?;
    info.subject_cn = name_cn(subject);
    let (_, spki, after_spki) = der_tlv(r)?;
    let spki_full = &r[..r.len() - after_spki.len()];
    info.spki_sha256_base64 = base64(&sha256(spki_full));
    info.key_alg = spki_alg(spki).unwrap_or(KeyAlg::Unknown);
    let mut rest = after_spki;
    while let Some((tag, content, r)) = der_tlv(rest) {
        rest = r;
        if tag == 0xa3 {
            parse_extensions(content, info);
        }
    }
    Some(())
}

fn name_cn(name: &[u8]) -> Option<String> {
    let mut rdns = name;
    while let Some((_, set, r)) = der_tlv(rdns) {
        rdns = r;
        let mut atvs = set;
        while let Some((_, atv, r)) = der_tlv(atvs) {
            atvs = r;
            let (_, oid, r) = der_tlv(atv)?;
            if oid == OID_CN {
                let (_, value, _) = der_tlv(r)?;
                return Some(String::from_utf8_lossy(value).into_owned());
            }
        }
    }
    None
}

fn spki_alg(spki: &[u8]) -> Option<KeyAlg> {
    let (_, alg_id, _) = der_tlv(spki)?;
    let (_, oid, params) = der_tlv(alg_id)?;
    Some(if oid == OID_RSA {
        KeyAlg::Rsa
    } else if oid == OID_ED25519 {
        KeyAlg::Ed25519
    } else if oid == OID_EC_PUBLIC_KEY {
        match der_tlv(params) {
            Some((_, c, _)) if c == OID_P256 => KeyAlg::EcdsaP256,
            Some((_, c, _)) if c == OID_P384 => KeyAlg::EcdsaP384,
            _ => KeyAlg::Ecdsa,
        }
    } else {
        KeyAlg::Unknown
    })
}

fn parse_extensions(explicit: &[u8], info: &mut CertInfo) -> Option<()> {
    let (_, mut exts, _) = der_tlv(explicit)?;
    while let Some((_, ext, r)) = der_tlv(exts) {
        exts = r;
        let (_, oid, mut rest) = der_tlv(ext)?;
        if oid != OID_SAN {
            continue;
        }
        let (mut tag, mut value, r) = der_tlv(rest)?;
        if tag == 0x01 {
            // `critical` BOOLEAN
            rest = r;
            (tag, value, _) = der_tlv(rest)?;
        }
        if tag != 0x04 {
            continue;
        }
        let (_, mut names, _) = der_tlv(value)?;
        while let Some((tag, v, r)) = der_tlv(names) {
            names = r;
            let s = || String::from_utf8_lossy(v).into_owned();
            match tag {
                0x81 => info.email_sans.push(s()),
                0x82 => info.dns_sans.push(s()),
                0x86 => info.uri_sans.push(s()),
                0x87 => {
                    if let Ok(b) = <[u8; 4]>::try_from(v) {
                        info.ip_sans.push(IpAddr::from(b));
                    } else if let Ok(b) = <[u8; 16]>::try_from(v) {
                        info.ip_sans.push(IpAddr::from(b));
                    }
                }
                _ => {}
            }
        }
    }
    Some(())
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Shared TLS settings
// ---------------------------------------------------------------------------

/// Which protocol versions a peer enables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersions {
    /// TLS 1.2 and 1.3.
    #[default]
    Any,
    Tls12Only,
    Tls13Only,
}

impl TlsVersions {
    fn list(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
        static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match self {
            TlsVersions::Any => rustls::ALL_VERSIONS,
            TlsVersions::Tls12Only => TLS12,
            TlsVersions::Tls13Only => TLS13,
        }
    }
}

/// What a client claims to support for the server's certificate, which is
/// what a server choosing between an RSA and an ECDSA certificate looks at:
/// the offered `signature_algorithms` (TLS 1.3 and 1.2) and, for TLS 1.2,
/// the offered `ECDHE_ECDSA_*` / `ECDHE_RSA_*` cipher suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigAlgs {
    #[default]
    Any,
    /// Only ECDSA signature schemes and `TLS_ECDHE_ECDSA_*` suites.
    EcdsaOnly,
    /// Only RSA (PKCS#1 and PSS) signature schemes and `TLS_ECDHE_RSA_*` suites.
    RsaOnly,
}

impl SigAlgs {
    fn allows_scheme(self, s: SignatureScheme) -> bool {
        let name = format!("{s:?}");
        match self {
            SigAlgs::Any => true,
            SigAlgs::EcdsaOnly => name.starts_with("ECDSA"),
            SigAlgs::RsaOnly => name.starts_with("RSA"),
        }
    }

    fn allows_suite(self, suite_name: &str) -> bool {
        match self {
            SigAlgs::Any => true,
            SigAlgs::EcdsaOnly => !suite_name.contains("_RSA_"),
            SigAlgs::RsaOnly => !suite_name.contains("_ECDSA_"),
        }
    }
}

/// Key-exchange groups (ring provider).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KxGroup {
    X25519,
    P256,
    P384,
}

impl KxGroup {
    fn group(self) -> &'static dyn rustls::crypto::SupportedKxGroup {
        use rustls::crypto::ring::kx_group;
        match self {
            KxGroup::X25519 => kx_group::X25519,
            KxGroup::P256 => kx_group::SECP256R1,
            KxGroup::P384 => kx_group::SECP384R1,
        }
    }
}

/// What a TLS session negotiated, from one side's point of view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsInfo {
    /// `TLSv1_3` or `TLSv1_2` (rustls' names).
    pub version: String,
    /// E.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
    /// E.g. `X25519`, `secp256r1`.
    pub kx_group: Option<String>,
    pub alpn: Option<String>,
    /// The session was resumed (`HandshakeKind::Resumed`).
    pub resumed: bool,
    /// The peer's certificate chain, leaf first (the server's for a client;
    /// the client's for a server; empty if none was sent).
    pub peer_chain: Vec<CertInfo>,
}

impl TlsInfo {
    fn from_state(c: &CommonState) -> TlsInfo {
        TlsInfo {
            version: c
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            cipher_suite: c
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
                .unwrap_or_default(),
            kx_group: c
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name())),
            alpn: c
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            resumed: c.handshake_kind() == Some(HandshakeKind::Resumed),
            peer_chain: c
                .peer_certificates()
                .map(|certs| certs.iter().map(|d| CertInfo::parse(d)).collect())
                .unwrap_or_default(),
        }
    }

    /// The peer's end-entity certificate.
    pub fn peer_cert(&self) -> Option<&CertInfo> {
        self.peer_chain.first()
    }

    pub fn is_tls13(&self) -> bool {
        self.version == "TLSv1_3"
    }
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// Whether and how a TLS server asks for client certificates.
#[derive(Debug, Clone, Default)]
pub enum ClientAuth {
    #[default]
    None,
    /// Ask; verify against these roots if one is sent.
    Optional(Vec<CertificateDer<'static>>),
    /// Require one, verified against these roots.
    Required(Vec<CertificateDer<'static>>),
    /// Require one, accept any certificate (its signature over the
    /// handshake is still checked). To observe what a proxy presents.
    AnyCert,
}

impl ClientAuth {
    /// Require a client certificate chaining to `ca`'s root.
    pub fn required(ca: &TestCa) -> ClientAuth {
        ClientAuth::Required(vec![ca.root_der()])
    }

    /// Ask for a client certificate chaining to `ca`'s root.
    pub fn optional(ca: &TestCa) -> ClientAuth {
        ClientAuth::Optional(vec![ca.root_der()])
    }
}

/// Settings for [`tls_upstream`] and [`tls_tcp_echo`].
#[derive(Debug, Clone)]
pub struct TlsServerOptions {
    /// Reported as `upstream` in [`EchoView`].
    pub name: String,
    /// Served when no `sni_certs` entry matches.
    pub cert: Leaf,
    /// Certificates by exact (case-insensitive) SNI.
    pub sni_certs: Vec<(String, Leaf)>,
    /// Served instead of the SNI/default certificate when the client offers
    /// no signature scheme for that certificate's key but does for one of
    /// these (e.g. an RSA certificate for RSA-only clients).
    pub alt_certs: Vec<Leaf>,
    /// CRLs the client-certificate verifier checks (with `Optional` or
    /// `Required` client auth).
    pub crls: Vec<Crl>,
    /// ALPN protocols in preference order; empty = no ALPN.
    pub alpn: Vec<String>,
    pub client_auth: ClientAuth,
    pub versions: TlsVersions,
    /// Where to listen (`127.0.0.1:0` by default).
    pub bind: SocketAddr,
}

impl TlsServerOptions {
    /// Serves `cert` (its full chain) with ALPN `h2`, `http/1.1`, no client
    /// auth, TLS 1.2 and 1.3.
    pub fn new(name: &str, cert: &Leaf) -> TlsServerOptions {
        TlsServerOptions {
            name: name.to_owned(),
            cert: cert.clone(),
            sni_certs: Vec::new(),
            alt_certs: Vec::new(),
            crls: Vec::new(),
            alpn: vec!["h2".to_owned(), "http/1.1".to_owned()],
            client_auth: ClientAuth::None,
            versions: TlsVersions::Any,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// Listens on `addr` instead of `127.0.0.1:0`.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    pub fn alpn(mut self, protos: &[&str]) -> Self {
        self.alpn = protos.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    pub fn sni_cert(mut self, sni: &str, cert: &Leaf) -> Self {
        self.sni_certs
            .push((sni.to_ascii_lowercase(), cert.clone()));
        self
    }

    /// Adds an alternative certificate (see `alt_certs`).
    pub fn alt_cert(mut self, cert: &Leaf) -> Self {
        self.alt_certs.push(cert.clone());
        self
    }

    /// Checks client certificates against `crl`.
    pub fn crl(mut self, crl: &Crl) -> Self {
        self.crls.push(crl.clone());
        self
    }

    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = auth;
        self
    }

    /// Shorthand for `client_auth(ClientAuth::required(ca))`.
    pub fn require_client_cert(self, ca: &TestCa) -> Self {
        self.client_auth(ClientAuth::required(ca))
    }

    pub fn versions(mut self, v: TlsVersions) -> Self {
        self.versions = v;
        self
    }
}

/// One accepted TCP connection on a TLS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConnRecord {
    pub peer: SocketAddr,
    /// SNI from the ClientHello.
    pub sni: Option<String>,
    /// ALPN protocols the client offered, in order.
    pub offered_alpn: Vec<String>,
    /// Signature schemes the client offered (rustls names).
    pub offered_sig_schemes: Vec<String>,
    /// Cipher suites the client offered (rustls names).
    pub offered_cipher_suites: Vec<String>,
    /// The negotiated session; `None` when the handshake failed.
    pub tls: Option<TlsInfo>,
    /// Why the handshake failed.
    pub error: Option<String>,
}

impl TlsConnRecord {
    /// The client certificate, if one was presented and accepted.
    pub fn client_cert(&self) -> Option<&CertInfo> {
        self.tls.as_ref().and_then(|t| t.peer_cert())
    }
}

/// A running TLS server. Stops accepting when dropped.
pub struct TlsServer {
    addr: SocketAddr,
    name: String,
    log: Arc<Mutex<Vec<TlsConnRecord>>>,
    bytes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TlsServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every connection so far (handshakes completed or failed), in order.
    /// A connection is recorded when the server side of its handshake ends,
    /// which can be just after the client's side ended: to look at the
    /// connection a client just made, prefer [`TlsServer::wait_connection`].
    pub fn connections(&self) -> Vec<TlsConnRecord> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn last_connection(&self) -> Option<TlsConnRecord> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
    }

    /// Waits until at least `n` connections are recorded; panics after
    /// `timeout`.
    pub async fn wait_connections(&self, n: usize, timeout: Duration) -> Vec<TlsConnRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.connections();
            if c.len() >= n {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {} connection(s) after {timeout:?}, wanted {n}: {c:?}",
                self.name,
                c.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The `n`th connection (1-based), waiting for it; panics after
    /// `timeout`.
    pub async fn wait_connection(&self, n: usize, timeout: Duration) -> TlsConnRecord {
        self.wait_connections(n, timeout).await.swap_remove(n - 1)
    }

    /// Application bytes echoed so far ([`tls_tcp_echo`] only).
    pub fn bytes_echoed(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts any client certificate (for [`ClientAuth::AnyCert`]).
#[derive(Debug)]
struct AnyClientCert(Arc<CryptoProvider>);

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    provider_signature_checks!(0);

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn roots(certs: &[CertificateDer<'static>]) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    for c in certs {
        store
            .add(c.clone())
            .unwrap_or_else(|e| panic!("bad trust anchor: {e}"));
    }
    Arc::new(store)
}

fn server_config(opts: &TlsServerOptions, leaf: &Leaf) -> Arc<ServerConfig> {
    let provider = Arc::new(provider());
    let crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>> =
        opts.crls.iter().map(|c| c.der.clone().into()).collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(opts.versions.list())
        .expect("protocol versions");
    let builder = match &opts.client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional(r) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots(r), provider.clone())
                .with_crls(crls.clone())
                .allow_unauthenticated()
                .build()
                .expect("client verifier"),
        ),
        ClientAuth::Required(r) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots(r), provider.clone())
                .with_crls(crls)
                .build()
                .expect("client verifier"),
        ),
        ClientAuth::AnyCert => {
            builder.with_client_cert_verifier(Arc::new(AnyClientCert(provider.clone())))
        }
    };
    let mut config = builder
        .with_single_cert(leaf.chain_der.clone(), leaf.private_key())
        .unwrap_or_else(|e| panic!("server certificate {leaf:?}: {e}"));
    config.alpn_protocols = opts.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

type KeyedConfig = (KeyAlg, Arc<ServerConfig>);

pub(crate) struct ServerConfigs {
    default: KeyedConfig,
    by_sni: HashMap<String, KeyedConfig>,
    alt: Vec<KeyedConfig>,
}

/// Whether a client offering `schemes` can verify a signature by a `key`.
fn scheme_fits(key: KeyAlg, schemes: &[String]) -> bool {
    let prefix = match key {
        KeyAlg::EcdsaP256 | KeyAlg::EcdsaP384 | KeyAlg::Ecdsa => "ECDSA",
        KeyAlg::Rsa => "RSA",
        KeyAlg::Ed25519 => "ED25519",
        KeyAlg::Unknown => return true,
    };
    schemes.iter().any(|s| s.starts_with(prefix))
}

impl ServerConfigs {
    fn new(opts: &TlsServerOptions) -> ServerConfigs {
        let keyed = |leaf: &Leaf| (leaf.spec.key_type.alg(), server_config(opts, leaf));
        ServerConfigs {
            default: keyed(&opts.cert),
            by_sni: opts
                .sni_certs
                .iter()
                .map(|(sni, leaf)| (sni.clone(), keyed(leaf)))
                .collect(),
            alt: opts.alt_certs.iter().map(keyed).collect(),
        }
    }

    fn pick(&self, sni: Option<&str>, schemes: &[String]) -> Arc<ServerConfig> {
        let first = sni
            .and_then(|s| self.by_sni.get(&s.to_ascii_lowercase()))
            .unwrap_or(&self.default);
        if scheme_fits(first.0, schemes) {
            return first.1.clone();
        }
        self.alt
            .iter()
            .find(|(k, _)| scheme_fits(*k, schemes))
            .unwrap_or(first)
            .1
            .clone()
    }
}

/// Runs the server side of a handshake, recording it in `log`.
pub(crate) async fn accept_tls(
    stream: TcpStream,
    peer: SocketAddr,
    configs: &ServerConfigs,
    log: &Mutex<Vec<TlsConnRecord>>,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, TlsConnRecord)> {
    let mut rec = TlsConnRecord {
        peer,
        sni: None,
        offered_alpn: Vec::new(),
        offered_sig_schemes: Vec::new(),
        offered_cipher_suites: Vec::new(),
        tls: None,
        error: None,
    };
    let push = |rec: &TlsConnRecord| {
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rec.clone())
    };
    let start = match tokio::time::timeout(
        TLS_TIMEOUT,
        LazyConfigAcceptor::new(Acceptor::default(), stream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            rec.error = Some(format!("ClientHello: {e}"));
            push(&rec);
            return None;
        }
        Err(_) => {
            rec.error = Some("ClientHello: timeout".to_owned());
            push(&rec);
            return None;
        }
    };
    {
        let hello = start.client_hello();
        rec.sni = hello.server_name().map(str::to_owned);
        rec.offered_alpn = hello
            .alpn()
            .map(|it| {
                it.map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        rec.offered_sig_schemes = hello
            .signature_schemes()
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
        rec.offered_cipher_suites = hello
            .cipher_suites()
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
    }
    let config = configs.pick(rec.sni.as_deref(), &rec.offered_sig_schemes);
    match tokio::time::timeout(TLS_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(tls)) => {
            rec.tls = Some(TlsInfo::from_state(tls.get_ref().1));
            push(&rec);
            Some((tls, rec))
        }
        Ok(Err(e)) => {
            rec.error = Some(e.to_string());
            push(&rec);
            None
        }
        Err(_) => {
            rec.error = Some("handshake: timeout".to_owned());
            push(&rec);
            None
        }
    }
}

fn tls_headers(rec: &TlsConnRecord) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    if let Some(sni) = &rec.sni {
        h.push(("x-upstream-sni", sni.clone()));
    }
    if let Some(tls) = &rec.tls {
        if let Some(alpn) = &tls.alpn {
            h.push(("x-upstream-alpn", alpn.clone()));
        }
        h.push(("x-upstream-tls-version", tls.version.clone()));
        h.push(("x-upstream-tls-resumed", tls.resumed.to_string()));
        if let Some(c) = tls.peer_cert() {
            h.push((
                "x-upstream-client-cert-sha256",
                c.sha256_fingerprint.clone(),
            ));
            if let Some(cn) = &c.subject_cn {
                h.push(("x-upstream-client-cert-subject-cn", cn.clone()));
            }
            if !c.uri_sans.is_empty() {
                h.push(("x-upstream-client-cert-uri-san", c.uri_sans.join(",")));
            }
            if !c.dns_sans.is_empty() {
                h.push(("x-upstream-client-cert-dns-san", c.dns_sans.join(",")));
            }
        }
    }
    h
}

pub(crate) async fn bind_tls(
    opts: &TlsServerOptions,
) -> std::io::Result<(TcpListener, SocketAddr, Arc<ServerConfigs>)> {
    let listener = TcpListener::bind(opts.bind).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr, Arc::new(ServerConfigs::new(opts))))
}

/// A TLS echo upstream on `127.0.0.1:0`: HTTP/2 when ALPN negotiated `h2`,
/// HTTP/1.1 for `http/1.1`, and either (sniffed) without ALPN. Answers like
/// [`crate::upstream`] (the [`EchoView`] JSON body and the `x-echo-*`
/// controls), plus the [`TLS_HEADERS`].
pub async fn tls_upstream(opts: TlsServerOptions) -> std::io::Result<TlsServer> {
    let (listener, addr, configs) = bind_tls(&opts).await?;
    let log: Arc<Mutex<Vec<TlsConnRecord>>> = Arc::default();
    let state = Arc::new(crate::upstream::State::default());
    let upstream: Arc<str> = Arc::from(opts.name.as_str());
    let task = {
        let log = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (configs, log, state, upstream) = (
                    configs.clone(),
                    log.clone(),
                    state.clone(),
                    upstream.clone(),
                );
                tokio::spawn(async move {
                    let Some((tls, rec)) = accept_tls(stream, peer, &configs, &log).await else {
                        return;
                    };
                    let extra = Arc::new(tls_headers(&rec));
                    let alpn = rec.tls.as_ref().and_then(|t| t.alpn.clone());
                    let svc = hyper::service::service_fn(move |req| {
                        let (upstream, state, extra) =
                            (upstream.clone(), state.clone(), extra.clone());
                        async move { crate::upstream::handle(req, upstream, state, &extra).await }
                    });
                    let io = TokioIo::new(tls);
                    // Connection errors (resets, aborted requests) are part of
                    // normal operation here.
                    match alpn.as_deref() {
                        Some("h2") => {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await;
                        }
                        Some(_) => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await;
                        }
                        None => {
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(io, svc)
                                    .await;
                        }
                    }
                });
            }
        })
    };
    Ok(TlsServer {
        addr,
        name: opts.name,
        log,
        bytes: Arc::default(),
        task,
    })
}

/// A TLS server on `127.0.0.1:0` that echoes application bytes after the
/// handshake. When the client closes its sending side (close_notify or TCP
/// FIN), the server sends close_notify and shuts down its own. ALPN is
/// `opts.alpn` (`TlsServerOptions::new` offers `h2`, `http/1.1`; a client
/// offering none negotiates none; `.alpn(&[])` disables it).
pub async fn tls_tcp_echo(opts: TlsServerOptions) -> std::io::Result<TlsServer> {
    let (listener, addr, configs) = bind_tls(&opts).await?;
    let log: Arc<Mutex<Vec<TlsConnRecord>>> = Arc::default();
    let bytes: Arc<AtomicU64> = Arc::default();
    let task = {
        let (log, bytes) = (log.clone(), bytes.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (configs, log, bytes) = (configs.clone(), log.clone(), bytes.clone());
                tokio::spawn(async move {
                    let Some((mut tls, _)) = accept_tls(stream, peer, &configs, &log).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tls.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                                bytes.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        })
    };
    Ok(TlsServer {
        addr,
        name: opts.name,
        log,
        bytes,
        task,
    })
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// Why a TLS connection did not get established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    Connect(String),
    /// The peer sent a fatal alert; rustls' name of it, e.g.
    /// `CertificateRequired`, `BadCertificate`, `UnknownCA`,
    /// `HandshakeFailure`, `NoApplicationProtocol`, `ProtocolVersion`.
    Alert(String),
    /// This client refused (e.g. `invalid peer certificate: Expired`).
    Local(String),
    /// The peer closed or reset the connection without an alert.
    Closed(String),
    Timeout,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Connect(e) => write!(f, "connect: {e}"),
            HandshakeError::Alert(a) => write!(f, "peer sent fatal alert {a}"),
            HandshakeError::Local(e) => write!(f, "refused locally: {e}"),
            HandshakeError::Closed(e) => write!(f, "connection closed: {e}"),
            HandshakeError::Timeout => write!(f, "timeout"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl HandshakeError {
    fn from_io(e: &std::io::Error) -> HandshakeError {
        if let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return match tls {
                rustls::Error::AlertReceived(a) => HandshakeError::Alert(format!("{a:?}")),
                other => HandshakeError::Local(other.to_string()),
            };
        }
        HandshakeError::Closed(e.to_string())
    }

    /// The alert name if the peer sent one.
    pub fn alert(&self) -> Option<&str> {
        match self {
            HandshakeError::Alert(a) => Some(a),
            _ => None,
        }
    }
}

/// Session store that counts the sessions/tickets servers hand out (used to
/// tell that a TLS 1.3 server accepted our certificate) and can refuse to
/// resume.
#[derive(Debug)]
struct SessionStore {
    inner: ClientSessionMemoryCache,
    resume: bool,
    tickets: watch::Sender<u64>,
}

impl ClientSessionStore for SessionStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.tickets.send_modify(|n| *n += 1);
        if self.resume {
            self.inner.set_tls12_session(server_name, value);
        }
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.resume
            .then(|| self.inner.tls12_session(server_name))
            .flatten()
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.send_modify(|n| *n += 1);
        if self.resume {
            self.inner.insert_tls13_ticket(server_name, value);
        }
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.resume
            .then(|| self.inner.take_tls13_ticket(server_name))
            .flatten()
    }
}

/// The TLS 1.2 and 1.3 signature checks of a certificate verifier whose
/// field `$provider` is its `Arc<CryptoProvider>`: rustls's, with the
/// provider's algorithms (shared by the test verifiers here and in
/// `hbone`).
macro_rules! provider_signature_checks {
    ($provider:tt) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.$provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.$provider.signature_verification_algorithms,
            )
        }
    };
}
pub(crate) use provider_signature_checks;

type SeenChain = Arc<Mutex<Option<Vec<CertificateDer<'static>>>>>;

/// Server-certificate verifier: webpki (or nothing, when insecure), offering
/// only the signature schemes `sig_algs` allows, and remembering the chain
/// the server presented (even when verification fails).
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    sig_algs: SigAlgs,
    seen: SeenChain,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(chain);
        match &self.webpki {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    provider_signature_checks!(provider);

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
            .into_iter()
            .filter(|s| self.sig_algs.allows_scheme(*s))
            .collect()
    }
}

/// Builds a [`TlsClient`].
#[derive(Debug, Clone)]
pub struct TlsClientBuilder {
    roots: Vec<CertificateDer<'static>>,
    insecure: bool,
    alpn: Vec<String>,
    client_cert: Option<(Vec<CertificateDer<'static>>, Vec<u8>)>,
    versions: TlsVersions,
    sig_algs: SigAlgs,
    kx: Vec<KxGroup>,
    cipher_suites: Vec<String>,
    resumption: bool,
    sni: bool,
    verdict_wait: Duration,
}

impl Default for TlsClientBuilder {
    fn default() -> Self {
        TlsClientBuilder {
            roots: Vec::new(),
            insecure: false,
            alpn: Vec::new(),
            client_cert: None,
            versions: TlsVersions::Any,
            sig_algs: SigAlgs::Any,
            kx: Vec::new(),
            cipher_suites: Vec::new(),
            resumption: true,
            sni: true,
            verdict_wait: Duration::from_millis(300),
        }
    }
}

impl TlsClientBuilder {
    /// Trust `ca`'s root.
    pub fn trust(mut self, ca: &TestCa) -> Self {
        self.roots.push(ca.root_der());
        self
    }

    /// Trust this certificate as an anchor.
    pub fn trust_der(mut self, cert: CertificateDer<'static>) -> Self {
        self.roots.push(cert);
        self
    }

    /// Do not verify the server certificate at all (handshake signatures are
    /// still checked). The presented chain is still reported.
    pub fn insecure(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// ALPN protocols to offer, in order (default: none).
    pub fn alpn(mut self, protos: &[&str]) -> Self {
        self.alpn = protos.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Present `leaf` (with its chain) when the server asks.
    pub fn client_cert(mut self, leaf: &Leaf) -> Self {
        self.client_cert = Some((leaf.chain_der.clone(), leaf.key_der.clone()));
        self
    }

    pub fn versions(mut self, v: TlsVersions) -> Self {
        self.versions = v;
        self
    }

    pub fn sig_algs(mut self, s: SigAlgs) -> Self {
        self.sig_algs = s;
        self
    }

    /// Offer only these key-exchange groups, in order.
    pub fn kx_groups(mut self, groups: &[KxGroup]) -> Self {
        self.kx = groups.to_vec();
        self
    }

    /// Offer only these cipher suites (rustls names, e.g.
    /// `TLS13_AES_128_GCM_SHA256`, `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`).
    pub fn cipher_suites(mut self, names: &[&str]) -> Self {
        self.cipher_suites = names.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Keep sessions for resumption (default on; sessions are shared by the
    /// clones of one built [`TlsClient`] only).
    pub fn resumption(mut self, on: bool) -> Self {
        self.resumption = on;
        self
    }

    /// Send no SNI (the server name is still used for verification).
    pub fn no_sni(mut self) -> Self {
        self.sni = false;
        self
    }

    /// How long [`TlsClient::handshake`] waits, on TLS 1.3, for the server's
    /// verdict on the client's certificate (an alert, or a session ticket
    /// meaning acceptance) before calling the handshake good. Default 300 ms.
    pub fn verdict_wait(mut self, d: Duration) -> Self {
        self.verdict_wait = d;
        self
    }

    pub fn build(self) -> TlsClient {
        let mut p = provider();
        let sig_algs = self.sig_algs;
        let names = &self.cipher_suites;
        p.cipher_suites.retain(|s| {
            let name = format!("{:?}", s.suite());
            sig_algs.allows_suite(&name)
                && (names.is_empty() || names.iter().any(|n| n.eq_ignore_ascii_case(&name)))
        });
        if !self.kx.is_empty() {
            p.kx_groups = self.kx.iter().map(|k| k.group()).collect();
        }
        let provider = Arc::new(p);
        let seen: SeenChain = Arc::default();
        let webpki = (!self.insecure).then(|| {
            assert!(
                !self.roots.is_empty(),
                "TlsClient: trust a CA (trust/trust_der) or use insecure()"
            );
            WebPkiServerVerifier::builder_with_provider(roots(&self.roots), provider.clone())
                .build()
                .expect("server verifier")
        });
        let verifier = Arc::new(Verifier {
            webpki,
            provider: provider.clone(),
            sig_algs,
            seen: seen.clone(),
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(self.versions.list())
            .expect("protocol versions (with these cipher suites)")
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match self.client_cert {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(key.into()))
                .expect("client certificate"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config.enable_sni = self.sni;
        let (tickets, _) = watch::channel(0u64);
        let store = Arc::new(SessionStore {
            inner: ClientSessionMemoryCache::new(64),
            resume: self.resumption,
            tickets,
        });
        config.resumption = rustls::client::Resumption::store(store.clone());
        TlsClient {
            config: Arc::new(config),
            store,
            seen,
            verdict_wait: self.verdict_wait,
        }
    }
}

/// A TLS client configuration. Clones share the session cache, so a second
/// connection to the same server name can resume.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    store: Arc<SessionStore>,
    seen: SeenChain,
    verdict_wait: Duration,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

/// A request for [`TlsClient::request`] / [`HttpsConn::send`].
#[derive(Debug, Clone)]
pub struct TlsRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `Host` / `:authority`; default: the server name used to connect.
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl TlsRequest {
    pub fn new(method: &str, path: &str) -> TlsRequest {
        TlsRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            authority: None,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn get(path: &str) -> TlsRequest {
        TlsRequest::new("GET", path)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn authority(mut self, authority: &str) -> Self {
        self.authority = Some(authority.to_owned());
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// A response over TLS with the session it came on. Derefs to [`Resp`]
/// (`status`, `header()`, `echo()`, ...).
#[derive(Debug, Clone)]
pub struct TlsResp {
    pub resp: Resp,
    pub tls: TlsInfo,
}

impl Deref for TlsResp {
    type Target = Resp;

    fn deref(&self) -> &Resp {
        &self.resp
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// An HTTP connection over TLS: HTTP/2 if ALPN negotiated `h2`, else
/// HTTP/1.1.
pub struct HttpsConn {
    pub tls: TlsInfo,
    authority: String,
    sender: Sender,
}

impl HttpsConn {
    pub fn version(&self) -> http::Version {
        match self.sender {
            Sender::H1(_) => http::Version::HTTP_11,
            Sender::H2(_) => http::Version::HTTP_2,
        }
    }

    /// Sends one request on this connection and reads the whole response.
    pub async fn send(&mut self, req: TlsRequest) -> anyhow::Result<Resp> {
        let authority = req
            .authority
            .clone()
            .unwrap_or_else(|| self.authority.clone());
        let h2 = matches!(self.sender, Sender::H2(_));
        let uri = if h2 {
            format!("https://{authority}{}", req.path)
        } else {
            req.path.clone()
        };
        let mut b = Request::builder().method(req.method.as_str()).uri(uri);
        if !h2
            && !req
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            b = b.header("host", authority.as_str());
        }
        for (k, v) in &req.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let request = b.body(Full::new(req.body)).context("build request")?;
        let fut = async {
            let resp = match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.context("connection not ready")?;
                    s.send_request(request).await
                }
                Sender::H2(s) => {
                    s.ready().await.context("connection not ready")?;
                    s.send_request(request).await
                }
            }
            .context("request")?;
            Resp::read(resp).await
        };
        tokio::time::timeout(TLS_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("no response within {TLS_TIMEOUT:?}"))?
    }
}

fn server_name(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned())
        .unwrap_or_else(|e| panic!("invalid server name {name:?}: {e}"))
}

impl TlsClient {
    pub fn builder() -> TlsClientBuilder {
        TlsClientBuilder::default()
    }

    /// Trusts `ca`; no ALPN, no client certificate.
    pub fn new(ca: &TestCa) -> TlsClient {
        TlsClient::builder().trust(ca).build()
    }

    /// The rustls configuration, for custom use.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// The chain the server presented on the most recent handshake that got
    /// that far, even one that then failed verification.
    pub fn last_peer_chain(&self) -> Option<Vec<CertInfo>> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.iter().map(|d| CertInfo::parse(d)).collect())
    }

    /// Connects and completes the client side of the handshake. `name` is
    /// the SNI (unless built with `no_sni`; IP addresses are never sent as
    /// SNI) and the name the server certificate is verified against.
    ///
    /// With TLS 1.3 the server judges the client certificate after the
    /// client finished; a rejection then shows up on the first read. Use
    /// [`TlsClient::handshake`] to wait for that verdict.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        name: &str,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, TlsInfo), HandshakeError> {
        let fut = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| HandshakeError::Connect(format!("{addr}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(self.config.clone())
                .connect(server_name(name), tcp)
                .await
                .map_err(|e| HandshakeError::from_io(&e))?;
            let info = TlsInfo::from_state(tls.get_ref().1);
            Ok((tls, info))
        };
        tokio::time::timeout(TLS_TIMEOUT, fut)
            .await
            .map_err(|_| HandshakeError::Timeout)?
    }

    /// A full handshake including the server's verdict on the client
    /// certificate, then a clean close. `Ok` = the server accepted the
    /// connection; `Err` says who refused and how.
    pub async fn handshake(&self, addr: SocketAddr, name: &str) -> Result<TlsInfo, HandshakeError> {
        let mut rx = self.store.tickets.subscribe();
        let before = *rx.borrow_and_update();
        let (mut tls, info) = self.connect(addr, name).await?;
        if info.is_tls13() && *rx.borrow() == before {
            let mut buf = [0u8; 256];
            tokio::select! {
                r = tls.read(&mut buf) => match r {
                    Ok(0) => return Err(HandshakeError::Closed("closed right after the handshake".to_owned())),
                    Ok(_) => {}
                    Err(e) => return Err(HandshakeError::from_io(&e)),
                },
                _ = rx.wait_for(|n| *n > before) => {}
                _ = tokio::time::sleep(self.verdict_wait) => {}
            }
        }
        let _ = tls.shutdown().await;
        Ok(info)
    }

    /// Connects and sets up HTTP/2 (ALPN `h2`) or HTTP/1.1 on the session.
    pub async fn http(&self, addr: SocketAddr, name: &str) -> anyhow::Result<HttpsConn> {
        let (tls, info) = self.connect(addr, name).await?;
        let io = TokioIo::new(tls);
        let sender = if info.alpn.as_deref() == Some("h2") {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .context("h2 handshake")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .context("http1 handshake")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H1(sender)
        };
        Ok(HttpsConn {
            tls: info,
            authority: name.to_owned(),
            sender,
        })
    }

    /// One request on a fresh connection.
    pub async fn request(
        &self,
        addr: SocketAddr,
        name: &str,
        req: TlsRequest,
    ) -> anyhow::Result<TlsResp> {
        let mut conn = self.http(addr, name).await?;
        let resp = conn.send(req).await?;
        Ok(TlsResp {
            resp,
            tls: conn.tls,
        })
    }

    /// `GET path` on a fresh connection.
    pub async fn get(&self, addr: SocketAddr, name: &str, path: &str) -> anyhow::Result<TlsResp> {
        self.request(addr, name, TlsRequest::get(path)).await
    }

    /// The exact bytes (TLS records) of the ClientHello this client sends
    /// to `name`, for raw-byte tests such as SNI passthrough.
    pub fn client_hello(&self, name: &str) -> Vec<u8> {
        let mut conn = rustls::ClientConnection::new(self.config.clone(), server_name(name))
            .expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write to Vec");
        }
        out
    }
}

/// One request over TLS on a fresh connection: trusts `ca`, offers `alpn`
/// (HTTP/2 if `h2` is negotiated, else HTTP/1.1), presents `client_cert` if
/// given. `sni` is also the verified name and the default authority.
pub async fn https_get(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&str],
    ca: &TestCa,
    client_cert: Option<&Leaf>,
    request: TlsRequest,
) -> anyhow::Result<TlsResp> {
    let mut b = TlsClient::builder().trust(ca).alpn(alpn);
    if let Some(leaf) = client_cert {
        b = b.client_cert(leaf);
    }
    b.build().request(addr, sni, request).await
}

// ---------------------------------------------------------------------------
// CLI clients
// ---------------------------------------------------------------------------

/// What a CLI run produced.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Exit code; `None` if killed (timeout) or ended by a signal.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// stdout then stderr.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The value of the first `key: value` / `key  : value` line in stdout
    /// or stderr, e.g. `s_client`'s `Protocol`, `Cipher`, `ALPN protocol`,
    /// `Verify return code`.
    pub fn field(&self, key: &str) -> Option<String> {
        self.combined().lines().find_map(|l| {
            let rest = l.trim_start().strip_prefix(key)?;
            let rest = rest.trim_start().strip_prefix(':')?;
            Some(rest.trim().to_owned())
        })
    }

    /// `s_client`'s negotiated protocol (`TLSv1.3`, `TLSv1.2`), from its
    /// `New, <protocol>, Cipher is <cipher>` line.
    pub fn s_client_protocol(&self) -> Option<String> {
        self.s_client_new_line().map(|(p, _)| p)
    }

    /// `s_client`'s negotiated cipher (OpenSSL name, e.g.
    /// `TLS_AES_256_GCM_SHA384`, `ECDHE-RSA-AES128-GCM-SHA256`).
    pub fn s_client_cipher(&self) -> Option<String> {
        self.s_client_new_line().map(|(_, c)| c)
    }

    fn s_client_new_line(&self) -> Option<(String, String)> {
        self.stdout.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("New, ")?;
            let (proto, cipher) = rest.split_once(", Cipher is ")?;
            Some((proto.trim().to_owned(), cipher.trim().to_owned()))
        })
    }

    /// The first PEM certificate in stdout (`s_client` prints the server's).
    pub fn peer_cert_pem(&self) -> Option<String> {
        const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
        const END: &str = "-----END CERTIFICATE-----";
        let start = self.stdout.find(BEGIN)?;
        let end = self.stdout[start..].find(END)? + start + END.len();
        Some(format!("{}\n", &self.stdout[start..end]))
    }
}

/// Whether `program` can be run (`<program> version`/`--version`).
pub fn cli_available(program: &str) -> bool {
    let arg = if program == "openssl" {
        "version"
    } else {
        "--version"
    };
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `program args`, writing `stdin` and closing it, killing the process
/// after `timeout`. Panics if it cannot be started.
pub async fn run_cli(program: &str, args: &[String], stdin: &[u8], timeout: Duration) -> CliOutput {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let input = stdin.to_vec();
    let mut child_stdin = child.stdin.take();
    let writer = tokio::spawn(async move {
        if let Some(s) = child_stdin.as_mut() {
            let _ = s.write_all(&input).await;
            let _ = s.shutdown().await;
        }
        drop(child_stdin);
    });
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let read_out = tokio::spawn(async move {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut v).await;
        }
        v
    });
    let read_err = tokio::spawn(async move {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut v).await;
        }
        v
    });
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(s)) => (s.code(), false),
        Ok(Err(_)) => (None, false),
        Err(_) => {
            let _ = child.kill().await;
            (None, true)
        }
    };
    writer.abort();
    let stdout = read_out.await.unwrap_or_default();
    let stderr = read_err.await.unwrap_or_default();
    CliOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        timed_out,
    }
}

/// `openssl s_client -connect <addr> [-servername <name> | -noservername]
/// <extra_args>` with empty stdin (it handshakes, prints the session, and
/// exits), killed after 10 s. Useful extra args: `-alpn h2,http/1.1`,
/// `-tls1_2`, `-tls1_3`, `-CAfile <path>`, `-cert <path> -key <path>`,
/// `-sigalgs ECDSA+SHA256`, `-groups X25519`, `-verify_return_error`.
pub async fn openssl_s_client(
    addr: SocketAddr,
    servername: Option<&str>,
    extra_args: &[&str],
) -> CliOutput {
    openssl_s_client_with_input(addr, servername, extra_args, b"", Duration::from_secs(10)).await
}

/// [`openssl_s_client`] sending `input` on stdin (e.g. an HTTP request;
/// add `-ign_eof` to wait for the server to close).
pub async fn openssl_s_client_with_input(
    addr: SocketAddr,
    servername: Option<&str>,
    extra_args: &[&str],
    input: &[u8],
    timeout: Duration,
) -> CliOutput {
    let mut args: Vec<String> = vec!["s_client".into(), "-connect".into(), addr.to_string()];
    match servername {
        Some(n) => {
            args.push("-servername".into());
            args.push(n.into());
        }
        None => args.push("-noservername".into()),
    }
    args.extend(extra_args.iter().map(|s| (*s).to_owned()));
    run_cli("openssl", &args, input, timeout).await
}

/// `curl -sS --max-time 10 <args>`. For a TLS listener on `addr` under a
/// host name, pass `--resolve <host>:<port>:127.0.0.1` (see
/// [`curl_resolve`]) and `--cacert <path>`. `-w '%{http_code}'` etc. work.
pub async fn curl(args: &[&str]) -> CliOutput {
    let mut all: Vec<String> = vec!["-sS".into(), "--max-time".into(), "10".into()];
    all.extend(args.iter().map(|s| (*s).to_owned()));
    run_cli("curl", &all, b"", Duration::from_secs(15)).await
}

/// `--resolve host:port:ip` arguments pointing `host` at `addr`.
pub fn curl_resolve(host: &str, addr: SocketAddr) -> [String; 2] {
    [
        "--resolve".to_owned(),
        format!("{host}:{}:{}", addr.port(), addr.ip()),
    ]
}
