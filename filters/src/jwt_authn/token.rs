//! A JWT as Envoy's `jwt_verify_lib` parses and verifies it
//! (`Jwt::parseFromString`, `verifyTimeConstraint`,
//! `verifyJwtWithoutTimeChecking`): the same checks in the same order, with
//! the same [`Status`]. Signatures are checked by `jsonwebtoken` (ring).
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use xds_client::config::{base64url_decode, Jwk, JwkKey};

/// Envoy's `google::jwt_verify::Status` (the ones weir can produce), with
/// its text and the response code details built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    JwtMissed,
    JwtNotYetValid,
    JwtExpired,
    JwtBadFormat,
    JwtHeaderParseErrorBadBase64,
    JwtHeaderParseErrorBadJson,
    JwtHeaderBadAlg,
    JwtHeaderNotImplementedAlg,
    JwtHeaderBadKid,
    JwtPayloadParseErrorBadBase64,
    JwtEd25519SignatureWrongLength,
    JwtPayloadParseErrorBadJson,
    JwtPayloadParseErrorIssNotString,
    JwtPayloadParseErrorSubNotString,
    JwtPayloadParseErrorIatNotInteger,
    JwtPayloadParseErrorIatOutOfRange,
    JwtPayloadParseErrorNbfNotInteger,
    JwtPayloadParseErrorNbfOutOfRange,
    JwtPayloadParseErrorExpNotInteger,
    JwtPayloadParseErrorExpOutOfRange,
    JwtPayloadParseErrorJtiNotString,
    JwtPayloadParseErrorAudNotString,
    JwtSignatureParseErrorBadBase64,
    JwtUnknownIssuer,
    JwtAudienceNotAllowed,
    JwtVerificationFail,
    JwksKidAlgMismatch,
    JwksFetchFail,
}

/// `(status, text, details)`: the text is Envoy's `getStatusString`, the
/// details `jwt_authn_access_denied{<text with spaces as _>}`.
macro_rules! statuses {
    ($($s:ident => $text:literal, $details:literal;)*) => {
        impl Status {
            /// Envoy's `getStatusString`.
            pub fn text(self) -> &'static str {
                match self { $(Status::$s => $text,)* }
            }
            /// `%RESPONSE_CODE_DETAILS%` of a denial with this status.
            pub fn details(self) -> &'static str {
                match self { $(Status::$s => $details,)* }
            }
        }
    };
}

