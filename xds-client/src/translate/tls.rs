//! TLS transport sockets, secrets and validation contexts.
use std::sync::Arc;

use crate::api::envoy::config::core::v3 as core;
use crate::api::envoy::extensions::transport_sockets::tls::v3 as tls;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::{decode, duration, err, string_matcher};

const TLS_TYPE: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM_TLS_TYPE: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const RAW_BUFFER_TYPE: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
const PROXY_PROTOCOL_TYPE: &str =
    "envoy.extensions.transport_sockets.proxy_protocol.v3.ProxyProtocolUpstreamTransport";

/// A filter chain's `transport_socket`: `None` for raw_buffer.
pub fn downstream_transport(
    ts: &core::TransportSocket,
    path: &str,
) -> Result<Option<DownstreamTls>, ConfigErrors> {
    let any = match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(a)) => a,
        None => return Err(err(join(path, "typed_config"), "typed_config is required")),
    };
    let tpath = join(path, "typed_config");
    if any.type_url.ends_with(RAW_BUFFER_TYPE) {
        return Ok(None);
    }
    if !any.type_url.ends_with(TLS_TYPE) {
        return Err(err(
            tpath,
            format!(
                "downstream transport socket {} is not implemented (weir has tls and raw_buffer)",
                any.type_url
            ),
        ));
    }
    let p: tls::DownstreamTlsContext = decode(any, &tpath)?;
    downstream_tls(&p, &tpath).map(Some)
}

pub fn downstream_tls(
    p: &tls::DownstreamTlsContext,
    path: &str,
) -> Result<DownstreamTls, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let common = p.common_tls_context.clone().unwrap_or_default();
    let cpath = join(path, "common_tls_context");
    let c = common_context(&common, &cpath, &mut errs);
    if c.certs.is_empty() {
        errs.push(
            cpath.clone(),
            "a server TLS context needs tls_certificates or tls_certificate_sds_secret_configs",
        );
    }
    let require_client_cert = p
        .require_client_certificate
        .as_ref()
        .is_some_and(|b| b.value);
    if require_client_cert && c.validation.is_none() {
        errs.push(
            join(path, "require_client_certificate"),
            "require_client_certificate needs a validation context with trusted_ca (Envoy rejects it too)",
        );
    }
    // `require_sni` is accepted without effect: Envoy 1.40 does not
    // implement it either (a hidden field; a ClientHello without SNI is
    // served), so weir behaves as Envoy does.
    use tls::downstream_tls_context::OcspStaplePolicy as Ocsp;
    let ocsp_staple_policy = match Ocsp::try_from(p.ocsp_staple_policy) {
        Ok(Ocsp::LenientStapling) => OcspStaplePolicy::Lenient,
        Ok(Ocsp::StrictStapling) => OcspStaplePolicy::Strict,
        Ok(Ocsp::MustStaple) => OcspStaplePolicy::MustStaple,
        Err(_) => {
            errs.push(join(path, "ocsp_staple_policy"), "unknown value");
            OcspStaplePolicy::Lenient
        }
    };
    let mut session_tickets = true;
    let mut ticket_keys = None;
    let mut sds = c.sds;
    if let Some(t) = &p.session_ticket_keys_type {
        use tls::downstream_tls_context::SessionTicketKeysType as T;
        match t {
            T::DisableStatelessSessionResumption(d) => session_tickets = !d,
            T::SessionTicketKeys(k) => {
                match session_ticket_keys(k, &join(path, "session_ticket_keys")) {
                    Ok(k) => ticket_keys = Some(SecretRef::Inline(k)),
                    Err(e) => errs.extend(e),
                }
            }
            T::SessionTicketKeysSdsSecretConfig(s) => match sds_name(
                s,
                &join(path, "session_ticket_keys_sds_secret_config"),
                &mut sds,
            ) {
                Ok(n) => ticket_keys = Some(SecretRef::Sds(n)),
                Err(e) => errs.extend(e),
            },
        }
    }
    let session_timeout = match &p.session_timeout {
        Some(d) => match duration(d, &join(path, "session_timeout")) {
            Ok(d) => Some(d),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
        None => None,
    };
    errs.into_result(DownstreamTls {
        certs: c.certs,
        params: c.params,
        alpn: c.alpn,
        validation: c.validation,
        sds,
        require_client_cert,
        session_tickets,
        ticket_keys,
        chain_server_names: Vec::new(),
        ocsp_staple_policy,
        session_cache: !p.disable_stateful_session_resumption,
        session_timeout,
        prefer_client_ciphers: p.prefer_client_ciphers,
        path: path.to_owned(),
    })
}

