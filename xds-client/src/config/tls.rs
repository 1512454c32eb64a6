//! TLS transport sockets (`envoy.transport_sockets.tls`), secrets and
//! certificate validation, as validated config.
//!
//! Certificates and keys stay as [`CertData`] (bytes or a file path): the
//! proxy parses them when it builds a TLS context and watches files so a
//! rotated certificate applies to new handshakes.
use std::{path::PathBuf, sync::Arc, time::Duration};

use super::{Name, StringMatcher};

/// A `DataSource` holding PEM: inline bytes or a file (re-read on change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertData {
    Inline(Arc<[u8]>),
    File(PathBuf),
}

/// `TlsCertificate`: a chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCertificate {
    pub chain: CertData,
    pub key: CertData,
    /// `ocsp_staple`: a DER OCSP response for the leaf, stapled to
    /// handshakes whose client asks for the certificate status.
    pub ocsp_staple: Option<CertData>,
    /// Field path, for errors found when the proxy loads it.
    pub path: String,
}

/// Where a certificate or validation context comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretRef<T> {
    Inline(T),
    /// An SDS secret name: a `static_resources.secrets` entry (later also
    /// dynamic SDS).
    Sds(Name),
}

/// A `Secret` from `static_resources.secrets` (or SDS).
#[derive(Debug, Clone, PartialEq)]
pub enum Secret {
    Certificate(TlsCertificate),
    Validation(CertValidation),
    SessionTicketKeys(SessionTicketKeys),
}

/// One session ticket key in Envoy's 80-byte layout: a 16-byte name (sent
/// in the clear, picks the key when a ticket comes back), then 32 bytes of
/// HMAC key and 32 bytes of AES key.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionTicketKey {
    pub name: [u8; 16],
    pub hmac: [u8; 32],
    pub aes: [u8; 32],
}

impl std::fmt::Debug for SessionTicketKey {
    // Secret material stays out of logs and debug dumps: only the name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name: String = self.name.iter().map(|b| format!("{b:02x}")).collect();
        f.debug_struct("SessionTicketKey")
            .field("name", &name)
            .finish_non_exhaustive()
    }
}

/// `TlsSessionTicketKeys`: the first key encrypts new tickets, every key
/// decrypts (rotation: the new key first, the previous one after it).
/// Never empty.
pub type SessionTicketKeys = Arc<[SessionTicketKey]>;

/// `ocsp_staple_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OcspStaplePolicy {
    /// A missing or expired response: the certificate is used unstapled.
    #[default]
    Lenient,
    /// An expired response: the certificate is not used for clients that
    /// ask for the status; a missing one: used unstapled.
    Strict,
    /// Every certificate needs a response (a config error otherwise); an
    /// expired one: not used for clients that ask for the status.
    MustStaple,
}

/// TLS signature schemes by Envoy's (BoringSSL's) names, the ones rustls
/// with ring implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    RsaPkcs1Sha256,
    RsaPkcs1Sha384,
    RsaPkcs1Sha512,
    EcdsaSecp256r1Sha256,
    EcdsaSecp384r1Sha384,
    RsaPssRsaeSha256,
    RsaPssRsaeSha384,
    RsaPssRsaeSha512,
    Ed25519,
}

/// TLS protocol versions weir speaks (1.0 and 1.1 are never offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// Cipher suites weir (rustls with ring) implements, by their OpenSSL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherSuite {
    EcdheEcdsaAes128GcmSha256,
    EcdheEcdsaAes256GcmSha384,
    EcdheEcdsaChacha20Poly1305,
    EcdheRsaAes128GcmSha256,
    EcdheRsaAes256GcmSha384,
    EcdheRsaChacha20Poly1305,
}

/// Key-exchange groups (`ecdh_curves`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    X25519,
    P256,
    P384,
}