statuses! {
    Ok => "OK", "jwt_authn_access_denied{OK}";
    JwtMissed => "Jwt is missing", "jwt_authn_access_denied{Jwt_is_missing}";
    JwtNotYetValid => "Jwt not yet valid", "jwt_authn_access_denied{Jwt_not_yet_valid}";
    JwtExpired => "Jwt is expired", "jwt_authn_access_denied{Jwt_is_expired}";
    JwtBadFormat => "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        "jwt_authn_access_denied{Jwt_is_not_in_the_form_of_Header.Payload.Signature_with_two_dots_and_3_sections}";
    JwtHeaderParseErrorBadBase64 => "Jwt header is an invalid Base64url encoded",
        "jwt_authn_access_denied{Jwt_header_is_an_invalid_Base64url_encoded}";
    JwtHeaderParseErrorBadJson => "Jwt header is an invalid JSON",
        "jwt_authn_access_denied{Jwt_header_is_an_invalid_JSON}";
    JwtHeaderBadAlg => "Jwt header [alg] field is required and must be a string",
        "jwt_authn_access_denied{Jwt_header_[alg]_field_is_required_and_must_be_a_string}";
    JwtHeaderNotImplementedAlg => "Jwt header [alg] is not supported",
        "jwt_authn_access_denied{Jwt_header_[alg]_is_not_supported}";
    JwtHeaderBadKid => "Jwt header [kid] field is not a string",
        "jwt_authn_access_denied{Jwt_header_[kid]_field_is_not_a_string}";
    JwtPayloadParseErrorBadBase64 => "Jwt payload is an invalid Base64url encoded",
        "jwt_authn_access_denied{Jwt_payload_is_an_invalid_Base64url_encoded}";
    JwtEd25519SignatureWrongLength => "Jwt ED25519 signature is wrong length",
        "jwt_authn_access_denied{Jwt_ED25519_signature_is_wrong_length}";
    JwtPayloadParseErrorBadJson => "Jwt payload is an invalid JSON",
        "jwt_authn_access_denied{Jwt_payload_is_an_invalid_JSON}";
    JwtPayloadParseErrorIssNotString => "Jwt payload [iss] field is not a string",
        "jwt_authn_access_denied{Jwt_payload_[iss]_field_is_not_a_string}";
    JwtPayloadParseErrorSubNotString => "Jwt payload [sub] field is not a string",
        "jwt_authn_access_denied{Jwt_payload_[sub]_field_is_not_a_string}";
    JwtPayloadParseErrorIatNotInteger => "Jwt payload [iat] field is not an integer",
        "jwt_authn_access_denied{Jwt_payload_[iat]_field_is_not_an_integer}";
    JwtPayloadParseErrorIatOutOfRange => "Jwt payload [iat] field is not a positive 64 bit integer",
        "jwt_authn_access_denied{Jwt_payload_[iat]_field_is_not_a_positive_64_bit_integer}";
    JwtPayloadParseErrorNbfNotInteger => "Jwt payload [nbf] field is not an integer",
        "jwt_authn_access_denied{Jwt_payload_[nbf]_field_is_not_an_integer}";
    JwtPayloadParseErrorNbfOutOfRange => "Jwt payload [nbf] field is not a positive 64 bit integer",
        "jwt_authn_access_denied{Jwt_payload_[nbf]_field_is_not_a_positive_64_bit_integer}";
    JwtPayloadParseErrorExpNotInteger => "Jwt payload [exp] field is not an integer",
        "jwt_authn_access_denied{Jwt_payload_[exp]_field_is_not_an_integer}";
    JwtPayloadParseErrorExpOutOfRange => "Jwt payload [exp] field is not a positive 64 bit integer",
        "jwt_authn_access_denied{Jwt_payload_[exp]_field_is_not_a_positive_64_bit_integer}";
    JwtPayloadParseErrorJtiNotString => "Jwt payload [jti] field is not a string",
        "jwt_authn_access_denied{Jwt_payload_[jti]_field_is_not_a_string}";
    JwtPayloadParseErrorAudNotString => "Jwt payload [aud] field is not a string or string list",
        "jwt_authn_access_denied{Jwt_payload_[aud]_field_is_not_a_string_or_string_list}";
    JwtSignatureParseErrorBadBase64 => "Jwt signature is an invalid Base64url encoded",
        "jwt_authn_access_denied{Jwt_signature_is_an_invalid_Base64url_encoded}";
    JwtUnknownIssuer => "Jwt issuer is not configured",
        "jwt_authn_access_denied{Jwt_issuer_is_not_configured}";
    JwtAudienceNotAllowed => "Audiences in Jwt are not allowed",
        "jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}";
    JwtVerificationFail => "Jwt verification fails",
        "jwt_authn_access_denied{Jwt_verification_fails}";
    JwksKidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
        "jwt_authn_access_denied{Jwks_doesn't_have_key_to_match_kid_or_alg_from_Jwt}";
    JwksFetchFail => "Jwks remote fetch is failed",
        "jwt_authn_access_denied{Jwks_remote_fetch_is_failed}";
}

/// A parsed (not yet verified) token.
#[derive(Debug)]
pub struct Jwt<'a> {
    pub alg: String,
    pub kid: String,
    pub header: Map<String, Value>,
    pub payload: Map<String, Value>,
    /// The header and payload segments as sent (what was signed).
    pub signed: &'a str,
    /// The payload segment as sent (`forward_payload_header`).
    pub payload_b64: &'a str,
    /// The signature segment without padding.
    pub signature_b64: &'a str,
    pub signature_len: usize,
    pub iss: String,
    pub nbf: u64,
    pub exp: u64,
    pub audiences: Vec<String>,
}

fn is_implemented(alg: &str) -> bool {
    matches!(
        alg,
        "ES256"
            | "ES384"
            | "ES512"
            | "HS256"
            | "HS384"
            | "HS512"
            | "RS256"
            | "RS384"
            | "RS512"
            | "PS256"
            | "PS384"
            | "PS512"
            | "EdDSA"
    )
}

enum Find<'a> {
    Missing,
    Ok(&'a Value),
}

