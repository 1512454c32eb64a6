//! Certificate validation as Envoy's `CertificateValidationContext`: chain
//! to `trusted_ca` (with CRLs), `allow_expired_certificate`,
//! `trust_chain_verification: ACCEPT_UNTRUSTED`, SPKI and certificate-hash
//! pins, and SAN matchers. Used for client certificates (mTLS termination)
//! and upstream server certificates (origination).
use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{CertRevocationList, KeyUsage, OwnedCertRevocationList};
use xds_client::config::{CertValidation, SanMatcher, SanType};

use super::{parse_certs, read, CertInfo, FileStamps};

/// A built validation context.
#[derive(Debug)]
pub struct Validator {
    roots: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    only_leaf_crl: bool,
    allow_expired: bool,
    accept_untrusted: bool,
    san: Vec<SanMatcher>,
    spki: Vec<[u8; 32]>,
    hashes: Vec<[u8; 32]>,
    max_depth: Option<u32>,
    algs: WebPkiSupportedAlgorithms,
    hints: Vec<DistinguishedName>,
}

/// Why a certificate was refused (for stats: `ssl.fail_verify_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyFailure {
    Chain,
    San,
    Pin,
}

impl Validator {
    /// Builds a validator; `sds` (a `combined_validation_context`'s SDS
    /// secret) supplies the trust roots and anything `default` leaves unset.
    pub fn build(
        default: &CertValidation,
        sds: Option<&CertValidation>,
        algs: WebPkiSupportedAlgorithms,
        stamps: &mut FileStamps,
    ) -> Result<Validator, String> {
        let merged;
        let v = match sds {
            Some(s) => {
                merged = merge(default, s);
                &merged
            }
            None => default,
        };
        let mut roots = Vec::new();
        let mut hints = Vec::new();
        if let Some(ca) = &v.trusted_ca {
            stamps.add(ca);
            let pem = read(ca).map_err(|e| format!("{}.trusted_ca: {e}", v.path))?;
            for der in parse_certs(&pem).map_err(|e| format!("{}.trusted_ca: {e}", v.path))? {
                let ta = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| format!("{}.trusted_ca: {e}", v.path))?
                    .to_owned();
                hints.push(DistinguishedName::in_sequence(ta.subject.as_ref()));
                roots.push(ta);
            }
        }
        let mut crls = Vec::new();
        if let Some(c) = &v.crl {
            stamps.add(c);
            let pem = read(c).map_err(|e| format!("{}.crl: {e}", v.path))?;
            use rustls_pki_types::{pem::PemObject, CertificateRevocationListDer};
            for der in CertificateRevocationListDer::pem_slice_iter(&pem) {
                let der = der.map_err(|e| format!("{}.crl: invalid PEM CRL: {e}", v.path))?;
                let crl = OwnedCertRevocationList::from_der(der.as_ref())
                    .map_err(|e| format!("{}.crl: {e}", v.path))?;
                crls.push(CertRevocationList::from(crl));
            }
            if crls.is_empty() {
                return Err(format!("{}.crl: no PEM CRL found", v.path));
            }
        }
        Ok(Validator {
            roots,
            crls,
            only_leaf_crl: v.only_verify_leaf_cert_crl,
            allow_expired: v.allow_expired,
            accept_untrusted: v.accept_untrusted,
            san: v.san_matchers.clone(),
            spki: v.spki_hashes.clone(),
            hashes: v.cert_hashes.clone(),
            max_depth: v.max_verify_depth,
            algs,
            hints,
        })
    }

    pub fn has_roots(&self) -> bool {
        !self.roots.is_empty()
    }

    /// Validates a peer chain for `usage` (`skip_san`: the SAN matchers are
    /// replaced by another check, `auto_sni_san_validation`).
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
        skip_san: bool,
    ) -> Result<(), (Error, VerifyFailure)> {
        let info = CertInfo::parse(end_entity).ok_or((
            Error::InvalidCertificate(CertificateError::BadEncoding),
            VerifyFailure::Chain,
        ))?;
        if !self.roots.is_empty() {
            if let Err(e) = self.verify_chain(end_entity, intermediates, now, &info, usage) {
                if !self.accept_untrusted {
                    return Err((e, VerifyFailure::Chain));
                }
            }
        }
        if !self.spki.is_empty() || !self.hashes.is_empty() {
            let ok = self.hashes.contains(&info.sha256) || self.spki.contains(&info.spki_sha256);
            if !ok {
                return Err((
                    Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
                    VerifyFailure::Pin,
                ));
            }
        }
        if !skip_san && !self.san.is_empty() && !san_matches(&self.san, &info) {
            return Err((
                Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
                VerifyFailure::San,
            ));
        }
        Ok(())
    }

    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        info: &CertInfo,
        usage: KeyUsage,
    ) -> Result<(), Error> {
        if let Some(d) = self.max_depth {
            if intermediates.len() as u32 > d {
                return Err(Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(std::io::Error::other(
                        "certificate chain too long",
                    ))),
                )));
            }
        }
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(map_err)?;
        // allow_expired_certificate: validate as of a moment inside the
        // certificate's own validity.
        let now = if self.allow_expired {
            let mid = info.not_before + (info.not_after - info.not_before) / 2;
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(mid.max(0) as u64))
        } else {
            now
        };
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = if crl_refs.is_empty() {
            None
        } else {
            webpki::RevocationOptionsBuilder::new(&crl_refs)
                .ok()
                .map(|b| {
                    let b = if self.only_leaf_crl {
                        b.with_depth(webpki::RevocationCheckDepth::EndEntity)
                    } else {
                        b
                    };
                    b.with_status_policy(webpki::UnknownStatusPolicy::Allow)
                        .build()
                })
        };
        ee.verify_for_usage(
            self.algs.all,
            &self.roots,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map(|_| ())
        .map_err(map_err)
    }
}