/// `tls_params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// TLS 1.2 suites, in preference order; empty = rustls' defaults.
    pub cipher_suites: Vec<CipherSuite>,
    /// Empty = rustls' defaults (X25519, P-256, P-384).
    pub curves: Vec<Curve>,
    /// `signature_algorithms`, in preference order: what weir signs with
    /// and what it accepts from the peer. Empty = rustls' defaults.
    pub signature_algorithms: Vec<SignatureAlgorithm>,
}

impl Default for TlsParams {
    fn default() -> Self {
        TlsParams {
            min_version: TlsVersion::V1_2,
            max_version: TlsVersion::V1_3,
            cipher_suites: Vec::new(),
            curves: Vec::new(),
            signature_algorithms: Vec::new(),
        }
    }
}

/// Which SAN a matcher looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    Email,
    Dns,
    Uri,
    Ip,
    /// Legacy `match_subject_alt_names`: any of DNS, URI, email and IP.
    Any,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SanMatcher {
    pub san: SanType,
    pub matcher: StringMatcher,
}

/// `CertificateValidationContext`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CertValidation {
    pub trusted_ca: Option<CertData>,
    pub san_matchers: Vec<SanMatcher>,
    /// `verify_certificate_spki`: SHA-256 of the SubjectPublicKeyInfo.
    pub spki_hashes: Vec<[u8; 32]>,
    /// `verify_certificate_hash`: SHA-256 of the certificate DER.
    pub cert_hashes: Vec<[u8; 32]>,
    pub crl: Option<CertData>,
    pub only_verify_leaf_cert_crl: bool,
    pub allow_expired: bool,
    /// `trust_chain_verification: ACCEPT_UNTRUSTED`.
    pub accept_untrusted: bool,
    pub max_verify_depth: Option<u32>,
    pub path: String,
}

/// A validation context: inline, from SDS, or `combined_validation_context`
/// (an SDS secret merged with a default context).
#[derive(Debug, Clone, PartialEq)]
pub enum ValidationRef {
    Inline(CertValidation),
    Sds(Name),
    Combined { default: CertValidation, sds: Name },
}

/// `DownstreamTlsContext` (TLS termination on a filter chain).
#[derive(Debug, Clone, PartialEq)]
pub struct DownstreamTls {
    pub certs: Vec<SecretRef<TlsCertificate>>,
    pub params: TlsParams,
    pub alpn: Vec<Vec<u8>>,
    pub validation: Option<ValidationRef>,
    /// The secrets above that come from SDS, with their sources.
    pub sds: Vec<super::SdsRef>,
    pub require_client_cert: bool,
    /// Stateless resumption with tickets (off with
    /// `disable_stateless_session_resumption`).
    pub session_tickets: bool,
    /// `session_ticket_keys` (inline) or `session_ticket_keys_sds_secret_config`;
    /// `None`: weir's own rotating keys.
    pub ticket_keys: Option<SecretRef<SessionTicketKeys>>,
    /// The filter chain's `filter_chain_match.server_names`: part of the
    /// session context (as Envoy's session id context), so tickets from
    /// shared keys resume only on a chain for the same names.
    pub chain_server_names: Vec<String>,
    pub ocsp_staple_policy: OcspStaplePolicy,
    /// Stateful session cache (off with `disable_stateful_session_resumption`).
    pub session_cache: bool,
    pub session_timeout: Option<Duration>,
    /// `prefer_client_ciphers`: the client's suite order wins (default: ours).
    pub prefer_client_ciphers: bool,
    /// Field path of the transport socket, for load errors.
    pub path: String,
}

/// `UpstreamTlsContext` (TLS origination to a cluster's endpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    pub sni: Option<String>,
    /// `auto_host_sni`: the SNI is the upstream host's hostname
    /// (`Endpoint.hostname`) when it has one.
    pub auto_host_sni: bool,
    /// `auto_sni_san_validation`: the certificate must carry the SNI sent
    /// (when it came from `auto_host_sni` or `auto_sni`) as a SAN.
    pub auto_sni_san_validation: bool,
    pub cert: Option<SecretRef<TlsCertificate>>,
    pub params: TlsParams,
    pub alpn: Vec<Vec<u8>>,
    pub validation: Option<ValidationRef>,
    /// The secrets above that come from SDS, with their sources.
    pub sds: Vec<super::SdsRef>,
    /// `max_session_keys` (default 1; 0 disables resumption).
    pub max_session_keys: u32,
    pub path: String,
}