fn find<'a>(m: &'a Map<String, Value>, k: &str) -> Find<'a> {
    m.get(k).map_or(Find::Missing, Find::Ok)
}

/// StructUtils::GetString: `Err` on a wrong type.
fn get_string(m: &Map<String, Value>, k: &str) -> Result<String, ()> {
    match find(m, k) {
        Find::Missing => Ok(String::new()),
        Find::Ok(Value::String(s)) => Ok(s.clone()),
        Find::Ok(_) => Err(()),
    }
}

/// StructUtils::GetUInt64: `Err(true)` on a wrong type, `Err(false)` out
/// of range.
fn get_u64(m: &Map<String, Value>, k: &str) -> Result<u64, bool> {
    match find(m, k) {
        Find::Missing => Ok(0),
        Find::Ok(Value::Number(n)) => {
            let d = n.as_f64().unwrap_or(f64::NAN);
            if d.is_nan() || d < 0.0 || d >= u64::MAX as f64 {
                Err(false)
            } else {
                Ok(d as u64)
            }
        }
        Find::Ok(_) => Err(true),
    }
}

fn json_object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

impl<'a> Jwt<'a> {
    /// As `Jwt::parseFromString`.
    pub fn parse(token: &'a str) -> Result<Jwt<'a>, Status> {
        // absl::StrSplit(.., '.', SkipEmpty()): exactly three non-empty parts.
        let mut parts = token.split('.').filter(|s| !s.is_empty());
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Status::JwtBadFormat);
        };
        let header_bytes = base64url_decode(h).ok_or(Status::JwtHeaderParseErrorBadBase64)?;
        let header = json_object(&header_bytes).ok_or(Status::JwtHeaderParseErrorBadJson)?;
        let alg = match find(&header, "alg") {
            Find::Ok(Value::String(a)) => a.clone(),
            _ => return Err(Status::JwtHeaderBadAlg),
        };
        if !is_implemented(&alg) {
            return Err(Status::JwtHeaderNotImplementedAlg);
        }
        let kid = get_string(&header, "kid").map_err(|_| Status::JwtHeaderBadKid)?;
        let payload_bytes = base64url_decode(p).ok_or(Status::JwtPayloadParseErrorBadBase64)?;
        let payload = json_object(&payload_bytes).ok_or(Status::JwtPayloadParseErrorBadJson)?;
        let iss =
            get_string(&payload, "iss").map_err(|_| Status::JwtPayloadParseErrorIssNotString)?;
        get_string(&payload, "sub").map_err(|_| Status::JwtPayloadParseErrorSubNotString)?;
        get_u64(&payload, "iat").map_err(|wrong| {
            if wrong {
                Status::JwtPayloadParseErrorIatNotInteger
            } else {
                Status::JwtPayloadParseErrorIatOutOfRange
            }
        })?;
        let nbf = get_u64(&payload, "nbf").map_err(|wrong| {
            if wrong {
                Status::JwtPayloadParseErrorNbfNotInteger
            } else {
                Status::JwtPayloadParseErrorNbfOutOfRange
            }
        })?;
        let exp = get_u64(&payload, "exp").map_err(|wrong| {
            if wrong {
                Status::JwtPayloadParseErrorExpNotInteger
            } else {
                Status::JwtPayloadParseErrorExpOutOfRange
            }
        })?;
        get_string(&payload, "jti").map_err(|_| Status::JwtPayloadParseErrorJtiNotString)?;
        let audiences = match find(&payload, "aud") {
            Find::Missing => Vec::new(),
            Find::Ok(Value::String(a)) => vec![a.clone()],
            Find::Ok(Value::Array(l)) => {
                let mut v = Vec::with_capacity(l.len());
                for a in l {
                    match a {
                        Value::String(a) => v.push(a.clone()),
                        _ => return Err(Status::JwtPayloadParseErrorAudNotString),
                    }
                }
                v
            }
            Find::Ok(_) => return Err(Status::JwtPayloadParseErrorAudNotString),
        };
        let signature = base64url_decode(s).ok_or(Status::JwtSignatureParseErrorBadBase64)?;
        // What was signed: the token's first two segments as sent.
        let signed_end = h.len() + 1 + p.len();
        let start = token.len() - token.trim_start_matches('.').len();
        let signed = token
            .get(start..start + signed_end)
            .filter(|x| *x == format!("{h}.{p}"))
            .unwrap_or("");
        Ok(Jwt {
            alg,
            kid,
            header,
            payload,
            signed,
            payload_b64: p,
            signature_b64: s.trim_end_matches('='),
            signature_len: signature.len(),
            iss,
            nbf,
            exp,
            audiences,
        })
    }

    /// As `Jwt::verifyTimeConstraint`.
    pub fn check_time(&self, now: u64, skew: u64) -> Status {
        if now.saturating_add(skew) < self.nbf {
            return Status::JwtNotYetValid;
        }
        if self.exp != 0 && now > self.exp.saturating_add(skew) {
            return Status::JwtExpired;
        }
        Status::Ok
    }

    /// As `verifyJwtWithoutTimeChecking`: keys whose `kid` (when both have
    /// one) and `alg` (when the key has one) fit are tried in order.
    pub fn verify(&self, keys: &[VerifyKey]) -> Status {
        if self.signed.is_empty() {
            return Status::JwtVerificationFail;
        }
        let mut matched = false;
        for k in keys {
            if !self.kid.is_empty() && !k.jwk.kid.is_empty() && k.jwk.kid != self.kid {
                continue;
            }
            if !k.jwk.alg.is_empty() && k.jwk.alg != self.alg {
                continue;
            }
            matched = true;
            let alg = match (&k.jwk.key, self.alg.as_str()) {
                (JwkKey::Ec { .. }, "ES384") => Some(Algorithm::ES384),
                // ES512 (P-521) has no implementation here: fails.
                (JwkKey::Ec { .. }, "ES512") => None,
                (JwkKey::Ec { .. }, _) => Some(Algorithm::ES256),
                (JwkKey::Rsa { .. }, "RS256") => Some(Algorithm::RS256),
                (JwkKey::Rsa { .. }, "RS384") => Some(Algorithm::RS384),
                (JwkKey::Rsa { .. }, "RS512") => Some(Algorithm::RS512),
                (JwkKey::Rsa { .. }, "PS256") => Some(Algorithm::PS256),
                (JwkKey::Rsa { .. }, "PS384") => Some(Algorithm::PS384),
                (JwkKey::Rsa { .. }, "PS512") => Some(Algorithm::PS512),
                (JwkKey::Rsa { .. }, _) => None,
                (JwkKey::Oct { .. }, "HS384") => Some(Algorithm::HS384),
                (JwkKey::Oct { .. }, "HS512") => Some(Algorithm::HS512),
                (JwkKey::Oct { .. }, _) => Some(Algorithm::HS256),
                (JwkKey::Ed25519 { .. }, _) => {
                    if self.signature_len != 64 {
                        return Status::JwtEd25519SignatureWrongLength;
                    }
                    Some(Algorithm::EdDSA)
                }
            };
            // The key's family always fits `alg` (jsonwebtoken requires it).
            if let Some(alg) = alg {
                if jsonwebtoken::crypto::verify(
                    self.signature_b64,
                    self.signed.as_bytes(),
                    &k.key,
                    alg,
                )
                .unwrap_or(false)
                {
                    return Status::Ok;
                }
            }
        }
        if matched {
            Status::JwtVerificationFail
        } else {
            Status::JwksKidAlgMismatch
        }
    }
}

/// A JWK with its decoding key, built once per config.
pub struct VerifyKey {
    pub jwk: Jwk,
    key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.jwk.kid)
            .field("alg", &self.jwk.alg)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    pub fn new(jwk: &Jwk) -> VerifyKey {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let key = match &jwk.key {
            JwkKey::Rsa { n, e } => DecodingKey::from_rsa_raw_components(n, e),
            // Components re-encoded: jsonwebtoken decodes what it just got.
            JwkKey::Ec { x, y, .. } => DecodingKey::from_ec_components(&b64(x), &b64(y))
                .unwrap_or_else(|_| DecodingKey::from_secret(&[])),
            JwkKey::Ed25519 { x } => DecodingKey::from_ed_components(&b64(x))
                .unwrap_or_else(|_| DecodingKey::from_secret(&[])),
            JwkKey::Oct { k } => DecodingKey::from_secret(k),
        };
        VerifyKey {
            jwk: jwk.clone(),
            key,
        }
    }
}