/// A cluster's `transport_socket`.
pub fn upstream_transport(
    ts: &core::TransportSocket,
    path: &str,
) -> Result<UpstreamTransport, ConfigErrors> {
    let any = match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(a)) => a,
        None => return Err(err(join(path, "typed_config"), "typed_config is required")),
    };
    let tpath = join(path, "typed_config");
    if any.type_url.ends_with(RAW_BUFFER_TYPE) {
        return Ok(UpstreamTransport::Plain);
    }
    if any.type_url.ends_with(PROXY_PROTOCOL_TYPE) {
        use crate::api::envoy::extensions::transport_sockets::proxy_protocol::v3::ProxyProtocolUpstreamTransport;
        let p: ProxyProtocolUpstreamTransport = decode(any, &tpath)?;
        let mut errs = ConfigErrors::default();
        let cfg = proxy_protocol_upstream(p.config.as_ref(), &join(&tpath, "config"), &mut errs);
        // `allow_unspecified_address` and `tlv_as_pool_key` are hidden,
        // not-implemented fields in Envoy 1.40 (nothing reads them); they
        // are accepted without effect in the support table.
        let inner = match &p.transport_socket {
            Some(ts) => upstream_transport(ts, &join(&tpath, "transport_socket"))
                .map_err(|e| errs.extend(e))
                .ok(),
            None => Some(UpstreamTransport::Plain),
        };
        if let UpstreamTransport::ProxyProtocol(..) =
            inner.as_ref().unwrap_or(&UpstreamTransport::Plain)
        {
            errs.push(
                join(&tpath, "transport_socket"),
                "nested PROXY protocol transports",
            );
        }
        return match inner {
            Some(inner) if errs.is_empty() => Ok(UpstreamTransport::ProxyProtocol(
                Arc::new(cfg),
                Box::new(inner),
            )),
            _ => Err(errs),
        };
    }
    if any.type_url.ends_with(INTERNAL_UPSTREAM_TYPE) {
        return internal_upstream(any, &tpath);
    }
    if !any.type_url.ends_with(UPSTREAM_TLS_TYPE) {
        return Err(err(
            tpath,
            format!(
                "upstream transport socket {} is not implemented (weir has tls and raw_buffer)",
                any.type_url
            ),
        ));
    }
    let p: tls::UpstreamTlsContext = decode(any, &tpath)?;
    upstream_tls(&p, &tpath).map(|t| UpstreamTransport::Tls(Arc::new(t)))
}

const INTERNAL_UPSTREAM_TYPE: &str =
    "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport";