/// A cluster's transport socket.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamTransport {
    Plain,
    Tls(Arc<UpstreamTls>),
    /// `envoy.transport_sockets.upstream_proxy_protocol`: a PROXY protocol
    /// header with the downstream connection's addresses, then the inner
    /// transport.
    ProxyProtocol(Arc<ProxyProtocolUpstream>, Box<UpstreamTransport>),
    /// `envoy.transport_sockets.internal_upstream`: metadata passed into
    /// the internal connection, then the inner transport (raw_buffer).
    Internal(Arc<InternalUpstream>, Box<UpstreamTransport>),
}

/// `InternalUpstreamTransport`: what an internal connection (to an
/// `envoy_internal_address` host) carries into the internal listener's
/// connection besides the bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct InternalUpstream {
    /// `passthrough_metadata`, in order (a later entry with the same
    /// namespace replaces an earlier one, as Envoy).
    pub passthrough: Vec<PassthroughMetadata>,
}

/// One `passthrough_metadata` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum PassthroughMetadata {
    /// `kind: {host: {}}`: the endpoint's `filter_metadata[name]`.
    Host(String),
    /// `kind: {cluster: {}}`: the cluster's `filter_metadata[name]`,
    /// resolved when the cluster is translated (`None`: absent).
    Cluster(String, Option<serde_json::Value>),
}

/// `ProxyProtocolUpstreamTransport.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolUpstream {
    /// 1 or 2.
    pub version: u8,
    /// `pass_through_tlvs`: which TLVs the downstream PROXY header brought
    /// (as far as the listener's own `pass_through_tlvs` kept them) are
    /// sent on (v2 only).
    pub pass_through: TlvPassThrough,
    /// `added_tlvs` (static values), in order, before the passed-through
    /// ones; a type listed here is not passed through (v2 only).
    pub added_tlvs: Vec<(u8, Vec<u8>)>,
}

/// `ProxyProtocolPassThroughTLVs`; unset passes none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TlvPassThrough {
    #[default]
    None,
    /// `INCLUDE_ALL`.
    All,
    /// `INCLUDE` with these `tlv_type`s.
    Only(Vec<u8>),
}

impl TlvPassThrough {
    pub fn includes(&self, tlv_type: u8) -> bool {
        match self {
            TlvPassThrough::None => false,
            TlvPassThrough::All => true,
            TlvPassThrough::Only(t) => t.contains(&tlv_type),
        }
    }
}

impl UpstreamTransport {
    /// The TLS context, if any (inside a PROXY-protocol wrapper too).
    pub fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        match self {
            UpstreamTransport::Plain => None,
            UpstreamTransport::Tls(t) => Some(t),
            UpstreamTransport::ProxyProtocol(_, inner) | UpstreamTransport::Internal(_, inner) => {
                inner.tls()
            }
        }
    }
    /// The internal-upstream settings, when the transport is one.
    pub fn internal(&self) -> Option<&Arc<InternalUpstream>> {
        match self {
            UpstreamTransport::Internal(i, _) => Some(i),
            _ => None,
        }
    }
    /// The PROXY protocol header to send first, if any.
    pub fn proxy_protocol(&self) -> Option<&Arc<ProxyProtocolUpstream>> {
        match self {
            UpstreamTransport::ProxyProtocol(p, _) => Some(p),
            _ => None,
        }
    }
}

/// `transport_socket_matches` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportSocketMatch {
    pub name: Name,
    /// `match`: every key must equal the endpoint's
    /// `metadata.filter_metadata["envoy.transport_socket_match"]` value.
    pub criteria: serde_json::Map<String, serde_json::Value>,
    pub transport: UpstreamTransport,
}