/// `combined_validation_context`: the SDS secret's context, with the
/// default context's matchers and flags where the secret sets none.
fn merge(default: &CertValidation, sds: &CertValidation) -> CertValidation {
    let mut v = sds.clone();
    if v.san_matchers.is_empty() {
        v.san_matchers = default.san_matchers.clone();
    }
    if v.spki_hashes.is_empty() {
        v.spki_hashes = default.spki_hashes.clone();
    }
    if v.cert_hashes.is_empty() {
        v.cert_hashes = default.cert_hashes.clone();
    }
    if v.trusted_ca.is_none() {
        v.trusted_ca = default.trusted_ca.clone();
    }
    if v.crl.is_none() {
        v.crl = default.crl.clone();
    }
    v.allow_expired |= default.allow_expired;
    v.accept_untrusted |= default.accept_untrusted;
    v.only_verify_leaf_cert_crl |= default.only_verify_leaf_cert_crl;
    if v.max_verify_depth.is_none() {
        v.max_verify_depth = default.max_verify_depth;
    }
    v
}

fn san_matches(matchers: &[SanMatcher], info: &CertInfo) -> bool {
    matchers.iter().any(|m| {
        let lists: &[&Vec<String>] = match m.san {
            SanType::Uri => &[&info.uri_sans],
            SanType::Dns => &[&info.dns_sans],
            SanType::Email => &[&info.email_sans],
            SanType::Ip => &[&info.ip_sans],
            SanType::Any => &[
                &info.dns_sans,
                &info.uri_sans,
                &info.email_sans,
                &info.ip_sans,
            ],
        };
        lists.iter().any(|l| {
            l.iter().any(|v| {
                // DNS SAN wildcards match as Envoy's dnsNameMatch: an exact
                // matcher "a.example.com" accepts SAN "*.example.com".
                m.matcher.matches(v)
                    || (matches!(m.san, SanType::Dns | SanType::Any)
                        && v.starts_with("*.")
                        && matches!(&m.matcher.kind,
                            xds_client::config::StringMatch::Exact(e) if dns_matches(v, e)))
            })
        })
    })
}

/// Validates a peer chain (no validator: accepted, as Envoy) and counts a
/// refusal in `ssl.fail_verify_*`.
fn check(
    validator: Option<&Validator>,
    stats: Option<&crate::metrics::SslStats>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
    skip_san: bool,
) -> Result<(), Error> {
    let Some(v) = validator else {
        return Ok(());
    };
    v.verify(end_entity, intermediates, now, usage, skip_san)
        .map_err(|(e, why)| {
            if let Some(s) = stats {
                s.count_failure(why);
            }
            e
        })
}