/// `InternalUpstreamTransport`: host and cluster metadata passed through
/// (request and route kinds are Envoy's proto options it does not
/// implement either: rejected), over raw_buffer.
fn internal_upstream(
    any: &crate::api::google::protobuf::Any,
    tpath: &str,
) -> Result<UpstreamTransport, ConfigErrors> {
    use crate::api::envoy::extensions::transport_sockets::internal_upstream::v3::InternalUpstreamTransport;
    use crate::api::envoy::r#type::metadata::v3::metadata_kind::Kind;
    let p: InternalUpstreamTransport = decode(any, tpath)?;
    let mut errs = ConfigErrors::default();
    let mut passthrough = Vec::new();
    for (i, m) in p.passthrough_metadata.iter().enumerate() {
        let mpath = format!("{tpath}.passthrough_metadata[{i}]");
        if m.name.is_empty() {
            errs.push(join(&mpath, "name"), "a metadata namespace is required");
            continue;
        }
        match m.kind.as_ref().and_then(|k| k.kind.as_ref()) {
            Some(Kind::Host(_)) => passthrough.push(PassthroughMetadata::Host(m.name.clone())),
            Some(Kind::Cluster(_)) => {
                passthrough.push(PassthroughMetadata::Cluster(m.name.clone(), None))
            }
            Some(Kind::Request(_)) | Some(Kind::Route(_)) => errs.push(
                join(&mpath, "kind"),
                "only host and cluster metadata can be passed to an internal connection",
            ),
            None => errs.push(join(&mpath, "kind"), "a metadata kind is required"),
        }
    }
    let inner = match &p.transport_socket {
        Some(ts) => upstream_transport(ts, &join(tpath, "transport_socket"))
            .map_err(|e| errs.extend(e))
            .ok(),
        None => Some(UpstreamTransport::Plain),
    };
    match &inner {
        Some(UpstreamTransport::Plain) | None => {}
        Some(_) => errs.push(
            join(tpath, "transport_socket"),
            "weir runs internal connections over raw_buffer only (TLS or PROXY protocol inside \
             internal_upstream is not implemented: Istio's double HBONE (inner_connect_originate) \
             and PROXY-protocol sandwich modes need it)",
        ),
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(UpstreamTransport::Internal(
        Arc::new(InternalUpstream { passthrough }),
        Box::new(UpstreamTransport::Plain),
    ))
}

/// `ProxyProtocolUpstreamTransport.config` (unset: v1, no TLVs).
fn proxy_protocol_upstream(
    c: Option<&core::ProxyProtocolConfig>,
    path: &str,
    errs: &mut ConfigErrors,
) -> ProxyProtocolUpstream {
    let Some(c) = c else {
        return ProxyProtocolUpstream {
            version: 1,
            pass_through: TlvPassThrough::None,
            added_tlvs: Vec::new(),
        };
    };
    let mut added_tlvs = Vec::new();
    for (i, t) in c.added_tlvs.iter().enumerate() {
        let tp = format!("{path}.added_tlvs[{i}]");
        let Ok(ty) = u8::try_from(t.r#type) else {
            errs.push(join(&tp, "type"), "must be below 256");
            continue;
        };
        // As Envoy's parseTLVs: exactly one of value and format_string
        // (format_string itself is not in the support table).
        if t.value.is_empty() && t.format_string.is_none() {
            errs.push(tp, "one of 'value' or 'format_string' must be set");
            continue;
        }
        added_tlvs.push((ty, t.value.clone()));
    }
    ProxyProtocolUpstream {
        version: if c.version == 1 { 2 } else { 1 },
        pass_through: tlv_pass_through(
            c.pass_through_tlvs.as_ref(),
            &join(path, "pass_through_tlvs"),
            errs,
        ),
        added_tlvs,
    }
}

/// `ProxyProtocolPassThroughTLVs` (listener filter and upstream socket).
pub fn tlv_pass_through(
    p: Option<&core::ProxyProtocolPassThroughTlVs>,
    path: &str,
    errs: &mut ConfigErrors,
) -> TlvPassThrough {
    let Some(p) = p else {
        return TlvPassThrough::None;
    };
    // INCLUDE_ALL = 0, INCLUDE = 1.
    if p.match_type != 1 {
        return TlvPassThrough::All;
    }
    let mut types = Vec::new();
    for (i, t) in p.tlv_type.iter().enumerate() {
        match u8::try_from(*t) {
            Ok(t) => types.push(t),
            Err(_) => errs.push(format!("{path}.tlv_type[{i}]"), "must be below 256"),
        }
    }
    TlvPassThrough::Only(types)
}

pub fn upstream_tls(p: &tls::UpstreamTlsContext, path: &str) -> Result<UpstreamTls, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let common = p.common_tls_context.clone().unwrap_or_default();
    let cpath = join(path, "common_tls_context");
    let mut c = common_context(&common, &cpath, &mut errs);
    // As Envoy: a client's default (TLS_AUTO) maximum is TLS 1.2; servers'
    // is 1.3.
    let auto_max = common.tls_params.as_ref().is_none_or(|t| {
        t.tls_maximum_protocol_version == tls::tls_parameters::TlsProtocol::TlsAuto as i32
    });
    if auto_max {
        c.params.max_version = TlsVersion::V1_2;
        if c.params.min_version > TlsVersion::V1_2 {
            errs.push(
                join(&cpath, "tls_params.tls_minimum_protocol_version"),
                "TLSv1_3 needs tls_maximum_protocol_version TLSv1_3 upstream (Envoy's client default maximum is TLSv1_2)",
            );
        }
    }
    if c.certs.len() > 1 {
        errs.push(
            join(&cpath, "tls_certificates"),
            "an upstream TLS context takes at most one client certificate",
        );
    }
    if p.allow_renegotiation {
        errs.push(
            join(path, "allow_renegotiation"),
            "TLS renegotiation is not supported (rustls never renegotiates)",
        );
    }
    if p.auto_sni_san_validation && c.validation.is_none() {
        // Envoy's words: checking the SAN needs a validation context.
        errs.push(
            join(path, "auto_sni_san_validation"),
            "'auto_sni_san_validation' was configured without a validation context",
        );
    }
    if !p.sni.is_empty() && rustls_name_ok(&p.sni).is_err() {
        errs.push(
            join(path, "sni"),
            format!("{:?} is not a valid server name", p.sni),
        );
    }
    errs.into_result(UpstreamTls {
        sni: (!p.sni.is_empty()).then(|| p.sni.clone()),
        auto_host_sni: p.auto_host_sni,
        auto_sni_san_validation: p.auto_sni_san_validation,
        cert: c.certs.into_iter().next(),
        params: c.params,
        alpn: c.alpn,
        validation: c.validation,
        sds: c.sds,
        max_session_keys: p.max_session_keys.as_ref().map(|v| v.value).unwrap_or(1),
        path: path.to_owned(),
    })
}

fn rustls_name_ok(s: &str) -> Result<(), ()> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

struct Common {
    certs: Vec<SecretRef<TlsCertificate>>,
    params: TlsParams,
    alpn: Vec<Vec<u8>>,
    validation: Option<ValidationRef>,
    sds: Vec<SdsRef>,
}

fn common_context(c: &tls::CommonTlsContext, path: &str, errs: &mut ConfigErrors) -> Common {
    let params = match &c.tls_params {
        Some(p) => tls_params(p, &join(path, "tls_params")).unwrap_or_else(|e| {
            errs.extend(e);
            TlsParams::default()
        }),
        None => TlsParams::default(),
    };
    let mut certs = Vec::new();
    let mut sds = Vec::new();
    for (i, t) in c.tls_certificates.iter().enumerate() {
        match tls_certificate(t, &format!("{path}.tls_certificates[{i}]")) {
            Ok(t) => certs.push(SecretRef::Inline(t)),
            Err(e) => errs.extend(e),
        }
    }
    for (i, s) in c.tls_certificate_sds_secret_configs.iter().enumerate() {
        match sds_name(
            s,
            &format!("{path}.tls_certificate_sds_secret_configs[{i}]"),
            &mut sds,
        ) {
            Ok(n) => certs.push(SecretRef::Sds(n)),
            Err(e) => errs.extend(e),
        }
    }
    let mut alpn = Vec::new();
    for (i, a) in c.alpn_protocols.iter().enumerate() {
        if a.is_empty() || a.len() > 255 {
            errs.push(
                format!("{path}.alpn_protocols[{i}]"),
                "an ALPN protocol is 1 to 255 bytes",
            );
        } else {
            alpn.push(a.as_bytes().to_vec());
        }
    }
    use tls::common_tls_context::ValidationContextType as V;
    let validation = match &c.validation_context_type {
        None => None,
        Some(V::ValidationContext(v)) => {
            match validation_context(v, &join(path, "validation_context")) {
                Ok(v) => Some(ValidationRef::Inline(v)),
                Err(e) => {
                    errs.extend(e);
                    None
                }
            }
        }
        Some(V::ValidationContextSdsSecretConfig(s)) => {
            match sds_name(
                s,
                &join(path, "validation_context_sds_secret_config"),
                &mut sds,
            ) {
                Ok(n) => Some(ValidationRef::Sds(n)),
                Err(e) => {
                    errs.extend(e);
                    None
                }
            }
        }
        Some(V::CombinedValidationContext(cv)) => {
            let cpath = join(path, "combined_validation_context");
            let default = match &cv.default_validation_context {
                Some(d) => validation_context(d, &join(&cpath, "default_validation_context"))
                    .unwrap_or_else(|e| {
                        errs.extend(e);
                        CertValidation::default()
                    }),
                None => CertValidation::default(),
            };
            match &cv.validation_context_sds_secret_config {
                Some(s) => match sds_name(
                    s,
                    &join(&cpath, "validation_context_sds_secret_config"),
                    &mut sds,
                ) {
                    Ok(n) => Some(ValidationRef::Combined { default, sds: n }),
                    Err(e) => {
                        errs.extend(e);
                        None
                    }
                },
                None => {
                    errs.push(
                        join(&cpath, "validation_context_sds_secret_config"),
                        "combined_validation_context needs validation_context_sds_secret_config",
                    );
                    None
                }
            }
        }
        Some(_) => {
            errs.push(
                path.to_owned(),
                "certificate-provider validation contexts are not implemented",
            );
            None
        }
    };
    Common {
        certs,
        params,
        alpn,
        validation,
        sds,
    }
}

/// An `SdsSecretConfig`: a `static_resources.secrets` entry by name, or
/// with `sds_config` a secret fetched by SDS (recorded in `sds`).
fn sds_name(
    s: &tls::SdsSecretConfig,
    path: &str,
    sds: &mut Vec<SdsRef>,
) -> Result<Name, ConfigErrors> {
    if s.name.is_empty() {
        return Err(err(join(path, "name"), "an SDS secret needs a name"));
    }
    let name: Name = s.name.as_str().into();
    if let Some(cs) = &s.sds_config {
        let source = super::xds::config_source(cs, &join(path, "sds_config"))?;
        sds.push(SdsRef {
            name: name.clone(),
            source,
        });
    }
    Ok(name)
}