/// A DNS name or `*.example.com` wildcard (one label) against a host name.
pub fn dns_matches(san: &str, host: &str) -> bool {
    match san.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(suffix)),
        None => san.eq_ignore_ascii_case(host),
    }
}

fn map_err(e: webpki::Error) -> Error {
    use webpki::Error as W;
    Error::InvalidCertificate(match e {
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding,
        W::CertExpired { .. } | W::InvalidCertValidity => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::CertRevoked => CertificateError::Revoked,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        other => CertificateError::Other(OtherError(Arc::new(std::io::Error::other(format!(
            "{other:?}"
        ))))),
    })
}

/// The schemes advertised to the peer: `allowed` (in its order) that the
/// provider implements, else all the provider's.
fn supported_schemes(
    algs: &WebPkiSupportedAlgorithms,
    allowed: Option<&[SignatureScheme]>,
) -> Vec<SignatureScheme> {
    let all = algs.supported_schemes();
    match allowed {
        Some(a) => a.iter().copied().filter(|s| all.contains(s)).collect(),
        None => all,
    }
}

/// A peer's handshake signature must use an allowed scheme (rustls already
/// refuses schemes it did not advertise; this keeps the rule local).
fn scheme_allowed(
    allowed: Option<&[SignatureScheme]>,
    dss: &DigitallySignedStruct,
) -> Result<(), Error> {
    match allowed {
        Some(a) if !a.contains(&dss.scheme) => Err(Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        )),
        _ => Ok(()),
    }
}

/// Client-certificate verifier for a downstream TLS context.
#[derive(Debug)]
pub struct ClientVerifier {
    pub validator: Option<Validator>,
    pub mandatory: bool,
    pub algs: WebPkiSupportedAlgorithms,
    /// `signature_algorithms`: the schemes accepted from the peer (and
    /// advertised), in preference order; `None`: all of `algs`.
    pub allowed: Option<Vec<SignatureScheme>>,
    pub stats: Option<Arc<crate::metrics::SslStats>>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.validator.is_some() || self.mandatory
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.validator.as_ref().map(|v| &v.hints[..]).unwrap_or(&[])
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        check(
            self.validator.as_ref(),
            self.stats.as_deref(),
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
            false,
        )
        .map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        scheme_allowed(self.allowed.as_deref(), dss)?;
        verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        scheme_allowed(self.allowed.as_deref(), dss)?;
        verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes(&self.algs, self.allowed.as_deref())
    }
}

/// Upstream server-certificate verifier. As Envoy, without a validation
/// context any certificate is accepted, and the host name is never checked
/// against SNI: only the trust chain and the SAN matchers decide.
#[derive(Debug)]
pub struct ServerVerifier {
    pub validator: Option<Validator>,
    pub algs: WebPkiSupportedAlgorithms,
    /// As [`ClientVerifier::allowed`].
    pub allowed: Option<Vec<SignatureScheme>>,
    pub stats: Option<Arc<crate::metrics::SslStats>>,
    /// `auto_san_validation`: a DNS SAN must match the SNI sent.
    pub auto_san: bool,
    /// `auto_sni_san_validation`: a DNS SAN must match the SNI sent, instead
    /// of the validation context's SAN matchers (no SNI sent: the matchers).
    pub auto_sni_san: bool,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let sni_sent = matches!(server_name, ServerName::DnsName(_));
        if self.auto_san || self.auto_sni_san {
            if let ServerName::DnsName(name) = server_name {
                let ok = CertInfo::parse(end_entity).is_some_and(|info| {
                    info.dns_sans
                        .iter()
                        .any(|san| dns_matches(san, name.as_ref()))
                });
                if !ok {
                    if let Some(s) = &self.stats {
                        s.count_failure(VerifyFailure::San);
                    }
                    return Err(Error::InvalidCertificate(
                        CertificateError::ApplicationVerificationFailure,
                    ));
                }
            }
        }
        check(
            self.validator.as_ref(),
            self.stats.as_deref(),
            end_entity,
            intermediates,
            now,
            KeyUsage::server_auth(),
            self.auto_sni_san && sni_sent,
        )
        .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        scheme_allowed(self.allowed.as_deref(), dss)?;
        verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        scheme_allowed(self.allowed.as_deref(), dss)?;
        verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes(&self.algs, self.allowed.as_deref())
    }
}