fn cert_data(d: &core::DataSource, path: &str) -> Result<CertData, ConfigErrors> {
    use core::data_source::Specifier as S;
    match &d.specifier {
        Some(S::Filename(f)) => Ok(CertData::File(f.into())),
        Some(S::InlineBytes(b)) => Ok(CertData::Inline(b.clone().into())),
        Some(S::InlineString(s)) => Ok(CertData::Inline(s.as_bytes().into())),
        Some(S::EnvironmentVariable(_)) => {
            super::data_source(d, path).map(|b| CertData::Inline(b.into()))
        }
        None => Err(err(path, "data source is empty")),
    }
}

pub fn tls_certificate(
    t: &tls::TlsCertificate,
    path: &str,
) -> Result<TlsCertificate, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let chain = match &t.certificate_chain {
        Some(d) => cert_data(d, &join(path, "certificate_chain"))
            .map_err(|e| errs.extend(e))
            .ok(),
        None => {
            errs.push(
                join(path, "certificate_chain"),
                "certificate_chain is required",
            );
            None
        }
    };
    let key = match &t.private_key {
        Some(d) => cert_data(d, &join(path, "private_key"))
            .map_err(|e| errs.extend(e))
            .ok(),
        None => {
            errs.push(join(path, "private_key"), "private_key is required");
            None
        }
    };
    let ocsp_staple = match &t.ocsp_staple {
        Some(d) => cert_data(d, &join(path, "ocsp_staple"))
            .map_err(|e| errs.extend(e))
            .ok(),
        None => None,
    };
    match (chain, key) {
        (Some(chain), Some(key)) if errs.is_empty() => Ok(TlsCertificate {
            chain,
            key,
            ocsp_staple,
            path: path.to_owned(),
        }),
        _ => Err(errs),
    }
}

pub fn validation_context(
    v: &tls::CertificateValidationContext,
    path: &str,
) -> Result<CertValidation, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = CertValidation {
        path: path.to_owned(),
        allow_expired: v.allow_expired_certificate,
        only_verify_leaf_cert_crl: v.only_verify_leaf_cert_crl,
        max_verify_depth: v.max_verify_depth.as_ref().map(|d| d.value),
        ..Default::default()
    };
    if let Some(ca) = &v.trusted_ca {
        match cert_data(ca, &join(path, "trusted_ca")) {
            Ok(d) => out.trusted_ca = Some(d),
            Err(e) => errs.extend(e),
        }
    }
    if let Some(crl) = &v.crl {
        match cert_data(crl, &join(path, "crl")) {
            Ok(d) => out.crl = Some(d),
            Err(e) => errs.extend(e),
        }
    }
    match tls::certificate_validation_context::TrustChainVerification::try_from(
        v.trust_chain_verification,
    ) {
        Ok(tls::certificate_validation_context::TrustChainVerification::AcceptUntrusted) => {
            out.accept_untrusted = true
        }
        Ok(_) => {}
        Err(_) => errs.push(join(path, "trust_chain_verification"), "unknown value"),
    }
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let mpath = format!("{path}.match_typed_subject_alt_names[{i}]");
        use tls::subject_alt_name_matcher::SanType as T;
        let san = match T::try_from(m.san_type) {
            Ok(T::Email) => SanType::Email,
            Ok(T::Dns) => SanType::Dns,
            Ok(T::Uri) => SanType::Uri,
            Ok(T::IpAddress) => SanType::Ip,
            Ok(T::OtherName) => {
                errs.push(
                    join(&mpath, "san_type"),
                    "OTHER_NAME SANs are not implemented",
                );
                continue;
            }
            _ => {
                errs.push(join(&mpath, "san_type"), "san_type is required");
                continue;
            }
        };
        match m.matcher.as_ref() {
            Some(sm) => match string_matcher(sm, &join(&mpath, "matcher")) {
                Ok(matcher) => out.san_matchers.push(SanMatcher { san, matcher }),
                Err(e) => errs.extend(e),
            },
            None => errs.push(join(&mpath, "matcher"), "matcher is required"),
        }
    }
    for (i, sm) in v.match_subject_alt_names.iter().enumerate() {
        match string_matcher(sm, &format!("{path}.match_subject_alt_names[{i}]")) {
            Ok(matcher) => out.san_matchers.push(SanMatcher {
                san: SanType::Any,
                matcher,
            }),
            Err(e) => errs.extend(e),
        }
    }
    for (i, s) in v.verify_certificate_spki.iter().enumerate() {
        match base64_32(s) {
            Some(h) => out.spki_hashes.push(h),
            None => errs.push(
                format!("{path}.verify_certificate_spki[{i}]"),
                "expected the base64 of a SHA-256 digest (44 characters)",
            ),
        }
    }
    for (i, s) in v.verify_certificate_hash.iter().enumerate() {
        match hex_32(s) {
            Some(h) => out.cert_hashes.push(h),
            None => errs.push(
                format!("{path}.verify_certificate_hash[{i}]"),
                "expected a hex SHA-256 digest (64 hex digits, optionally colon-separated)",
            ),
        }
    }
    errs.into_result(out)
}

fn hex_32(s: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn base64_32(s: &str) -> Option<[u8; 32]> {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let s = s.trim_end_matches('=');
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::with_capacity(33);
    for c in s.bytes() {
        let v = ALPHA.iter().position(|a| *a == c)? as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    out.try_into().ok()
}

/// OpenSSL/BoringSSL names weir implements.
fn cipher(name: &str) -> Option<CipherSuite> {
    Some(match name {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => CipherSuite::EcdheEcdsaAes128GcmSha256,
        "ECDHE-ECDSA-AES256-GCM-SHA384" => CipherSuite::EcdheEcdsaAes256GcmSha384,
        "ECDHE-ECDSA-CHACHA20-POLY1305" => CipherSuite::EcdheEcdsaChacha20Poly1305,
        "ECDHE-RSA-AES128-GCM-SHA256" => CipherSuite::EcdheRsaAes128GcmSha256,
        "ECDHE-RSA-AES256-GCM-SHA384" => CipherSuite::EcdheRsaAes256GcmSha384,
        "ECDHE-RSA-CHACHA20-POLY1305" => CipherSuite::EcdheRsaChacha20Poly1305,
        _ => return None,
    })
}

/// Names BoringSSL knows but rustls does not implement (RSA key exchange,
/// CBC, PSK): dropped from the offered list with a startup warning, as long
/// as one implemented suite remains.
const KNOWN_UNIMPLEMENTED: &[&str] = &[
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "ECDHE-PSK-AES128-CBC-SHA",
    "ECDHE-PSK-AES256-CBC-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "PSK-AES128-CBC-SHA",
    "PSK-AES256-CBC-SHA",
    "DES-CBC3-SHA",
];

/// TLS 1.3 suite names (BoringSSL does not let them be configured; Envoy
/// ignores them in `cipher_suites`).
const TLS13_NAMES: &[&str] = &[
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

pub fn tls_params(p: &tls::TlsParameters, path: &str) -> Result<TlsParams, ConfigErrors> {
    use tls::tls_parameters::TlsProtocol as P;
    let mut errs = ConfigErrors::default();
    let mut out = TlsParams::default();
    // 1.0 and 1.1 are never offered: a minimum at or below 1.2 means 1.2.
    match P::try_from(p.tls_minimum_protocol_version) {
        Ok(P::TlsAuto | P::TlSv10 | P::TlSv11 | P::TlSv12) => out.min_version = TlsVersion::V1_2,
        Ok(P::TlSv13) => out.min_version = TlsVersion::V1_3,
        Err(_) => errs.push(join(path, "tls_minimum_protocol_version"), "unknown value"),
    }
    match P::try_from(p.tls_maximum_protocol_version) {
        Ok(P::TlsAuto | P::TlSv13) => out.max_version = TlsVersion::V1_3,
        Ok(P::TlSv12) => out.max_version = TlsVersion::V1_2,
        Ok(P::TlSv10 | P::TlSv11) => errs.push(
            join(path, "tls_maximum_protocol_version"),
            "TLS 1.0 and 1.1 are not supported; the maximum must be TLSv1_2 or TLSv1_3",
        ),
        Err(_) => errs.push(join(path, "tls_maximum_protocol_version"), "unknown value"),
    }
    if out.max_version < out.min_version {
        errs.push(
            join(path, "tls_maximum_protocol_version"),
            "maximum protocol version is below the minimum",
        );
    }
    let mut dropped = Vec::new();
    for (i, entry) in p.cipher_suites.iter().enumerate() {
        // BoringSSL's equal-preference groups: `[A|B]`.
        let inner = entry.trim_start_matches('[').trim_end_matches(']');
        for name in inner.split('|').map(str::trim).filter(|n| !n.is_empty()) {
            if let Some(c) = cipher(name) {
                if !out.cipher_suites.contains(&c) {
                    out.cipher_suites.push(c);
                }
            } else if KNOWN_UNIMPLEMENTED.contains(&name) || TLS13_NAMES.contains(&name) {
                dropped.push(name.to_owned());
            } else {
                errs.push(
                    format!("{path}.cipher_suites[{i}]"),
                    format!("unknown cipher suite {name:?}"),
                );
            }
        }
    }
    if !p.cipher_suites.is_empty() && out.cipher_suites.is_empty() && errs.is_empty() {
        errs.push(
            join(path, "cipher_suites"),
            format!(
                "none of the cipher suites is implemented by weir (it has ECDHE with AES-GCM and CHACHA20-POLY1305); not implemented: {}",
                dropped.join(", ")
            ),
        );
    } else if !dropped.is_empty() {
        tracing::warn!(
            field = %join(path, "cipher_suites"),
            "cipher suites not implemented by weir are not offered: {}",
            dropped.join(", ")
        );
    }
    for (i, c) in p.ecdh_curves.iter().enumerate() {
        let curve = match c.as_str() {
            "X25519" => Curve::X25519,
            "P-256" | "prime256v1" | "secp256r1" => Curve::P256,
            "P-384" | "secp384r1" => Curve::P384,
            other => {
                errs.push(
                    format!("{path}.ecdh_curves[{i}]"),
                    format!("curve {other:?} is not implemented (weir has X25519, P-256, P-384)"),
                );
                continue;
            }
        };
        if !out.curves.contains(&curve) {
            out.curves.push(curve);
        }
    }
    let mut unimplemented = Vec::new();
    for (i, name) in p.signature_algorithms.iter().enumerate() {
        match signature_algorithm(name) {
            Some(Ok(a)) => {
                if !out.signature_algorithms.contains(&a) {
                    out.signature_algorithms.push(a);
                }
            }
            Some(Err(())) => unimplemented.push(name.clone()),
            None => errs.push(
                format!("{path}.signature_algorithms[{i}]"),
                format!("unknown signature algorithm {name:?}"),
            ),
        }
    }
    if !p.signature_algorithms.is_empty() && out.signature_algorithms.is_empty() && errs.is_empty()
    {
        errs.push(
            join(path, "signature_algorithms"),
            format!(
                "none of the signature algorithms is implemented by weir (it has ECDSA P-256/P-384, RSA PKCS#1 and PSS with SHA-256/384/512, Ed25519); not implemented: {}",
                unimplemented.join(", ")
            ),
        );
    } else if !unimplemented.is_empty() {
        tracing::warn!(
            field = %join(path, "signature_algorithms"),
            "signature algorithms not implemented by weir are not used: {}",
            unimplemented.join(", ")
        );
    }
    errs.into_result(out)
}

/// A BoringSSL signature algorithm name (`SSL_CTX_set1_sigalgs_list`: the
/// TLS 1.3 names, or OpenSSL's `KEYTYPE+HASH` form). `Some(Err)`: a name
/// BoringSSL knows that rustls does not implement (SHA-1, MD5, P-521).
fn signature_algorithm(name: &str) -> Option<Result<SignatureAlgorithm, ()>> {
    use SignatureAlgorithm as A;
    Some(Ok(match name {
        "rsa_pkcs1_sha256" | "RSA+SHA256" => A::RsaPkcs1Sha256,
        "rsa_pkcs1_sha384" | "RSA+SHA384" => A::RsaPkcs1Sha384,
        "rsa_pkcs1_sha512" | "RSA+SHA512" => A::RsaPkcs1Sha512,
        "ecdsa_secp256r1_sha256" | "ECDSA+SHA256" => A::EcdsaSecp256r1Sha256,
        "ecdsa_secp384r1_sha384" | "ECDSA+SHA384" => A::EcdsaSecp384r1Sha384,
        "rsa_pss_rsae_sha256" | "RSA-PSS+SHA256" | "PSS+SHA256" => A::RsaPssRsaeSha256,
        "rsa_pss_rsae_sha384" | "RSA-PSS+SHA384" | "PSS+SHA384" => A::RsaPssRsaeSha384,
        "rsa_pss_rsae_sha512" | "RSA-PSS+SHA512" | "PSS+SHA512" => A::RsaPssRsaeSha512,
        "ed25519" | "Ed25519" => A::Ed25519,
        "rsa_pkcs1_md5_sha1"
        | "rsa_pkcs1_sha1"
        | "RSA+SHA1"
        | "ecdsa_sha1"
        | "ECDSA+SHA1"
        | "ecdsa_secp521r1_sha512"
        | "ECDSA+SHA512" => return Some(Err(())),
        _ => return None,
    }))
}

/// Envoy's key layout: 16 bytes of name, 32 of HMAC key, 32 of AES key.
const TICKET_KEY_LEN: usize = 80;

/// `TlsSessionTicketKeys`: at least one key, each exactly 80 bytes (the
/// DataSources are read now, as Envoy reads them at config load).
pub fn session_ticket_keys(
    k: &tls::TlsSessionTicketKeys,
    path: &str,
) -> Result<SessionTicketKeys, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if k.keys.is_empty() {
        return Err(err(
            join(path, "keys"),
            "session ticket keys need at least one key",
        ));
    }
    let mut out = Vec::with_capacity(k.keys.len());
    for (i, d) in k.keys.iter().enumerate() {
        let kpath = format!("{path}.keys[{i}]");
        let bytes = match super::data_source(d, &kpath) {
            Ok(b) => b,
            Err(e) => {
                errs.extend(e);
                continue;
            }
        };
        if bytes.len() != TICKET_KEY_LEN {
            // Envoy's words.
            errs.push(
                kpath,
                format!(
                    "Incorrect TLS session ticket key length. Length {}, expected length {TICKET_KEY_LEN}.",
                    bytes.len()
                ),
            );
            continue;
        }
        let mut key = SessionTicketKey {
            name: [0; 16],
            hmac: [0; 32],
            aes: [0; 32],
        };
        key.name.copy_from_slice(&bytes[..16]);
        key.hmac.copy_from_slice(&bytes[16..48]);
        key.aes.copy_from_slice(&bytes[48..]);
        out.push(key);
    }
    errs.into_result(out.into())
}

/// A `static_resources.secrets` entry.
pub fn secret(s: &tls::Secret, path: &str) -> Result<(Name, Secret), ConfigErrors> {
    use tls::secret::Type as T;
    if s.name.is_empty() {
        return Err(err(join(path, "name"), "a secret needs a name"));
    }
    let secret = match &s.r#type {
        Some(T::TlsCertificate(t)) => {
            Secret::Certificate(tls_certificate(t, &join(path, "tls_certificate"))?)
        }
        Some(T::ValidationContext(v)) => {
            Secret::Validation(validation_context(v, &join(path, "validation_context"))?)
        }
        Some(T::SessionTicketKeys(k)) => {
            Secret::SessionTicketKeys(session_ticket_keys(k, &join(path, "session_ticket_keys"))?)
        }
        Some(T::GenericSecret(_)) => {
            return Err(err(
                join(path, "generic_secret"),
                "generic secrets are not implemented",
            ))
        }
        None => return Err(err(path, "a secret needs a type")),
    };
    Ok((s.name.as_str().into(), secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let h = hex_32(&"ab".repeat(32)).expect("hex");
        assert_eq!(h, [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(hex_32(&colons), Some([0xab; 32]));
        assert_eq!(hex_32("abc"), None);
        // base64 of 32 zero bytes.
        assert_eq!(
            base64_32("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Some([0; 32])
        );
        assert_eq!(base64_32("AAAA"), None);
    }

    #[test]
    fn upstream_default_maximum_is_tls12() {
        use tls::tls_parameters::TlsProtocol as P;
        let ctx = |params: Option<tls::TlsParameters>| tls::UpstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                tls_params: params,
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = upstream_tls(&ctx(None), "u").expect("valid");
        assert_eq!(t.params.max_version, TlsVersion::V1_2);
        let v13 = tls::TlsParameters {
            tls_maximum_protocol_version: P::TlSv13 as i32,
            ..Default::default()
        };
        let t = upstream_tls(&ctx(Some(v13)), "u").expect("valid");
        assert_eq!(t.params.max_version, TlsVersion::V1_3);
        let min13 = tls::TlsParameters {
            tls_minimum_protocol_version: P::TlSv13 as i32,
            ..Default::default()
        };
        let e = upstream_tls(&ctx(Some(min13)), "u").expect_err("min above the default max");
        assert_eq!(
            e.0[0].path,
            "u.common_tls_context.tls_params.tls_minimum_protocol_version"
        );
    }

    #[test]
    fn ciphers() {
        let p = tls::TlsParameters {
            cipher_suites: vec![
                "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]".into(),
                "AES128-GCM-SHA256".into(),
            ],
            ..Default::default()
        };
        let out = tls_params(&p, "p").expect("valid");
        assert_eq!(out.cipher_suites.len(), 2);
        let bad = tls::TlsParameters {
            cipher_suites: vec!["NOPE".into()],
            ..Default::default()
        };
        let e = tls_params(&bad, "p").expect_err("unknown");
        assert_eq!(e.0[0].path, "p.cipher_suites[0]");
        let none = tls::TlsParameters {
            cipher_suites: vec!["AES128-SHA".into()],
            ..Default::default()
        };
        assert!(tls_params(&none, "p").is_err());
    }
}
